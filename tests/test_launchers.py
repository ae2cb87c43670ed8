"""The job launchers in launch/: the exact commands their dry runs print, their restart-on-preemption logic with a
scripted gcloud, the worker-side job control (launch/worker.sh) run for real, and the rendered Slurm script."""
import io
import os
import shlex
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))
import gpu  # noqa: E402  pylint: disable=wrong-import-position
import launchlib  # noqa: E402  pylint: disable=wrong-import-position
import slurm  # noqa: E402  pylint: disable=wrong-import-position
import tpu_vm  # noqa: E402  pylint: disable=wrong-import-position

ARCHIVE = os.path.join(tempfile.gettempdir(), "gptrl-src-gptrl-1b.tgz")
INSTALL = ("set -e; mkdir -p ~/gptrl && tar -xzf ~/gptrl-src.tgz -C ~/gptrl; python3 -m venv ~/gptrl-venv || "
           "(sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && python3 -m venv ~/gptrl-venv); "
           "~/gptrl-venv/bin/pip install -q -U pip; ~/gptrl-venv/bin/pip install -q -e ~/gptrl[gcs] "
           "\"jax[tpu]>=0.10.2,<0.11\"")


def dry_run(main, argv, replies=None) -> list[str]:
  out = io.StringIO()
  assert main(argv, runner=launchlib.Runner(dry_run=True, out=out, replies=replies)) == 0
  return out.getvalue().splitlines()


def test_tpu_dry_run_of_a_v5p_config_queues_the_slice_copies_installs_starts_and_follows():
  lines = dry_run(tpu_vm.main, ["run", "--config", "configs/pretrain_tpu.py:size=1b", "--name", "gptrl-1b",
                                "--zone", "us-east5-a", "--project", "my-proj", "--dry-run", "--",
                                "--config.train.steps=1000"])
  where = "--zone=us-east5-a --project=my-proj"
  assert lines == [
      shlex.join([sys.executable, "-m", "gptrl.compile", "--config", "configs/pretrain_tpu.py:size=1b",
                  "--config.train.steps=1000", "--topology", "v5p:2x4x4"]),
      f"gcloud compute tpus queued-resources describe gptrl-1b {where} '--format=value(state.state)'",
      f"gcloud compute tpus queued-resources create gptrl-1b {where} --node-id=gptrl-1b --accelerator-type=v5p-64 "
      "--runtime-version=v2-alpha-tpuv5",
      f"gcloud compute tpus queued-resources describe gptrl-1b {where} '--format=value(state.state)'",
      f"tar -czf {ARCHIVE} --exclude=./.git --exclude=./runs --exclude=./.venv --exclude=__pycache__ -C {ROOT} .",
      f"gcloud compute tpus tpu-vm scp {ARCHIVE} 'gptrl-1b:~/gptrl-src.tgz' {where} --worker=all",
      f"gcloud compute tpus tpu-vm ssh gptrl-1b {where} --worker=all '--command={INSTALL}'",
      f"gcloud compute tpus tpu-vm ssh gptrl-1b {where} --worker=all '--command=cd ~/gptrl && bash "
      "~/gptrl/launch/worker.sh start gptrl-1b 1 env PYTHONUNBUFFERED=1 ~/gptrl-venv/bin/python -m gptrl.launch "
      "--config configs/pretrain_tpu.py:size=1b --config.train.steps=1000'",
      f"gcloud compute tpus tpu-vm ssh gptrl-1b {where} --worker=all "
      "'--command=bash ~/gptrl/launch/worker.sh follow gptrl-1b 1 +1'",
  ]


