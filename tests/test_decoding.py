"""Tests for gptrl/decoding.py: greedy decoding against a no-cache argmax loop, padding, top_k, stop_id."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptrl import decoding
from gptrl import model as model_lib
from gptrl.config import ModelConfig

CFG = ModelConfig(vocab_size=64, num_layers=2, num_heads=4, d_model=32, max_len=16, init_std=0.3)
PROMPT = [5, 17, 3]
LONG = [9, 1, 2, 8, 40, 33, 7]
NEW = 6


@functools.lru_cache(maxsize=None)
def _model():
  model = model_lib.GPT(CFG)
  params = jax.jit(lambda r: nn.meta.unbox(model.init(r, jnp.zeros((1, 16), jnp.int32))["params"]))(
      jax.random.key(0))
  return model, params


def _greedy(prompts, **kwargs):
  model, params = _model()
  kwargs.setdefault("temperature", 0.0)
  return decoding.generate(model, params, prompts, max_new_tokens=NEW, rng=jax.random.key(1), **kwargs)


def _reference_greedy(prompt):
  model, params = _model()
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  tokens = list(prompt)
  for _ in range(NEW):
    logits = apply(params, jnp.asarray([tokens], jnp.int32))
    tokens.append(int(np.argmax(np.asarray(logits[0, -1]))))
  return tokens[len(prompt):]


def test_greedy_is_deterministic_and_matches_full_forward_argmax_loop():
  first = _greedy([PROMPT])
  assert first == _greedy([PROMPT])
  assert first[0] == _reference_greedy(PROMPT)


def test_padding_prompt_in_batch_with_longer_prompt_keeps_greedy_tokens():
  alone = _greedy([PROMPT])[0]
  batched = _greedy([PROMPT, LONG])
  assert batched[0] == alone
  assert batched[1] == _reference_greedy(LONG)


def test_top_k_one_equals_greedy():
  assert _greedy([PROMPT, LONG], temperature=1.0, top_k=1) == _greedy([PROMPT, LONG])


def test_stop_id_ends_a_row():
  full = _greedy([PROMPT])[0]
  stop = full[2]
  out = _greedy([PROMPT, LONG], stop_id=stop)
  assert out[0] == full[:full.index(stop) + 1]
  assert out[0][-1] == stop


def test_sampled_tokens_do_not_depend_on_how_much_padding_a_prompt_gets():
  """Under a fixed key, a prompt's sampled continuation is the same alone, next to a longer prompt, and padded to a
  fixed prompt length: padding is masked out and positions restart at each prompt's first token."""
  alone = _greedy([PROMPT], temperature=1.0)[0]
  assert _greedy([PROMPT, LONG], temperature=1.0)[0] == alone
  assert _greedy([PROMPT], temperature=1.0, min_prompt_len=9)[0] == alone
  assert _greedy([PROMPT, LONG], temperature=1.0, min_prompt_len=10) == _greedy([PROMPT, LONG], temperature=1.0)


def _np_filter(logits, top_k, top_p):
  """NumPy reference of top-k then top-p filtering by sorting (ties with the last kept value are kept)."""
  out = logits.astype(np.float64).copy()
  for row in out:
    if 0 < top_k < row.size:
      row[row < np.sort(row)[::-1][top_k - 1]] = -np.inf
    if top_p < 1.0:
      desc = np.sort(row)[::-1]
      probs = np.exp(desc - desc.max())
      probs /= probs.sum()
      before = np.cumsum(probs) - probs  # mass of the tokens ranked above each
      row[row < desc[before < top_p].min()] = -np.inf
  return out


@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (5, 1.0), (50, 1.0), (0, 0.9), (0, 0.5), (20, 0.8), (64, 1.0)])
def test_filter_logits_matches_a_sorting_numpy_reference(top_k, top_p):
  rng = np.random.default_rng(top_k + int(100 * top_p))
  logits = (rng.standard_normal((6, 64)) * 3).astype(np.float32)
  logits[1] = np.round(logits[1])  # many ties
  logits[2] -= 1e4  # all negative and large
  logits[3, :10] = 7.0  # a tie at the top
  out = np.asarray(decoding.filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p))
  ref = _np_filter(logits, top_k, top_p)
  np.testing.assert_array_equal(out > np.finfo(np.float32).min, np.isfinite(ref))
  np.testing.assert_array_equal(out[np.isfinite(ref)], logits[np.isfinite(ref)])


