"""One self-contained HTML report of a pipeline run: plots (matplotlib PNGs, embedded as base64) and tables.

  python -m gptrl.report --workdir runs/pipeline_cpu                 # -> runs/pipeline_cpu/report.html
  python -m gptrl.report --workdir runs/ppo_cpu --out /tmp/ppo.html   # one stage's workdir
  python -m gptrl.report --workdir runs --out /tmp/report.html        # sub-folders found by their config.json
  python -m gptrl.report --sft runs/sft_cpu --ppo runs/ppo_cpu --out /tmp/report.html   # explicit stage folders

Sections: run summary (stages, steps, times, key numbers); the loss curves of every stage; reward-model
accuracy; PPO reward, KL and beta per iteration; reward against KL; the gold-versus-KL frontier (the labeller's
and the RM's scores against sqrt(KL) for PPO's evals and best-of-n, `<bon>/bon.json`, with Gao et al.'s fitted
curves and the fitted gold peak); the over-optimisation (Goodhart) watch: the
RM's reward and each watch judge's score (`ppo.watch_judges`) against KL; held-out prompts with the SFT policy's
and the PPO policy's replies and their scores (`<ppo>/eval_replies.jsonl`); labelling statistics. A stage or
metric that is missing is skipped with a note. The pipeline stage calls `write_report` after PPO.

What it reads from each stage folder: `metrics.jsonl` (rows `{"step": s, "<metric>": value, ...}` of
gptrl/metrics.py), `config.json`, `samples.jsonl`; label: `summary.json`, `comparisons.jsonl`,
`replies.jsonl`; ppo: `eval_replies.jsonl`; a pipeline's `pipeline_state.json` (stage times) in the parent.
Folders and --out may be gs:// URLs (gptrl/fileio.py).
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import html
import io
import json
import logging
import math
import os
import re
import sys
from typing import Any, Iterable, Sequence

import numpy as np

from gptrl import fileio
from gptrl import frontier
from gptrl import stages as stages_lib

STAGES = stages_lib.PIPELINE_ORDER
TABLE_PROMPTS = 12  # held-out prompts shown in the SFT-vs-PPO table
_JUDGE_PREFIX = "eval/judge_"
_COLORS = ("tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")  # watch judges; the RM is tab:blue


class ReportError(ValueError):
  """Nothing to report on, or a folder given explicitly does not exist; the message names the path."""


# ----------------------------------------------------------------------------------------------------------------
# Finding and reading the stage outputs.

def _read_json(path: str) -> dict[str, Any] | None:
  """The JSON object in `path`, or None if it is missing, unreadable or not an object."""
  try:
    value = json.loads(fileio.read_text(path))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return None
  return value if isinstance(value, dict) else None


def _has_outputs(folder: str) -> bool:
  return any(fileio.exists(os.path.join(folder, f)) for f in ("metrics.jsonl", "config.json", "summary.json"))


def find_stage_dirs(workdir: str | None = None, overrides: dict[str, str] | None = None) -> dict[str, str]:
  """Stage name -> folder, in pipeline order.

  `workdir` may be a pipeline workdir (sub-folders `pretrain/`, `sft/`, ...), a folder of stage workdirs with
  any names (each recognised by the `stage` in its config.json; where two share a stage, the one with the newest
  metrics.jsonl), or one stage's own workdir. `overrides` (stage -> folder) win; a folder named there must exist.
  Raises ReportError when nothing is found.
  """
  found: dict[str, str] = {}
  if workdir:
    if not fileio.isdir(workdir):
      raise ReportError(f"--workdir {workdir}: no such folder.")
    own = (_read_json(os.path.join(workdir, "config.json")) or {}).get("stage")
    if own in STAGES:
      found[own] = workdir
    else:
      newest: dict[str, float] = {}
      for name in sorted(fileio.listdir(workdir)):
        sub = os.path.join(workdir, name)
        if not fileio.isdir(sub):
          continue
        stage = name if name in STAGES else (_read_json(os.path.join(sub, "config.json")) or {}).get("stage")
        if stage not in STAGES or not _has_outputs(sub):
          continue
        mtime = fileio.getmtime(os.path.join(sub, "metrics.jsonl")) if fileio.exists(
            os.path.join(sub, "metrics.jsonl")) else 0.0
        exact = name == stage  # the pipeline's own sub-folder beats a look-alike
        if stage not in found or (exact, mtime) > (os.path.basename(found[stage]) == stage, newest[stage]):
          found[stage], newest[stage] = sub, mtime
  for stage, folder in (overrides or {}).items():
    if stage not in STAGES:
      raise ReportError(f"unknown stage {stage!r}; known: {list(STAGES)}.")
    if not fileio.isdir(folder):
      raise ReportError(f"--{stage} {folder}: no such folder.")
    found[stage] = folder
  if not found:
    raise ReportError(
        f"{workdir}: no stage outputs found. Expected a stage workdir (config.json with a 'stage' of {list(STAGES)}), "
        f"or sub-folders {', '.join(s + '/' for s in STAGES)} holding metrics.jsonl / config.json; or pass "
        f"--pretrain/--sft/--label/--reward/--ppo DIR.")
  return {s: found[s] for s in STAGES if s in found}


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the rows that hold a finite number under `key` (NaN is logged as a string)."""
  points = [(r["step"], float(r[key])) for r in rows
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and "step" in r
            and math.isfinite(float(r[key]))]
  if not points:
    return np.zeros((0,)), np.zeros((0,))
  steps, values = zip(*points)
  return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def _eval_value(steps: np.ndarray, values: np.ndarray, step: float) -> float | None:
  hit = np.nonzero(steps == step)[0]
  return float(values[hit[-1]]) if hit.size else None


class Run:
  """Everything the report reads, loaded once: per stage its folder, metrics rows and config."""

  def __init__(self, stage_dirs: dict[str, str], rounds: dict[int, dict[str, str]] | None = None):
    self.dirs = {s: d for s, d in stage_dirs.items() if d}
    # The later rounds of the loop (config.rounds): round number -> a Run of that round's stage folders.
    self.rounds = {r: Run(dirs) for r, dirs in sorted((rounds or {}).items()) if dirs}
    self.metrics = {s: fileio.read_jsonl_lenient(os.path.join(d, "metrics.jsonl")) for s, d in self.dirs.items()}
    self.configs = {s: _read_json(os.path.join(d, "config.json")) or {} for s, d in self.dirs.items()}
    # A pipeline keeps every stage in a sub-folder of its workdir, next to its record of the stage times.
    parents = {os.path.dirname(fileio.abspath(d)) for d in self.dirs.values()}
    self.pipeline_state: dict[str, Any] = {}
    if len(parents) == 1:
      self.pipeline_state = _read_json(os.path.join(parents.pop(), "pipeline_state.json")) or {}

  def rows(self, stage: str) -> list[dict[str, Any]]:
    return self.metrics.get(stage, [])

  def series(self, stage: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    return series(self.rows(stage), key)

  def keys(self, stage: str) -> set[str]:
    return {k for r in self.rows(stage) for k in r}

  def seconds(self, stage: str) -> tuple[float | None, bool]:
    """(wall seconds, exact): the pipeline's record, else config.json (written at start) to the last metrics row."""
    done = self.pipeline_state.get("done")
    done = done.get(stage) if isinstance(done, dict) else None
    if isinstance(done, dict) and isinstance(done.get("seconds"), (int, float)):
      return float(done["seconds"]), True
    folder = self.dirs[stage]
    start, end = os.path.join(folder, "config.json"), os.path.join(folder, "metrics.jsonl")
    if fileio.exists(start) and fileio.exists(end):
      return max(fileio.getmtime(end) - fileio.getmtime(start), 0.0), False
    return None, False


# ----------------------------------------------------------------------------------------------------------------
# Plots: matplotlib's object API on the Agg canvas (no pyplot, no global backend state), PNG bytes out.

def _figure(ncols: int, height: float = 3.4, width: float = 12.0):
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(width, height), layout="constrained")
  axes = fig.subplots(1, ncols, squeeze=False)[0]
  for ax in axes:
    ax.grid(True, alpha=0.3)
  return fig, list(axes)


