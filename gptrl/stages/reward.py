"""Stage 3, reward modelling: a scalar-head transformer initialised from SFT learns a Bradley-Terry score.

The recipe: comparison records (pairs or K-way rankings) split by prompt group, each prompt's replies encoded to
the reward model's context; a fresh run starts the transformer from the SFT checkpoint `init.checkpoint` (every
member of an ensemble from the same one) with a fresh, small head; eval is the held-out loss and pair accuracy.

After the last step the reward is normalised as InstructGPT does before PPO: the SFT model answers
`reward.normalize_samples` training prompts, the trained reward model scores the answers, and their mean is
stored as `reward_offset` in the final checkpoint's meta (with `reward_std`). A consumer computes
`reward = raw_score - reward_offset`, so the SFT policy starts PPO at mean reward 0.
"""
from __future__ import annotations

import collections
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from gptrl import agreement
from gptrl import chat
from gptrl import chat_data
from gptrl import checkpoint as ckpt_lib
from gptrl import config as config_lib
from gptrl import data as data_lib
from gptrl import decoding
from gptrl import losses
from gptrl import model as model_lib
from gptrl import reward_model
from gptrl import seeds
from gptrl import sharding
from gptrl import trainer
from gptrl.config import RewardConfig
from gptrl.stages import recipe as recipe_lib


def rewards_and_loss(model: reward_model.ScalarHeadModel | reward_model.RewardEnsemble, margin_scale: float, params,
                      batch, rng):
  """(loss_sum, sums, rewards) of one batch of comparisons; `rng` drives dropout when the model has any (None, as
  in eval: no dropout). Rewards are [B, K], or [M, B, K] for an ensemble, whose loss is the sum of its members'
  (each on its own [B, M, ...] slice of a training batch, or all on a shared [B, ...] eval batch), each rescaled
  to the members' mean weight: with trainer.make_train_step(members=M) every member trains as it would alone."""
  deterministic = model.config.dropout == 0.0 or rng is None
  rewards = reward_model.sequence_scores(model, params, batch["tokens"], batch["last"], batch.get("first"),
                                         deterministic=deterministic, rngs=None if deterministic else {"dropout": rng})
  if rewards.ndim == 2:
    loss_sum, sums = losses.bradley_terry(rewards, batch["pairs"], batch["margins"], margin_scale=margin_scale)
    return loss_sum, sums, rewards
  pairs, margins = batch["pairs"], batch["margins"]
  in_axes = (0, 1, 1) if pairs.ndim == 4 else (0, None, None)  # [B, M, K, K] per member, or shared
  loss_M, sums_M = jax.vmap(lambda r, p, m: losses.bradley_terry(r, p, m, margin_scale=margin_scale),
                            in_axes=in_axes)(rewards, pairs, margins)
  weight_M = sums_M["weight"]
  rescale_M = jnp.mean(weight_M) / jnp.maximum(weight_M, 1.0)
  sums = {k: jnp.sum(v * rescale_M) for k, v in sums_M.items() if k != "weight"}
  sums["weight"] = jnp.sum(jnp.where(weight_M > 0, jnp.mean(weight_M), 0.0))
  return jnp.sum(loss_M * rescale_M), sums, rewards


def reward_loss_fn(model: reward_model.ScalarHeadModel | reward_model.RewardEnsemble, margin_scale: float):
  def loss_fn(params, batch, rng):
    loss_sum, sums, _ = rewards_and_loss(model, margin_scale, params, batch, rng)
    return loss_sum, sums
  return loss_fn


def reward_eval_step(model: reward_model.ScalarHeadModel | reward_model.RewardEnsemble, margin_scale: float):
  """(params, batch) -> (loss sum, sums, rewards) of one held-out batch (no dropout)."""
  return lambda params, batch: rewards_and_loss(model, margin_scale, params, batch, None)


# Buckets of the labeller's score gap ("margin" of a comparison record) for the RM's held-out accuracy: an RM
# should agree with its labeller most where the labeller's preference is clearest.
GAP_EDGES = (0.0, 0.25, 0.5, 1.0, float("inf"))


