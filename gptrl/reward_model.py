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
  """GPT backbone + a linear head giving one float32 score per position."""
  config: ModelConfig
  head_init_std: float = 1e-3
  head_name: str = "reward_head"

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


def sequence_scores(model: ScalarHeadModel, params: Any, tokens_BxKxL: jax.Array, last_BxK: jax.Array, *,
                    deterministic: bool = True, rngs: dict[str, jax.Array] | None = None) -> jax.Array:
  """The score of each of K right-padded sequences per row, read at its last real token: [B, K]."""
  b, k, length = tokens_BxKxL.shape
  scores_NxL = model.apply({"params": params}, tokens_BxKxL.reshape(b * k, length), deterministic=deterministic,
                           rngs=rngs)
  scores_N = jnp.take_along_axis(scores_NxL, last_BxK.reshape(b * k, 1).astype(jnp.int32), axis=1)[:, 0]
  return scores_N.reshape(b, k)
