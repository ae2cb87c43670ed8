"""Every TPU plan (configs/*_tpu.py: stage x size x chip) compiled for its slice: fit, projected MFU, collectives.

  python benchmarks/compile_plans.py [--stages pretrain,sft] [--sizes 125m,1b] [--chips v5p] [--programs train]
      [--out benchmarks/results/compile] [--table benchmarks/results/compile_plans.md]

Each plan runs `python -m gptrl.compile` in its own process (a 7B plan's compile holds several GiB of host memory)
and leaves its JSON report in --out; plans whose JSON is already there are not compiled again (delete it to
redo one). The table then has one row per plan: the largest per-device total of its programs against the chip's
HBM, the train step's XLA memory against gptrl/memory.py's estimate, its MFU bounds and roofline step time
(gptrl/compile.py: max of flops / peak, bytes / HBM bandwidth, collective bytes / interconnect bandwidth), and its
collective bytes per step per device. MFU is a range: from the roofline time's to model flops over compiled flops
(every matmul at peak).

A plan change is shown by keeping the reports made before it as `<plan>_<name>.json` and compiling the plans again:
`--before <name>` prints their train programs side by side (e.g. `--before einsum`: attention through the einsum
path, before the splash kernel).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import runpy
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gptrl import presets  # noqa: E402  pylint: disable=wrong-import-position

STAGES = ("pretrain", "sft", "reward", "ppo")
GIB = 1024 ** 3


def plans(stages, sizes, chips):
  for stage in stages:
    table = runpy.run_path(os.path.join(ROOT, f"configs/{stage}_tpu.py"))["PLANS"]
    for size in sizes:
      for chip in table[size][2]:
        if not chips or chip in chips:
          yield stage, size, chip


def compile_plan(stage: str, size: str, chip: str, out: str, programs: str, least: str,
                 render_only: bool) -> dict | None:
  path = os.path.join(out, f"{stage}_{size}_{chip}.json")
  if not os.path.exists(path) and render_only:
    return None
  if not os.path.exists(path):
    argv = [sys.executable, "-m", "gptrl.compile", "--config", f"configs/{stage}_tpu.py:size={size},chip={chip}",
            "--json", path] + (["--programs", programs] if programs else []) + (
                ["--least_memory", least] if least else [])
    t0 = time.time()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    print(f"{stage} {size} {chip}: exit {proc.returncode} in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    if proc.returncode < 0:  # killed (the host's out-of-memory killer: a 7b plan's compile can outgrow 24 GB):
      # the compile did not finish, which says nothing of the plan; no report is kept
      last = (proc.stderr.strip().splitlines() or [""])[-1]
      print(f"  killed by signal {-proc.returncode} (out of host memory?) at: {last}", file=sys.stderr, flush=True)
      return None
    if proc.returncode:
      reason = [line for line in proc.stderr.splitlines() if line.startswith("gptrl.")][-1:] or proc.stderr[-500:]
      _write(path, {"error": reason[0] if isinstance(reason, list) else reason})
  return _read(path)


def _read(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write(path: str, report: dict) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)


_LEAST_FIELDS = ("estimate", "least_temporaries", "least_matmul_flops", "least_total", "estimate_ratio")


def add_least(stage: str, size: str, chip: str, out: str, least: str) -> None:
  """Compiles the train program of a report made before --least-memory existed for the least memory too, and
  adds that (and the current estimate of it) to the report."""
  path = os.path.join(out, f"{stage}_{size}_{chip}.json")
  if not os.path.exists(path):
    return
  report = _read(path)
  wanted = [p for p in report.get("programs", []) if any(p["name"].startswith(x) for x in least.split(","))]
  if not wanted or all(p.get("least_total") for p in wanted):
    return
  names = ",".join(p["name"] for p in wanted)
  fresh_path = path + ".least"
  argv = [sys.executable, "-m", "gptrl.compile", "--config", report["config"], "--programs", names,
          "--least_memory", names, "--json", fresh_path]
  t0 = time.time()
  proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  print(f"{stage} {size} {chip}: least memory: exit {proc.returncode} in {time.time() - t0:.0f} s", file=sys.stderr,
        flush=True)
  if proc.returncode:
    print(proc.stderr[-2000:], file=sys.stderr)
    return
  fresh = {p["name"]: p for p in _read(fresh_path)["programs"]}
  os.remove(fresh_path)
  for program in wanted:
    program.update({k: fresh[program["name"]][k] for k in _LEAST_FIELDS})
  _write(path, report)


def refresh_estimates(stage: str, size: str, chip: str, out: str) -> None:
  """Recomputes a report's memory estimates with the current gptrl/memory.py, and the resident state beside each
  program with the current plan (its plan built for the same topology; nothing compiled), so that a change of
  the estimate or of what a stage holds is checked against every compile made before."""
  path = os.path.join(out, f"{stage}_{size}_{chip}.json")
  if not os.path.exists(path):
    return
  report = _read(path)
  if "error" in report:
    return
  if report.get("overrides"):  # compiled with --config.* overrides: the config file alone is not its plan
    print(f"{path}: compiled with {' '.join(report['overrides'])}; its estimates are left as compiled",
          file=sys.stderr)
    return
  from gptrl import compile as compile_lib  # pylint: disable=import-outside-toplevel
  from gptrl import config as config_lib  # pylint: disable=import-outside-toplevel
  file, _, variant = report["config"].partition(":")
  cfg = config_lib.stage_config(config_lib.load_config_file(os.path.join(ROOT, file), variant))
  topology, _, slices = report["topology"].partition(" x ")
  target = compile_lib.tpu_topology(topology, int(slices.split()[0]) if slices else 1)
  plan = compile_lib.build_plan(cfg, target.devices)
  programs = {p.name: p for p in plan.programs}
  fields = {f.name for f in dataclasses.fields(compile_lib.Result)}
  for program in report["programs"]:
    planned = programs.get(program["name"])
    if planned is None:
      continue
    program["beside"] = compile_lib.beside_bytes(planned, plan)
    if plan.estimate is not None and planned.phase in plan.estimate.phases:
      program["estimate"] = plan.estimate.persistent_bytes + plan.estimate.phase_bytes(planned.phase)
    result = compile_lib.Result(**{k: v for k, v in program.items() if k in fields})
    program.update(total=result.total, least_total=result.least_total, fits=result.fits,
                   estimate_ratio=result.estimate_ratio)
  _write(path, report)


def row(stage: str, size: str, chip: str, report: dict | None, label: str = "") -> str:
  """The table row of a plan's report; `label` marks a report of the plan as it was (--fallback)."""
  spec = presets.CHIPS[chip]
  if report is None:
    topology = presets.topology_name(chip, _chips(stage, size, chip))
    return f"| {stage} | {size} | {chip} | {topology} | not compiled yet | | | | | | |"
  if "error" in report:
    return f"| {stage} | {size} | {chip} | - | refused: {report['error'][:160]} | | | | | | |"
  peak = max(report["programs"], key=lambda p: p["total"])
  train = _train_program(report)
  headroom = 1 - peak["total"] / (spec.hbm_gib * GIB)
  est = f"{train['estimate'] / train['total']:.2f}" if train and train.get("estimate") else "-"
  least = (f"{train['estimate'] / train['least_total']:.2f}" if train and train.get("estimate")
           and train.get("least_total") else "-")
  mfu = (f"{100 * train['projected_mfu']:.0f}-{100 * train['model_flops'] / train['matmul_flops']:.0f}%"
         if train and train.get("projected_mfu") else "-")
  ms = f"{1e3 * train['projected_seconds']:.0f}" if train and train.get("projected_seconds") else "-"
  coll = sum(v["bytes"] for v in train["collectives"].values()) / GIB if train else 0.0
  compile_s = sum(p["compile_s"] for p in report["programs"])
  return (f"| {stage} | {size} | {chip}{label} | {report['topology']} | {peak['name']}: {peak['total'] / GIB:.1f} of "
          f"{spec.hbm_gib:g} GiB ({100 * headroom:.0f}% free) | {least} | {est} | {mfu} | {ms} | {coll:.1f} | "
          f"{compile_s:.0f} |")


