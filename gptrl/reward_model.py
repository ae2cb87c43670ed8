"""A transformer with a scalar head: the reward model (and, later, PPO's value model).

Parameters: {"transformer": <GPT params, from the SFT checkpoint>, "<head name>": {"kernel": [D], "bias": []}}.
The vocabulary projection is never computed (GPT(compute_logits=False)); an untied LM head in the SFT
checkpoint is simply not loaded.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptrl.config import ModelConfig
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


def pool_scores(scores_NxL: jax.Array, last_N: jax.Array, pooling: str,
                valid_NxL: jax.Array | None = None) -> jax.Array:
  """A sequence's score from its per-position scores: at `last_N` ("last"), or the mean over the positions up to
  it ("mean"; `valid_NxL` masks out left padding, where there is some). [N] float32.

  "mean" reads every token's view of the reply, not one token's: with causal attention the prompt's positions
  score alike for every reply to it, so the difference between two replies comes from their own tokens.
  """
  last_N = last_N.astype(jnp.int32)
  if pooling == "last":
    return jnp.take_along_axis(scores_NxL, last_N[:, None], axis=1)[:, 0]
  if pooling != "mean":
    raise ValueError(f"unknown pooling {pooling!r}; known: 'last', 'mean'")
  mask_NxL = (jnp.arange(scores_NxL.shape[1])[None, :] <= last_N[:, None]).astype(jnp.float32)
  if valid_NxL is not None:
    mask_NxL = mask_NxL * valid_NxL.astype(jnp.float32)
  return jnp.sum(scores_NxL * mask_NxL, axis=1) / jnp.maximum(jnp.sum(mask_NxL, axis=1), 1.0)


def sequence_scores(model: ScalarHeadModel, params: Any, tokens_BxKxL: jax.Array, last_BxK: jax.Array, *,
                    deterministic: bool = True, rngs: dict[str, jax.Array] | None = None) -> jax.Array:
  """The score of each of K right-padded sequences per row (`pool_scores` with the model's pooling): [B, K]."""
  b, k, length = tokens_BxKxL.shape
  scores_NxL = model.apply({"params": params}, tokens_BxKxL.reshape(b * k, length), deterministic=deterministic,
                           rngs=rngs)
  return pool_scores(scores_NxL, last_BxK.reshape(b * k), model.pooling).reshape(b, k)
