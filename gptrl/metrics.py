"""One metrics writer for every stage: JSONL (`metrics.jsonl`) and TensorBoard events in the workdir.

In a bucket workdir (gs://) the JSONL files are kept in memory and uploaded whole (gptrl/fileio.py Appender), and
TensorBoard events are written to a local temporary folder and copied to `<workdir>/tensorboard/`: both at most
every 30 s, at every `sync` (the training loops call it when they save a checkpoint, so the rows of a step are in
the bucket before its checkpoint is) and at `close`. A kill loses the rows since the last upload, which a resume
would drop anyway unless a checkpoint came after them.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from typing import Any, Mapping

import numpy as np

from gptrl import fileio

_UPLOAD_EVERY_S = 30.0  # a bucket workdir: seconds between uploads of the logs (TensorBoard's own flush period)


def _to_python(value: Any) -> Any:
  value = np.asarray(value).item() if hasattr(value, "shape") or isinstance(value, np.generic) else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep the fact visible as a string
  return value


def truncate_jsonl_after(path: str, step: int, *, key: str = "step") -> None:
  """Drops the lines of JSONL file `path` whose `key` is above `step`, and lines torn by a kill mid-write, so a
  resumed run's log reads as one uninterrupted run. Nothing to do when the file does not exist."""
  if not fileio.exists(path):
    return
  kept = []
  for line in fileio.read_text(path, errors="replace").splitlines(keepends=True):
    try:
      row = json.loads(line)
      if isinstance(row, dict) and row.get(key, 0) <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
    except (json.JSONDecodeError, TypeError):
      continue  # a line torn by a kill mid-write
  fileio.atomic_write(path, "".join(kept))


class MetricsWriter:
  """Appends `{"step": s, **metrics}` lines to `<workdir>/metrics.jsonl` and mirrors scalars to TensorBoard.

  Only the writer with `enabled=True` (process 0) writes. On resume pass `resume_step`: rows logged after
  that step by the interrupted run are dropped, so the file reads as one uninterrupted run.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None,
               filename: str = "metrics.jsonl"):
    self.enabled = enabled
    self.path = os.path.join(workdir, filename)
    self._tb = None
    self._closed = False
    if not enabled:
      return
    fileio.makedirs(workdir)
    if resume_step is not None:
      truncate_jsonl_after(self.path, resume_step)
    self._log = fileio.Appender(self.path, upload_every_s=_UPLOAD_EVERY_S)
    self._samples = fileio.Appender(os.path.join(workdir, "samples.jsonl"), upload_every_s=_UPLOAD_EVERY_S,
                                    create=False)
    # TensorBoard writes events to local files; a bucket workdir gets copies of them (see the module docstring).
    remote = fileio.is_remote(workdir)
    self._tb_remote = os.path.join(workdir, "tensorboard") if remote else None
    self._tb_dir = tempfile.mkdtemp(prefix="gptrl-tensorboard-") if remote else os.path.join(workdir, "tensorboard")
    self._last_upload = time.monotonic()
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(self._tb_dir, flush_secs=30)
    except ImportError:  # TensorBoard output is a convenience; JSONL is the record.
      self._tb = None

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Writes one row of scalar metrics for `step`."""
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
    self._log.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, int(step))
    self._upload_tensorboard_if_due()

  def write_texts(self, step: int, tag: str, texts: list[str]) -> None:
    """Writes text samples to TensorBoard and to `<workdir>/samples.jsonl`."""
    if not self.enabled:
      return
    self._samples.write(json.dumps({"step": int(step), "tag": tag, "texts": texts}) + "\n")
    if self._tb is not None:
      self._tb.add_text(tag, "\n\n---\n\n".join(f"```\n{t}\n```" for t in texts), int(step))

  def sync(self) -> None:
    """Makes every row written so far durable in the workdir: a no-op for a local one (rows are flushed as they
    are written); uploads the logs and TensorBoard events of a bucket workdir."""
    if not self.enabled or self._closed:
      return
    self._log.sync()
    self._samples.sync()
    self._upload_tensorboard()

  def _upload_tensorboard_if_due(self) -> None:
    if self._tb_remote and time.monotonic() - self._last_upload >= _UPLOAD_EVERY_S:
      self._upload_tensorboard()

  def _upload_tensorboard(self, *, flush: bool = True) -> None:
    """Copies the local event files to `<workdir>/tensorboard/` (bucket workdirs only)."""
    self._last_upload = time.monotonic()
    if self._tb is None or not self._tb_remote:
      return
    if flush:
      self._tb.flush()
    for root, _, files in os.walk(self._tb_dir):
      for name in files:
        local = os.path.join(root, name)
        rel = os.path.relpath(local, self._tb_dir).replace(os.sep, "/")
        with open(local, "rb") as f:
          fileio.atomic_write(f"{self._tb_remote}/{rel}", f.read())

  def close(self) -> None:
    """Flushes and closes everything (uploading a bucket workdir's logs); calling it again does nothing."""
    if not self.enabled or self._closed:
      return
    self._log.close()
    self._samples.close()
    if self._tb is not None:
      self._tb.close()
    if self._tb_remote:
      self._upload_tensorboard(flush=False)  # closing flushed it
      shutil.rmtree(self._tb_dir, ignore_errors=True)
    self._closed = True
