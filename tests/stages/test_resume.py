"""End-to-end resume, preemption and refusal tests of `python -m gptrl.launch` (subprocesses on CPU).

Each launch of the tiny config takes ~10-20 s on a small CPU machine; one finished run is shared by the
tests that only need "a workdir with checkpoints" (copied, so they cannot disturb each other).
"""
from __future__ import annotations

import pathlib
import shutil
import signal
import sys
import time

import numpy as np
import pytest

from gptrl import data as data_lib
from gptrl import loop
from gptrl.corpus import Document
from helpers import REPO, check_ok as _check_ok, complete_steps as _complete_steps, params as _params
from helpers import kill_when, run as _run, start as _start, train_steps as _train_steps
from helpers import write_corpus as _write_corpus

STEPS = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
  folder = tmp_path_factory.mktemp("corpus")
  _write_corpus(folder)
  return folder


def _argv(workdir: pathlib.Path, corpus: pathlib.Path, cache: pathlib.Path, **overrides) -> list[str]:
  flags = {"workdir": str(workdir), "data.sources": f"('{corpus}',)", "data.cache_dir": str(cache),
           "train.steps": STEPS, "train.checkpoint_every": 4, "train.eval_every": 6, "train.log_every": 2,
           "tokenizer.vocab_size": 300, "model.max_len": 32, "data.batch_size": 8, "train.progress_bar": False,
           "sample.max_new_tokens": 0, "train.async_checkpoint": True}
  flags.update(overrides)
  return [sys.executable, "-m", "gptrl.launch", "--config", str(REPO / "configs/pretrain_cpu.py:tiny")] + [
      f"--config.{k}={v}" for k, v in flags.items()]


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
  assert kill_when(argv, workdir_b / "checkpoints" / "4", tmp_path / "b1.log") == -signal.SIGKILL
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
  assert rc == loop.EXIT_PREEMPTED, output[-4000:]
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