def _train_program(report: dict) -> dict | None:
  programs = {p["name"]: p for p in report.get("programs", [])}
  return programs.get("train step") or next((v for k, v in programs.items() if k.endswith(" update")), None)


def compare(stage: str, size: str, chip: str, out: str, suffix: str) -> str | None:
  """A row of the before/after table: the train program of `<plan>_<suffix>.json` (the plan as it was) against
  that of `<plan>.json` (as configured now), or None where either report is missing."""
  paths = [os.path.join(out, f"{stage}_{size}_{chip}{tail}.json") for tail in (f"_{suffix}", "")]
  if not all(os.path.exists(path) for path in paths):
    return None
  reports = [_read(path) for path in paths]
  before, after = (_train_program(r) for r in reports)
  if before is None or after is None:
    return None
  pair = lambda f: " → ".join(f(p) for p in (before, after))
  # (* where the report has no least-memory compile: XLA's default, which grows into free HBM)
  memory = pair(lambda p: f"{(p.get('least_total') or p['total']) / GIB:.1f}{'' if p.get('least_total') else '*'}")
  flops = pair(lambda p: f"{p['matmul_flops'] / p['model_flops']:.2f}")
  moved = pair(lambda p: f"{p['bytes_accessed'] / 1e9:.0f}")
  ms = pair(lambda p: f"{1e3 * p['projected_seconds']:.0f}")
  mfu = pair(lambda p: f"{100 * p['projected_mfu']:.0f}%")
  compile_s = pair(lambda p: f"{p['compile_s']:.0f}")
  return (f"| {stage} | {size} | {reports[1]['topology']} | {after['name']} | {memory} | {flops} | {moved} | {ms} | "
          f"{mfu} | {compile_s} |")


