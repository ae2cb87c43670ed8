"""The math of PPO for RLHF on language models, as pure functions of padded per-token arrays.

Follows lm-human-preferences (Ziegler et al. 2019), trl's PPOTrainer and OpenRLHF; each function's docstring
says whose convention it takes. The order a reader meets them in a PPO step:

  kl_estimate -> per_token_rewards -> gae -> masked_whiten (advantages) -> policy_loss + value_loss (+ entropy)
  and, once per rollout batch, update_kl_coef.

Every array is [B, T] over the response tokens (B batch, T response length) with a response mask `mask_BxT`:
nonzero on real response tokens, 0 on the padding after a response's end. Masked positions never affect a
result, even when they hold NaN or inf: they are dropped with `jnp.where`, never by multiplying by the mask
(0 * nan is nan), so their gradients are exactly 0 as well (`kl_estimate` and `exact_kl` take the mask as an
optional argument; without it they compute every position). All math is in float32.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from gptrl.config import KL_ESTIMATORS


def _valid(mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The mask as booleans (nonzero = real token) broadcast to `shape`."""
  return jnp.broadcast_to(jnp.asarray(mask) != 0, shape)


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x).astype(jnp.float32)


def masked_mean(x: jax.Array, mask: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
  """Mean of `x` over the entries where `mask` is nonzero (trl's `masked_mean`).

  Args:
    x: values, any shape.
    mask: broadcastable to `x`; nonzero selects an entry. The mask only selects: it is not a weight.
    axis: axes to reduce (None: all).
  Returns:
    float32 mean over the selected entries; 0 where nothing is selected (trl would give nan).
  """
  x = _f32(x)
  valid = _valid(mask, x.shape)
  total = jnp.sum(jnp.where(valid, x, 0.0), axis=axis)
  count = jnp.sum(valid, axis=axis, dtype=jnp.float32)
  return total / jnp.maximum(count, 1.0)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
  """Variance of `x` over all entries where `mask` is nonzero (trl's `masked_var`).

  Args:
    x: values, any shape.
    mask: broadcastable to `x`.
    unbiased: apply Bessel's correction n / (n - 1), as trl does.
  Returns:
    float32 scalar; 0 when fewer than two entries are selected.
  """
  valid = _valid(mask, jnp.shape(x))
  x = jnp.where(valid, _f32(x), 0.0)
  n = jnp.sum(valid, dtype=jnp.float32)
  mean = masked_mean(x, valid)
  var = masked_mean(jnp.square(x - mean), valid)
  if unbiased:
    var = var * n / jnp.maximum(n - 1.0, 1.0)
  return var


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
  """(x - mean) / sqrt(var + eps) with the mean and unbiased variance over the masked entries (trl's `masked_whiten`).

  Args:
    x: values, e.g. advantages_BxT.
    mask: broadcastable to `x`.
    shift_mean: False adds the mean back, so only the scale changes (trl does this when whitening rewards).
    eps: added to the variance.
  Returns:
    float32 array shaped like `x`, 0 at masked positions.
  """
  # Garbage is replaced before any arithmetic: 0 * nan in a backward pass would still be nan.
  valid = _valid(mask, jnp.shape(x))
  x = jnp.where(valid, _f32(x), 0.0)
  mean = masked_mean(x, valid)
  var = masked_var(x, valid, unbiased=True)
  whitened = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    whitened = whitened + mean
  return jnp.where(valid, whitened, 0.0)


def kl_estimate(logp_BxT: jax.Array, ref_logp_BxT: jax.Array, kind: str = "k1",
                mask_BxT: jax.Array | None = None) -> jax.Array:
  """Per-token estimate of KL(pi || ref) from the log-probs of the sampled tokens (Schulman, "Approximating KL").

  With log_ratio = logp - ref_logp and the token drawn from pi:
    k1 = log_ratio                                (unbiased, can be negative; lm-human-preferences and trl's
                                                   default "kl" penalty)
    k2 = 0.5 * log_ratio**2                       (biased, >= 0; trl's "mse")
    k3 = exp(-log_ratio) - 1 + log_ratio          (unbiased, >= 0; trl's "k3", OpenRLHF and GRPO)

  Args:
    logp_BxT: log pi(token) of the sampled tokens.
    ref_logp_BxT: log ref(token) of the same tokens.
    kind: "k1", "k2" or "k3".
    mask_BxT: optional response mask; where given, padding gives 0 (and a gradient of 0).
  Returns:
    float32 [B, T]; without a mask, padding positions hold whatever their inputs make.
  """
  if kind not in KL_ESTIMATORS:
    raise ValueError(f"kl_estimate: kind={kind!r} is not one of {KL_ESTIMATORS}")
  chex.assert_equal_shape((logp_BxT, ref_logp_BxT))
  log_ratio_BxT = _f32(logp_BxT) - _f32(ref_logp_BxT)
  if mask_BxT is not None:
    log_ratio_BxT = jnp.where(_valid(mask_BxT, log_ratio_BxT.shape), log_ratio_BxT, 0.0)
  if kind == "k1":
    return log_ratio_BxT
  if kind == "k2":
    return 0.5 * jnp.square(log_ratio_BxT)
  # expm1 keeps k3 accurate (and >= 0) when the ratio is close to 1.
  return jnp.expm1(-log_ratio_BxT) + log_ratio_BxT


def exact_kl(logits_BxTxV: jax.Array, ref_logits_BxTxV: jax.Array,
             mask_BxT: jax.Array | None = None) -> jax.Array:
  """KL(pi || ref) over the full vocabulary at each position, in float32 with log_softmax.

  sum_v pi(v) * (log pi(v) - log ref(v)); tokens with pi(v) = 0 (e.g. logits of -inf) contribute 0. The
  expectation of `kl_estimate(..., "k1")` over tokens drawn from pi.

  Args:
    logits_BxTxV: the policy's logits.
    ref_logits_BxTxV: the reference model's logits.
    mask_BxT: optional response mask; where given, padding gives 0 (and a gradient of 0).
  Returns:
    float32 [B, T].
  """
  chex.assert_rank(logits_BxTxV, 3)
  chex.assert_equal_shape((logits_BxTxV, ref_logits_BxTxV))
  logits_BxTxV, ref_logits_BxTxV = _f32(logits_BxTxV), _f32(ref_logits_BxTxV)
  if mask_BxT is not None:
    valid_BxTx1 = _valid(mask_BxT, logits_BxTxV.shape[:2])[..., None]
    logits_BxTxV = jnp.where(valid_BxTx1, logits_BxTxV, 0.0)
    ref_logits_BxTxV = jnp.where(valid_BxTx1, ref_logits_BxTxV, 0.0)
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  ref_logp_BxTxV = jax.nn.log_softmax(ref_logits_BxTxV, axis=-1)
  p_BxTxV = jnp.exp(logp_BxTxV)
  terms_BxTxV = jnp.where(p_BxTxV > 0, p_BxTxV * (logp_BxTxV - ref_logp_BxTxV), 0.0)
  return jnp.sum(terms_BxTxV, axis=-1)


def per_token_rewards(score_B: jax.Array, kl_BxT: jax.Array, mask_BxT: jax.Array, beta: float | jax.Array, *,
                      truncated_B: jax.Array | None = None, truncation_penalty: float = 0.0) -> jax.Array:
  """The KL-shaped reward of each response token (lm-human-preferences, trl `compute_rewards`).

  rewards[b, t] = -beta * kl[b, t] on every real token, and the sequence's score is added at its last real
  token, t = sum(mask[b]) - 1 (the mask is a prefix of real tokens, then padding). Where `truncated_B` is True
  (the response hit the length limit without ending) `-truncation_penalty` is added there too, so responses
  that do not stop earn less (InstructGPT / trl's `missing_eos_penalty`). Rows with no real token are all 0.

  Args:
    score_B: the reward model's score of each response.
    kl_BxT: per-token KL estimate (see `kl_estimate`).
    mask_BxT: response mask.
    beta: KL coefficient (see `update_kl_coef`).
    truncated_B: bool per row, or None.
    truncation_penalty: a positive number is subtracted from the truncated rows' rewards.
  Returns:
    float32 rewards_BxT, 0 at masked positions.
  """
  chex.assert_rank((score_B, kl_BxT, mask_BxT), (1, 2, 2))
  chex.assert_equal_shape((kl_BxT, mask_BxT))
  chex.assert_equal_shape_prefix((score_B, kl_BxT), 1)
  valid_BxT = _valid(mask_BxT, kl_BxT.shape)
  _, t = kl_BxT.shape
  length_B = jnp.sum(valid_BxT, axis=1)
  last_BxT = (jnp.arange(t)[None, :] == (length_B - 1)[:, None]) & valid_BxT
  final_B = _f32(score_B)
  if truncated_B is not None:
    chex.assert_equal_shape((score_B, truncated_B))
    final_B = final_B - jnp.where(jnp.asarray(truncated_B), jnp.float32(truncation_penalty), 0.0)
  kl_BxT = jnp.where(valid_BxT, _f32(kl_BxT), 0.0)
  final_BxT = jnp.where(last_BxT, final_B[:, None], 0.0)
  return jnp.where(valid_BxT, -_f32(beta) * kl_BxT, 0.0) + final_BxT


def gae(rewards_BxT: jax.Array, values_BxT: jax.Array, mask_BxT: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation (Schulman et al. 2016), right to left with a reverse `lax.scan`.

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V_t    (the value targets)

  Episodic, as in lm-human-preferences, trl and OpenRLHF: after the last real token V and A are 0, so the
  value is bootstrapped with 0. Masked positions are skipped (t + 1 means the next real token), so padding of
  any content never enters the result; for the usual prefix mask this is the standard recursion. Call it on
  values and rewards that carry no gradient (they are targets).

  Args:
    rewards_BxT: per-token rewards (see `per_token_rewards`).
    values_BxT: the value head's estimates at rollout time.
    mask_BxT: response mask.
    gamma: discount (1.0 in lm-human-preferences and trl).
    lam: GAE lambda (0.95 in lm-human-preferences and trl).
  Returns:
    (advantages_BxT, returns_BxT), float32, 0 at masked positions.
  """
  chex.assert_rank(rewards_BxT, 2)
  chex.assert_equal_shape((rewards_BxT, values_BxT, mask_BxT))
  valid_BxT = _valid(mask_BxT, rewards_BxT.shape)
  rewards_BxT = jnp.where(valid_BxT, _f32(rewards_BxT), 0.0)
  values_BxT = jnp.where(valid_BxT, _f32(values_BxT), 0.0)

  def step(carry, inputs):
    next_value_B, next_adv_B = carry
    reward_B, value_B, valid_B = inputs
    delta_B = reward_B + gamma * next_value_B - value_B
    adv_B = delta_B + gamma * lam * next_adv_B
    carry = (jnp.where(valid_B, value_B, next_value_B), jnp.where(valid_B, adv_B, next_adv_B))
    return carry, jnp.where(valid_B, adv_B, 0.0)

  zeros_B = jnp.zeros(rewards_BxT.shape[:1], jnp.float32)
  _, advantages_TxB = jax.lax.scan(step, (zeros_B, zeros_B), (rewards_BxT.T, values_BxT.T, valid_BxT.T),
                                   reverse=True)
  advantages_BxT = advantages_TxB.T
  returns_BxT = jnp.where(valid_BxT, advantages_BxT + values_BxT, 0.0)
  return advantages_BxT, returns_BxT


def clipped_surrogate(logp_BxT: jax.Array, old_logp_BxT: jax.Array, advantages_BxT: jax.Array, mask_BxT: jax.Array,
                      clip_eps: float, clip_eps_high: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO's clipped surrogate per token, before any averaging (see `policy_loss`, `aggregate`).

    ratio    = exp(logp - old_logp)
    loss_t   = -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps_high) * A)

  `clip_eps_high` None (or 0) is `clip_eps`; a larger one is DAPO's "clip-higher" (Yu et al. 2025: 0.28 against
  0.2), which lets unlikely tokens with positive advantages grow faster and keeps entropy from collapsing.
  Returns (loss_BxT, 0 at masked positions; per-token float stats "clipped" (1 where the clipped term is the
  active one) and "ratio"), without gradients through the stats.
  """
  chex.assert_equal_shape((logp_BxT, old_logp_BxT, advantages_BxT, mask_BxT))
  high = clip_eps_high if clip_eps_high else clip_eps
  valid_BxT = _valid(mask_BxT, logp_BxT.shape)
  log_ratio_BxT = jnp.where(valid_BxT, _f32(logp_BxT) - _f32(old_logp_BxT), 0.0)
  advantages_BxT = jnp.where(valid_BxT, _f32(advantages_BxT), 0.0)
  ratio_BxT = jnp.exp(log_ratio_BxT)
  unclipped_BxT = -advantages_BxT * ratio_BxT
  clipped_BxT = -advantages_BxT * jnp.clip(ratio_BxT, 1.0 - clip_eps, 1.0 + high)
  loss_BxT = jnp.where(valid_BxT, jnp.maximum(unclipped_BxT, clipped_BxT), 0.0)
  stats = {"clipped": (clipped_BxT > unclipped_BxT).astype(jnp.float32), "ratio": ratio_BxT,
           "log_ratio": log_ratio_BxT}
  return loss_BxT, jax.lax.stop_gradient(stats)


def policy_loss(logp_BxT: jax.Array, old_logp_BxT: jax.Array, advantages_BxT: jax.Array, mask_BxT: jax.Array,
                clip_eps: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO's clipped surrogate, averaged over all real tokens of the batch (trl / OpenRLHF token mean).

    ratio = exp(logp - old_logp)
    loss  = -mean_t min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A)

  Args:
    logp_BxT: log-probs of the sampled tokens under the policy being trained (differentiated).
    old_logp_BxT: the same under the rollout policy.
    advantages_BxT: (usually whitened) advantages.
    mask_BxT: response mask.
    clip_eps: PPO clip range (0.2 in lm-human-preferences and trl).
  Returns:
    (loss, stats) with stats "clip_frac" (fraction of tokens where the clipped term is the active one),
    "approx_kl" (0.5 * mean (logp - old_logp)^2, trl's k2 estimate of KL(old || new); a diagnostic), and
    "ratio_mean".
  """
  loss_BxT, per_token = clipped_surrogate(logp_BxT, old_logp_BxT, advantages_BxT, mask_BxT, clip_eps)
  valid_BxT = _valid(mask_BxT, logp_BxT.shape)
  stats = {"clip_frac": masked_mean(per_token["clipped"], valid_BxT),
           "approx_kl": 0.5 * masked_mean(jnp.square(per_token["log_ratio"]), valid_BxT),
           "ratio_mean": masked_mean(per_token["ratio"], valid_BxT)}
  return masked_mean(loss_BxT, valid_BxT), stats


def importance_weights(logp_BxT: jax.Array, sampler_logp_BxT: jax.Array, mask_BxT: jax.Array, mode: str,
                       threshold: float) -> tuple[jax.Array, jax.Array]:
  """Importance weights w = pi(token) / sampler(token) for the policy loss when the sampler drew from another
  distribution than the learner's pi (top-k / top-p truncation, a sampler in lower precision), as verl, trl and
  OpenRLHF correct for it; without gradient (they re-weight the samples).

    token_truncate     w_t = min(pi_t / mu_t, C)                         (truncated IS, TIS)
    token_mask         w_t = pi_t / mu_t if 1/C <= it <= C, else 0         (masked IS: outlier tokens dropped)
    sequence_truncate  every token of a reply: min(prod_t pi_t / mu_t, C)
    sequence_mask      every token of a reply: prod_t pi_t / mu_t if within [1/C, C], else 0

  Returns (weights_BxT, 1.0 where a weight was truncated or masked), both 0 at masked positions.
  """
  chex.assert_equal_shape((logp_BxT, sampler_logp_BxT, mask_BxT))
  valid_BxT = _valid(mask_BxT, logp_BxT.shape)
  log_w_BxT = jnp.where(valid_BxT, _f32(logp_BxT) - _f32(sampler_logp_BxT), 0.0)
  if mode.startswith("sequence_"):
    log_w_BxT = jnp.broadcast_to(jnp.sum(log_w_BxT, axis=1, keepdims=True), log_w_BxT.shape)
  log_c = jnp.log(jnp.float32(threshold))
  if mode.endswith("_truncate"):
    corrected_BxT = log_w_BxT > log_c
    weight_BxT = jnp.exp(jnp.minimum(log_w_BxT, log_c))
  elif mode.endswith("_mask"):
    corrected_BxT = jnp.abs(log_w_BxT) > log_c
    weight_BxT = jnp.where(corrected_BxT, 0.0, jnp.exp(jnp.clip(log_w_BxT, -log_c, log_c)))
  else:
    raise ValueError(f"importance_weights: mode={mode!r} is not one of token_truncate, token_mask, "
                     "sequence_truncate, sequence_mask")
  return (jax.lax.stop_gradient(jnp.where(valid_BxT, weight_BxT, 0.0)),
          jnp.where(valid_BxT & corrected_BxT, 1.0, 0.0))


def aggregate(x_BxT: jax.Array, mask_BxT: jax.Array, mode: str = "token_mean") -> tuple[jax.Array, jax.Array]:
  """(total, weight) of per-token values, whose ratio is the loss `mode` asks for; the totals and weights of
  micro-batches add up to the whole batch's, so gradient accumulation does not change the result.

    token_mean     total = sum of x over real tokens, weight = their count (PPO, DAPO: every token counts equally,
                   so long replies weigh more)
    sequence_mean  total = sum over replies of each reply's token mean, weight = replies with a real token (GRPO:
                   every reply counts equally, so a long reply's tokens weigh less)
    sequence_sum   total = sum over replies of each reply's token sum / T (T = x's length, the constant
                   max_new_tokens), weight = replies (Dr. GRPO: no length normalisation, so no length bias)
  """
  valid_BxT = _valid(mask_BxT, jnp.shape(x_BxT))
  x_BxT = jnp.where(valid_BxT, _f32(x_BxT), 0.0)
  if mode == "token_mean":
    return jnp.sum(x_BxT), jnp.sum(valid_BxT, dtype=jnp.float32)
  length_B = jnp.sum(valid_BxT, axis=1, dtype=jnp.float32)
  if mode == "sequence_mean":
    return jnp.sum(jnp.sum(x_BxT, axis=1) / jnp.maximum(length_B, 1.0)), jnp.sum(length_B > 0, dtype=jnp.float32)
  if mode == "sequence_sum":
    return jnp.sum(x_BxT) / x_BxT.shape[1], jnp.float32(x_BxT.shape[0])
  raise ValueError(f"aggregate: mode={mode!r} is not one of token_mean, sequence_mean, sequence_sum")


def _same_group(group_B: jax.Array) -> jax.Array:
  group_B = jnp.asarray(group_B)
  return (group_B[:, None] == group_B[None, :]).astype(jnp.float32)


def _group_sum(same_BxB: jax.Array, x_B: jax.Array) -> jax.Array:
  """Each row's sum of x over its group, in full float32 (a default-precision matmul rounds its inputs to bfloat16
  on TPU and TF32 on recent GPUs: a group that agrees would get advantages of noise)."""
  return jnp.dot(same_BxB, x_B, precision=jax.lax.Precision.HIGHEST)


def group_advantages(score_B: jax.Array, group_B: jax.Array, *, std_norm: bool = True,
                     eps: float = 1e-4) -> jax.Array:
  """GRPO's outcome advantage of each reply (Shao et al. 2024): (score - its group's mean) / (the group's std +
  eps), the std unbiased (n - 1), as trl's GRPOTrainer; `std_norm` False leaves the difference unscaled (Dr. GRPO,
  Liu et al. 2025: the std division over-weights groups that nearly agree).

  Args:
    score_B: each reply's reward.
    group_B: int id of the prompt each reply answers; replies with the same id form a group (any order).
  Returns:
    float32 [B]; a group of one, or one whose scores are all equal, gets 0.
  """
  score_B = _f32(score_B)
  same_BxB = _same_group(group_B)
  count_B = jnp.sum(same_BxB, axis=1)
  mean_B = _group_sum(same_BxB, score_B) / count_B
  centred_B = score_B - mean_B
  if not std_norm:
    return centred_B
  var_B = _group_sum(same_BxB, jnp.square(centred_B)) / jnp.maximum(count_B - 1.0, 1.0)
  positive_B = var_B > 0  # sqrt's gradient at 0 is infinite: a group that agrees must not make NaN gradients
  std_B = jnp.where(positive_B, jnp.sqrt(jnp.where(positive_B, var_B, 1.0)), 0.0)
  return jnp.where(count_B > 1, centred_B / (std_B + eps), 0.0)


def leave_one_out_advantages(return_B: jax.Array, group_B: jax.Array) -> jax.Array:
  """RLOO's advantage of each reply (Kool et al. 2019; Ahmadian et al. 2024): its return minus the mean return of
  the other replies in its group, R_i - (sum_g R - R_i) / (k - 1) = k / (k - 1) * (R_i - mean_g R).

  Args:
    return_B: each reply's (KL-shaped) return.
    group_B: int id of the prompt each reply answers.
  Returns:
    float32 [B]; 0 for a group of one (no baseline).
  """
  return_B = _f32(return_B)
  same_BxB = _same_group(group_B)
  count_B = jnp.sum(same_BxB, axis=1)
  others_B = (_group_sum(same_BxB, return_B) - return_B) / jnp.maximum(count_B - 1.0, 1.0)
  return jnp.where(count_B > 1, return_B - others_B, 0.0)


def best_of_n_advantages(score_B: jax.Array, group_B: jax.Array) -> jax.Array:
  """Rejection sampling's choice as an advantage: 1.0 for the highest-scoring reply of each group (the first of
  a tie), 0.0 for the others (float32 [B])."""
  score_B = _f32(score_B)
  group_B = jnp.asarray(group_B)
  same_BxB = group_B[:, None] == group_B[None, :]
  index_B = jnp.arange(score_B.shape[0])
  # j beats i if it scores higher, or as high and comes first.
  beaten_BxB = same_BxB & ((score_B[None, :] > score_B[:, None])
                           | ((score_B[None, :] == score_B[:, None]) & (index_B[None, :] < index_B[:, None])))
  return jnp.where(jnp.any(beaten_BxB, axis=1), 0.0, 1.0)


def clipped_value_error(values_BxT: jax.Array, old_values_BxT: jax.Array, returns_BxT: jax.Array,
                        mask_BxT: jax.Array, clip_eps_value: float) -> tuple[jax.Array, jax.Array]:
  """(0.5 * max((v - R)^2, (v_clipped - R)^2) per token, 1.0 where the clipped error is the larger), 0 at
  masked positions; `clip_eps_value` <= 0: the plain 0.5 * (v - R)^2 (see `value_loss`)."""
  chex.assert_equal_shape((values_BxT, old_values_BxT, returns_BxT, mask_BxT))
  valid_BxT = _valid(mask_BxT, values_BxT.shape)
  values_BxT = jnp.where(valid_BxT, _f32(values_BxT), 0.0)
  old_values_BxT = jnp.where(valid_BxT, _f32(old_values_BxT), 0.0)
  returns_BxT = jnp.where(valid_BxT, _f32(returns_BxT), 0.0)
  unclipped_BxT = jnp.square(values_BxT - returns_BxT)
  if clip_eps_value <= 0:
    return 0.5 * unclipped_BxT, jnp.zeros_like(unclipped_BxT)
  clipped_values_BxT = jnp.clip(values_BxT, old_values_BxT - clip_eps_value, old_values_BxT + clip_eps_value)
  clipped_BxT = jnp.square(clipped_values_BxT - returns_BxT)
  return 0.5 * jnp.maximum(unclipped_BxT, clipped_BxT), jax.lax.stop_gradient(
      (clipped_BxT > unclipped_BxT).astype(jnp.float32))


def value_loss(values_BxT: jax.Array, old_values_BxT: jax.Array, returns_BxT: jax.Array, mask_BxT: jax.Array,
               clip_eps_value: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clipped value loss (lm-human-preferences, trl `cliprange_value`), averaged over real tokens.

    v_clipped = clip(v, old_v - clip_eps_value, old_v + clip_eps_value)
    loss      = 0.5 * mean_t max((v - R)^2, (v_clipped - R)^2)

  Args:
    values_BxT: the value head's predictions being trained (differentiated).
    old_values_BxT: its predictions at rollout time.
    returns_BxT: targets (see `gae`).
    mask_BxT: response mask.
    clip_eps_value: a Python float; <= 0 turns clipping off (plain 0.5 * mean (v - R)^2).
  Returns:
    (loss, stats) with stats "clip_frac": fraction of tokens where the clipped error is the larger.
  """
  error_BxT, clipped_BxT = clipped_value_error(values_BxT, old_values_BxT, returns_BxT, mask_BxT, clip_eps_value)
  valid_BxT = _valid(mask_BxT, error_BxT.shape)
  return masked_mean(error_BxT, valid_BxT), {"clip_frac": masked_mean(clipped_BxT, valid_BxT)}