def pair_accuracy_by_gap(rewards_NxK: np.ndarray, pairs_NxKxK: np.ndarray, margins_NxKxK: np.ndarray,
                         edges: tuple[float, ...] = GAP_EDGES) -> dict[str, float]:
  """Each held-out pair counted once (not per prompt): the fraction the RM orders as the labeller did, overall
  (`eval/pair_accuracy`) and by the labeller's score gap |margin| in [edges[i], edges[i+1])
  (`eval/accuracy_gap/<lo>-<hi>`, with `eval/pairs_gap/<lo>-<hi>` pairs). Ties of the RM count as wrong."""
  diff = rewards_NxK[:, :, None].astype(np.float64) - rewards_NxK[:, None, :]
  count, right, gap = pairs_NxKxK.astype(np.float64), (diff > 0).astype(np.float64), np.abs(margins_NxKxK)
  out = {"eval/pair_accuracy": float((count * right).sum() / max(count.sum(), 1.0))}
  for lo, hi in zip(edges[:-1], edges[1:]):
    name = f"{lo:g}-{hi:g}"
    inside = count * ((gap >= lo) & (gap < hi))
    out[f"eval/pairs_gap/{name}"] = float(inside.sum())
    if inside.sum():
      out[f"eval/accuracy_gap/{name}"] = float((inside * right).sum() / inside.sum())
  return out


def make_reward_eval_fn(model: reward_model.ScalarHeadModel | reward_model.RewardEnsemble, mesh: jax.sharding.Mesh,
                        batches: list[dict[str, Any]], margin_scale: float):
  """Held-out loss, pairwise accuracy and mean reward margin, each prompt weighing 1; and each pair weighing 1,
  the agreement with the labeller overall and by its score gap (`pair_accuracy_by_gap`). For an ensemble the loss
  and per-prompt figures are the members' means, the pair accuracies those of the members' mean score, and
  `eval/member_pair_accuracy_{mean,min,max}` those of the members alone."""
  eval_step = jax.jit(reward_eval_step(model, margin_scale))

  def eval_fn(state: trainer.TrainState) -> dict[str, float]:
    totals: dict[str, float] = {}
    rewards, pairs, margins = [], [], []
    with sharding.activate(mesh):
      for batch in batches:
        loss_sum, sums, rewards_xBxK = eval_step(state.params, sharding.host_to_global(batch, mesh))
        for k, v in {"loss": loss_sum, **sums}.items():
          totals[k] = totals.get(k, 0.0) + float(v)
        # (Each process holds its slice of the batch; the all-gather keeps the pairs' accuracy global.)
        rewards_BxKxM = rewards_xBxK[..., None] if rewards_xBxK.ndim == 2 else jnp.moveaxis(rewards_xBxK, 0, -1)
        rewards.append(np.asarray(multihost_utils.process_allgather(rewards_BxKxM, tiled=True)))
        pairs.append(np.asarray(multihost_utils.process_allgather(batch["pairs"], tiled=True)))
        margins.append(np.asarray(multihost_utils.process_allgather(batch["margins"], tiled=True)))
    weight = max(totals.get("weight", 0.0), 1.0)
    metrics = {"eval/loss": totals.get("loss", 0.0) / weight, "eval/accuracy": totals.get("accuracy", 0.0) / weight,
               "eval/reward_margin": totals.get("reward_margin", 0.0) / weight,
               "eval/prompts": totals.get("weight", 0.0) / reward_model.num_members(model),
               "eval/pairs": totals.get("pairs", 0.0) / reward_model.num_members(model)}
    if rewards:
      rewards_NxKxM, pairs_all, margins_all = np.concatenate(rewards), np.concatenate(pairs), np.concatenate(margins)
      metrics.update(pair_accuracy_by_gap(rewards_NxKxM.mean(axis=-1), pairs_all, margins_all))
      if rewards_NxKxM.shape[-1] > 1:
        alone = [pair_accuracy_by_gap(rewards_NxKxM[..., m], pairs_all, margins_all)["eval/pair_accuracy"]
                 for m in range(rewards_NxKxM.shape[-1])]
        metrics.update({"eval/member_pair_accuracy_mean": float(np.mean(alone)),
                        "eval/member_pair_accuracy_min": float(np.min(alone)),
                        "eval/member_pair_accuracy_max": float(np.max(alone))})
    return metrics
  return eval_fn


