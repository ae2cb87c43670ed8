"""Direct preference optimisation (DPO, Rafailov et al. 2023) and its IPO and conservative variants: the SFT
policy learns from the reward model's comparison files directly, with no reward model and no sampling in training.

The recipe: the comparisons (pairwise records, or K-way rankings: every pair of a ranking) are read, split by prompt
and encoded exactly as the reward stage does (`chat_data`); the frozen SFT policy, the reference, scores every
compared reply once before training (`reference_log_probs`: the sum of its tokens' log-probs), and the training
batches carry those numbers, so the reference is never run again; a fresh run starts the policy from the same SFT
checkpoint. The loss is `losses.dpo_loss` over every pair of each batch's prompts.

Eval: on the held-out comparisons, the loss and the implicit reward r = beta * (log pi - log ref) of chosen and
rejected replies (accuracy r_chosen > r_rejected, margin); with `reward_model.checkpoint` set, also the policy's
replies to held-out prompts scored as PPO scores its own (`ppo.Learner.evaluate`: eval/reward, eval/kl against the
reference, eval/gold when the comparisons came from one automatic judge, the watch judges), written to
eval_replies.jsonl: DPO's points on the report's gold-versus-KL frontier next to best-of-n and PPO.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from gptrl import agreement
from gptrl import chat
from gptrl import chat_data
from gptrl import checkpoint as ckpt_lib
from gptrl import config as config_lib
from gptrl import data as data_lib
from gptrl import judges as judges_lib
from gptrl import losses
from gptrl import model as model_lib
from gptrl import sharding
from gptrl import trainer
from gptrl.config import DPOConfig
from gptrl.metrics import truncate_jsonl_after
from gptrl.stages import ppo
from gptrl.stages import recipe as recipe_lib


def reply_log_probs(model: model_lib.GPT, params: Any, batch: dict[str, jax.Array],
                    rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(summed log-prob of each compared reply, its token count), both [B, K], from a comparison batch's
  prompt + reply rows ("tokens" [B, K, L], reply tokens "first" .. "last"); `rng` drives dropout if the model has
  any (None: none)."""
  b, k, length = batch["tokens"].shape
  deterministic = model.config.dropout == 0.0 or rng is None
  tokens = batch["tokens"].reshape(b * k, length)
  logits = model.apply({"params": params}, tokens, deterministic=deterministic,
                       rngs=None if deterministic else {"dropout": rng})
  logp, count = losses.sequence_log_probs(logits, tokens, batch["first"].reshape(-1), batch["last"].reshape(-1))
  return logp.reshape(b, k), count.reshape(b, k)


def dpo_loss_fn(model: model_lib.GPT, p: config_lib.DPOAlgoConfig) -> trainer.LossFn:
  """loss_fn(params, batch, rng) -> (loss sum, sums) over the batch's pairs (weight: the number of pairs)."""
  def loss_fn(params, batch, rng):
    logp, count = reply_log_probs(model, params, batch, rng)
    return losses.dpo_loss(logp, batch["ref_logp"], count, batch["pairs"], beta=p.beta, loss_type=p.loss_type,
                           label_smoothing=p.label_smoothing)
  return loss_fn


def reference_log_probs(model: model_lib.GPT, params: Any, enc: chat_data.EncodedComparisons,
                        mesh: jax.sharding.Mesh, batch_size: int) -> np.ndarray:
  """float32 [N, K]: the summed log-prob of every encoded reply under `params` (the reference), each computed
  once, in batches of `batch_size` prompts over `mesh` (every process feeds its share; all get the whole)."""
  n = enc.tokens.shape[0]
  if n == 0:
    return np.zeros(enc.last.shape, np.float32)
  step = jax.jit(lambda params, batch: reply_log_probs(model, params, batch)[0])
  ds = chat_data.reward_dataset(enc, seed=0, global_batch_size=batch_size, process_index=jax.process_index(),
                                process_count=jax.process_count(), shuffle=False, num_epochs=1)
  out = []
  with sharding.activate(mesh):
    for batch in ds:
      logp = step(params, sharding.host_to_global(batch, mesh))
      out.append(np.asarray(multihost_utils.process_allgather(logp, tiled=True)))
  return np.concatenate(out)[:n].astype(np.float32)


