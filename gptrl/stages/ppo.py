"""Stage 4, RLHF with PPO: the policy (from SFT) answers prompts, the frozen reward model scores the answers, a
per-token KL penalty against the frozen SFT policy keeps it close, and PPO with a value function improves it.

One iteration:
  1. rollout: `ppo.rollout_batch_size` training prompts -> sampled responses (KV-cache sampler, fixed shapes);
  2. score (two jitted functions, `Scorer`): the frozen models' part, the reference's log-probs of the response
     tokens and the reward model's score at the response's last token (minus its stored offset); then the
     policy's log-probs, the critic's values, the per-token KL estimate, rewards = -beta * KL per token + score at
     the last token, and GAE advantages/returns;
  3. learn: `ppo.epochs` passes over minibatches with the clipped surrogate, clipped value loss and entropy
     bonus (the shared jitted train step of gptrl/trainer.py: clipping, non-finite skip, grad accumulation);
  4. adapt beta toward `ppo.target_kl` (Ziegler et al. 2019).

The same stage runs the critic-free algorithms (config.stage "grpo" and "rloo", their group config.grpo / config.rloo,
`cfg.algo` here): each iteration samples `group_size` replies to each of rollout_batch_size / group_size prompts,
and a reply's advantage, on each of its tokens, is its return against its group's (GRPO: mean and std, Dr. GRPO:
mean) or against the other replies' mean (RLOO) instead of GAE over a critic's values; the loss is averaged per
token or per reply as `loss_aggregation` says. Metrics are named by the group ("grpo/reward").

Parameters in the train state: {"policy": GPT params, "value": critic params}; with `ppo.critic="separate"` the
critic is a scalar-head transformer of its own (initialised from the reward model or SFT), with "shared" a
value head on the policy's final hidden states. The reference policy and the reward model are frozen params
outside the train state.

Placement (`ppo.placement`, `Placement`): colocated, everything runs on config.mesh. Split, the devices are cut
into disjoint meshes: the learner's (train state, shaping, updates), the sampler's (generation with a copy of the
policy, moved device to device from the training layout into the sampler's after every update phase:
`time/weight_sync_s`) and, optionally, the frozen models' (reference and reward model; their outputs move device
to device onto the learner's batch layout). Results equal the colocated ones up to float summation order.

Checks every iteration, logged: on the first minibatch the probability ratio is 1 and the approximate KL is 0
(the trainer recomputes what the rollout computed, by the same code: per row, or per group of replies to one
prompt in both), and the sampler's own log-probs agree with the scorer's; a breach is a warning with numbers.

Resume: the train state (policy, critic, optimizer, step, RNG) is an Orbax checkpoint; beta, the prompt (and
PPO-ptx) iterator positions and the pipeline fingerprint are in its data item. Every random draw derives from
(seed, iteration), so a killed run resumes to the same result.

Reading order: `Learner.iteration` (rollout -> score -> learn -> checks -> beta) returns an `Iteration`;
`PPOTask` makes it the unit of work of the one run loop (gptrl/loop.py: cadence, preemption, rollback); `run` is
the set-up as named steps: read_reward_model, check_shapes, make_models, load_prompts, the train state,
init_from_previous_stages (or resume), ptx_stream, then the loop.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Callable

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from gptrl import chat
from gptrl import chat_data
from gptrl import checkpoint as ckpt_lib
from gptrl import config as config_lib
from gptrl import data as data_lib
from gptrl import decoding
from gptrl import fileio
from gptrl import judges as judges_lib
from gptrl import loop as loop_lib
from gptrl import losses
from gptrl import model as model_lib
from gptrl import optim
from gptrl import ppo_math as pm
from gptrl import reward_model
from gptrl import rewards as rewards_lib
from gptrl import seeds
from gptrl import sharding
from gptrl import stages as stages_lib
from gptrl import trainer
from gptrl.config import PPOConfig
from gptrl.corpus import default_cache_dir
from gptrl.metrics import truncate_jsonl_after
from gptrl.stages import recipe as recipe_lib

# Rollout arrays: B responses, L = P + N token buffer (P prompt slots, left-padded; N response slots).
ROLLOUT_KEYS = ("tokens", "positions", "attention", "response_mask", "logp", "ref_logp", "values", "advantages",
                "returns", "kl", "sampler_logp")
# Every held-out eval reply with its RM reward and watch-judge scores, one line per eval: the report's SFT-vs-PPO table.
EVAL_REPLIES_FILE = "eval_replies.jsonl"


@dataclasses.dataclass(frozen=True)
class Models:
  policy: model_lib.GPT
  # ScalarHeadModel (separate), ScalarHead (shared, applied to the policy's hidden states), or None (critic-free)
  critic: nn.Module | None
  reward: reward_model.ScalarHeadModel | reward_model.RewardEnsemble
  shared: bool
  prompt_len: int  # P
  new_tokens: int  # N
  reward_context: int = 0  # the reward model's training context (its meta's "context"); 0: the whole sequence
  end_id: int = -1  # <|end|>: an unfinished reply is scored with it appended, as the RM's training replies end
  temperature: float = 1.0  # the sampler's: the policy's and reference's logits are divided by it when scored


def make_models(model_cfg: Any, rm_cfg: Any, p: Any, *, ensemble: int = 1, pooling: str = "last",
                reward_context: int = 0, end_id: int = -1) -> Models:
  """PPO's models: the policy (`model_cfg`), its critic as `p` (a PPOAlgoConfig: critic, value_head_init_std,
  max_new_tokens) says, and the reward model (`rm_cfg`; an ensemble of `ensemble` members, pooled by `pooling`)."""
  shared = p.critic == "shared"
  critic = (None if p.critic == "none" else
            reward_model.ScalarHead(p.value_head_init_std, name="value_head") if shared else
            reward_model.ScalarHeadModel(model_cfg, head_init_std=p.value_head_init_std, head_name="value_head"))
  return Models(policy=model_lib.GPT(model_cfg), critic=critic,
                reward=reward_model.make_reward_model(rm_cfg, ensemble, pooling=pooling), shared=shared,
                prompt_len=model_cfg.max_len - p.max_new_tokens, new_tokens=p.max_new_tokens,
                reward_context=reward_context, end_id=end_id, temperature=p.temperature)


def init_params(models: Models, rng: jax.Array) -> dict[str, Any]:
  """Fresh (boxed) parameters of the train state: {"policy": GPT params, "value": the critic's} ({"policy"} alone
  without a critic). A run replaces them with the SFT policy and the configured critic init
  (`init_from_previous_stages`); gptrl/memory.py sizes them."""
  cfg = models.policy.config
  example = np.zeros((1, cfg.max_len), np.int32)
  r_policy, r_value = jax.random.split(rng)
  params = {"policy": models.policy.init(r_policy, example)["params"]}
  if models.critic is not None:
    critic_input = jnp.zeros((1, cfg.max_len, cfg.d_model), jnp.float32) if models.shared else example
    params["value"] = models.critic.init(r_value, critic_input)["params"]
  return params


def _response_slice(x_BxLx: jax.Array, models: Models) -> jax.Array:
  """The positions whose outputs predict / evaluate the N response tokens: P-1 .. P+N-2."""
  return x_BxLx[:, models.prompt_len - 1:models.prompt_len - 1 + models.new_tokens]


def _response_positions(models: Models) -> tuple[int, int]:
  """(first, count) of the positions `_response_slice` keeps: the logits are projected there only."""
  return models.prompt_len - 1, models.new_tokens


def response_logits(models: Models, params: Any, batch: dict[str, jax.Array], group_size: int = 1,
                    return_hidden: bool = False) -> Any:
  """The GPT's (policy's or reference's) float32 logits at the positions that predict the N response tokens,
  [B, N, V] (and with `return_hidden` its final hidden states there, [B, N, D]).

  group_size > 1: the rows come in runs of that many replies to one prompt (GRPO's groups), whose prompts are
  equal: each run's prompt (all but its last token) goes through the model once, into a key/value cache copied
  to the run's rows, and then every row's last prompt token and reply (N tokens) attend over it: for G replies
  of N tokens to a prompt of P, (P - 1) + G * N positions instead of G * (P + N). The same values as
  group_size=1 up to float rounding."""
  p, n = models.prompt_len, models.new_tokens
  tokens, positions, attention = batch["tokens"], batch["positions"], batch["attention"]
  if group_size == 1:
    out = models.policy.apply({"params": params}, tokens, positions_BxT=positions, attention_mask_BxT=attention,
                              return_hidden=return_hidden, logits_slice=_response_positions(models))
    return (out[0], _response_slice(out[1], models)) if return_hidden else out
  _, cache = decoding.prefill_groups(models.policy, params, tokens, positions, attention, prefix_len=p - 1,
                                     group_size=group_size, compute_logits=False)
  span = lambda x_BxL: x_BxL[:, p - 1:p - 1 + n]
  out, _ = models.policy.apply({"params": params, "cache": cache}, span(tokens), positions_BxT=span(positions),
                               attention_mask_BxT=span(attention), decode=True, mutable=["cache"],
                               return_hidden=return_hidden)
  return out


def evaluate_actions(models: Models, params: Any, batch: dict[str, jax.Array],
                     group_size: int = 1) -> dict[str, jax.Array]:
  """Log-probs (fp32) and values of the response tokens under `params` (values 0 without a critic), and the
  policy's logits there: the one function both the rollout (old) and the learner (new) use, so that on unchanged
  parameters the ratio is 1 (exactly, but for the rounding of a rollout scored by `group_size` runs:
  `response_logits`)."""
  logits, hidden_BxNxD = response_logits(models, params["policy"], batch, group_size, return_hidden=True)
  # The distribution the sampler drew from, before truncation: pi_T = softmax(logits / T).
  logits_BxNxV = logits.astype(jnp.float32) / models.temperature
  logp_BxN = losses.token_log_probs(logits_BxNxV, batch["tokens"][:, models.prompt_len:])
  if models.critic is None:
    values_BxN = jnp.zeros(logp_BxN.shape, jnp.float32)
  elif models.shared:
    values_BxN = models.critic.apply({"params": params["value"]}, hidden_BxNxD)
  else:
    values_BxN = _response_slice(models.critic.apply({"params": params["value"]}, batch["tokens"],
                                                     positions_BxT=batch["positions"],
                                                     attention_mask_BxT=batch["attention"]), models)
  return {"logp": logp_BxN, "values": values_BxN, "logits": logits_BxNxV}


def reference_logits(models: Models, ref_params: Any, batch: dict[str, jax.Array], group_size: int = 1) -> jax.Array:
  """The reference's logits at the response positions, divided by the sampler's temperature as the policy's are
  (so that the KL at the start, policy = reference, is 0 at any temperature); `group_size`: `response_logits`."""
  return response_logits(models, ref_params, batch, group_size).astype(jnp.float32) / models.temperature


def reward_model_score(models: Models, rm_params: Any, batch: dict[str, jax.Array]) -> jax.Array:
  """The reward model's raw score of each response, read at its last token (its <|end|> when it finished): [B, M],
  one column per member of an ensemble (M = 1 for a single model)."""
  tokens_BxT, attention_BxT, positions_BxT = batch["tokens"], batch["attention"], batch["positions"]
  length_B = jnp.sum(batch["response_mask"], axis=1).astype(jnp.int32)
  last_B = models.prompt_len + jnp.maximum(length_B, 1) - 1
  first_B = jnp.full_like(last_B, models.prompt_len)  # prompts are left-padded to prompt_len
  if models.end_id >= 0:
    # A reply cut at max_new_tokens has no <|end|>, but every reply the RM learnt from ends with one (the labeller
    # judges the text, finished or not): shift the row left by one token (its first is left padding, or the
    # prompt's earliest token) and append <|end|>, where the score is read.
    cut_B = batch["truncated"].astype(jnp.bool_)
    shift = lambda x, last_column: jnp.where(cut_B[:, None], jnp.concatenate([x[:, 1:], last_column], axis=1), x)
    b = tokens_BxT.shape[0]
    tokens_BxT = shift(tokens_BxT, jnp.full((b, 1), models.end_id, tokens_BxT.dtype))
    attention_BxT = shift(attention_BxT, jnp.ones((b, 1), attention_BxT.dtype))
    first_B = jnp.where(cut_B, first_B - 1, first_B)
    last_B = jnp.where(cut_B, tokens_BxT.shape[1] - 1, last_B)
  if models.reward_context and models.reward_context < attention_BxT.shape[1]:
    # As the RM was trained: only the latest `reward_context` tokens up to the reply's end (the prompt's start is
    # masked out and the positions restart where the kept tokens begin).
    index_T = jnp.arange(attention_BxT.shape[1])[None, :]
    attention_BxT = attention_BxT * (index_T > last_B[:, None] - models.reward_context).astype(attention_BxT.dtype)
  if models.end_id >= 0 or models.reward_context:
    positions_BxT = jnp.maximum(jnp.cumsum(attention_BxT, axis=1) - 1, 0).astype(positions_BxT.dtype)
  return reward_model.pooled_member_scores(models.reward, rm_params, tokens_BxT, last_B, first_B,
                                           valid_BxT=attention_BxT, positions_BxT=positions_BxT,
                                           attention_mask_BxT=attention_BxT)


@dataclasses.dataclass(frozen=True)
class Scorer:
  """The scoring of a rollout, in two jitted parts so that the frozen models may live on a mesh of their own:
    frozen(ref_params, rm_params, batch) -> {"ref_logp" [B, N] (or "ref_logits" [B, N, V] for the exact KL),
      "raw_score" [B]}: the reference's log-probs of the response tokens and the reward model's raw score;
    shaping(params, frozen, batch, beta) -> (rollout arrays, per-response stats): the policy's log-probs and the
      critic's values, the per-token KL, rewards, GAE advantages and returns.
  Both take a static `group_size=G` (default 1) when the batch's rows come in runs of G replies to one prompt:
  the policy and reference then read each prompt once (`response_logits`).
  """
  frozen: Any
  shaping: Any


def make_score_fn(models: Models, cfg: PPOConfig, readout: reward_model.Readout | float,
                  raw_score_fn=None) -> Scorer:
  """The rollout's Scorer. `readout` turns raw scores into the reward (a float: a single RM's offset).
  raw_score_fn(rm_params, batch) -> [B] or [B, M] replaces the reward model (tests use synthetic rewards)."""
  p = cfg.algo
  if not isinstance(readout, reward_model.Readout):
    readout = reward_model.Readout(offsets=(float(readout),))
  raw_score_fn = raw_score_fn or (lambda rm_params, batch: reward_model_score(models, rm_params, batch))

  def frozen(ref_params, rm_params, batch, group_size=1):
    ref_logits = reference_logits(models, ref_params, batch, group_size)
    raw = raw_score_fn(rm_params, batch).astype(jnp.float32)
    out = {"raw_score": raw[:, None] if raw.ndim == 1 else raw}  # [B, M]
    if p.kl_estimator == "full":
      out["ref_logits"] = ref_logits.astype(jnp.float32)
    else:
      out["ref_logp"] = losses.token_log_probs(ref_logits, batch["tokens"][:, models.prompt_len:])
    return out

  def shaping(params, frozen_out, batch, beta, group_size=1):
    mask = batch["response_mask"].astype(jnp.float32)
    out = evaluate_actions(models, params, batch, group_size)
    targets = batch["tokens"][:, models.prompt_len:]
    if p.kl_estimator == "full":
      ref_logp = losses.token_log_probs(frozen_out["ref_logits"], targets)
      kl = pm.exact_kl(out["logits"], frozen_out["ref_logits"])
    else:
      ref_logp = frozen_out["ref_logp"]
      kl = pm.kl_estimate(out["logp"], ref_logp, p.kl_estimator)
    kl = jnp.where(mask > 0, kl, 0.0)
    length_B = jnp.sum(mask, axis=1).astype(jnp.int32)
    raw_BxM = frozen_out["raw_score"]
    centred_BxM = readout.centred(raw_BxM)
    score_B = p.reward_gain * readout(raw_BxM) + p.reward_bias
    if "code_reward" in batch:  # rewards as code (gptrl/rewards.py), computed on the host from the decoded texts
      score_B = score_B + batch["code_reward"]
    if p.whiten_rewards:
      score_B = pm.masked_whiten(score_B, jnp.ones_like(score_B), shift_mean=False)
    truncated_B = batch["truncated"].astype(jnp.bool_)
    rewards = pm.per_token_rewards(score_B, kl, mask, beta if p.kl_in_reward else 0.0, truncated_B=truncated_B,
                                   truncation_penalty=p.truncation_penalty)
    values = jnp.where(mask > 0, out["values"], 0.0)
    if p.advantage == "gae":
      advantages, returns = pm.gae(rewards, values, mask, p.gamma, p.lam)
    else:
      # Critic-free: one advantage per reply, on each of its tokens; the return of a reply is the sum of its
      # per-token rewards (its score, minus beta * its KL when the KL is in the reward).
      return_B = jnp.sum(rewards, axis=1)
      if p.advantage == "group":
        advantage_B = pm.group_advantages(return_B, batch["group"], std_norm=p.group_std_norm)
      elif p.advantage == "leave_one_out":
        advantage_B = pm.leave_one_out_advantages(return_B, batch["group"])
      else:  # best_of_n: the reply the reward picks in each group
        advantage_B = pm.best_of_n_advantages(return_B, batch["group"])
      advantages = jnp.where(mask > 0, advantage_B[:, None], 0.0)
      returns = jnp.where(mask > 0, return_B[:, None], 0.0)
    if p.whiten_advantages:
      advantages = pm.masked_whiten(advantages, mask)
    # The KL each reply is reported (and the adaptive beta steered) by: the exact one with "full", else the k1
    # estimate, log pi - log ref summed over the reply, whatever estimator the penalty uses (k3 is GRPO's): every
    # method's eval/kl is then the same estimate of the same quantity.
    kl_report = kl if p.kl_estimator == "full" else jnp.where(mask > 0, out["logp"] - ref_logp, 0.0)
    stats = {"score": score_B, "raw_score": jnp.mean(raw_BxM, axis=1), "kl_sum": jnp.sum(kl_report, axis=1),
             "length": length_B, "entropy": pm.entropy(out["logits"], mask),
             # How much an ensemble's members disagree about each reply (0 for one model).
             "ensemble_std": jnp.std(centred_BxM, axis=1), "proxy_mean": jnp.mean(centred_BxM, axis=1)}
    return {"logp": out["logp"], "ref_logp": ref_logp, "values": values, "advantages": advantages,
            "returns": returns, "kl": kl}, stats
  return Scorer(frozen=jax.jit(frozen, static_argnames="group_size"),
                shaping=jax.jit(shaping, static_argnames="group_size"))


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where PPO's models run (ppo.placement): `learner` holds the train state (policy and critic) and runs the
  shaping and the updates; `sampler` generates with a copy of the policy; `scorer` runs the frozen reference and
  reward model. Colocated, all three are one mesh and nothing is copied."""
  learner: jax.sharding.Mesh
  sampler: jax.sharding.Mesh
  scorer: jax.sharding.Mesh

  @classmethod
  def colocated(cls, mesh: jax.sharding.Mesh) -> "Placement":
    return cls(mesh, mesh, mesh)

  @property
  def split_sampler(self) -> bool:
    return self.sampler is not self.learner

  @property
  def split_scorer(self) -> bool:
    return self.scorer is not self.learner


