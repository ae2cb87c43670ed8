"""Reward-model ensembles: k members trained in one step exactly as k independent models, and the rewards the
policy stages read from them (mean, mean - penalty * std, min) against a NumPy reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import numeric
from gptrl import optim
from gptrl import reward_model
from gptrl import sharding
from gptrl import trainer
from gptrl.config import MeshConfig, ModelConfig, OptimConfig
from gptrl.stages.reward import reward_loss_fn

M, B, K, L = 3, 4, 3, 12
CFG = ModelConfig(vocab_size=50, num_layers=1, num_heads=2, d_model=16, max_len=L)


def _member_batches(seed: int = 0) -> dict[str, np.ndarray]:
  """A [B, M, K, ...] batch, every member with its own comparisons; member 1 has a row without pairs (padding),
  so the members' weights differ."""
  rng = np.random.default_rng(seed)
  pairs = np.zeros((B, M, K, K), np.float32)
  pairs[:, :, 0, 1] = 1
  pairs[::2, :, 2, 0] = 1
  pairs[1, 1] = 0
  return {"tokens": rng.integers(1, 50, (B, M, K, L)).astype(np.int32),
          "last": rng.integers(3, L, (B, M, K)).astype(np.int32), "pairs": pairs,
          "margins": rng.uniform(0, 1, (B, M, K, K)).astype(np.float32)}


def _run(model, params, batches, optimizer, schedule, members, mesh):
  """Losses of each step (and the params after them) training `model` from `params` on `batches`."""
  state, shardings = trainer.create_train_state(lambda r: model.init(r, jnp.zeros((1, L), jnp.int32))["params"],
                                                optimizer, 0, mesh)
  state = state.replace(params=jax.device_put(params, shardings.params), opt_state=optimizer.init(params))
  step = trainer.jit_train_step(trainer.make_train_step(reward_loss_fn(model, 0.5), optimizer, schedule,
                                                        members=members), shardings, mesh)
  losses = []
  for batch in batches:
    state, metrics = step(state, sharding.host_to_global(batch, mesh))
    losses.append(float(metrics["train/loss"]))
  return np.asarray(losses), jax.device_get(state.params)


def test_ensemble_members_train_as_independent_models():
  """Three steps of a 3-member ensemble against each member trained alone on its own batches: every step's loss
  (which after the first depends on the updates before it) agrees to 1e-6. Clipping is active every step, so
  clipping the members jointly would not."""
  mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  # (Adam turns the rounding of near-zero gradients into +-lr steps, so the losses after an update agree to
  # about 1e-7 of themselves at this lr, while clipping the members jointly is off by 1e-5.)
  opt_cfg = OptimConfig(lr=1e-3, warmup_steps=0, clip_norm=0.05, weight_decay=0.1)
  schedule = optim.learning_rate_schedule(opt_cfg, 10)
  ensemble = reward_model.RewardEnsemble(CFG, M, head_init_std=0.1)
  params = jax.device_get(nn_unbox(ensemble.init(jax.random.key(3), jnp.zeros((1, L), jnp.int32))["params"]))
  batches = [_member_batches(s) for s in range(3)]
  ens_losses, ens_params = _run(ensemble, params, batches, optim.make_optimizer(opt_cfg, 10, members=M), schedule,
                                M, mesh)
  single = reward_model.ScalarHeadModel(CFG, head_init_std=0.1)
  alone = []
  for m in range(M):
    member_params = jax.tree.map(lambda x, m=m: x[m], params)
    member_batches = [{k: v[:, m] for k, v in b.items()} for b in batches]
    losses, final = _run(single, member_params, member_batches, optim.make_optimizer(opt_cfg, 10), schedule, 1, mesh)
    alone.append(losses)
    # The weights too (not the final norm's bias: a shift of every reward leaves the loss unchanged, so its
    # gradient is rounding, which Adam scales up to +-lr).
    trunk = lambda p: {k: v for k, v in p["transformer"].items() if k != "ln_final"}
    numeric.assert_close(trunk(jax.tree.map(lambda x, m=m: x[m], ens_params)), trunk(final), tol=1e-3)
  alone = np.asarray(alone)
  assert np.ptp(alone, axis=0).min() > 1e-3  # different data: different losses
  np.testing.assert_allclose(ens_losses, alone.mean(axis=0), rtol=1e-6)


