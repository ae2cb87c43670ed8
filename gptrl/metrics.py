"""One metrics writer for every stage: JSONL (`metrics.jsonl`) and TensorBoard events in the workdir."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np


def _to_python(value: Any) -> Any:
  value = np.asarray(value).item() if hasattr(value, "shape") or isinstance(value, np.generic) else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep the fact visible as a string
  return value


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
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if resume_step is not None and os.path.exists(self.path):
      self._truncate_after(resume_step)
    self._file = open(self.path, "a", encoding="utf-8")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)
    except ImportError:  # TensorBoard output is a convenience; JSONL is the record.
      self._tb = None

  def _truncate_after(self, step: int) -> None:
    kept = []
    with open(self.path, encoding="utf-8") as f:
      for line in f:
        try:
          if json.loads(line).get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
        except json.JSONDecodeError:
          continue  # a line torn by a kill mid-write
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Writes one row of scalar metrics for `step`."""
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, int(step))

  def write_texts(self, step: int, tag: str, texts: list[str]) -> None:
    """Writes text samples to TensorBoard and to `<workdir>/samples.jsonl`."""
    if not self.enabled:
      return
    with open(os.path.join(os.path.dirname(self.path), "samples.jsonl"), "a", encoding="utf-8") as f:
      f.write(json.dumps({"step": int(step), "tag": tag, "texts": texts}) + "\n")
    if self._tb is not None:
      self._tb.add_text(tag, "\n\n---\n\n".join(f"```\n{t}\n```" for t in texts), int(step))

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()
