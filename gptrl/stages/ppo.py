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
(the trainer recomputes exactly what the rollout computed), and the sampler's own log-probs agree with the
scorer's; a breach is a warning with numbers.

Resume: the train state (policy, critic, optimizer, step, RNG) is an Orbax checkpoint; beta, the prompt
iterator position and the pipeline fingerprint are in its data item. Every random draw derives from
(seed, iteration), so a killed run resumes to the same result.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from gptrl import chat
from gptrl import chat_data
from gptrl import checkpoint as ckpt_lib
from gptrl import data as data_lib
from gptrl import fileio
from gptrl import judges as judges_lib
from gptrl import losses
from gptrl import model as model_lib
from gptrl import optim
from gptrl import ppo_math as pm
from gptrl import reward_model
from gptrl import sampling
from gptrl import sharding
from gptrl import trainer
from gptrl.config import PPOConfig
from gptrl.corpus import default_cache_dir
from gptrl.metrics import MetricsWriter, truncate_jsonl_after
from gptrl.stages import common

# Rollout arrays: B responses, L = P + N token buffer (P prompt slots, left-padded; N response slots).
ROLLOUT_KEYS = ("tokens", "positions", "attention", "response_mask", "logp", "ref_logp", "values", "advantages",
                "returns", "kl")
# Every held-out eval reply with its RM reward and watch-judge scores, one line per eval: the report's SFT-vs-PPO table.
EVAL_REPLIES_FILE = "eval_replies.jsonl"


@dataclasses.dataclass(frozen=True)
class Models:
  policy: model_lib.GPT
  critic: nn.Module  # ScalarHeadModel (separate) or ScalarHead (shared, applied to the policy's hidden states)
  reward: reward_model.ScalarHeadModel | reward_model.RewardEnsemble
  shared: bool
  prompt_len: int  # P
  new_tokens: int  # N
  reward_context: int = 0  # the reward model's training context (its meta's "context"); 0: the whole sequence
  end_id: int = -1  # <|end|>: an unfinished reply is scored with it appended, as the RM's training replies end


def _response_slice(x_BxLx: jax.Array, models: Models) -> jax.Array:
  """The positions whose outputs predict / evaluate the N response tokens: P-1 .. P+N-2."""
  return x_BxLx[:, models.prompt_len - 1:models.prompt_len - 1 + models.new_tokens]