def _np_inverse_cdf(logits: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """float64: each row's first token whose cumulative probability exceeds u, and how far u is from the nearest
  boundary between tokens (where float32 and float64 may round apart)."""
  z = logits.astype(np.float64)
  probs = np.exp(z - z.max(axis=-1, keepdims=True))
  cdf = np.cumsum(probs / probs.sum(axis=-1, keepdims=True), axis=-1)
  index = np.array([np.searchsorted(c, x, side="right") for c, x in zip(cdf, u)])
  margin = np.min(np.abs(cdf - u[:, None]), axis=-1)
  return index, margin


def test_draw_is_the_float64_inverse_cdf_and_never_draws_a_filtered_token():
  rng = np.random.default_rng(0)
  logits = (rng.standard_normal((4000, 64)) * 2).astype(np.float32)
  logits[:, ::3] = np.finfo(np.float32).min  # filtered out (as filter_rows leaves them)
  logits[7, :] = np.finfo(np.float32).min
  logits[7, 5] = 0.0  # one token left
  u = rng.random(4000).astype(np.float32)
  u[:3] = [0.0, np.nextafter(np.float32(1), np.float32(0)), 0.5]
  got = np.asarray(decoding.draw(jnp.asarray(logits), jnp.asarray(u)))
  want, margin = _np_inverse_cdf(logits, u.astype(np.float64))
  assert np.all(logits[np.arange(4000), got] > np.finfo(np.float32).min) and got[7] == 5
  agree = (got == want) | (margin < 1e-5)
  assert agree.all(), np.flatnonzero(~agree)[:10]
  assert got[0] == 1 and got[1] == 62  # u = 0: the first kept token (0 is filtered); u -> 1: the last kept


def test_draw_over_a_50k_vocabulary_is_the_float64_inverse_cdf_within_2e6():
  # The cumulative sum runs over 197 blocks of 256, then within one block: no float32 sum over the whole row.
  rng = np.random.default_rng(1)
  logits = (rng.standard_normal((2, 50_257)) * 2).astype(np.float32)
  logits[1, -1] = 12.0  # a likely token in the last, padded block
  for _ in range(300):
    u = rng.random(2).astype(np.float32)
    got = np.asarray(decoding.draw(jnp.asarray(logits), jnp.asarray(u)))
    want, margin = _np_inverse_cdf(logits, u.astype(np.float64))
    assert np.all((got == want) | (margin < 2e-6)), (got, want, margin)


@pytest.mark.parametrize("vocab", [100, 4096, 50_257])
def test_sample_rows_greedy_rows_are_numpys_argmax_and_others_the_tempered_draw(vocab):
  rng = np.random.default_rng(vocab)
  logits = (rng.standard_normal((6, vocab)) * 3 - 40).astype(np.float32)  # all negative: padding must not win
  logits[1, [3, vocab - 2]] = 5.0  # a tie across blocks: the first
  logits[2, -1] = 9.0  # the maximum in the last (padded) block
  logits[3, 7:9] = 9.0  # a tie within a block
  temperature = np.array([0, 0, 0, 0, 0.7, 1.3], np.float32)
  keys = jax.random.split(jax.random.key(3), 6)
  counts = np.arange(6, dtype=np.int32)
  got = np.asarray(decoding.sample_rows(jnp.asarray(logits), keys, jnp.asarray(counts), jnp.asarray(temperature),
                                        jnp.zeros(6, jnp.int32), jnp.ones(6), filtered=False))
  np.testing.assert_array_equal(got[:4], np.argmax(logits[:4], axis=-1))
  assert got[1] == 3 and got[3] == 7
  for b in (4, 5):
    u = float(jax.random.uniform(jax.random.fold_in(keys[b], counts[b]), (1,))[0])
    want, margin = _np_inverse_cdf(logits[b:b + 1] / temperature[b], np.array([u]))
    assert got[b] == want[0] or margin[0] < 1e-5, (b, got[b], want, margin)
  # The filtered path (its greedy rows take a separate argmax) agrees on the greedy rows.
  filtered = np.asarray(decoding.sample_rows(jnp.asarray(logits), keys, jnp.asarray(counts),
                                             jnp.asarray(temperature), jnp.full(6, 5, jnp.int32), jnp.ones(6),
                                             filtered=True))
  np.testing.assert_array_equal(filtered[:4], got[:4])


def test_sample_rows_and_draw_keep_rows_without_a_usable_logit_inside_the_vocabulary():
  # NaN logits, or none above -inf (padding of the last block is the smallest float): no meaningful token, but
  # an id the tokenizer and the embedding can take.
  logits = np.zeros((4, 100), np.float32)
  logits[0, 17] = np.nan
  logits[1, :] = -np.inf
  logits[2, 3] = np.nan
  logits[3, :] = -np.inf
  keys = jax.random.split(jax.random.key(0), 4)
  got = np.asarray(decoding.sample_rows(jnp.asarray(logits), keys, jnp.zeros(4, jnp.int32),
                                        jnp.asarray([0.0, 0.0, 1.0, 1.0]), jnp.zeros(4, jnp.int32), jnp.ones(4),
                                        filtered=False))
  drawn = np.asarray(decoding.draw(jnp.asarray(logits), jnp.full(4, 0.99, jnp.float32)))
  assert np.all((got >= 0) & (got < 100)) and np.all((drawn >= 0) & (drawn < 100)), (got, drawn)