def make_placement(mesh_cfg: Any, p: Any, devices: list[jax.Device] | None = None) -> Placement:
  """The meshes of `ppo.placement` over `devices` (default: all): colocated, config.mesh over all of them;
  split, config.mesh over the first ones, then the sampler's `p.sampler_devices` and the scorer's
  `p.scorer_devices` (data=-1, fsdp=1, tensor=p.split_tensor)."""
  devices = list(jax.devices() if devices is None else devices)
  if p.placement == "colocated":
    return Placement.colocated(sharding.make_mesh(mesh_cfg, devices, whole=True))
  n_learner = len(devices) - p.sampler_devices - p.scorer_devices
  if n_learner < 1:
    raise config_lib.ConfigError(
        f"config.{p.group}.sampler_devices: {p.sampler_devices} sampler + {p.scorer_devices} scorer devices leave "
        f"{n_learner} of the {len(devices)} devices for the learner; it needs at least 1.")
  sub = config_lib.MeshConfig(data=-1, fsdp=1, tensor=p.split_tensor)
  for name, n in (("sampler_devices", p.sampler_devices), ("scorer_devices", p.scorer_devices)):
    if n and n % p.split_tensor:
      raise config_lib.ConfigError(f"config.{p.group}.{name}: {n} devices cannot hold tensor-parallel groups "
                                   f"of {p.group}.split_tensor={p.split_tensor}.")
  learner = sharding.make_mesh(mesh_cfg, devices[:n_learner])
  sampler = sharding.make_mesh(sub, devices[n_learner:n_learner + p.sampler_devices])
  scorer = sharding.make_mesh(sub, devices[n_learner + p.sampler_devices:]) if p.scorer_devices else learner
  logging.info("PPO placement: learner on %d devices %s, sampler on %d, frozen models on %d%s.", learner.size,
               dict(learner.shape), sampler.size, scorer.size, "" if scorer is not learner else " (the learner's)")
  return Placement(learner, sampler, scorer)


