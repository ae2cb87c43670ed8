"""Losses shared by the stages, as pure functions of arrays."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def token_log_probs(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """log p(target) at each position, computed in float32 (bf16 log-softmax is too coarse for PPO ratios).

  As logit(target) - logsumexp(logits): the [B, T, V] log-softmax is never written out, which makes the loss's
  forward and backward about twice as fast on CPU (benchmarks/train_throughput.py) with the same gradient.
  """
  chex.assert_rank(logits_BxTxV, 3)
  chex.assert_equal_shape_prefix((logits_BxTxV, targets_BxT), 2)
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  picked_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked_BxT - jax.nn.logsumexp(logits_BxTxV, axis=-1)


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


def lm_loss_fn(model):
  """Token-weighted next-token cross-entropy of a GPT (`inputs`, `targets`, `weights` batches): the loss_fn
  (gptrl/trainer.py LossFn) of pretraining and SFT; `rng` drives dropout when the model has any."""
  deterministic = model.config.dropout == 0.0

  def loss_fn(params, batch, rng):
    logits_BxTxV = model.apply({"params": params}, batch["inputs"], deterministic=deterministic,
                               rngs=None if deterministic else {"dropout": rng})
    loss_sum, weight = weighted_cross_entropy(logits_BxTxV, batch["targets"], batch["weights"])
    return loss_sum, {"weight": weight}
  return loss_fn


def bradley_terry(rewards_BxK: jax.Array, pairs_BxKxK: jax.Array, margins_BxKxK: jax.Array | None = None, *,
                  margin_scale: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Pairwise logistic (Bradley-Terry) loss over the compared responses of each prompt.

  loss(i beats j) = -log sigmoid(r_i - r_j - margin_scale * margin_ij). As in InstructGPT, the pairs of one
  prompt share a weight of 1 (each pair 1 / its prompt's pair count), so a prompt with many comparisons is not
  over-weighted; rows without pairs (padding) weigh 0.

  Args:
    rewards_BxK: scalar reward of each response.
    pairs_BxKxK: pairs[b, i, j] > 0 where response i was preferred over response j (a count).
    margins_BxKxK: optional margin per pair.
    margin_scale: multiplies the margins (0: plain Bradley-Terry).
  Returns:
    (loss_sum, sums) with sums["weight"] = the number of prompts with pairs, and sums of the per-prompt pair
    accuracy (r_i > r_j) and mean reward margin r_i - r_j, to be divided by the weight.
  """
  chex.assert_rank(rewards_BxK, 2)
  chex.assert_rank(pairs_BxKxK, 3)
  r = rewards_BxK.astype(jnp.float32)
  diff_BxKxK = r[:, :, None] - r[:, None, :]
  shifted = diff_BxKxK
  if margins_BxKxK is not None and margin_scale:
    shifted = diff_BxKxK - margin_scale * margins_BxKxK.astype(jnp.float32)
  pairs = pairs_BxKxK.astype(jnp.float32)
  n_pairs_B = jnp.sum(pairs, axis=(1, 2))
  w_BxKxK = pairs / jnp.maximum(n_pairs_B, 1.0)[:, None, None]
  loss_sum = jnp.sum(w_BxKxK * -jax.nn.log_sigmoid(shifted))
  sums = {"weight": jnp.sum((n_pairs_B > 0).astype(jnp.float32)),
          "accuracy": jnp.sum(w_BxKxK * (diff_BxKxK > 0).astype(jnp.float32)),
          "reward_margin": jnp.sum(w_BxKxK * diff_BxKxK),
          "pairs": jnp.sum(pairs)}
  return loss_sum, sums
