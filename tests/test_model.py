"""Tests for gptrl/model.py: causality, padding, a NumPy reference forward, dtypes, remat, variants, FLOPs."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptrl import model as model_lib
from gptrl.config import ModelConfig

import numeric

TINY = ModelConfig(vocab_size=64, num_layers=2, num_heads=4, d_model=32, max_len=16, init_std=0.2)


def _init(cfg, seed=0, t=8):
  model = model_lib.GPT(cfg)
  init = jax.jit(lambda r: nn.meta.unbox(model.init(r, jnp.zeros((1, t), jnp.int32))["params"]))
  return model, init(jax.random.key(seed))


def _apply(model, params, tokens, **kwargs):
  return jax.jit(lambda p, x, kw: model.apply({"params": p}, x, **kw))(params, tokens, kwargs)


def _tokens(b, t, seed=1, vocab=64):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


@pytest.mark.parametrize("pos_embedding", ["learned", "rope"])
def test_changing_future_token_leaves_earlier_logits_unchanged(pos_embedding):
  model, params = _init(dataclasses.replace(TINY, pos_embedding=pos_embedding))
  tokens = _tokens(2, 12)
  changed = tokens.at[:, 7].set((tokens[:, 7] + 5) % 64)
  a = _apply(model, params, tokens)
  b = _apply(model, params, changed)
  np.testing.assert_array_equal(np.asarray(a[:, :7]), np.asarray(b[:, :7]))
  assert not np.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("pos_embedding", ["learned", "rope"])
def test_left_padded_prompt_matches_unpadded_at_real_positions(pos_embedding):
  model, params = _init(dataclasses.replace(TINY, pos_embedding=pos_embedding))
  prompt = _tokens(1, 6)
  pad = 4
  padded = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), prompt], axis=1)
  mask = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), jnp.ones((1, 6), jnp.int32)], axis=1)
  positions = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), jnp.arange(6, dtype=jnp.int32)[None]], axis=1)
  ref = _apply(model, params, prompt)
  out = _apply(model, params, padded, positions_BxT=positions, attention_mask_BxT=mask)
  numeric.assert_close(np.asarray(out[:, pad:]), np.asarray(ref))


def _np_layernorm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _np_gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_forward(params, tokens, cfg):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  tokens = np.asarray(tokens)
  _, t = tokens.shape
  x = p["token_embedding"][tokens] + p["position_embedding"][np.arange(t)][None]
  blk = p["block_0"]
  h = _np_layernorm(x, blk["ln_attn"])
  q = np.einsum("btd,dhk->bhtk", h, blk["attn"]["query"])
  k = np.einsum("btd,dhk->bhtk", h, blk["attn"]["key"])
  v = np.einsum("btd,dhk->bhtk", h, blk["attn"]["value"])
  scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(cfg.head_dim)
  scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  attn = np.einsum("bhts,bhsk->bthk", probs, v)
  x = x + np.einsum("bthk,hkd->btd", attn, blk["attn"]["out"])
  h = _np_layernorm(x, blk["ln_mlp"])
  h = _np_gelu_tanh(h @ blk["mlp"]["fc_in"]["kernel"] + blk["mlp"]["fc_in"]["bias"])
  x = x + h @ blk["mlp"]["fc_out"]["kernel"] + blk["mlp"]["fc_out"]["bias"]
  x = _np_layernorm(x, p["ln_final"])
  return x @ p["token_embedding"].T


def test_one_layer_forward_matches_numpy_float64_reference():
  cfg = dataclasses.replace(TINY, num_layers=1)
  model, params = _init(cfg)
  # Non-trivial norm parameters and biases so that every term of the reference is exercised.
  rng = np.random.default_rng(3)
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32)
      if path[-1].key in ("scale", "bias") else a, params)
  tokens = _tokens(2, 10)
  out = _apply(model, params, tokens)
  ref = _np_forward(params, tokens, cfg)
  numeric.assert_close(np.asarray(out, np.float64), ref)


def test_bf16_compute_runs_and_keeps_fp32_params():
  cfg = dataclasses.replace(TINY, dtype="bfloat16", param_dtype="float32")
  model, params = _init(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  tokens = _tokens(2, 8)

  def loss(p):
    return jnp.mean(model.apply({"params": p}, tokens) ** 2)
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  logits = _apply(model, params, tokens)
  assert logits.dtype == jnp.float32
  assert np.isfinite(float(value))
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("tie", [True, False])
def test_bfloat16_logits_are_the_float64_projection_rounded_once(tie):
  # model.logits_dtype="bfloat16": the output projection writes its float32 accumulation rounded to bfloat16 (the
  # TPU plans' setting); every other tensor is as with float32 logits.
  cfg = dataclasses.replace(TINY, num_layers=1, tie_embeddings=tie)
  model, params = _init(cfg)
  tokens = _tokens(2, 10)
  hidden = np.asarray(model.apply({"params": params}, tokens, compute_logits=False), np.float64)
  table = np.asarray(params["token_embedding"] if tie else params["head"].T, np.float64)  # [V, D]
  ref = hidden @ table.T
  narrow = model_lib.GPT(dataclasses.replace(cfg, logits_dtype="bfloat16"))
  out = _apply(narrow, params, tokens)
  assert out.dtype == jnp.bfloat16
  out = np.asarray(out, np.float32)
  wide = np.asarray(_apply(model, params, tokens))
  assert wide.dtype == np.float32
  numeric.assert_close(wide.astype(np.float64), ref)
  # within half a bfloat16 ulp of the float32 result (8 bits of mantissa), and rounded: not the float32 values
  ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(ref), 1e-30))) - 7)
  assert np.all(np.abs(out - ref) <= 0.5 * ulp + 1e-5 * np.abs(ref) + 1e-6)
  np.testing.assert_array_equal(out, np.asarray(jnp.asarray(out, jnp.bfloat16), np.float32))
  assert np.mean(out != wide) > 0.5


def test_remat_block_gives_same_loss_and_grads_as_no_remat():
  tokens = _tokens(2, 12)
  results = []
  for remat in ("none", "block"):
    model, params = _init(dataclasses.replace(TINY, remat=remat))

    def loss(p, model=model):
      logits = model.apply({"params": p}, tokens[:, :-1])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
    results.append(jax.jit(jax.value_and_grad(loss))(params))
  (l0, g0), (l1, g1) = results
  numeric.assert_close(float(l1), float(l0), tol=1e-6)
  numeric.assert_close(g1, g0)


@pytest.mark.parametrize("variant", [dict(tie_embeddings=False), dict(norm="rmsnorm"),
                                     dict(tie_embeddings=False, norm="rmsnorm", pos_embedding="rope")])
def test_untied_head_and_rmsnorm_variants_build_and_run(variant):
  cfg = dataclasses.replace(TINY, **variant)
  model, params = _init(cfg)
  assert ("head" in params) == (not cfg.tie_embeddings)
  if cfg.norm == "rmsnorm":
    assert set(params["ln_final"]) == {"scale"}
  logits = _apply(model, params, _tokens(2, 8))
  assert logits.shape == (2, 8, 64)
  assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.parametrize("tie", [True, False])
def test_logits_at_one_position_per_row_are_the_full_projections_rows(tie):
  model, params = _init(dataclasses.replace(TINY, tie_embeddings=tie))
  tokens = _tokens(3, 8)
  full = np.asarray(_apply(model, params, tokens))
  at = np.array([7, 0, 4], np.int32)
  picked = np.asarray(_apply(model, params, tokens, logits_at_B=jnp.asarray(at)))
  assert picked.shape == (3, 1, 64)
  np.testing.assert_allclose(picked[:, 0], full[np.arange(3), at], rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("tie", [True, False])
def test_logits_slice_projects_a_span_of_positions_with_the_full_projections_values_and_gradients(tie):
  model, params = _init(dataclasses.replace(TINY, tie_embeddings=tie))
  tokens = _tokens(3, 8)
  apply = lambda p, **kw: model.apply({"params": p}, tokens, **kw)  # logits_slice is static: not through _apply
  full = np.asarray(apply(params))
  span = np.asarray(apply(params, logits_slice=(3, 4)))
  assert span.shape == (3, 4, 64)
  np.testing.assert_allclose(span, full[:, 3:7], rtol=1e-5, atol=1e-6)
  # The gradient of a loss on the span reaches every parameter as through the full projection.
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4, 64)), jnp.float32)
  want = jax.grad(lambda p: jnp.sum(jnp.tanh(apply(p)[:, 3:7]) * weights))(params)
  got = jax.grad(lambda p: jnp.sum(jnp.tanh(apply(p, logits_slice=(3, 4))) * weights))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
               got, want)
  for bad in ((5, 4), (-1, 2), (0, 0)):
    with pytest.raises(ValueError, match="logits_slice"):
      apply(params, logits_slice=bad)

def test_flops_per_token_matches_hand_computation():
  cfg = ModelConfig(vocab_size=64, num_layers=2, num_heads=4, d_model=32, max_len=16)
  # N = L*(4*d*d + 2*d*f) + V*d = 2*(4096 + 8192) + 2048 = 26624; attention 12*L*H*K*T = 12*2*4*8*16 = 12288.
  assert model_lib.flops_per_token(cfg, 16) == 6 * 26624 + 12288
  assert model_lib.flops_per_token(cfg, 16, causal_halved=True) == 6 * 26624 + 6144
  head = cfg.vocab_size * cfg.d_model  # a scalar-head model (the reward model) never computes logits
  assert model_lib.flops_per_token(cfg, 16, lm_head=False) == 6 * (26624 - head) + 12288


def test_chunked_causal_attention_matches_numpy_float64_reference():
  # Query blocks of 4 over 10 tokens: blocks [0, 4), [4, 8) and a short last block [8, 10).
  cfg = dataclasses.replace(TINY, num_layers=1, causal_chunk=4)
  model, params = _init(cfg)
  tokens = _tokens(2, 10)
  numeric.assert_close(np.asarray(_apply(model, params, tokens), np.float64), _np_forward(params, tokens, cfg))


@pytest.mark.parametrize("variant", [dict(), dict(attention="dot_product"), dict(num_kv_heads=2, pos_embedding="rope")])
def test_chunked_causal_attention_gives_the_dense_logits_and_grads_with_padding(variant):
  dense_cfg = dataclasses.replace(TINY, causal_chunk=16, **variant)
  chunked_cfg = dataclasses.replace(dense_cfg, causal_chunk=5)
  tokens = _tokens(3, 14)
  mask = np.ones((3, 14), np.int32)
  mask[1, :4] = 0  # a left-padded row
  mask[2, 11:] = 0  # a right-padded row
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  results = []
  for cfg in (dense_cfg, chunked_cfg):
    model, params = _init(cfg)

    def loss(p, model=model):
      logits = model.apply({"params": p}, tokens, positions_BxT=positions, attention_mask_BxT=mask)
      return jnp.sum(jnp.where(mask[..., None] > 0, logits, 0.0) ** 2) / 1000, logits
    results.append(jax.jit(jax.value_and_grad(loss, has_aux=True))(params))
  ((_, l0), g0), ((_, l1), g1) = results
  # (A padding query sees no valid key; its output is arbitrary and differs with the block's key count.)
  numeric.assert_close(np.asarray(l1)[mask > 0], np.asarray(l0)[mask > 0])
  numeric.assert_close(g1, g0)


def test_causal_chunk_length_automatic_and_explicit():
  assert model_lib.causal_chunk_length(ModelConfig(vocab_size=8, max_len=1024), 1024) == 128
  assert model_lib.causal_chunk_length(ModelConfig(vocab_size=8), 256) == 64
  assert model_lib.causal_chunk_length(ModelConfig(vocab_size=8), 100) == 100  # short: one dense block
  assert model_lib.causal_chunk_length(ModelConfig(vocab_size=8, causal_chunk=32), 100) == 32


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norm_gradients_match_autodiff_of_the_plain_formula(norm):
  # Norm has a hand-written backward (model._normalize); the reference is jax.grad of the textbook formula.
  cfg = dataclasses.replace(TINY, norm=norm)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, 32)) * 3 + 1, jnp.float32)
  g = jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)
  params = {"scale": jnp.asarray(rng.standard_normal(32), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(32), jnp.float32)}
  if norm == "rmsnorm":
    params.pop("bias")

  def plain(p, x):
    if norm == "layernorm":
      mean = x.mean(-1, keepdims=True)
      y = (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * p["scale"] + p["bias"]
    else:
      y = x / jnp.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * p["scale"]
    return jnp.sum(y * g)

  def ours(p, x):
    return jnp.sum(model_lib.Norm(cfg).apply({"params": p}, x) * g)
  numeric.assert_close(ours(params, x), plain(params, x))
  for a, b in zip(jax.tree.leaves(jax.grad(ours, argnums=(0, 1))(params, x)),
                  jax.tree.leaves(jax.grad(plain, argnums=(0, 1))(params, x))):
    numeric.assert_close(a, b)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rotary_embedding_and_its_inverse_rotation_backward_match_a_float64_reference(dtype):
  """model.rotary_embedding and its gradient against the rotation written out pair by pair in float64 and its
  transpose (the inverse rotation) applied to the gradient. Left-padded rows (positions 0, 0, 1, ...) and a scale
  (the splash kernel's 1 / sqrt(K)) included."""
  rng = np.random.default_rng(0)
  b, t, h, k, theta, scale = 2, 6, 3, 8, 500.0, 0.25
  x = rng.standard_normal((b, t, h, k))
  g = rng.standard_normal((b, t, h, k))
  positions = np.stack([np.arange(t), np.maximum(np.arange(t) - 2, 0)])
  angles = positions[..., None, None] * theta ** (-np.arange(k // 2) * 2.0 / k)  # [B, T, 1, K/2]
  c, s = np.cos(angles), np.sin(angles)

  def rotate(v, sign):  # pairs (i, i + K/2) rotated by sign * angle, times scale
    v1, v2 = v[..., : k // 2], v[..., k // 2:]
    return scale * np.concatenate([v1 * c - sign * v2 * s, v2 * c + sign * v1 * s], -1)
  xd = jnp.asarray(x, dtype)
  out, vjp = jax.vjp(lambda v: model_lib.rotary_embedding(v, jnp.asarray(positions, jnp.int32), theta, scale), xd)
  (dx,) = vjp(jnp.asarray(g, dtype))
  assert out.dtype == dx.dtype == dtype
  tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(np.asarray(out, np.float64), rotate(np.asarray(xd, np.float64), 1.0), **tol)
  np.testing.assert_allclose(np.asarray(dx, np.float64), rotate(np.asarray(jnp.asarray(g, dtype), np.float64), -1.0),
                             **tol)
  # The transpose of the forward: <rope(x), g> = <x, dx> (float32).
  if dtype == jnp.float32:
    np.testing.assert_allclose(np.sum(np.asarray(out, np.float64) * g), np.sum(x * np.asarray(dx, np.float64)),
                               rtol=1e-5)
