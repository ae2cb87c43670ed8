"""Helpers shared by the tests that launch `python -m gptrl.launch` in subprocesses."""
from __future__ import annotations

import json
import os
import pathlib
import random
import subprocess
import time

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
  env["XLA_FLAGS"] = ""  # one CPU device: the fastest launch on a small machine
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def run(argv: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
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
