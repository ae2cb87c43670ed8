"""The one run loop of every stage: a `Task` says what one unit of work is (a gradient step, a PPO iteration, a
labelling chunk), how to checkpoint, evaluate and roll back; `run` drives it from `start` to `total`.

`run` owns, in one place: preemption (SIGTERM, or JAX's preemption sync point in multi-process jobs: checkpoint and
exit with EXIT_PREEMPTED), the numerics verdict after every unit (the task's `check`, which may roll back), the
eval and checkpoint cadence, the metrics rows (JSONL + TensorBoard, `gptrl/metrics.py`) with throughput, and the
progress bar. A resumed run's metrics rows logged after its checkpoint are dropped, so the log reads as one run.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import time
from typing import Any

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from gptrl.metrics import MetricsWriter

# Exit code of a run stopped by preemption after saving (EX_TEMPFAIL: "try again"); launchers retry on it.
EXIT_PREEMPTED = 75


class PreemptionGuard:
  """Turns SIGTERM (and, in multi-process jobs, JAX's preemption sync point) into 'save and stop'."""

  def __init__(self):
    self._signalled = False
    self._previous = None
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. under some test runners): rely on the sync point only
      self._previous = None

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self._signalled = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          return True
      except RuntimeError:  # the preemption service is not running in this job
        pass
      # Every process must agree, or the collective save would hang on the ones that carry on.
      return bool(multihost_utils.process_allgather(np.array(self._signalled)).any())
    return self._signalled

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass(frozen=True)
class Cadence:
  """How often `run` logs, evaluates and checkpoints, in units done (0: never, but always at the end for
  eval and checkpoint)."""
  total: int
  log_every: int = 1
  eval_every: int = 0
  checkpoint_every: int = 1
  eval_at_start: bool = False
  progress_bar: bool = True

  @classmethod
  def of(cls, train_cfg: Any, **changes: Any) -> "Cadence":
    """The cadence of a `train` config group (gptrl/config.py TrainConfig), with `changes`."""
    fields = {"total": train_cfg.steps, "log_every": train_cfg.log_every, "eval_every": train_cfg.eval_every,
              "checkpoint_every": train_cfg.checkpoint_every, "eval_at_start": train_cfg.eval_at_start,
              "progress_bar": train_cfg.progress_bar}
    return cls(**{**fields, **changes})


def _due(done: int, every: int, total: int) -> bool:
  return done == total or (every > 0 and done % every == 0)


@dataclasses.dataclass
class Outcome:
  """What one unit of work returns: the new state, its metrics (host or device scalars) and text rows by tag."""
  state: Any
  metrics: dict[str, Any]
  texts: dict[str, list[str]] = dataclasses.field(default_factory=dict)


class Task:
  """One stage's unit of work and its checkpoint; subclasses override what applies (defaults: nothing)."""
  unit = "step"  # for messages and the progress bar
  # True when `step` returns device values still being computed: the loop then writes a row once the next unit
  # is dispatched (the host never stalls the device); False: rows are written as they come.
  lagged = False
  tokens_per_step = 0  # global tokens per unit, for train/tokens_per_sec (0: no throughput metrics)
  flops_per_step = 0.0  # model FLOPs per unit, for train/flops_per_sec
  print_samples = False  # also print the eval's texts to the terminal

  def step(self, state: Any, index: int) -> Outcome:
    """Runs unit `index` (0-based) on `state`."""
    raise NotImplementedError

  def check(self, state: Any, index: int, outcome: Outcome) -> tuple[Any, dict[str, Any], bool]:
    """The numerics verdict after unit `index`: (state, metrics, rolled_back); may roll back the state."""
    return outcome.state, outcome.metrics, False

  def save(self, state: Any, done: int) -> None:
    """Checkpoints the state after `done` units (and whatever goes with it: data positions, controller state)."""

  def wait(self) -> None:
    """Blocks until the checkpoints saved so far are complete."""

  def evaluate(self, state: Any, done: int) -> tuple[dict[str, float], list[str] | None]:
    """(eval metrics, sample texts or None) after `done` units."""
    return {}, None

  def finish(self, state: Any) -> dict[str, Any]:
    """Called once after the last unit, before its checkpoint; numbers returned are logged as final/<name>."""
    return {}

  def postfix(self, metrics: dict[str, float]) -> dict[str, str]:
    """The progress bar's figures."""
    return {}


