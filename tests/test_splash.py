"""Tests for gptrl/splash.py (model.attention="splash"): on CPU the TPU kernel runs in Pallas' interpreter, and
its logits and gradients are compared with the einsum path (itself checked against a float64 NumPy forward in
tests/test_model.py), padded rows, grouped heads and sharded meshes included."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptrl import model as model_lib
from gptrl import sharding
from gptrl import splash
from gptrl.config import ConfigError, MeshConfig, ModelConfig

import numeric


@pytest.fixture(autouse=True)
def _interpreted(monkeypatch):
  """The kernel in Pallas' interpreter on CPU (off TPU the model would take the einsum path)."""
  monkeypatch.setattr(splash, "INTERPRET_OFF_TPU", True)


# Two layers over 256 tokens: two 128-token tiles, so the kernel skips the block above the diagonal.
CFG = ModelConfig(vocab_size=64, num_layers=2, num_heads=4, d_model=64, max_len=256, init_std=0.2,
                  pos_embedding="rope")
T = 256


def _batch(b=4):
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 64, (b, T)).astype(np.int32)
  mask = np.ones((b, T), np.int32)
  mask[1, :37] = 0  # a left-padded row
  mask[2, 200:] = 0  # a right-padded row
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return tokens, mask, positions


def _loss_and_grads(cfg, params, mesh=None, padded=True):
  model = model_lib.GPT(cfg)
  tokens, mask, positions = _batch()
  if not padded:
    mask, positions = np.ones_like(mask), None

  def loss(p):
    logits = model.apply({"params": p}, tokens, positions_BxT=positions,
                         attention_mask_BxT=mask if padded else None)
    return jnp.sum(jnp.where(mask[..., None] > 0, logits, 0.0) ** 2) / 1e4, logits
  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  if mesh is None:
    return step(params)
  with sharding.activate(mesh):
    return step(params)


def _params(cfg):
  model = model_lib.GPT(cfg)
  return jax.jit(lambda r: nn.meta.unbox(model.init(r, jnp.zeros((1, T), jnp.int32))["params"]))(jax.random.key(0))


@pytest.mark.parametrize("variant,padded", [(dict(), True), (dict(num_kv_heads=2), True),
                                            (dict(num_kv_heads=1, remat="dots"), True),
                                            (dict(pos_embedding="learned", num_kv_heads=2), False)],
                         ids=["mha", "gqa", "mqa_remat", "learned_positions_no_padding"])
def test_splash_gives_the_einsum_paths_logits_and_grads(variant, padded):
  xla = dataclasses.replace(CFG, **variant)
  params = _params(xla)
  ((_, l0), g0) = _loss_and_grads(xla, params, padded=padded)
  ((_, l1), g1) = _loss_and_grads(dataclasses.replace(xla, attention="splash"), params, padded=padded)
  _, mask, _ = _batch()
  mask = mask if padded else np.ones_like(mask)
  numeric.assert_close(np.asarray(l1)[mask > 0], np.asarray(l0)[mask > 0])
  numeric.assert_close(g1, g0)


@pytest.mark.parametrize("mesh,kv_heads", [(MeshConfig(data=2, fsdp=2, tensor=2), 0),
                                           (MeshConfig(data=1, fsdp=2, tensor=4), 2),
                                           (MeshConfig(data=1, fsdp=4, tensor=2), 1)],
                         ids=["heads_split", "kv_heads_sliced_per_shard", "mqa"])
def test_splash_on_a_mesh_matches_one_device(mesh, kv_heads):
  # Rows over data x fsdp, heads over tensor (shard_map); with fewer key/value heads than tensor ways every shard
  # holds them all and takes the ones its query heads read.
  cfg = dataclasses.replace(CFG, attention="splash", num_kv_heads=kv_heads)
  params = _params(cfg)
  ((_, l0), g0) = _loss_and_grads(cfg, params)
  ((_, l1), g1) = _loss_and_grads(cfg, params, sharding.make_mesh(mesh))
  _, mask, _ = _batch()
  numeric.assert_close(np.asarray(l1)[mask > 0], np.asarray(l0)[mask > 0])
  numeric.assert_close(g1, g0)


def test_lengths_the_kernel_cannot_tile_and_decoding_take_the_einsum_path():
  cfg = dataclasses.replace(CFG, attention="splash")
  assert model_lib.uses_splash(cfg, 256) and model_lib.uses_splash(cfg, 384)
  assert not model_lib.uses_splash(cfg, 200)
  assert not model_lib.uses_splash(cfg, 256, decode=True)
  assert not model_lib.uses_splash(dataclasses.replace(cfg, attention="xla"), 256)
  with pytest.raises(ValueError, match="multiple of 128"):
    splash.causal_attention(*(jnp.zeros((1, 100, 2, 8)),) * 1, jnp.zeros((1, 2, 100, 8)), jnp.zeros((1, 2, 100, 8)),
                            None)


def test_splash_refuses_attention_dropout_naming_the_keys():
  with pytest.raises(ConfigError, match="model.attention.*dropout"):
    dataclasses.replace(CFG, attention="splash", dropout=0.1)


def test_off_tpu_without_the_interpreter_the_model_takes_the_einsum_path(monkeypatch):
  # A checkpoint trained with the kernel on TPUs, run on a CPU or GPU: the einsum path, bitwise the "xla" model.
  monkeypatch.setattr(splash, "INTERPRET_OFF_TPU", False)
  params = _params(CFG)
  ((_, l0), g0) = _loss_and_grads(CFG, params)
  ((_, l1), g1) = _loss_and_grads(dataclasses.replace(CFG, attention="splash"), params)
  np.testing.assert_array_equal(np.asarray(l1), np.asarray(l0))
  jax.tree.map(np.testing.assert_array_equal, g1, g0)
