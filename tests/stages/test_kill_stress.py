"""kill -9 at random moments, some deliberately during a checkpoint save, over many launches of a tiny
pretraining run (`python -m gptrl.launch`): every run, resumed after its kills, ends with a final train state
(parameters, optimizer state, step, RNG, counters) bitwise equal to an uninterrupted run's.

Kill moments (chosen by a seeded RNG):
  during-save:  as soon as orbax's temporary folder of the launch's n-th save appears (it is being written);
  after-commit: as soon as the launch's n-th new step folder appears (the rename just happened; the manifest
                check and the garbage collection of old steps come next);
  random:       after a random delay from launch (start-up, tokenizer, restore, training, evaluation, exit).
A launch that finishes before its kill ends that run: it is compared with the reference, and a fresh run starts.

The default test kills once, during a save; `-m slow` kills 30 times at seeded random moments and prints the
counts.
"""
from __future__ import annotations

import collections
import pathlib
import random
import re
import signal
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import REPO, check_ok, complete_steps, run, start, write_corpus

STEPS = 12


def _argv(workdir: pathlib.Path, corpus: pathlib.Path, cache: pathlib.Path) -> list[str]:
  flags = {"workdir": str(workdir), "data.sources": f"('{corpus}',)", "data.cache_dir": str(cache),
           "train.steps": STEPS, "train.checkpoint_every": 2, "train.keep_checkpoints": 2,
           "train.eval_every": STEPS, "data.eval_batches": 1, "train.log_every": 2, "tokenizer.vocab_size": 300,
           "model.max_len": 32, "data.batch_size": 8, "train.progress_bar": False, "sample.max_new_tokens": 0,
           "train.async_checkpoint": True}
  return [sys.executable, "-m", "gptrl.launch", "--config", str(REPO / "configs/pretrain_cpu.py:tiny")] + [
      f"--config.{k}={v}" for k, v in flags.items()]


def _final_state(workdir: pathlib.Path) -> dict[str, np.ndarray]:
  restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(STEPS) / "state")
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(restored)}


def _assert_bitwise_equal(workdir: pathlib.Path, reference: dict[str, np.ndarray]) -> None:
  assert STEPS in complete_steps(workdir), sorted(p.name for p in (workdir / "checkpoints").iterdir())
  state = _final_state(workdir)
  assert state.keys() == reference.keys()
  for name, value in reference.items():
    assert state[name].dtype == value.dtype and np.array_equal(state[name], value), f"{workdir}: {name} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path, dict[str, np.ndarray], float]:
  """(corpus, data cache, final state of an uninterrupted run, its wall time in seconds)."""
  root = tmp_path_factory.mktemp("kill_reference")
  write_corpus(root / "corpus")
  begin = time.monotonic()
  check_ok(run(_argv(root / "w", root / "corpus", root / "cache"), timeout=900))
  return root / "corpus", root / "cache", _final_state(root / "w"), time.monotonic() - begin


def _folders(checkpoints: pathlib.Path, kind: str) -> set[tuple[str, int]]:
  """(name, inode) of the step folders ("steps") or orbax temporary folders ("saving") in `checkpoints`: the
  inode tells a new folder from an older one of the same name (a step saved again after being set aside)."""
  try:
    entries = list(checkpoints.iterdir())
  except FileNotFoundError:
    return set()
  out = set()
  for entry in entries:
    if (entry.name.isdigit() if kind == "steps" else ".orbax-checkpoint-tmp" in entry.name):
      try:
        out.add((entry.name, entry.stat().st_ino))
      except FileNotFoundError:  # renamed meanwhile
        pass
  return out


