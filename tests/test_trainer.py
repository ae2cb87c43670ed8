"""Tests for gptrl/trainer.py, gptrl/optim.py and config validation: overfitting, accumulation, NaN skip."""
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptrl import config as config_lib
from gptrl import model as model_lib
from gptrl import optim
from gptrl import sharding
from gptrl import trainer
from gptrl.config import MeshConfig, ModelConfig, OptimConfig
from gptrl.losses import lm_loss_fn

import numeric

CFG = ModelConfig(vocab_size=64, num_layers=2, num_heads=4, d_model=32, max_len=16)


def _mesh():
  return sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


def _batch(rows=8, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 64, (rows, 17)).astype(np.int32)
  weights = (rng.random((rows, 16)) > 0.2).astype(np.float32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}


def _setup(optim_cfg, steps, loss_wrapper=None, grad_accum_steps=1):
  mesh = _mesh()
  model = model_lib.GPT(CFG)
  optimizer = optim.make_optimizer(optim_cfg, steps)
  state, shardings = trainer.create_train_state(
      lambda r: model.init(r, jnp.zeros((1, 16), jnp.int32))["params"], optimizer, 0, mesh)
  loss_fn = lm_loss_fn(model)
  if loss_wrapper is not None:
    loss_fn = loss_wrapper(loss_fn)
  step = trainer.jit_train_step(
      trainer.make_train_step(loss_fn, optimizer, optim.learning_rate_schedule(optim_cfg, steps),
                              grad_accum_steps), shardings, mesh)
  return state, step, mesh


def test_tiny_model_overfits_one_batch():
  state, step, mesh = _setup(OptimConfig(lr=3e-3, warmup_steps=10, weight_decay=0.0), 150)
  batch = sharding.host_to_global(_batch(rows=4), mesh)
  for _ in range(150):
    state, metrics = step(state, batch)
  assert float(metrics["train/loss"]) < 0.1


def test_grad_accumulation_matches_single_batch():
  cfg = OptimConfig(lr=1e-3, warmup_steps=0)
  results = []
  for accum in (1, 4):
    state, step, mesh = _setup(cfg, 10, grad_accum_steps=accum)
    params = jax.device_get(state.params)  # (the step donates the state)
    new_state, metrics = step(state, sharding.host_to_global(_batch(), mesh))
    results.append((jax.device_get(metrics), jax.device_get(new_state.params)))
  (m1, p1), (m4, p4) = results
  # The one-batch gradients Adam saw: of the token-weighted mean loss, clipped.
  grads, _ = jax.jit(jax.grad(lm_loss_fn(model_lib.GPT(CFG)), has_aux=True))(params, _batch(), None)
  g1 = jax.tree.map(lambda g: g / _batch()["weights"].sum(), jax.device_get(grads))
  numeric.assert_close(m4["train/loss"], m1["train/loss"], err_msg="train/loss")
  numeric.assert_close(m4["train/grad_norm"], m1["train/grad_norm"], err_msg="train/grad_norm")
  assert m4["train/weight"] == m1["train/weight"]  # a count of tokens: exact
  numeric.assert_first_adam_step_close(p4, p1, numeric.clip_by_global_norm(g1, cfg.clip_norm), lr=cfg.lr,
                                       eps=cfg.eps)


def test_nan_loss_step_leaves_state_unchanged_and_reports_skipped():
  def nan_loss(loss_fn):
    def wrapped(params, batch, rng):
      loss_sum, sums = loss_fn(params, batch, rng)
      return loss_sum * jnp.nan, sums
    return wrapped
  state, step, mesh = _setup(OptimConfig(lr=1e-3, warmup_steps=0), 10, loss_wrapper=nan_loss)
  before = jax.device_get((state.params, state.opt_state))
  new_state, metrics = step(state, sharding.host_to_global(_batch(), mesh))
  assert int(metrics["train/skipped"]) == 1
  assert int(new_state.step) == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               jax.device_get((new_state.params, new_state.opt_state)), before)


def test_weight_decay_mask_excludes_embeddings_norms_and_biases_by_default():
  model = model_lib.GPT(CFG)
  params = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32)))[
      "params"])
  mask = optim.weight_decay_mask(OptimConfig(), params)
  assert mask["token_embedding"] is False and mask["position_embedding"] is False
  assert mask["ln_final"] == {"scale": False, "bias": False}
  blk = mask["block_0"]
  assert blk["ln_attn"] == {"scale": False, "bias": False}
  assert blk["mlp"]["fc_in"] == {"kernel": True, "bias": False}
  assert blk["mlp"]["fc_out"] == {"kernel": True, "bias": False}
  assert all(blk["attn"][k] for k in ("query", "key", "value", "out"))
  everything = optim.weight_decay_mask(OptimConfig(decay_embeddings=True, decay_norms_and_biases=True), params)
  assert all(jax.tree.leaves(everything))


def test_learning_rate_schedule_warmup_then_cosine():
  cfg = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
  schedule = optim.learning_rate_schedule(cfg, 110)

  def expected(step):
    if step < 10:
      return 1e-3 * step / 10
    frac = min((step - 10) / 100, 1.0)
    return 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * frac))
  for step in (0, 5, 10, 35, 60, 110, 200):
    np.testing.assert_allclose(float(schedule(step)), expected(step), rtol=1e-5, atol=1e-9)


def test_stage_config_refuses_unknown_key_with_suggestion():
  with pytest.raises(config_lib.ConfigError, match=r"config\.train\.stepz: unknown key\. Did you mean 'steps'"):
    config_lib.stage_config({"stage": "pretrain", "train": {"stepz": 3}})


@pytest.mark.parametrize("group,key,value", [("train", "steps", "3"), ("train", "steps", 3.5),
                                             ("model", "tie_embeddings", 1), ("optim", "lr", "big")])
def test_stage_config_refuses_wrong_types(group, key, value):
  with pytest.raises(config_lib.ConfigError, match=rf"config\.{group}\.{key}: expected"):
    config_lib.stage_config({"stage": "pretrain", group: {key: value}})


def test_launcher_refuses_typo_override_with_one_line_message():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "gptrl.launch", "--config", "configs/pretrain_cpu.py:tiny",
                         "--config.train.stepz=3"], cwd=os.path.dirname(os.path.dirname(__file__)), env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "steps" in lines[0]
