"""A transformer with a scalar head: the reward model (and, later, PPO's value model).

Parameters: {"transformer": <GPT params, from the SFT checkpoint>, "<head name>": {"kernel": [D], "bias": []}}.
The vocabulary projection is never computed (GPT(compute_logits=False)); an untied LM head in the SFT
checkpoint is simply not loaded.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptrl.config import ENSEMBLE_REDUCTIONS, POOLINGS, ModelConfig
from gptrl.model import GPT

# Names of SFT-checkpoint parameters a scalar-head model does not use (see checkpoint.load_params).
UNUSED_LM_PARAMS = ("head",)


class ScalarHeadModel(nn.Module):
  """GPT backbone + a linear head giving one float32 score per position; `pooling` says how a sequence's
  score is read from them (`pool_scores`)."""
  config: ModelConfig
  head_init_std: float = 1e-3
  head_name: str = "reward_head"
  pooling: str = "last"

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, *, positions_BxT: jax.Array | None = None,
               attention_mask_BxT: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    """Returns float32 scores [B, T]; a sequence's score is read at its last token."""
    hidden_BxTxD = GPT(self.config, name="transformer")(
        tokens_BxT, positions_BxT=positions_BxT, attention_mask_BxT=attention_mask_BxT,
        deterministic=deterministic, compute_logits=False)
    head = ScalarHead(self.head_init_std, name=self.head_name)
    return head(hidden_BxTxD)


class ScalarHead(nn.Module):
  init_std: float = 1e-3

  @nn.compact
  def __call__(self, hidden_BxTxD: jax.Array) -> jax.Array:
    d = hidden_BxTxD.shape[-1]
    kernel_D = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(self.init_std), ("embed",)),
                          (d,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (), jnp.float32)
    return jnp.einsum("btd,d->bt", hidden_BxTxD.astype(jnp.float32), kernel_D) + bias


def pool_scores(scores_NxL: jax.Array, last_N: jax.Array, pooling: str, valid_NxL: jax.Array | None = None,
                first_N: jax.Array | None = None) -> jax.Array:
  """A sequence's score from its per-position scores: at `last_N` ("last"), the mean over the positions up to it
  ("mean"; `valid_NxL` masks out left padding, where there is some), or the mean over the reply's own positions,
  `first_N` to `last_N` ("reply_mean"). [N] float32.

  "mean" reads every token's view of the reply, not one token's: with causal attention the prompt's positions
  score alike for every reply to it, so the difference between two replies comes from their own tokens, diluted
  by the prompt's length; "reply_mean" leaves the prompt's positions out.
  """
  last_N = last_N.astype(jnp.int32)
  if pooling == "last":
    return jnp.take_along_axis(scores_NxL, last_N[:, None], axis=1)[:, 0]
  if pooling not in POOLINGS:
    raise ValueError(f"unknown pooling {pooling!r}; known: {list(POOLINGS)}")
  positions = jnp.arange(scores_NxL.shape[1])[None, :]
  mask_NxL = positions <= last_N[:, None]
  if pooling == "reply_mean":
    if first_N is None:
      raise ValueError("pooling 'reply_mean' needs where each reply starts (first_N)")
    mask_NxL = mask_NxL & (positions >= first_N.astype(jnp.int32)[:, None])
  mask_NxL = mask_NxL.astype(jnp.float32)
  if valid_NxL is not None:
    mask_NxL = mask_NxL * valid_NxL.astype(jnp.float32)
  return jnp.sum(scores_NxL * mask_NxL, axis=1) / jnp.maximum(jnp.sum(mask_NxL, axis=1), 1.0)