def _png(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  return buf.getvalue()


def _line(ax, xy: tuple[np.ndarray, np.ndarray], label: str, **kwargs) -> bool:
  if not len(xy[0]):
    return False
  ax.plot(xy[0], xy[1], label=label, marker="o" if len(xy[0]) <= 12 else None, markersize=4, **kwargs)
  return True


def plot_losses(run: Run) -> tuple[bytes | None, list[str]]:
  """One panel per stage that logged a loss: train and eval (for PPO: policy and value losses)."""
  panels, notes = [], []
  for stage in ("pretrain", "sft", "reward"):
    if stage not in run.dirs:
      continue
    pair = run.series(stage, "train/loss"), run.series(stage, "eval/loss")
    if len(pair[0][0]) or len(pair[1][0]):
      panels.append((stage, [("train/loss", pair[0]), ("eval/loss", pair[1])], "step"))
    else:
      notes.append(f"{stage}: no train/loss or eval/loss in metrics.jsonl.")
  if "ppo" in run.dirs:
    pair = run.series("ppo", "ppo/policy_loss"), run.series("ppo", "ppo/value_loss")
    if len(pair[0][0]):
      panels.append(("ppo", [("ppo/policy_loss", pair[0]), ("ppo/value_loss", pair[1])], "iteration"))
    else:
      notes.append("ppo: no ppo/policy_loss in metrics.jsonl.")
  if not panels:
    return None, notes
  fig, axes = _figure(len(panels), width=max(4.0 * len(panels), 8.0))
  for ax, (stage, lines, xlabel) in zip(axes, panels):
    for label, xy in lines:
      _line(ax, xy, label)
    ax.set_title({"sft": "SFT (loss on response tokens)", "reward": "reward model (pairwise loss)",
                  "pretrain": "pretraining (next-token loss)", "ppo": "PPO (per iteration)"}[stage])
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=8)
  return _png(fig), notes


def plot_reward_model(run: Run) -> bytes | None:
  """Pairwise accuracy of the reward model on its training batches and held-out prompts, chance = 0.5."""
  train, held = run.series("reward", "train/accuracy"), run.series("reward", "eval/accuracy")
  if not len(train[0]) and not len(held[0]):
    return None
  fig, (ax,) = _figure(1, width=8.0)
  _line(ax, train, "train/accuracy (per logged step)", alpha=0.6)
  _line(ax, held, "eval/accuracy (held-out pairs)", linewidth=2)
  ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
  ax.set(xlabel="step", ylabel="pairwise accuracy", title="reward model: does it prefer the chosen reply?")
  ax.legend(fontsize=8)
  return _png(fig)


def plot_ppo(run: Run) -> bytes | None:
  """Reward, KL to the SFT policy, beta and reply length per PPO iteration (rollouts and held-out eval)."""
  if not len(run.series("ppo", "ppo/reward")[0]) and not len(run.series("ppo", "eval/reward")[0]):
    return None
  fig, axes = _figure(4, height=3.2, width=14.0)
  _line(axes[0], run.series("ppo", "ppo/reward"), "ppo/reward (rollouts)", alpha=0.7)
  _line(axes[0], run.series("ppo", "eval/reward"), "eval/reward (held-out)", linewidth=2)
  axes[0].set(title="RM reward (normalised)", xlabel="iteration")
  _line(axes[1], run.series("ppo", "ppo/kl"), "ppo/kl (rollouts)", alpha=0.7)
  _line(axes[1], run.series("ppo", "eval/kl"), "eval/kl (held-out)", linewidth=2)
  target = (run.configs.get("ppo", {}).get("ppo") or {}).get("target_kl")
  if isinstance(target, (int, float)) and target > 0:
    axes[1].axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target_kl {target:g}")
  axes[1].set(title="KL to the SFT policy (nats / reply)", xlabel="iteration")
  _line(axes[2], run.series("ppo", "ppo/beta"), "ppo/beta")
  axes[2].set(title="KL coefficient beta", xlabel="iteration")
  _line(axes[3], run.series("ppo", "ppo/length"), "ppo/length (rollouts)", alpha=0.7)
  _line(axes[3], run.series("ppo", "eval/length"), "eval/length (held-out)", linewidth=2)
  cap = (run.configs.get("ppo", {}).get("ppo") or {}).get("max_new_tokens")
  if isinstance(cap, int) and cap > 0:  # replies at the cap were cut off: longer is one way to please a judge
    axes[3].axhline(cap, color="grey", linestyle="--", linewidth=1, label=f"max_new_tokens {cap}")
  axes[3].set(title="reply length (tokens)", xlabel="iteration")
  for ax in axes:
    ax.legend(fontsize=8)
  return _png(fig)


def plot_reward_vs_kl(run: Run) -> bytes | None:
  """Each iteration's rollout reward against its KL, coloured by iteration; the held-out evals as a path."""
  it, kl = run.series("ppo", "ppo/kl")
  it_r, reward = run.series("ppo", "ppo/reward")
  eval_kl, eval_reward = run.series("ppo", "eval/kl"), run.series("ppo", "eval/reward")
  rollouts = len(it) > 0 and np.array_equal(it, it_r)
  if not rollouts and not len(eval_kl[0]):
    return None
  fig, (ax,) = _figure(1, height=4.2, width=8.0)
  if rollouts:
    points = ax.scatter(kl, reward, c=it, cmap="viridis", s=22, label="rollouts")
    fig.colorbar(points, ax=ax, label="iteration")
  _eval_path(ax, eval_kl, eval_reward, "eval (held-out), step labelled", "tab:red")
  ax.set(xlabel="KL to the SFT policy (nats / reply)", ylabel="RM reward (normalised)",
         title="reward bought with KL")
  ax.legend(fontsize=8)
  return _png(fig)


