"""Tests for gptrl/sharding.py: every mesh gives the single-device loss, gradients and update; params are sharded."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptrl import model as model_lib
from gptrl import optim
from gptrl import sharding
from gptrl import trainer
from gptrl.config import ConfigError, MeshConfig, ModelConfig, OptimConfig
from gptrl.stages.pretrain import lm_loss_fn

CFG = ModelConfig(vocab_size=64, num_layers=2, num_heads=8, d_model=64, max_len=16)
OPTIM = OptimConfig(lr=1e-3, warmup_steps=0, clip_norm=1.0)
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, (8, 17)).astype(np.int32)
  weights = (rng.random((8, 16)) > 0.2).astype(np.float32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}


@functools.lru_cache(maxsize=None)
def _run(shape):
  """(params, loss, grads, new params, metrics, shardings) on the mesh `shape` (None: one device)."""
  if shape is None:
    mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  else:
    mesh = sharding.make_mesh(MeshConfig(*shape))
  model = model_lib.GPT(CFG)
  optimizer = optim.make_optimizer(OPTIM, 10)
  state, shardings = trainer.create_train_state(
      lambda r: model.init(r, jnp.zeros((1, 16), jnp.int32))["params"], optimizer, 0, mesh)
  loss_fn = lm_loss_fn(model)
  batch = sharding.host_to_global(_batch(), mesh)
  with sharding.activate(mesh):
    (loss_sum, sums), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params, batch, None)
  params = jax.device_get(state.params)
  step = trainer.jit_train_step(
      trainer.make_train_step(loss_fn, optimizer, optim.learning_rate_schedule(OPTIM, 10)), shardings, mesh)
  param_shardings = jax.tree.map(lambda x: x.sharding, state.params)
  new_state, metrics = step(state, batch)
  return (params, float(loss_sum / sums["weight"]), jax.device_get(grads), jax.device_get(new_state.params),
          jax.device_get(metrics), param_shardings)


def _assert_trees_close(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol), a, b)


@pytest.mark.parametrize("shape", MESHES)
def test_initial_params_match_single_device(shape):
  _assert_trees_close(_run(shape)[0], _run(None)[0], rtol=0, atol=0)


@pytest.mark.parametrize("shape", MESHES)
def test_loss_and_grads_match_single_device(shape):
  _, loss, grads, *_ = _run(shape)
  _, ref_loss, ref_grads, *_ = _run(None)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  _assert_trees_close(grads, ref_grads, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("shape", MESHES)
def test_train_step_new_params_match_single_device(shape):
  _, _, _, new_params, metrics, _ = _run(shape)
  _, _, _, ref_params, ref_metrics, _ = _run(None)
  np.testing.assert_allclose(metrics["train/loss"], ref_metrics["train/loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["train/grad_norm"], ref_metrics["train/grad_norm"], rtol=1e-5)
  _assert_trees_close(new_params, ref_params, rtol=1e-5, atol=2e-5)


def test_fsdp_splits_token_embedding_embed_dim():
  shardings = _run((1, 8, 1))[5]
  assert shardings["token_embedding"].shard_shape((64, 64)) == (64, 8)
  assert shardings["block_0"]["mlp"]["fc_in"]["kernel"].shard_shape((64, 256)) == (8, 256)


def test_tensor_parallel_splits_mlp_and_heads():
  shardings = _run((1, 2, 4))[5]
  assert shardings["block_0"]["mlp"]["fc_in"]["kernel"].shard_shape((64, 256)) == (32, 64)
  assert shardings["block_0"]["mlp"]["fc_out"]["kernel"].shard_shape((256, 64)) == (64, 32)
  assert shardings["block_0"]["attn"]["query"].shard_shape((64, 8, 8)) == (32, 2, 8)
  assert shardings["token_embedding"].shard_shape((64, 64)) == (16, 32)


def test_data_parallel_replicates_params():
  shardings = _run((8, 1, 1))[5]
  for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)):
    assert s.is_fully_replicated


@pytest.mark.parametrize("mesh", [MeshConfig(data=2, fsdp=2, tensor=1), MeshConfig(data=3, fsdp=1, tensor=1),
                                  MeshConfig(data=-1, fsdp=3, tensor=1)])
def test_resolve_mesh_shape_rejects_sizes_not_matching_device_count(mesh):
  with pytest.raises(ConfigError, match="config.mesh"):
    sharding.resolve_mesh_shape(mesh, 8)


@pytest.mark.parametrize("mesh,expected", [(MeshConfig(data=-1), (8, 1, 1)),
                                           (MeshConfig(data=2, fsdp=-1, tensor=2), (2, 2, 2)),
                                           (MeshConfig(data=1, fsdp=2, tensor=-1), (1, 2, 4))])
def test_resolve_mesh_shape_fills_minus_one(mesh, expected):
  assert sharding.resolve_mesh_shape(mesh, 8) == expected