def sequence_scores(model: "ScalarHeadModel | RewardEnsemble", params: Any, tokens_BxKxL: jax.Array,
                    last_BxK: jax.Array, first_BxK: jax.Array | None = None, *, deterministic: bool = True,
                    rngs: dict[str, jax.Array] | None = None) -> jax.Array:
  """The score of each of K right-padded sequences per row (`pool_scores` with the model's pooling; `first_BxK`:
  where each reply starts): [B, K] for one model; [M, B, K] for an ensemble, every member scoring the same
  sequences, or, given [B, M, K, L] tokens and [B, M, K] positions, each member its own (training, where each
  member has its own data order)."""
  if first_BxK is None:
    first_BxK = jnp.zeros_like(last_BxK)
  if isinstance(model, RewardEnsemble):
    m = model.members
    member_inputs = tokens_BxKxL.ndim == 4
    if member_inputs:  # [B, M, K, L] -> [M, B*K, L]
      b, _, k, length = tokens_BxKxL.shape
      tokens = jnp.swapaxes(tokens_BxKxL, 0, 1).reshape(m, b * k, length)
      last_N, first_N = (jnp.swapaxes(x, 0, 1).reshape(m * b * k) for x in (last_BxK, first_BxK))
    else:
      b, k, length = tokens_BxKxL.shape
      tokens = tokens_BxKxL.reshape(b * k, length)
      last_N, first_N = (jnp.tile(x.reshape(b * k), m) for x in (last_BxK, first_BxK))
    scores_MxNxL = model.apply({"params": params}, tokens, deterministic=deterministic, rngs=rngs,
                               member_inputs=member_inputs)
    return pool_scores(scores_MxNxL.reshape(m * b * k, length), last_N, model.pooling,
                       first_N=first_N).reshape(m, b, k)
  b, k, length = tokens_BxKxL.shape
  scores_NxL = model.apply({"params": params}, tokens_BxKxL.reshape(b * k, length), deterministic=deterministic,
                           rngs=rngs)
  return pool_scores(scores_NxL, last_BxK.reshape(b * k), model.pooling,
                     first_N=first_BxK.reshape(b * k)).reshape(b, k)


# ---------------------------------------------------------------------------------------------------------------
# Ensembles: k reward models trained together, their scores combined into one reward.

ENSEMBLE_AXIS = "ensemble"  # the logical name of the members' axis (replicated: gptrl/sharding.py RULES)


class RewardEnsemble:
  """`members` ScalarHeadModels whose parameters are stacked along a leading `ensemble` axis: the same tree as
  one model's ({"transformer": ..., "<head name>": ...}), every leaf with a leading [M].

  It behaves as a flax module where the stages use one (`init`, `apply`, `config`, `pooling`, `head_name`); `apply`
  returns [M, B, T] scores, each member applied by `jax.vmap` to its own slice of the parameters, so the members
  are independent models computed in one program. Inputs are shared by every member, or (member_inputs=True)
  carry their own leading [M] axis: in training each member sees its own data order.
  """

  def __init__(self, config, members: int, *, head_init_std: float = 1e-3, head_name: str = "reward_head",
               pooling: str = "last"):
    if members < 2:
      raise ValueError(f"an ensemble needs at least 2 members, got {members}")
    self.members = members
    self.member = ScalarHeadModel(config, head_init_std=head_init_std, head_name=head_name, pooling=pooling)

  config = property(lambda self: self.member.config)
  pooling = property(lambda self: self.member.pooling)
  head_name = property(lambda self: self.member.head_name)

  def init(self, rng: jax.Array, tokens_BxT: jax.Array) -> dict[str, Any]:
    """{"params": ...} boxed with logical names, ("ensemble", *the member's names) on every leaf; member m is
    initialised from the m-th split of `rng`."""
    boxed = jax.vmap(lambda r: self.member.init(r, tokens_BxT)["params"])(jax.random.split(rng, self.members))

    def add_axis(x):
      if isinstance(x, nn.Partitioned):
        return x.replace(names=(ENSEMBLE_AXIS,) + tuple(x.names))
      return nn.LogicallyPartitioned(x, names=(ENSEMBLE_AXIS,) + (None,) * (x.ndim - 1))
    return {"params": jax.tree.map(add_axis, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))}

  def apply(self, variables: dict[str, Any], tokens_BxT: jax.Array, *, positions_BxT: jax.Array | None = None,
            attention_mask_BxT: jax.Array | None = None, deterministic: bool = True,
            rngs: dict[str, jax.Array] | None = None, member_inputs: bool = False) -> jax.Array:
    """Scores [M, B, T] float32. With member_inputs the token, position and mask arrays are [M, B, T]."""
    def one(params, tokens, positions, attention, rng):
      return self.member.apply({"params": params}, tokens, positions_BxT=positions, attention_mask_BxT=attention,
                               deterministic=deterministic, rngs=None if rng is None else {"dropout": rng})
    rng = None if not rngs else jax.random.split(rngs["dropout"], self.members)
    axis = 0 if member_inputs else None
    return jax.vmap(one, in_axes=(0, axis, axis, axis, None if rng is None else 0))(
        variables["params"], tokens_BxT, positions_BxT, attention_mask_BxT, rng)


def make_reward_model(config, members: int = 1, **kwargs) -> ScalarHeadModel | RewardEnsemble:
  """One ScalarHeadModel, or an ensemble of `members` of them."""
  return ScalarHeadModel(config, **kwargs) if members == 1 else RewardEnsemble(config, members, **kwargs)


def num_members(model: ScalarHeadModel | RewardEnsemble) -> int:
  return getattr(model, "members", 1)


