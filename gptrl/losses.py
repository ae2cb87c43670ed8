"""Losses shared by the stages, as pure functions of arrays."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def token_log_probs(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """log p(target) at each position, computed in float32 (bf16 log-softmax is too coarse for PPO ratios)."""
  chex.assert_rank(logits_BxTxV, 3)
  chex.assert_equal_shape_prefix((logits_BxTxV, targets_BxT), 2)
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]


def weighted_cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array,
                           weights_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sum over positions of weights * -log p(target), and the sum of weights.

  Returning sums (not a mean) lets gradient accumulation and data parallelism divide once by the total
  weight of the whole global batch, so the result does not depend on how the batch was split.

  Returns:
    (loss_sum, weight_sum), both float32 scalars.
  """
  chex.assert_equal_shape((targets_BxT, weights_BxT))
  nll_BxT = -token_log_probs(logits_BxTxV, targets_BxT)
  weights_BxT = weights_BxT.astype(jnp.float32)
  return jnp.sum(nll_BxT * weights_BxT), jnp.sum(weights_BxT)
