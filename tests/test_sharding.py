"""Tests for gptrl/sharding.py: every mesh gives the single-device loss, gradients and update; params are sharded."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from gptrl import model as model_lib
from gptrl import optim
from gptrl import sharding
from gptrl import trainer
from gptrl.config import ConfigError, MeshConfig, ModelConfig, OptimConfig
from gptrl.losses import lm_loss_fn

import numeric

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


@pytest.mark.parametrize("shape", MESHES)
def test_initial_params_match_single_device(shape):
  # The same program (the initializer) on every mesh: bitwise equal.
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), _run(shape)[0],
               _run(None)[0])


@pytest.mark.parametrize("shape", MESHES)
def test_loss_and_grads_match_single_device(shape):
  _, loss, grads, *_ = _run(shape)
  _, ref_loss, ref_grads, *_ = _run(None)
  numeric.assert_close(loss, ref_loss, err_msg="loss")
  numeric.assert_close(grads, ref_grads, err_msg="grads")


@pytest.mark.parametrize("shape", MESHES)
def test_train_step_new_params_match_single_device(shape):
  _, _, _, new_params, metrics, _ = _run(shape)
  _, _, ref_grads, ref_params, ref_metrics, _ = _run(None)
  numeric.assert_close(metrics["train/loss"], ref_metrics["train/loss"], err_msg="train/loss")
  numeric.assert_close(metrics["train/grad_norm"], ref_metrics["train/grad_norm"], err_msg="train/grad_norm")
  # Adam sees the gradients of the mean loss (loss_sum / weight), clipped.
  adam_grads = numeric.clip_by_global_norm(jax.tree.map(lambda g: g / _batch()["weights"].sum(), ref_grads),
                                           OPTIM.clip_norm)
  numeric.assert_first_adam_step_close(new_params, ref_params, adam_grads, lr=OPTIM.lr, eps=OPTIM.eps)


def _shard_map_grads(bug: str | None):
  """Data-parallel gradients of the test model written per shard with shard_map over all 8 devices, the way
  per-shard code is written, with one of two deliberate sharding bugs (or none):
    "missing_psum": each shard's gradient of its own rows is returned unreduced (device 0's is what is read);
    "wrong_spec": the batch's in_spec says replicated, so every shard computes on the whole batch and the psum
      counts it 8 times.
  """
  mesh = sharding.make_mesh(MeshConfig(data=8))
  model = model_lib.GPT(CFG)
  params = jax.device_get(_run(None)[0])
  loss_fn = lm_loss_fn(model)
  batch_spec = PartitionSpec() if bug == "wrong_spec" else PartitionSpec(sharding.BATCH_AXES)

  def per_shard(params, batch):
    grads, _ = jax.grad(loss_fn, has_aux=True)(params, batch, None)  # of the token-weighted loss sum
    return grads if bug == "missing_psum" else jax.lax.psum(grads, sharding.BATCH_AXES)
  grads = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(PartitionSpec(), batch_spec),
                                out_specs=PartitionSpec(), check_vma=False))(params, _batch())
  return jax.device_get(grads)


def test_shard_map_data_parallel_grads_match_single_device():
  numeric.assert_close(_shard_map_grads(None), _run(None)[2])


@pytest.mark.parametrize("bug", ["missing_psum", "wrong_spec"])
def test_the_comparison_catches_a_deliberate_sharding_bug(bug):
  # The tolerance is scaled to each tensor, so that summation order never fails a test; it must not be so loose
  # that it passes a real sharding bug: those are off by O(1) of the scale, not by 1e-5.
  with pytest.raises(AssertionError, match="of the scale"):
    numeric.assert_close(_shard_map_grads(bug), _run(None)[2])
  errors = numeric.tree_scaled_errors(_shard_map_grads(bug), _run(None)[2])
  assert max(errors.values()) > 100 * numeric.TOL, errors


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