def make_normalizer(cfg: RewardConfig, model: reward_model.ScalarHeadModel, mesh: jax.sharding.Mesh, tok: Any,
                    prompts: list[tuple[chat.Message, ...]], context: int):
  """final_meta_fn: the mean and spread of the reward of the SFT model's replies to training prompts, each cut to
  the reward model's `context` as its training data were."""
  def normalize(state: trainer.TrainState) -> dict[str, Any]:
    n = min(cfg.reward.normalize_samples, len(prompts))
    if n == 0:
      members = reward_model.num_members(model)
      return {"reward_offset": 0.0, "reward_std": 1.0, "reward_normalize_samples": 0,
              **({"reward_offsets": [0.0] * members, "reward_stds": [1.0] * members} if members > 1 else {})}
    model_cfg = model.config
    policy = model_lib.GPT(model_cfg)
    sft_params = ckpt_lib.load_frozen_params(policy, np.zeros((1, model_cfg.max_len), np.int32), mesh, cfg.init,
                                           tokenizer_sha256=tok.sha256)
    picks = np.random.default_rng(cfg.seed).permutation(len(prompts))[:n]
    max_new = cfg.reward.normalize_max_new_tokens
    encoded = [chat.prompt_tokens(prompts[i], tok, max_tokens=model_cfg.max_len - max_new) for i in picks]
    with sharding.activate(mesh):
      outs = decoding.generate(policy, sft_params, encoded, max_new_tokens=max_new,
                               rng=jax.random.key(seeds.stream(cfg.seed, seeds.RM_NORMALISER)), temperature=1.0,
                               stop_id=tok.end_of_turn_id,
                               pad_id=tok.pad_id, batch_multiple=sharding.data_parallel_size(mesh))
    length = context
    seqs = [chat_data.response_sequence(prompts[i], chat.decode_reply(o, tok) or " ", tok, max_len=length,
                                        return_start=True) for i, o in zip(picks, outs)]
    tokens = np.full((len(seqs), 1, length), tok.pad_id, np.int32)
    last = np.zeros((len(seqs), 1), np.int32)
    first = np.zeros((len(seqs), 1), np.int32)
    for i, (s, start) in enumerate(seqs):
      tokens[i, 0, :len(s)] = s
      last[i, 0], first[i, 0] = len(s) - 1, start
    score = jax.jit(lambda p, t, l, f: reward_model.sequence_scores(model, p, t, l, f))
    rewards = []
    dp = sharding.data_parallel_size(mesh)
    with sharding.activate(mesh):
      for lo in range(0, len(seqs), 16 * dp):
        part = {"tokens": tokens[lo:lo + 16 * dp], "last": last[lo:lo + 16 * dp], "first": first[lo:lo + 16 * dp]}
        rows = part["tokens"].shape[0]
        pad = -rows % dp
        if pad:
          part = {k: np.concatenate([v, v[:pad]]) for k, v in part.items()}
        batch = sharding.host_to_global(part, mesh)
        scores = np.asarray(jax.device_get(score(state.params, batch["tokens"], batch["last"], batch["first"])))
        scores_NxM = scores if scores.ndim == 2 else scores[:, :, 0].T  # [N, 1]; [M, N, 1] for an ensemble
        rewards.extend(scores_NxM[:rows])
    rewards = np.asarray(rewards, np.float64)
    offsets, stds = rewards.mean(axis=0), rewards.std(axis=0)
    logging.info("Reward of %d SFT replies to training prompts: mean %s, std %s (stored as the offset).",
                 len(rewards), np.round(offsets, 4).tolist(), np.round(stds, 4).tolist())
    out = {"reward_offset": float(offsets.mean()), "reward_std": float(stds.mean()),
           "reward_normalize_samples": int(len(rewards))}
    if rewards.shape[1] > 1:  # an ensemble: each member is centred (and scaled) on its own (reward_model.Readout)
      out.update(reward_offsets=offsets.tolist(), reward_stds=stds.tolist())
    return out
  return normalize


