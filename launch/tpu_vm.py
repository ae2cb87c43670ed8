"""Run a gptrl config on a Cloud TPU VM slice (v4, v5e, v5p, v6e): create or reuse it, install gptrl on every
worker, start `python -m gptrl.launch` on all of them, stream their logs, restart after a preemption, delete.

  python launch/tpu_vm.py run --config configs/pretrain_tpu.py:size=1b --name gptrl-1b --zone us-east5-a \\
      --project my-project --mount-bucket my-bucket [--spot] [--dry-run] [-- --config.train.steps=1000]

Before `create` and `run` book anything, the run's programs are compiled for the slice's topology on this
machine (`python -m gptrl.compile`, which needs jax and libtpu here, no TPU): a plan XLA cannot fit in HBM is
refused with the program and the bytes (`--skip-compile-check` books it anyway).

Subcommands: `create` (or reuse), `install`, `run` (create + install + start + follow, restarting on exit code
75 and on a preempted slice), `start` (in the background), `logs` (follow the newest attempt's log), `stop`
(SIGTERM: the run saves a checkpoint and exits 75), `delete`. `--dry-run` prints the exact gcloud commands
instead of running them. The slice defaults to the config's `hardware.chip` x `hardware.num_chips`; v5e, v5p
and v6e slices are requested as queued resources (what Cloud TPU documents for them), v4 directly (override
with --queued / --no-queued). Everything after a lone `--` is passed on to gptrl.launch.

On the workers: the source in ~/gptrl (a copy of this checkout, or --source git), a virtual environment in
~/gptrl-venv with gptrl and jax[tpu], logs and the run's exit code in ~/gptrl-logs (launch/worker.sh). The run
is detached (setsid nohup), so losing the local connection neither stops it nor loses its log: `logs` reattaches.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launchlib  # noqa: E402  pylint: disable=wrong-import-position

sys.path.insert(0, launchlib.REPO)
from gptrl import presets  # noqa: E402  pylint: disable=wrong-import-position

REMOTE_SRC = "~/gptrl"
REMOTE_VENV = "~/gptrl-venv"
QUEUED_BY_DEFAULT = ("v5e", "v5p", "v6e")


@dataclasses.dataclass
class Slice:
  """One TPU VM slice and the gcloud commands that manage it."""
  name: str
  zone: str
  project: str
  accelerator_type: str
  runtime_version: str
  queued: bool
  spot: bool
  chip: str = ""  # presets.CHIPS key

  def _where(self) -> list[str]:
    return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

  def describe(self) -> list[str]:
    """Prints the node's state (READY, CREATING, PREEMPTED, ...), or the queued resource's (ACTIVE, ...)."""
    if self.queued:
      return ["gcloud", "compute", "tpus", "queued-resources", "describe", self.name, *self._where(),
              "--format=value(state.state)"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", self.name, *self._where(), "--format=value(state)"]

  def create(self) -> list[str]:
    spot = ["--spot"] if self.spot else []
    if self.queued:
      return ["gcloud", "compute", "tpus", "queued-resources", "create", self.name, *self._where(),
              f"--node-id={self.name}", f"--accelerator-type={self.accelerator_type}",
              f"--runtime-version={self.runtime_version}", *spot]
    return ["gcloud", "compute", "tpus", "tpu-vm", "create", self.name, *self._where(),
            f"--accelerator-type={self.accelerator_type}", f"--version={self.runtime_version}", *spot]

  def delete(self) -> list[str]:
    if self.queued:  # --force deletes the slice's node first, then the request
      return ["gcloud", "compute", "tpus", "queued-resources", "delete", self.name, *self._where(), "--force",
              "--quiet"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", self.name, *self._where(), "--quiet"]

  def ssh(self, command: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, *self._where(), "--worker=all",
            f"--command={command}"]

  def scp(self, local: str, remote: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{self.name}:{remote}", *self._where(),
            "--worker=all"]


# ----------------------------------------------------------------------------------------------
# What runs on the workers.


def source_archive(name: str) -> str:
  return os.path.join(tempfile.gettempdir(), f"gptrl-src-{name}.tgz")


def pack_command(name: str) -> list[str]:
  """A tarball of this checkout (its working tree, without .git, runs/ and caches) to copy to the workers."""
  return ["tar", "-czf", source_archive(name), "--exclude=./.git", "--exclude=./runs", "--exclude=./.venv",
          "--exclude=__pycache__", "-C", launchlib.REPO, "."]


def mount_script(bucket: str, mount_point: str) -> str:
  """Installs Cloud Storage FUSE if missing and mounts `bucket` at `mount_point` (the configs' /mnt/gptrl)."""
  mp = shlex.quote(mount_point)
  return (
      "if ! command -v gcsfuse >/dev/null; then "
      "echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt "
      "gcsfuse-$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && "
      "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | "
      "sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && "
      "sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi; "
      f"sudo mkdir -p {mp} && sudo chown $(id -u):$(id -g) {mp} && "
      f"(mountpoint -q {mp} || gcsfuse --implicit-dirs {shlex.quote(bucket)} {mp})")


def install_script(source: str, repo: str, branch: str, bucket: str, mount_point: str) -> str:
  """Sets up every worker: the bucket mount, the source, a venv with gptrl and jax[tpu]."""
  steps = ["set -e"]
  if bucket:
    steps.append(mount_script(bucket, mount_point))
  if source == "git":
    steps.append(f"if [ -d {REMOTE_SRC}/.git ]; then git -C {REMOTE_SRC} fetch -q origin {shlex.quote(branch)} && "
                 f"git -C {REMOTE_SRC} checkout -q FETCH_HEAD; else git clone -q --branch {shlex.quote(branch)} "
                 f"{shlex.quote(repo)} {REMOTE_SRC}; fi")
  else:
    steps.append(f"mkdir -p {REMOTE_SRC} && tar -xzf ~/gptrl-src.tgz -C {REMOTE_SRC}")
  steps.append(f"python3 -m venv {REMOTE_VENV} || (sudo apt-get update -qq && sudo apt-get install -y -qq "
               f"python3-venv && python3 -m venv {REMOTE_VENV})")
  steps.append(f"{REMOTE_VENV}/bin/pip install -q -U pip")
  # [gcs]: gcsfs and google-cloud-storage, for gs:// workdirs, data and checkpoints without a mount.
  steps.append(f"{REMOTE_VENV}/bin/pip install -q -e {REMOTE_SRC}[gcs] "
               f"\"jax[tpu]{launchlib.JAX_VERSIONS}\"")
  return "; ".join(steps)


WORKER = f"{REMOTE_SRC}/launch/worker.sh"  # launch/worker.sh: start / follow / stop a detached job on a worker


def start_script(name: str, attempt: int, command: list[str], env: dict[str, str]) -> str:
  """Starts the run detached on a worker (launch/worker.sh start): its log in ~/gptrl-logs/<name>-<attempt>.log,
  its exit code in <name>.rc when it ends."""
  python, rest = command[0], command[1:]  # the venv's python: a ~ path the remote shell expands, left unquoted
  assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
  return f"cd {REMOTE_SRC} && bash {WORKER} start {name} {attempt} env {assignments} {python} {shlex.join(rest)}"


def follow_script(name: str, attempt: int | None, lines: str = "+1") -> str:
  """Streams a run's log (lines prefixed with the worker's host name) until it ends, then its exit code as
  `gptrl-exit-code=<code> host=<host>`; attempt None: the newest attempt's log."""
  return f"bash {WORKER} follow {name} {'latest' if attempt is None else attempt} {lines}"


def stop_script(name: str) -> str:
  return f"bash {WORKER} stop {name}"


EXIT_CODE = re.compile(r"gptrl-exit-code=(\S+) host=(\S+)")


# ----------------------------------------------------------------------------------------------
# The steps.


class Launcher:
  def __init__(self, args: argparse.Namespace, overrides: list[str], runner: launchlib.Runner):
    self.args, self.runner, self.overrides = args, runner, list(overrides)
    self.slice = make_slice(args)
    self.command = (launchlib.gptrl_command(launchlib.repo_relative(args.config), overrides,
                                            python=f"{REMOTE_VENV}/bin/python") if args.config else [])
    self.env = {"PYTHONUNBUFFERED": "1", **dict(kv.split("=", 1) for kv in args.env)}

  def say(self, message: str) -> None:
    print(f"[tpu_vm] {message}", file=sys.stderr, flush=True)

  def state(self) -> str:
    """The slice's state, "" when it does not exist."""
    return self.runner.run(self.slice.describe(), capture=True, check=False).stdout.strip()

  def check_plan(self) -> None:
    """Before any slice is booked: the config's programs compiled for this slice's topology (gptrl.compile)."""
    if self.args.skip_compile_check or not self.args.config:
      return
    chips = int(self.slice.accelerator_type.rsplit("-", 1)[1]) // presets.CHIPS[self.slice.chip].cores_per_chip
    launchlib.compile_check(self.runner, self.args.config, self.overrides,
                            presets.topology_name(self.slice.chip, chips), self.say)

  def ensure(self) -> None:
    """Creates the slice unless it exists and is usable; a preempted or failed one is deleted and made again."""
    state = self.state()
    if state in ("READY", "ACTIVE"):
      self.say(f"reusing {self.slice.name} ({state})")
      return
    if state in ("PREEMPTED", "TERMINATED", "FAILED", "SUSPENDED"):
      self.say(f"{self.slice.name} is {state}: deleting it and creating it again")
      self.runner.run(self.slice.delete(), check=False)
    elif state:
      self.say(f"{self.slice.name} is {state}: waiting for it")
    if not state or state in ("PREEMPTED", "TERMINATED", "FAILED", "SUSPENDED"):
      self.runner.run(self.slice.create())
    self.wait_ready()

  def wait_ready(self) -> None:
    deadline = time.time() + 60 * self.args.wait_minutes
    while True:
      state = self.state()
      if self.runner.dry_run or state in ("READY", "ACTIVE"):
        return
      if state in ("FAILED", "SUSPENDED", "PREEMPTED", "TERMINATED"):
        raise launchlib.LaunchError(f"{self.slice.name} went {state} while starting; see "
                                    f"`{shlex.join(self.slice.describe()[:-1])}`")
      if time.time() > deadline:
        raise launchlib.LaunchError(f"{self.slice.name} not ready after {self.args.wait_minutes} minutes (state "
                                    f"{state or 'unknown'}); raise --wait-minutes or try another zone")
      time.sleep(30)

  def install(self) -> None:
    if self.args.source == "copy":
      self.runner.run(pack_command(self.slice.name))
      self.runner.run(self.slice.scp(source_archive(self.slice.name), "~/gptrl-src.tgz"))
    elif not self.args.repo:
      raise launchlib.LaunchError("--source git needs --repo (a URL every worker can clone)")
    self.runner.run(self.slice.ssh(install_script(self.args.source, self.args.repo, self.args.branch,
                                                  self.args.mount_bucket, self.args.mount_point)))

  def start(self, attempt: int) -> None:
    self.runner.run(self.slice.ssh(start_script(self.slice.name, attempt, self.command, self.env)))

  def follow(self, attempt: int | None, lines: str = "+1") -> dict[str, str]:
    """Streams the workers' logs until the run ends; returns {host: exit code} as each worker reported it."""
    codes: dict[str, str] = {}

    def on_line(line: str) -> None:
      match = EXIT_CODE.search(line)
      if match:
        codes[match.group(2)] = match.group(1)
      print(line, flush=True)
    self.runner.run(self.slice.ssh(follow_script(self.slice.name, attempt, lines)), on_line=on_line, check=False)
    return codes

  def run(self) -> int:
    """compile check -> create/reuse -> install -> (start -> follow) until success, restarting after preemption."""
    self.check_plan()
    self.ensure()
    self.install()
    for attempt in range(1, self.args.max_restarts + 2):
      self.start(attempt)
      codes = self.follow(attempt)
      if self.runner.dry_run:
        self.say("dry run: a real run repeats start + follow after exit code 75 or a preempted slice")
        break
      values = set(codes.values())
      if values == {"0"}:
        self.say(f"finished on {len(codes)} workers")
        break
      if str(launchlib.EXIT_PREEMPTED) in values or not codes or "none" in values:
        # Preempted (exit 75), or the connection or the slice went away: make sure the slice is usable (a
        # preempted one is made again, and gptrl reinstalled), then start again; gptrl resumes from its checkpoint.
        self.say(f"attempt {attempt} stopped (exit codes {codes or 'lost'}); restarting")
        before = self.state()
        self.ensure()
        if before not in ("READY", "ACTIVE"):
          self.install()
        continue
      raise launchlib.LaunchError(f"the run failed on the workers with exit codes {codes}; see the log above "
                                  f"(or `python launch/tpu_vm.py logs ...`)")
    else:
      raise launchlib.LaunchError(f"still preempted after {self.args.max_restarts} restarts")
    if self.args.delete_after:
      self.runner.run(self.slice.delete())
    return 0


def make_slice(args: argparse.Namespace) -> Slice:
  if args.accelerator_type:
    accelerator = args.accelerator_type
    chip = next((c for c, s in presets.CHIPS.items() if s.platform == "tpu" and
                 accelerator.startswith(s.accelerator_prefix + "-")), "")
  else:
    if not args.config:
      raise launchlib.LaunchError("give --config (its hardware.chip and num_chips size the slice) or "
                                  "--accelerator-type")
    hardware = launchlib.config_hardware(args.config)
    chip, accelerator = hardware.chip, presets.accelerator_type(hardware.chip, hardware.num_chips)
  if not chip:
    raise launchlib.LaunchError(f"--accelerator-type {accelerator}: not a v4/v5e (v5litepod)/v5p/v6e type")
  runtime = args.runtime_version or presets.CHIPS[chip].runtime_version
  queued = chip in QUEUED_BY_DEFAULT if args.queued is None else args.queued
  return Slice(args.name, args.zone, args.project, accelerator, runtime, queued, args.spot, chip)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  own, overrides = launchlib.split_overrides(argv)
  p = argparse.ArgumentParser(prog="launch/tpu_vm.py", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("action", choices=("create", "install", "run", "start", "logs", "stop", "delete"))
  p.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
  p.add_argument("--zone", required=True, help="e.g. us-east5-a (where the chip type is offered)")
  p.add_argument("--project", default="", help="GCP project (default: gcloud's configured one)")
  p.add_argument("--config", default="", help="configs/<file>.py[:variant], run by gptrl.launch on every worker")
  p.add_argument("--accelerator-type", default="", help="e.g. v5p-128 (default: from the config's hardware group)")
  p.add_argument("--runtime-version", default="", help="TPU software version (default: the chip's JAX one)")
  p.add_argument("--queued", dest="queued", action="store_true", default=None, help="request a queued resource")
  p.add_argument("--no-queued", dest="queued", action="store_false", help="create the TPU VM directly")
  p.add_argument("--spot", action="store_true", help="Spot capacity: cheaper, preemptible (the run restarts)")
  p.add_argument("--source", choices=("copy", "git"), default="copy",
                 help="copy this checkout's working tree to the workers, or git clone --repo")
  p.add_argument("--repo", default="", help="with --source git: a URL the workers can clone")
  p.add_argument("--branch", default="main", help="with --source git")
  p.add_argument("--mount-bucket", default="", help="GCS bucket mounted with gcsfuse at --mount-point on every worker")
  p.add_argument("--mount-point", default="/mnt/gptrl", help="where the configs expect their shared files")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment for gptrl.launch")
  p.add_argument("--max-restarts", type=int, default=20, help="restarts after preemption before giving up")
  p.add_argument("--wait-minutes", type=float, default=120, help="how long to wait for the slice to be ready")
  p.add_argument("--delete-after", action="store_true", help="delete the slice when the run has finished")
  p.add_argument("--skip-compile-check", action="store_true",
                 help="book the slice without first compiling the run's programs for it (python -m gptrl.compile, "
                      "which needs libtpu on this machine)")
  p.add_argument("--dry-run", action="store_true", help="print the gcloud commands instead of running them")
  args = p.parse_args(own)
  for kv in args.env:
    if "=" not in kv:
      p.error(f"--env {kv!r}: expected KEY=VALUE")
  if args.action in ("run", "start") and not args.config:
    p.error(f"{args.action} needs --config")
  return args, overrides


def main(argv: list[str] | None = None, runner: launchlib.Runner | None = None) -> int:
  args, overrides = parse(sys.argv[1:] if argv is None else argv)
  runner = runner or launchlib.Runner(dry_run=args.dry_run)
  try:
    launcher = Launcher(args, overrides, runner)
    if args.action == "create":
      launcher.check_plan()
      launcher.ensure()
    elif args.action == "install":
      launcher.install()
    elif args.action == "run":
      return launcher.run()
    elif args.action == "start":
      launcher.start(int(time.time()))
    elif args.action == "logs":
      launcher.follow(None, lines="100")
    elif args.action == "stop":
      runner.run(launcher.slice.ssh(stop_script(args.name)))
    elif args.action == "delete":
      runner.run(launcher.slice.delete())
  except launchlib.LaunchError as e:
    print(f"launch/tpu_vm.py: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