def _launch_and_kill(argv, log: pathlib.Path, checkpoints: pathlib.Path, mode: str, nth: int,
                     delay: float) -> tuple[str, bool, float]:
  """Launches, kills with SIGKILL at the moment `mode` names: when the `nth` save begun by this launch appears
  ("during-save"), when its `nth` new step folder appears ("after-commit"), or `delay` seconds after the launch
  ("random"). Returns ("killed" or "finished", whether the kill left the temporary folder of a save begun by this
  launch, seconds the launch lived)."""
  old_saves, old_steps = _folders(checkpoints, "saving"), _folders(checkpoints, "steps")
  seen_saves, seen_steps = set(), set()
  proc, log_file = start(argv, log)
  begin = time.monotonic()
  try:
    while proc.poll() is None and time.monotonic() - begin < 600:
      seen_saves |= _folders(checkpoints, "saving") - old_saves
      seen_steps |= _folders(checkpoints, "steps") - old_steps
      if ((mode == "during-save" and len(seen_saves) >= nth) or (mode == "after-commit" and len(seen_steps) >= nth)
          or (mode == "random" and time.monotonic() - begin >= delay)):
        break
      time.sleep(0.002)
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
    returncode = proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
    log_file.close()
  lived = time.monotonic() - begin
  if returncode == 0:
    return "finished", False, lived
  assert returncode == -signal.SIGKILL, f"launch exited with {returncode} by itself:\n{log.read_text()[-4000:]}"
  return "killed", bool(_folders(checkpoints, "saving") - old_saves), lived


def _kill_and_resume(tmp_path: pathlib.Path, reference, kills: list[tuple[str, int]],
                     seed: int) -> collections.Counter:
  """Kills launches at the moments `kills` names ((mode, nth) pairs, see `_launch_and_kill`); each run is
  finished by a launch left alone, and every run is compared bitwise with the reference."""
  corpus, cache, final_state, launch_seconds = reference
  rng = random.Random(seed)
  counts = collections.Counter()
  runs = [tmp_path / "run0"]
  for i, (mode, nth) in enumerate(kills):
    workdir = runs[-1]
    checkpoints = workdir / "checkpoints"
    outcome, interrupted_save, lived = _launch_and_kill(
        _argv(workdir, corpus, cache), tmp_path / f"launch{i}.log", checkpoints, mode, nth,
        delay=rng.uniform(0.05, 0.95) * launch_seconds)
    if outcome == "finished":  # this run is done: check it, start another
      _assert_bitwise_equal(workdir, final_state)
      counts["finished before the kill"] += 1
      launch_seconds = lived  # the machine's load changes: random delays follow the latest whole launch
      runs.append(tmp_path / f"run{len(runs)}")
      continue
    counts["kills"] += 1
    counts[f"kills {mode}"] += 1
    if interrupted_save:
      counts["kills that left an interrupted save"] += 1
  check_ok(run(_argv(runs[-1], corpus, cache), timeout=900))
  for workdir in runs:
    _assert_bitwise_equal(workdir, final_state)
    for aside in (workdir / "checkpoints").iterdir():
      match = re.fullmatch(r"\d+\.corrupt-([a-z-]+?)-\d{8}T\d{6}(-\d+)?", aside.name)
      if match:
        counts[f"set aside: {match.group(1)}"] += 1
  counts["runs compared bitwise"] = len(runs)
  return counts


def test_kill_during_a_save_then_resume_bitwise(tmp_path, reference):
  # Killed while step 4 is being written, once step 2 is committed: the resumed run sets the interrupted save
  # aside and goes on from step 2. (Each launch costs ~20 s of start-up and compilation: one kill here, many in
  # the slow test; tests/stages/test_resume.py kills just after a commit.)
  counts = _kill_and_resume(tmp_path, reference, [("during-save", 2)], seed=0)
  assert counts["kills during-save"] == 1 and counts["kills that left an interrupted save"] == 1, counts
  assert counts["set aside: interrupted-save"] == 1, counts


@pytest.mark.slow
def test_thirty_random_kills_then_resume_bitwise(tmp_path, reference):
  begin = time.monotonic()
  rng = random.Random(1)
  # A run saves at steps 2, 4, ..., 12: the n-th save or commit of a launch is any of them, depending on where
  # the launch resumed.
  kills = [(mode, rng.randint(1, 4)) for mode in rng.choices(["during-save", "after-commit", "random"],
                                                             weights=[4, 2, 4], k=30)]
  counts = _kill_and_resume(tmp_path, reference, kills, seed=2)
  print(f"\nkill stress: {dict(sorted(counts.items()))} in {time.monotonic() - begin:.0f} s")
  assert counts["kills"] + counts["finished before the kill"] == 30
  assert counts["kills that left an interrupted save"] >= 5, counts