def make_eval_fn(model: model_lib.GPT, mesh: jax.sharding.Mesh, batches: list[dict[str, np.ndarray]],
                 p: config_lib.DPOAlgoConfig, generation: Callable[[trainer.TrainState], dict[str, float]] | None):
  """Held-out comparisons: `eval/loss`, the implicit reward's `eval/accuracy`, `eval/reward_margin`,
  `eval/chosen_reward`, `eval/rejected_reward` (means over pairs), `eval/pairs`; then `generation`'s metrics."""
  loss_fn = dpo_loss_fn(model, p)
  eval_step = jax.jit(lambda params, batch: loss_fn(params, batch, None))

  def eval_fn(state: trainer.TrainState) -> dict[str, float]:
    totals: dict[str, float] = {}
    with sharding.activate(mesh):
      for batch in batches:
        loss_sum, sums = eval_step(state.params, sharding.host_to_global(batch, mesh))
        for k, v in {"loss": loss_sum, **sums}.items():
          totals[k] = totals.get(k, 0.0) + float(v)
    metrics = {}
    if batches:
      weight = max(totals["weight"], 1.0)
      metrics = {f"eval/{k}": totals[k] / weight for k in ("loss", "accuracy", "reward_margin", "chosen_reward",
                                                           "rejected_reward")}
      metrics["eval/pairs"] = totals["weight"]
    if generation is not None:
      metrics.update(generation(state))
    return metrics
  return eval_fn


def generation_eval(cfg: DPOConfig, model_cfg: config_lib.ModelConfig, mesh: jax.sharding.Mesh, tok: Any,
                    workdir: str, cache_dir: str,
                    ref_params: Any) -> Callable[[trainer.TrainState], dict[str, float]] | None:
  """The policy's replies to held-out prompts, scored by `cfg.reward_model` as PPO scores its evals (the same
  prompts, key, chunks and KL estimate when the settings are PPO's) against the frozen reference `ref_params`,
  each eval's replies appended to eval_replies.jsonl; None without a reward model or eval prompts."""
  p = cfg.dpo
  if not cfg.reward_model.checkpoint or p.num_eval_prompts == 0:
    return None
  # PPO's evaluation code path, with the settings that decide its replies taken from config.dpo.
  algo = config_lib.PPOAlgoConfig(rollout_batch_size=2, minibatch_size=2, group_size=2, advantage="group",
                                  critic="none", critic_init="sft", kl_estimator="k1", max_new_tokens=p.max_new_tokens,
                                  temperature=p.temperature, num_eval_prompts=p.num_eval_prompts,
                                  eval_batch_size=p.eval_batch_size, watch_judges=p.watch_judges)
  eval_cfg = config_lib.PPOConfig(workdir=workdir, seed=cfg.seed, init=cfg.init, reward_model=cfg.reward_model,
                                  tokenizer_path=cfg.tokenizer_path, model=cfg.model, data=cfg.prompts, ppo=algo)
  rm = ppo.read_reward_model(eval_cfg, tok)
  ppo.check_reply_room("dpo", p.max_new_tokens, model_cfg, rm)
  models = ppo.make_models(model_cfg, rm.model_config, algo, ensemble=int(rm.meta.get("ensemble", 1)),
                           pooling=rm.meta.get("pooling", "last"), reward_context=int(rm.meta.get("context", 0)),
                           end_id=tok.end_of_turn_id)
  eval_prompts = [chat.prompt_tokens(m, tok, max_tokens=models.prompt_len) for m in
                  chat_data.load_held_out_prompts(cfg.prompts, p.num_eval_prompts, cfg.seed, cache_dir=cache_dir)]
  example = np.zeros((1, model_cfg.max_len), np.int32)
  rm_params = ckpt_lib.load_frozen_params(models.reward, example, mesh, cfg.reward_model, tokenizer_sha256=tok.sha256)
  gold = judges_lib.make_judge(rm.meta["gold_judge"]) if rm.meta.get("gold_judge") else None
  learner = ppo.Learner(eval_cfg, models, mesh, None, None, ref_params, rm_params,
                        ppo.make_score_fn(models, eval_cfg, rm.readout), pad_id=tok.pad_id,
                        stop_id=tok.end_of_turn_id,
                        watch_judges={name: judges_lib.make_judge(name) for name in p.watch_judges}, gold_judge=gold)
  logging.info("Generation eval: %d held-out prompts, scored by %s (%s); gold judge: %s.", len(eval_prompts),
               rm.where, rm.readout, rm.meta.get("gold_judge") or "none")

  def evaluate(state: trainer.TrainState) -> dict[str, float]:
    result = learner.evaluate({"policy": state.params}, eval_prompts, 0.0, tok)
    step = int(state.step)
    if jax.process_index() == 0 and result.replies:
      # A resumed run evaluates again from its checkpoint: what an interrupted one wrote after it goes first.
      truncate_jsonl_after(os.path.join(workdir, ppo.EVAL_REPLIES_FILE), step - 1)
      ppo.append_eval_replies(workdir, step, result.replies)
    return result.metrics
  return evaluate