def test_tpu_dry_run_of_an_existing_v4_slice_reuses_it_and_mounts_the_bucket():
  replies = {"gcloud compute tpus tpu-vm describe": "READY\n"}
  lines = dry_run(tpu_vm.main, ["run", "--config", os.path.join(ROOT, "configs/sft_tpu.py") + ":size=7b,chip=v4",
                                "--name", "g7", "--zone", "us-central2-b", "--spot", "--mount-bucket", "my-bucket",
                                "--env", "GPTRL_CACHE=/mnt/gptrl/cache", "--dry-run"], replies)
  assert lines[0].endswith(" -m gptrl.compile --config " + os.path.join(ROOT, "configs/sft_tpu.py")
                           + ":size=7b,chip=v4 --topology v4:4x4x4")
  assert lines[1] == "gcloud compute tpus tpu-vm describe g7 --zone=us-central2-b '--format=value(state)'"
  assert not any(" create " in line for line in lines)  # READY: reused, not created
  install = lines[4]
  assert "gcsfuse --implicit-dirs my-bucket /mnt/gptrl" in install and "mountpoint -q /mnt/gptrl" in install
  assert lines[5] == ("gcloud compute tpus tpu-vm ssh g7 --zone=us-central2-b --worker=all '--command=cd ~/gptrl && "
                      "bash ~/gptrl/launch/worker.sh start g7 1 env PYTHONUNBUFFERED=1 GPTRL_CACHE=/mnt/gptrl/cache "
                      "~/gptrl-venv/bin/python -m gptrl.launch --config configs/sft_tpu.py:size=7b,chip=v4'")


def test_tpu_create_direct_with_spot_and_delete_and_stop_commands():
  lines = dry_run(tpu_vm.main, ["create", "--config", "configs/ppo_tpu.py:size=7b,chip=v4", "--name", "p",
                                "--zone", "us-central2-b", "--spot", "--skip-compile-check", "--dry-run"])
  assert "gptrl.compile" not in lines[0]
  assert lines[1] == ("gcloud compute tpus tpu-vm create p --zone=us-central2-b --accelerator-type=v4-256 "
                      "--version=tpu-ubuntu2204-base --spot")
  assert dry_run(tpu_vm.main, ["delete", "--accelerator-type", "v6e-64", "--name", "p", "--zone", "z",
                               "--dry-run"]) == [
      "gcloud compute tpus queued-resources delete p --zone=z --force --quiet"]
  assert dry_run(tpu_vm.main, ["delete", "--accelerator-type", "v4-32", "--name", "p", "--zone", "z",
                               "--dry-run"]) == ["gcloud compute tpus tpu-vm delete p --zone=z --quiet"]
  assert dry_run(tpu_vm.main, ["stop", "--accelerator-type", "v5litepod-32", "--name", "p", "--zone", "z",
                               "--dry-run"]) == [
      "gcloud compute tpus tpu-vm ssh p --zone=z --worker=all '--command=bash ~/gptrl/launch/worker.sh stop p'"]


class ScriptedGcloud(launchlib.Runner):
  """Plays gcloud: answers describe with the next scripted state and follow with the next scripted exit codes."""

  def __init__(self, states, exit_codes):
    super().__init__(dry_run=False, out=io.StringIO())
    self.states, self.exit_codes, self.calls = list(states), list(exit_codes), []

  def run(self, argv, *, env=None, capture=False, on_line=None, check=True):
    line = " ".join(argv)
    self.calls.append(line)
    if " describe " in line:
      return launchlib.Result(0, self.states.pop(0) if self.states else "READY")
    if "worker.sh follow" in line:
      codes = self.exit_codes.pop(0)
      for host, code in enumerate(codes):
        on_line(f"[w{host}] training...")
        on_line(f"gptrl-exit-code={code} host=w{host}")
      return launchlib.Result(0)
    return launchlib.Result(0)


def run_tpu(runner, *extra):
  return tpu_vm.main(["run", "--config", "configs/pretrain_tpu.py:size=125m", "--name", "n", "--zone", "z", *extra],
                     runner=runner)


def test_tpu_run_restarts_after_exit_code_75_until_every_worker_finishes():
  runner = ScriptedGcloud(states=["READY"], exit_codes=[["75", "75"], ["0", "0"]])
  assert run_tpu(runner) == 0
  starts = [c for c in runner.calls if "worker.sh start" in c]
  assert [s.split("worker.sh start n ")[1].split()[0] for s in starts] == ["1", "2"]
  assert sum(" create " in c for c in runner.calls) == 0


