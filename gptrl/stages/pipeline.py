"""The whole pipeline in one command: pretrain -> SFT -> label -> reward model -> best-of-n -> PPO (and, when
`config.stages` names them, GRPO, RLOO, RS-FT and DPO), then, with `config.rounds` > 1, later rounds of the loop
(feedback on the last policy -> SFT -> reward model -> the policy again: `round_configs`), then the report.

Each stage runs in its own sub-folder `<workdir>/<stage>/`, exactly as if it had been launched alone with its own
config, and starts from the previous stage's Orbax checkpoint:

  sft.init              <- <workdir>/pretrain
  label.init            <- <workdir>/sft
  reward.init           <- <workdir>/sft        reward.data.sources <- <workdir>/label/comparisons.jsonl
  bon.init              <- <workdir>/sft        bon.reward_model    <- <workdir>/reward
  ppo.init              <- <workdir>/sft        ppo.reward_model    <- <workdir>/reward
  grpo/rloo/rsft.init   <- <workdir>/sft        their reward_model  <- <workdir>/reward
  dpo.init              <- <workdir>/sft        dpo.data.sources    <- <workdir>/label/comparisons.jsonl
                                                dpo.reward_model    <- <workdir>/reward (scores its evals only)

Best-of-n (the baseline of the report's gold-versus-KL frontier) takes PPO's seed, data, held-out prompt count,
reply length, temperature and watch judges, so both are measured on the same prompts.

A stage left out of `config.stages` is not run; the stages after it read the paths configured for them (e.g.
`--config.stages="('sft','label','reward','ppo')" --config.sft.init.checkpoint=runs/my_base`).

Re-running the same command after an interruption skips the finished stages (recorded in
`<workdir>/pipeline_state.json` when a stage returns) and resumes the interrupted one from its own checkpoint,
as every stage does when relaunched. A stage that exits for preemption (code 75) stops the pipeline with the
same code, so a launcher's retry resumes it.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import time
from typing import Any

import jax

from gptrl import config as config_lib
from gptrl import fileio
from gptrl import stages
from gptrl.config import PipelineConfig

STATE_FILE = "pipeline_state.json"



def _input(cfg: PipelineConfig, workdir: str, produced_by: str, configured: str, key: str) -> str:
  """The sibling sub-folder when `produced_by` runs in this pipeline, else the path configured in `key`."""
  if produced_by in cfg.stages:
    return os.path.join(workdir, produced_by)
  if not configured or (configured.startswith("<") and configured.endswith(">")):
    raise config_lib.ConfigError(
        f"config.{key}: {produced_by!r} is not in config.stages {list(cfg.stages)}, so this stage needs the path "
        f"of an existing {produced_by} run (its workdir or a checkpoint folder); got {configured!r}.")
  return configured


def stage_configs(cfg: PipelineConfig) -> dict[str, Any]:
  """The typed config of every stage to run, with workdirs and inputs wired as the module docstring says."""
  workdir = fileio.abspath(cfg.workdir)
  out = {}
  for name in cfg.stages:
    stage_cfg = getattr(cfg, name)
    changes: dict[str, Any] = {"workdir": os.path.join(workdir, name), "distributed": cfg.distributed}
    stage = stages.get(name)
    if stage.init_from:
      produced_by = stage.init_from
      changes["init"] = dataclasses.replace(
          stage_cfg.init, checkpoint=_input(cfg, workdir, produced_by, stage_cfg.init.checkpoint,
                                            f"{name}.init.checkpoint"))
    if name in ("reward", "dpo") and "label" in cfg.stages:
      changes["data"] = dataclasses.replace(
          stage_cfg.data, sources=(os.path.join(workdir, "label", "comparisons.jsonl"),))
    # DPO only scores its evals with a reward model: without one in the pipeline or configured, it skips them.
    no_rm = (name == "dpo" and "reward" not in cfg.stages
             and stage_cfg.reward_model.checkpoint in ("", "<reward>"))
    if no_rm:
      changes["reward_model"] = dataclasses.replace(stage_cfg.reward_model, checkpoint="")
    elif stage.reads_reward_model:
      # (Best-of-n reads an ensemble as PPO does; its table also has every other reduction.)
      rm_cfg = cfg.ppo.reward_model if name == "bon" else stage_cfg.reward_model
      changes["reward_model"] = dataclasses.replace(
          rm_cfg, checkpoint=_input(cfg, workdir, "reward", stage_cfg.reward_model.checkpoint,
                                    f"{name}.reward_model.checkpoint"))
    if name in stages.POLICY_RL and name != "ppo":
      # GRPO, RLOO and RS-FT are evaluated as PPO is (the frontier's points on one footing): its held-out prompts, reply
      # length, temperature and judges.
      p, algo = cfg.ppo.ppo, stage_cfg.algo
      changes.update(seed=cfg.ppo.seed, data=cfg.ppo.data, **{algo.group: dataclasses.replace(
          algo, num_eval_prompts=p.num_eval_prompts, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
          top_k=p.top_k, top_p=p.top_p, is_correction=p.is_correction, is_threshold=p.is_threshold,
          watch_judges=p.watch_judges, eval_batch_size=p.eval_batch_size or p.rollout_batch_size)})
    if name == "dpo":
      # DPO's generation eval on PPO's footing: its held-out prompts, chunks, reply length, temperature and judges.
      p = cfg.ppo.ppo
      changes.update(seed=cfg.ppo.seed, prompts=cfg.ppo.data, dpo=dataclasses.replace(
          stage_cfg.dpo, num_eval_prompts=p.num_eval_prompts, max_new_tokens=p.max_new_tokens,
          temperature=p.temperature, watch_judges=p.watch_judges,
          eval_batch_size=p.eval_batch_size or p.rollout_batch_size))
    if name == "bon":
      # Best-of-n is PPO's baseline on one footing: PPO's held-out prompts, reply length, temperature and judges.
      p = cfg.ppo.ppo
      changes.update(seed=cfg.ppo.seed, data=cfg.ppo.data, bon=dataclasses.replace(
          stage_cfg.bon, num_prompts=p.num_eval_prompts, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
          watch_judges=p.watch_judges))
    out[name] = dataclasses.replace(stage_cfg, **changes)
  _warn_on_split_mismatch(cfg)
  return out


def round_dir(workdir: str, r: int) -> str:
  """Round r's folder: the pipeline's workdir for round 1, <workdir>/round<r> after."""
  return workdir if r == 1 else os.path.join(workdir, f"round{r}")


def round_configs(cfg: PipelineConfig, r: int) -> dict[str, Any]:
  """The stages of round r >= 2 (feedback, sft, reward, the policy), wired as `PipelineConfig.rounds` says:

    feedback.init            <- round r-1's policy          (served to the users, or to the simulated ones)
    sft.init                 <- <workdir>/pretrain          sft.data.sources    += every round's demonstrations.jsonl
    reward.init              <- round r's sft               reward.data.sources += every round's comparisons.jsonl
    <policy>.init            <- round r's sft (the reference)
    <policy>.policy_init     <- round r-1's policy          <policy>.reward_model <- round r's reward
  Everything else is round 1's resolved config (the same held-out prompts, so the rounds' gold scores compare).
  """
  workdir = fileio.abspath(cfg.workdir)
  base = stage_configs(cfg)
  here, previous = round_dir(workdir, r), round_dir(workdir, r - 1)
  policy = cfg.round_policy
  feedback_dirs = [os.path.join(round_dir(workdir, k), "feedback") for k in range(2, r + 1)]
  sub = lambda name: os.path.join(here, name)
  init = lambda path: config_lib.InitConfig(checkpoint=path)
  out = {"feedback": dataclasses.replace(
      cfg.feedback, workdir=sub("feedback"), distributed=cfg.distributed, seed=cfg.feedback.seed + r,
      init=init(os.path.join(previous, policy)), data=cfg.label.data, judge=cfg.label.judge)}
  if cfg.feedback.init.checkpoint not in ("", "<ppo>", f"<{policy}>"):
    logging.warning("config.feedback.init.checkpoint=%r is ignored: each round serves the previous round's policy.",
                    cfg.feedback.init.checkpoint)
  sft = base["sft"]
  demonstrations = tuple(os.path.join(d, "demonstrations.jsonl") for d in feedback_dirs)
  out["sft"] = dataclasses.replace(sft, workdir=sub("sft"), data=dataclasses.replace(
      sft.data, sources=tuple(sft.data.sources) + demonstrations))
  reward = base["reward"]
  out["reward"] = dataclasses.replace(reward, workdir=sub("reward"), init=init(sub("sft")), data=dataclasses.replace(
      reward.data, sources=tuple(reward.data.sources) + tuple(os.path.join(d, "comparisons.jsonl")
                                                                for d in feedback_dirs)))
  p = base[policy]
  out[policy] = dataclasses.replace(p, workdir=sub(policy), init=init(sub("sft")),
                                    policy_init=init(os.path.join(previous, policy)),
                                    reward_model=dataclasses.replace(p.reward_model, checkpoint=sub("reward")))
  return out


def _warn_on_split_mismatch(cfg: PipelineConfig) -> None:
  """Labelling and PPO prompts must come from the SFT run's training split, or held-out plays leak into them."""
  keys = ("sources", "eval_fraction", "split_seed")
  sft = {k: getattr(cfg.sft.data, k) for k in keys}
  for name in ("label",) + stages.POLICY_RL:
    other = {k: getattr(getattr(cfg, name).data, k) for k in keys}
    for k in keys:
      if name in cfg.stages and other[k] != sft[k]:
        logging.warning("config.%s.data.%s=%r differs from config.sft.data.%s=%r: its prompts are not split like "
                        "the SFT run's, so SFT's held-out conversations may be used.", name, k, other[k], k, sft[k])