def member_scores(model: ScalarHeadModel | RewardEnsemble, params: Any, tokens_BxT: jax.Array,
                  **kwargs) -> jax.Array:
  """Per-position scores of every member, [M, B, T] (M = 1 for a single model)."""
  scores = model.apply({"params": params}, tokens_BxT, **kwargs)
  return scores if isinstance(model, RewardEnsemble) else scores[None]


def pooled_member_scores(model: ScalarHeadModel | RewardEnsemble, params: Any, tokens_BxT: jax.Array,
                         last_B: jax.Array, first_B: jax.Array, valid_BxT: jax.Array | None = None,
                         **kwargs) -> jax.Array:
  """Each sequence's score under every member (`pool_scores` with the model's pooling): [B, M]."""
  scores_MxBxT = member_scores(model, params, tokens_BxT, **kwargs)
  m, b, t = scores_MxBxT.shape
  valid = None if valid_BxT is None else jnp.broadcast_to(valid_BxT, (m, b, t)).reshape(m * b, t)
  pooled = pool_scores(scores_MxBxT.reshape(m * b, t), jnp.tile(last_B, m), model.pooling, valid_NxL=valid,
                       first_N=jnp.tile(first_B, m))
  return pooled.reshape(m, b).T


@dataclasses.dataclass(frozen=True)
class Readout:
  """How raw scores become the reward a policy stage optimises: member m's score is centred on its mean over SFT
  replies (`offsets[m]`, InstructGPT's normalisation) and multiplied by `scales[m]`; an ensemble's centred scores
  are then reduced to one by `reduce`: "mean", "mean_minus_std" (mean - penalty * their standard deviation over
  members: conservative where the members disagree) or "min" (the most pessimistic member)."""
  offsets: tuple[float, ...] = (0.0,)
  scales: tuple[float, ...] = (1.0,)
  reduce: str = "mean"
  penalty: float = 1.0

  def __post_init__(self):
    if self.reduce not in ENSEMBLE_REDUCTIONS:
      raise ValueError(f"unknown ensemble reduction {self.reduce!r}; known: {list(ENSEMBLE_REDUCTIONS)}")
    if len(self.offsets) != len(self.scales):
      raise ValueError(f"{len(self.offsets)} offsets but {len(self.scales)} scales")

  @classmethod
  def from_meta(cls, meta: dict[str, Any], reduce: str = "mean", penalty: float = 1.0) -> "Readout":
    """The reward model checkpoint's normalisation: one offset, or an ensemble's per-member offsets and spreads.
    An ensemble's members are scaled to their mean spread, so that no member dominates the mean or the min."""
    members = int(meta.get("ensemble", 1))
    if members == 1:
      return cls((float(meta.get("reward_offset", 0.0)),), (1.0,), reduce, penalty)
    offsets = tuple(float(x) for x in meta.get("reward_offsets", [0.0] * members))
    stds = np.asarray(meta.get("reward_stds", [1.0] * members), np.float64)
    if len(offsets) != members or stds.shape != (members,):
      raise ValueError(f"the reward model's meta describes {members} members but holds {len(offsets)} offsets "
                       f"and {stds.size} spreads")
    stds = np.where(stds > 0, stds, 1.0)
    return cls(offsets, tuple(float(x) for x in stds.mean() / stds), reduce, penalty)

  @property
  def members(self) -> int:
    return len(self.offsets)

  def centred(self, raw_BxM: jax.Array) -> jax.Array:
    """Each member's normalised score [B, M]."""
    offsets = jnp.asarray(self.offsets, jnp.float32)
    return (raw_BxM.astype(jnp.float32) - offsets) * jnp.asarray(self.scales, jnp.float32)

  def __call__(self, raw_BxM: jax.Array) -> jax.Array:
    """The reward [B] of raw member scores [B, M]."""
    return reduce_members(self.centred(raw_BxM), self.reduce, self.penalty)


def reduce_members(centred_BxM: jax.Array, reduce: str, penalty: float = 1.0) -> jax.Array:
  """[B, M] -> [B]: the members' mean, mean - penalty * std (population std over members), or min. Works on
  NumPy and JAX arrays alike."""
  xp = jnp if isinstance(centred_BxM, jax.Array) else np
  if reduce == "mean":
    return xp.mean(centred_BxM, axis=-1)
  if reduce == "mean_minus_std":
    return xp.mean(centred_BxM, axis=-1) - penalty * xp.std(centred_BxM, axis=-1)
  if reduce == "min":
    return xp.min(centred_BxM, axis=-1)
  raise ValueError(f"unknown ensemble reduction {reduce!r}; known: {list(ENSEMBLE_REDUCTIONS)}")
