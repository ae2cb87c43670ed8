"""Helpers shared by the tests that launch `python -m gptrl.launch` in subprocesses."""
from __future__ import annotations

import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_corpus(folder: pathlib.Path, seed: int = 0, files: int = 4, lines: int = 120) -> None:
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


def env() -> dict[str, str]:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  # One CPU device (the fastest launch on a small machine), with the flags pytest was given (tests/conftest.py).
  env["XLA_FLAGS"] = os.environ.get("GPTRL_TEST_XLA_FLAGS", "")
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
  return subprocess.run(argv, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def start(argv: list[str], log: pathlib.Path) -> tuple[subprocess.Popen, object]:
  f = open(log, "w", encoding="utf-8")  # pylint: disable=consider-using-with
  return subprocess.Popen(argv, cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT), f


def wait_for(proc: subprocess.Popen, path: pathlib.Path, timeout: float = 120) -> bool:
  """Polls until `path` exists; False if the process ended first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if path.is_dir():
      return True
    if proc.poll() is not None:
      return path.is_dir()
    time.sleep(0.02)
  raise TimeoutError(f"{path} did not appear within {timeout} s")


def kill_when(argv: list[str], path: pathlib.Path, log: pathlib.Path, timeout: float = 120) -> int:
  """Starts `argv`, kills it with SIGKILL once `path` exists (the run must still be going then) and returns its
  exit status."""
  proc, f = start(argv, log)
  try:
    appeared = wait_for(proc, path, timeout=timeout)
    assert proc.poll() is None and appeared, f"the run ended before {path} appeared, so it could not be killed"
    proc.send_signal(signal.SIGKILL)
    return proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
    f.close()


def complete_steps(workdir: pathlib.Path) -> list[int]:
  ckpts = workdir / "checkpoints"
  return sorted(int(p.name) for p in ckpts.iterdir() if p.is_dir() and p.name.isdigit()) if ckpts.exists() else []


def params(workdir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
  import jax
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  leaves = jax.tree_util.tree_leaves_with_path(restored["params"])
  assert leaves
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def train_steps(workdir: pathlib.Path) -> list[int]:
  steps = []
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if "train/loss" in row:
        steps.append(row["step"])
  return steps


def check_ok(result: subprocess.CompletedProcess) -> None:
  assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-4000:]}"


_PLACES = ["the market", "the northern hills", "the winter garden", "the gate", "the sea", "the tall tower"]
_PEOPLE = ["the king", "a young sailor", "my old friend", "every merchant", "a clever fox", "our neighbour"]


def write_chats(path: pathlib.Path, n: int = 120, seed: int = 0) -> pathlib.Path:
  """Multi-turn conversations in the corpus's words, one group per person (so the split holds out people)."""
  rng = random.Random(seed)
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      who, where = rng.choice(_PEOPLE), rng.choice(_PLACES)
      messages = [{"role": "user", "content": f"Where does {who} walk?"},
                  {"role": "assistant", "content": f"{who.capitalize()} walks to {where}."}]
      if i % 2:
        messages = [{"role": "system", "content": "Answer briefly."}] + messages + [
            {"role": "user", "content": "And after supper?"},
            {"role": "assistant", "content": f"{who.capitalize()} dreams of {rng.choice(_PLACES)}."}]
      f.write(json.dumps({"messages": messages, "group": who}) + "\n")
  return path


def tiny_stage_flags(stage: str, *, corpus=None, chats=None, cache=None) -> dict[str, object]:
  """Overrides that shrink configs/<stage>_cpu.py:tiny to seconds on generated data (inputs other than data
  sources, e.g. init checkpoints, are the caller's)."""
  if stage == "pretrain":
    return {"data.sources": f"('{corpus}',)", "data.cache_dir": cache, "train.steps": 8,
            "train.checkpoint_every": 8, "train.eval_every": 8, "tokenizer.vocab_size": 300, "model.max_len": 48,
            "data.batch_size": 8, "train.progress_bar": False, "sample.max_new_tokens": 0}
  if stage == "sft":
    return {"data.sources": f"('{chats}',)", "data.cache_dir": cache, "data.eval_fraction": 0.2,
            "data.batch_size": 8, "data.eval_batches": 2, "train.steps": 12, "train.checkpoint_every": 4,
            "train.eval_every": 6, "train.log_every": 2, "train.progress_bar": False, "sample.num_prompts": 2,
            "sample.max_new_tokens": 8}
  if stage == "label":
    return {"data.sources": f"('{chats}',)", "data.cache_dir": cache, "data.eval_fraction": 0.2, "num_prompts": 40,
            "responses_per_prompt": 4, "batch_size": 32, "sample.max_new_tokens": 10, "judge.name": "length",
            "judge.min_gap": 1.0, "progress_bar": False}
  if stage == "reward":
    return {"data.cache_dir": cache, "data.batch_size": 4, "data.eval_fraction": 0.25, "train.steps": 10,
            "train.checkpoint_every": 4, "train.eval_every": 5, "train.log_every": 2, "train.progress_bar": False,
            "reward.normalize_samples": 6, "reward.normalize_max_new_tokens": 6}
  if stage == "dpo":
    return {"data.cache_dir": cache, "data.batch_size": 4, "data.eval_fraction": 0.25, "data.max_len": 32,
            "prompts.sources": f"('{chats}',)", "prompts.cache_dir": cache, "prompts.eval_fraction": 0.2,
            "dpo.num_eval_prompts": 4, "dpo.eval_batch_size": 4, "dpo.max_new_tokens": 6, "train.steps": 8,
            "train.checkpoint_every": 4, "train.eval_every": 4, "train.log_every": 2, "train.progress_bar": False}
  if stage == "bon":
    return {"bon.samples": 4, "bon.table_n": 2, "progress_bar": False}
  if stage in ("ppo", "grpo", "rloo", "rsft"):
    return {"data.sources": f"('{chats}',)", "data.cache_dir": cache, "data.eval_fraction": 0.2,
            f"{stage}.rollout_batch_size": 8, f"{stage}.minibatch_size": 4, f"{stage}.epochs": 2,
            f"{stage}.max_new_tokens": 6, f"{stage}.num_eval_prompts": 4, "train.steps": 4,
            "train.checkpoint_every": 2, "train.eval_every": 2, "train.progress_bar": False,
            **({} if stage == "ppo" else {f"{stage}.group_size": 2})}
  raise ValueError(stage)


def make_tiny_checkpoint(workdir: pathlib.Path, texts: list[str], *, stage: str = "sft", max_len: int = 64,
                         num_layers: int = 1, seed: int = 0, tokenizer: pathlib.Path | None = None) -> pathlib.Path:
  """A `stage` workdir holding a small GPT (a scalar-head reward model for stage "reward") with random normal
  weights and a 320-piece tokenizer trained on `texts` (or a copy of `tokenizer`): made in about a second, as
  initialising the model itself takes seconds on a busy CPU."""
  import shutil  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from flax import linen as nn  # pylint: disable=import-outside-toplevel
  from gptrl import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from gptrl import config as config_lib  # pylint: disable=import-outside-toplevel
  from gptrl import model as model_lib  # pylint: disable=import-outside-toplevel
  from gptrl import reward_model  # pylint: disable=import-outside-toplevel
  from gptrl import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  workdir.mkdir(parents=True, exist_ok=True)
  if tokenizer is None:
    tok = tokenizer_lib.train_tokenizer(texts, workdir / "tokenizer.model", vocab_size=320)
  else:
    shutil.copy(tokenizer, workdir / "tokenizer.model")
    tok = tokenizer_lib.load_tokenizer(str(workdir / "tokenizer.model"))
  cfg = config_lib.ModelConfig(vocab_size=tok.vocab_size, num_layers=num_layers, num_heads=2, d_model=32,
                               max_len=max_len)
  module = reward_model.make_reward_model(cfg) if stage == "reward" else model_lib.GPT(cfg)
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), np.zeros((1, max_len), np.int32)))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: rng.normal(0.0, 0.5, s.shape).astype(s.dtype), shapes["params"])
  checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  meta = {"stage": stage, "tokenizer_sha256": tok.sha256, "model": config_lib.to_dict(cfg)}
  if stage == "reward":
    meta["reward_offset"] = 0.0
  checkpointer.save(1, {"params": params, "step": np.int32(1)}, data={}, meta=meta)
  checkpointer.close()
  return workdir


class ServerProcess:
  """`python -m <module> --port 0 ARGS` in a subprocess, its output in `log`; waits until the log matches `ready`
  (a regex whose group 1 is the server's base URL)."""

  def __init__(self, module: str, args: list, log: pathlib.Path, ready: str,
               extra_env: dict[str, str] | None = None, timeout: float = 120):
    self.log = log
    with open(log, "w", encoding="utf-8") as f:
      self.proc = subprocess.Popen([sys.executable, "-m", module, "--port", "0", *map(str, args)], cwd=REPO,
                                   env={**env(), **(extra_env or {})}, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not (match := re.search(ready, log.read_text())):
      if self.proc.poll() is not None or time.monotonic() > deadline:
        self.stop()
        raise AssertionError(f"the server did not start:\n{log.read_text()[-3000:]}")
      time.sleep(0.05)
    self.url = match.group(1)

  def request(self, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    """GET `path` (POST `body` as JSON when given): (status, the JSON answer)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(req, timeout=timeout) as response:
        return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
      return e.code, json.loads(e.read())

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGINT)
      try:
        self.proc.wait(10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