def entropy(logits_BxTxV: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """Mean entropy of the policy's next-token distribution over the real tokens, in float32 (trl's `entropy`).

  Returns:
    float32 scalar, -mean_t sum_v p(v) log p(v); tokens with p(v) = 0 contribute 0.
  """
  return masked_mean(token_entropy(logits_BxTxV, mask_BxT), mask_BxT)


def token_entropy(logits_BxTxV: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """The policy's next-token entropy at every position (float32 [B, T], 0 at masked ones); `entropy` is its mean.
  Garbage logits at padding would make nan gradients through the softmax: they are replaced first."""
  chex.assert_rank(logits_BxTxV, 3)
  chex.assert_equal_shape_prefix((logits_BxTxV, mask_BxT), 2)
  valid_BxT = _valid(mask_BxT, logits_BxTxV.shape[:2])
  logits_BxTxV = jnp.where(valid_BxT[..., None], _f32(logits_BxTxV), 0.0)
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  p_BxTxV = jnp.exp(logp_BxTxV)
  return jnp.where(valid_BxT, -jnp.sum(jnp.where(p_BxTxV > 0, p_BxTxV * logp_BxTxV, 0.0), axis=-1), 0.0)


def update_kl_coef(beta: float | jax.Array, current_kl: float | jax.Array, *, target: float | None,
                   horizon: float, n_steps: int) -> float | jax.Array:
  """One step of the adaptive KL controller of Ziegler et al. 2019 (lm-human-preferences `AdaptiveKLController`).

    proportional_error = clip(current_kl / target - 1, -0.2, 0.2)
    beta              <- beta * (1 + proportional_error * n_steps / horizon)

  The state is beta alone, so checkpointing the controller is saving one float. With `target` None or 0 the
  coefficient is fixed (`FixedKLController`) and beta comes back unchanged.

  Args:
    beta: the current KL coefficient.
    current_kl: the mean KL(pi || ref) per response (summed over its tokens) of the last rollout batch.
    target: the KL the controller steers towards (6.0 in lm-human-preferences), or None / 0 for a fixed beta.
    horizon: how many episodes a full proportional correction takes (10000 in lm-human-preferences).
    n_steps: episodes since the last update (the rollout batch size).
  Returns:
    the new beta: a Python float when beta and current_kl are Python numbers, else a float32 jax scalar.
  """
  if not target:
    return beta
  if horizon <= 0:
    raise ValueError(f"update_kl_coef: horizon must be > 0 with an adaptive target, got {horizon}")
  if isinstance(beta, (int, float)) and isinstance(current_kl, (int, float)):
    error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return float(beta) * (1.0 + error * n_steps / horizon)
  error = jnp.clip(_f32(current_kl) / target - 1.0, -0.2, 0.2)
  return _f32(beta) * (1.0 + error * n_steps / horizon)