def test_tpu_run_recreates_and_reinstalls_a_preempted_slice():
  # The connection drops with the slice (no exit codes); describe then says PREEMPTED: delete, create, reinstall.
  runner = ScriptedGcloud(states=["READY", "PREEMPTED", "PREEMPTED", "CREATING", "ACTIVE"],
                          exit_codes=[[], ["0", "0"]])
  tpu_vm.time.sleep = lambda s: None  # pylint: disable=protected-access
  try:
    assert run_tpu(runner) == 0
  finally:
    tpu_vm.time.sleep = time.sleep
  verbs = [c.split()[4] for c in runner.calls if c.startswith("gcloud")]
  assert verbs.index("delete") < verbs.index("create") < len(verbs) - verbs[::-1].index("ssh") - 1
  assert sum("worker.sh start" in c for c in runner.calls) == 2
  assert sum("pip install" in c for c in runner.calls) == 2  # installed again on the new slice


def test_tpu_run_refused_by_the_compile_check_books_nothing(capsys):
  class Refusing(ScriptedGcloud):
    def run(self, argv, *, env=None, capture=False, on_line=None, check=True):
      if "gptrl.compile" in argv:
        self.calls.append(" ".join(argv))
        return launchlib.Result(1, "", "compiling train step ...\ngptrl.compile: train step does not fit v5p's "
                                       "95.0 GiB per device: XLA needs 120.00 GiB (...)\n")
      return super().run(argv, env=env, capture=capture, on_line=on_line, check=check)

  runner = Refusing(states=[], exit_codes=[])
  assert run_tpu(runner) == 1
  assert len(runner.calls) == 1 and "gptrl.compile" in runner.calls[0]  # no gcloud call: nothing booked
  err = capsys.readouterr().err
  assert "the compile check refused the plan (exit code 1): gptrl.compile: train step does not fit" in err
  assert "--skip-compile-check" in err


def test_tpu_run_stops_on_a_real_failure_with_the_exit_codes():
  runner = ScriptedGcloud(states=["READY"], exit_codes=[["1", "0"]])
  assert run_tpu(runner) == 1
  assert sum("worker.sh start" in c for c in runner.calls) == 1


def test_config_outside_the_repository_is_refused(tmp_path):
  outside = tmp_path / "mine.py"
  outside.write_text((open(os.path.join(ROOT, "configs/pretrain_tpu.py"), encoding="utf-8").read()))
  assert tpu_vm.main(["run", "--config", f"{outside}:size=125m", "--name", "n", "--zone", "z", "--dry-run"],
                     runner=launchlib.Runner(dry_run=True, out=io.StringIO())) == 1


# ----------------------------------------------------------------------------------------------
# launch/worker.sh, for real: a detached job, SIGTERM, its exit code and log.


def worker(tmp_path, *args, timeout=30):
  env = {**os.environ, "GPTRL_LOGS": str(tmp_path)}
  return subprocess.run(["bash", os.path.join(ROOT, "launch", "worker.sh"), *args], env=env, capture_output=True,
                        text=True, timeout=timeout, check=True).stdout


JOB = ("import signal, sys, time\n"
       "signal.signal(signal.SIGTERM, lambda *a: (print('saving a checkpoint', flush=True), sys.exit(75)))\n"
       "print('step 1', flush=True)\n"
       "time.sleep(60)\n")


def test_worker_job_survives_detached_and_records_75_after_sigterm(tmp_path):
  assert "started job attempt 1" in worker(tmp_path, "start", "job", "1", sys.executable, "-c", JOB)
  log, deadline = tmp_path / "job-1.log", time.time() + 30
  while not (log.exists() and "step 1" in log.read_text()):  # the job has set its SIGTERM handler
    assert time.time() < deadline, "the job did not start"
    time.sleep(0.2)
  worker(tmp_path, "stop", "job")
  out = worker(tmp_path, "follow", "job", "1")
  lines = out.splitlines()
  assert lines[-1].startswith("gptrl-exit-code=75 host=")
  assert any(line.endswith("] step 1") for line in lines) and any("saving a checkpoint" in line for line in lines)


def test_worker_follow_latest_reports_a_clean_exit(tmp_path):
  worker(tmp_path, "start", "job", "7", sys.executable, "-c", "print('done')")
  out = worker(tmp_path, "follow", "job", "latest")
  assert out.splitlines()[-1].startswith("gptrl-exit-code=0 host=") and "] done" in out


