"""Checkpoint save/restore throughput of gptrl against the disk's own bandwidth, and what a save costs the loop.

  python benchmarks/checkpoint_io.py                                   # ~100M model, 3 repeats
  python benchmarks/checkpoint_io.py --model small --repeats 5 --out checkpoint_io.json
  python benchmarks/checkpoint_io.py --dir /mnt/scratch                # measure another disk

Everything runs in one process, in one scratch folder (--dir; default: a temporary folder under the working
directory, deleted at the end), through gptrl.checkpoint.Checkpointer exactly as the training loop uses it.

1. State: gptrl.trainer.create_train_state of the chosen model with its Adam state (~3x the parameter bytes).
   Adam's moments start at zero, which zstd (--compression) compresses away; after training they are dense, so by
   default they are filled with random values of plausible size (--opt_state init keeps the zeros).
2. Save (each repeat): `Checkpointer.save(step, state, data=, meta=)` then `wait()`, as the run loop
   (gptrl/loop.py) does. Measured:
   the time the caller is blocked in save(); the time from the call until the step is committed (orbax has
   written it, the sha256 manifest is written and fsynced, the folder renamed): any save() or wait() issued
   before then blocks for the rest; save bytes/s = bytes on disk / call-to-commit time. The manifest's own
   time (hashing every file read back + fsync) comes from gptrl.checkpoint's log line. keep = --repeats, so
   no old step is deleted inside these timings (the loop below includes that).
3. Restore (each repeat), the resume path of a stage: with the step's pages dropped from the page cache, a
   fresh Checkpointer opens the folder (which sha256-verifies the newest step) and `restore_latest_valid` reads
   it into the same shardings (block_until_ready): "resume". Then, pages dropped again, `restore` of the same
   step by the same Checkpointer (already verified: orbax's read alone): "restore, cold"; then once more with
   the pages cached: "restore, cached". sha256 alone: `verify_step` on the cached files.
4. Disk (each repeat, same folder, same number of bytes as the checkpoint on disk): sequential writes of
   --chunk_mb then fsync ("write"); pages dropped, read back ("read, cold"); read again ("read, cached").
   Ratios compare each checkpoint number with its like: save/write, restore or resume cold/read cold,
   restore cached/read cached.
5. Loop: a jitted step with the train step's shardings and donation (a small matmul chain; the state passes
   through) runs N steps with `poll()` every step and a save every k steps and at the last (as the run loop), then
   `wait()`. The same steps without saves are timed in windows of ~2 s just before and after (N x their mean
   step time; a full-length run would double the benchmark's time). Overhead per save = (with - without) /
   saves, split into time blocked in save(), in poll() (a finished save is completed there: size check and
   deletion of the previous step, as keep=1 with the repeats' last step left on disk makes every commit of a
   long run do) and in the final wait(); the rest is steps slowed down by the background save sharing the CPU.
   k defaults to SAVE_SPACING x the measured save-to-commit time in steps, so a save normally ends before the
   next begins (the steady state of checkpoint_every=200 with real steps); a smaller --save_every shows the
   next save() waiting instead.

Cold reads use posix_fadvise(POSIX_FADV_DONTNEED) on every file after fsync (no root needed); the fraction of
pages still resident afterwards is checked with mincore(2) and reported. On a virtual disk the host may still
cache what the guest dropped, so "cold" means "not in this machine's page cache".
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import logging
import math
import mmap
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import benchlib  # sets sys.path for gptrl

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from gptrl import checkpoint as ckpt_lib  # pylint: disable=wrong-import-position
from gptrl import config as config_lib  # pylint: disable=wrong-import-position
from gptrl import model as model_lib  # pylint: disable=wrong-import-position
from gptrl import optim  # pylint: disable=wrong-import-position
from gptrl import sharding  # pylint: disable=wrong-import-position
from gptrl import trainer  # pylint: disable=wrong-import-position
from gptrl.stages import recipe  # pylint: disable=wrong-import-position

MODELS = {
    # configs/pretrain_cpu.py's model with its 4096-token tokenizer.
    "small": dict(vocab_size=4096, num_layers=4, num_heads=4, d_model=256, max_len=256),
    # ~100M parameters (GPT-2-small shape with a 4096 vocabulary), as in benchmarks/train_throughput.py.
    "100m": dict(vocab_size=4096, num_layers=12, num_heads=12, d_model=768, max_len=256),
}
MB = 1e6
# Loop saves are this many save-to-commit times apart by default: a save normally ends before the next begins.
SAVE_SPACING = 1.25


# ----------------------------------------------------------------------------------------------
# Files, the page cache and the filesystem.


def filesystem_of(path: str) -> dict[str, Any]:
  """Mount point, type and source of the filesystem holding `path` (from /proc/self/mountinfo), free bytes."""
  path = os.path.realpath(path)
  best = {"mount_point": "?", "type": "unknown", "source": "?"}
  try:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
      for line in f:
        left, right = line.split(" - ", 1)
        mount_point = left.split()[4].replace("\\040", " ")
        inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best["mount_point"].strip("?")):
          fs_type, source = right.split()[:2]
          best = {"mount_point": mount_point, "type": fs_type, "source": source}
  except OSError:
    pass
  st = os.statvfs(path)
  return {**best, "free_bytes": st.f_bavail * st.f_frsize}


def files_under(directory: str) -> list[str]:
  return sorted(os.path.join(root, name) for root, _, names in os.walk(directory) for name in names)


def bytes_of(paths: list[str]) -> int:
  return sum(os.path.getsize(p) for p in paths)


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_LIBC.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_LIBC.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)


def resident_fraction(paths: list[str]) -> float | None:
  """Fraction of the pages of `paths` in the page cache (mincore(2)); None if it cannot be asked."""
  page = mmap.PAGESIZE
  total = resident = 0
  try:
    for path in paths:
      size = os.path.getsize(path)
      if size == 0:
        continue
      fd = os.open(path, os.O_RDONLY)
      try:
        addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
          return None
        pages = (size + page - 1) // page
        vec = (ctypes.c_ubyte * pages)()
        ok = _LIBC.mincore(addr, size, vec) == 0
        _LIBC.munmap(addr, size)
        if not ok:
          return None
        total += pages
        resident += int((np.frombuffer(vec, np.uint8) & 1).sum())
      finally:
        os.close(fd)
  except (OSError, AttributeError):
    return None
  return resident / total if total else 0.0


def drop_page_cache(paths: list[str]) -> float | None:
  """fsyncs each file and asks the kernel to drop its pages (POSIX_FADV_DONTNEED, no root needed; dirty pages
  would stay, hence the fsync). Returns the fraction still resident afterwards (None: unknown)."""
  for path in paths:
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)
  return resident_fraction(paths)


def fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def read_all(path: str, buffer: memoryview) -> int:
  """Reads `path` sequentially into `buffer`-sized pieces; returns the bytes read."""
  n = 0
  with open(path, "rb", buffering=0) as f:
    while got := f.readinto(buffer):
      n += got
  return n


def measure_disk(directory: str, nbytes: int, chunk: bytes) -> dict[str, Any]:
  """Write (sequential `chunk`s, fsync of the file and folder), cold read and cached read of `nbytes`."""
  path = os.path.join(directory, "disk-bandwidth.bin")
  view = memoryview(chunk)
  t0 = time.perf_counter()
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  try:
    written = 0
    while written < nbytes:
      written += os.write(fd, view[:min(len(view), nbytes - written)])
    t_written = time.perf_counter()
    os.fsync(fd)
  finally:
    os.close(fd)
  fsync_dir(directory)
  t_synced = time.perf_counter()
  resident = drop_page_cache([path])
  buffer = memoryview(bytearray(len(chunk)))
  t0_read = time.perf_counter()
  assert read_all(path, buffer) == nbytes
  t_cold = time.perf_counter()
  read_all(path, buffer)
  t_cached = time.perf_counter()
  os.remove(path)
  return {"bytes": nbytes, "write_s": t_synced - t0, "write_pagecache_s": t_written - t0,
          "read_cold_s": t_cold - t0_read, "read_cached_s": t_cached - t_cold, "resident_after_drop": resident}


# ----------------------------------------------------------------------------------------------
# The state, and the manifest times gptrl.checkpoint logs.


class ManifestTimes(logging.Handler):
  """Collects the seconds gptrl.checkpoint logs for writing each step's manifest (hash + fsync of every file)."""
  PATTERN = re.compile(r"Checkpoint (\d+): manifest of (\d+) files, ([\d.]+) MB, in ([\d.]+) s")

  def __init__(self):
    super().__init__(logging.INFO)
    self.seconds: dict[int, float] = {}

  def emit(self, record: logging.LogRecord) -> None:
    match = self.PATTERN.match(record.getMessage())
    if match:
      self.seconds[int(match.group(1))] = float(match.group(4))