def _drop_leading_axis(named: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(named.mesh, jax.sharding.PartitionSpec(*tuple(named.spec)[1:]))


def recipe(cfg: RewardConfig, ctx: recipe_lib.Context) -> recipe_lib.Recipe:
  k = cfg.data.max_responses
  # The data first: a bad record is reported before any checkpoint is read.
  dropped = agreement.labellers_below(cfg.data)
  groups = chat_data.load_comparisons(cfg.data.sources, max_responses=k, drop_labellers=dropped)
  model_cfg, tok, init_meta = recipe_lib.init_source(cfg.init, cfg.tokenizer_path, ctx.workdir, cfg.model,
                                                     expect_stage=("sft",))
  seq_len = min(cfg.data.max_len or model_cfg.max_len, model_cfg.max_len)
  if cfg.reward.normalize_samples and cfg.reward.normalize_max_new_tokens >= seq_len:
    raise config_lib.ConfigError(
        f"config.reward.normalize_max_new_tokens: {cfg.reward.normalize_max_new_tokens} leaves no room for a "
        f"prompt in the reward model's context of {seq_len} tokens (data.max_len or the model's); lower it.")
  train_groups, eval_groups, train_enc, eval_enc = chat_data.split_comparisons(groups, cfg.data, tok, seq_len=seq_len,
                                                                              what="Reward")
  n_train_pairs, n_eval_pairs = int(train_enc.pairs.sum()), int(eval_enc.pairs.sum())
  members = cfg.reward.ensemble
  if members == 1:
    train_iter = iter(chat_data.reward_dataset(train_enc, seed=cfg.seed, global_batch_size=cfg.data.batch_size,
                                               process_index=jax.process_index(), process_count=jax.process_count()))
  else:
    train_iter = chat_data.reward_member_batches(train_enc, seed=cfg.seed, members=members,
                                                 global_batch_size=cfg.data.batch_size,
                                                 process_index=jax.process_index(), process_count=jax.process_count())
  fingerprint_parts = dict(sources=list(cfg.data.sources), split_seed=cfg.data.split_seed,
                           eval_fraction=cfg.data.eval_fraction, seed=cfg.seed, seq_len=seq_len, max_responses=k,
                           global_batch_size=cfg.data.batch_size, process_count=jax.process_count(),
                           tokenizer_sha256=tok.sha256, num_prompts=len(train_groups), num_pairs=n_train_pairs,
                           **({"ensemble": members} if members > 1 else {}))
  fingerprint_parts.update(agreement.fingerprint_parts(cfg.data, dropped, groups))
  model = reward_model.make_reward_model(model_cfg, members, head_init_std=cfg.reward.head_init_std,
                                        pooling=cfg.reward.pooling)

  def init_from(params, shardings):  # the SFT transformer under a fresh head (each member's own)
    abstract = ckpt_lib.abstract_like(params, shardings)
    if members > 1:  # one SFT transformer, without the members' axis
      abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype,
                                                             sharding=_drop_leading_axis(x.sharding)), abstract)
    backbone, _, where = ckpt_lib.load_params(cfg.init.checkpoint, abstract["transformer"], step=cfg.init.step,
                                              tokenizer_sha256=tok.sha256, unused_ok=reward_model.UNUSED_LM_PARAMS)
    if members > 1:  # every member starts from the SFT transformer; their heads and data orders differ
      backbone = jax.jit(lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (members,) + x.shape), tree),
                         out_shardings=shardings["transformer"])(backbone)
    logging.info("Initialised the transformer%s from %s; the reward head%s fresh.",
                 f" of each of {members} members" if members > 1 else "", where, "s are" if members > 1 else " is")
    return {**params, "transformer": backbone}

  eval_batches = chat_data.reward_eval_batches(eval_enc, batch_size=cfg.data.batch_size,
                                               max_batches=cfg.data.eval_batches, process_index=jax.process_index(),
                                               process_count=jax.process_count())
  # The gold judge: the automatic labeller of every comparison, if one did them all (then policies trained on
  # this RM are measured by it); None for people's labels.
  gold = chat_data.gold_judge(groups)
  labelled_by = collections.Counter(name for g in groups for name in g.labellers)
  logging.info("Comparisons labelled by %s; gold judge: %s.", dict(labelled_by), gold or "none (not one judge)")
  tokens_per_step = cfg.data.batch_size * k * seq_len
  return recipe_lib.Recipe(
      stage="reward", tokenizer=tok, model_config=model_cfg, model=model, seq_len=seq_len,
      loss_fn=reward_loss_fn(model, cfg.reward.margin_scale), train_iter=train_iter,
      fingerprint=data_lib.pipeline_fingerprint(stage="reward", **fingerprint_parts),
      fingerprint_parts=fingerprint_parts, tokens_per_step=tokens_per_step,
      flops_per_step=model_lib.flops_per_token(model_cfg, seq_len, lm_head=False) * tokens_per_step,
      meta={"init_checkpoint": init_meta["init_checkpoint"], "head": "reward_head", "pooling": cfg.reward.pooling,
            "ensemble": members, "context": seq_len, "eval_pairs": n_eval_pairs, "eval_prompts": len(eval_groups),
            "gold_judge": gold, "labellers": dict(labelled_by), "labellers_dropped": dropped},
      members=members, init_from=init_from,
      eval_fn=make_reward_eval_fn(model, ctx.mesh, eval_batches, cfg.reward.margin_scale) if eval_batches else None,
      final_meta_fn=make_normalizer(cfg, model, ctx.mesh, tok, [g.prompt for g in train_groups], seq_len))


def run(cfg: RewardConfig) -> trainer.TrainState:
  """Trains (or resumes training) the reward model."""
  return recipe_lib.train(cfg, lambda ctx: recipe(cfg, ctx))