def make_ppo_loss(models: Models, cfg: Any, group_size: int = 1):
  """loss_fn(params, minibatch, rng) -> (loss_sum, sums) for trainer.make_train_step. Every per-token term (the
  clipped surrogate, the clipped value error, the entropy bonus, the KL loss term) is summed and averaged as
  `loss_aggregation` says (`ppo_math.aggregate`: weight = the minibatch's tokens or replies), so micro-batching does
  not change the result. `group_size`: the minibatch's rows come in runs of that many replies to one prompt
  (`learn_group_size`)."""
  p = cfg.algo

  def loss_fn(params, batch, rng):
    del rng
    mask = batch["response_mask"].astype(jnp.float32)
    out = evaluate_actions(models, params, batch, group_size)
    pg_BxN, pg_stats = pm.clipped_surrogate(out["logp"], batch["logp"], batch["advantages"], mask, p.clip_eps,
                                            p.clip_eps_high)
    if p.policy_loss == "nll":  # supervised: -A * log pi (the ratio's stats stay as diagnostics)
      pg_BxN = jnp.where(mask > 0, -batch["advantages"] * out["logp"], 0.0)
    terms, diagnostics = {}, {}
    if p.is_correction != "none":  # the sampler's distribution is not the learner's: weight by pi / sampler
      weight_BxN, corrected_BxN = pm.importance_weights(batch["logp"], batch["sampler_logp"], mask, p.is_correction,
                                                        p.is_threshold)
      pg_BxN = pg_BxN * weight_BxN
      diagnostics.update(is_weight=weight_BxN, is_corrected=corrected_BxN)
    terms["policy_loss"] = pg_BxN
    if models.critic is not None:
      terms["value_loss"], diagnostics["value_clip_frac"] = pm.clipped_value_error(
          out["values"], batch["values"], batch["returns"], mask, p.clip_eps_value)
    if p.entropy_coef > 0:
      terms["entropy"] = pm.token_entropy(out["logits"], mask)
    else:  # a diagnostic only: no gradient through it
      terms["entropy"] = jax.lax.stop_gradient(pm.token_entropy(out["logits"], mask))
    if not p.kl_in_reward:
      terms["kl_loss"] = pm.kl_estimate(out["logp"], batch["ref_logp"], "k3", mask)
    per_token = pg_BxN - p.entropy_coef * terms["entropy"]
    if "value_loss" in terms:
      per_token = per_token + p.vf_coef * terms["value_loss"]
    if "kl_loss" in terms:
      per_token = per_token + batch["beta"][:, :1] * terms["kl_loss"]
    loss_sum, weight = pm.aggregate(per_token, mask, p.loss_aggregation)
    sums = {k: pm.aggregate(v, mask, p.loss_aggregation)[0] for k, v in terms.items()}
    # Diagnostics are means over the same weight: per token, or per reply (whose token sum over T is no mean).
    diagnostics.update({"clip_frac": pg_stats["clipped"], "ratio_mean": pg_stats["ratio"],
                        "approx_kl": 0.5 * jnp.square(pg_stats["log_ratio"])})
    if p.loss_aggregation == "sequence_sum":
      diagnostics["entropy"] = terms["entropy"]
    mode = "sequence_mean" if p.loss_aggregation == "sequence_sum" else p.loss_aggregation
    sums.update({k: pm.aggregate(v, mask, mode)[0] for k, v in diagnostics.items()})
    for k in ("value_loss", "value_clip_frac", "kl_loss", "is_weight", "is_corrected"):
      sums.setdefault(k, jnp.zeros(()))
    ratio_max = jnp.max(jnp.where(mask > 0, pg_stats["ratio"], 0.0))
    ptx = jnp.zeros(())
    if p.ptx_coef > 0:
      ptx_logits = models.policy.apply({"params": params["policy"]}, batch["ptx_inputs"])
      ptx_sum, ptx_weight = losses.weighted_cross_entropy(ptx_logits, batch["ptx_targets"], batch["ptx_weights"])
      ptx = ptx_sum / jnp.maximum(ptx_weight, 1.0)
      loss_sum = loss_sum + p.ptx_coef * ptx * weight
    sums.update(weight=weight, ptx_loss=ptx * weight, ratio_max=ratio_max * weight)
    return loss_sum, sums
  return loss_fn


class Prompts:
  """An endless, shuffled, checkpointable stream of encoded training prompts (grain), `batch` per call."""

  def __init__(self, prompts: list[list[int]], *, seed: int, batch: int):
    if len(prompts) < batch:
      raise data_lib.DataError(f"{len(prompts)} training prompts, fewer than the {batch} an iteration needs "
                               "(rollout_batch_size / group_size).")
    self._prompts = prompts
    ds = data_lib.index_batches(len(prompts), seed=seed, batch_size=batch, drop_remainder=False)
    self._iter = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))

  def next(self) -> list[list[int]]:
    return [self._prompts[int(i)] for i in next(self._iter)]

  def get_state(self):
    return self._iter.get_state()

  def set_state(self, state):
    self._iter.set_state(state)


def _last_turn(prompt: list[int], tok: Any) -> str:
  turns = [m for m in chat.parse(prompt, tok) if m.content]
  return turns[-1].content if turns else ""