def _chips(stage: str, size: str, chip: str) -> int:
  return runpy.run_path(os.path.join(ROOT, f"configs/{stage}_tpu.py"))["PLANS"][size][2][chip][0]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--stages", default=",".join(STAGES))
  p.add_argument("--sizes", default=",".join(presets.MODEL_SIZES))
  p.add_argument("--chips", default="", help="only these chips (default: every chip of each size's plan row)")
  p.add_argument("--programs", default="", help="compile only these programs (gptrl.compile --programs)")
  p.add_argument("--least-memory", default="train step,PPO update",
                 help="programs also compiled for the least memory, the estimate's reference (gptrl.compile "
                      "--least_memory; '' for none)")
  p.add_argument("--add-least", action="store_true",
                 help="reports made before --least-memory: compile their train program for the least memory and "
                      "add it (no other program is compiled again)")
  p.add_argument("--refresh-estimates", action="store_true",
                 help="recompute the memory estimates of the reports in --out with the current gptrl/memory.py "
                      "(nothing is compiled)")
  p.add_argument("--render-only", action="store_true", help="compile nothing: the table of the reports in --out")
  p.add_argument("--fallback", default="",
                 help="with --render-only: a plan not compiled as configured now shows its <plan>_FALLBACK.json "
                      "(comma-separated: the first that exists), labelled (the plan as it was)")
  p.add_argument("--before", default="",
                 help="compile nothing: print the train programs of the reports <plan>_BEFORE.json against <plan>.json "
                      "(a plan change: memory, compiled flops, roofline time and MFU, before -> after)")
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/compile"))
  p.add_argument("--table", default=os.path.join(ROOT, "benchmarks/results/compile_plans.md"))
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  chosen = list(plans(args.stages.split(","), args.sizes.split(","), [c for c in args.chips.split(",") if c]))
  if args.before:
    print("| stage | size | topology | program | GiB per device (least memory) | compiled / model flops | "
          "HBM GB per step | roofline ms | MFU lower bound | compile s |\n|---|---|---|---|---|---|---|---|---|---|")
    for stage, size, chip in chosen:
      line = compare(stage, size, chip, args.out, args.before)
      if line:
        print(line)
    return
  lines = ["| stage | size | chip | topology | largest program per device | train est/XLA least memory | "
           "train est/XLA default | train MFU (roofline-compute) | roofline step ms | collectives GiB/step | "
           "compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for stage, size, chip in chosen:
    if args.add_least and args.least_memory and not args.render_only:
      add_least(stage, size, chip, args.out, args.least_memory)
    if args.refresh_estimates:
      refresh_estimates(stage, size, chip, args.out)
    report = compile_plan(stage, size, chip, args.out, args.programs, args.least_memory, args.render_only)
    label = ""
    for name in (n for n in args.fallback.split(",") if n):
      fallback = os.path.join(args.out, f"{stage}_{size}_{chip}_{name}.json")
      if report is None and os.path.exists(fallback):
        report, label = _read(fallback), f" ({name})"
    lines.append(row(stage, size, chip, report, label))
    print(lines[-1], flush=True)
  with open(args.table, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
