"""Continuous batching for serving: requests share a fixed set of batch slots of one key/value cache, join it
between decoding steps and leave it the step they finish.

A background thread runs the loop: admit queued requests into free slots (each prompt prefilled on its own into
its slot: `_admit`), then one decoding step for every occupied slot (`_step`), and repeat. A request that arrives
while others are being decoded joins at the next step, without waiting for them to finish; one that finishes
(its stop token, its token budget, a cancel: a client that went away) frees its slot for the next in the queue.

The cache has one write index per row (`model.init_cache(per_row=True)`), so rows at different lengths decode
in one step. Prompts are right-padded to a power of two for the prefill (one compiled prefill per length
bucket), and the row's index is then set to the prompt's true length, so the padding costs no cache room. A
decoding step runs over the lowest slots only, a power of two of them covering every occupied one (slots are
filled lowest first), so a lone request costs a batch of one, not of all slots.

Token i of a request is drawn with `fold_in(key(seed), i)` from its own row: what a request gets does not depend
on which others share the batch, and equals `decoding.generate` on that prompt alone with `rng = key(seed)` (up
to float rounding of near-tied logits: the two run different shapes).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import queue
import threading
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptrl import config as config_lib
from gptrl import decoding
from gptrl import model as model_lib
from gptrl import sharding

_MIN_PREFILL = 16


class QueueFull(RuntimeError):
  """The engine's queue holds `max_queue` requests already: try again later (HTTP 503)."""


class EngineClosed(RuntimeError):
  """The engine was closed (or its loop failed) before the request finished."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request is sampled. temperature 0 is greedy; top_k 0 and top_p 1.0 disable filtering; the request
  ends after `max_tokens` new tokens or at (and including) any of `stop_ids`."""
  max_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop_ids: tuple[int, ...] = ()

  def check(self) -> None:
    """Raises ValueError naming the parameter that is out of range."""
    if self.max_tokens < 1:
      raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
    if not 0.0 <= self.temperature <= 100.0:
      raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if not 0 <= self.seed < 2 ** 63:
      raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")

  @property
  def filtered(self) -> bool:
    return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1.0)


_DONE = object()


class Request:
  """One prompt being served: its new tokens arrive in `tokens()` (a blocking iterator) as they are decoded.

  `finish_reason` is "stop" (a stop token: the last token), "length" (max_tokens) or "cancelled" once done.
  """

  def __init__(self, prompt: Sequence[int], params: SamplingParams):
    self.prompt = [int(t) for t in prompt]
    self.params = params
    self.generated: list[int] = []
    self.finish_reason: str | None = None
    self.error: str = ""
    self.submitted = time.monotonic()
    self.first_token_at: float | None = None
    self._events: queue.SimpleQueue = queue.SimpleQueue()
    self._cancelled = threading.Event()

  def cancel(self) -> None:
    """Stops decoding this request at the next step and frees its slot (a client that went away)."""
    self._cancelled.set()

  @property
  def cancelled(self) -> bool:
    return self._cancelled.is_set()

  def tokens(self, timeout: float | None = None) -> Iterator[int]:
    """The new tokens as they are decoded (the stop token included), until the request finishes.

    Raises:
      EngineClosed: the engine stopped before this request finished.
      TimeoutError: no token for `timeout` seconds.
    """
    while True:
      try:
        item = self._events.get(timeout=timeout)
      except queue.Empty:
        raise TimeoutError(f"no token for {timeout} s") from None
      if item is _DONE:
        if self.error:
          raise EngineClosed(self.error)
        return
      yield item

  def result(self, timeout: float | None = None) -> list[int]:
    """Every new token, once the request is done."""
    for _ in self.tokens(timeout):
      pass
    return list(self.generated)

  # Called by the engine's thread only.
  def _emit(self, token: int) -> None:
    if self.first_token_at is None:
      self.first_token_at = time.monotonic()
    self.generated.append(token)
    self._events.put(token)

  def _finish(self, reason: str, error: str = "") -> None:
    self.finish_reason, self.error = reason, error
    self._events.put(_DONE)


def _bucket(n: int, smallest: int, largest: int) -> int:
  """The smallest `smallest * 2^k` >= n, capped at `largest`."""
  size = smallest
  while size < n:
    size *= 2
  return min(size, largest)