def build_rollout_batch(prompts: list[list[int]], responses: list[list[int]], *, prompt_len: int, new_tokens: int,
                        pad_id: int, stop_id: int) -> dict[str, np.ndarray]:
  """Left-padded prompt + right-padded response buffers with positions and masks, as the sampler laid them out."""
  b = len(prompts)
  tokens, attention, positions, _ = decoding.prompt_buffer(prompts, max_len=prompt_len + new_tokens,
                                                          max_new_tokens=new_tokens, pad_id=pad_id,
                                                          batch_multiple=1, min_prompt_len=prompt_len)
  response_mask = np.zeros((b, new_tokens), np.int32)
  truncated = np.zeros((b,), np.int32)
  for i, r in enumerate(responses):
    tokens[i, prompt_len:prompt_len + len(r)] = r
    attention[i, prompt_len:prompt_len + len(r)] = 1
    response_mask[i, :len(r)] = 1
    truncated[i] = int(not r or r[-1] != stop_id)
  return {"tokens": tokens, "positions": positions, "attention": attention, "response_mask": response_mask,
          "truncated": truncated}


def save_rollout(directory: str, iteration: int, arrays: dict[str, np.ndarray]) -> None:
  """One .npz per iteration (local or gs://); RolloutSource reads them back as grain-indexable records (one per
  response)."""
  fileio.makedirs(directory)
  with fileio.atomic_open(os.path.join(directory, f"iter_{iteration:06d}.npz"), "wb") as f:
    np.savez(f, **arrays)


def _load_npz(path: str) -> dict[str, np.ndarray]:
  with fileio.open(path, "rb") as f, np.load(f) as z:
    return {k: z[k] for k in z.files}


class RolloutSource:
  """A grain RandomAccessDataSource over saved rollouts: record i is one response's arrays (and its iteration)."""

  def __init__(self, directory: str):
    self._files = sorted(os.path.join(directory, f) for f in fileio.listdir(directory)
                         if f.startswith("iter_") and f.endswith(".npz") and ".tmp" not in f)
    self._index = []
    for f_i, f in enumerate(self._files):
      self._index.extend((f_i, r) for r in range(_load_npz(f)["tokens"].shape[0]))

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    f_i, r = self._index[i]
    rec = {k: v[r] for k, v in _load_npz(self._files[f_i]).items()}
    rec["iteration"] = np.int32(int(os.path.basename(self._files[f_i])[5:11]))
    return rec


def append_eval_replies(workdir: str, step: int, replies: list[dict[str, Any]]) -> None:
  """Appends one eval's per-prompt records (see Learner.evaluate) as `{"step", "replies"}` to EVAL_REPLIES_FILE."""
  fileio.append(os.path.join(workdir, EVAL_REPLIES_FILE),
                json.dumps({"step": int(step), "replies": replies}, ensure_ascii=False) + "\n")


@dataclasses.dataclass
class Iteration:
  """What one PPO iteration returns."""
  state: trainer.TrainState
  row: dict[str, float]  # the metrics row
  beta: float  # the KL coefficient for the next iteration
  prompts: list[list[int]]
  responses: list[list[int]]
  stats: dict[str, np.ndarray]  # per response: score, raw_score, kl_sum, length, ...
  rollout: dict[str, np.ndarray]  # the rollout buffer (ROLLOUT_KEYS and more) with each response's score


@dataclasses.dataclass
class Evaluation:
  """What an evaluation on the held-out prompts returns."""
  metrics: dict[str, float]
  texts: list[str]  # a few replies with their reward, for samples.jsonl
  replies: list[dict[str, Any]]  # one record per prompt (with `tok`): turns, reply, reward, KL, length, judges


def learned_rows(p: Any) -> int:
  """Replies an iteration's updates learn from: the whole rollout, or with best_of_n each group's winner."""
  return p.rollout_batch_size // p.group_size if p.advantage == "best_of_n" else p.rollout_batch_size