def recipe(cfg: DPOConfig, ctx: recipe_lib.Context) -> recipe_lib.Recipe:
  p, k = cfg.dpo, cfg.data.max_responses
  # The data first: a bad record is reported before any checkpoint is read.
  dropped = agreement.labellers_below(cfg.data)
  groups = chat_data.load_comparisons(cfg.data.sources, max_responses=k, drop_labellers=dropped)
  model_cfg, tok, init_meta = recipe_lib.init_source(cfg.init, cfg.tokenizer_path, ctx.workdir, cfg.model,
                                                     expect_stage=("sft",))
  seq_len = min(cfg.data.max_len or model_cfg.max_len, model_cfg.max_len)
  train_groups, eval_groups, train_enc, eval_enc = chat_data.split_comparisons(groups, cfg.data, tok, seq_len=seq_len,
                                                                              what="DPO")
  n_train_pairs, n_eval_pairs = int(train_enc.pairs.sum()), int(eval_enc.pairs.sum())

  # The frozen reference, loaded once: the generation eval keeps it (its reward model and reply length are
  # checked before the reference pass), and the pass scores every compared reply with it.
  model = model_lib.GPT(model_cfg)
  reference = ckpt_lib.load_frozen_params(model, np.zeros((1, model_cfg.max_len), np.int32), ctx.mesh, cfg.init,
                                          tokenizer_sha256=tok.sha256)
  generation = generation_eval(cfg, model_cfg, ctx.mesh, tok, ctx.workdir, ctx.cache_dir, reference)

  # The reference's log-probs of every compared reply, once: training never runs the reference.
  t0 = time.perf_counter()
  train_enc.ref_logp = reference_log_probs(model, reference, train_enc, ctx.mesh, cfg.data.batch_size)
  eval_enc.ref_logp = reference_log_probs(model, reference, eval_enc, ctx.mesh, cfg.data.batch_size)
  del reference
  logging.info("Reference log-probs of %d replies in %.1f s.",
               int((train_enc.last > 0).sum() + (eval_enc.last > 0).sum()), time.perf_counter() - t0)

  train_iter = iter(chat_data.reward_dataset(train_enc, seed=cfg.seed, global_batch_size=cfg.data.batch_size,
                                             process_index=jax.process_index(), process_count=jax.process_count()))
  fingerprint_parts = dict(sources=list(cfg.data.sources), split_seed=cfg.data.split_seed,
                           eval_fraction=cfg.data.eval_fraction, seed=cfg.seed, seq_len=seq_len, max_responses=k,
                           global_batch_size=cfg.data.batch_size, process_count=jax.process_count(),
                           tokenizer_sha256=tok.sha256, num_prompts=len(train_groups), num_pairs=n_train_pairs,
                           **agreement.fingerprint_parts(cfg.data, dropped, groups))
  eval_batches = chat_data.reward_eval_batches(eval_enc, batch_size=cfg.data.batch_size,
                                               max_batches=cfg.data.eval_batches, process_index=jax.process_index(),
                                               process_count=jax.process_count())

  def init_from(params, shardings):  # the SFT policy (equal to the reference)
    params, _, where = ckpt_lib.load_params(cfg.init.checkpoint, ckpt_lib.abstract_like(params, shardings),
                                            step=cfg.init.step, tokenizer_sha256=tok.sha256)
    logging.info("Initialised the policy from %s (also the reference).", where)
    return params

  tokens_per_step = cfg.data.batch_size * k * seq_len
  return recipe_lib.Recipe(
      stage="dpo", tokenizer=tok, model_config=model_cfg, model=model, seq_len=seq_len,
      loss_fn=dpo_loss_fn(model, p), train_iter=train_iter,
      fingerprint=data_lib.pipeline_fingerprint(stage="dpo", **fingerprint_parts),
      fingerprint_parts=fingerprint_parts, tokens_per_step=tokens_per_step,
      flops_per_step=model_lib.flops_per_token(model_cfg, seq_len) * tokens_per_step,
      meta={"init_checkpoint": init_meta["init_checkpoint"], "beta": p.beta, "loss_type": p.loss_type,
            "label_smoothing": p.label_smoothing, "context": seq_len, "eval_pairs": n_eval_pairs,
            "gold_judge": chat_data.gold_judge(groups)},
      init_from=init_from, eval_fn=make_eval_fn(model, ctx.mesh, eval_batches, p, generation))


def run(cfg: DPOConfig) -> trainer.TrainState:
  """Trains (or resumes training) the policy with DPO."""
  return recipe_lib.train(cfg, lambda ctx: recipe(cfg, ctx))