def evaluate_actions(models: Models, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Log-probs (fp32), values and entropy of the response tokens under `params`: the one function both the
  rollout (old) and the learner (new) use, so that on unchanged parameters the ratio is exactly 1."""
  logits, hidden = models.policy.apply({"params": params["policy"]}, batch["tokens"],
                                       positions_BxT=batch["positions"], attention_mask_BxT=batch["attention"],
                                       return_hidden=True)
  logits_BxNxV = _response_slice(logits, models)
  targets_BxN = batch["tokens"][:, models.prompt_len:]
  logp_all = jax.nn.log_softmax(logits_BxNxV.astype(jnp.float32), axis=-1)
  logp_BxN = jnp.take_along_axis(logp_all, targets_BxN[..., None], axis=-1)[..., 0]
  entropy_BxN = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  if models.shared:
    values_BxL = models.critic.apply({"params": params["value"]}, hidden)
  else:
    values_BxL = models.critic.apply({"params": params["value"]}, batch["tokens"], positions_BxT=batch["positions"],
                                     attention_mask_BxT=batch["attention"])
  return {"logp": logp_BxN, "values": _response_slice(values_BxL, models), "entropy": entropy_BxN,
          "logits": logits_BxNxV}


def reference_logits(models: Models, ref_params: Any, batch: dict[str, jax.Array]) -> jax.Array:
  logits = models.policy.apply({"params": ref_params}, batch["tokens"], positions_BxT=batch["positions"],
                               attention_mask_BxT=batch["attention"])
  return _response_slice(logits, models)


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
  """
  frozen: Any
  shaping: Any


def make_score_fn(models: Models, cfg: PPOConfig, readout: reward_model.Readout | float,
                  raw_score_fn=None) -> Scorer:
  """The rollout's Scorer. `readout` turns raw scores into the reward (a float: a single RM's offset).
  raw_score_fn(rm_params, batch) -> [B] or [B, M] replaces the reward model (tests use synthetic rewards)."""
  p = cfg.ppo
  if not isinstance(readout, reward_model.Readout):
    readout = reward_model.Readout(offsets=(float(readout),))
  raw_score_fn = raw_score_fn or (lambda rm_params, batch: reward_model_score(models, rm_params, batch))

  def frozen(ref_params, rm_params, batch):
    ref_logits = reference_logits(models, ref_params, batch)
    raw = raw_score_fn(rm_params, batch).astype(jnp.float32)
    out = {"raw_score": raw[:, None] if raw.ndim == 1 else raw}  # [B, M]
    if p.kl_estimator == "full":
      out["ref_logits"] = ref_logits.astype(jnp.float32)
    else:
      out["ref_logp"] = losses.token_log_probs(ref_logits, batch["tokens"][:, models.prompt_len:])
    return out

  def shaping(params, frozen_out, batch, beta):
    mask = batch["response_mask"].astype(jnp.float32)
    out = evaluate_actions(models, params, batch)
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
    if p.whiten_rewards:
      score_B = pm.masked_whiten(score_B, jnp.ones_like(score_B), shift_mean=False)
    truncated_B = batch["truncated"].astype(jnp.bool_)
    rewards = pm.per_token_rewards(score_B, kl, mask, beta if p.kl_in_reward else 0.0, truncated_B=truncated_B,
                                   truncation_penalty=p.truncation_penalty)
    values = jnp.where(mask > 0, out["values"], 0.0)
    advantages, returns = pm.gae(rewards, values, mask, p.gamma, p.lam)
    if p.whiten_advantages:
      advantages = pm.masked_whiten(advantages, mask)
    stats = {"score": score_B, "raw_score": jnp.mean(raw_BxM, axis=1), "kl_sum": jnp.sum(kl, axis=1),
             "length": length_B, "entropy": pm.masked_mean(out["entropy"], mask),
             # How much an ensemble's members disagree about each reply (0 for one model).
             "ensemble_std": jnp.std(centred_BxM, axis=1), "proxy_mean": jnp.mean(centred_BxM, axis=1)}
    return {"logp": out["logp"], "ref_logp": ref_logp, "values": values, "advantages": advantages,
            "returns": returns, "kl": kl}, stats
  return Scorer(frozen=jax.jit(frozen), shaping=jax.jit(shaping))


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
    return Placement.colocated(sharding.make_mesh(mesh_cfg, devices))
  n_learner = len(devices) - p.sampler_devices - p.scorer_devices
  if n_learner < 1:
    raise common.config_lib.ConfigError(
        f"config.ppo.sampler_devices: {p.sampler_devices} sampler + {p.scorer_devices} scorer devices leave "
        f"{n_learner} of the {len(devices)} devices for the learner; it needs at least 1.")
  sub = common.config_lib.MeshConfig(data=-1, fsdp=1, tensor=p.split_tensor)
  for name, n in (("sampler_devices", p.sampler_devices), ("scorer_devices", p.scorer_devices)):
    if n and n % p.split_tensor:
      raise common.config_lib.ConfigError(f"config.ppo.{name}: {n} devices cannot hold tensor-parallel groups "
                                          f"of ppo.split_tensor={p.split_tensor}.")
  learner = sharding.make_mesh(mesh_cfg, devices[:n_learner])
  sampler = sharding.make_mesh(sub, devices[n_learner:n_learner + p.sampler_devices])
  scorer = sharding.make_mesh(sub, devices[n_learner + p.sampler_devices:]) if p.scorer_devices else learner
  return Placement(learner, sampler, scorer)


def make_ppo_loss(models: Models, cfg: PPOConfig):
  """loss_fn(params, minibatch, rng) -> (loss_sum, sums) for trainer.make_train_step: token sums, weight =
  the minibatch's response tokens, so micro-batching does not change the result."""
  p = cfg.ppo

  def loss_fn(params, batch, rng):
    del rng
    mask = batch["response_mask"].astype(jnp.float32)
    out = evaluate_actions(models, params, batch)
    pg_loss, pg_stats = pm.policy_loss(out["logp"], batch["logp"], batch["advantages"], mask, p.clip_eps)
    vf_loss, vf_stats = pm.value_loss(out["values"], batch["values"], batch["returns"], mask, p.clip_eps_value)
    ent = pm.masked_mean(out["entropy"], mask)
    loss = pg_loss + p.vf_coef * vf_loss - p.entropy_coef * ent
    kl_loss = jnp.zeros(())
    if not p.kl_in_reward:
      kl_loss = pm.masked_mean(pm.kl_estimate(out["logp"], batch["ref_logp"], "k3"), mask)
      loss = loss + batch["beta"][0, 0] * kl_loss
    n = jnp.sum(mask)
    ratio_max = jnp.max(jnp.where(mask > 0, jnp.exp(out["logp"] - batch["logp"]), 0.0))
    ptx = jnp.zeros(())
    if p.ptx_coef > 0:
      ptx_logits = models.policy.apply({"params": params["policy"]}, batch["ptx_inputs"])
      ptx_sum, ptx_weight = losses.weighted_cross_entropy(ptx_logits, batch["ptx_targets"], batch["ptx_weights"])
      ptx = ptx_sum / jnp.maximum(ptx_weight, 1.0)
      loss = loss + p.ptx_coef * ptx
    sums = {"weight": n, "ptx_loss": ptx * n, "policy_loss": pg_loss * n, "value_loss": vf_loss * n, "entropy": ent * n,
            "clip_frac": pg_stats["clip_frac"] * n, "value_clip_frac": vf_stats["clip_frac"] * n,
            "approx_kl": pg_stats["approx_kl"] * n, "ratio_mean": pg_stats["ratio_mean"] * n,
            "ratio_max": ratio_max * n, "kl_loss": kl_loss * n}
    return loss * n, sums
  return loss_fn


class Prompts:
  """An endless, shuffled, checkpointable stream of encoded training prompts (grain), `batch` per call."""

  def __init__(self, prompts: list[list[int]], *, seed: int, batch: int):
    if len(prompts) < batch:
      raise data_lib.DataError(f"{len(prompts)} training prompts, fewer than ppo.rollout_batch_size={batch}.")
    self._prompts = prompts
    shuffle_seed = data_lib._shuffle_seed(seed)  # pylint: disable=protected-access
    ds = grain.MapDataset.range(len(prompts)).shuffle(seed=shuffle_seed)
    self._iter = iter(ds.repeat(None, reseed_each_epoch=True).batch(batch).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))

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
  tokens, attention, positions, _ = sampling.prompt_buffer(prompts, max_len=prompt_len + new_tokens,
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


class Learner:
  """One PPO iteration (rollout, scoring, learning, beta update) and the held-out evaluation, on a mesh."""

  def __init__(self, cfg: PPOConfig, models: Models, mesh: jax.sharding.Mesh, optimizer: Any, state_shardings: Any,
               ref_params: Any, rm_params: Any, score_fn: Scorer, *, pad_id: int, stop_id: int,
               placement: Placement | None = None):
    """`mesh` is the learner's; `placement` (default: colocated on `mesh`) says where sampling and the frozen
    models run, and `ref_params` / `rm_params` must already live on its scorer mesh."""
    p = cfg.ppo
    self.cfg, self.models, self.mesh = cfg, models, mesh
    self.placement = placement or Placement.colocated(mesh)
    if self.placement.learner is not mesh:
      raise ValueError("Learner: placement.learner must be the learner's mesh.")
    self.ref_params, self.rm_params, self.score_fn = ref_params, rm_params, score_fn
    self.pad_id, self.stop_id = pad_id, stop_id
    self.dp = sharding.data_parallel_size(mesh)
    self.sampler_dp = sharding.data_parallel_size(self.placement.sampler)
    self.scorer_dp = sharding.data_parallel_size(self.placement.scorer)
    self.sampler_shardings = None
    if self.placement.split_sampler:  # the policy's layout on the sampler's mesh, by the same sharding rules
      example = np.zeros((1, models.policy.config.max_len), np.int32)
      _, self.sampler_shardings = common.param_shardings(models.policy, example, self.placement.sampler)
    self.last_sync_s = 0.0
    updates = cfg.train.steps * p.epochs * (p.rollout_batch_size // p.minibatch_size)
    self.train_step = trainer.jit_train_step(
        trainer.make_train_step(make_ppo_loss(models, cfg), optimizer,
                                optim.learning_rate_schedule(cfg.optim, updates), cfg.optim.grad_accum_steps,
                                **trainer.spike_options(cfg.train)),
        state_shardings, mesh)
    self.last_rollout: dict[str, np.ndarray] = {}
    self.last_prompts: list[list[int]] = []
    self.ptx_iter = None  # PPO-ptx: an iterator of pretraining batches of minibatch_size rows (set by run)
    self.watch_judges: dict[str, judges_lib.Judge] = {}  # name -> judge of the eval replies (set by run)
    self.gold_judge: judges_lib.Judge | None = None  # the RM's labeller, when a judge labelled all (set by run)
    self.last_eval_replies: list[dict[str, Any]] = []  # the last evaluate()'s per-prompt records (needs tok)

  def sampler_params(self, params: Any) -> Any:
    """The policy's parameters where the sampler runs: colocated, `params["policy"]` itself; split, a copy on the
    sampler's mesh in its layout, moved device to device (jax.device_put between shardings, no host copy)."""
    if not self.placement.split_sampler:
      return params["policy"]
    t0 = time.perf_counter()
    copy = jax.block_until_ready(jax.device_put(params["policy"], self.sampler_shardings))
    self.last_sync_s = time.perf_counter() - t0
    return copy

  def rollout(self, params: Any, prompts: list[list[int]], rng: jax.Array, sampler_params: Any = None):
    """(responses, the sampler's log-probs, host arrays of the rollout buffer); `sampler_params`: the policy on
    the sampler's mesh (default: `self.sampler_params(params)`)."""
    p = self.cfg.ppo
    if sampler_params is None:
      sampler_params = self.sampler_params(params)
    with sharding.activate(self.placement.sampler):
      responses, sampler_logp = sampling.generate(
          self.models.policy, sampler_params, prompts, max_new_tokens=self.models.new_tokens, rng=rng,
          temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, stop_id=self.stop_id, pad_id=self.pad_id,
          batch_multiple=self.sampler_dp, return_logprobs=True, min_prompt_len=self.models.prompt_len)
    host = build_rollout_batch(prompts, responses, prompt_len=self.models.prompt_len,
                               new_tokens=self.models.new_tokens, pad_id=self.pad_id, stop_id=self.stop_id)
    return responses, sampler_logp, host

  def score(self, params: Any, host: dict[str, np.ndarray], beta: float):
    rows = host["tokens"].shape[0]
    multiple = int(np.lcm(self.dp, self.scorer_dp))
    pad = -rows % multiple
    if pad:
      host = {k: np.concatenate([v, np.resize(v, (pad,) + v.shape[1:])]) for k, v in host.items()}
    scorer, learner = self.placement.scorer, self.mesh
    with sharding.activate(scorer):
      frozen = self.score_fn.frozen(self.ref_params, self.rm_params, sharding.host_to_global(host, scorer))
    if self.placement.split_scorer:  # the frozen models' outputs, device to device onto the learner's batch layout
      frozen = {k: jax.device_put(v, sharding.batch_sharding(learner, v.ndim)) for k, v in frozen.items()}
    with sharding.activate(learner):
      arrays, stats = self.score_fn.shaping(params, frozen, sharding.host_to_global(host, learner),
                                            jnp.float32(beta))
    arrays, stats = jax.device_get((arrays, stats))
    return ({k: np.asarray(v)[:rows] for k, v in arrays.items()},
            {k: np.asarray(v)[:rows] if np.ndim(v) else np.asarray(v) for k, v in stats.items()})

  def iteration(self, state: trainer.TrainState, prompts: list[list[int]], it: int, beta: float):
    """One PPO iteration; returns (state, metrics row, next beta, responses, per-response stats)."""
    p = self.cfg.ppo
    t0 = time.perf_counter()
    rng = jax.random.fold_in(jax.random.key(self.cfg.seed), it)
    self.last_sync_s = 0.0
    responses, sampler_logp, host = self.rollout(state.params, prompts, jax.random.fold_in(rng, 0))
    arrays, stats = self.score(state.params, host, beta)
    t_rollout = time.perf_counter() - t0
    roll = {**host, **arrays}
    self.last_rollout, self.last_prompts = {**roll, "score": stats["score"]}, prompts
    sampler_gap = max((float(np.max(np.abs(np.asarray(sl) - roll["logp"][i, :len(sl)]))) for i, sl in
                       enumerate(sampler_logp) if len(sl)), default=0.0)

    # Learning: epochs x minibatches of the rollout, in an order drawn from this iteration's key.
    perm_rng = np.random.default_rng(np.asarray(jax.random.key_data(jax.random.fold_in(rng, 1))).astype(np.uint32))
    learn_metrics, updates, stopped = [], 0, False
    n_mb = p.rollout_batch_size // p.minibatch_size
    for _ in range(p.epochs):
      order = perm_rng.permutation(p.rollout_batch_size)
      for m in range(n_mb):
        idx = order[m * p.minibatch_size:(m + 1) * p.minibatch_size]
        mb = {k: roll[k][idx] for k in ROLLOUT_KEYS}
        mb["beta"] = np.full((p.minibatch_size, 1), beta, np.float32)  # rank 2: sharded like the batch
        if p.ptx_coef > 0:
          mb.update({f"ptx_{k}": v for k, v in next(self.ptx_iter).items()})
        state, metrics = self.train_step(state, sharding.host_to_global(mb, self.mesh))
        learn_metrics.append(jax.device_get(metrics))
        updates += 1
      if p.max_approx_kl > 0 and float(learn_metrics[-1]["train/approx_kl"]) > p.max_approx_kl:
        stopped = True
        break
    t_learn = time.perf_counter() - t0 - t_rollout

    # The invariants: the first minibatch sees ratio 1 and approximate KL 0 (same code, same params), and the
    # sampler's log-probs are the scorer's.
    first = learn_metrics[0]
    ratio0, kl0 = float(first["train/ratio_mean"]), float(first["train/approx_kl"])
    if abs(ratio0 - 1.0) > 1e-4 or kl0 > 1e-6 or sampler_gap > 2e-2:
      logging.warning("PPO invariant breached at iteration %d: first-minibatch ratio %.6f (want 1), approx KL "
                      "%.3g (want 0), sampler vs scorer log-prob gap %.3g.", it, ratio0, kl0, sampler_gap)
    kl_mean = float(np.mean(stats["kl_sum"]))
    new_beta = float(pm.update_kl_coef(beta, kl_mean, target=p.target_kl, horizon=p.kl_horizon,
                                       n_steps=p.rollout_batch_size)) if p.target_kl > 0 else beta
    row = {"ppo/reward": float(np.mean(stats["score"])), "ppo/reward_std": float(np.std(stats["score"])),
           "ppo/raw_score": float(np.mean(stats["raw_score"])), "ppo/kl": kl_mean, "ppo/beta": beta,
           **({"ppo/ensemble_std": float(np.mean(stats["ensemble_std"]))}
              if reward_model.num_members(self.models.reward) > 1 else {}),
           "ppo/length": float(np.mean(stats["length"])), "ppo/truncated": float(np.mean(host["truncated"])),
           "ppo/entropy": float(np.mean(stats["entropy"])), "ppo/first_ratio": ratio0, "ppo/first_approx_kl": kl0,
           "ppo/sampler_logp_gap": sampler_gap, "ppo/updates": updates, "ppo/early_stopped": float(stopped),
           "time/rollout_s": t_rollout, "time/learn_s": t_learn, "time/weight_sync_s": self.last_sync_s,
           "time/rollout_share": t_rollout / max(t_rollout + t_learn, 1e-9)}
    for k in ("policy_loss", "value_loss", "entropy", "clip_frac", "value_clip_frac", "approx_kl", "ratio_mean",
              "ratio_max", "kl_loss", "ptx_loss", "grad_norm", "skipped"):
      row[f"ppo/{k}"] = float(np.mean([float(m[f"train/{k}"]) for m in learn_metrics]))
    for k in ("skipped_total", "spikes_total", "rollbacks"):  # the run's numerics-guard counts (gptrl/trainer.py)
      row[f"ppo/{k}"] = float(learn_metrics[-1][f"train/{k}"])
    return state, row, new_beta, responses, stats

  def evaluate(self, params: Any, prompts: list[list[int]], beta: float, tok: Any = None
               ) -> tuple[dict[str, float], list[str]]:
    """Mean normalised reward and KL of the policy's answers to fixed held-out prompts, with a fixed key.

    `eval/proxy` is the RM's normalised reward (also `eval/reward`), `eval/kl` the mean over replies of the summed
    per-token KL to the reference. With `tok`, also the gold judge's mean score of the decoded replies
    (`eval/gold`, when the RM's comparisons came from one automatic judge), the watch judges' (`eval/judge_<name>`)
    and, in `self.last_eval_replies`, one record per prompt: its turns, the reply, its reward, KL, length, gold
    and judge scores.
    """
    self.last_eval_replies = []
    if not prompts:
      return {}, []
    p = self.cfg.ppo
    eval_rng = jax.random.key(self.cfg.seed + 11)
    scores, kls, lengths, texts, replies, ensemble_stds, proxy_means = [], [], [], [], [], [], []
    sampler_params = self.sampler_params(params)
    for lo in range(0, len(prompts), p.rollout_batch_size):
      chunk = prompts[lo:lo + p.rollout_batch_size]
      responses, _, host = self.rollout(params, chunk, jax.random.fold_in(eval_rng, lo), sampler_params)
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
    metrics.update(judge_replies(replies, self.gold_judge, self.watch_judges))
    self.last_eval_replies = replies
    return metrics, texts


EVAL_PROMPTS_SEED_OFFSET = 7  # the held-out prompts' order: a seed stream of its own (seed + 7)


def held_out_messages(eval_conversations: list[chat_data.Conversation], num: int, seed: int
                      ) -> list[list[chat.Message]]:
  """The `num` held-out prompts every policy evaluation uses (PPO's eval, best-of-n): the same list for the same
  conversations, count and seed."""
  from gptrl.stages.label import training_prompts  # pylint: disable=import-outside-toplevel
  return training_prompts(eval_conversations, num, seed + EVAL_PROMPTS_SEED_OFFSET)


def held_out_prompts(data: Any, num: int, seed: int, *, cache_dir: str) -> list[list[chat.Message]]:
  """`held_out_messages` of the eval split of `data` (a ChatDataConfig: sources, eval_fraction, split_seed)."""
  conversations = chat_data.load_conversations(data.sources, cache_dir=cache_dir)
  _, eval_convs = chat_data.split_by_group(conversations, eval_fraction=data.eval_fraction, seed=data.split_seed)
  return held_out_messages(eval_convs, num, seed)


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


def run(cfg: PPOConfig) -> trainer.TrainState:
  """Runs (or resumes) PPO for `cfg.train.steps` iterations."""
  workdir = common.prepare_workdir(cfg)
  cache_dir = cfg.data.cache_dir or str(default_cache_dir())
  p = cfg.ppo
  placement = make_placement(cfg.mesh, p)
  mesh = placement.learner
  dp = sharding.data_parallel_size(mesh)
  if p.minibatch_size % dp or p.rollout_batch_size % dp:
    raise common.config_lib.ConfigError(
        f"config.ppo.minibatch_size: {p.minibatch_size} and rollout_batch_size {p.rollout_batch_size} must be "
        f"divisible by the data-parallel size {dp}.")
  if p.placement == "split":
    logging.info("PPO placement: learner on %d devices %s, sampler on %d, frozen models on %d%s.", mesh.size,
                 dict(mesh.shape), placement.sampler.size, placement.scorer.size,
                 "" if placement.split_scorer else " (the learner's)")
  model_cfg, tok, init_meta = common.init_source(cfg.init, cfg.tokenizer_path, workdir, cfg.model,
                                                 expect_stage=("sft",))
  rm_meta, rm_folder, rm_step = common.read_meta(cfg.reward_model.checkpoint, cfg.reward_model.step)
  if rm_meta.get("stage") != "reward":
    raise common.config_lib.ConfigError(f"config.reward_model.checkpoint: {rm_folder}/{rm_step} is a "
                                        f"{rm_meta.get('stage')!r} checkpoint, not a reward model.")
  ckpt_lib.check_tokenizer(rm_meta, tok.sha256, where=f"The reward model {rm_folder}/{rm_step}")
  if "reward_offset" not in rm_meta:
    logging.warning("The reward model %s/%d has no reward_offset (trained without normalisation); using 0.",
                    rm_folder, rm_step)
  reward_offset = float(rm_meta.get("reward_offset", 0.0))
  readout = reward_model.Readout.from_meta(rm_meta, cfg.reward_model.ensemble_reduce,
                                           cfg.reward_model.ensemble_penalty)
  rm_cfg = cfg.model.apply(common.model_config_from_meta(rm_meta))
  n_new = p.max_new_tokens
  prompt_len = model_cfg.max_len - n_new
  if prompt_len < 8 or rm_cfg.max_len < model_cfg.max_len:
    raise common.config_lib.ConfigError(
        f"config.ppo.max_new_tokens={n_new} leaves {prompt_len} prompt tokens of the policy's {model_cfg.max_len} "
        f"(and the reward model's context is {rm_cfg.max_len}); lower it.")
  shared = p.critic == "shared"
  models = Models(policy=model_lib.GPT(model_cfg),
                  critic=(reward_model.ScalarHead(p.value_head_init_std, name="value_head") if shared else
                          reward_model.ScalarHeadModel(model_cfg, head_init_std=p.value_head_init_std,
                                                       head_name="value_head")),
                  reward=reward_model.make_reward_model(rm_cfg, int(rm_meta.get("ensemble", 1)),
                                                        pooling=rm_meta.get("pooling", "last")), shared=shared,
                  prompt_len=prompt_len, new_tokens=n_new, reward_context=int(rm_meta.get("context", 0)),
                  end_id=tok.end_of_turn_id)

  # Prompts: the training split for rollouts, the held-out split for evaluation.
  conversations = chat_data.load_conversations(cfg.data.sources, cache_dir=cache_dir)
  train_convs, eval_convs = chat_data.split_by_group(conversations, eval_fraction=cfg.data.eval_fraction,
                                                     seed=cfg.data.split_seed)
  from gptrl.stages.label import training_prompts  # pylint: disable=import-outside-toplevel
  train_prompts = [chat.prompt_tokens(m, tok, max_tokens=prompt_len)
                   for m in training_prompts(train_convs, 0, cfg.seed)]
  eval_messages = held_out_messages(eval_convs, p.num_eval_prompts, cfg.seed)
  eval_prompts = [chat.prompt_tokens(m, tok, max_tokens=prompt_len) for m in eval_messages]
  prompts = Prompts(train_prompts, seed=cfg.seed, batch=p.rollout_batch_size)
  logging.info("PPO prompts: %d training, %d held-out for eval.", len(train_prompts), len(eval_prompts))

  # Parameters: the policy and critic train; the reference and the reward model are frozen.
  example = np.zeros((1, model_cfg.max_len), np.int32)

  def init_params(rng):
    r1, r2 = jax.random.split(rng)
    policy = models.policy.init(r1, example)["params"]
    if shared:
      value = models.critic.init(r2, jnp.zeros((1, model_cfg.max_len, model_cfg.d_model), jnp.float32))["params"]
    else:
      value = models.critic.init(r2, example)["params"]
    return {"policy": policy, "value": value}

  optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps * p.epochs * (p.rollout_batch_size // p.minibatch_size))
  state, state_shardings = trainer.create_train_state(init_params, optimizer, cfg.seed, mesh)
  ref_params = common.load_frozen_params(models.policy, example, placement.scorer, cfg.init,
                                         tokenizer_sha256=tok.sha256)
  rm_params = common.load_frozen_params(models.reward, example, placement.scorer, cfg.reward_model,
                                        tokenizer_sha256=tok.sha256)

  checkpointer = common.open_checkpointer(workdir, cfg.train)
  fingerprint_parts = dict(sources=list(cfg.data.sources), split_seed=cfg.data.split_seed,
                           eval_fraction=cfg.data.eval_fraction, seed=cfg.seed, rollout_batch=p.rollout_batch_size,
                           process_count=jax.process_count(), tokenizer_sha256=tok.sha256,
                           num_prompts=len(train_prompts), prompt_len=prompt_len,
                           ptx=list(p.ptx_sources) if p.ptx_coef > 0 else None)
  fingerprint = data_lib.pipeline_fingerprint(stage="ppo", **fingerprint_parts)
  start, beta, ptx_state = 0, p.init_beta, None
  resumed = common.resume(checkpointer, state, state_shardings, tokenizer_sha256=tok.sha256, fingerprint=fingerprint,
                          fingerprint_parts=fingerprint_parts, train_iter=prompts,
                          reset_data_position=cfg.data.reset_position)
  if resumed is not None:
    start, state, data_state = resumed
    beta = float(data_state["beta"])
    ptx_state = data_state.get("ptx_iterator")
    logging.info("Resumed at beta %.4f.", beta)
  else:
    params = dict(state.params)
    # The trained policy starts equal to the frozen reference, in buffers of its own (the train step donates).
    params["policy"] = jax.tree.map(lambda x, s: jax.device_put(jnp.array(x, copy=True), s), ref_params,
                                    state_shardings.params["policy"])
    abstract_value = ckpt_lib.abstract_like(state.params["value"], state_shardings.params["value"])
    if p.critic_init == "reward" and reward_model.num_members(models.reward) > 1:
      # An ensemble's first member (the model a single RM run with this seed would train) starts the critic.
      params["value"] = jax.tree.map(lambda x, s: jax.device_put(jnp.array(x[0], copy=True), s),
                                     {"transformer": rm_params["transformer"], "value_head": rm_params["reward_head"]},
                                     state_shardings.params["value"])
    elif p.critic_init == "reward":
      trunk, _, _ = ckpt_lib.load_params(cfg.reward_model.checkpoint, abstract_value["transformer"],
                                         step=cfg.reward_model.step, tokenizer_sha256=tok.sha256, subtree="transformer")
      head = jax.tree.map(lambda x, s: jax.device_put(jnp.array(x, copy=True), s), rm_params["reward_head"],
                          state_shardings.params["value"]["value_head"])
      params["value"] = {"transformer": trunk, "value_head": head}
    elif not shared:  # (a shared critic is a fresh value head on the policy's trunk)
      trunk, _, _ = ckpt_lib.load_params(cfg.init.checkpoint, abstract_value["transformer"], step=cfg.init.step,
                                         tokenizer_sha256=tok.sha256, unused_ok=reward_model.UNUSED_LM_PARAMS)
      params["value"] = {**params["value"], "transformer": trunk}
    state = state.replace(params=params)
    logging.info("Policy from %s, critic from %s, reward model %s/%d (%s).", init_meta["init_checkpoint"],
                 "a fresh head on the policy" if shared else p.critic_init, rm_folder, rm_step, readout)

  learner = Learner(cfg, models, mesh, optimizer, state_shardings, ref_params, rm_params,
                    make_score_fn(models, cfg, readout), pad_id=tok.pad_id, stop_id=tok.end_of_turn_id,
                    placement=placement)
  learner.watch_judges = {name: judges_lib.make_judge(name) for name in p.watch_judges}
  if rm_meta.get("gold_judge"):
    learner.gold_judge = judges_lib.make_judge(rm_meta["gold_judge"])
    logging.info("Gold judge (the reward model's labeller): %s.", rm_meta["gold_judge"])
  else:
    logging.info("No gold judge: the reward model's comparisons were not all labelled by one automatic judge.")
  if p.ptx_coef > 0:
    docs = data_lib.load_documents(p.ptx_sources, cache_dir=cache_dir)
    ptx_docs, _ = data_lib.split_documents(docs, eval_fraction=cfg.data.eval_fraction, seed=cfg.data.split_seed)
    ptx_tokens = data_lib.tokenize_documents(ptx_docs, tok, cache_dir=os.path.join(cache_dir, "tokens"))
    learner.ptx_iter = iter(data_lib.lm_dataset(
        ptx_tokens, seq_len=model_cfg.max_len, seed=cfg.seed, global_batch_size=p.minibatch_size,
        process_index=jax.process_index(), process_count=jax.process_count()))
    if ptx_state is not None:
      learner.ptx_iter.set_state(ptx_state)
    logging.info("PPO-ptx: %d pretraining tokens, coefficient %g.", ptx_tokens.size, p.ptx_coef)

  is_main = jax.process_index() == 0
  writer = MetricsWriter(workdir, enabled=is_main, resume_step=start if start else -1)
  if is_main:
    # On resume, the eval-reply lines an interrupted run wrote after the checkpoint go, as metrics rows do.
    truncate_jsonl_after(os.path.join(workdir, EVAL_REPLIES_FILE), start if start else -1)
  guard = trainer.PreemptionGuard()
  bar = tqdm.tqdm(total=cfg.train.steps, initial=start, disable=not (is_main and cfg.train.progress_bar),
                  desc="ppo", file=sys.stderr, dynamic_ncols=True)
  meta = {"stage": "ppo", "tokenizer_sha256": tok.sha256, "model": common.config_lib.to_dict(model_cfg),
          "num_params": model_lib.count_params(state.params["policy"]), "init_checkpoint": init_meta["init_checkpoint"],
          "reward_model": f"{rm_folder}/{rm_step}", "reward_offset": reward_offset, "critic": p.critic,
          "reward_readout": dataclasses.asdict(readout)}

  def save(step):
    writer.sync()  # a bucket workdir's metrics rows first, then the checkpoint they lead up to
    checkpointer.save(step, state, data={"iterator": prompts.get_state(), "fingerprint": fingerprint,
                                         "fingerprint_parts": fingerprint_parts, "beta": beta,
                                         "ptx_iterator": learner.ptx_iter.get_state() if learner.ptx_iter else None},
                    meta=meta)

  def log_eval(step):
    metrics, texts = learner.evaluate(state.params, eval_prompts, beta, tok)
    if metrics:
      writer.write(step, metrics)
      writer.write_texts(step, "samples", texts)
      if is_main and learner.last_eval_replies:
        append_eval_replies(workdir, step, learner.last_eval_replies)
      logging.info("iteration %d eval: %s", step, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

  try:
    if start == 0 and cfg.train.eval_at_start:
      log_eval(0)
    for it in range(start, cfg.train.steps):
      if guard.should_stop(it):
        save(it)
        checkpointer.wait()
        logging.warning("Preempted at iteration %d: checkpoint saved; exiting with code %d.", it,
                        trainer.EXIT_PREEMPTED)
        sys.exit(trainer.EXIT_PREEMPTED)
      state, row, beta, responses, stats = learner.iteration(state, prompts.next(), it, beta)
      checkpointer.poll()  # a failed background save stops the run now, not at the next save
      rolled_back = False
      streak = int(jax.device_get(state.numerics.bad_streak)) if cfg.train.max_bad_steps else 0
      if streak >= cfg.train.max_bad_steps > 0:  # skipped minibatch updates in a row: roll back (trainer.rollback)
        per_iteration = p.epochs * (p.rollout_batch_size // p.minibatch_size)
        first_bad = it + 1 - -(-streak // per_iteration)  # the iteration the bad updates began in
        state, _, saved = trainer.rollback(checkpointer, state, done=it + 1, streak=streak, first_bad=first_bad,
                                           train_cfg=cfg.train, unit="iteration")
        beta, rolled_back = float(saved["beta"]), True  # the KL controller's state goes back with the policy
      if p.save_rollouts and is_main:
        save_rollout(os.path.join(workdir, "rollouts"), it, learner.last_rollout)
      kl_mean = row["ppo/kl"]
      writer.write(it + 1, row)
      if is_main:
        writer.write_texts(it + 1, "rollouts", [json.dumps(
            {"prompt": _last_turn(learner.last_prompts[i], tok), "response": chat.decode_reply(responses[i], tok),
             "reward": round(float(stats["score"][i]), 4)}, ensure_ascii=False) for i in range(min(3, len(responses)))])
      bar.update(1)
      bar.set_postfix(reward=f"{row['ppo/reward']:+.3f}", kl=f"{kl_mean:.2f}", refresh=False)
      done = it + 1
      if done % cfg.train.eval_every == 0 or done == cfg.train.steps:
        log_eval(done)
      if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps or rolled_back:
        save(done)
    checkpointer.wait()
  finally:
    bar.close()
    writer.close()
    guard.restore()
    checkpointer.close()
  return state