def densify_optimizer_state(state: trainer.TrainState, shardings: Any, seed: int) -> trainer.TrainState:
  """The state with every float array of the optimizer state random (Adam's mu ~ 1e-3 U(-0.5, 0.5), nu its
  square), placed in its sharding: what a trained optimizer state looks like to a compressor. Drawn with NumPy
  (jax.random's threefry takes tens of seconds for 1e8 values on a busy CPU); one process only."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf, leaf_sharding):
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf
    values = rng.random(leaf.shape, np.float32)
    values -= 0.5
    values *= 1e-3
    if any(getattr(k, "name", None) == "nu" for k in path):
      values *= values
    return jax.device_put(values.astype(leaf.dtype, copy=False), leaf_sharding)

  return state.replace(opt_state=jax.tree_util.tree_map_with_path(fill, state.opt_state, shardings.opt_state))


def make_state(name: str, opt_state: str, seed: int = 0):
  """(state, shardings, mesh, model config, parameter count) of model `name`."""
  model_cfg = config_lib.ModelConfig(**MODELS[name])
  mesh = sharding.make_mesh(config_lib.MeshConfig())
  model = model_lib.GPT(model_cfg)
  optimizer = optim.make_optimizer(config_lib.OptimConfig(), 1000)
  state, shardings = trainer.create_train_state(recipe.init_params(model, model_cfg.max_len), optimizer, seed, mesh)
  if opt_state == "dense":
    state = densify_optimizer_state(state, shardings, seed + 1)
  jax.block_until_ready(state)
  return state, shardings, mesh, model_cfg, model_lib.count_params(state.params)


def same_values(a: Any, b: Any) -> bool:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(leaves_a) == len(leaves_b) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))


# ----------------------------------------------------------------------------------------------
# Save and restore, through the Checkpointer.


def measure_save(checkpointer: ckpt_lib.Checkpointer, step: int, state: Any, meta: dict[str, Any],
                 manifest_times: ManifestTimes) -> dict[str, Any]:
  """One save as the run loop (gptrl/loop.py) does it, then wait(); the step's size on disk and the sha256 cost of
  verifying it."""
  data = {"iterator": {"position": step}, "fingerprint": "checkpoint-io-benchmark", "fingerprint_parts": {}}
  t0 = time.perf_counter()
  checkpointer.save(step, state, data=data, meta=meta)
  t_returned = time.perf_counter()
  checkpointer.wait()
  t_committed = time.perf_counter()
  step_dir = os.path.join(checkpointer.directory, str(step))
  files = files_under(step_dir)
  t_hash = time.perf_counter()
  problem = ckpt_lib.verify_step(step_dir, hashes=True)  # files just written: all in the page cache
  hash_s = time.perf_counter() - t_hash
  if problem is not None:
    raise RuntimeError(f"{step_dir} fails its own manifest: {problem}")
  return {"step": step, "bytes_on_disk": bytes_of(files), "files": len(files), "blocked_s": t_returned - t0,
          "background_s": t_committed - t_returned, "commit_s": t_committed - t0,
          "manifest_s": manifest_times.seconds.get(step), "sha256_verify_cached_s": hash_s}


def measure_restore(directory: str, step: int, state: Any, shardings: Any, *, check: bool) -> dict[str, Any]:
  """Resume (fresh Checkpointer: sha256 verification, then restore_latest_valid), cold; then restore() alone,
  cold and cached. Every restore lands in `shardings` and is waited for with block_until_ready."""
  step_files = files_under(os.path.join(directory, str(step)))
  abstract = ckpt_lib.abstract_like(state, shardings)
  residents = [drop_page_cache(step_files)]
  out = {}
  t0 = time.perf_counter()
  checkpointer = ckpt_lib.Checkpointer(directory)  # verifies the newest step's sha256s, as a resume does
  t_opened = time.perf_counter()
  try:
    restored = checkpointer.restore_latest_valid(abstract)
    jax.block_until_ready(restored[1])
    t_resumed = time.perf_counter()
    if restored[0] != step:
      raise RuntimeError(f"resumed step {restored[0]}, expected {step}")
    if check and not same_values(restored[1], state):
      raise RuntimeError(f"step {step} restored other values than were saved")
    del restored
    out.update(open_verify_cold_s=t_opened - t0, restore_after_verify_s=t_resumed - t_opened,
               resume_cold_s=t_resumed - t0)
    for name, drop in (("restore_cold_s", True), ("restore_cached_s", False)):
      if drop:
        residents.append(drop_page_cache(step_files))
      t0 = time.perf_counter()
      restored, _, _ = checkpointer.restore(step, abstract)  # verified above: orbax's read alone
      jax.block_until_ready(restored)
      out[name] = time.perf_counter() - t0
      del restored
  finally:
    checkpointer.close()
  out["resident_after_drop"] = None if None in residents else max(residents)
  return out


# ----------------------------------------------------------------------------------------------
# The loop: steps with and without saves.


def make_dummy_step(width: int, depth: int) -> Callable:
  """A train_step(state, batch) of the real signature: `depth` matmuls of the batch (cost), state passed on
  with step + 1 (so donation and output shardings are those of the real step)."""
  def train_step(state, batch):
    hidden_BxD = batch["inputs"]
    for _ in range(depth):
      hidden_BxD = jnp.tanh(hidden_BxD @ batch["weights"] / math.sqrt(width))
    return state.replace(step=state.step + 1), {"train/loss": jnp.mean(hidden_BxD)}
  return train_step


def run_steps(step_fn: Callable, state: Any, batch: Any, steps: int, *, checkpointer=None, save_every: int = 0,
              meta: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
  """`steps` steps as the run loop runs them (poll every step, a step's metrics fetched after the next is
  dispatched, a save every `save_every` steps and at the last, wait at the end). Returns (state, timings)."""
  blocked_save, blocked_poll, final_s = [], [], 0.0
  previous = None
  t0 = time.perf_counter()
  for step in range(steps):
    state, metrics = step_fn(state, batch)
    if checkpointer is not None:
      t = time.perf_counter()
      checkpointer.poll()
      blocked_poll.append(time.perf_counter() - t)
    if previous is not None:
      float(previous["train/loss"])
    previous = metrics
    done = step + 1
    if checkpointer is not None and (done % save_every == 0 or done == steps):
      t = time.perf_counter()
      checkpointer.save(done, state, data={"iterator": {"position": done}, "fingerprint": "checkpoint-io-loop",
                                           "fingerprint_parts": {}}, meta=meta or {})
      blocked_save.append(time.perf_counter() - t)
      if done == steps:
        final_s = blocked_save[-1]
  float(previous["train/loss"])
  if checkpointer is not None:
    t = time.perf_counter()
    checkpointer.wait()
    final_s += time.perf_counter() - t
  jax.block_until_ready(state)
  total = time.perf_counter() - t0
  return state, {"total_s": total, "save_calls_s": blocked_save, "poll_total_s": sum(blocked_poll),
                 "poll_max_s": max(blocked_poll, default=0.0), "final_save_and_wait_s": final_s}


def measure_loop(state: Any, shardings: Any, mesh: Any, directory: str, *, saves: int, save_every: int,
                 commit_s: float, width: int, depth: int, meta: dict[str, Any], compression: bool
                 ) -> tuple[Any, dict[str, Any]]:
  """Loop time with a save every k steps minus the same number of steps without saves (timed in windows of
  about two seconds before and after; their mean step time x steps), per save (see the module docstring)."""
  step_fn = trainer.jit_train_step(make_dummy_step(width, depth), shardings, mesh)
  rng = np.random.default_rng(0)
  batch = sharding.host_to_global({"inputs": rng.standard_normal((width, width), np.float32),
                                   "weights": rng.standard_normal((width, width), np.float32)}, mesh)
  state, _ = run_steps(step_fn, state, batch, 5)  # compiles
  state, calib = run_steps(step_fn, state, batch, 20)
  window = max(50, math.ceil(2.0 / (calib["total_s"] / 20)))
  if save_every <= 0:
    save_every = max(5, math.ceil(SAVE_SPACING * commit_s / (calib["total_s"] / 20)))
  steps = saves * save_every
  state, before = run_steps(step_fn, state, batch, window)
  # One step on disk already: every commit deletes one.
  checkpointer = ckpt_lib.Checkpointer(directory, keep=1, compression=compression)
  try:
    state, with_saves = run_steps(step_fn, state, batch, steps, checkpointer=checkpointer, save_every=save_every,
                                  meta=meta)
  finally:
    checkpointer.close()
  state, after = run_steps(step_fn, state, batch, window)
  step_s = [before["total_s"] / window, after["total_s"] / window]
  without = steps * statistics.mean(step_s)
  overhead = with_saves["total_s"] - without
  blocked = sum(with_saves["save_calls_s"]) + with_saves["poll_total_s"] + (
      with_saves["final_save_and_wait_s"] - with_saves["save_calls_s"][-1])
  return state, {
      "steps": steps, "save_every": save_every, "saves": saves, "step_s_before_after": step_s,
      "without_saves_s": without, "with_saves_s": with_saves["total_s"], "overhead_s": overhead,
      "overhead_per_save_s": overhead / saves, "blocked_in_save_calls_s": with_saves["save_calls_s"],
      "blocked_in_poll_s": with_saves["poll_total_s"], "max_poll_s": with_saves["poll_max_s"],
      "final_save_and_wait_s": with_saves["final_save_and_wait_s"], "blocked_total_s": blocked,
      "slower_steps_s": overhead - blocked}


# ----------------------------------------------------------------------------------------------
# Report.


def summarize(values: list[float], higher_is_better: bool) -> dict[str, float]:
  return {"best": max(values) if higher_is_better else min(values), "median": statistics.median(values)}


# (key, label, unit, higher is better); rates in MB/s of bytes on disk, times in seconds.
ROWS = [
    ("disk_write_MBps", "disk write (sequential + fsync)", "MB/s", True),
    ("disk_write_pagecache_MBps", "  of which into the page cache", "MB/s", True),
    ("disk_read_cold_MBps", "disk read, cold", "MB/s", True),
    ("disk_read_cached_MBps", "disk read, cached", "MB/s", True),
    ("save_MBps", "save: bytes on disk / call-to-commit", "MB/s", True),
    ("save_blocked_s", "  caller blocked in save()", "s", False),
    ("save_background_s", "  then in background until committed", "s", False),
    ("manifest_s", "  of which the sha256 manifest", "s", False),
    ("sha256_cached_MBps", "sha256 verify of the step, cached", "MB/s", True),
    ("resume_cold_MBps", "resume: open+verify+restore, cold", "MB/s", True),
    ("open_verify_cold_s", "  open (sha256 of every file), cold", "s", False),
    ("restore_after_verify_s", "  restore_latest_valid after it", "s", False),
    ("restore_cold_MBps", "restore() alone, cold", "MB/s", True),
    ("restore_cached_MBps", "restore() alone, cached", "MB/s", True),
    ("save_over_write", "ratio save / disk write", "x", True),
    ("resume_over_read_cold", "ratio resume cold / disk read cold", "x", True),
    ("restore_over_read_cold", "ratio restore cold / disk read cold", "x", True),
    ("restore_over_read_cached", "ratio restore cached / disk read cached", "x", True),
    ("manifest_share_of_save", "share of save in the sha256 manifest", "x", False),
    ("verify_share_of_resume", "share of resume in the sha256 verify", "x", False),
]


def per_repeat_metrics(save: dict, restore: dict, disk: dict) -> dict[str, float]:
  """The table's metrics of one repeat (MB/s are of the checkpoint's bytes on disk)."""
  mb = save["bytes_on_disk"] / MB
  m = {
      "disk_write_MBps": disk["bytes"] / MB / disk["write_s"],
      "disk_write_pagecache_MBps": disk["bytes"] / MB / disk["write_pagecache_s"],
      "disk_read_cold_MBps": disk["bytes"] / MB / disk["read_cold_s"],
      "disk_read_cached_MBps": disk["bytes"] / MB / disk["read_cached_s"],
      "save_MBps": mb / save["commit_s"], "save_blocked_s": save["blocked_s"],
      "save_background_s": save["background_s"], "sha256_cached_MBps": mb / save["sha256_verify_cached_s"],
      "resume_cold_MBps": mb / restore["resume_cold_s"], "open_verify_cold_s": restore["open_verify_cold_s"],
      "restore_after_verify_s": restore["restore_after_verify_s"],
      "restore_cold_MBps": mb / restore["restore_cold_s"], "restore_cached_MBps": mb / restore["restore_cached_s"],
  }
  if save["manifest_s"] is not None:
    m["manifest_s"] = save["manifest_s"]
    m["manifest_share_of_save"] = save["manifest_s"] / save["commit_s"]
  m["verify_share_of_resume"] = restore["open_verify_cold_s"] / restore["resume_cold_s"]
  m["save_over_write"] = m["save_MBps"] / m["disk_write_MBps"]
  m["resume_over_read_cold"] = m["resume_cold_MBps"] / m["disk_read_cold_MBps"]
  m["restore_over_read_cold"] = m["restore_cold_MBps"] / m["disk_read_cold_MBps"]
  m["restore_over_read_cached"] = m["restore_cached_MBps"] / m["disk_read_cached_MBps"]
  return m


def print_report(report: dict[str, Any]) -> None:
  fs, ck, loop = report["filesystem"], report["checkpoint"], report["loop"]
  dropped = report["cold_read"]
  print(f"\nFolder {report['dir']}: {fs['type']} on {fs['source']} (mounted at {fs['mount_point']}), "
        f"{fs['free_bytes'] / 1e9:.0f} GB free; {report['device']['cpus']} CPUs, jax {report['device']['jax']}")
  print(f"Cold reads: {dropped['method']}; pages still resident after the drop: "
        f"{dropped['max_resident_after_drop']}")
  print(f"Checkpoint: model {ck['model']}, {ck['num_params']:,} parameters, optimizer state {ck['opt_state']}; "
        f"TrainState {ck['state_bytes'] / MB:.0f} MB in memory, {ck['bytes_on_disk'] / MB:.0f} MB on disk in "
        f"{ck['files']} files (orbax ocdbt{' + zstd' if ck.get('compression') else ', uncompressed'})\n")
  header = f"{'':<42}{'best':>10}{'median':>10}  unit   ({report['repeats']} repeats)"
  print(header)
  print("-" * len(header))
  for key, label, unit, _ in ROWS:
    if key in report["summary"]:
      s = report["summary"][key]
      fmt = ".2f" if unit != "MB/s" else ".0f"
      print(f"{label:<42}{s['best']:>10{fmt}}{s['median']:>10{fmt}}  {unit}")
  before, after = (1000 * t for t in loop["step_s_before_after"])
  print(f"\nLoop: {loop['steps']} steps (without saves {before:.1f} ms each before, {after:.1f} ms after), a save "
        f"every {loop['save_every']} steps and at the last ({loop['saves']} saves, keep=1), poll() every step:")
  print(f"  without saves {loop['without_saves_s']:.2f} s (estimated); with saves {loop['with_saves_s']:.2f} s -> "
        f"overhead {loop['overhead_s']:.2f} s, {loop['overhead_per_save_s']:.2f} s per save")
  print(f"  blocked in save() {', '.join(f'{t:.2f}' for t in loop['blocked_in_save_calls_s'])} s; in poll() "
        f"{loop['blocked_in_poll_s']:.2f} s in all (longest {loop['max_poll_s']:.3f} s); final save + wait() "
        f"{loop['final_save_and_wait_s']:.2f} s")
  print(f"  blocked in all {loop['blocked_total_s']:.2f} s; the rest, steps slowed by the background save: "
        f"{loop['slower_steps_s']:.2f} s")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", choices=sorted(MODELS), default="100m")
  p.add_argument("--opt_state", choices=("dense", "init"), default="dense",
                 help="dense: random Adam moments, as after training; init: zeros (compress away)")
  p.add_argument("--repeats", type=int, default=3, help="save / restore / disk measurements, each")
  p.add_argument("--dir", default="", help="folder on the disk to measure (a scratch subfolder is made in it "
                 "and deleted); default: the working directory")
  p.add_argument("--chunk_mb", type=int, default=64, help="size of each write/read of the disk measurement")
  p.add_argument("--loop_saves", type=int, default=2, help="saves in the loop measurement (the last at the end)")
  p.add_argument("--save_every", type=int, default=0, help="steps between loop saves; 0: SAVE_SPACING x a save's time")
  p.add_argument("--step_width", type=int, default=384, help="the dummy step's matmuls are width x width")
  p.add_argument("--step_depth", type=int, default=4, help="matmuls per dummy step")
  p.add_argument("--compression", action="store_true",
                 help="zstd-compress the arrays (train.checkpoint_compression; off by default, as in the library)")
  p.add_argument("--keep_files", action="store_true", help="leave the scratch folder (checkpoints) behind")
  p.add_argument("--out", default="", help="write the results as JSON here")
  args = p.parse_args(argv)

  stream = logging.StreamHandler(sys.stderr)
  stream.setLevel(logging.WARNING)
  # Orbax warns when a state item's metadata is read that the step-level metadata file is not in state/; it is
  # expected there and says nothing about the I/O. Orbax also counts the time of an explicit wait() as "waiting for
  # previous save" at the next save and warns.
  stream.addFilter(lambda record: not record.getMessage().startswith(
      ("Metadata file does not exist", "Waiting for previous save to complete")))
  manifest_times = ManifestTimes()
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", handlers=[stream, manifest_times],
                      force=True)
  for name in ("absl", "orbax", "jax._src", "etils"):  # they log every checkpoint file at INFO
    logging.getLogger(name).setLevel(logging.WARNING)

  parent = os.path.abspath(args.dir or os.getcwd())
  os.makedirs(parent, exist_ok=True)
  scratch = tempfile.mkdtemp(prefix="checkpoint_io-", dir=parent)
  fs = filesystem_of(scratch)
  if fs["type"] in ("tmpfs", "ramfs"):
    logging.warning("%s is on %s: memory, not a disk; the numbers say nothing about checkpoint I/O.", scratch,
                    fs["type"])
  try:
    t_start = time.perf_counter()
    state, shardings, mesh, model_cfg, n_params = make_state(args.model, args.opt_state)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    print(f"state of {state_bytes / MB:.0f} MB ready after {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    meta = {"stage": "benchmark", "model": dataclasses.asdict(model_cfg), "num_params": n_params}
    chunk = np.random.default_rng(0).bytes(args.chunk_mb << 20)
    ckpt_dir = os.path.join(scratch, "checkpoints")
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, keep=args.repeats, compression=args.compression)
    raw, per_repeat = [], []
    try:
      for r in range(args.repeats):
        save = measure_save(checkpointer, r + 1, state, meta, manifest_times)
        restore = measure_restore(ckpt_dir, r + 1, state, shardings, check=r == 0)
        disk = measure_disk(scratch, save["bytes_on_disk"], chunk)
        raw.append({"save": save, "restore": restore, "disk": disk})
        per_repeat.append(per_repeat_metrics(save, restore, disk))
        print(f"repeat {r + 1}/{args.repeats}: save {per_repeat[-1]['save_MBps']:.0f} MB/s, disk write "
              f"{per_repeat[-1]['disk_write_MBps']:.0f} MB/s, restore cold {per_repeat[-1]['restore_cold_MBps']:.0f}"
              f" MB/s, disk read cold {per_repeat[-1]['disk_read_cold_MBps']:.0f} MB/s", file=sys.stderr)
    finally:
      checkpointer.close()
    for r in range(1, args.repeats):  # the loop starts from one step on disk, so each commit deletes one
      shutil.rmtree(os.path.join(ckpt_dir, str(r)))
    commit_s = statistics.median(x["save"]["commit_s"] for x in raw)
    print(f"save/restore/disk repeats done after {time.perf_counter() - t_start:.0f} s; timing the loop",
          file=sys.stderr)
    state, loop = measure_loop(state, shardings, mesh, ckpt_dir, saves=args.loop_saves,
                               save_every=args.save_every, commit_s=commit_s, width=args.step_width,
                               depth=args.step_depth, meta=meta, compression=args.compression)
    elapsed = time.perf_counter() - t_start
  finally:
    if not args.keep_files:
      shutil.rmtree(scratch, ignore_errors=True)

  residents = [x[k]["resident_after_drop"] for x in raw for k in ("restore", "disk")]
  device = jax.devices()[0]
  report = {
      "dir": scratch, "filesystem": fs, "repeats": args.repeats, "seconds": elapsed,
      "device": {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count(),
                 "cpus": os.cpu_count(), "machine": platform.machine(), "jax": jax.__version__},
      "cold_read": {"method": "posix_fadvise(POSIX_FADV_DONTNEED) after fsync, checked with mincore",
                    "max_resident_after_drop": None if None in residents else max(residents)},
      "checkpoint": {"model": args.model, "model_config": dataclasses.asdict(model_cfg), "num_params": n_params,
                     "opt_state": args.opt_state, "compression": args.compression, "state_bytes": state_bytes,
                     "bytes_on_disk": raw[0]["save"]["bytes_on_disk"], "files": raw[0]["save"]["files"]},
      "summary": {key: summarize([m[key] for m in per_repeat if key in m], better)
                  for key, _, _, better in ROWS if any(key in m for m in per_repeat)},
      "per_repeat": per_repeat, "raw": raw, "loop": loop,
  }
  print_report(report)
  print(f"\n{elapsed:.0f} s in all.")
  benchlib.write_json(args.out, report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
