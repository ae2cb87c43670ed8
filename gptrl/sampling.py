"""Autoregressive sampling from the GPT: temperature, top-k, top-p, greedy; per-sequence stop at a token.

Prompts of different lengths are left-padded into one buffer; padding is masked out of attention and
positions restart at 0 for each prompt's first real token, so a prompt's continuation does not depend on how
much padding it got. This version recomputes the full forward pass for each new token (no KV cache).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def filter_logits(logits_BxV: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets logits outside the top-k and outside the smallest set with probability >= top_p to -inf."""
  neg_inf = jnp.finfo(logits_BxV.dtype).min
  if top_k > 0:
    kth_B1 = jax.lax.top_k(logits_BxV, min(top_k, logits_BxV.shape[-1]))[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_B1, neg_inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    cum_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
    # Keep each token whose preceding cumulative mass is < top_p (so the top token always survives).
    keep_BxV = (cum_BxV - jax.nn.softmax(sorted_BxV, axis=-1)) < top_p
    threshold_B1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < threshold_B1, neg_inf, logits_BxV)
  return logits_BxV


def sample_token(logits_BxV: jax.Array, rng: jax.Array, *, temperature: float, top_k: int = 0,
                 top_p: float = 1.0) -> jax.Array:
  """One token per row: argmax when temperature == 0, else a draw from the filtered, tempered softmax."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = filter_logits(logits_BxV.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "prompt_len", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "stop_id", "pad_id"))
def _generate(model: nn.Module, params: Any, buffer_BxL: jax.Array, mask_BxL: jax.Array, positions_BxL: jax.Array,
              rng: jax.Array, *, prompt_len: int, max_new_tokens: int, temperature: float, top_k: int,
              top_p: float, stop_id: int, pad_id: int) -> jax.Array:
  batch = buffer_BxL.shape[0]

  def body(i, carry):
    buffer_BxL, mask_BxL, done_B = carry
    logits_BxLxV = model.apply({"params": params}, buffer_BxL, positions_BxT=positions_BxL,
                               attention_mask_BxT=mask_BxL)
    logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxLxV, prompt_len - 1 + i, axis=1, keepdims=False)
    token_B = sample_token(logits_BxV, jax.random.fold_in(rng, i), temperature=temperature, top_k=top_k,
                           top_p=top_p)
    token_B = jnp.where(done_B, pad_id, token_B)
    buffer_BxL = jax.lax.dynamic_update_slice_in_dim(buffer_BxL, token_B[:, None], prompt_len + i, axis=1)
    mask_BxL = jax.lax.dynamic_update_slice_in_dim(mask_BxL, (~done_B)[:, None].astype(mask_BxL.dtype),
                                                   prompt_len + i, axis=1)
    return buffer_BxL, mask_BxL, done_B | (token_B == stop_id)

  buffer_BxL, _, _ = jax.lax.fori_loop(0, max_new_tokens, body,
                                       (buffer_BxL, mask_BxL, jnp.zeros((batch,), jnp.bool_)))
  return buffer_BxL[:, prompt_len:prompt_len + max_new_tokens]


def generate(model: nn.Module, params: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             rng: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_id: int = -1, pad_id: int = 0, batch_multiple: int = 1) -> list[list[int]]:
  """Samples continuations of token-id prompts.

  Args:
    model: a `gptrl.model.GPT` (its config's max_len bounds prompt + new tokens; prompts are cut from the left).
    params: its parameters.
    prompts: one list of token ids per prompt, each non-empty.
    max_new_tokens: tokens to generate per prompt.
    rng: PRNG key; row i uses the same draws whatever the other rows are.
    temperature: 0 for greedy decoding.
    top_k / top_p: filtering (0 / 1.0 disable).
    stop_id: a row stops after emitting this token (kept in its output); -1: never stop early.
    pad_id: the id used for padding.
    batch_multiple: pad the batch to a multiple of this (the mesh's data-parallel size).
  Returns:
    The new tokens of each prompt, up to and including `stop_id` if it was emitted.
  """
  if any(len(p) == 0 for p in prompts):
    raise ValueError("generate: every prompt needs at least one token (prepend a BOS/EOS token).")
  max_len = model.config.max_len
  if max_new_tokens >= max_len:
    raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be < the context length {max_len}.")
  prompts = [list(p)[-(max_len - max_new_tokens):] for p in prompts]
  prompt_len = max(len(p) for p in prompts)
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
  out = _generate(model, params, jnp.asarray(buffer), jnp.asarray(mask), jnp.asarray(positions), rng,
                  prompt_len=prompt_len, max_new_tokens=max_new_tokens, temperature=float(temperature),
                  top_k=int(top_k), top_p=float(top_p), stop_id=int(stop_id), pad_id=int(pad_id))
  out = np.asarray(jax.device_get(out))
  results = []
  for row in out[:len(prompts)]:
    tokens = row.tolist()
    if stop_id in tokens:
      tokens = tokens[:tokens.index(stop_id) + 1]
    results.append(tokens)
  return results