def updates_per_iteration(p: Any) -> int:
  return p.epochs * (learned_rows(p) // p.minibatch_size)


def num_updates(cfg: PPOConfig) -> int:
  """Optimizer steps of the whole run (the learning-rate schedule's length)."""
  return cfg.train.steps * updates_per_iteration(cfg.algo)


def learn_group_size(cfg: PPOConfig, models: Models, mesh: jax.sharding.Mesh) -> int:
  """The runs of replies to one prompt that the updates' minibatches are made of (`group_minibatches`), each
  prompt then read once per run: the algorithm's group_size where each micro-batch splits into whole groups
  evenly over the data-parallel shards, else 1 (replies shuffled one by one)."""
  p, g = cfg.algo, cfg.algo.group_size
  micro_batch = p.minibatch_size // cfg.optim.grad_accum_steps
  model_cfg = models.policy.config
  # The grouped forward attends over a key/value cache (dense scores), not by the splash kernel, which the
  # memory estimate of a splash plan assumes: such plans keep reading every row whole.
  if (g > 1 and p.group_minibatches and p.advantage != "best_of_n" and models.prompt_len > 1
      and not model_lib.uses_splash(model_cfg, model_cfg.max_len)
      and micro_batch % (g * sharding.data_parallel_size(mesh)) == 0):
    return g
  return 1


def score_group_size(cfg: PPOConfig, models: Models, mesh: jax.sharding.Mesh, rows: int, multiple: int,
                     group_size: int | None = None) -> int:
  """The runs in which scoring reads a rollout of `rows` replies in runs of `group_size` (default the algorithm's)
  equal prompts: the updates' runs (`learn_group_size`, so that the first update recomputes the old log-probs by
  the same code), where they split evenly over `multiple` (the meshes' data-parallel sizes); else 1."""
  g = cfg.algo.group_size if group_size is None else group_size
  if g > 1 and rows % (g * multiple) == 0 and learn_group_size(cfg, models, mesh) == g:
    return g
  return 1


def make_update_step(cfg: PPOConfig, models: Models, optimizer: Any, state_shardings: Any,
                     mesh: jax.sharding.Mesh) -> trainer.JittedStep:
  """The jitted PPO update (one minibatch: clipped surrogate, value loss, entropy, KL and ptx terms), for
  minibatches of `learn_group_size` runs."""
  return trainer.jit_train_step(
      trainer.make_train_step(make_ppo_loss(models, cfg, learn_group_size(cfg, models, mesh)), optimizer,
                              optim.learning_rate_schedule(cfg.optim, num_updates(cfg)), cfg.optim.grad_accum_steps,
                              **trainer.spike_options(cfg.train)),
      state_shardings, mesh)


def minibatch_shapes(cfg: PPOConfig, models: Models, seq_len: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """name -> (global shape, dtype) of one PPO minibatch as `Learner.learn` feeds the update (the rollout's
  arrays, beta, and with PPO-ptx the pretraining batch), for compiling the update without a rollout."""
  p, n = cfg.algo, models.new_tokens
  rows, length = p.minibatch_size, models.prompt_len + n
  shapes = {"tokens": ((rows, length), np.dtype(np.int32)), "positions": ((rows, length), np.dtype(np.int32)),
            "attention": ((rows, length), np.dtype(np.int32)), "response_mask": ((rows, n), np.dtype(np.int32)),
            **{k: ((rows, n), np.dtype(np.float32))
               for k in ("logp", "ref_logp", "values", "advantages", "returns", "kl", "sampler_logp")},
            "beta": ((rows, 1), np.dtype(np.float32))}
  if p.ptx_coef > 0:
    shapes.update({f"ptx_{k}": v for k, v in data_lib.lm_batch_shapes(rows, seq_len).items()})
  return shapes


class Learner:
  """One PPO iteration (rollout, scoring, learning, beta update) and the held-out evaluation, on a mesh."""

  def __init__(self, cfg: PPOConfig, models: Models, mesh: jax.sharding.Mesh, optimizer: Any, state_shardings: Any,
               ref_params: Any, rm_params: Any, score_fn: Scorer, *, pad_id: int, stop_id: int,
               placement: Placement | None = None, ptx_iter: Any = None,
               watch_judges: dict[str, judges_lib.Judge] | None = None, gold_judge: judges_lib.Judge | None = None,
               code_rewards: rewards_lib.CodeRewards | None = None, texts: Texts | None = None):
    """`mesh` is the learner's; `placement` (default: colocated on `mesh`) says where sampling and the frozen
    models run, and `ref_params` / `rm_params` must already live on its scorer mesh. `ptx_iter`: PPO-ptx's
    pretraining batches of minibatch_size rows; `watch_judges` and `gold_judge` score the eval replies;
    `code_rewards` add to every reply's score, called on `texts(prompts, responses)` (`conversation_texts`)."""
    self.cfg, self.models, self.mesh = cfg, models, mesh
    self.placement = placement or Placement.colocated(mesh)
    if self.placement.learner is not mesh:
      raise ValueError("Learner: placement.learner must be the learner's mesh.")
    self.ref_params, self.rm_params, self.score_fn = ref_params, rm_params, score_fn
    self.pad_id, self.stop_id = pad_id, stop_id
    self.ptx_iter, self.watch_judges, self.gold_judge = ptx_iter, watch_judges or {}, gold_judge
    self.code_rewards, self.texts = code_rewards, texts
    if code_rewards is not None and texts is None:
      raise ValueError("Learner: code_rewards need `texts` to decode the prompts and replies they score.")
    self.dp = sharding.data_parallel_size(mesh)
    self.sampler_dp = sharding.data_parallel_size(self.placement.sampler)
    self.scorer_dp = sharding.data_parallel_size(self.placement.scorer)
    self.sampler_shardings = None
    if self.placement.split_sampler:  # the policy's layout on the sampler's mesh, by the same sharding rules
      example = np.zeros((1, models.policy.config.max_len), np.int32)
      _, self.sampler_shardings = ckpt_lib.param_shardings(models.policy, example, self.placement.sampler)
    self._optimizer, self._state_shardings = optimizer, state_shardings

  @functools.cached_property
  def train_step(self) -> trainer.JittedStep:
    """The jitted update (made on first use: a Learner that only evaluates, as DPO's, never needs one)."""
    return make_update_step(self.cfg, self.models, self._optimizer, self._state_shardings, self.mesh)

  def sampler_params(self, params: Any) -> tuple[Any, float]:
    """(the policy's parameters where the sampler runs, seconds the copy took): colocated, `params["policy"]`
    itself; split, a copy on the sampler's mesh in its layout, moved device to device (no host copy)."""
    if not self.placement.split_sampler:
      return params["policy"], 0.0
    t0 = time.perf_counter()
    copy = jax.block_until_ready(jax.device_put(params["policy"], self.sampler_shardings))
    return copy, time.perf_counter() - t0

  def rollout(self, sampler_params: Any, prompts: list[list[int]], rng: jax.Array, group_size: int = 1):
    """(responses, the sampler's log-probs, host arrays of the rollout buffer), sampled with the policy's
    `sampler_params` (on the sampler's mesh: `sampler_params`). `prompts` come in runs of `group_size` copies of
    one prompt: the buffer's "group" says which run each reply belongs to."""
    p = self.cfg.algo
    with sharding.activate(self.placement.sampler):
      responses, sampler_logp = decoding.generate(
          self.models.policy, sampler_params, prompts, max_new_tokens=self.models.new_tokens, rng=rng,
          temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, stop_id=self.stop_id, pad_id=self.pad_id,
          batch_multiple=self.sampler_dp, return_logprobs=True, min_prompt_len=self.models.prompt_len,
          sampling_logprobs=True, group_size=group_size)
    host = build_rollout_batch(prompts, responses, prompt_len=self.models.prompt_len,
                               new_tokens=self.models.new_tokens, pad_id=self.pad_id, stop_id=self.stop_id)
    host["sampler_logp"] = np.zeros(host["response_mask"].shape, np.float32)  # log sampler(token)
    for i, row_logp in enumerate(sampler_logp):
      host["sampler_logp"][i, :len(row_logp)] = row_logp
    host["group"] = np.arange(len(prompts), dtype=np.int32) // group_size
    return responses, sampler_logp, host

  def add_code_rewards(self, host: dict[str, np.ndarray], prompts: list[list[int]],
                       responses: list[list[int]]) -> dict[str, np.ndarray]:
    """Puts the reward functions' weighted sum per reply in `host["code_reward"]` (scoring adds it); returns each
    function's scores by name ({} without reward functions)."""
    if self.code_rewards is None:
      return {}
    host["code_reward"], each = self.code_rewards(*self.texts(prompts, responses))
    return each

  def score(self, params: Any, host: dict[str, np.ndarray], beta: float, group_size: int = 1):
    """(rollout arrays, per-response stats) of a rollout buffer: the frozen models' part on the scorer's mesh,
    the shaping (log-probs, values, KL, rewards, GAE) on the learner's. `group_size`: the rows come in runs of
    that many replies to one prompt (`rollout`'s), each prompt then read once by the policy and reference where
    the runs split evenly over the meshes' data-parallel shards."""
    rows = host["tokens"].shape[0]
    multiple = int(np.lcm(self.dp, self.scorer_dp))
    pad = -rows % multiple
    group_size = score_group_size(self.cfg, self.models, self.mesh, rows, multiple, group_size)
    if pad:
      host = {k: np.concatenate([v, np.resize(v, (pad,) + v.shape[1:])]) for k, v in host.items()}
      # The copies are groups of their own: they must not enter a real group's baseline.
      host["group"][rows:] = host["group"][:rows].max() + 1 + np.arange(pad)
    scorer, learner = self.placement.scorer, self.mesh
    with sharding.activate(scorer):
      frozen = self.score_fn.frozen(self.ref_params, self.rm_params, sharding.host_to_global(host, scorer),
                                    group_size=group_size)
    if self.placement.split_scorer:  # the frozen models' outputs, device to device onto the learner's batch layout
      frozen = {k: jax.device_put(v, sharding.batch_sharding(learner, v.ndim)) for k, v in frozen.items()}
    with sharding.activate(learner):
      arrays, stats = self.score_fn.shaping(params, frozen, sharding.host_to_global(host, learner),
                                            jnp.float32(beta), group_size=group_size)
    arrays, stats = jax.device_get((arrays, stats))
    return ({k: np.asarray(v)[:rows] for k, v in arrays.items()},
            {k: np.asarray(v)[:rows] if np.ndim(v) else np.asarray(v) for k, v in stats.items()})

  def learn(self, state: trainer.TrainState, roll: dict[str, np.ndarray], beta: float, rng: jax.Array):
    """`ppo.epochs` passes over minibatches of the rollout, in an order drawn from `rng`; stops early, after any
    update, once that minibatch's approximate KL (measured before its update) exceeds `ppo.max_approx_kl`.
    Returns (state, per-update metrics, stopped)."""
    p = self.cfg.algo
    perm_rng = np.random.default_rng(np.asarray(jax.random.key_data(rng)).astype(np.uint32))
    learn_metrics = []
    rows = roll["tokens"].shape[0]
    group, accum = learn_group_size(self.cfg, self.models, self.mesh), self.cfg.optim.grad_accum_steps
    for _ in range(p.epochs):
      # The groups are shuffled (each kept whole, in order) when the update reads each prompt once per group.
      order = (perm_rng.permutation(rows // group)[:, None] * group + np.arange(group)).ravel()
      for m in range(rows // p.minibatch_size):
        idx = order[m * p.minibatch_size:(m + 1) * p.minibatch_size]
        if group > 1 and accum > 1:  # micro-batch j takes rows j, j + accum, ... (trainer): whole groups each
          idx = idx.reshape(accum, -1).T.ravel()
        mb = {k: roll[k][idx] for k in ROLLOUT_KEYS}
        mb["beta"] = np.full((p.minibatch_size, 1), beta, np.float32)  # rank 2: sharded like the batch
        if p.ptx_coef > 0:
          mb.update({f"ptx_{k}": v for k, v in next(self.ptx_iter).items()})
        state, metrics = self.train_step(state, sharding.host_to_global(mb, self.mesh))
        learn_metrics.append(jax.device_get(metrics))
        if p.max_approx_kl > 0 and float(learn_metrics[-1]["train/approx_kl"]) > p.max_approx_kl:
          return state, learn_metrics, True
    return state, learn_metrics, False

  def iteration(self, state: trainer.TrainState, prompts: list[list[int]], it: int, beta: float) -> Iteration:
    """One PPO iteration: rollout, scoring, learning, the invariants' check and the KL controller's update."""
    p = self.cfg.algo
    t0 = time.perf_counter()
    rng = jax.random.fold_in(jax.random.key(self.cfg.seed), it)
    sampler_params, sync_s = self.sampler_params(state.params)
    prompts = [prompt for prompt in prompts for _ in range(p.group_size)]  # group_size replies to each
    responses, sampler_logp, host = self.rollout(sampler_params, prompts, jax.random.fold_in(rng, 0), p.group_size)
    code_scores = self.add_code_rewards(host, prompts, responses)
    arrays, stats = self.score(state.params, host, beta, p.group_size)
    t_rollout = time.perf_counter() - t0
    roll = {**host, **arrays}
    # The sampler's log-probs against the learner's (pi_T at the rollout's parameters): equal up to rounding
    # without truncation; with it, their gap is the mismatch the importance weights correct (mismatch_kl: the
    # k1 estimate of KL(sampler || pi_T) per token).
    real = host["response_mask"] > 0
    gap = np.where(real, host["sampler_logp"] - roll["logp"], 0.0)
    sampler_gap = float(np.max(np.abs(gap))) if real.any() else 0.0
    mismatch_kl = float(gap.sum() / max(real.sum(), 1))
    learned, extra = roll, {}
    if p.advantage == "best_of_n":  # rejection sampling: the updates see each group's winner only
      winners = roll["advantages"][:, 0] > 0
      learned = {k: v[winners] for k, v in roll.items()}
      extra["winner_reward"] = float(np.mean(stats["score"][winners]))
    state, learn_metrics, stopped = self.learn(state, learned, beta, jax.random.fold_in(rng, 1))
    t_learn = time.perf_counter() - t0 - t_rollout

    # The invariants: the first minibatch sees ratio 1 and approximate KL 0 (same code, same params), and the
    # sampler's log-probs are the scorer's.
    first = learn_metrics[0]
    ratio0, kl0 = float(first["train/ratio_mean"]), float(first["train/approx_kl"])
    truncated = p.top_k > 0 or p.top_p < 1.0
    if abs(ratio0 - 1.0) > 1e-4 or kl0 > 1e-6 or (sampler_gap > 2e-2 and not truncated):
      logging.warning("PPO invariant breached at iteration %d: first-minibatch ratio %.6f (want 1), approx KL "
                      "%.3g (want 0), sampler vs scorer log-prob gap %.3g.", it, ratio0, kl0, sampler_gap)
    kl_mean = float(np.mean(stats["kl_sum"]))
    new_beta = float(pm.update_kl_coef(beta, kl_mean, target=p.target_kl, horizon=p.kl_horizon,
                                       n_steps=p.rollout_batch_size)) if p.target_kl > 0 else beta
    row = {"reward": float(np.mean(stats["score"])), "reward_std": float(np.std(stats["score"])),
           "raw_score": float(np.mean(stats["raw_score"])), "kl": kl_mean, "beta": beta,
           **({"ensemble_std": float(np.mean(stats["ensemble_std"]))}
              if reward_model.num_members(self.models.reward) > 1 else {}),
           "length": float(np.mean(stats["length"])), "truncated": float(np.mean(host["truncated"])),
           "first_ratio": ratio0, "first_approx_kl": kl0,
           "sampler_logp_gap": sampler_gap, "mismatch_kl": mismatch_kl, "updates": len(learn_metrics),
           "early_stopped": float(stopped)}
    row.update(extra)
    row.update({f"reward_fn/{name}": float(np.mean(v)) for name, v in code_scores.items()})
    if p.group_size > 1:  # how much the replies to one prompt differ; a group that all agree teaches nothing
      group_std = np.std(stats["score"].reshape(-1, p.group_size), axis=1)
      row.update(group_reward_std=float(group_std.mean()), zero_std_groups=float(np.mean(group_std < 1e-6)))
    for k in ("policy_loss", "value_loss", "entropy", "clip_frac", "value_clip_frac", "approx_kl", "ratio_mean",
              "ratio_max", "kl_loss", "ptx_loss", "grad_norm", "skipped") + (
                  ("is_weight", "is_corrected") if p.is_correction != "none" else ()):
      row[k] = float(np.mean([float(m[f"train/{k}"]) for m in learn_metrics]))
    for k in ("skipped_total", "spikes_total", "rollbacks"):  # the run's numerics-guard counts (gptrl/trainer.py)
      row[k] = float(learn_metrics[-1][f"train/{k}"])
    row = {f"{p.group}/{k}": v for k, v in row.items()}
    row.update({"time/rollout_s": t_rollout, "time/learn_s": t_learn, "time/weight_sync_s": sync_s,
                "time/rollout_share": t_rollout / max(t_rollout + t_learn, 1e-9)})
    return Iteration(state=state, row=row, beta=new_beta, prompts=prompts, responses=responses, stats=stats,
                     rollout={**roll, "score": stats["score"]})

  def evaluate(self, params: Any, prompts: list[list[int]], beta: float, tok: Any = None) -> Evaluation:
    """Mean normalised reward and KL of the policy's answers to fixed held-out prompts, with a fixed key.

    `eval/proxy` is the RM's normalised reward (also `eval/reward`), `eval/kl` the mean over replies of the summed
    per-token KL to the reference. With `tok`, also the gold judge's mean score of the decoded replies
    (`eval/gold`, when the RM's comparisons came from one automatic judge), the watch judges' (`eval/judge_<name>`)
    and one record per prompt: its turns, the reply, its reward, KL, length, gold and judge scores.
    """
    if not prompts:
      return Evaluation({}, [], [])
    p = self.cfg.algo
    eval_rng = jax.random.key(seeds.stream(self.cfg.seed, seeds.PPO_EVAL))
    scores, kls, lengths, texts, replies, ensemble_stds, proxy_means = [], [], [], [], [], [], []
    code_scores: dict[str, list[np.ndarray]] = {}
    sampler_params, _ = self.sampler_params(params)
    chunk_size = p.eval_batch_size or p.rollout_batch_size
    for lo in range(0, len(prompts), chunk_size):
      chunk = prompts[lo:lo + chunk_size]
      responses, _, host = self.rollout(sampler_params, chunk, jax.random.fold_in(eval_rng, lo))
      for name, v in self.add_code_rewards(host, chunk, responses).items():
        code_scores.setdefault(name, []).append(v)
      _, stats = self.score(params, host, beta)
      scores.append(stats["score"])
      kls.append(stats["kl_sum"])
      lengths.append(stats["length"])
      if reward_model.num_members(self.models.reward) > 1:
        ensemble_stds.append(stats["ensemble_std"])
        proxy_means.append(stats["proxy_mean"])
      if tok is not None:
        for i in range(min(len(chunk), 4 - len(texts))):
          texts.append(f"{chat.decode_reply(responses[i], tok)!r} (reward {float(stats['score'][i]):+.3f})")
        replies.extend({"prompt_index": lo + i,
                        "messages": [{"role": m.role, "content": m.content} for m in chat.parse(chunk[i], tok)
                                     if m.content],
                        "reply": chat.decode_reply(responses[i], tok), "reward": float(stats["score"][i]),
                        "kl": float(stats["kl_sum"][i]), "length": int(stats["length"][i])} for i in range(len(chunk)))
    scores, kls, lengths = np.concatenate(scores), np.concatenate(kls), np.concatenate(lengths)
    metrics = {"eval/reward": float(scores.mean()), "eval/reward_std": float(scores.std()),
               "eval/proxy": float(scores.mean()), "eval/kl": float(kls.mean()), "eval/length": float(lengths.mean())}
    if ensemble_stds:  # the members' disagreement, and their plain mean (the proxy without a penalty)
      metrics.update({"eval/ensemble_std": float(np.concatenate(ensemble_stds).mean()),
                      "eval/proxy_mean": float(np.concatenate(proxy_means).mean())})
    metrics.update({f"eval/reward_fn/{name}": float(np.concatenate(v).mean()) for name, v in code_scores.items()})
    metrics.update(judge_replies(replies, self.gold_judge, self.watch_judges))
    return Evaluation(metrics, texts, replies)


Texts = Callable[[list[list[int]], list[list[int]]], tuple[list[rewards_lib.Messages], list[str]]]


def conversation_texts(tok: Any) -> Texts:
  """(prompts, responses) token lists -> (each prompt's turns as {"role", "content"} dicts, the decoded replies):
  what reward functions are called on."""
  def texts(prompts, responses):
    return ([[{"role": m.role, "content": m.content} for m in chat.parse(p, tok) if m.content] for p in prompts],
            [chat.decode_reply(r, tok) for r in responses])
  return texts


def judge_replies(replies: list[dict[str, Any]], gold_judge: judges_lib.Judge | None,
                  watch_judges: dict[str, judges_lib.Judge]) -> dict[str, float]:
  """Scores the eval records' "reply" texts with the gold judge (into each record's "gold"; metrics `eval/gold`,
  `eval/gold_std`) and every watch judge (into "judges"[name]; `eval/judge_<name>`, `..._std`)."""
  metrics: dict[str, float] = {}
  if not replies:
    return metrics
  texts = [r["reply"] for r in replies]

  def judged(judge: judges_lib.Judge, key: str) -> list[float]:
    scores = np.asarray(judge(texts), np.float64)
    metrics[key], metrics[f"{key}_std"] = float(scores.mean()), float(scores.std())
    return [float(v) for v in scores]

  if gold_judge is not None:
    for r, value in zip(replies, judged(gold_judge, "eval/gold")):
      r["gold"] = value
  for name, judge in watch_judges.items():
    for r, value in zip(replies, judged(judge, f"eval/judge_{name}")):
      r.setdefault("judges", {})[name] = value
  return metrics


class PPOTask(loop_lib.Task):
  """A PPO iteration as the run loop's unit of work. Its checkpoint holds the train state and, in the data item,
  the KL coefficient beta, the prompt and PPO-ptx iterators' positions and the pipeline's fingerprint; a rollback
  restores beta with the policy."""
  unit = "iteration"

  def __init__(self, cfg: PPOConfig, learner: Learner, *, prompts: Prompts, eval_prompts: list[list[int]],
               beta: float, tok: Any, checkpointer: ckpt_lib.Checkpointer, meta: dict[str, Any], fingerprint: str,
               fingerprint_parts: dict[str, Any], workdir: str):
    self.cfg, self.learner, self.prompts, self.eval_prompts, self.beta, self.tok = (cfg, learner, prompts,
                                                                                    eval_prompts, beta, tok)
    self.checkpointer, self.meta, self.workdir = checkpointer, meta, workdir
    self.fingerprint, self.fingerprint_parts = fingerprint, fingerprint_parts
    self.is_main = jax.process_index() == 0

  def step(self, state: trainer.TrainState, index: int) -> loop_lib.Outcome:
    result = self.learner.iteration(state, self.prompts.next(), index, self.beta)
    self.checkpointer.poll()  # a failed background save stops the run now, not at the next save
    self.beta = result.beta
    if self.cfg.algo.save_rollouts and self.is_main:
      save_rollout(os.path.join(self.workdir, "rollouts"), index, result.rollout)
    texts = [json.dumps({"prompt": _last_turn(result.prompts[i], self.tok),
                         "response": chat.decode_reply(result.responses[i], self.tok),
                         "reward": round(float(result.stats["score"][i]), 4)}, ensure_ascii=False)
             for i in range(min(3, len(result.responses)))] if self.is_main else []
    return loop_lib.Outcome(result.state, result.row, {"rollouts": texts})

  def check(self, state: trainer.TrainState, index: int, outcome: loop_lib.Outcome):
    """Rolls back (trainer.rollback) after `train.max_bad_steps` skipped minibatch updates in a row."""
    cfg, state = self.cfg, outcome.state
    streak = int(jax.device_get(state.numerics.bad_streak)) if cfg.train.max_bad_steps else 0
    if not streak >= cfg.train.max_bad_steps > 0:
      return state, outcome.metrics, False
    per_iteration = updates_per_iteration(cfg.algo)
    first_bad = index + 1 - -(-streak // per_iteration)  # the iteration the bad updates began in
    state, _, saved = trainer.rollback(self.checkpointer, state, done=index + 1, streak=streak, first_bad=first_bad,
                                       train_cfg=cfg.train, unit="iteration")
    self.beta = float(saved["beta"])  # the KL controller's state goes back with the policy
    return state, outcome.metrics, True

  def save(self, state: trainer.TrainState, done: int) -> None:
    ptx_iter = self.learner.ptx_iter
    self.checkpointer.save(done, state, meta=self.meta, data={
        "iterator": self.prompts.get_state(), "fingerprint": self.fingerprint,
        "fingerprint_parts": self.fingerprint_parts, "beta": self.beta,
        "ptx_iterator": ptx_iter.get_state() if ptx_iter else None})

  def wait(self) -> None:
    self.checkpointer.wait()

  def evaluate(self, state: trainer.TrainState, done: int) -> tuple[dict[str, float], list[str] | None]:
    result = self.learner.evaluate(state.params, self.eval_prompts, self.beta, self.tok)
    if not result.metrics:
      return {}, None
    if self.is_main and result.replies:
      append_eval_replies(self.workdir, done, result.replies)
    return result.metrics, result.texts

  def postfix(self, metrics: dict[str, float]) -> dict[str, str]:
    g = self.cfg.algo.group
    return {"reward": f"{metrics[f'{g}/reward']:+.3f}", "kl": f"{metrics[f'{g}/kl']:.2f}"}


# ----------------------------------------------------------------------------------------------
# The run, as a sequence of named steps.


@dataclasses.dataclass(frozen=True)
class RewardModelRun:
  """The frozen reward model a PPO run scores with: its meta, where it is, and how its scores are read."""
  meta: dict[str, Any]
  where: str  # folder/step
  model_config: Any
  readout: reward_model.Readout


def read_reward_model(cfg: PPOConfig, tok: Any) -> RewardModelRun:
  """The reward model of `cfg.reward_model`, checked: a reward-stage checkpoint trained with this tokenizer."""
  meta, folder, step = ckpt_lib.read_checkpoint_meta(cfg.reward_model.checkpoint, cfg.reward_model.step)
  where = f"{folder}/{step}"
  if meta.get("stage") != "reward":
    raise config_lib.ConfigError(f"config.reward_model.checkpoint: {where} is a {meta.get('stage')!r} checkpoint, "
                                 "not a reward model.")
  ckpt_lib.check_tokenizer(meta, tok.sha256, where=f"The reward model {where}")
  if "reward_offset" not in meta:
    logging.warning("The reward model %s has no reward_offset (trained without normalisation); using 0.", where)
  readout = reward_model.Readout.from_meta(meta, cfg.reward_model.ensemble_reduce, cfg.reward_model.ensemble_penalty)
  return RewardModelRun(meta, where, cfg.model.apply(ckpt_lib.model_config_from_meta(meta)), readout)


def check_shapes(cfg: PPOConfig, placement: Placement, model_cfg: Any, rm: RewardModelRun) -> None:
  """Refuses batch sizes the learner's mesh cannot split, and a reply length that leaves no room for a prompt."""
  p = cfg.algo
  dp = sharding.data_parallel_size(placement.learner)
  if p.minibatch_size % dp or p.rollout_batch_size % dp:
    raise config_lib.ConfigError(
        f"config.{p.group}.minibatch_size: {p.minibatch_size} and rollout_batch_size {p.rollout_batch_size} must be "
        f"divisible by the data-parallel size {dp}.")
  check_reply_room(p.group, p.max_new_tokens, model_cfg, rm)


def check_reply_room(group: str, max_new_tokens: int, model_cfg: Any, rm: RewardModelRun) -> None:
  """Refuses `config.<group>.max_new_tokens` that leaves fewer than 8 prompt tokens of the policy's context, or a
  reward model whose context is shorter than the policy's (it scores the whole prompt + reply buffer)."""
  prompt_len = model_cfg.max_len - max_new_tokens
  if prompt_len < 8 or rm.model_config.max_len < model_cfg.max_len:
    raise config_lib.ConfigError(
        f"config.{group}.max_new_tokens={max_new_tokens} leaves {prompt_len} prompt tokens of the policy's "
        f"{model_cfg.max_len} (and the reward model's context is {rm.model_config.max_len}); lower it.")


def load_prompts(cfg: PPOConfig, tok: Any, prompt_len: int, cache_dir: str) -> tuple[Prompts, list[list[int]], int]:
  """(the stream of training prompts, the encoded held-out eval prompts, the number of training prompts): the
  training split's conversations cut before their last assistant turn, and `chat_data.held_out_prompts`."""
  conversations = chat_data.load_conversations(cfg.data.sources, cache_dir=cache_dir)
  train_convs, eval_convs = chat_data.split_by_group(conversations, eval_fraction=cfg.data.eval_fraction,
                                                     seed=cfg.data.split_seed)
  train_prompts = [chat.prompt_tokens(m, tok, max_tokens=prompt_len)
                   for m in chat_data.training_prompts(train_convs, 0, cfg.seed)]
  eval_prompts = [chat.prompt_tokens(m, tok, max_tokens=prompt_len)
                  for m in chat_data.held_out_prompts(eval_convs, cfg.algo.num_eval_prompts, cfg.seed)]
  logging.info("PPO prompts: %d training, %d held-out for eval.", len(train_prompts), len(eval_prompts))
  prompts = Prompts(train_prompts, seed=cfg.seed, batch=cfg.algo.rollout_batch_size // cfg.algo.group_size)
  return prompts, eval_prompts, len(train_prompts)


def data_fingerprint_parts(cfg: PPOConfig, tok: Any, num_prompts: int, prompt_len: int) -> dict[str, Any]:
  """What must match for a checkpoint's prompt (and ptx) iterator positions to apply on resume."""
  p = cfg.algo
  return dict(sources=list(cfg.data.sources), split_seed=cfg.data.split_seed, eval_fraction=cfg.data.eval_fraction,
              seed=cfg.seed, rollout_batch=p.rollout_batch_size // p.group_size, process_count=jax.process_count(),
              tokenizer_sha256=tok.sha256, num_prompts=num_prompts, prompt_len=prompt_len,
              ptx=list(p.ptx_sources) if p.ptx_coef > 0 else None)


def _copy_to(tree: Any, shardings: Any) -> Any:
  """A copy of `tree` in buffers of its own, laid out by `shardings` (the train step donates its state)."""
  return jax.tree.map(lambda x, s: jax.device_put(jnp.array(x, copy=True), s), tree, shardings)


def check_policy_init(cfg: PPOConfig) -> None:
  """`policy_init`, when set, names a policy run's checkpoint (read before anything loads)."""
  if not cfg.policy_init.checkpoint:
    return
  try:
    meta, folder, step = ckpt_lib.read_checkpoint_meta(cfg.policy_init.checkpoint, cfg.policy_init.step)
  except ckpt_lib.CheckpointError as e:
    raise config_lib.ConfigError(f"config.policy_init.checkpoint: {e}") from None
  if meta.get("stage") not in stages_lib.POLICY_RL:
    raise config_lib.ConfigError(
        f"config.policy_init.checkpoint: {folder}/{step} is a checkpoint of stage {meta.get('stage')!r}; it must be "
        f"a policy run ({', '.join(stages_lib.POLICY_RL)}). The SFT model goes in init.checkpoint.")


def init_from_previous_stages(cfg: PPOConfig, models: Models, params: Any, shardings: Any, ref_params: Any,
                              rm_params: Any, tok: Any) -> Any:
  """A fresh run's trainable parameters: the policy equal to the frozen SFT reference, or with `policy_init` the
  policy of that earlier policy run; the critic from the reward model (`ppo.critic_init="reward"`: an ensemble's
  first member), from the SFT transformer under a fresh value head ("sft"), or, shared, a fresh value head on the
  policy's trunk."""
  p = cfg.algo
  if cfg.policy_init.checkpoint:
    policy, _, where = ckpt_lib.load_params(
        cfg.policy_init.checkpoint, ckpt_lib.abstract_like(params["policy"], shardings["policy"]),
        step=cfg.policy_init.step, tokenizer_sha256=tok.sha256, subtree="policy")
    logging.info("Policy from the earlier policy run %s (the reference stays %s).", where, cfg.init.checkpoint)
    params = {**params, "policy": policy}
  else:
    params = {**params, "policy": _copy_to(ref_params, shardings["policy"])}
  if models.critic is None:
    return params
  abstract_value = ckpt_lib.abstract_like(params["value"], shardings["value"])
  if p.critic_init == "reward" and reward_model.num_members(models.reward) > 1:
    # An ensemble's first member (the model a single RM run with this seed would train) starts the critic.
    member0 = jax.tree.map(lambda x: x[0], {"transformer": rm_params["transformer"],
                                            "value_head": rm_params["reward_head"]})
    params["value"] = _copy_to(member0, shardings["value"])
  elif p.critic_init == "reward":
    trunk, _, _ = ckpt_lib.load_params(cfg.reward_model.checkpoint, abstract_value["transformer"],
                                       step=cfg.reward_model.step, tokenizer_sha256=tok.sha256, subtree="transformer")
    head = _copy_to(rm_params["reward_head"], shardings["value"]["value_head"])
    params["value"] = {"transformer": trunk, "value_head": head}
  elif not models.shared:
    trunk, _, _ = ckpt_lib.load_params(cfg.init.checkpoint, abstract_value["transformer"], step=cfg.init.step,
                                       tokenizer_sha256=tok.sha256, unused_ok=reward_model.UNUSED_LM_PARAMS)
    params["value"] = {**params["value"], "transformer": trunk}
  return params


def ptx_stream(cfg: PPOConfig, tok: Any, seq_len: int, cache_dir: str, saved_position: Any) -> Any:
  """PPO-ptx's pretraining batches (minibatch_size rows of the policy's context), at `saved_position` when
  resuming; None without ptx."""
  p = cfg.algo
  if p.ptx_coef <= 0:
    return None
  docs = data_lib.load_documents(p.ptx_sources, cache_dir=cache_dir)
  ptx_docs, _ = data_lib.split_documents(docs, eval_fraction=cfg.data.eval_fraction, seed=cfg.data.split_seed)
  ptx_tokens = data_lib.tokenize_documents(ptx_docs, tok, cache_dir=os.path.join(cache_dir, "tokens"))
  it = iter(data_lib.lm_dataset(ptx_tokens, seq_len=seq_len, seed=cfg.seed,
                                global_batch_size=p.minibatch_size, process_index=jax.process_index(),
                                process_count=jax.process_count()))
  if saved_position is not None:
    it.set_state(saved_position)
  logging.info("PPO-ptx: %d pretraining tokens, coefficient %g.", ptx_tokens.size, p.ptx_coef)
  return it


def run(cfg: PPOConfig) -> trainer.TrainState:
  """Runs (or resumes) PPO for `cfg.train.steps` iterations."""
  p = cfg.algo
  workdir = recipe_lib.prepare_workdir(cfg)
  cache_dir = cfg.data.cache_dir or str(default_cache_dir())
  placement = make_placement(cfg.mesh, p)
  mesh = placement.learner
  model_cfg, tok, init_meta = recipe_lib.init_source(cfg.init, cfg.tokenizer_path, workdir, cfg.model,
                                                     expect_stage=("sft",))
  rm = read_reward_model(cfg, tok)
  check_policy_init(cfg)
  check_shapes(cfg, placement, model_cfg, rm)
  code_rewards = rewards_lib.CodeRewards.from_config(p.reward_fns, p.reward_fn_weights, p.group)  # fails early
  models = make_models(model_cfg, rm.model_config, p, ensemble=int(rm.meta.get("ensemble", 1)),
                       pooling=rm.meta.get("pooling", "last"), reward_context=int(rm.meta.get("context", 0)),
                       end_id=tok.end_of_turn_id)
  prompts, eval_prompts, num_prompts = load_prompts(cfg, tok, models.prompt_len, cache_dir)

  # Parameters: the policy and critic train; the reference and the reward model are frozen.
  optimizer = optim.make_optimizer(cfg.optim, num_updates(cfg))
  state, state_shardings = trainer.create_train_state(functools.partial(init_params, models), optimizer, cfg.seed,
                                                      mesh)
  example = np.zeros((1, model_cfg.max_len), np.int32)
  ref_params = ckpt_lib.load_frozen_params(models.policy, example, placement.scorer, cfg.init,
                                           tokenizer_sha256=tok.sha256)
  rm_params = ckpt_lib.load_frozen_params(models.reward, example, placement.scorer, cfg.reward_model,
                                          tokenizer_sha256=tok.sha256)

  checkpointer = ckpt_lib.open_workdir_checkpointer(workdir, cfg.train)
  try:
    fingerprint_parts = data_fingerprint_parts(cfg, tok, num_prompts, models.prompt_len)
    fingerprint = data_lib.pipeline_fingerprint(stage=cfg.stage, **fingerprint_parts)
    start, beta, ptx_position, parent_changes = 0, p.init_beta, None, []
    parents = ckpt_lib.parents_of(cfg)
    resumed = trainer.resume(checkpointer, state, state_shardings, tokenizer_sha256=tok.sha256,
                             fingerprint=fingerprint, fingerprint_parts=fingerprint_parts, train_iter=prompts,
                             reset_data_position=cfg.data.reset_position, parents=parents,
                             allow_changed=ckpt_lib.allowed_parent_changes(cfg))
    if resumed is not None:
      start, state, data_state = resumed
      beta, ptx_position = float(data_state["beta"]), data_state.get("ptx_iterator")
      parent_changes = data_state["parent_changes"]
      logging.info("Resumed at beta %.4f.", beta)
    else:
      state = state.replace(params=init_from_previous_stages(cfg, models, state.params, state_shardings.params,
                                                             ref_params, rm_params, tok))
      logging.info("Policy from %s, critic from %s, reward model %s (%s).", init_meta["init_checkpoint"],
                   "none" if models.critic is None else "a fresh head on the policy" if models.shared else
                   p.critic_init, rm.where, rm.readout)

    gold_judge = judges_lib.make_judge(rm.meta["gold_judge"]) if rm.meta.get("gold_judge") else None
    logging.info("Gold judge: %s.", f"{rm.meta['gold_judge']} (the reward model's labeller)" if gold_judge else
                 "none (the reward model's comparisons were not all labelled by one automatic judge)")
    learner = Learner(cfg, models, mesh, optimizer, state_shardings, ref_params, rm_params,
                      make_score_fn(models, cfg, rm.readout), pad_id=tok.pad_id, stop_id=tok.end_of_turn_id,
                      placement=placement, ptx_iter=ptx_stream(cfg, tok, model_cfg.max_len, cache_dir, ptx_position),
                      watch_judges={name: judges_lib.make_judge(name) for name in p.watch_judges},
                      gold_judge=gold_judge,
                      code_rewards=code_rewards, texts=conversation_texts(tok))
    if jax.process_index() == 0:
      # On resume, the eval-reply lines an interrupted run wrote after the checkpoint go, as metrics rows do.
      truncate_jsonl_after(os.path.join(workdir, EVAL_REPLIES_FILE), start if start else -1)
    meta = {"stage": cfg.stage, "tokenizer_sha256": tok.sha256, "model": config_lib.to_dict(model_cfg),
            "num_params": model_lib.count_params(state.params["policy"]),
            "init_checkpoint": init_meta["init_checkpoint"], "reward_model": rm.where,
            "policy_init": cfg.policy_init.checkpoint or None,
            "reward_offset": float(rm.meta.get("reward_offset", 0.0)), "critic": p.critic,
            "reward_readout": dataclasses.asdict(rm.readout), "parents": parents, "parent_changes": parent_changes}
    task = PPOTask(cfg, learner, prompts=prompts, eval_prompts=eval_prompts, beta=beta, tok=tok,
                   checkpointer=checkpointer, meta=meta, fingerprint=fingerprint,
                   fingerprint_parts=fingerprint_parts, workdir=workdir)
    return loop_lib.run(task, state, start=start, cadence=loop_lib.Cadence.of(cfg.train, log_every=1),
                        workdir=workdir, desc=cfg.stage)
  finally:
    checkpointer.close()
