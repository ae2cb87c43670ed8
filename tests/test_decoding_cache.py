"""Tests of incremental decoding: GPT(decode=True) with a KV cache, and generate() on top of it.

The reference throughout is the model without a cache: the full forward pass over the whole token buffer.
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptrl import decoding
from gptrl import model as model_lib
from gptrl import sharding
from gptrl.config import MeshConfig, ModelConfig

import numeric

TINY = ModelConfig(vocab_size=64, num_layers=2, num_heads=4, d_model=32, max_len=24, init_std=0.3)
# Every other option that touches attention or the head, in one variant.
ROPE_UNTIED = dataclasses.replace(TINY, pos_embedding="rope", tie_embeddings=False, norm="rmsnorm", remat="block",
                                  attention="dot_product")
PROMPTS = [[5, 17, 3], [9, 1, 2, 8, 40, 33, 7], [11, 60]]
NEW = 8
SAMPLED = dict(temperature=0.7, top_k=5)  # tempered and filtered, so raw log-probs differ from the sampler's


@functools.lru_cache(maxsize=None)
def _model(cfg=TINY):
  """The model and random parameters drawn by NumPy (compiling the threefry init costs ~10 s of CPU)."""
  model = model_lib.GPT(cfg)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
                          ["params"])
  rng = np.random.default_rng(0)

  def draw(path, shape):
    noise = rng.standard_normal(shape.shape).astype(shape.dtype)
    return {"scale": 1.0 + 0.1 * noise, "bias": 0.1 * noise}.get(path[-1].key, cfg.init_std * noise)
  return model, jax.tree_util.tree_map_with_path(draw, shapes)


def _left_padded_batch(total):
  """Tokens, validity and positions [3, total] of PROMPTS left-padded to a common start, then random tokens.

  Row 0 also has two tokens in the middle of its continuation marked invalid (as after a stop).
  """
  prompt_len = max(len(p) for p in PROMPTS)
  rng = np.random.default_rng(4)
  tokens = rng.integers(0, TINY.vocab_size, (len(PROMPTS), total)).astype(np.int32)
  valid = np.ones_like(tokens)
  positions = np.zeros_like(tokens)
  for i, p in enumerate(PROMPTS):
    start = prompt_len - len(p)
    tokens[i, :start], valid[i, :start] = 0, 0
    tokens[i, start:prompt_len] = p
    positions[i, start:] = np.arange(total - start)
  valid[0, prompt_len + 2:prompt_len + 4] = 0
  return tokens, valid, positions, prompt_len


def _decode_logits(model, params, tokens, valid, positions, chunks):
  """Logits of `tokens` fed through the cache in consecutive chunks of the given lengths."""
  apply = jax.jit(functools.partial(model.apply, decode=True, mutable=["cache"]))
  cache = model_lib.init_cache(model, tokens.shape[0], tokens.shape[1])
  outs, start = [], 0
  for n in chunks:
    sl = slice(start, start + n)
    logits, variables = apply({"params": params, "cache": cache}, tokens[:, sl], positions_BxT=positions[:, sl],
                              attention_mask_BxT=valid[:, sl])
    cache, start = variables["cache"], start + n
    outs.append(np.asarray(logits))
  assert start == tokens.shape[1]
  return np.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("cfg", [TINY, ROPE_UNTIED], ids=["learned", "rope_untied_remat_dot_product"])
def test_prefill_then_single_token_steps_match_full_forward_logits(cfg):
  model, params = _model(cfg)
  total = 14
  tokens, valid, positions, prompt_len = _left_padded_batch(total)
  full = np.asarray(jax.jit(model.apply)({"params": params}, tokens, positions_BxT=positions,
                                         attention_mask_BxT=valid))
  # A prefill, a two-token chunk (T > 1 at a non-zero cache index), then single-token steps.
  decoded, cache = _decode_logits(model, params, tokens, valid, positions,
                                  [prompt_len, 2] + [1] * (total - prompt_len - 2))
  # Left-padding queries see no valid key at all; their (unused) output depends on the key count.
  real = np.broadcast_to(np.cumsum(valid, axis=1) > 0, valid.shape)
  numeric.assert_close(decoded[real], full[real])
  for layer in cache.values():
    assert int(layer["attn"]["index"]) == total
    np.testing.assert_array_equal(np.asarray(layer["attn"]["cached_valid"]), valid.astype(bool))


def test_bf16_decode_stays_close_to_full_forward_and_caches_in_bf16():
  model, params = _model(dataclasses.replace(TINY, dtype="bfloat16"))  # float32 params, bf16 compute
  tokens, valid, positions, prompt_len = _left_padded_batch(12)
  full = np.asarray(jax.jit(model.apply)({"params": params}, tokens, positions_BxT=positions,
                                         attention_mask_BxT=valid))
  decoded, cache = _decode_logits(model, params, tokens, valid, positions, [prompt_len] + [1] * (12 - prompt_len))
  assert cache["block_0"]["attn"]["cached_key"].dtype == jnp.bfloat16
  real = np.cumsum(valid, axis=1) > 0
  numeric.assert_close(decoded[real], full[real], tol=0.03)  # bf16 has 8 bits of mantissa


def test_init_cache_has_per_layer_kv_validity_and_index_of_the_requested_size():
  model, _ = _model()
  cache = model_lib.init_cache(model, 3, 10)
  assert set(cache) == {"block_0", "block_1"}
  attn = cache["block_1"]["attn"]
  assert attn["cached_key"].shape == attn["cached_value"].shape == (3, 4, 10, 8)  # [B, H, S, K]
  assert attn["cached_key"].dtype == jnp.float32
  assert attn["cached_valid"].shape == (3, 10) and attn["cached_valid"].dtype == jnp.bool_
  assert attn["index"].shape == () and attn["index"].dtype == jnp.int32
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(cache))


def test_decode_without_a_cache_or_positions_is_refused_with_a_message():
  model, params = _model()
  tokens = jnp.zeros((1, 3), jnp.int32)
  with pytest.raises(ValueError, match="needs a cache"):
    jax.eval_shape(lambda: model.apply({"params": params}, tokens, positions_BxT=jnp.zeros((1, 3), jnp.int32),
                                       decode=True, mutable=["cache"]))
  with pytest.raises(ValueError, match="positions_BxT"):
    jax.eval_shape(lambda: model.apply({"params": params, "cache": model_lib.init_cache(model, 1, 3)}, tokens,
                                       decode=True, mutable=["cache"]))


def test_compute_logits_false_returns_the_hidden_states_and_skips_the_head():
  model, params = _model(ROPE_UNTIED)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 6)), jnp.int32)
  _, hidden = jax.jit(functools.partial(model.apply, return_hidden=True))({"params": params}, tokens)
  only_hidden = jax.jit(functools.partial(model.apply, compute_logits=False))({"params": params}, tokens)
  np.testing.assert_array_equal(np.asarray(only_hidden), np.asarray(hidden))
  trunk = jax.eval_shape(lambda r: model.init(r, tokens, compute_logits=False)["params"], jax.random.key(0))
  assert "head" not in trunk and "head" in params


def _generate(prompts=tuple(map(tuple, PROMPTS)), cfg=TINY, **kwargs):
  model, params = _model(cfg)
  kwargs.setdefault("temperature", 0.0)
  return decoding.generate(model, params, [list(p) for p in prompts], max_new_tokens=NEW,
                           rng=jax.random.key(7), **kwargs)


def test_greedy_generate_with_cache_equals_full_recompute():
  assert _generate() == _generate(use_cache=False)


def test_sampled_generate_with_cache_draws_the_same_tokens_as_full_recompute():
  cached = _generate(**SAMPLED)
  assert cached == _generate(use_cache=False, **SAMPLED)
  assert cached != _generate()  # really sampled, not greedy


def test_stop_id_ends_a_row_and_pads_it_while_other_rows_continue():
  full = _generate()
  stop = full[0][2]
  out = _generate(stop_id=stop)
  assert out[0] == full[0][:full[0].index(stop) + 1]
  for row, alone in zip(out[1:], full[1:]):
    assert row == (alone[:alone.index(stop) + 1] if stop in alone else alone)
  assert out == _generate(stop_id=stop, use_cache=False)

  # Before generate trims them, the stopped row holds pad_id (with log-prob 0) after its stop token.
  model, params = _model()
  buffer, mask, positions, prompt_len = decoding.prompt_buffer(
      PROMPTS, max_len=TINY.max_len, max_new_tokens=NEW, pad_id=0, batch_multiple=1)
  tokens, logprobs = decoding._generate(  # pylint: disable=protected-access
      model, params, buffer, mask, positions, jax.random.key(7), prompt_len=prompt_len, max_new_tokens=NEW,
      temperature=0.0, top_k=0, top_p=1.0, stop_id=stop, pad_id=0, use_cache=True)
  after = full[0].index(stop) + 1
  np.testing.assert_array_equal(np.asarray(tokens[0, after:]), 0)
  np.testing.assert_array_equal(np.asarray(logprobs[0, after:]), 0.0)
  assert np.all(np.asarray(logprobs[0, :after]) < 0.0)


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("use_cache", [True, False])
def test_returned_logprobs_are_raw_model_logprobs_of_the_sampled_tokens(use_cache):
  # Tempered and top-k filtered sampling; the log-probs must still be those of the raw distribution.
  model, params = _model()
  tokens, logprobs = _generate(use_cache=use_cache, return_logprobs=True, **SAMPLED)
  # Each prompt + its tokens from position 0, zero-filled on the right (causal: the filler is never attended).
  sequences = [prompt + new for prompt, new in zip(PROMPTS, tokens)]
  batch = np.zeros((len(sequences), max(map(len, sequences))), np.int32)
  for row, seq in zip(batch, sequences):
    row[:len(seq)] = seq
  log_probs = _np_log_softmax(jax.jit(model.apply)({"params": params}, batch))
  for i, (prompt, new, lp) in enumerate(zip(PROMPTS, tokens, logprobs)):
    assert lp.dtype == np.float32 and lp.shape == (len(new),)
    ref = log_probs[i, np.arange(len(new)) + len(prompt) - 1, new]
    numeric.assert_close(lp, ref, err_msg=f"row {i}")


@pytest.mark.parametrize("sampled", [SAMPLED, dict(temperature=0.8, top_p=0.6), dict(temperature=1.3)])
def test_sampling_logprobs_are_those_of_the_tempered_filtered_distribution(sampled):
  model, params = _model()
  tokens, logprobs = _generate(return_logprobs=True, sampling_logprobs=True, **sampled)
  raw_tokens = _generate(**sampled)
  assert tokens == raw_tokens  # the same draws: only the log-probs' distribution differs
  sequences = [prompt + new for prompt, new in zip(PROMPTS, tokens)]
  batch = np.zeros((len(sequences), max(map(len, sequences))), np.int32)
  for row, seq in zip(batch, sequences):
    row[:len(seq)] = seq
  logits = np.asarray(jax.jit(model.apply)({"params": params}, batch), np.float64) / sampled["temperature"]
  for i, (prompt, new, lp) in enumerate(zip(PROMPTS, tokens, logprobs)):
    at = logits[i, np.arange(len(new)) + len(prompt) - 1]  # [N, V]
    keep = np.ones_like(at, bool)
    if sampled.get("top_k"):
      keep &= at >= np.sort(at, axis=-1)[:, -sampled["top_k"]][:, None]
    if sampled.get("top_p", 1.0) < 1.0:
      p = np.exp(_np_log_softmax(at))
      order = np.argsort(-at, axis=-1)
      mass_before = np.cumsum(np.take_along_axis(p, order, -1), -1) - np.take_along_axis(p, order, -1)
      inside = np.zeros_like(keep)
      np.put_along_axis(inside, order, mass_before < sampled["top_p"], -1)
      keep &= inside
    ref = _np_log_softmax(np.where(keep, at, -np.inf))[np.arange(len(new)), new]
    numeric.assert_close(lp, ref, tol=1e-4, err_msg=f"row {i}")


def test_generate_under_a_data_fsdp_tensor_mesh_gives_the_single_device_tokens():
  model, params = _model()
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  abstract = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"], jax.random.key(0))
  sharded_params = jax.device_put(params, sharding.tree_shardings(abstract, mesh))
  with sharding.activate(mesh):
    out = decoding.generate(model, sharded_params, PROMPTS, max_new_tokens=NEW, rng=jax.random.key(7),
                            batch_multiple=sharding.data_parallel_size(mesh), **SAMPLED)
  assert out == _generate(**SAMPLED)



def _runs(group):
  return [list(p) for p in PROMPTS for _ in range(group)]


@pytest.mark.parametrize("sampled", [SAMPLED, dict(temperature=1.0)])
def test_one_prefill_per_run_of_equal_prompts_draws_what_a_prefill_per_row_draws(sampled):
  # Runs of 4 equal prompts: one prefill per run, its cache copied to the run's rows; every row still draws its
  # own tokens, the same as with a prefill per row and as the recomputing reference.
  tokens, logprobs = _generate(_runs(4), return_logprobs=True, group_size=4, **sampled)
  want_tokens, want_logprobs = _generate(_runs(4), return_logprobs=True, **sampled)
  assert tokens == want_tokens == _generate(_runs(4), use_cache=False, **sampled)
  assert len({tuple(t) for t in tokens[:4]}) > 1  # the rows of a run differ
  for i, (lp, want) in enumerate(zip(logprobs, want_logprobs)):
    numeric.assert_close(lp, want, err_msg=f"row {i}")


def test_grouped_prefill_under_a_data_fsdp_tensor_mesh_gives_the_single_device_tokens(monkeypatch):
  model, params = _model()
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  abstract = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"], jax.random.key(0))
  sharded_params = jax.device_put(params, sharding.tree_shardings(abstract, mesh))
  expanded = []
  real_expand = decoding.expand_groups
  monkeypatch.setattr(decoding, "expand_groups", lambda x, g: (expanded.append(g), real_expand(x, g))[1])
  four = [list(p) for p in PROMPTS + [[4, 4, 9, 1]] for _ in range(2)]  # 4 runs of 2: one per data shard
  three = _runs(2)  # 3 runs on 4 shards: every row prefilled (padding runs would sample 8 rows for 6)
  for prompts, grouped in ((four, True), (three, False)):
    expanded.clear()
    with sharding.activate(mesh):
      out = decoding.generate(model, sharded_params, prompts, max_new_tokens=NEW, rng=jax.random.key(7),
                              batch_multiple=sharding.data_parallel_size(mesh), group_size=2, **SAMPLED)
    assert out == _generate(prompts, **SAMPLED)
    assert (2 in expanded) == grouped


def test_group_size_that_does_not_split_the_prompts_into_runs_of_equal_prompts_is_refused():
  with pytest.raises(ValueError, match="divide the 6 prompts"):
    _generate(_runs(2), group_size=4)
  with pytest.raises(ValueError, match="prompt 3 differs from prompt 2"):
    _generate(_runs(2)[:3] + [[1, 2]] + _runs(2)[4:], group_size=2)
  # 3 runs on 2 shards: prefilled row by row; 4 runs on 2 shards: run by run.
  assert not decoding.groups_fit(6, 2, 2) and decoding.groups_fit(8, 2, 2) and not decoding.groups_fit(8, 1, 2)

def test_decode_cache_is_sharded_like_activations_under_a_mesh():
  model, params = _model()
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  tokens = jnp.zeros((4, 5), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (4, 5))
  with sharding.activate(mesh):
    prefill = jax.jit(lambda p, c: model.apply({"params": p, "cache": c}, tokens, positions_BxT=positions,
                                               decode=True, mutable=["cache"])[1]["cache"])
    cache = prefill(params, model_lib.init_cache(model, 4, 8))
  attn = cache["block_0"]["attn"]
  # batch over data x fsdp (4 ways), heads over tensor (2 ways), length and head dim whole.
  assert attn["cached_key"].sharding.shard_shape((4, 4, 8, 8)) == (1, 2, 8, 8)
  assert attn["cached_valid"].sharding.shard_shape((4, 8)) == (1, 8)