_STAGE_START = [time.monotonic()]


def start_stage_clock() -> None:
  """Marks the start of a stage (gptrl/stages/recipe.py prepare_workdir, which every stage calls first)."""
  _STAGE_START[0] = time.monotonic()


def stage_seconds() -> float:
  """Seconds since the current stage's launch began (`time/stage_s` in every eval row)."""
  return time.monotonic() - _STAGE_START[0]


def run(task: Task, state: Any, *, start: int, cadence: Cadence, workdir: str, desc: str) -> Any:
  """Runs `task` from unit `start` to `cadence.total`; returns the final state.

  Exits the process with EXIT_PREEMPTED after saving when preempted. Exceptions of the task (e.g.
  trainer.TrainingDivergedError from its `check`) propagate after the metrics and progress bar are closed.
  """
  is_main = jax.process_index() == 0
  # A fresh start (step 0) keeps no earlier rows: a run killed before its first checkpoint starts over.
  writer = MetricsWriter(workdir, enabled=is_main, resume_step=start if start else -1)
  guard = PreemptionGuard()
  bar = tqdm.tqdm(total=cadence.total, initial=start, disable=not (is_main and cadence.progress_bar),
                  dynamic_ncols=True, desc=desc, file=sys.stderr)
  pending: tuple[int, dict[str, Any]] | None = None
  last_log = (start, time.perf_counter())

  def flush():
    nonlocal pending, last_log
    if pending is None:
      return
    done, metrics = pending
    pending = None
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    if task.tokens_per_step and done > last_log[0]:
      seconds = now - last_log[1]
      metrics["train/tokens_per_sec"] = (done - last_log[0]) * task.tokens_per_step / seconds
      metrics["train/steps_per_sec"] = (done - last_log[0]) / seconds
      if task.flops_per_step:
        metrics["train/flops_per_sec"] = (done - last_log[0]) * task.flops_per_step / seconds
    last_log = (done, now)
    if metrics:
      writer.write(done, metrics)
      bar.set_postfix(task.postfix(metrics), refresh=False)

  def evaluate(done: int) -> None:
    nonlocal last_log
    metrics, texts = task.evaluate(state, done)
    if metrics:
      # Seconds since this launch of the stage began (its set-up included): methods compared at equal wall-clock.
      metrics["time/stage_s"] = stage_seconds()
      writer.write(done, metrics)
      logging.info("%s %d eval: %s", task.unit, done, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if texts is not None:
      writer.write_texts(done, "samples", texts)
      if task.print_samples and is_main:
        tqdm.tqdm.write(f"--- samples at {task.unit} {done} ---")
        for text in texts:
          tqdm.tqdm.write(text.rstrip() + "\n---")
    last_log = (done, time.perf_counter())  # eval time is not training throughput

  def save(done: int) -> None:
    flush()  # its row goes with the checkpoint (a bucket workdir uploads the rows at `sync`)
    writer.sync()
    task.save(state, done)

  try:
    if start == 0 and cadence.eval_at_start:
      evaluate(0)
    for index in range(start, cadence.total):
      if guard.should_stop(index):
        save(index)
        task.wait()
        logging.warning("Preempted at %s %d: checkpoint saved; exiting with code %d.", task.unit, index,
                        EXIT_PREEMPTED)
        sys.exit(EXIT_PREEMPTED)
      outcome = task.step(state, index)
      state, metrics, rolled_back = task.check(state, index, outcome)
      flush()  # the previous row, now that this unit is dispatched
      done = index + 1
      bar.update(1)
      for tag, texts in outcome.texts.items():
        writer.write_texts(done, tag, texts)
      if _due(done, cadence.log_every, cadence.total):
        pending = (done, metrics)
        if not task.lagged:
          flush()
      if _due(done, cadence.eval_every, cadence.total):
        flush()
        evaluate(done)
      if done == cadence.total:
        extra = task.finish(state)
        if extra:
          writer.write(done, {f"final/{k}": float(v) for k, v in extra.items() if isinstance(v, (int, float))})
      if _due(done, cadence.checkpoint_every, cadence.total) or rolled_back:
        save(done)
    flush()
    task.wait()
  finally:
    bar.close()
    writer.close()
    guard.restore()
  return state
