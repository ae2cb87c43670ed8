"""PPO math (gptrl/ppo_math.py) against float64 NumPy references on hand-made ragged batches."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptrl import ppo_math

# Four responses of lengths 5, 3, 1 and 0 (the last row is all padding).
LENGTHS = np.array([5, 3, 1, 0])
B, T, V = 4, 5, 6
MASK = (np.arange(T)[None, :] < LENGTHS[:, None]).astype(np.float32)
VALID = MASK > 0


def _ragged(seed, scale=1.0, garbage=np.nan):
  """A [B, T] float32 array of random values on real tokens and `garbage` on padding."""
  x = np.random.default_rng(seed).normal(size=(B, T)) * scale
  return np.where(VALID, x, garbage).astype(np.float32)


def _ragged_logits(seed, garbage=np.nan):
  x = np.random.default_rng(seed).normal(size=(B, T, V)) * 2.0
  return np.where(VALID[..., None], x, garbage).astype(np.float32)


def _np_masked_mean(x, valid):
  return float(np.mean(np.asarray(x, np.float64)[valid])) if valid.any() else 0.0


def _np_log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


# --- masked statistics --------------------------------------------------------------------------------------


def test_masked_mean_and_var_match_numpy_over_real_tokens_only():
  x = _ragged(0)
  np.testing.assert_allclose(ppo_math.masked_mean(x, MASK), _np_masked_mean(x, VALID), rtol=1e-6)
  row_means = ppo_math.masked_mean(x, MASK, axis=1)
  expected = [_np_masked_mean(x[b], VALID[b]) for b in range(B)]
  np.testing.assert_allclose(row_means, expected, rtol=1e-6)
  assert row_means[3] == 0.0  # the empty row: 0, not nan
  real = x[VALID].astype(np.float64)
  np.testing.assert_allclose(ppo_math.masked_var(x, MASK), np.var(real, ddof=1), rtol=1e-5)
  np.testing.assert_allclose(ppo_math.masked_var(x, MASK, unbiased=False), np.var(real), rtol=1e-5)


def test_masked_var_of_fewer_than_two_entries_is_zero():
  x = _ragged(1)
  assert ppo_math.masked_var(x, np.zeros_like(MASK)) == 0.0
  assert ppo_math.masked_var(x, MASK * (np.arange(T) == 0) * (np.arange(B) == 0)[:, None]) == 0.0


def test_whitening_gives_mean_zero_and_unit_variance_over_real_tokens():
  x = _ragged(2, scale=3.0) + 5.0
  whitened = np.asarray(ppo_math.masked_whiten(x, MASK))
  real = x[VALID].astype(np.float64)
  np.testing.assert_allclose(whitened[VALID], (real - real.mean()) / np.sqrt(np.var(real, ddof=1) + 1e-8),
                             rtol=1e-5, atol=1e-6)
  assert abs(whitened[VALID].mean()) < 1e-6
  np.testing.assert_allclose(np.var(whitened[VALID], ddof=1), 1.0, rtol=1e-5)
  assert np.all(whitened[~VALID] == 0.0)


def test_whitening_without_shift_keeps_the_mean():
  x = _ragged(3, scale=3.0) + 5.0
  scaled = np.asarray(ppo_math.masked_whiten(x, MASK, shift_mean=False))
  real = x[VALID].astype(np.float64)
  np.testing.assert_allclose(scaled[VALID].mean(), real.mean(), rtol=1e-5)
  np.testing.assert_allclose(np.var(scaled[VALID], ddof=1), 1.0, rtol=1e-5)


# --- KL -----------------------------------------------------------------------------------------------------


def test_kl_estimators_match_schulmans_formulas():
  logp, ref_logp = _ragged(4, garbage=0.0) - 1.0, _ragged(5, garbage=0.0) - 1.0
  log_ratio = logp.astype(np.float64) - ref_logp
  np.testing.assert_allclose(ppo_math.kl_estimate(logp, ref_logp, "k1"), log_ratio, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ppo_math.kl_estimate(logp, ref_logp, "k2"), 0.5 * log_ratio ** 2, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(ppo_math.kl_estimate(logp, ref_logp, "k3"),
                             np.exp(-log_ratio) - 1.0 + log_ratio, rtol=1e-5, atol=1e-6)


def test_k3_is_never_negative():
  log_ratio = np.concatenate([np.linspace(-20.0, 20.0, 401), [0.0, 1e-7, -1e-7]]).astype(np.float32)
  k3 = np.asarray(ppo_math.kl_estimate(log_ratio[None], np.zeros_like(log_ratio)[None], "k3"))
  assert np.all(k3 >= 0.0)


def test_unknown_kl_estimator_is_rejected():
  with pytest.raises(ValueError, match="k4"):
    ppo_math.kl_estimate(np.zeros((1, 1)), np.zeros((1, 1)), "k4")


def test_exact_kl_matches_numpy():
  logits, ref_logits = _ragged_logits(6, garbage=0.0), _ragged_logits(7, garbage=0.0)
  logp, ref_logp = _np_log_softmax(logits), _np_log_softmax(ref_logits)
  expected = np.sum(np.exp(logp) * (logp - ref_logp), axis=-1)
  np.testing.assert_allclose(ppo_math.exact_kl(logits, ref_logits), expected, rtol=1e-5, atol=1e-6)


def test_exact_kl_ignores_tokens_the_policy_never_samples():
  logits = np.array([[[0.0, 1.0, -np.inf]]], np.float32)
  ref_logits = np.array([[[1.0, 0.0, 0.5]]], np.float32)
  logp, ref_logp = _np_log_softmax(logits[..., :2]), _np_log_softmax(ref_logits)[..., :2]
  expected = np.sum(np.exp(logp) * (logp - ref_logp), axis=-1)
  np.testing.assert_allclose(ppo_math.exact_kl(logits, ref_logits), expected, rtol=1e-5)


def test_k1_and_k3_averaged_over_samples_from_the_policy_approximate_the_exact_kl():
  logits, ref_logits = np.array([2.0, 0.5, -1.0, 0.0, 1.0, -0.5]), np.array([0.0, 1.0, 0.5, -1.0, 0.0, 0.3])
  logp, ref_logp = _np_log_softmax(logits), _np_log_softmax(ref_logits)
  tokens = np.random.default_rng(8).choice(len(logits), size=200_000, p=np.exp(logp))
  sample_logp = logp[tokens].astype(np.float32)[None]
  sample_ref_logp = ref_logp[tokens].astype(np.float32)[None]
  exact = float(ppo_math.exact_kl(logits[None, None].astype(np.float32),
                                  ref_logits[None, None].astype(np.float32))[0, 0])
  for kind in ("k1", "k3"):
    samples = np.asarray(ppo_math.kl_estimate(sample_logp, sample_ref_logp, kind), np.float64)
    standard_error = samples.std() / np.sqrt(samples.size)
    assert abs(samples.mean() - exact) < 5 * standard_error + 1e-4, kind


# --- rewards and GAE ----------------------------------------------------------------------------------------


def _np_rewards(score, kl, beta, truncated=None, penalty=0.0):
  rewards = np.zeros((B, T))
  for b in range(B):
    for t in range(LENGTHS[b]):
      rewards[b, t] = -beta * float(kl[b, t])
    if LENGTHS[b]:
      rewards[b, LENGTHS[b] - 1] += score[b] - (penalty if truncated is not None and truncated[b] else 0.0)
  return rewards


def test_rewards_are_minus_beta_kl_plus_the_score_at_the_last_real_token():
  score = np.array([1.0, -2.0, 0.5, np.nan], np.float32)  # the empty row's score must not leak
  kl = _ragged(9)
  rewards = np.asarray(ppo_math.per_token_rewards(score, kl, MASK, 0.1))
  np.testing.assert_allclose(rewards, _np_rewards(score, kl, 0.1), rtol=1e-5, atol=1e-6)
  assert np.all(rewards[3] == 0.0)


def test_truncated_responses_are_penalised_at_their_last_token():
  score = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
  kl = _ragged(10)
  truncated = np.array([True, False, True, True])
  rewards = ppo_math.per_token_rewards(score, kl, MASK, 0.05, truncated_B=truncated, truncation_penalty=1.5)
  np.testing.assert_allclose(rewards, _np_rewards(score, kl, 0.05, truncated, 1.5), rtol=1e-5, atol=1e-6)


def _np_gae(rewards, values, gamma, lam):
  advantages, returns = np.zeros((B, T)), np.zeros((B, T))
  for b in range(B):
    last_advantage = 0.0
    for t in reversed(range(LENGTHS[b])):
      next_value = float(values[b, t + 1]) if t + 1 < LENGTHS[b] else 0.0
      delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
      last_advantage = delta + gamma * lam * last_advantage
      advantages[b, t] = last_advantage
      returns[b, t] = last_advantage + float(values[b, t])
  return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_an_explicit_double_loop(gamma, lam):
  rewards, values = _ragged(11), _ragged(12)
  advantages, returns = ppo_math.gae(rewards, values, MASK, gamma, lam)
  expected_advantages, expected_returns = _np_gae(rewards, values, gamma, lam)
  np.testing.assert_allclose(advantages, expected_advantages, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(returns, expected_returns, rtol=1e-5, atol=1e-6)


def test_gae_with_lambda_one_and_no_discount_gives_reward_to_go_minus_value():
  rewards, values = _ragged(13, garbage=0.0), _ragged(14, garbage=0.0)
  advantages, returns = ppo_math.gae(rewards, values, MASK, 1.0, 1.0)
  reward_to_go = np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1] * VALID
  np.testing.assert_allclose(returns, reward_to_go, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(advantages, (reward_to_go - values) * VALID, rtol=1e-5, atol=1e-5)


# --- losses -------------------------------------------------------------------------------------------------


def _np_policy_loss(logp, old_logp, advantages, clip_eps):
  ratio = np.exp(logp[VALID].astype(np.float64) - old_logp[VALID])
  adv = advantages[VALID].astype(np.float64)
  return np.mean(np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip_eps, 1 + clip_eps)))


def test_policy_loss_matches_numpy():
  logp, old_logp, advantages = _ragged(15) * 0.3 - 1.0, _ragged(16) * 0.3 - 1.0, _ragged(17)
  loss, stats = ppo_math.policy_loss(logp, old_logp, advantages, MASK, 0.2)
  np.testing.assert_allclose(loss, _np_policy_loss(logp, old_logp, advantages, 0.2), rtol=1e-5, atol=1e-6)
  log_ratio = logp[VALID].astype(np.float64) - old_logp[VALID]
  np.testing.assert_allclose(stats["approx_kl"], 0.5 * np.mean(log_ratio ** 2), rtol=1e-5)
  np.testing.assert_allclose(stats["ratio_mean"], np.mean(np.exp(log_ratio)), rtol=1e-5)


def test_policy_loss_clips_ratios_outside_the_trust_region_in_the_advantages_direction():
  # One row of four tokens: ratio 1.5 with A > 0 and ratio 0.5 with A < 0 are clipped; ratio 1.5 with A < 0
  # and ratio 0.5 with A > 0 (the pessimistic side) are not.
  ratio = np.array([[1.5, 0.5, 1.5, 0.5]])
  advantages = np.array([[2.0, -3.0, -1.0, 4.0]], np.float32)
  old_logp = np.full((1, 4), -2.0, np.float32)
  logp = (old_logp + np.log(ratio)).astype(np.float32)
  loss, stats = ppo_math.policy_loss(logp, old_logp, advantages, np.ones((1, 4)), 0.2)
  expected = np.mean([-2.0 * 1.2, 3.0 * 0.8, 1.0 * 1.5, -4.0 * 0.5])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(stats["clip_frac"], 0.5)


def test_policy_loss_at_ratio_one_is_minus_the_mean_advantage():
  logp, advantages = _ragged(18) - 1.0, _ragged(19)
  loss, stats = ppo_math.policy_loss(logp, logp, advantages, MASK, 0.2)
  np.testing.assert_allclose(loss, -_np_masked_mean(advantages, VALID), rtol=1e-5)
  assert stats["approx_kl"] == 0.0 and stats["clip_frac"] == 0.0 and stats["ratio_mean"] == 1.0


def test_policy_loss_gradient_matches_finite_differences():
  logp, old_logp, advantages = _ragged(20) * 0.1 - 1.0, _ragged(21) * 0.1 - 1.0, _ragged(22)
  grad = np.asarray(jax.grad(lambda lp: ppo_math.policy_loss(lp, old_logp, advantages, MASK, 0.2)[0])(logp))
  assert np.all(grad[~VALID] == 0.0)
  step = 1e-6
  for b, t in zip(*np.nonzero(VALID)):
    plus, minus = logp.astype(np.float64), logp.astype(np.float64)
    plus[b, t] += step
    minus[b, t] -= step
    numeric = (_np_policy_loss(plus, old_logp, advantages, 0.2)
               - _np_policy_loss(minus, old_logp, advantages, 0.2)) / (2 * step)
    np.testing.assert_allclose(grad[b, t], numeric, rtol=1e-3, atol=1e-5, err_msg=f"token {b, t}")


def test_value_loss_takes_the_larger_of_the_clipped_and_unclipped_errors():
  old_values = np.zeros((1, 4), np.float32)
  values = np.array([[1.0, 1.0, -0.5, 0.1]], np.float32)
  returns = np.array([[2.0, 0.0, 0.5, 0.0]], np.float32)
  # clipped values [0.2, 0.2, -0.2, 0.1]: errors (1.8, 0.2, 0.7, 0.1) vs unclipped (1.0, 1.0, 1.0, 0.1)
  loss, stats = ppo_math.value_loss(values, old_values, returns, np.ones((1, 4)), 0.2)
  np.testing.assert_allclose(loss, 0.5 * np.mean([1.8 ** 2, 1.0, 1.0, 0.01]), rtol=1e-5)
  np.testing.assert_allclose(stats["clip_frac"], 0.25)


def test_value_loss_matches_numpy_and_clipping_can_be_turned_off():
  values, old_values, returns = _ragged(23), _ragged(24), _ragged(25)
  v, old, ret = (a[VALID].astype(np.float64) for a in (values, old_values, returns))
  clipped = np.clip(v, old - 0.3, old + 0.3)
  loss, _ = ppo_math.value_loss(values, old_values, returns, MASK, 0.3)
  np.testing.assert_allclose(loss, 0.5 * np.mean(np.maximum((v - ret) ** 2, (clipped - ret) ** 2)), rtol=1e-5)
  for off in (0.0, -1.0):
    loss, stats = ppo_math.value_loss(values, old_values, returns, MASK, off)
    np.testing.assert_allclose(loss, 0.5 * np.mean((v - ret) ** 2), rtol=1e-5)
    assert stats["clip_frac"] == 0.0


def test_entropy_matches_numpy():
  logits = _ragged_logits(26)
  logp = _np_log_softmax(np.where(VALID[..., None], logits, 0.0))
  entropy_BxT = -np.sum(np.exp(logp) * logp, axis=-1)
  np.testing.assert_allclose(ppo_math.entropy(logits, MASK), entropy_BxT[VALID].mean(), rtol=1e-5)


# --- garbage at padding -------------------------------------------------------------------------------------


def _everything(a, b, c, logits):
  """Every function of the module chained as a PPO step would, to one scalar (and the arrays made on the way)."""
  rewards = ppo_math.per_token_rewards(jnp.ones(B), ppo_math.kl_estimate(a, b, "k3", MASK), MASK, 0.1)
  advantages, returns = ppo_math.gae(rewards, c, MASK, 1.0, 0.95)
  advantages = ppo_math.masked_whiten(advantages, MASK)
  pg, pg_stats = ppo_math.policy_loss(a, b, advantages, MASK, 0.2)
  vf, vf_stats = ppo_math.value_loss(c, b, returns, MASK, 0.2)
  total = (pg + vf - 0.01 * ppo_math.entropy(logits, MASK) + ppo_math.masked_mean(a, MASK)
           + ppo_math.masked_var(c, MASK) + ppo_math.masked_mean(ppo_math.exact_kl(logits, logits[..., ::-1], MASK),
                                                                 MASK))
  return total, (advantages, returns, pg_stats, vf_stats)


_everything_and_grads = jax.jit(jax.value_and_grad(_everything, argnums=(0, 1, 2, 3), has_aux=True))


@pytest.mark.parametrize("garbage", [np.nan, np.inf, -np.inf, 1e30])
def test_garbage_at_padding_changes_no_result_and_no_gradient(garbage):
  clean = _everything_and_grads(_ragged(27, garbage=0.0), _ragged(28, garbage=0.0), _ragged(29, garbage=0.0),
                                _ragged_logits(30, garbage=0.0))
  dirty = _everything_and_grads(_ragged(27, garbage=garbage), _ragged(28, garbage=garbage),
                                _ragged(29, garbage=garbage), _ragged_logits(30, garbage=garbage))
  for x, y in zip(jax.tree.leaves(clean), jax.tree.leaves(dirty)):
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(x, y)
  for grad in dirty[1]:
    assert np.all(np.asarray(grad)[~VALID] == 0.0)


# --- adaptive KL controller ---------------------------------------------------------------------------------


def test_adaptive_kl_raises_beta_when_kl_is_above_target_and_lowers_it_below():
  kwargs = dict(target=6.0, horizon=10_000, n_steps=512)
  assert ppo_math.update_kl_coef(0.1, 6.6, **kwargs) == pytest.approx(0.1 * (1 + 0.1 * 512 / 10_000))
  assert ppo_math.update_kl_coef(0.1, 5.4, **kwargs) == pytest.approx(0.1 * (1 - 0.1 * 512 / 10_000))
  assert ppo_math.update_kl_coef(0.1, 6.0, **kwargs) == pytest.approx(0.1)


def test_adaptive_kl_error_is_clipped_to_twenty_percent():
  kwargs = dict(target=6.0, horizon=10_000, n_steps=512)
  assert ppo_math.update_kl_coef(0.1, 600.0, **kwargs) == pytest.approx(0.1 * (1 + 0.2 * 512 / 10_000))
  assert ppo_math.update_kl_coef(0.1, 0.0, **kwargs) == pytest.approx(0.1 * (1 - 0.2 * 512 / 10_000))


def test_adaptive_kl_accepts_jax_scalars_and_agrees_with_floats():
  kwargs = dict(target=6.0, horizon=10_000, n_steps=512)
  for kl in (0.0, 5.4, 6.6, 600.0):
    as_jax = jax.jit(lambda beta, kl: ppo_math.update_kl_coef(beta, kl, **kwargs))(jnp.float32(0.1), kl)
    np.testing.assert_allclose(as_jax, ppo_math.update_kl_coef(0.1, kl, **kwargs), rtol=1e-6)


@pytest.mark.parametrize("target", [None, 0.0])
def test_kl_coef_is_fixed_without_a_target(target):
  assert ppo_math.update_kl_coef(0.05, 100.0, target=target, horizon=10_000, n_steps=512) == 0.05


# --- critic-free estimators (GRPO, RLOO) and loss aggregation --------------------------------------------------


def _np_group_advantages(score, group, std_norm=True, eps=1e-4):
  score, out = np.asarray(score, np.float64), np.zeros(len(score))
  for g in np.unique(group):
    idx = np.nonzero(group == g)[0]
    if len(idx) < 2:
      continue
    centred = score[idx] - score[idx].mean()
    out[idx] = centred / (score[idx].std(ddof=1) + eps) if std_norm else centred
  return out


def _np_leave_one_out(returns, group):
  returns, out = np.asarray(returns, np.float64), np.zeros(len(returns))
  for i, g in enumerate(group):
    others = [returns[j] for j in range(len(returns)) if group[j] == g and j != i]
    out[i] = returns[i] - np.mean(others) if others else 0.0
  return out


# Groups in any order and of unequal sizes, one of them a single reply, one whose scores all agree.
GROUPS = np.array([3, 0, 3, 1, 0, 3, 2, 1, 1, 4, 4])
SCORES = np.array([0.3, -1.2, 2.0, 0.5, 0.7, -0.4, 1.1, 0.5, 0.5, 0.9, 0.9], np.float32)


@pytest.mark.parametrize("std_norm", [True, False])
def test_group_advantages_match_numpy(std_norm):
  got = np.asarray(ppo_math.group_advantages(SCORES, GROUPS, std_norm=std_norm))
  expected = _np_group_advantages(SCORES, GROUPS, std_norm)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  assert got[6] == 0.0 and np.all(got[9:] == 0.0)  # a group of one; a group that agrees
  assert np.all(got[[3, 7, 8]] == 0.0)  # group 1: 0.5, 0.5, 0.5


def test_leave_one_out_advantages_match_numpy_and_the_k_over_k_minus_1_identity():
  got = np.asarray(ppo_math.leave_one_out_advantages(SCORES, GROUPS))
  np.testing.assert_allclose(got, _np_leave_one_out(SCORES, GROUPS), rtol=1e-5, atol=1e-6)
  idx = GROUPS == 3  # k = 3: R_i - mean of the others = 3/2 (R_i - group mean)
  np.testing.assert_allclose(got[idx], 1.5 * (SCORES[idx] - SCORES[idx].mean()), rtol=1e-5)
  assert got[6] == 0.0


def _np_aggregate(x, mode):
  x = np.where(VALID, np.asarray(x, np.float64), 0.0)
  lengths = VALID.sum(1)
  if mode == "token_mean":
    return x.sum() / VALID.sum()
  if mode == "sequence_mean":
    rows = lengths > 0
    return np.mean(x.sum(1)[rows] / lengths[rows])
  return np.mean(x.sum(1) / T)


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "sequence_sum"])
def test_aggregate_matches_numpy_and_adds_up_over_micro_batches(mode):
  x = _ragged(40)
  total, weight = ppo_math.aggregate(x, MASK, mode)
  np.testing.assert_allclose(float(total) / float(weight), _np_aggregate(x, mode), rtol=1e-5)
  halves = [ppo_math.aggregate(x[rows], MASK[rows], mode) for rows in (slice(0, 2), slice(2, 4))]
  np.testing.assert_allclose(sum(float(t) for t, _ in halves) / sum(float(w) for _, w in halves),
                             float(total) / float(weight), rtol=1e-6)


def test_unknown_aggregation_is_rejected():
  with pytest.raises(ValueError, match="mode='tokens'"):
    ppo_math.aggregate(_ragged(41), MASK, "tokens")


def _np_surrogate(logp, old_logp, advantages, low, high):
  ratio = np.exp(np.asarray(logp, np.float64) - old_logp)
  a = np.asarray(advantages, np.float64)
  return np.where(VALID, np.maximum(-a * ratio, -a * np.clip(ratio, 1 - low, 1 + high)), 0.0)


def test_clip_higher_widens_only_the_upper_clip():
  # ratio 1.25 with A > 0: clipped at 1.2 by the symmetric range, not by clip_eps_high = 0.28; ratio 0.75 with
  # A < 0 is clipped at 0.8 by both.
  old_logp = np.full((1, 2), -2.0, np.float32)
  logp = (old_logp + np.log([[1.25, 0.75]])).astype(np.float32)
  advantages, mask = np.array([[1.0, -1.0]], np.float32), np.ones((1, 2))
  symmetric, _ = ppo_math.clipped_surrogate(logp, old_logp, advantages, mask, 0.2)
  higher, stats = ppo_math.clipped_surrogate(logp, old_logp, advantages, mask, 0.2, 0.28)
  np.testing.assert_allclose(symmetric, [[-1.2, 0.8]], rtol=1e-5)
  np.testing.assert_allclose(higher, [[-1.25, 0.8]], rtol=1e-5)
  np.testing.assert_array_equal(stats["clipped"], [[0.0, 1.0]])


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "sequence_sum"])
def test_aggregated_surrogate_gradient_matches_central_differences(mode):
  logp, old_logp, advantages = _ragged(42) * 0.1 - 1.0, _ragged(43) * 0.1 - 1.0, _ragged(44)

  def loss(lp):
    per_token, _ = ppo_math.clipped_surrogate(lp, old_logp, advantages, MASK, 0.2, 0.28)
    total, weight = ppo_math.aggregate(per_token, MASK, mode)
    return total / weight

  grad = np.asarray(jax.grad(loss)(logp))
  assert np.all(grad[~VALID] == 0.0)
  step = 1e-6
  for b, t in zip(*np.nonzero(VALID)):
    plus, minus = logp.astype(np.float64), logp.astype(np.float64)
    plus[b, t] += step
    minus[b, t] -= step
    numeric = (_np_aggregate(_np_surrogate(plus, old_logp, advantages, 0.2, 0.28), mode)
               - _np_aggregate(_np_surrogate(minus, old_logp, advantages, 0.2, 0.28), mode)) / (2 * step)
    np.testing.assert_allclose(grad[b, t], numeric, rtol=1e-3, atol=1e-5, err_msg=f"token {b, t}")


def test_group_advantage_gradient_of_a_grpo_objective_matches_central_differences():
  # d/d score of sum_i w_i * A_i(score): the std normalisation's gradient through the whole group.
  weights = np.random.default_rng(45).normal(size=len(SCORES))
  scores = SCORES + np.random.default_rng(46).normal(size=len(SCORES)).astype(np.float32) * 0.1
  grad = np.asarray(jax.grad(lambda s: jnp.sum(weights * ppo_math.group_advantages(s, GROUPS)))(scores))
  step = 1e-5
  for i in range(len(scores)):
    plus, minus = scores.astype(np.float64), scores.astype(np.float64)
    plus[i] += step
    minus[i] -= step
    numeric = (np.sum(weights * _np_group_advantages(plus, GROUPS))
               - np.sum(weights * _np_group_advantages(minus, GROUPS))) / (2 * step)
    np.testing.assert_allclose(grad[i], numeric, rtol=2e-3, atol=1e-3, err_msg=f"score {i}")


def _np_weights(logp, sampler_logp, mode, c):
  log_w = np.where(VALID, np.asarray(logp, np.float64) - sampler_logp, 0.0)
  if mode.startswith("sequence_"):
    log_w = np.broadcast_to(log_w.sum(1, keepdims=True), log_w.shape)
  w = np.exp(log_w)
  if mode.endswith("_truncate"):
    out = np.minimum(w, c)
  else:
    out = np.where((w >= 1 / c) & (w <= c), w, 0.0)
  return np.where(VALID, out, 0.0)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_importance_weights_match_numpy(mode):
  logp, sampler_logp = _ragged(50) * 0.6 - 1.0, _ragged(51) * 0.6 - 1.0
  weights, corrected = ppo_math.importance_weights(logp, sampler_logp, MASK, mode, 1.5)
  expected = _np_weights(logp, sampler_logp, mode, 1.5)
  np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-7)
  if mode.startswith("token"):  # the tokens whose weight was truncated or masked
    w = np.exp(logp.astype(np.float64) - sampler_logp)
    changed = w > 1.5 if mode == "token_truncate" else (w > 1.5) | (w < 1 / 1.5)
    np.testing.assert_array_equal(np.asarray(corrected) > 0, changed & VALID)
  assert np.all(np.asarray(weights)[~VALID] == 0.0) and np.all(np.asarray(corrected)[~VALID] == 0.0)


def test_importance_weights_carry_no_gradient():
  logp, sampler_logp = _ragged(52) - 1.0, _ragged(53) - 1.0
  grad = jax.grad(lambda lp: jnp.sum(ppo_math.importance_weights(lp, sampler_logp, MASK, "token_truncate", 2.0)[0]))(
      logp)
  assert np.all(np.asarray(grad) == 0.0)


def test_best_of_n_picks_each_groups_best_reply_and_the_first_of_a_tie():
  got = np.asarray(ppo_math.best_of_n_advantages(SCORES, GROUPS))
  # Groups: 3 -> [0.3, 2.0, -0.4] (index 2); 0 -> [-1.2, 0.7] (4); 1 -> three 0.5s (the first, 3); 2 -> alone (6);
  # 4 -> a tie of two (the first, 9).
  np.testing.assert_array_equal(np.nonzero(got)[0], [2, 3, 4, 6, 9])
  assert got.sum() == len(np.unique(GROUPS))