@functools.partial(jax.jit, static_argnames=("model", "filtered"), donate_argnames=("cache",))
def _admit(model: Any, params: Any, cache: Any, slot: jax.Array, tokens_1xP: jax.Array, length: jax.Array,
           key: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, *,
           filtered: bool) -> tuple[Any, jax.Array]:
  """Prefills one right-padded prompt (its first `length` tokens are real) into row `slot` of `cache`; returns
  the cache and the request's first new token (drawn with fold_in(key, 0))."""
  p = tokens_1xP.shape[1]
  cache_len = jax.tree.leaves(cache)[0].shape[2]  # cached_key [B, G, S, K]
  positions_1xP = jnp.arange(p, dtype=jnp.int32)[None]
  logits_1xPxV, variables = model.apply(
      {"params": params, "cache": model_lib.init_cache(model, 1, cache_len, per_row=True)}, tokens_1xP,
      positions_BxT=positions_1xP, attention_mask_BxT=positions_1xP < length, decode=True, mutable=["cache"])
  logits_1xV = jax.lax.dynamic_index_in_dim(logits_1xPxV, length - 1, axis=1, keepdims=False)
  token_1 = decoding.sample_rows(logits_1xV, key[None], jnp.zeros((1,), jnp.int32), temperature[None], top_k[None],
                                 top_p[None], filtered=filtered)

  def insert(path, big, small):
    if path[-1].key == "index":  # the row continues after its real tokens: the padding's slots get overwritten
      return big.at[slot].set(length)
    return jax.lax.dynamic_update_index_in_dim(big, small[0], slot, axis=0)
  return jax.tree_util.tree_map_with_path(insert, cache, variables["cache"]), token_1[0]


@functools.partial(jax.jit, static_argnames=("model", "rows", "filtered"), donate_argnames=("cache",))
def _step(model: Any, params: Any, cache: Any, tokens_B: jax.Array, positions_B: jax.Array, active_B: jax.Array,
          keys_B: jax.Array, counts_B: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array,
          *, rows: int, filtered: bool) -> tuple[Any, jax.Array]:
  """One decoding step over the first `rows` slots: feeds each row's last token (written to the cache only where
  active) and draws its next one with fold_in(key, count). Returns the cache and the new tokens [rows]."""
  sub = jax.tree.map(lambda c: c[:rows], cache)
  logits_Bx1xV, variables = model.apply({"params": params, "cache": sub}, tokens_B[:, None],
                                        positions_BxT=positions_B[:, None], attention_mask_BxT=active_B[:, None],
                                        decode=True, mutable=["cache"])
  new_B = decoding.sample_rows(logits_Bx1xV[:, 0], keys_B, counts_B, temperature_B, top_k_B, top_p_B,
                               filtered=filtered)
  if rows == jax.tree.leaves(cache)[0].shape[0]:
    return variables["cache"], new_B
  return jax.tree.map(lambda c, s: jax.lax.dynamic_update_slice_in_dim(c, s, 0, axis=0), cache,
                      variables["cache"]), new_B


