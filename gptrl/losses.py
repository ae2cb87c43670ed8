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
  # The target logits are gathered before the upcast (the same values): gathered from the upcast, XLA:TPU writes a
  # float32 copy of bfloat16 logits (model.logits_dtype) whole for the gather to read 1 / V of it.
  picked_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked_BxT.astype(jnp.float32) - jax.nn.logsumexp(logits_BxTxV.astype(jnp.float32), axis=-1)


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


def sequence_log_probs(logits_BxTxV: jax.Array, tokens_BxT: jax.Array, first_B: jax.Array,
                       last_B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of log p(token) over tokens first..last of each row, their count), from the logits of the same rows
  (position t predicts token t + 1), in float32. A row with last < first (padding) gives (0, 0)."""
  chex.assert_rank((logits_BxTxV, tokens_BxT, first_B, last_B), (3, 2, 1, 1))
  logp_BxT1 = token_log_probs(logits_BxTxV[:, :-1], tokens_BxT[:, 1:])  # [:, j]: log p(token j + 1)
  index_T1 = jnp.arange(tokens_BxT.shape[1] - 1)[None, :] + 1
  inside_BxT1 = (index_T1 >= first_B[:, None]) & (index_T1 <= last_B[:, None])
  return (jnp.sum(jnp.where(inside_BxT1, logp_BxT1, 0.0), axis=1),
          jnp.sum(inside_BxT1, axis=1).astype(jnp.float32))


PREFERENCE_LOSSES = ("sigmoid", "ipo")  # dpo.loss_type


def dpo_loss(logp_BxK: jax.Array, ref_logp_BxK: jax.Array, length_BxK: jax.Array, pairs_BxKxK: jax.Array, *,
             beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Direct preference optimisation over the compared replies of each prompt (every pair i > j of a ranking).

  With the log-ratio of a reply to the reference, rho = log pi(y|x) - log ref(y|x) (summed over its tokens), and
  h_ij = rho_i - rho_j for a pair where i was preferred over j:
    sigmoid (DPO, Rafailov et al. 2023):  -log sigmoid(beta * h_ij)
      with label_smoothing e (conservative DPO, Mitchell 2023):  -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
    ipo (IPO, Azar et al. 2023):  (h_ij - 1 / (2 beta))^2, rho averaged over the reply's tokens (as trl does)
  Each pair weighs its count in `pairs` (trl's convention: every pair counts; the reward model's
  `bradley_terry` weighs each prompt 1 instead).

  Args:
    logp_BxK: the policy's summed log-prob of each reply (differentiated).
    ref_logp_BxK: the reference's, computed once per example.
    length_BxK: the replies' token counts (for IPO's mean).
    pairs_BxKxK: pairs[b, i, j] > 0 where reply i was preferred over reply j (a count); 0 on padding.
  Returns:
    (loss_sum, sums): sums["weight"] = the number of pairs; and the sums over pairs of the implicit reward
    r = beta * rho's accuracy (r_i > r_j), margin r_i - r_j, chosen r_i and rejected r_j, to divide by it.
  """
  chex.assert_equal_shape((logp_BxK, ref_logp_BxK, length_BxK))
  chex.assert_rank(pairs_BxKxK, 3)
  w_BxKxK = pairs_BxKxK.astype(jnp.float32)
  # Padding replies (in no pair) may hold any value, even NaN: replaced before any arithmetic, so that neither the
  # loss nor its gradient sees them (0 * NaN is NaN).
  compared_BxK = (jnp.sum(w_BxKxK, axis=2) + jnp.sum(w_BxKxK, axis=1)) > 0
  rho_BxK = jnp.where(compared_BxK, logp_BxK.astype(jnp.float32) - ref_logp_BxK.astype(jnp.float32), 0.0)
  if loss_type == "sigmoid":
    h_BxKxK = rho_BxK[:, :, None] - rho_BxK[:, None, :]
    loss_BxKxK = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h_BxKxK)
                  - label_smoothing * jax.nn.log_sigmoid(-beta * h_BxKxK))
  elif loss_type == "ipo":
    mean_BxK = rho_BxK / jnp.maximum(jnp.where(compared_BxK, length_BxK.astype(jnp.float32), 1.0), 1.0)
    h_BxKxK = mean_BxK[:, :, None] - mean_BxK[:, None, :]
    loss_BxKxK = jnp.square(h_BxKxK - 1.0 / (2.0 * beta))
  else:
    raise ValueError(f"dpo_loss: loss_type={loss_type!r} is not one of {PREFERENCE_LOSSES}")
  loss_BxKxK = jnp.where(w_BxKxK > 0, loss_BxKxK, 0.0)
  r_BxK = beta * rho_BxK
  margin_BxKxK = jnp.where(w_BxKxK > 0, r_BxK[:, :, None] - r_BxK[:, None, :], 0.0)
  sums = {"weight": jnp.sum(w_BxKxK), "accuracy": jnp.sum(w_BxKxK * (margin_BxKxK > 0)),
          "reward_margin": jnp.sum(w_BxKxK * margin_BxKxK),
          "chosen_reward": jnp.sum(w_BxKxK * jnp.where(w_BxKxK > 0, r_BxK[:, :, None], 0.0)),
          "rejected_reward": jnp.sum(w_BxKxK * jnp.where(w_BxKxK > 0, r_BxK[:, None, :], 0.0))}
  return jnp.sum(w_BxKxK * loss_BxKxK), jax.lax.stop_gradient(sums)
