"""gptrl/losses.py against float64 NumPy: token log-probs, the weighted cross-entropy and its gradient."""
import jax
import jax.numpy as jnp
import numpy as np

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