class Engine:
  """Serves generation requests for one GPT with continuous batching (see the module docstring).

  Args:
    model, params: a `gptrl.model.GPT` and its parameters (laid out on `mesh`).
    slots: requests decoded at once (rounded up to a multiple of the mesh's data-parallel size).
    max_queue: requests waiting for a slot beyond which `submit` raises QueueFull.
    mesh: the device mesh the model runs on (default: the first device).
  """

  def __init__(self, model: Any, params: Any, *, slots: int = 16, max_queue: int = 256,
               mesh: jax.sharding.Mesh | None = None):
    self.model, self.params = model, params
    self.mesh = mesh or sharding.make_mesh(config_lib.MeshConfig(), jax.devices()[:1])
    self._dp = sharding.data_parallel_size(self.mesh)
    self.slots = -(-max(1, slots) // self._dp) * self._dp
    self.context = model.config.max_len
    self.max_queue = max_queue
    with sharding.activate(self.mesh):
      self._cache = model_lib.init_cache(model, self.slots, self.context, per_row=True)
    self._rows: list[Request | None] = [None] * self.slots
    b = self.slots
    self._last = np.zeros(b, np.int32)
    self._position = np.zeros(b, np.int32)
    self._count = np.zeros(b, np.int32)
    self._temperature = np.ones(b, np.float32)
    self._top_k = np.zeros(b, np.int32)
    self._top_p = np.ones(b, np.float32)
    self._seeds = np.zeros(b, np.uint32)
    self._keys = jax.random.split(jax.random.key(0), b)
    self._queue: collections.deque[Request] = collections.deque()
    self._cond = threading.Condition()
    self._closed = False
    self._error = ""
    self.stats = collections.Counter()
    self._thread = threading.Thread(target=self._loop, name="gptrl-engine", daemon=True)
    self._thread.start()

  # -- the clients' side --------------------------------------------------------------------------

  def submit(self, prompt: Sequence[int], params: SamplingParams) -> Request:
    """Queues a request; its tokens arrive through the returned Request.

    Raises:
      ValueError: an empty prompt, a bad parameter, or prompt + max_tokens longer than the context.
      QueueFull: `max_queue` requests are waiting already.
      EngineClosed: the engine is closed.
    """
    params.check()
    if not prompt:
      raise ValueError("the prompt has no tokens")
    if len(prompt) + params.max_tokens > self.context:
      raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) is longer than the "
                       f"context ({self.context}) by {len(prompt) + params.max_tokens - self.context}")
    request = Request(prompt, params)
    with self._cond:
      if self._closed:
        raise EngineClosed(self._error or "the engine is closed")
      if len(self._queue) >= self.max_queue:
        self.stats["rejected"] += 1
        raise QueueFull(f"{len(self._queue)} requests are waiting already (--max_queue {self.max_queue})")
      self._queue.append(request)
      self._cond.notify_all()
    return request

  def load(self) -> dict[str, int]:
    """Occupied slots, queued requests, and the slots in all."""
    with self._cond:
      return {"active": sum(r is not None for r in self._rows), "queued": len(self._queue), "slots": self.slots}

  def close(self) -> None:
    """Stops the loop; unfinished requests end with EngineClosed."""
    with self._cond:
      self._closed = True
      self._cond.notify_all()
    self._thread.join(timeout=60)

  # -- the engine's thread ------------------------------------------------------------------------

  def _loop(self) -> None:
    try:
      while True:
        with self._cond:
          self._cond.wait_for(lambda: self._closed or self._queue or any(r is not None for r in self._rows))
          if self._closed:
            break
          admitted = []
          for slot in range(self.slots):
            if self._rows[slot] is None and self._queue:
              admitted.append((slot, self._queue.popleft()))
        for slot, request in admitted:
          self._admit(slot, request)
        if any(r is not None for r in self._rows):
          self._step()
      reason = "the engine was closed"
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("the serving engine stopped")
      reason = f"the serving engine failed: {type(e).__name__}: {e}"
    with self._cond:
      self._closed, self._error = True, reason
      pending = [r for r in self._rows if r is not None] + list(self._queue)
      self._rows, self._queue = [None] * self.slots, collections.deque()
    for request in pending:
      request._finish("error", reason)  # pylint: disable=protected-access

  def _admit(self, slot: int, request: Request) -> None:
    if request.cancelled:
      request._finish("cancelled")  # pylint: disable=protected-access
      return
    p = request.params
    n = len(request.prompt)
    padded = np.zeros((1, _bucket(n, _MIN_PREFILL, self.context)), np.int32)
    padded[0, :n] = request.prompt
    key = jax.random.key(p.seed)
    with sharding.activate(self.mesh):
      self._cache, token = _admit(self.model, self.params, self._cache, np.int32(slot), padded, np.int32(n), key,
                                  np.float32(p.temperature), np.int32(p.top_k), np.float32(p.top_p),
                                  filtered=p.filtered)
    self._keys = self._keys.at[slot].set(key)
    self._rows[slot] = request
    self._temperature[slot], self._top_k[slot], self._top_p[slot] = p.temperature, p.top_k, p.top_p
    self._position[slot], self._count[slot] = n, 1
    self.stats["admitted"] += 1
    self._take(slot, int(token))

  def _take(self, slot: int, token: int) -> None:
    """Hands `token` to the request in `slot`; frees the slot when the request is done."""
    request = self._rows[slot]
    request._emit(token)  # pylint: disable=protected-access
    self._last[slot] = token
    self.stats["tokens"] += 1
    reason = ("stop" if token in request.params.stop_ids else
              "length" if len(request.generated) >= request.params.max_tokens else
              "cancelled" if request.cancelled else None)
    if reason is not None:
      self._free(slot, reason)

  def _free(self, slot: int, reason: str) -> None:
    request = self._rows[slot]
    with self._cond:
      self._rows[slot] = None
    request._finish(reason)  # pylint: disable=protected-access
    self.stats["finished_" + reason] += 1

  def _step(self) -> None:
    for slot, request in enumerate(self._rows):
      if request is not None and request.cancelled:
        self._free(slot, "cancelled")
    occupied = [slot for slot, r in enumerate(self._rows) if r is not None]
    if not occupied:
      return
    rows = _bucket(occupied[-1] + 1, self._dp, self.slots)
    active = np.array([r is not None for r in self._rows[:rows]])
    filtered = any(self._rows[s].params.filtered for s in occupied)
    with sharding.activate(self.mesh):
      self._cache, new = _step(self.model, self.params, self._cache, self._last[:rows], self._position[:rows], active,
                               self._keys[:rows], self._count[:rows], self._temperature[:rows], self._top_k[:rows],
                               self._top_p[:rows], rows=rows, filtered=filtered)
    new = np.asarray(jax.device_get(new))
    self.stats["steps"] += 1
    self.stats["row_slots"] += rows
    for slot in occupied:
      self._position[slot] += 1
      self._count[slot] += 1
      self._take(slot, int(new[slot]))

