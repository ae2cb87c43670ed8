"""Tests of the one run loop (gptrl/loop.py) with hand-made tasks: the eval / checkpoint / log cadence, rows of a
lagged task, a rollback's extra checkpoint, preemption (save, then exit 75) and the rows a resume keeps."""
from __future__ import annotations

import json
import os
import signal

import pytest

from gptrl import loop


class Recorder(loop.Task):
  """Counts in its state; records every call the loop makes."""
  unit = "unit"

  def __init__(self, *, lagged=False, rollback_at=None, preempt_after=None):
    self.lagged, self.rollback_at, self.preempt_after = lagged, rollback_at, preempt_after
    self.calls: list[tuple[str, int]] = []

  def step(self, state, index):
    self.calls.append(("step", index))
    if index == self.preempt_after:
      os.kill(os.getpid(), signal.SIGTERM)
    return loop.Outcome(state + 1, {"train/value": float(index)}, {"rollouts": [f"text {index}"]})

  def check(self, state, index, outcome):
    return outcome.state, outcome.metrics, index == self.rollback_at

  def save(self, state, done):
    self.calls.append(("save", done))

  def evaluate(self, state, done):
    self.calls.append(("eval", done))
    return {"eval/state": float(state)}, [f"sample at {done}"]

  def finish(self, state):
    self.calls.append(("finish", state))
    return {"offset": 0.5, "label": "not a number"}


def _rows(workdir, name="metrics.jsonl"):
  with open(os.path.join(workdir, name), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _at(calls, kind):
  return [n for k, n in calls if k == kind]


@pytest.mark.parametrize("lagged", [False, True])
def test_cadence_of_logs_evals_checkpoints_and_the_end(tmp_path, lagged):
  task = Recorder(lagged=lagged)
  cadence = loop.Cadence(total=10, log_every=3, eval_every=4, checkpoint_every=5, eval_at_start=True,
                         progress_bar=False)
  assert loop.run(task, 0, start=0, cadence=cadence, workdir=str(tmp_path), desc="t") == 10
  assert _at(task.calls, "step") == list(range(10))
  assert _at(task.calls, "eval") == [0, 4, 8, 10]
  assert _at(task.calls, "save") == [5, 10]
  assert _at(task.calls, "finish") == [10]
  rows = _rows(tmp_path)
  train = [(r["step"], r["train/value"]) for r in rows if "train/value" in r]
  assert train == [(3, 2.0), (6, 5.0), (9, 8.0), (10, 9.0)]  # each row holds its own unit's metrics
  assert [(r["step"], r["eval/state"]) for r in rows if "eval/state" in r] == [(0, 0.0), (4, 4.0), (8, 8.0),
                                                                             (10, 10.0)]
  assert [(r["step"], r["final/offset"]) for r in rows if "final/offset" in r] == [(10, 0.5)]
  samples = _rows(tmp_path, "samples.jsonl")
  assert [r["step"] for r in samples if r["tag"] == "rollouts"] == list(range(1, 11))
  assert [r["step"] for r in samples if r["tag"] == "samples"] == [0, 4, 8, 10]


def test_a_rollback_is_checkpointed_at_once(tmp_path):
  task = Recorder(rollback_at=1)
  loop.run(task, 0, start=0, cadence=loop.Cadence(total=6, checkpoint_every=4, progress_bar=False),
           workdir=str(tmp_path), desc="t")
  assert _at(task.calls, "save") == [2, 4, 6]


def test_preemption_saves_then_exits_75_and_a_resume_drops_the_rows_after_the_checkpoint(tmp_path):
  task = Recorder(preempt_after=2)
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(SystemExit) as exit_info:
    loop.run(task, 0, start=0, cadence=loop.Cadence(total=8, checkpoint_every=100, progress_bar=False),
             workdir=str(tmp_path), desc="t")
  assert exit_info.value.code == loop.EXIT_PREEMPTED
  assert _at(task.calls, "step") == [0, 1, 2] and _at(task.calls, "save") == [3]  # before unit 3 ran
  assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3]
  assert signal.getsignal(signal.SIGTERM) == handler  # the loop's handler is gone again
  # A resume from an older checkpoint (step 2) drops the rows logged after it, then logs its own.
  resumed = Recorder()
  assert loop.run(resumed, 2, start=2, cadence=loop.Cadence(total=4, checkpoint_every=100, progress_bar=False),
                  workdir=str(tmp_path), desc="t") == 4
  assert _at(resumed.calls, "step") == [2, 3]
  assert [(r["step"], r.get("train/value")) for r in _rows(tmp_path) if "train/value" in r] == [
      (1, 0.0), (2, 1.0), (3, 2.0), (4, 3.0)]
