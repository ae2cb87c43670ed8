"""Autoregressive sampling from the GPT: temperature, top-k, top-p, greedy; per-sequence stop at a token.

Prompts of different lengths are left-padded into one buffer; padding is masked out of attention and
positions restart at 0 for each prompt's first real token, so a prompt's continuation does not depend on how
much padding it got.

By default the prompt buffer is run through the model once (prefill) into a key/value cache
(`gptrl.model.init_cache`, `GPT(decode=True)`), then each new token costs one single-token step. The
full-recompute loop (`use_cache=False`: the whole buffer through the model for every token) is kept as the
independent reference the tests compare against.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptrl import losses
from gptrl import model as model_lib


def _order_keys(x_BxV: jax.Array) -> jax.Array:
  """uint32 keys that sort like the float32 values (the sign bit flipped for positives, all bits for negatives)."""
  bits = jax.lax.bitcast_convert_type(x_BxV.astype(jnp.float32), jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _largest_threshold(keys_BxV: jax.Array, enough: Any) -> jax.Array:
  """Per row, the largest key t with enough(keys >= t) true ([B, 1]), found bit by bit from the top (a radix
  select): 32 passes over [B, V] of compares and sums, where lax.top_k and jnp.sort lower to a full sort per
  row on CPU (a decoding step at batch 64 spent 80% of its time sorting 4096 logits)."""
  def body(bit, threshold_Bx1):
    candidate_Bx1 = threshold_Bx1 | (jnp.uint32(1) << (31 - bit).astype(jnp.uint32))
    return jnp.where(enough(keys_BxV >= candidate_Bx1)[:, None], candidate_Bx1, threshold_Bx1)
  return jax.lax.fori_loop(0, 32, body, jnp.zeros((keys_BxV.shape[0], 1), jnp.uint32))


def filter_logits(logits_BxV: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets logits outside the top-k and outside the smallest set with probability >= top_p to -inf (ties with
  the last kept value are kept)."""
  neg_inf = jnp.finfo(logits_BxV.dtype).min
  if top_k > 0 and top_k < logits_BxV.shape[-1]:
    keys_BxV = _order_keys(logits_BxV)
    kth_Bx1 = _largest_threshold(keys_BxV, lambda keep: jnp.sum(keep, axis=-1, dtype=jnp.int32) >= top_k)
    logits_BxV = jnp.where(keys_BxV < kth_Bx1, neg_inf, logits_BxV)
  if top_p < 1.0:
    # The smallest set of the most likely tokens whose mass reaches top_p: the largest threshold whose tokens at
    # or above it hold at least top_p of the mass.
    keys_BxV = _order_keys(logits_BxV)
    probs_BxV = jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1)
    threshold_Bx1 = _largest_threshold(keys_BxV, lambda keep: jnp.sum(jnp.where(keep, probs_BxV, 0.0), axis=-1)
                                       >= top_p)
    logits_BxV = jnp.where(keys_BxV < threshold_Bx1, neg_inf, logits_BxV)
  return logits_BxV