def read_state(workdir: str) -> dict[str, Any]:
  """The pipeline's progress record: {"done": {stage: {"finished", "seconds"}}}; empty for a fresh workdir."""
  path = os.path.join(workdir, STATE_FILE)
  if not fileio.exists(path):
    return {"done": {}}
  try:
    state = json.loads(fileio.read_text(path))
    if not isinstance(state, dict) or not isinstance(state.get("done"), dict):
      raise ValueError("expected an object with a 'done' object")
    return state
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(
        f"{path}: unreadable pipeline state ({e}). Delete it to re-check every stage: finished stages then run "
        "again from their last checkpoint, which is quick when they are complete.") from e


def _write_state(workdir: str, state: dict[str, Any]) -> None:
  if jax.process_index() != 0:
    return
  fileio.atomic_write(os.path.join(workdir, STATE_FILE), json.dumps(state, indent=1, sort_keys=True))


def _stage_fingerprint(stage_cfg: Any) -> str:
  """The stage's resolved config (minus things that do not change its result), to notice edits after it ran."""
  resolved = config_lib.to_dict(stage_cfg)
  for key in ("distributed", "progress_bar"):
    resolved.pop(key, None)
  resolved.get("train", {}).pop("progress_bar", None)
  return json.dumps(resolved, sort_keys=True)


