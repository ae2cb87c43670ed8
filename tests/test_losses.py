"""gptrl/losses.py against float64 NumPy: token log-probs, the weighted cross-entropy and its gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptrl import losses


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  z = x - x.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_token_log_probs_and_weighted_cross_entropy_match_numpy_float64():
  rng = np.random.default_rng(0)
  logits = (rng.standard_normal((3, 5, 11)) * 20).astype(np.float32)  # large logits: overflow-prone exp
  targets = rng.integers(0, 11, (3, 5))
  weights = rng.integers(0, 2, (3, 5)).astype(np.float32)
  ref_logp = np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(losses.token_log_probs(jnp.asarray(logits), jnp.asarray(targets))), ref_logp,
                             rtol=1e-5, atol=1e-4)
  loss_sum, weight = losses.weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  np.testing.assert_allclose(float(loss_sum), -(ref_logp * weights).sum(), rtol=1e-5)
  assert float(weight) == weights.sum()
  # d/dlogits of sum(w * -log p(target)) = w * (softmax - onehot).
  grad = jax.grad(lambda x: losses.weighted_cross_entropy(x, jnp.asarray(targets), jnp.asarray(weights))[0])(
      jnp.asarray(logits))
  onehot = np.eye(11)[targets]
  np.testing.assert_allclose(np.asarray(grad), weights[..., None] * (np.exp(_np_log_softmax(logits)) - onehot),
                             rtol=1e-4, atol=1e-6)


def test_bf16_logits_are_scored_in_float32():
  logits = jnp.asarray([[[0.0, 0.01, 0.02, 8.0]]], jnp.bfloat16)
  logp = losses.token_log_probs(logits, jnp.asarray([[1]]))
  assert logp.dtype == jnp.float32
  np.testing.assert_allclose(float(logp[0, 0]), _np_log_softmax(np.asarray(logits, np.float32))[0, 0, 1], rtol=1e-5)
  # model.logits_dtype="bfloat16": the loss of bfloat16 logits is the float64 loss of their values, and its gradient
  # (bfloat16, as the logits) is w * (softmax - onehot) rounded once
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.standard_normal((2, 7, 300)) * 6, jnp.bfloat16)
  targets = rng.integers(0, 300, (2, 7))
  weights = rng.integers(0, 2, (2, 7)).astype(np.float32)
  ref_logp = np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0]
  loss, grad = jax.value_and_grad(lambda x: losses.weighted_cross_entropy(x, jnp.asarray(targets), weights)[0])(logits)
  np.testing.assert_allclose(float(loss), -(ref_logp * weights).sum(), rtol=1e-6)
  assert grad.dtype == jnp.bfloat16
  ref_grad = weights[..., None] * (np.exp(_np_log_softmax(logits)) - np.eye(300)[targets])
  np.testing.assert_allclose(np.asarray(grad, np.float64), ref_grad, rtol=2 ** -8, atol=1e-7)


def test_sequence_log_probs_sum_the_reply_tokens_only():
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((3, 6, 7)).astype(np.float32)
  tokens = rng.integers(0, 7, (3, 6))
  first, last = np.array([2, 1, 0]), np.array([4, 5, 0])  # the third row is padding: no reply token
  logp = _np_log_softmax(logits)
  expected = [sum(logp[b, t - 1, tokens[b, t]] for t in range(max(first[b], 1), last[b] + 1)) for b in range(3)]
  total, count = losses.sequence_log_probs(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(first),
                                           jnp.asarray(last))
  np.testing.assert_allclose(np.asarray(total), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(count), [3, 5, 0])


# Two prompts of K = 3 replies: a full ranking 0 > 1 > 2 (three pairs), and one pair 2 > 0 with a padding reply 1
# whose log-probs are garbage.
PAIRS = np.zeros((2, 3, 3), np.float32)
PAIRS[0, 0, 1] = PAIRS[0, 0, 2] = PAIRS[0, 1, 2] = 1.0
PAIRS[1, 2, 0] = 1.0
LENGTH = np.array([[4, 2, 5], [3, 0, 6]], np.float32)


def _np_dpo(logp, ref, loss_type, beta, eps=0.0):
  rho = np.asarray(logp, np.float64) - np.asarray(ref, np.float64)
  total, n = 0.0, 0
  for b, i, j in zip(*np.nonzero(PAIRS)):
    if loss_type == "ipo":
      h = rho[b, i] / LENGTH[b, i] - rho[b, j] / LENGTH[b, j]
      total += (h - 1 / (2 * beta)) ** 2
    else:
      h = beta * (rho[b, i] - rho[b, j])
      total += -(1 - eps) * np.log(1 / (1 + np.exp(-h))) - eps * np.log(1 / (1 + np.exp(h)))
    n += 1
  return total / n


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_dpo_losses_and_gradients_match_numpy_float64(loss_type, eps):
  rng = np.random.default_rng(2)
  logp = (rng.standard_normal((2, 3)) * 3 - 20).astype(np.float32)
  ref = (logp + rng.standard_normal((2, 3))).astype(np.float32)
  logp[1, 1], ref[1, 1] = np.nan, np.inf  # the padding reply: no effect, no NaN

  def loss(lp):
    total, sums = losses.dpo_loss(lp, ref, LENGTH, PAIRS, beta=0.5, loss_type=loss_type, label_smoothing=eps)
    return total / sums["weight"]

  np.testing.assert_allclose(float(loss(logp)), _np_dpo(logp, ref, loss_type, 0.5, eps), rtol=1e-5)
  grad = np.asarray(jax.grad(loss)(jnp.asarray(logp)))
  assert grad[1, 1] == 0.0
  step = 1e-3
  for b, k in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2)]:
    plus, minus = logp.astype(np.float64), logp.astype(np.float64)
    plus[b, k] += step
    minus[b, k] -= step
    numeric = (_np_dpo(plus, ref, loss_type, 0.5, eps) - _np_dpo(minus, ref, loss_type, 0.5, eps)) / (2 * step)
    np.testing.assert_allclose(grad[b, k], numeric, rtol=1e-3, atol=1e-6, err_msg=f"reply {b, k}")


def test_dpo_metrics_are_the_implicit_rewards_of_each_pair():
  logp = np.array([[-10.0, -12.0, -11.0], [-9.0, 0.0, -8.0]], np.float32)
  ref = np.array([[-11.0, -11.0, -11.0], [-9.0, 0.0, -9.0]], np.float32)
  _, sums = losses.dpo_loss(logp, ref, LENGTH, PAIRS, beta=0.1)
  r = 0.1 * (logp - ref)  # [[0.1, -0.1, 0], [0, 0, 0.1]]
  margins = [r[0, 0] - r[0, 1], r[0, 0] - r[0, 2], r[0, 1] - r[0, 2], r[1, 2] - r[1, 0]]
  assert float(sums["weight"]) == 4
  np.testing.assert_allclose(float(sums["reward_margin"]), sum(margins), rtol=1e-5)
  assert float(sums["accuracy"]) == 3  # 0 > 1, 0 > 2, 2 > 0 right; 1 > 2 wrong
  np.testing.assert_allclose(float(sums["chosen_reward"]), r[0, 0] * 2 + r[0, 1] + r[1, 2], rtol=1e-5)
  np.testing.assert_allclose(float(sums["rejected_reward"]), r[0, 1] + r[0, 2] * 2 + r[1, 0], atol=1e-6)
