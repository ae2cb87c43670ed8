"""Write the Slurm batch script that runs a gptrl config on several GPU hosts: one task (one JAX process) per host
driving all its GPUs, requeued after a preemption.

  python launch/slurm.py --config configs/pretrain_gpu.py:size=7b --partition gpu > pretrain_7b.sbatch
  sbatch pretrain_7b.sbatch

The hosts default to the config's hardware.num_chips / --gpus-per-node. gptrl.launch joins the job from Slurm's
environment (gptrl/distributed.py: SLURM_JOB_ID with SLURM_NTASKS > 1 -> jax.distributed.initialize(), which
takes the coordinator, process count and id from Slurm). JAX's Slurm detection would give each process only
the GPU numbered by its SLURM_LOCALID (one process per GPU); with one process per host the script lists every
GPU in JAX_LOCAL_DEVICE_IDS instead. Slurm signals the job 5 minutes before its time limit (--signal): gptrl
saves a checkpoint and exits 75, and the script requeues the job, which resumes.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu  # noqa: E402  pylint: disable=wrong-import-position
import launchlib  # noqa: E402  pylint: disable=wrong-import-position

TEMPLATE = """#!/bin/bash
# {title}
# Written by: {generated_by}
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus_per_node}
#SBATCH --exclusive
#SBATCH --time={time}
#SBATCH --output={output}
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=TERM@300
{extra_sbatch}set -euo pipefail
cd {repo}
{activate}{exports}
# One process per host over all its GPUs (JAX's Slurm detection alone would give each process one GPU).
export JAX_LOCAL_DEVICE_IDS={device_ids}

srun --kill-on-bad-exit=1 {command} && rc=0 || rc=$?
if [ "$rc" -eq {preempted} ]; then
  # Preempted or out of time after saving a checkpoint: queue the job again; it resumes from the checkpoint.
  echo "gptrl: exit code {preempted} (checkpoint saved); requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
"""


def render(args: argparse.Namespace, overrides: list[str], argv: list[str]) -> str:
  """The sbatch script for `args` (see parse)."""
  nodes = args.nodes
  if not nodes:
    hardware = launchlib.config_hardware(args.config)
    nodes = max(1, -(-hardware.num_chips // args.gpus_per_node))
  config = launchlib.repo_relative(args.config)
  command = launchlib.gptrl_command(config, overrides, python=args.python)
  env = gpu.gpu_env("", args.env)
  exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
  extra = "".join(f"#SBATCH --{flag}={value}\n" for flag, value in (("partition", args.partition),
                                                                     ("account", args.account)) if value)
  stem = os.path.splitext(os.path.basename(config.partition(":")[0]))[0]
  variant = config.partition(":")[2].replace(",", "-").replace("=", "")
  return TEMPLATE.format(
      title=f"gptrl: {config} on {nodes} hosts x {args.gpus_per_node} GPUs",
      generated_by=shlex.join(["python", "launch/slurm.py", *argv]),
      job_name=args.job_name or f"gptrl-{stem}" + (f"-{variant}" if variant else ""),
      nodes=nodes, gpus_per_node=args.gpus_per_node, time=args.time, output=args.output, extra_sbatch=extra,
      repo=shlex.quote(args.repo or launchlib.REPO),
      activate=f"source {shlex.quote(os.path.join(args.venv, 'bin', 'activate'))}\n" if args.venv else "",
      exports=exports, device_ids=",".join(str(i) for i in range(args.gpus_per_node)),
      command=shlex.join(command), preempted=launchlib.EXIT_PREEMPTED)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  own, overrides = launchlib.split_overrides(argv)
  p = argparse.ArgumentParser(prog="launch/slurm.py", description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="configs/<file>.py[:variant]")
  p.add_argument("--nodes", type=int, default=0,
                 help="hosts (default: the config's hardware.num_chips / GPUs per node)")
  p.add_argument("--gpus-per-node", type=int, default=gpu.GPUS_PER_HOST)
  p.add_argument("--partition", default="")
  p.add_argument("--account", default="")
  p.add_argument("--time", default="48:00:00", help="the job's time limit (it requeues itself when it runs out)")
  p.add_argument("--job-name", default="")
  p.add_argument("--output", default="slurm-%x-%j.out", help="the job's log (appended to across requeues)")
  p.add_argument("--repo", default="", help="the checkout on the shared filesystem (default: this one)")
  p.add_argument("--venv", default="", help="a virtual environment with gptrl and jax[cuda12] to activate")
  p.add_argument("--python", default="python", help="the Python to run (after --venv is activated)")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="more environment, or overrides")
  p.add_argument("--out", default="", help="write the script here instead of printing it")
  return p.parse_args(own), overrides


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args, overrides = parse(argv)
  try:
    script = render(args, overrides, argv)
  except launchlib.LaunchError as e:
    print(f"launch/slurm.py: {e}", file=sys.stderr)
    return 1
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(script)
  else:
    sys.stdout.write(script)
  return 0


if __name__ == "__main__":
  sys.exit(main())
