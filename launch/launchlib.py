"""What the launchers share: running (or, with --dry-run, printing) commands, the gptrl.launch command line, the
exit code that means "preempted: run again", and reading a config's target hardware.

Imports no jax: the launchers run on a laptop with only gcloud and this repository.
"""
from __future__ import annotations

import dataclasses
import os
import runpy
import shlex
import subprocess
import sys
from typing import Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# gptrl/loop.py EXIT_PREEMPTED: a run stopped by SIGTERM / a preemption notice after saving a checkpoint.
EXIT_PREEMPTED = 75
JAX_VERSIONS = ">=0.10.2,<0.11"  # as pyproject.toml pins jax; the launchers install jax[tpu] / jax[cuda12] in it


class LaunchError(RuntimeError):
  """A launcher step failed; the message says which and what to do."""


@dataclasses.dataclass
class Result:
  returncode: int
  stdout: str = ""
  stderr: str = ""  # with capture=True


class Runner:
  """Runs commands, or with `dry_run` prints each as one shell-quoted line (to `out`) and pretends it succeeded.

  `replies` (dry run only) maps a prefix of a command line to the stdout the dry run pretends it printed, so a
  dry run can show the path a real state would take (e.g. a TPU VM that already exists).
  """

  def __init__(self, dry_run: bool = False, out=None, replies: dict[str, str] | None = None):
    self.dry_run = dry_run
    self.out = out or sys.stdout
    self.replies = replies or {}

  def show(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    print((prefix + " " if prefix else "") + shlex.join(argv), file=self.out, flush=True)

  def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None, capture: bool = False,
          on_line: Callable[[str], None] | None = None, check: bool = True) -> Result:
    """Runs `argv` (no shell) with `env` added to the environment.

    capture: return stdout instead of letting it through; on_line: stream stdout line by line to it (and return
    it too); check: raise LaunchError on a non-zero exit.
    """
    if self.dry_run:
      self.show(argv, env)
      line = shlex.join(argv)
      reply = next((v for k, v in self.replies.items() if line.startswith(k)), "")
      if on_line:
        for piece in reply.splitlines():
          on_line(piece)
      return Result(0, reply)
    full_env = {**os.environ, **(env or {})}
    if on_line is not None:
      proc = subprocess.Popen(list(argv), env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              bufsize=1)
      lines = []
      for line in proc.stdout:
        lines.append(line)
        on_line(line.rstrip("\n"))
      result = Result(proc.wait(), "".join(lines))
    elif capture:
      proc = subprocess.run(list(argv), env=full_env, capture_output=True, text=True, check=False)
      result = Result(proc.returncode, proc.stdout, proc.stderr)
      if proc.returncode and check:
        raise LaunchError(f"{shlex.join(argv)} failed with exit code {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    else:
      result = Result(subprocess.run(list(argv), env=full_env, check=False).returncode)
    if result.returncode and check:
      raise LaunchError(f"{shlex.join(argv)} failed with exit code {result.returncode}")
    return result


def gptrl_command(config: str, overrides: Sequence[str], python: str = "python") -> list[str]:
  """The command every process runs: `python -m gptrl.launch --config <file[:variant]> <overrides>`."""
  for o in overrides:
    if not o.startswith("--config."):
      raise LaunchError(f"{o!r}: only config overrides (--config.group.field=value) go after the launcher's options")
  return [python, "-m", "gptrl.launch", "--config", config, *overrides]


def repo_relative(config: str) -> str:
  """A config argument ("path.py[:variant]") with its path relative to the repository: the form the remote hosts,
  which get a copy of the repository, can open."""
  path, sep, variant = config.partition(":")
  full = os.path.abspath(path)
  if not os.path.exists(full):
    full = os.path.join(REPO, path)
  rel = os.path.relpath(full, REPO)
  if rel.startswith(".."):
    raise LaunchError(f"--config {config}: {path} is outside the repository {REPO}; the hosts only get the "
                      f"repository, so put the config file in it (e.g. under configs/)")
  return rel + sep + variant


def compile_check(runner: Runner, config: str, overrides: Sequence[str], topology: str, say: Callable[[str], None]
                  ) -> None:
  """Compiles every program of the run for `topology` on this machine (`python -m gptrl.compile`: needs jax and
  libtpu here, no TPU) before any hardware is booked; a plan XLA cannot fit or compile is refused with
  gptrl.compile's one-line reason. Prints the compile report."""
  argv = [sys.executable, "-m", "gptrl.compile", "--config", config, *overrides]
  if topology:
    argv += ["--topology", topology]
  say(f"compile check: every program of {config} for {topology or 'the config hardware'} (skip it with "
      f"--skip-compile-check)")
  result = runner.run(argv, capture=True, check=False)
  if result.stdout:
    print(result.stdout, end="" if result.stdout.endswith("\n") else "\n", file=runner.out, flush=True)
  if result.returncode:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if line.startswith("gptrl.")), lines[-1] if lines else "")
    raise LaunchError(f"the compile check refused the plan (exit code {result.returncode}): {reason}; nothing was "
                      f"booked. --skip-compile-check books the hardware anyway.")


@dataclasses.dataclass(frozen=True)
class Hardware:
  chip: str
  num_chips: int


def config_hardware(config: str) -> Hardware:
  """The `hardware` group (chip, num_chips) of a config file with its variant ("configs/x.py:size=1b")."""
  path, _, variant = config.partition(":")
  full = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
  if not os.path.exists(full):
    full = os.path.join(REPO, path)
  if not os.path.exists(full):
    raise LaunchError(f"--config {config}: no file {path} (relative to {os.getcwd()} or {REPO})")
  if REPO not in sys.path:
    sys.path.insert(0, REPO)  # the config files import gptrl (config.py, presets.py: no jax)
  cfg = runpy.run_path(full)["get_config"](variant)
  hardware = cfg.get("hardware")
  if hardware is None or not hardware.get("chip") or not hardware.get("num_chips"):
    raise LaunchError(f"--config {config}: it names no hardware.chip / hardware.num_chips; pass the slice on the "
                      f"command line instead (--accelerator-type for TPUs, --gpus/--nodes for GPUs)")
  return Hardware(hardware.chip, int(hardware.num_chips))


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(launcher arguments, gptrl config overrides): everything after a lone `--` is passed to gptrl.launch."""
  argv = list(argv)
  if "--" in argv:
    i = argv.index("--")
    return argv[:i], argv[i + 1:]
  return argv, []
