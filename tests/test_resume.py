"""End-to-end resume, preemption and refusal tests of `python -m gptrl.launch` (subprocesses on CPU).

Each launch of the tiny config takes ~10-20 s on a small CPU machine; one finished run is shared by the
tests that only need "a workdir with checkpoints" (copied, so they cannot disturb each other).
"""
from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gptrl import data as data_lib
from gptrl import trainer
from gptrl.corpus import Document

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 12


def _write_corpus(folder: pathlib.Path, seed: int = 0, files: int = 4, lines: int = 120) -> None:
  """A few hundred varied English-like sentences in several .txt files (one file per split group)."""
  rng = random.Random(seed)
  subj = ["the king", "a young sailor", "my old friend", "the quiet river", "every merchant", "the tall tower",
          "a clever fox", "our neighbour"]
  verb = ["walks to", "dreams of", "speaks with", "looks at", "carries", "remembers", "builds", "follows"]
  obj = ["the market", "a silver cup", "the northern hills", "an empty boat", "the bright morning",
         "a wooden bridge", "the winter garden", "seven stones"]
  tail = ["before dawn", "with great care", "in the rain", "after supper", "without a word", "for many years",
          "near the sea", "at the gate"]
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(files):
    with open(folder / f"book{i}.txt", "w", encoding="utf-8") as f:
      for _ in range(lines):
        f.write(f"{rng.choice(subj).capitalize()} {rng.choice(verb)} {rng.choice(obj)} {rng.choice(tail)}.\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
  folder = tmp_path_factory.mktemp("corpus")
  _write_corpus(folder)
  return folder


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = ""  # one CPU device: the fastest launch on a small machine
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _argv(workdir: pathlib.Path, corpus: pathlib.Path, cache: pathlib.Path, **overrides) -> list[str]:
  flags = {"workdir": str(workdir), "data.sources": f"('{corpus}',)", "data.cache_dir": str(cache),
           "train.steps": STEPS, "train.checkpoint_every": 4, "train.eval_every": 6, "train.log_every": 2,
           "tokenizer.vocab_size": 300, "model.max_len": 32, "data.batch_size": 8, "train.progress_bar": False,
           "sample.max_new_tokens": 0, "train.async_checkpoint": True}
  flags.update(overrides)
  return [sys.executable, "-m", "gptrl.launch", "--config", str(REPO / "configs/pretrain_cpu.py:tiny")] + [
      f"--config.{k}={v}" for k, v in flags.items()]


def _run(argv: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
  return subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _start(argv: list[str], log: pathlib.Path) -> tuple[subprocess.Popen, object]:
  f = open(log, "w", encoding="utf-8")  # pylint: disable=consider-using-with
  return subprocess.Popen(argv, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT), f


def _wait_for(proc: subprocess.Popen, path: pathlib.Path, timeout: float = 120) -> bool:
  """Polls until `path` exists; False if the process ended first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if path.is_dir():
      return True
    if proc.poll() is not None:
      return path.is_dir()
    time.sleep(0.02)
  raise TimeoutError(f"{path} did not appear within {timeout} s")


def _complete_steps(workdir: pathlib.Path) -> list[int]:
  ckpts = workdir / "checkpoints"
  return sorted(int(p.name) for p in ckpts.iterdir() if p.is_dir() and p.name.isdigit()) if ckpts.exists() else []


def _params(workdir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
  import jax
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  leaves = jax.tree_util.tree_leaves_with_path(restored["params"])
  assert leaves
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def _train_steps(workdir: pathlib.Path) -> list[int]:
  steps = []
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if "train/loss" in row:
        steps.append(row["step"])
  return steps


def _check_ok(result: subprocess.CompletedProcess) -> None:
  assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-4000:]}"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus) -> tuple[pathlib.Path, pathlib.Path]:
  """(workdir, cache) of one uninterrupted run to STEPS."""
  root = tmp_path_factory.mktemp("finished")
  workdir, cache = root / "w", root / "cache"
  _check_ok(_run(_argv(workdir, corpus, cache)))
  assert STEPS in _complete_steps(workdir)
  return workdir, cache


def _copy_run(finished, tmp_path: pathlib.Path) -> pathlib.Path:
  workdir = tmp_path / "w"
  shutil.copytree(finished[0], workdir)
  return workdir


def test_kill_and_resume_is_bitwise_identical(finished, corpus, tmp_path):
  workdir_a, _ = finished
  workdir_b, cache = tmp_path / "b", tmp_path / "cache"
  argv = _argv(workdir_b, corpus, cache)
  proc, log = _start(argv, tmp_path / "b1.log")
  try:
    appeared = _wait_for(proc, workdir_b / "checkpoints" / "4")
    assert proc.poll() is None and appeared, "run B ended before it could be killed mid-run"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
    log.close()
  assert proc.returncode == -signal.SIGKILL
  killed_at = _complete_steps(workdir_b)
  assert killed_at and max(killed_at) < STEPS, killed_at

  _check_ok(_run(argv))
  assert STEPS in _complete_steps(workdir_b)
  params_a, params_b = _params(workdir_a, STEPS), _params(workdir_b, STEPS)
  assert params_a.keys() == params_b.keys()
  for name in params_a:
    assert params_a[name].dtype == params_b[name].dtype, name
    assert np.array_equal(params_a[name], params_b[name]), f"{name} differs after kill + resume"

  steps_b = _train_steps(workdir_b)
  assert len(steps_b) == len(set(steps_b)), f"duplicated train rows in metrics.jsonl: {steps_b}"
  assert steps_b == sorted(steps_b)
  assert steps_b == _train_steps(workdir_a)


def test_sigterm_saves_and_exits_75_then_resumes(corpus, tmp_path):
  workdir, cache = tmp_path / "w", tmp_path / "cache"
  # Checkpoints every 100 steps (never, in STEPS): the only one before the end is the preemption's.
  argv = _argv(workdir, corpus, cache, **{"train.checkpoint_every": 100, "train.eval_every": 100})
  proc, log = _start(argv, tmp_path / "run1.log")
  try:
    deadline = time.monotonic() + 120
    metrics = workdir / "metrics.jsonl"
    # The first train row (step 2) is written once training is underway.
    while not (metrics.exists() and metrics.stat().st_size > 0):
      assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-4000:]
      assert time.monotonic() < deadline
      time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
    log.close()
  output = (tmp_path / "run1.log").read_text()
  if rc == 0:
    pytest.skip("the run finished before SIGTERM arrived; machine too fast for this window")
  assert rc == trainer.EXIT_PREEMPTED, output[-4000:]
  steps = _complete_steps(workdir)
  assert len(steps) == 1 and 0 < steps[0] < STEPS, steps
  assert f"Preempted at step {steps[0]}" in output

  _check_ok(_run(argv))
  assert STEPS in _complete_steps(workdir)
  train_steps = _train_steps(workdir)
  assert len(train_steps) == len(set(train_steps)), train_steps


def test_replaced_tokenizer_is_refused(finished, corpus, tmp_path):
  from gptrl import tokenizer as tokenizer_lib
  workdir = _copy_run(finished, tmp_path)
  original = tokenizer_lib.load_tokenizer(workdir / "tokenizer.model")
  other_text = [f"Zebra {i} quantum jukebox vex {i * 7} fjord glyph nymph waltz.\n" * 3 for i in range(200)]
  other = tokenizer_lib.train_tokenizer(other_text, tmp_path / "other.model", vocab_size=320)
  assert other.sha256 != original.sha256
  shutil.copyfile(tmp_path / "other.model", workdir / "tokenizer.model")

  result = _run(_argv(workdir, corpus, finished[1], **{"train.steps": STEPS + 4}))
  assert result.returncode != 0
  assert "TokenizerMismatchError" in result.stderr
  assert original.sha256 in result.stderr and other.sha256 in result.stderr, result.stderr[-3000:]


def test_configured_tokenizer_path_mismatch_is_refused(finished, corpus, tmp_path):
  from gptrl import tokenizer as tokenizer_lib
  workdir = _copy_run(finished, tmp_path)
  original = tokenizer_lib.load_tokenizer(workdir / "tokenizer.model")
  other_text = [f"Orbit {i} crimson lattice {i * 3} harbor velvet.\n" * 3 for i in range(200)]
  other = tokenizer_lib.train_tokenizer(other_text, tmp_path / "other.model", vocab_size=320)

  result = _run(_argv(workdir, corpus, finished[1],
                      **{"train.steps": STEPS + 4, "tokenizer.path": str(tmp_path / "other.model")}))
  assert result.returncode != 0
  assert original.sha256 in result.stderr and other.sha256 in result.stderr, result.stderr[-3000:]


def test_changed_batch_size_is_refused_by_data_fingerprint(finished, corpus, tmp_path):
  workdir = _copy_run(finished, tmp_path)
  result = _run(_argv(workdir, corpus, finished[1], **{"data.batch_size": 16, "train.steps": STEPS + 4}))
  assert result.returncode != 0
  err = result.stderr
  assert "different data pipeline" in err, err[-3000:]
  assert "global_batch_size (saved 8, now 16)" in err, err[-3000:]


class _FakeTokenizer:
  vocab_size = 10
  eos_id = 0
  sha256 = "f" * 64

  def encode_batch(self, texts):
    return [[1, 2, 3] if "bad" not in t else [4, 10, 5] for t in texts]


def test_out_of_vocab_id_is_refused_naming_the_document():
  docs = [Document(name="good.txt", text="fine", group="g"), Document(name="bad-doc.txt", text="bad", group="g")]
  with pytest.raises(data_lib.DataError, match=r"bad-doc\.txt.*token id 10 at position 1"):
    data_lib.tokenize_documents(docs, _FakeTokenizer())


def test_negative_id_is_refused():
  class Negative(_FakeTokenizer):
    def encode_batch(self, texts):
      return [[1, -1] for _ in texts]
  with pytest.raises(data_lib.DataError, match=r"only\.txt.*token id -1"):
    data_lib.tokenize_documents([Document(name="only.txt", text="x", group="g")], Negative())