def _eval_path(ax, kl: tuple[np.ndarray, np.ndarray], value: tuple[np.ndarray, np.ndarray], label: str,
               color: str) -> bool:
  """Plots value against KL at the eval steps both were logged at, connected in step order, steps annotated."""
  steps = [s for s in value[0] if s in set(kl[0].tolist())]
  if not steps:
    return False
  x = [_eval_value(*kl, s) for s in steps]
  y = [_eval_value(*value, s) for s in steps]
  ax.plot(x, y, color=color, marker="o", linewidth=1.5, label=label)
  ax.margins(0.08)  # room for the step labels at the edges
  for s, xi, yi in zip(steps, x, y):
    ax.annotate(f"{int(s)}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
  return True


def watch_judges(run: Run) -> list[str]:
  """The watch judges' names logged by PPO (`eval/judge_<name>`, without the `_std` companions)."""
  return sorted(k[len(_JUDGE_PREFIX):] for k in run.keys("ppo") if k.startswith(_JUDGE_PREFIX)
                and not k.endswith("_std"))


def plot_goodhart(run: Run) -> bytes | None:
  """Left: the RM's reward (left axis) and each watch judge's mean score (right axis) against eval KL. Right:
  the same, as the change since the first eval in units of that eval's spread across prompts, on one axis."""
  names = watch_judges(run)
  kl, rm = run.series("ppo", "eval/kl"), run.series("ppo", "eval/reward")
  if not names or not len(kl[0]) or not len(rm[0]):
    return None
  fig, (ax, ax_gain) = _figure(2, height=4.2, width=13.0)
  _eval_path(ax, kl, rm, "RM reward (eval/reward)", "tab:blue")
  ax.set(xlabel="KL to the SFT policy (nats / reply)", title="RM reward and watch judges against KL")
  ax.set_ylabel("RM reward (normalised)", color="tab:blue")
  twin = ax.twinx()
  handles = ax.get_legend_handles_labels()
  for name, color in zip(names, _COLORS):
    _eval_path(twin, kl, run.series("ppo", _JUDGE_PREFIX + name), f"judge {name} (eval/judge_{name})", color)
  twin.set_ylabel("watch judge score", color=_COLORS[0])
  twin_handles = twin.get_legend_handles_labels()
  ax.legend(handles[0] + twin_handles[0], handles[1] + twin_handles[1], fontsize=8, loc="best")

  for key, name, color in [("eval/reward", "RM reward", "tab:blue")] + [
      (_JUDGE_PREFIX + n, f"judge {n}", c) for n, c in zip(names, _COLORS)]:
    value = run.series("ppo", key)
    spread = _eval_value(*run.series("ppo", key + "_std"), value[0][0]) if len(value[0]) else None
    if not spread:  # no spread logged at the first eval (or all replies scored alike): no unit to measure in
      continue
    _eval_path(ax_gain, kl, (value[0], (value[1] - value[1][0]) / spread), name, color)
  ax_gain.axhline(0.0, color="grey", linewidth=1)
  ax_gain.set(xlabel="KL to the SFT policy (nats / reply)", ylabel="change since the first eval (first-eval std)",
              title="the same on one scale: gain in units of the SFT replies' spread")
  ax_gain.legend(fontsize=8)
  return _png(fig)


@dataclasses.dataclass
class FrontierPoints:
  """Scores against d = sqrt(KL to the SFT policy): best-of-n's rows and PPO's held-out evals (step 0 = SFT)."""
  gold_judge: str | None
  bon_d: np.ndarray
  bon: dict[str, np.ndarray]  # "gold", "proxy" -> [rows]
  ppo_steps: np.ndarray
  ppo_d: np.ndarray
  ppo: dict[str, np.ndarray]
  # The other policy optimisers' evals on the same prompts: method name -> (steps, d, scores).
  others: dict[str, tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]] = dataclasses.field(default_factory=dict)

  def methods(self) -> list[tuple[str, str, np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
    """(method, fitted form, steps, d, scores) of every method with points: best-of-n, PPO, then the others."""
    out = [("best-of-n", "bon", np.zeros(0), self.bon_d, self.bon), ("PPO", "rl", self.ppo_steps, self.ppo_d, self.ppo)]
    out += [(name, "rl", steps, d, scores) for name, (steps, d, scores) in self.others.items()]
    return [m for m in out if m[4]]

  def fits(self) -> dict[tuple[str, str], "frontier.Fit"]:
    """(method, score) -> the fitted gain curve (Gao et al.: bon d(a - b d), rl d(a - b log d)) of score minus
    the method's own start; a method or score with fewer than two points away from d = 0 has none."""
    out = {}
    for method, form, _, d, scores in self.methods():
      for score, values in scores.items():
        if len(values) and int(np.sum(d > 0)) >= 2:
          out[(method, score)] = frontier.fit(form, d, values - values[0])
    return out


# The policy optimisers placed on the frontier next to PPO (stage -> the name shown).
OTHER_POLICY_METHODS = {"grpo": "GRPO", "rloo": "RLOO", "rsft": "RS-FT", "dpo": "DPO"}


def policy_evals(run: Run, stage: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  """(steps, d = sqrt(eval/kl), {"proxy", "gold"}) of a policy stage's held-out evals, at the steps where all were
  logged; empty without eval/kl."""
  steps, d, scores = np.zeros(0), np.zeros(0), {}
  if stage not in run.dirs:
    return steps, d, scores
  kl_steps, kl = run.series(stage, "eval/kl")
  logged = run.keys(stage)
  keys = {"proxy": "eval/proxy" if "eval/proxy" in logged else "eval/reward", "gold": "eval/gold"}
  series = {name: run.series(stage, key) for name, key in keys.items() if key in logged}
  common_steps = [s for s in kl_steps if all(s in set(steps_of.tolist()) for steps_of, _ in series.values())]
  if common_steps:
    steps = np.array(common_steps, np.float64)
    d = np.sqrt(np.maximum([_eval_value(kl_steps, kl, s) for s in common_steps], 0.0))
    scores = {name: np.array([_eval_value(*xy, s) for s in common_steps], np.float64) for name, xy in series.items()}
  return steps, d, scores


def frontier_points(run: Run) -> FrontierPoints | None:
  """What the gold-versus-KL figure plots, or None without a best-of-n table and PPO evals."""
  table = _read_json(os.path.join(run.dirs["bon"], "bon.json")) if "bon" in run.dirs else None
  gold_judge = (table or {}).get("gold_judge")
  bon_d, bon = np.zeros(0), {}
  if table and table.get("rows"):
    rows = table["rows"]
    bon_d = np.sqrt(np.array([r["kl"] for r in rows], np.float64))
    bon = {k: np.array([r[k] for r in rows], np.float64) for k in ("gold", "proxy") if all(k in r for r in rows)}
  steps, d, ppo = policy_evals(run, "ppo")
  others = {name: policy_evals(run, stage) for stage, name in OTHER_POLICY_METHODS.items()}
  others = {name: evals for name, evals in others.items() if evals[2]}
  if not bon and not ppo and not others:
    return None
  return FrontierPoints(gold_judge, bon_d, bon, steps, d, ppo, others)


def plot_frontier(points: FrontierPoints, fits: dict[tuple[str, str], frontier.Fit]) -> bytes:
  """Gold (left) and proxy (right) against sqrt(KL): best-of-n and PPO's evals, their fitted curves (`fits`, from
  `points.fits()`), the fitted gold peak of the PPO curve marked."""
  methods = points.methods()
  scores = [s for s in ("gold", "proxy") if any(s in m[4] for m in methods)]
  colors = {"best-of-n": "tab:green", "PPO": "tab:blue", "GRPO": "tab:orange", "RLOO": "tab:purple",
            "DPO": "tab:red", "RS-FT": "tab:olive"}
  fig, axes = _figure(len(scores), height=4.2, width=6.5 * len(scores))
  for ax, score in zip(axes, scores):
    for method, _, steps, d, method_scores in methods:
      values, color = method_scores.get(score), colors.get(method, "tab:brown")
      if values is None or not len(values):
        continue
      ax.plot(d, values, "o", color=color, label=f"{method}", markersize=5)
      for s, x, y in zip(steps, d, values):  # the policy optimisers' evals, by step
        ax.annotate(f"{int(s)}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
      fit = fits.get((method, score))
      if fit is not None:
        grid = np.linspace(0.0, max(float(d.max()) * 1.15, 1e-3), 100)
        ax.plot(grid, values[0] + fit(grid), "--", color=color, linewidth=1,
                label=f"{method} fit: d({fit.alpha:.3g} {'-' if fit.beta >= 0 else '+'} {abs(fit.beta):.3g}"
                      f"{' d' if fit.form == 'bon' else ' log d'})")
        peak = fit.peak()
        if method == "PPO" and score == "gold" and peak is not None and peak[0] <= 3 * float(d.max()):
          ax.axvline(peak[0], color=color, linestyle=":", linewidth=1)
          ax.annotate(f"fitted peak, KL {peak[0] ** 2:.2f}", (peak[0], values[0] + peak[1]), fontsize=7,
                      color=color, textcoords="offset points", xytext=(4, -12))
    who = f" ({points.gold_judge})" if score == "gold" and points.gold_judge else ""
    ax.set(xlabel="sqrt(KL to the SFT policy)  [sqrt(nats)]", ylabel=f"{score} score{who}",
           title=f"{score}{who} against sqrt(KL)")
    ax.legend(fontsize=7)
  return _png(fig)


def plot_ensemble_bon(by_reduce: dict[str, list[dict[str, float]]], penalty: float) -> bytes:
  """A reward-model ensemble's best-of-n with each reduction picking: gold (left) and the members' plain mean
  (right) against sqrt(KL), so a penalty that trades proxy for gold shows as a higher gold curve."""
  scores = [s for s in ("gold", "proxy_mean") if all(s in r for rows in by_reduce.values() for r in rows)]
  fig, axes = _figure(max(len(scores), 1), height=3.8, width=6.0 * max(len(scores), 1))
  for ax, score in zip(axes, scores):
    for (reduce, rows), color in zip(sorted(by_reduce.items()), ("tab:green", "tab:purple", "tab:red")):
      label = f"mean - {penalty:g} std" if reduce == "mean_minus_std" else reduce
      ax.plot(np.sqrt([r["kl"] for r in rows]), [r[score] for r in rows], "o-", color=color, markersize=4,
              label=f"picked by {label}")
    ax.set(xlabel="sqrt(KL to the SFT policy)  [sqrt(nats)]",
           ylabel="gold score" if score == "gold" else "members' mean reward (no penalty)",
           title=f"best-of-n by ensemble reduction: {'gold' if score == 'gold' else 'unpenalised proxy'}")
    ax.legend(fontsize=7)
  return _png(fig)


def plot_labels(replies: list[dict[str, Any]], comparisons: list[dict[str, Any]], min_gap: float | None,
                judge: str = "judge") -> bytes:
  """Histograms of every reply's judge score and of the kept pairs' score gaps."""
  scores = [float(s) for r in replies for s in r.get("scores", []) if isinstance(s, (int, float))]
  gaps = [float(c["margin"]) for c in comparisons if isinstance(c.get("margin"), (int, float))]
  fig, axes = _figure(2, height=3.2, width=11.0)
  if scores:
    axes[0].hist(scores, bins=40, color="tab:blue")
  axes[0].set(title=f"{judge} score of every sampled reply ({len(scores)})", xlabel="score", ylabel="replies")
  if gaps:
    axes[1].hist(gaps, bins=40, color="tab:green")
  if min_gap is not None:
    axes[1].axvline(min_gap, color="grey", linestyle="--", label=f"min_gap {min_gap:g}")
    axes[1].legend(fontsize=8)
  axes[1].set(title=f"score gap of the kept pairs ({len(gaps)})", xlabel="chosen - rejected", ylabel="pairs")
  return _png(fig)


# ----------------------------------------------------------------------------------------------------------------
# HTML.

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # not allowed in HTML; a small model samples them


def _esc(value: Any) -> str:
  return html.escape(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value)), quote=True)


def _fmt(value: Any, digits: int = 3) -> str:
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return _esc(value)


def _img(png: bytes, alt: str) -> str:
  return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _note(text: str) -> str:
  return f'<p class="note">{_esc(text)}</p>'


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
  """A table whose header is escaped here and whose cells are already-escaped HTML."""
  head = "".join(f"<th>{_esc(h)}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
  return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _first_last(run: Run, stage: str, key: str, digits: int = 3) -> str:
  steps, values = run.series(stage, key)
  if not len(steps):
    return ""
  if len(steps) == 1:
    return f"{key} {values[0]:.{digits}f} (step {int(steps[0])})"
  return f"{key} {values[0]:.{digits}f} → {values[-1]:.{digits}f} (steps {int(steps[0])} → {int(steps[-1])})"


def section_summary(run: Run) -> str:
  rows = []
  for stage in STAGES:
    if stage not in run.dirs:
      rows.append([_esc(stage), '<span class="note">not in this report</span>', "", "", ""])
      continue
    steps = [r["step"] for r in run.rows(stage) if isinstance(r.get("step"), int)]
    seconds, exact = run.seconds(stage)
    when = "" if seconds is None else f"{'' if exact else '≈ '}{seconds / 60:.1f} min"
    numbers = []
    if stage in ("pretrain", "sft"):
      numbers = [_first_last(run, stage, "eval/loss"), _first_last(run, stage, "train/loss")]
    elif stage == "reward":
      numbers = [_first_last(run, stage, "eval/accuracy"), _first_last(run, stage, "eval/loss"),
                 _first_last(run, stage, "final/reward_offset")]
    elif stage == "label":
      summary = _read_json(os.path.join(run.dirs[stage], "summary.json")) or {}
      numbers = [", ".join(f"{k} {summary[k]}" for k in ("prompts", "replies_per_prompt", "pairs", "judge", "min_gap")
                           if k in summary)]
    elif stage == "ppo":
      numbers = [_first_last(run, stage, "eval/reward"), _first_last(run, stage, "eval/kl")] + [
          _first_last(run, stage, _JUDGE_PREFIX + n) for n in watch_judges(run)]
    numbers = [n for n in numbers if n] or ["no metrics logged"]
    rows.append([_esc(stage), f"<code>{_esc(run.dirs[stage])}</code>", _esc(max(steps) if steps else "-"),
                 _esc(when), "<br>".join(_esc(n) for n in numbers)])
  times = ("Times come from the pipeline's pipeline_state.json." if run.pipeline_state.get("done") else
           "≈ times: from config.json being written to the last metrics row (a resumed run counts its pause too).")
  return _table(["stage", "folder", "last step", "wall time", "key numbers (first → last)"], rows) + _note(times)


def section_agreement(run: Run) -> str:
  """Labeller agreement (gptrl.agreement) over the reward stage's comparisons, when two or more labellers
  compared some prompts alike."""
  sources = ((run.configs.get("reward") or {}).get("data") or {}).get("sources") or []
  if not sources:
    return ""
  from gptrl import agreement  # pylint: disable=import-outside-toplevel
  try:
    result = agreement.of_sources(list(sources))
  except Exception as e:  # pylint: disable=broad-except
    return _note(f"Labeller agreement over the reward model's comparisons: not measured ({type(e).__name__}: {e}).")
  if not result.pairs:
    return _note(f"Labeller agreement: the reward model's comparisons come from {len(result.labellers)} labeller(s) "
                 "with no prompt compared by two of them.")
  rows = [[_esc(name), _esc(units), _esc(result.per_labeller.get(name, (0, 0))[0]),
           _esc(f"{result.per_labeller[name][1]:.3f}" if name in result.per_labeller else "-")]
          for name, units in result.labellers.items()]
  alpha = "-" if result.alpha is None else f"{result.alpha:.3f}"
  dropped = _dropped_labellers(run)
  return ("<h3>Labeller agreement (the reward model's comparisons)</h3>"
          + _table(["labeller", "reply pairs judged", "compared with another's", "agreement"], rows)
          + _note(f"{result.shared_units} reply pairs judged by two or more labellers: pairwise agreement "
                  f"{result.overall[1]:.3f} over {result.overall[0]} comparisons, Krippendorff's alpha (nominal) "
                  f"{alpha}." + (f" Left out by data.min_agreement: {', '.join(sorted(dropped))}." if dropped else "")))


def _dropped_labellers(run: Run) -> dict[str, float]:
  """The reward model's "labellers_dropped" (its newest checkpoint's meta); {} if none are recorded."""
  if "reward" not in run.dirs:
    return {}
  from gptrl import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  found = ckpt_lib.newest_meta(os.path.join(run.dirs["reward"], "checkpoints"))
  return (found[1].get("labellers_dropped") if found else None) or {}


def section_label(run: Run) -> str:
  if "label" not in run.dirs:
    return _note("No labelling stage in this report.") + section_agreement(run)
  folder = run.dirs["label"]
  summary = _read_json(os.path.join(folder, "summary.json")) or {}
  replies = fileio.read_jsonl_lenient(os.path.join(folder, "replies.jsonl"))
  comparisons = fileio.read_jsonl_lenient(os.path.join(folder, "comparisons.jsonl"))
  if not summary and not replies and not comparisons:
    return _note(f"{folder}: no summary.json, replies.jsonl or comparisons.jsonl yet.")
  k = summary.get("replies_per_prompt") or (max((len(r.get("responses", [])) for r in replies), default=0))
  prompts = summary.get("prompts") or len(replies)
  possible = prompts * k * (k - 1) // 2 if prompts and k else 0
  gaps = np.asarray([c["margin"] for c in comparisons if isinstance(c.get("margin"), (int, float))], np.float64)
  empty = sum(1 for r in replies for t in r.get("responses", []) if not str(t).strip())
  kept = len(comparisons) or summary.get("pairs", 0)
  share = f" ({kept / possible:.0%})" if possible else ""
  rows = [["judge", _esc(summary.get("judge", "?"))], ["min_gap", _esc(summary.get("min_gap", "?"))],
          ["prompts × replies", _esc(f"{prompts} × {k}")],
          ["pairs kept / possible", _esc(f"{kept} / {possible}{share}")],
          ["empty replies", _esc(empty)]]
  if gaps.size:
    rows.append(["score gap of kept pairs", _esc(f"mean {gaps.mean():.3f}, median {np.median(gaps):.3f}, "
                                                 f"min {gaps.min():.3f}, max {gaps.max():.3f}")])
  for key, label in (("label/finished_share", "replies that ended with <|end|>"),
                     ("label/reply_words", "words per reply")):
    values = run.series("label", key)[1]
    if values.size:
      rows.append([_esc(label), _esc(f"{values.mean():.3f} (mean over {values.size} chunks)")])
  out = _table(["", ""], rows, cls="narrow")
  if replies or comparisons:
    min_gap = summary.get("min_gap")
    out += _img(plot_labels(replies, comparisons, min_gap if isinstance(min_gap, (int, float)) else None,
                            str(summary.get("judge", "judge"))), "label score histograms")
  return out + section_agreement(run)


def _scores_cell(record: dict[str, Any] | None, judges: Sequence[str]) -> str:
  if record is None:
    return ""
  parts = [f"RM {record['reward']:+.3f}" if isinstance(record.get("reward"), (int, float)) else "RM ?"]
  if isinstance(record.get("gold"), (int, float)):
    parts.append(f"gold {record['gold']:+.3f}")
  parts += [f"{n} {record['judges'][n]:+.3f}" for n in judges if n in (record.get("judges") or {})]
  return "<br>".join(_esc(p) for p in parts)


def _eval_replies(ppo_folder: str) -> list[dict[str, Any]]:
  """The PPO stage's per-eval reply records (gptrl/stages/ppo.py append_eval_replies), oldest first."""
  rows = fileio.read_jsonl_lenient(os.path.join(ppo_folder, "eval_replies.jsonl"))
  return [e for e in rows if isinstance(e.get("replies"), list)]


def _agreement(evals: list[dict[str, Any]], names: Sequence[str]) -> list[list[str]]:
  """Per watch judge: the Pearson correlation of RM reward and judge score across the held-out replies at the first
  and the last eval (agreement that falls as the RM's reward rises is another sign of gaming)."""
  rows = []
  for name in names:
    cells = []
    for e in (evals[0], evals[-1]):
      pairs = [(r["reward"], r["judges"][name]) for r in e["replies"]
               if isinstance(r.get("reward"), (int, float)) and name in (r.get("judges") or {})]
      x, y = np.asarray(pairs, np.float64).reshape(-1, 2).T
      r = float(np.corrcoef(x, y)[0, 1]) if len(x) > 2 and x.std() > 0 and y.std() > 0 else float("nan")
      cells.append(f"{r:+.2f} (step {e.get('step')}, {len(x)} replies)" if math.isfinite(r) else
                   f"n/a (step {e.get('step')})")
    rows.append([_esc(f"RM reward vs judge {name}")] + [_esc(c) for c in cells])
  return rows


def section_replies(run: Run) -> str:
  if "ppo" not in run.dirs:
    return _note("No PPO stage in this report.")
  folder = run.dirs["ppo"]
  evals = _eval_replies(folder)
  if len(evals) < 2:
    return _note(f"{folder}: fewer than two evals of held-out replies logged; nothing to compare yet.")
  first, last = evals[0], evals[-1]
  judges = sorted({n for e in (first, last) for r in e["replies"] for n in (r.get("judges") or {})})
  by_index = {r.get("prompt_index"): r for r in last["replies"]}
  bon_picks, bon_label = _bon_picks(run)
  shown = first["replies"][:TABLE_PROMPTS]
  rows = []
  for rec in shown:
    after = by_index.get(rec.get("prompt_index"))
    turns = "".join(f'<div class="{_esc(m.get("role", ""))}"><b>{_esc(m.get("role", ""))}</b> '
                    f'{_esc(m.get("content", ""))}</div>' for m in rec.get("messages") or [])
    row = [_esc(rec.get("prompt_index")), turns or '<span class="note">(prompt not stored)</span>',
           _esc(rec.get("reply", "")), _scores_cell(rec, judges),
           _esc(after.get("reply", "")) if after else "", _scores_cell(after, judges)]
    if bon_picks:
      pick = bon_picks.get(json.dumps(rec.get("messages") or []))
      row += [_esc(pick.get("reply", "")) if pick else "", _scores_cell(pick, judges)]
    rows.append(row)
  label = "SFT policy" if first.get("step") == 0 else "policy"
  header = ["#", "held-out prompt", f"{label} (step {first.get('step')})", "scores",
            f"PPO policy (step {last.get('step')})", "scores"] + ([bon_label, "scores"] if bon_picks else [])
  means = []
  for e in (first, last):
    rewards = [r["reward"] for r in e["replies"] if isinstance(r.get("reward"), (int, float))]
    parts = [f"RM {np.mean(rewards):+.3f}" if rewards else ""] + [
        f"{n} {np.mean([r['judges'][n] for r in e['replies'] if n in (r.get('judges') or {})]):+.3f}"
        for n in judges]
    means.append(f"step {e.get('step')}: mean over {len(e['replies'])} prompts: " + ", ".join(p for p in parts if p))
  return (_note(" | ".join(means)) + _table(header, rows, cls="replies") +
          _note(f"The first {len(shown)} of {len(first['replies'])} held-out prompts; every eval samples with the "
                "same key, so a change is the policy's. RM = the reward model's normalised reward."))


def _bon_picks(run: Run) -> tuple[dict[str, dict[str, Any]], str]:
  """({prompt messages as JSON: the best-of-n stage's pick, in eval-reply form}, column title) from
  `<bon>/bon_replies.jsonl`; empty without a best-of-n stage."""
  if "bon" not in run.dirs:
    return {}, ""
  picks, label = {}, ""
  for record in fileio.read_jsonl_lenient(os.path.join(run.dirs["bon"], "bon_replies.jsonl")):
    key = next((k for k in record if k.startswith("best_of_")), None)
    if key is None or not isinstance(record.get(key), dict):
      continue
    pick = record[key]
    label = f"best-of-{key[len('best_of_'):]} by the RM"
    picks[json.dumps(record.get("messages") or [])] = {
        "reply": pick.get("reply", ""), "reward": pick.get("proxy"), "gold": pick.get("gold"),
        "judges": {k[len("judge_"):]: v for k, v in pick.items() if k.startswith("judge_")}}
  return picks, label


def section_goodhart(run: Run) -> str:
  if "ppo" not in run.dirs:
    return _note("No PPO stage in this report.")
  names = watch_judges(run)
  if not names:
    return _note("No watch judge was configured for this PPO run (config.ppo.watch_judges, e.g. ('textblob',)): "
                 "only the reward model's own view is available above.")
  label_judge = (_read_json(os.path.join(run.dirs["label"], "summary.json")) or {}).get("judge") if (
      "label" in run.dirs) else None
  out = ""
  if label_judge in names:
    out += _note(f"Warning: {label_judge!r} is also the judge that labelled the comparisons the reward model learnt "
                 "from, so it is not an independent watch.")
  png = plot_goodhart(run)
  if png is None:
    return out + _note("The watch judges' scores or eval/kl are missing from metrics.jsonl.")
  rows = []
  for key in ["eval/reward"] + [_JUDGE_PREFIX + n for n in names]:
    steps, values = run.series("ppo", key)
    if len(values):
      best = int(np.argmax(values))
      rows.append([_esc(key), _esc(f"{values[0]:+.3f}"), _esc(f"{values[-1]:+.3f}"),
                   _esc(f"{values[best]:+.3f} at step {int(steps[best])}")])
  explain = _note("The policy is trained on the reward model (RM) only. A watch judge it never saw scores the same "
                  "held-out replies: while both rise, the RM's gains are real by the judge's measure; when the RM "
                  "keeps rising and a judge flattens or falls, the policy is exploiting the RM (Goodhart).")
  out += explain + _img(png, "Goodhart watch") + _table(["metric", "first eval", "last eval", "best"], rows,
                                                       cls="narrow")
  evals = _eval_replies(run.dirs["ppo"])
  if len(evals) >= 2:
    out += _table(["correlation across held-out replies", "first eval", "last eval"], _agreement(evals, names),
                  cls="narrow")
  return out


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1320px;
       color: #222; padding: 0 16px; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 36px; }
nav a { margin-right: 14px; } .note { color: #666; font-size: 0.9em; }
img { max-width: 100%; display: block; margin: 8px 0; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.9em; width: 100%; }
table.narrow { width: auto; }
th, td { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f4f4f4; } td { white-space: pre-wrap; }
table.replies td:nth-child(2) { width: 26%; }
table.replies td:nth-child(3), table.replies td:nth-child(5) { width: 24%; }
table.replies td:nth-child(4), table.replies td:nth-child(6) { white-space: nowrap; font-family: monospace; }
.system { color: #777; font-size: 0.85em; } code { font-size: 0.9em; }
"""

def method_table(points: FrontierPoints) -> str:
  """Each method's final point (best-of-n: its largest n; the others: their last eval): KL, gold and proxy gains
  over their start, and the gold gain per nat of KL; and which method gains the most gold per nat."""
  rows, per_nat = [], {}
  for method, _, steps, d, scores in points.methods():
    if len(d) < 2 or d[-1] <= 0:
      continue
    kl = float(d[-1]) ** 2
    gain = {s: float(v[-1] - v[0]) for s, v in scores.items()}
    if "gold" in gain:
      per_nat[method] = gain["gold"] / kl
    where = "largest n" if method == "best-of-n" else f"step {int(steps[-1])}"
    rows.append([_esc(method), where, _fmt(kl), _fmt(gain.get("gold", "-")), _fmt(gain.get("proxy", "-")),
                 _fmt(per_nat.get(method, "-"), 4)])
  if len(rows) < 2:
    return ""
  out = _table(["method", "point", "KL (nats)", "gold gain", "proxy gain", "gold gain per nat"], rows, cls="narrow")
  if per_nat:
    best = max(per_nat, key=per_nat.get)
    out += _note(f"Most gold per nat of KL at its final point: {best} ({per_nat[best]:+.4f} per nat). Points at "
                 "different KL are not on one footing (the frontier bends): compare the curves above at equal KL.")
  return out


def section_frontier(run: Run) -> str:
  points = frontier_points(run)
  if points is None:
    return _note("No best-of-n table (bon/bon.json) and no policy evals with eval/kl (PPO, GRPO, RLOO, DPO): "
                 "nothing to place on the frontier.")
  out = _note("Gao et al. (2022): the labeller's (gold) and the reward model's (proxy) scores of the same held-out "
              "prompts' replies against d = sqrt(KL to the SFT policy). Best-of-n picks the RM's favourite of n SFT "
              "samples (unbiased over subsets, KL(n) = log n - (n-1)/n); PPO's points (and GRPO's, RLOO's, RS-FT's, "
              "DPO's when they ran) are its evals, labelled by iteration or step. Curves: the published forms fitted "
              "to each method's gain over its own start.")
  if not any("gold" in scores for *_, scores in points.methods()):
    out += _note("No gold judge: the comparisons were labelled by people (or by several judges), so there is no "
                 "labeller to score replies with; only the proxy is shown (and the watch judges in the next section).")
  fits = points.fits()
  out += _img(plot_frontier(points, fits), "gold and proxy against sqrt(KL)")
  rows = []
  for (method, score), fit in sorted(fits.items()):
    info = fit.as_dict()
    rows.append([_esc(method), _esc(score), _fmt(fit.alpha), _fmt(fit.beta), _fmt(fit.rmse, 4), str(fit.points),
                 _fmt(info["peak_kl"]) if info["peak_kl"] is not None else "no peak",
                 _fmt(info["peak_gain"]) if info["peak_gain"] is not None else "-"])
  if rows:
    out += _table(["method", "score", "alpha", "beta", "rmse", "points", "peak KL (nats)", "gain at peak"], rows,
                  cls="narrow")
  out += method_table(points)
  rl_gold = fits.get(("PPO", "gold"))
  if rl_gold is not None:
    out += f"<p>{_esc(frontier.peak_verdict(rl_gold, float(points.ppo_d[-1])))}</p>"
  if len(points.ppo_d) and len(points.bon_d) and "gold" in points.ppo and "gold" in points.bon:
    last_gain = points.ppo["gold"][-1] - points.ppo["gold"][0]
    bon_gain = np.interp(points.ppo_d[-1], points.bon_d, points.bon["gold"] - points.bon["gold"][0])
    within = points.ppo_d[-1] <= points.bon_d[-1]
    out += _note(f"At PPO's last eval (KL {points.ppo_d[-1] ** 2:.2f} nats) its gold gain is {last_gain:+.3f}; "
                 + (f"best-of-n reaches {bon_gain:+.3f} at the same KL." if within else
                    f"best-of-n's largest n reaches KL {points.bon_d[-1] ** 2:.2f} only, with a gain of "
                    f"{points.bon['gold'][-1] - points.bon['gold'][0]:+.3f}."))
  table = _read_json(os.path.join(run.dirs["bon"], "bon.json")) if "bon" in run.dirs else None
  if table and table.get("by_reduce"):
    readout = table.get("reward_readout", {})
    penalty = float(readout.get("penalty", 1.0))
    out += _note(f"The reward model is an ensemble of {len(readout.get('offsets', []))} members; PPO and the points "
                 f"above read it as {readout.get('reduce', 'mean')!r}. Below, best-of-n on the same samples with "
                 "each reduction picking: with and without the penalty for the members' disagreement.")
    out += _img(plot_ensemble_bon(table["by_reduce"], penalty), "best-of-n by ensemble reduction")
    rows = []
    for reduce, bon_rows in sorted(table["by_reduce"].items()):
      last = bon_rows[-1]
      rows.append([_esc(reduce), str(last["n"]), _fmt(last["kl"]), _fmt(last.get("gold", "-")),
                   _fmt(last.get("proxy_mean", "-")), _fmt(last.get("ensemble_std", "-"))])
    out += _table(["picked by", "n", "KL (nats)", "gold", "members' mean", "members' std"], rows, cls="narrow")
  return out


def section_losses(run: Run) -> str:
  png, notes = plot_losses(run)
  return "".join(_note(n) for n in notes) + (_img(png, "loss curves") if png else
                                             _note("No stage with a loss in this report."))


def section_reward_model(run: Run) -> str:
  png = plot_reward_model(run) if "reward" in run.dirs else None
  if not png:
    return _note("No reward-model stage with train/accuracy or eval/accuracy in this report.")
  out = _img(png, "reward model accuracy")
  evals = [r for r in run.rows("reward") if "eval/pair_accuracy" in r]
  if evals:
    last = evals[-1]
    buckets = sorted((k[len("eval/accuracy_gap/"):], v) for k, v in last.items() if k.startswith("eval/accuracy_gap/"))
    rows = [["all held-out pairs", _fmt(last["eval/pair_accuracy"]), _fmt(last.get("eval/pairs"), 0)]]
    rows += [[f"labeller's gap {name}", _fmt(value), _fmt(last.get(f"eval/pairs_gap/{name}"), 0)]
             for name, value in sorted(buckets, key=lambda b: float(b[0].split("-")[0]))]
    out += _note(f"Agreement with the labeller at step {last.get('step')}, each held-out pair once, by the "
                 "labeller's score gap (the record's margin): an RM should agree most where the labeller's "
                 "preference is clearest.")
    out += _table(["held-out pairs", "RM agrees with the labeller", "pairs"], rows, cls="narrow")
  return out


def section_ppo(run: Run) -> str:
  png = plot_ppo(run) if "ppo" in run.dirs else None
  return _img(png, "PPO per iteration") if png else _note("No PPO stage with ppo/* or eval/* metrics.")


def section_reward_vs_kl(run: Run) -> str:
  png = plot_reward_vs_kl(run) if "ppo" in run.dirs else None
  return _img(png, "reward against KL") if png else _note("No PPO reward and KL to plot.")


def round_policy(run: Run) -> str | None:
  """The policy stage a round trained (the first of the policy optimisers present)."""
  return next((s for s in stages_lib.POLICY_RL if s in run.dirs), None)


def round_rows(run: Run) -> list[dict[str, Any]]:
  """Per round (1, 2, ...): its policy's first and final held-out eval (gold, proxy, KL to that round's SFT model),
  the reward model's and SFT's final eval numbers, and the feedback the round learned from."""
  out = []
  for r, rr in [(1, run)] + list(run.rounds.items()):
    policy = round_policy(rr)
    row: dict[str, Any] = {"round": r, "policy": policy}
    if policy:
      steps, d, scores = policy_evals(rr, policy)
      if len(steps):
        row.update(first_step=int(steps[0]), last_step=int(steps[-1]), kl=float(d[-1] ** 2),
                   gold_first=float(scores["gold"][0]) if "gold" in scores else None,
                   gold=float(scores["gold"][-1]) if "gold" in scores else None,
                   proxy=float(scores["proxy"][-1]) if "proxy" in scores else None)
    for stage, key, name in (("sft", "eval/loss", "sft_loss"), ("reward", "eval/accuracy", "rm_accuracy")):
      steps, values = rr.series(stage, key)
      row[name] = float(values[-1]) if len(values) else None
    if "feedback" in rr.dirs:
      summary = _read_json(os.path.join(rr.dirs["feedback"], "summary.json")) or {}
      row["feedback"] = summary.get("records") or {}
      row["served_gold"] = summary.get("mean_judge_score_of_first_replies")
    out.append(row)
  return out


def plot_rounds(run: Run, rows: list[dict[str, Any]]) -> bytes | None:
  """Each round's policy: gold per iteration (rounds after the first continue the last one's count), and gold
  against sqrt(KL to that round's own SFT model)."""
  fig, axes = _figure(2, height=3.6, width=12.0)
  offset, drawn = 0, False
  for row, rr in zip(rows, [run] + list(run.rounds.values())):
    if not row.get("policy"):
      continue
    steps, d, scores = policy_evals(rr, row["policy"])
    if "gold" not in scores or not len(steps):
      continue
    label = f"round {row['round']} ({row['policy']})"
    axes[0].plot(steps + offset, scores["gold"], marker="o", markersize=3, label=label)
    axes[1].plot(d, scores["gold"], marker="o", markersize=3, label=label)
    offset += int(steps[-1])
    drawn = True
  if not drawn:
    return None
  axes[0].set(title="gold (the labeller's judge) on held-out prompts", xlabel="policy iterations, all rounds")
  axes[1].set(title="gold against sqrt(KL to the round's SFT model)", xlabel="sqrt(KL) (nats^0.5)")
  for ax in axes:
    ax.legend(fontsize=8)
  return _png(fig)


def section_rounds(run: Run) -> str:
  if not run.rounds:
    return _note("One round (config.rounds = 1). With config.rounds = 2 the pipeline takes feedback on the policy "
                 "(users of python -m gptrl.serve, or users simulated by the judge), retrains SFT and the reward "
                 "model on it and continues the policy; this section then compares the rounds.")
  rows = round_rows(run)
  png = plot_rounds(run, rows)
  out = _img(png, "rounds") if png else _note("No gold scores to compare the rounds by.")
  table = []
  cell = lambda row, key, digits=3: "-" if row.get(key) is None else _fmt(row[key], digits)
  for row in rows:
    fb = row.get("feedback")
    table.append([str(row["round"]), _esc(row.get("policy") or "-"),
                  _esc(", ".join(f"{n} {k.split('.')[0]}" for k, n in fb.items())) if fb else "-",
                  cell(row, "served_gold"), cell(row, "sft_loss"), cell(row, "rm_accuracy"), cell(row, "gold_first"),
                  cell(row, "gold"), cell(row, "kl", 2), cell(row, "proxy")])
  out += _table(["round", "policy", "feedback learned from", "users' judge score of the served replies",
                 "SFT eval loss", "RM eval accuracy", "gold at the round's start", "gold at its end",
                 "KL to its SFT", "proxy (its own RM)"], table)
  return out + _note("Gold is the labelling judge's score of the policy's replies to the same held-out prompts in "
                     "every round, so rounds compare by it; the proxy is each round's own reward model and the KL is "
                     "to each round's own SFT model, so those do not compare across rounds.")


def lineage_rows(run: Run) -> list[dict[str, Any]]:
  """Per stage folder of the report (and of its later rounds): its newest checkpoint's `checkpoint.lineage`."""
  from gptrl import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  out = []
  for label, r in [("", run)] + [(f"round {n} ", later) for n, later in run.rounds.items()]:
    for stage, folder in r.dirs.items():
      found = ckpt_lib.lineage(os.path.join(folder, "checkpoints"))
      if found is not None:
        out.append({"stage": label + stage, **found})
  return out


def section_lineage(run: Run) -> str:
  rows = []
  for r in lineage_rows(run):
    started = []
    for role, p in r["parents"].items():
      state = ("unchanged" if p["same"] else "gone" if not p["now_sha256"] else
               f"changed since: now {p['now_sha256'][:12]}")
      started.append(f"{_esc(role)}: <code>{_esc(p['checkpoint'])}</code> ({_esc(p.get('stage'))}, "
                     f"{_esc(p['manifest_sha256'][:12])}; {_esc(state)})")
    if not r["parents"] and r.get("init_checkpoint"):
      started.append(f"init: <code>{_esc(r['init_checkpoint'])}</code> (hash not recorded)")
    for c in r["parent_changes"]:
      started.append(f"{_esc(c['role'])} changed at resume from <code>{_esc(c['resumed_from'])}</code>: "
                     f"{_esc(c['was']['manifest_sha256'][:12])} → {_esc(c['now']['manifest_sha256'][:12])} "
                     "(allow_changed)")
    rows.append([_esc(r["stage"]), f"<code>{_esc(r['checkpoint'])}</code>", _esc(r["manifest_sha256"][:12] or "-"),
                 "<br>".join(started) or "from scratch"])
  if not rows:
    return _note("No checkpoints found in this report's stage folders.")
  return _table(["stage", "newest checkpoint", "manifest sha256", "started from"], rows) + _note(
      "sha256 of each step's manifest.json (every file's size and hash), first 12 digits. A resumed stage refuses "
      "a parent that changed since it began unless its config's allow_changed is set; such changes are listed.")


SECTIONS = (("summary", "Run summary", section_summary), ("losses", "Loss curves", section_losses),
            ("reward-model", "Reward model accuracy", section_reward_model),
            ("ppo", "PPO per iteration", section_ppo), ("reward-vs-kl", "Reward against KL", section_reward_vs_kl),
            ("frontier", "Gold and proxy against KL: the policy optimisers next to best-of-n", section_frontier),
            ("goodhart", "Over-optimisation watch (Goodhart)", section_goodhart),
            ("replies", "Held-out prompts: SFT vs PPO", section_replies), ("labels", "Labelling", section_label),
            ("rounds", "Rounds of the loop: feedback, retraining, the next policy", section_rounds),
            ("lineage", "Lineage: which checkpoint each stage started from", section_lineage))


def render_html(run: Run) -> str:
  """The report's HTML for the loaded stage outputs; every section is present, with a note where data is missing."""
  sections = []
  for sid, title, build in SECTIONS:
    try:
      body = build(run)
    except Exception as e:  # pylint: disable=broad-except
      # A damaged file must not cost the rest of the report (the pipeline writes it as its last step).
      logging.warning("gptrl.report: the %r section failed.", title, exc_info=True)
      body = _note(f"This section could not be drawn: {type(e).__name__}: {e}")
    sections.append(f'<section id="{sid}"><h2>{_esc(title)}</h2>{body}</section>')
  nav = "".join(f'<a href="#{sid}">{_esc(title)}</a>' for sid, title, _ in SECTIONS)
  now = datetime.datetime.now().isoformat(timespec="seconds")
  return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>gptrl report</title>'
          f"<style>{_CSS}</style></head><body><h1>gptrl report</h1>"
          f'<p class="note">Generated {_esc(now)} by <code>python -m gptrl.report</code>.</p><nav>{nav}</nav>'
          f"{''.join(sections)}</body></html>\n")


def find_rounds(workdir: str) -> dict[int, dict[str, str]]:
  """The later rounds of a pipeline workdir: <workdir>/round<r>/ -> its stage folders."""
  out = {}
  for name in fileio.listdir(workdir) if workdir and fileio.isdir(workdir) else []:
    if name.startswith("round") and name[5:].isdigit() and fileio.isdir(os.path.join(workdir, name)):
      folder = os.path.join(workdir, name)
      out[int(name[5:])] = {s: os.path.join(folder, s) for s in STAGES if fileio.isdir(os.path.join(folder, s))}
  return dict(sorted(out.items()))


def write_report(stage_dirs: dict[str, str], out_path: str, rounds: dict[int, dict[str, str]] | None = None) -> str:
  """Writes the HTML report of the given stage folders and returns its path.

  Args:
    stage_dirs: stage name ("pretrain", "sft", "label", "reward", "ppo") -> that stage's workdir; stages left out
      (or whose folder is missing) get a note in the report.
    out_path: the .html file to write (its folder is created); PNGs are embedded, so the file stands alone.
    rounds: the loop's later rounds, round number -> its stage folders (`find_rounds`).
  Raises:
    ReportError: no folder in `stage_dirs` holds any stage output.
  """
  unknown = sorted(set(stage_dirs) - set(STAGES))
  if unknown:
    raise ReportError(f"unknown stage(s) {unknown}; known: {list(STAGES)}.")
  present = {s: d for s, d in stage_dirs.items() if d and fileio.isdir(d) and _has_outputs(d)}
  if not present:
    raise ReportError(f"nothing to report: none of {sorted(stage_dirs.values())} holds metrics.jsonl, config.json "
                      "or summary.json.")
  text = render_html(Run(present, rounds))
  fileio.makedirs(os.path.dirname(fileio.abspath(out_path)))
  fileio.atomic_write(out_path, text)  # a reader never sees half a report
  return out_path


def main(argv: Sequence[str] | None = None) -> int:
  """The command line: writes the report, prints its path; exit status 2 (and a message) when there is nothing."""
  parser = argparse.ArgumentParser(prog="python -m gptrl.report", description=__doc__.split("\n\n", 1)[0],
                                   epilog=__doc__.split("\n\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", help="a pipeline workdir, a folder of stage workdirs, or one stage's workdir")
  parser.add_argument("--out", help="the HTML file to write (default: <workdir>/report.html)")
  for stage in STAGES:
    parser.add_argument(f"--{stage}", metavar="DIR", help=f"the {stage} stage's workdir (overrides --workdir)")
  args = parser.parse_args(argv)
  overrides = {s: getattr(args, s) for s in STAGES if getattr(args, s)}
  if not args.workdir and not overrides:
    parser.error("give --workdir DIR, or stage folders (--pretrain/--sft/--label/--reward/--ppo DIR) and --out.")
  if not args.out and not args.workdir:
    parser.error("--out FILE is needed when there is no --workdir.")
  try:
    path = write_report(find_stage_dirs(args.workdir, overrides),
                        args.out or os.path.join(args.workdir, "report.html"), rounds=find_rounds(args.workdir))
  except ReportError as e:
    print(f"gptrl.report: {e}", file=sys.stderr)
    return 2
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