# ----------------------------------------------------------------------------------------------
# One GPU host, and Slurm.


def test_gpu_dry_run_prints_the_environment_and_the_command():
  lines = dry_run(gpu.main, ["--config", "configs/pretrain_gpu.py:size=350m", "--gpus", "0,1,2,3", "--python",
                             "python", "--dry-run", "--", "--config.train.steps=10"])
  assert lines == [
      "PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 "
      f"XLA_FLAGS='{gpu.XLA_GPU_FLAGS}' CUDA_VISIBLE_DEVICES=0,1,2,3 "
      "python -m gptrl.launch --config configs/pretrain_gpu.py:size=350m --config.train.steps=10"]


def test_gpu_launcher_restarts_on_75_and_returns_the_final_exit_code():
  class Scripted(launchlib.Runner):
    def __init__(self, codes):
      super().__init__(out=io.StringIO())
      self.codes, self.calls = list(codes), 0

    def run(self, argv, *, env=None, capture=False, on_line=None, check=True):
      self.calls += 1
      return launchlib.Result(self.codes.pop(0))
  runner = Scripted([75, 75, 0])
  assert gpu.main(["--config", "configs/pretrain_gpu.py:size=125m"], runner=runner) == 0 and runner.calls == 3
  runner = Scripted([75, 3])
  assert gpu.main(["--config", "configs/pretrain_gpu.py:size=125m"], runner=runner) == 3 and runner.calls == 2


def test_gpu_xla_flags_are_known_to_the_installed_jaxlib():
  """XLA aborts on an unknown XLA_FLAGS entry; the CPU client parses the same flag registry, so it checks ours."""
  def run(flags):
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(2).block_until_ready()"], env=env,
                          capture_output=True, text=True, timeout=120)
  assert run(gpu.XLA_GPU_FLAGS).returncode == 0
  control = run("--xla_gpu_no_such_flag=true")
  assert control.returncode != 0 and "Unknown flag" in control.stderr


def test_slurm_script_runs_one_process_per_host_over_all_its_gpus_and_requeues_on_75():
  argv = ["--config", "configs/pretrain_gpu.py:size=7b", "--partition", "gpu", "--account", "lab", "--venv",
          "/shared/venv", "--time", "24:00:00", "--", "--config.train.steps=10"]
  args, overrides = slurm.parse(argv)
  script = slurm.render(args, overrides, argv)
  assert script == f"""#!/bin/bash
# gptrl: configs/pretrain_gpu.py:size=7b on 8 hosts x 8 GPUs
# Written by: python launch/slurm.py --config configs/pretrain_gpu.py:size=7b --partition gpu --account lab --venv /shared/venv --time 24:00:00 -- --config.train.steps=10
#SBATCH --job-name=gptrl-pretrain_gpu-size7b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=TERM@300
#SBATCH --partition=gpu
#SBATCH --account=lab
set -euo pipefail
cd {ROOT}
source /shared/venv/bin/activate
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
export XLA_FLAGS='{gpu.XLA_GPU_FLAGS}'
# One process per host over all its GPUs (JAX's Slurm detection alone would give each process one GPU).
export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7

srun --kill-on-bad-exit=1 python -m gptrl.launch --config configs/pretrain_gpu.py:size=7b --config.train.steps=10 && rc=0 || rc=$?
if [ "$rc" -eq 75 ]; then
  # Preempted or out of time after saving a checkpoint: queue the job again; it resumes from the checkpoint.
  echo "gptrl: exit code 75 (checkpoint saved); requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
"""
  assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid bash


def test_slurm_nodes_follow_the_config_or_the_flag():
  for argv, nodes in ((["--config", "configs/sft_gpu.py:size=3b"], 2),
                      (["--config", "configs/sft_gpu.py:size=125m"], 1),
                      (["--config", "configs/sft_gpu.py:size=125m", "--nodes", "4"], 4)):
    args, overrides = slurm.parse(argv)
    assert f"#SBATCH --nodes={nodes}\n" in slurm.render(args, overrides, argv)


def test_overrides_must_be_config_overrides():
  with pytest.raises(launchlib.LaunchError, match="only config overrides"):
    launchlib.gptrl_command("configs/pretrain_gpu.py", ["--steps=3"])