def nn_unbox(tree):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  return nn.meta.unbox(tree)


def test_clip_by_member_norm_clips_each_member_as_optax_clips_one():
  rng = np.random.default_rng(0)
  grads = {"a": jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32), "b": jnp.asarray(rng.normal(size=(3,)) * 0.01,
                                                                                        jnp.float32)}
  grads["a"] = grads["a"].at[1].multiply(0.01)  # member 1 is under the threshold, the others over
  clipped, _ = optim.clip_by_member_norm(1.0).update(grads, optax.EmptyState())
  for m in range(3):
    member = jax.tree.map(lambda g, m=m: g[m], grads)
    expected, _ = optax.clip_by_global_norm(1.0).update(member, optax.EmptyState())
    numeric.assert_close(jax.tree.map(lambda g, m=m: g[m], clipped), expected)
  norms = [float(optax.tree.norm(jax.tree.map(lambda g, m=m: g[m], clipped))) for m in range(3)]
  assert norms[0] == pytest.approx(1.0, rel=1e-5) and norms[1] < 0.5 and norms[2] == pytest.approx(1.0, rel=1e-5)


def test_ensemble_scores_equal_each_member_applied_alone():
  """Scoring shared inputs: member m's scores are those of a ScalarHeadModel with member m's parameters, also with
  left padding (positions and attention mask, as PPO scores rollouts)."""
  ensemble = reward_model.RewardEnsemble(CFG, M, head_init_std=0.1, pooling="reply_mean")
  params = nn_unbox(ensemble.init(jax.random.key(0), jnp.zeros((1, L), jnp.int32))["params"])
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, 50, (2, L)), jnp.int32)
  attention = jnp.asarray(np.arange(L)[None, :] >= np.array([[0], [3]]), jnp.int32)
  positions = jnp.maximum(jnp.cumsum(attention, axis=1) - 1, 0)
  last, first = jnp.array([L - 1, L - 2]), jnp.array([5, 7])
  kwargs = dict(positions_BxT=positions, attention_mask_BxT=attention)
  pooled_BxM = reward_model.pooled_member_scores(ensemble, params, tokens, last, first, valid_BxT=attention, **kwargs)
  single = reward_model.ScalarHeadModel(CFG, head_init_std=0.1, pooling="reply_mean")
  for m in range(M):
    own = jax.tree.map(lambda x, m=m: x[m], params)
    expected = reward_model.pool_scores(single.apply({"params": own}, tokens, **kwargs), last, "reply_mean",
                                        valid_NxL=attention, first_N=first)
    numeric.assert_close(pooled_BxM[:, m], expected)
  assert float(jnp.std(pooled_BxM, axis=1).min()) > 0  # the heads differ


def test_readout_reductions_against_numpy():
  meta = {"ensemble": 3, "reward_offsets": [1.0, -2.0, 0.5], "reward_stds": [1.0, 2.0, 0.5]}
  raw = np.array([[1.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 2.0, 1.0]])
  stds = np.array(meta["reward_stds"])
  centred = (raw - np.array(meta["reward_offsets"])) * (stds.mean() / stds)
  for reduce, expected in (("mean", centred.mean(1)), ("min", centred.min(1)),
                           ("mean_minus_std", centred.mean(1) - 0.7 * np.sqrt(((centred - centred.mean(1,
                            keepdims=True)) ** 2).mean(1)))):
    readout = reward_model.Readout.from_meta(meta, reduce, 0.7)
    numeric.assert_close(np.asarray(readout(jnp.asarray(raw, jnp.float32))), expected)
    numeric.assert_close(reward_model.reduce_members(centred, reduce, 0.7), expected)
  # One model: raw - offset, whatever the reduction.
  single = reward_model.Readout.from_meta({"reward_offset": 0.25}, "mean_minus_std", 5.0)
  numeric.assert_close(np.asarray(single(jnp.array([[1.0], [-1.0]]))), np.array([0.75, -1.25]))


def test_readout_refuses_a_meta_that_does_not_match_its_members():
  with pytest.raises(ValueError, match="3 members but holds 2 offsets"):
    reward_model.Readout.from_meta({"ensemble": 3, "reward_offsets": [0.0, 1.0], "reward_stds": [1.0, 1.0, 1.0]})
  with pytest.raises(ValueError, match="unknown ensemble reduction 'median'"):
    reward_model.Readout(reduce="median")
