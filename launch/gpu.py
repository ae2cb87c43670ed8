"""Run a gptrl config on one multi-GPU host: one JAX process driving all its GPUs, with the environment XLA wants
on GPUs, restarted after a preemption (exit code 75) until it finishes.

  python launch/gpu.py --config configs/pretrain_gpu.py:size=350m [--gpus 0,1,2,3] [--dry-run] \\
      [-- --config.train.steps=1000]

Environment set for gptrl.launch (each overridable with --env KEY=VALUE):
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95  JAX's default preallocation is 75% of each GPU's memory; the memory estimate
                                       printed at launch compares against what JAX may use.
  XLA_FLAGS=...                        the latency-hiding scheduler (overlaps FSDP's all-gathers and
                                       reduce-scatters with compute) and larger collective combining thresholds.
  CUDA_VISIBLE_DEVICES                 with --gpus only.
  PYTHONUNBUFFERED=1                   logs as they happen.
For several hosts use launch/slurm.py (one process per host, the same environment).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launchlib  # noqa: E402  pylint: disable=wrong-import-position

GPUS_PER_HOST = 8
# Flags of the XLA in jaxlib 0.10 (an unknown flag aborts the process: tests/test_launchers.py checks them).
XLA_GPU_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true "
                 "--xla_gpu_enable_highest_priority_async_stream=true "
                 "--xla_gpu_all_gather_combine_threshold_bytes=134217728 "
                 "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728")


def gpu_env(gpus: str = "", extra: list[str] | None = None) -> dict[str, str]:
  """The environment gptrl.launch runs in on a GPU host; `extra`: KEY=VALUE strings that override it."""
  env = {"PYTHONUNBUFFERED": "1", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95", "XLA_FLAGS": XLA_GPU_FLAGS}
  if gpus:
    env["CUDA_VISIBLE_DEVICES"] = gpus
  for kv in extra or []:
    key, sep, value = kv.partition("=")
    if not sep:
      raise launchlib.LaunchError(f"--env {kv!r}: expected KEY=VALUE")
    env[key] = value
  return env


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  own, overrides = launchlib.split_overrides(argv)
  p = argparse.ArgumentParser(prog="launch/gpu.py", description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="configs/<file>.py[:variant]")
  p.add_argument("--gpus", default="", help="CUDA_VISIBLE_DEVICES, e.g. 0,1,2,3 (default: all)")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="more environment, or overrides")
  p.add_argument("--python", default=sys.executable, help="the Python with gptrl and jax[cuda12] installed")
  p.add_argument("--log", default="", help="also append the output to this file")
  p.add_argument("--max-restarts", type=int, default=20, help="restarts after exit code 75 before giving up")
  p.add_argument("--dry-run", action="store_true", help="print the environment and command instead of running")
  return p.parse_args(own), overrides


def main(argv: list[str] | None = None, runner: launchlib.Runner | None = None) -> int:
  args, overrides = parse(sys.argv[1:] if argv is None else argv)
  runner = runner or launchlib.Runner(dry_run=args.dry_run)
  try:
    env = gpu_env(args.gpus, args.env)
    config = args.config
    if not os.path.exists(config.partition(":")[0]):  # relative to the repository, when not to the working folder
      config = os.path.join(launchlib.REPO, config)
    command = launchlib.gptrl_command(config, overrides, python=args.python)
    try:
      hardware = launchlib.config_hardware(args.config)
    except launchlib.LaunchError:
      hardware = None
    if hardware and hardware.num_chips > GPUS_PER_HOST:
      print(f"launch/gpu.py: {args.config} is sized for {hardware.num_chips} GPUs; one host has {GPUS_PER_HOST} "
            f"(use launch/slurm.py, or a smaller size / --config.mesh overrides)", file=sys.stderr)
    # pylint: disable-next=consider-using-with
    log = open(args.log, "a", encoding="utf-8") if args.log and not args.dry_run else None

    def on_line(line: str) -> None:
      print(line, flush=True)
      if log:
        log.write(line + "\n")
        log.flush()
    for attempt in range(args.max_restarts + 1):
      result = runner.run(command, env=env, on_line=on_line, check=False)
      if result.returncode != launchlib.EXIT_PREEMPTED:
        return result.returncode
      print(f"launch/gpu.py: preempted (exit code {launchlib.EXIT_PREEMPTED}) on attempt {attempt + 1}; "
            "restarting, the run resumes from its checkpoint", file=sys.stderr, flush=True)
    print(f"launch/gpu.py: still preempted after {args.max_restarts} restarts", file=sys.stderr)
    return launchlib.EXIT_PREEMPTED
  except launchlib.LaunchError as e:
    print(f"launch/gpu.py: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