def sampling_logits(logits: jax.Array, *, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """The logits of the distribution the sampler draws from: float32, divided by the temperature, filtered by
  top-k / top-p (over the last axis; any leading shape)."""
  shape = logits.shape
  tempered = logits.astype(jnp.float32) / temperature
  if top_k == 0 and top_p >= 1.0:
    return tempered
  return filter_logits(tempered.reshape(-1, shape[-1]), top_k=top_k, top_p=top_p).reshape(shape)


def _vocab_blocks(x_BxV: jax.Array) -> jax.Array:
  """float32 x [B, V] as [B, N, C]: N blocks of C (a power of two near sqrt(V)) consecutive entries, the last one
  padded with the smallest float (probability 0, never the maximum of a row that has a real entry)."""
  b, v = x_BxV.shape
  c = 1 << max(0, int(np.ceil(np.log2(np.sqrt(v)))))
  n = -(-v // c)
  x_BxV = x_BxV.astype(jnp.float32)
  if n * c != v:
    x_BxV = jnp.pad(x_BxV, ((0, 0), (0, n * c - v)), constant_values=np.finfo(np.float32).min)
  return x_BxV.reshape(b, n, c)


def _first(hit_BxN: jax.Array) -> jax.Array:
  """Per row, the first index where `hit` is true ([B] int32; the length where none is)."""
  n = hit_BxN.shape[-1]
  return jnp.min(jnp.where(hit_BxN, jnp.arange(n, dtype=jnp.int32), n), axis=-1)


def _last(hit_BxN: jax.Array) -> jax.Array:
  """Per row, the last index where `hit` is true ([B] int32; 0 where none is)."""
  return jnp.max(jnp.where(hit_BxN, jnp.arange(hit_BxN.shape[-1], dtype=jnp.int32), 0), axis=-1)


def _row_block(x_BxNxC: jax.Array, j_B: jax.Array) -> jax.Array:
  """Block j[b] of row b: [B, C]."""
  return jnp.take_along_axis(x_BxNxC, j_B[:, None, None], axis=1)[:, 0]


def _argmax_blocks(x_BxNxC: jax.Array, max_BxN: jax.Array) -> jax.Array:
  """The first index of each row's maximum (`jnp.argmax` of the flat row), given its blocks' maxima: plain
  min/max reductions, which XLA:CPU vectorises, where argmax's (value, index) reduction is not (0.15 ms of a
  [16, 4096] sampling step)."""
  j_B = _first(max_BxN == jnp.max(max_BxN, axis=-1, keepdims=True))
  block_BxC = _row_block(x_BxNxC, j_B)
  return j_B * x_BxNxC.shape[-1] + _first(block_BxC == jnp.max(block_BxC, axis=-1, keepdims=True))


def _draw_blocks(x_BxNxC: jax.Array, max_B: jax.Array, uniform_B: jax.Array) -> jax.Array:
  """`draw` over logits in blocks ([B, N, C], see `_vocab_blocks`) whose rows' maxima are `max_B`."""
  c = x_BxNxC.shape[-1]
  # Unnormalised probabilities exp(x - max): their block sums, and those sums' running total.
  sum_BxN = jnp.sum(jnp.exp(x_BxNxC - max_B[:, None, None]), axis=-1)
  cdf_BxN = jnp.cumsum(sum_BxN, axis=-1)  # XLA sums as a tree: within 2e-7 of float64 over 50k entries
  target_B = uniform_B.astype(jnp.float32) * cdf_BxN[:, -1]
  # The block where the running total first exceeds the target (u * total may round up to the total: then the
  # last block with any probability) ...
  j_B = jnp.minimum(jnp.sum(cdf_BxN <= target_B[:, None], axis=-1, dtype=jnp.int32), _last(sum_BxN > 0))
  before_B = jnp.where(j_B > 0, jnp.take_along_axis(cdf_BxN, jnp.maximum(j_B - 1, 0)[:, None], axis=1)[:, 0], 0.0)
  # ... and the token in it (the block's running total may end just below the target by rounding: then its last
  # token with any probability).
  probs_BxC = jnp.exp(_row_block(x_BxNxC, j_B) - max_B[:, None])
  cdf_BxC = before_B[:, None] + jnp.cumsum(probs_BxC, axis=-1)
  i_B = jnp.minimum(jnp.sum(cdf_BxC <= target_B[:, None], axis=-1, dtype=jnp.int32), _last(probs_BxC > 0))
  return j_B * c + i_B


def draw(logits_BxV: jax.Array, uniform_B: jax.Array) -> jax.Array:
  """Row b's draw from softmax(logits[b]) given one uniform number u in [0, 1): the first token whose cumulative
  probability exceeds u (inverse-transform sampling). One random number per row, where Gumbel-max
  (jax.random.categorical) needs one per vocabulary entry: the random bits of a [16, 4096] step took 0.9 ms on
  CPU of a 3.4 ms decoding step. The cumulative sum is taken in two levels, over blocks of about sqrt(V) tokens
  and then within the one block that holds the target, so nothing of size [B, V] is written (but the padding of
  the last block, when V is not a multiple of the block): two reads of the logits (their maximum, their
  exponentials' block sums), 90 us a [16, 4096] step where a softmax, a cumulative sum over [B, V] and a count
  took 280 us. Tokens of probability 0 (filtered out) are never drawn. (A row with NaN logits, or none above
  -inf, draws some token of the vocabulary, as before: an id below V all the same.)"""
  x_BxNxC = _vocab_blocks(logits_BxV)
  draws_B = _draw_blocks(x_BxNxC, jnp.max(x_BxNxC, axis=(1, 2)), uniform_B)
  return jnp.minimum(draws_B, logits_BxV.shape[-1] - 1)


def sample_token(logits_BxV: jax.Array, rng: jax.Array, *, temperature: float, top_k: int = 0,
                 top_p: float = 1.0) -> jax.Array:
  """One token per row: argmax when temperature == 0, else a draw from the filtered, tempered softmax (`draw`,
  row b with the b-th of `uniform(rng, [B])`)."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = sampling_logits(logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p)
  return draw(logits_BxV, jax.random.uniform(rng, logits_BxV.shape[:1]))


def filter_rows(logits_BxV: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array) -> jax.Array:
  """`filter_logits` with a top_k and a top_p per row ([B] arrays; 0 and 1.0 disable them for that row)."""
  v = logits_BxV.shape[-1]
  neg_inf = jnp.finfo(logits_BxV.dtype).min
  k_B = jnp.where((top_k_B <= 0) | (top_k_B > v), v, top_k_B)
  keys_BxV = _order_keys(logits_BxV)
  kth_Bx1 = _largest_threshold(keys_BxV, lambda keep: jnp.sum(keep, axis=-1, dtype=jnp.int32) >= k_B)
  logits_BxV = jnp.where(keys_BxV < kth_Bx1, neg_inf, logits_BxV)
  keys_BxV = _order_keys(logits_BxV)
  probs_BxV = jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1)
  threshold_Bx1 = _largest_threshold(keys_BxV, lambda keep: jnp.sum(jnp.where(keep, probs_BxV, 0.0), axis=-1)
                                     >= top_p_B)
  threshold_Bx1 = jnp.where(top_p_B[:, None] >= 1.0, jnp.uint32(0), threshold_Bx1)
  return jnp.where(keys_BxV < threshold_Bx1, neg_inf, logits_BxV)


def sample_rows(logits_BxV: jax.Array, keys_B: jax.Array, counts_B: jax.Array, temperature_B: jax.Array,
                top_k_B: jax.Array, top_p_B: jax.Array, *, filtered: bool) -> jax.Array:
  """One token per row, each row with its own key and settings ([B] arrays): row b draws from
  fold_in(keys[b], counts[b]), as `sample_token` would for that row alone; temperature 0 is greedy. `filtered`:
  apply the rows' top-k / top-p (False skips the filtering, for batches where no row uses it)."""
  tempered_BxV = logits_BxV.astype(jnp.float32) / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
  if filtered:
    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    tempered_BxV = filter_rows(tempered_BxV, top_k_B, top_p_B)
  x_BxNxC = _vocab_blocks(tempered_BxV)
  max_BxN = jnp.max(x_BxNxC, axis=-1)
  if not filtered:  # greedy rows are divided by 1: their blocks are the logits' (in float32, exactly)
    greedy_B = _argmax_blocks(x_BxNxC, max_BxN)
  uniform_B = jax.vmap(lambda key, count: jax.random.uniform(jax.random.fold_in(key, count), (1,))[0])(keys_B,
                                                                                                     counts_B)
  draws_B = _draw_blocks(x_BxNxC, jnp.max(max_BxN, axis=-1), uniform_B)
  # (NaN logits, or none above -inf, would point past the vocabulary: a padding entry or "not found".)
  return jnp.minimum(jnp.where(temperature_B > 0, draws_B, greedy_B), logits_BxV.shape[-1] - 1)


def _next_token(logits_BxV: jax.Array, i: jax.Array | int, done_B: jax.Array, *, rng: jax.Array,
                temperature: float, top_k: int, top_p: float, stop_id: int, pad_id: int,
                sampling_logprobs: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """New token i of every row (pad_id where the row had stopped), its log-prob, and the rows stopped after it.

  The log-prob is under the raw model distribution (log_softmax of the unfiltered, untempered logits), or with
  `sampling_logprobs` under the distribution the token was drawn from (tempered and filtered); 0 for rows that
  had stopped. Step i draws from `fold_in(rng, i)` in both decoding loops, so they sample alike.
  """
  token_B = sample_token(logits_BxV, jax.random.fold_in(rng, i), temperature=temperature, top_k=top_k,
                         top_p=top_p)
  token_B = jnp.where(done_B, pad_id, token_B)
  if sampling_logprobs and temperature > 0:
    logits_BxV = sampling_logits(logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p)
  logprob_B = jnp.where(done_B, 0.0, losses.token_log_probs(logits_BxV[:, None, :], token_B[:, None])[:, 0])
  return token_B, logprob_B, done_B | (token_B == stop_id)


def _recompute_loop(model: nn.Module, params: Any, buffer_BxL: jax.Array, mask_BxL: jax.Array,
                    positions_BxL: jax.Array, next_token: Any, *, prompt_len: int,
                    max_new_tokens: int) -> tuple[jax.Array, jax.Array]:
  """The reference: every new token runs the whole buffer through the model. Returns tokens, log-probs [B, N]."""
  batch = buffer_BxL.shape[0]

  def body(i, carry):
    buffer_BxL, mask_BxL, done_B, logprobs_BxN = carry
    logits_BxLxV = model.apply({"params": params}, buffer_BxL, positions_BxT=positions_BxL,
                               attention_mask_BxT=mask_BxL)
    logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxLxV, prompt_len - 1 + i, axis=1, keepdims=False)
    token_B, logprob_B, new_done_B = next_token(logits_BxV, i, done_B)
    buffer_BxL = jax.lax.dynamic_update_slice_in_dim(buffer_BxL, token_B[:, None], prompt_len + i, axis=1)
    # A row's stop token is attendable; its padding after the stop is not.
    mask_BxL = jax.lax.dynamic_update_slice_in_dim(mask_BxL, (~done_B)[:, None].astype(mask_BxL.dtype),
                                                   prompt_len + i, axis=1)
    logprobs_BxN = jax.lax.dynamic_update_slice_in_dim(logprobs_BxN, logprob_B[:, None], i, axis=1)
    return buffer_BxL, mask_BxL, new_done_B, logprobs_BxN

  buffer_BxL, _, _, logprobs_BxN = jax.lax.fori_loop(
      0, max_new_tokens, body, (buffer_BxL, mask_BxL, jnp.zeros((batch,), jnp.bool_),
                                jnp.zeros((batch, max_new_tokens), jnp.float32)))
  return buffer_BxL[:, prompt_len:prompt_len + max_new_tokens], logprobs_BxN


def _cached_loop(model: nn.Module, params: Any, buffer_BxL: jax.Array, mask_BxL: jax.Array,
                 positions_BxL: jax.Array, next_token: Any, *, prompt_len: int,
                 max_new_tokens: int, group_size: int = 1) -> tuple[jax.Array, jax.Array]:
  """Prefills the prompt into a KV cache, then one single-token step per new token; with `group_size` > 1
  (rows in runs of equal prompts) one prefill per run, its cache and logits copied to the run's rows.

  Same tokens and log-probs as `_recompute_loop` up to float summation order; returns both [B, N].
  """
  batch = buffer_BxL.shape[0]

  def forward(cache, tokens_BxT, positions_BxT, valid_BxT):
    b, t = tokens_BxT.shape
    logits_Bx1xV, variables = model.apply({"params": params, "cache": cache}, tokens_BxT,
                                          positions_BxT=positions_BxT, attention_mask_BxT=valid_BxT,
                                          decode=True, mutable=["cache"], logits_at_B=jnp.full((b,), t - 1))
    return logits_Bx1xV[:, 0], variables["cache"]

  logits_Bx1xV, cache = prefill_groups(model, params, buffer_BxL, positions_BxL, mask_BxL, prefix_len=prompt_len,
                                       group_size=group_size,
                                       logits_at_B=jnp.full((batch // group_size,), prompt_len - 1))
  token_B, logprob_B, done_B = next_token(logits_Bx1xV[:, 0], 0, jnp.zeros((batch,), jnp.bool_))
  tokens_BxN = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token_B)
  logprobs_BxN = jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(logprob_B)

  def body(i, carry):
    # Feeds token i-1 (attendable unless its row had stopped before it, as in `_recompute_loop`), then
    # samples token i. The last token is never fed: N new tokens cost the prefill and N-1 steps.
    cache, prev_token_B, prev_valid_B, done_B, tokens_BxN, logprobs_BxN = carry
    position_Bx1 = jax.lax.dynamic_slice_in_dim(positions_BxL, prompt_len + i - 1, 1, axis=1)
    logits_BxV, cache = forward(cache, prev_token_B[:, None], position_Bx1, prev_valid_B[:, None])
    token_B, logprob_B, new_done_B = next_token(logits_BxV, i, done_B)
    tokens_BxN = jax.lax.dynamic_update_slice_in_dim(tokens_BxN, token_B[:, None], i, axis=1)
    logprobs_BxN = jax.lax.dynamic_update_slice_in_dim(logprobs_BxN, logprob_B[:, None], i, axis=1)
    return cache, token_B, ~done_B, new_done_B, tokens_BxN, logprobs_BxN

  _, _, _, _, tokens_BxN, logprobs_BxN = jax.lax.fori_loop(
      1, max_new_tokens, body, (cache, token_B, jnp.ones((batch,), jnp.bool_), done_B, tokens_BxN, logprobs_BxN))
  return tokens_BxN, logprobs_BxN


def prefill_groups(model: nn.Module, params: Any, tokens_BxL: jax.Array, positions_BxL: jax.Array,
                   valid_BxL: jax.Array, *, prefix_len: int, group_size: int, **apply_kwargs) -> tuple[Any, Any]:
  """Reads the first `prefix_len` tokens of each run of `group_size` rows (rows whose prefixes are equal: a
  prompt's replies) once, from the run's first row, into a key/value cache as long as the rows [B, L]; returns
  (the model's output for that prefix, the cache), both copied to the run's rows. `apply_kwargs` go to the
  model (`logits_at_B` of the U = B / group_size runs, `compute_logits`, ...)."""
  batch, length = tokens_BxL.shape
  first = lambda x_BxL: x_BxL.reshape(batch // group_size, group_size, -1)[:, 0, :prefix_len]
  out, variables = model.apply({"params": params, "cache": model_lib.init_cache(model, batch // group_size, length)},
                               first(tokens_BxL), positions_BxT=first(positions_BxL),
                               attention_mask_BxT=first(valid_BxL), decode=True, mutable=["cache"], **apply_kwargs)
  return jax.tree.map(lambda x: expand_groups(x, group_size), (out, variables["cache"]))


def groups_fit(num_prompts: int, group_size: int, batch_multiple: int) -> bool:
  """Whether prompts in runs of `group_size` can be prefilled a run at a time on `batch_multiple` data-parallel
  shards: the runs (the prefill's rows) split evenly over them."""
  return group_size > 1 and (num_prompts // group_size) % batch_multiple == 0


def expand_groups(x: jax.Array, group_size: int) -> jax.Array:
  """[U, ...] -> [U * group_size, ...], row u * group_size + j = x[u] (a run's prefill copied to its rows);
  a 0-d leaf (a cache's shared write index) is returned as it is. A broadcast and a reshape that merges the
  leading axis: rows sharded over the batch stay on their device when U is a multiple of the shards."""
  if group_size == 1 or x.ndim == 0:
    return x
  u = x.shape[0]
  return jnp.broadcast_to(x[:, None], (u, group_size) + x.shape[1:]).reshape((u * group_size,) + x.shape[1:])


def check_groups(prompts: Sequence[Sequence[int]], group_size: int, what: str) -> None:
  """Raises unless `prompts` come in whole runs of `group_size` equal prompts."""
  if group_size < 1 or len(prompts) % group_size:
    raise ValueError(f"{what}: group_size={group_size} must be >= 1 and divide the {len(prompts)} prompts.")
  for i in range(0, len(prompts), group_size):
    for j in range(i + 1, i + group_size):
      if list(prompts[j]) != list(prompts[i]):
        raise ValueError(f"{what}: group_size={group_size} needs runs of equal prompts; prompt {j} differs "
                         f"from prompt {i}, the first of its run.")


@functools.partial(jax.jit, static_argnames=("model", "prompt_len", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "stop_id", "pad_id", "use_cache", "sampling_logprobs",
                                             "group_size"))
def _generate(model: nn.Module, params: Any, buffer_BxL: jax.Array, mask_BxL: jax.Array, positions_BxL: jax.Array,
              rng: jax.Array, *, prompt_len: int, max_new_tokens: int, temperature: float, top_k: int,
              top_p: float, stop_id: int, pad_id: int, use_cache: bool,
              sampling_logprobs: bool = False, group_size: int = 1) -> tuple[jax.Array, jax.Array]:
  """New tokens [B, N] (int32, pad_id after a row's stop) and their float32 log-probs [B, N]."""
  if max_new_tokens == 0:
    batch = buffer_BxL.shape[0]
    return jnp.zeros((batch, 0), jnp.int32), jnp.zeros((batch, 0), jnp.float32)
  next_token = functools.partial(_next_token, rng=rng, temperature=temperature, top_k=top_k, top_p=top_p,
                                 stop_id=stop_id, pad_id=pad_id, sampling_logprobs=sampling_logprobs)
  if not use_cache:
    return _recompute_loop(model, params, buffer_BxL, mask_BxL, positions_BxL, next_token, prompt_len=prompt_len,
                           max_new_tokens=max_new_tokens)
  return _cached_loop(model, params, buffer_BxL, mask_BxL, positions_BxL, next_token, prompt_len=prompt_len,
                      max_new_tokens=max_new_tokens, group_size=group_size)


def lower_generate(model: nn.Module, params: Any, *, rows: int, prompt_len: int, max_new_tokens: int,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_id: int = -1, pad_id: int = 0,
                   use_cache: bool = True, sampling_logprobs: bool = False, group_size: int = 1) -> Any:
  """The sampler program `generate` runs for `rows` prompts padded to `prompt_len` tokens, lowered (not run) for
  `params` (arrays or ShapeDtypeStructs with their shardings): gptrl/compile.py compiles it for a TPU slice. The
  prompt buffers are host arrays in `generate`, hence unsharded here too."""
  buffer = jax.ShapeDtypeStruct((rows, prompt_len + max_new_tokens), jnp.int32)
  rng = jax.eval_shape(lambda: jax.random.key(0))  # abstract: nothing may run on a compile-only mesh
  return _generate.lower(model, params, buffer, buffer, buffer, rng, prompt_len=prompt_len,
                         max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                         top_p=float(top_p), stop_id=int(stop_id), pad_id=int(pad_id), use_cache=bool(use_cache),
                         sampling_logprobs=bool(sampling_logprobs), group_size=int(group_size))


def prompt_buffer(prompts: Sequence[Sequence[int]], *, max_len: int, max_new_tokens: int, pad_id: int,
                  batch_multiple: int, min_prompt_len: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
  """Left-pads the prompts (cut from the left to fit max_len) into int32 buffers [B, L], L = prompt_len + N.

  prompt_len is the longest prompt's length, or `min_prompt_len` if larger (capped at max_len - N): a fixed
  prompt_len gives every call the same shapes, so the sampler compiles once.

  Returns (tokens, mask, positions, prompt_len): mask is 1 on prompt tokens; positions count from 0 at each
  prompt's first token through the new-token slots. B is rounded up to `batch_multiple` with copies of the
  first prompt.
  """
  prompts = [list(p)[-(max_len - max_new_tokens):] for p in prompts]
  prompt_len = min(max(max(len(p) for p in prompts), min_prompt_len), max_len - max_new_tokens)
  total = prompt_len + max_new_tokens
  rows = -(-len(prompts) // batch_multiple) * batch_multiple
  buffer = np.full((rows, total), pad_id, np.int32)
  mask = np.zeros((rows, total), np.int32)
  positions = np.zeros((rows, total), np.int32)
  for i in range(rows):
    p = prompts[i] if i < len(prompts) else prompts[0]
    buffer[i, prompt_len - len(p):prompt_len] = p
    mask[i, prompt_len - len(p):prompt_len] = 1
    positions[i, prompt_len - len(p):] = np.arange(total - (prompt_len - len(p)))
  return buffer, mask, positions, prompt_len


def generate(model: nn.Module, params: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             rng: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_id: int = -1, pad_id: int = 0, batch_multiple: int = 1, use_cache: bool = True,
             return_logprobs: bool = False, min_prompt_len: int = 0, sampling_logprobs: bool = False,
             group_size: int = 1) -> list[list[int]] | tuple[list[list[int]], list[np.ndarray]]:
  """Samples continuations of token-id prompts.

  Args:
    model: a `gptrl.model.GPT` (its config's max_len bounds prompt + new tokens; prompts are cut from the left).
    params: its parameters.
    prompts: one list of token ids per prompt, each non-empty.
    max_new_tokens: tokens to generate per prompt.
    rng: PRNG key; step i draws from `fold_in(rng, i)`, so row i uses the same draws whatever the other rows are.
    temperature: 0 for greedy decoding.
    top_k / top_p: filtering (0 / 1.0 disable).
    stop_id: a row stops after emitting this token (kept in its output); -1: never stop early.
    pad_id: the id used for padding.
    batch_multiple: pad the batch to a multiple of this (the mesh's data-parallel size).
    min_prompt_len: left-pad prompts to at least this length, so calls with shorter prompts reuse one
      compiled sampler (see `prompt_buffer`).
    use_cache: prefill a key/value cache once, then one single-token step per new token; False recomputes the
      whole buffer for every token (slow; the reference the cache is tested against). Both draw the same
      random numbers, so they return the same tokens up to float rounding of near-tied logits.
    return_logprobs: also return, per prompt, the float32 log-probability of each returned token under the
      model's raw distribution (log_softmax of the logits, before temperature and top-k/top-p filtering), as
      needed for PPO's old-policy log-probs; with `sampling_logprobs`, under the distribution each token was
      drawn from (tempered and top-k/top-p filtered: `sampling_logits`), what importance weights divide by.
    group_size: the prompts come in runs of `group_size` equal prompts (GRPO's replies to one prompt, several
      samples of one prompt): each run's prompt is prefilled once and its cache copied to the run's rows, where
      the number of runs is a multiple of `batch_multiple` (else every row is prefilled: padding the runs would
      sample more rows than it saves). The rows still draw their own tokens; the tokens equal group_size=1's up
      to float rounding.
  Returns:
    The new tokens of each prompt, up to and including `stop_id` if it was emitted; with `return_logprobs`,
    `(tokens, logprobs)` where `logprobs[i]` is a float32 array as long as `tokens[i]`.
  """
  if any(len(p) == 0 for p in prompts):
    raise ValueError("generate: every prompt needs at least one token (prepend a BOS/EOS token).")
  max_len = model.config.max_len
  if max_new_tokens >= max_len:
    raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be < the context length {max_len}.")
  check_groups(prompts, group_size, "generate")
  if not groups_fit(len(prompts), group_size, batch_multiple):
    group_size = 1
  buffer, mask, positions, prompt_len = prompt_buffer(prompts, max_len=max_len, max_new_tokens=max_new_tokens,
                                                      pad_id=pad_id, batch_multiple=batch_multiple,
                                                      min_prompt_len=min_prompt_len)
  out, logprobs = _generate(model, params, jnp.asarray(buffer), jnp.asarray(mask), jnp.asarray(positions), rng,
                            prompt_len=prompt_len, max_new_tokens=max_new_tokens, temperature=float(temperature),
                            top_k=int(top_k), top_p=float(top_p), stop_id=int(stop_id), pad_id=int(pad_id),
                            use_cache=bool(use_cache), sampling_logprobs=bool(sampling_logprobs),
                            group_size=int(group_size))
  out, logprobs = jax.device_get((out, logprobs))
  tokens, token_logprobs = [], []
  for row, row_logprobs in zip(np.asarray(out)[:len(prompts)], np.asarray(logprobs)[:len(prompts)]):
    row = row.tolist()
    if stop_id in row:
      row = row[:row.index(stop_id) + 1]
    tokens.append(row)
    token_logprobs.append(np.asarray(row_logprobs[:len(row)], np.float32))
  if return_logprobs:
    return tokens, token_logprobs
  return tokens