def _run_stages(configs: dict[str, Any], state: dict[str, Any], workdir: str, prefix: str = "") -> None:
  """Runs `configs` in order, skipping those the state records as done (keys `prefix + name`)."""
  total = len(configs)
  for index, (name, stage_cfg) in enumerate(configs.items(), start=1):
    key, label = prefix + name, f"{prefix}{name}"
    done = state["done"].get(key)
    if done is not None:
      if done.get("config") != _stage_fingerprint(stage_cfg):
        logging.warning("Stage %d/%d %s: finished on %s with a config that differs from the current one; not "
                        "re-running it (delete %s and its entry in %s to redo it, and the stages after it).",
                        index, total, label, done.get("finished"), stage_cfg.workdir, STATE_FILE)
      logging.info("Stage %d/%d %s: finished on %s (%.0f s); skipping.", index, total, label, done.get("finished"),
                   done.get("seconds", 0.0))
      continue
    logging.info("Stage %d/%d %s -> %s", index, total, label, stage_cfg.workdir)
    start = time.monotonic()
    stages.module(name).run(stage_cfg)
    seconds = time.monotonic() - start
    state["done"][key] = {"finished": datetime.datetime.now().isoformat(timespec="seconds"),
                          "seconds": round(seconds, 1), "config": _stage_fingerprint(stage_cfg)}
    _write_state(workdir, state)
    logging.info("Stage %d/%d %s: done in %.1f min.", index, total, label, seconds / 60)


def run(cfg: PipelineConfig) -> dict[str, Any]:
  """Runs the configured stages (and rounds) in order, skipping finished ones; returns the pipeline state."""
  workdir = fileio.abspath(cfg.workdir)
  fileio.makedirs(workdir)
  configs = stage_configs(cfg)
  from gptrl.stages import recipe  # pylint: disable=import-outside-toplevel
  recipe.prepare_workdir(cfg)  # the whole resolved pipeline config, as config.json
  state = read_state(workdir)
  _run_stages(configs, state, workdir)
  for r in range(2, cfg.rounds + 1):
    logging.info("Round %d of %d -> %s", r, cfg.rounds, round_dir(workdir, r))
    _run_stages(round_configs(cfg, r), state, workdir, prefix=f"round{r}/")
  if cfg.report and jax.process_index() == 0:
    _write_report(workdir, cfg)
  spent = sum(d.get("seconds", 0.0) for d in state["done"].values())
  logging.info("Pipeline done: %s (%.1f min of stage time in all).",
               ", ".join(f"{n} {d['seconds'] / 60:.1f} min" for n, d in state["done"].items()), spent / 60)
  return state


def _write_report(workdir: str, cfg: PipelineConfig) -> None:
  """The HTML report over every stage sub-folder of this pipeline and its rounds (gptrl/report.py)."""
  from gptrl import report  # pylint: disable=import-outside-toplevel

  def dirs(folder):
    return {n: os.path.join(folder, n) for n in stages.PIPELINE_ORDER if fileio.isdir(os.path.join(folder, n))}
  rounds = {r: dirs(round_dir(workdir, r)) for r in range(2, cfg.rounds + 1)}
  path = report.write_report(dirs(workdir), os.path.join(workdir, "report.html"), rounds=rounds)
  logging.info("Report: %s", path)
