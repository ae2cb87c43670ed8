"""Continuous batching for serving: requests share a fixed set of batch slots of one key/value cache, join it
between decoding calls and leave it the call they finish.

A background thread runs the loop: admit queued requests into free slots (their prompts prefilled together, in
one call: `_admit`), launch `decode_steps` decoding steps for every occupied slot in one jitted loop (`_step`),
hand the previous call's tokens to their requests while this one runs, and repeat (when requests have just
finished, the launch waits up to half a call for their clients' next requests, which then join it). A request
that arrives while others are being decoded joins at the next call, without waiting for them to finish; one that
finishes (its stop token, its token budget, a cancel: a client that went away) frees its slot for the next in the
queue (one that ends with its budget, already for the call after the one it ends in, when requests are waiting).
Several steps per call share the host's work per call (and the waking of the clients' threads) among that many
tokens, and that work overlaps the device's: each slot's last token stays on the device, so a call can be
launched before the host has seen the one before.

The cache has one write index per row (`model.init_cache(per_row=True)`), so rows at different lengths decode
in one step. Prompts are right-padded for the prefill to one of a few lengths (16, 24, 32, 48, 64, ...: powers of
two and 1.5x of them), and the row's index is then set to the prompt's true length, so the padding costs no cache
room. A decoding call runs over the lowest slots only, a power of two of them covering every occupied one (slots
are filled lowest first), so a lone request costs a batch of one, not of all slots. The cache holds only as many
positions as the live rows need, one of 64, 96, 128, 192, ... (`Engine._fit`: grown when a call or a prompt needs
more, shrunk when a third of it or more has been unused for a few calls), so attention reads little more of it
than is live, and no call copies a window out of a longer cache and back. Each (batch, length) shape compiles
once; `warmup` compiles them all before the first request (for the default CPU model's 16 slots and context 256:
45 prefill, 175 cache insert, 20 resize and 25 step programs, 105 s on 2 CPU cores, where the whole-context cache
took 70 programs and 60 s).

Token i of a request is drawn with `fold_in(request_key(seed), i)` from its own row: what a request gets does
not depend on which others share the batch, and equals `decoding.generate` on that prompt alone with
`rng = request_key(seed)` (up to float rounding of near-tied logits: the two run different shapes).

`Pool` runs several engines side by side, each with its share of the slots and its own thread, and gives each
request to the least busy one: on a CPU host XLA runs one call largely on one core, so two engines' calls keep
two cores busy where one engine's batch of twice the rows does not (`default_streams`: 2 on a CPU host).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import os
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
_MIN_WINDOW = 64  # the smallest cache window a decoding step attends over
_SHRINK_AFTER = 4  # decoding calls in a row that need at most 2/3 of the cache before it is shrunk


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

  def chunks(self, timeout: float | None = None) -> Iterator[list[int]]:
    """The new tokens as they are decoded, in the engine's chunks (one per decoding call: up to its
    `decode_steps` tokens; the stop token included), until the request finishes.

    Raises:
      EngineClosed: the engine stopped before this request finished.
      TimeoutError: nothing new for `timeout` seconds.
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

  def tokens(self, timeout: float | None = None) -> Iterator[int]:
    """The new tokens one by one (see `chunks`)."""
    for chunk in self.chunks(timeout):
      yield from chunk

  def result(self, timeout: float | None = None) -> list[int]:
    """Every new token, once the request is done."""
    for _ in self.chunks(timeout):
      pass
    return list(self.generated)

  # Called by the engine's thread only.
  def _emit(self, tokens: list[int]) -> None:
    if self.first_token_at is None:
      self.first_token_at = time.monotonic()
    self.generated.extend(tokens)
    self._events.put(tokens)

  def _finish(self, reason: str, error: str = "") -> None:
    self.finish_reason, self.error = reason, error
    self._events.put(_DONE)


def _bucket(n: int, smallest: int, largest: int) -> int:
  """The smallest `smallest * 2^k` >= n, capped at `largest`."""
  size = smallest
  while size < n:
    size *= 2
  return min(size, largest)


def request_key(seed: Any) -> jax.Array:
  """The PRNG key of a request's seed (0 <= seed < 2**63, or its two uint32 halves [..., 2] as (low, high)):
  key(seed) for seeds below 2**32, else key(low) folded with high (jax.random.key keeps only 32 bits)."""
  if isinstance(seed, int):
    seed = np.array([seed & 0xFFFFFFFF, seed >> 32], np.uint32)
  if seed.ndim > 1:
    return jax.vmap(request_key)(seed)
  key = jax.random.key(seed[0])
  return jax.lax.select(seed[1] > 0, jax.random.fold_in(key, seed[1]), key)


@functools.partial(jax.jit, static_argnames=("model", "filtered"))
def _prefill(model: Any, params: Any, tokens_AxP: jax.Array, lengths_A: jax.Array, seeds_Ax2: jax.Array,
             temperature_A: jax.Array, top_k_A: jax.Array, top_p_A: jax.Array, *,
             filtered: bool) -> tuple[Any, jax.Array, jax.Array]:
  """Prefills A right-padded prompts (row a's first lengths[a] tokens are real) into a cache of their own [A, ...,
  P]; returns it, the requests' keys and each one's first new token [A] (drawn with fold_in(key, 0))."""
  a, p = tokens_AxP.shape
  positions_AxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (a, p))
  logits_Ax1xV, variables = model.apply(
      {"params": params, "cache": model_lib.init_cache(model, a, p, per_row=True)}, tokens_AxP,
      positions_BxT=positions_AxP, attention_mask_BxT=positions_AxP < lengths_A[:, None], decode=True,
      mutable=["cache"], logits_at_B=lengths_A - 1)
  logits_AxV = logits_Ax1xV[:, 0]
  keys_A = request_key(seeds_Ax2)
  token_A = decoding.sample_rows(logits_AxV, keys_A, jnp.zeros((a,), jnp.int32), temperature_A, top_k_A, top_p_A,
                                 filtered=filtered)
  return variables["cache"], keys_A, token_A


@functools.partial(jax.jit, donate_argnames=("cache", "keys_B", "last_B"))
def _insert(cache: Any, keys_B: jax.Array, last_B: jax.Array, prefilled: Any, slots_A: jax.Array,
            lengths_A: jax.Array, keys_A: jax.Array, token_A: jax.Array) -> tuple[Any, jax.Array, jax.Array]:
  """Writes `_prefill`'s cache rows into rows `slots_A` of `cache` (repeated entries must repeat their data: the
  batch's padding) and sets those rows' keys and last tokens (their first new token, what the next decoding call
  feeds them). Returns the cache, the keys and every slot's last token [B]."""
  a = token_A.shape[0]

  def insert(path, big, small):
    name = path[-1].key
    if name == "index":  # each row continues after its real tokens: its padding's slots get overwritten
      return big.at[slots_A].set(lengths_A)
    if name == "cached_valid":  # nothing of the slot's previous request stays attendable
      return big.at[slots_A].set(jnp.zeros((a, big.shape[1]), jnp.bool_).at[:, :small.shape[1]].set(small))
    # The whole row, zeros past the prompt: masked slots still meet the values (weight 0 times a value), so
    # nothing the slot held before may linger there.
    return big.at[slots_A].set(jnp.zeros((a,) + big.shape[1:], big.dtype).at[:, :, :small.shape[2]].set(small))
  cache = jax.tree_util.tree_map_with_path(insert, cache, prefilled)
  return cache, keys_B.at[slots_A].set(keys_A), last_B.at[slots_A].set(token_A)


@functools.partial(jax.jit, static_argnames=("length",))
def _resize(cache: Any, *, length: int) -> Any:
  """The per-row cache with `length` positions: its first ones kept, new ones empty (zeros, not attendable)."""
  def fit(path, c):
    if path[-1].key == "index":
      return c
    axis = 1 if path[-1].key == "cached_valid" else 2
    if length <= c.shape[axis]:
      return jax.lax.slice_in_dim(c, 0, length, axis=axis)
    return jnp.pad(c, [(0, length - c.shape[axis]) if i == axis else (0, 0) for i in range(c.ndim)])
  return jax.tree_util.tree_map_with_path(fit, cache)


def _rows(cache: Any, rows: int) -> Any:
  """The first `rows` rows of a per-row cache."""
  return jax.tree.map(lambda c: c[:rows], cache)


@functools.partial(jax.jit, static_argnames=("model", "rows", "steps", "filtered"),
                   donate_argnames=("cache", "last_B"))
def _step(model: Any, params: Any, cache: Any, last_B: jax.Array, positions_B: jax.Array, active_B: jax.Array,
          keys_B: jax.Array, counts_B: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array,
          *, rows: int, steps: int, filtered: bool) -> tuple[Any, jax.Array, jax.Array]:
  """`steps` decoding steps over the first `rows` slots of the cache (every active row's writes fall inside its
  length, which the engine keeps near what is live: `Engine._fit`): each step feeds every row's last token
  (written to the cache only where active) and draws its next one with fold_in(key, count). Returns the cache,
  every slot's last token [B] (what the next call feeds) and the new tokens [rows, steps]. Rows keep going after
  their stop token within the call; the host drops those tokens (the row is freed, and its cache row rewritten
  when the slot is reused). `last_B` stays on the device: the next call is launched before the host has seen
  this one's tokens."""
  def body(i, carry):
    sub, last_B, out_BxN = carry
    # A row past its budget within the call may run past the context: it is masked, and kept at the last
    # position (a position beyond the embedding's would make NaNs in its row of the cache).
    position_B = positions_B + i
    logits_Bx1xV, variables = model.apply(
        {"params": params, "cache": sub}, last_B[:, None],
        positions_BxT=jnp.minimum(position_B, model.config.max_len - 1)[:, None],
        attention_mask_BxT=(active_B & (position_B < model.config.max_len))[:, None], decode=True,
        mutable=["cache"])
    new_B = decoding.sample_rows(logits_Bx1xV[:, 0], keys_B, counts_B + i, temperature_B, top_k_B, top_p_B,
                                 filtered=filtered)
    return variables["cache"], new_B, jax.lax.dynamic_update_index_in_dim(out_BxN, new_B, i, axis=1)

  sub, last_b, out_BxN = jax.lax.fori_loop(0, steps, body, (_rows(cache, rows), last_B[:rows],
                                                            jnp.zeros((rows, steps), jnp.int32)))
  cache = jax.tree.map(lambda c, w: jax.lax.dynamic_update_slice(c, w, (0,) * c.ndim), cache, sub)
  return cache, jax.lax.dynamic_update_slice(last_B, last_b, (0,)), out_BxN


def _buckets(smallest: int, largest: int) -> list[int]:
  """Every value `_bucket` can return for these bounds."""
  out = [min(smallest, largest)]
  while out[-1] < largest:
    out.append(min(2 * out[-1], largest))
  return out


def _lengths(smallest: int, largest: int) -> list[int]:
  """The padded lengths of prompts (smallest 16) and the cache windows of decoding calls (smallest 64): powers of
  two times `smallest` and the points 1.5x of them (16, 24, 32, 48, 64, ...), capped at `largest`, so a prompt's
  padding or a window's unused room is at most a third of what is live."""
  out = []
  size = smallest
  while not out or out[-1] < largest:
    out += [min(size, largest)] + ([size * 3 // 2] if size * 3 // 2 < largest else [])
    size *= 2
  return sorted(set(out))


def _length_for(n: int, smallest: int, largest: int) -> int:
  """The smallest of `_lengths(smallest, largest)` >= n (or `largest`)."""
  return next((w for w in _lengths(smallest, largest) if w >= n), largest)


@dataclasses.dataclass
class _Call:
  """A launched device call: its new tokens (on the device), the (row, slot, request) it serves, and for a
  decoding call its (rows, cache length) and when it was launched."""
  new: jax.Array
  decoded: list[tuple[int, int, Request]]
  shape: tuple[int, int] | None = None
  launched_at: float = 0.0


class Engine:
  """Serves generation requests for one GPT with continuous batching (see the module docstring).

  Args:
    model, params: a `gptrl.model.GPT` and its parameters (laid out on `mesh`).
    slots: requests decoded at once (rounded up to a multiple of the mesh's data-parallel size).
    max_queue: requests waiting for a slot beyond which `submit` raises QueueFull.
    mesh: the device mesh the model runs on (default: the first device).
    decode_steps: tokens decoded per call into the device (one jitted loop): the host's work per call (and the
      waking of the clients' threads) is shared by that many tokens. Requests join and leave between calls, and
      a request that ends inside one costs the rest of the call's steps in its row.
    warmup: compile, before serving, the prefill of every prompt-length bucket, its insert into and the step of
      every row count over every cache length, and every resize (without top-k/top-p; those compile on first
      use), so that no request waits for a compilation.
  """

  def __init__(self, model: Any, params: Any, *, slots: int = 16, max_queue: int = 256,
               mesh: jax.sharding.Mesh | None = None, decode_steps: int = 8, warmup: bool = False):
    self.model, self.params = model, params
    self.decode_steps = max(1, decode_steps)
    self.mesh = mesh or sharding.make_mesh(config_lib.MeshConfig(), jax.devices()[:1])
    self._dp = sharding.data_parallel_size(self.mesh)
    self.slots = -(-max(1, slots) // self._dp) * self._dp
    self.context = model.config.max_len
    self.max_queue = max_queue
    with sharding.activate(self.mesh):  # made by jit, as every later value of them is: no recompile on first use
      # The cache holds as many positions as the calls need (`_fit`), not the whole context: attention reads it all.
      self._length = _lengths(_MIN_WINDOW, self.context)[0]
      self._shorter_calls = 0  # decoding calls in a row that needed at most 2/3 of the cache (`_fit`)
      self._cache = jax.jit(lambda: model_lib.init_cache(model, self.slots, self._length, per_row=True))()
      self._keys = jax.jit(lambda: jax.random.split(jax.random.key(0), self.slots))()
      self._last = jax.jit(lambda: jnp.zeros((self.slots,), jnp.int32))()  # each slot's last token, on the device
    self._rows: list[Request | None] = [None] * self.slots
    b = self.slots
    self._position = np.zeros(b, np.int32)
    self._count = np.zeros(b, np.int32)
    self._temperature = np.ones(b, np.float32)
    self._top_k = np.zeros(b, np.int32)
    self._top_p = np.ones(b, np.float32)
    self._queue: collections.deque[Request] = collections.deque()
    self._admitting: list[tuple[int, Request]] = []  # taken off the queue, not yet in a slot
    self._cond = threading.Condition()
    self._returning = 0  # requests finished whose clients may send their next one soon (see `_await_returning`)
    self._call_s: dict[tuple[int, int], float] = {}  # device seconds of a decoding call, per (rows, length)
    self._device_free_at = 0.0  # when the device last finished a call, as far as the host saw
    self._closed = False
    self._error = ""
    self.stats = collections.Counter()
    if warmup:
      self._warmup()
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
      if len(self._queue) >= self.max_queue:  # requests cancelled while waiting do not count
        for r in [r for r in self._queue if r.cancelled]:
          self._queue.remove(r)
          r._finish("cancelled")  # pylint: disable=protected-access
      if len(self._queue) >= self.max_queue:
        self.stats["rejected"] += 1
        raise QueueFull(f"{len(self._queue)} requests are waiting already (--max_queue {self.max_queue})")
      self._queue.append(request)
      self._returning = max(0, self._returning - 1)
      self._cond.notify_all()
    return request

  def load(self) -> dict[str, Any]:
    """Occupied slots, queued requests, the slots in all, requests cancelled so far (clients gone), and why the
    engine stopped ("" while it runs)."""
    with self._cond:
      # (Requests being admitted count as active: taken off the queue, their slots not yet set.)
      active = {id(r) for r in self._rows if r is not None} | {id(r) for _, r in self._admitting}
      return {"active": len(active), "queued": len(self._queue), "slots": self.slots,
              "cancelled": self.stats["finished_cancelled"], "error": self._error if self._closed else ""}

  def close(self, wait: bool = True) -> None:
    """Stops the loop; unfinished requests end with EngineClosed. `wait=False` only tells the loop to stop."""
    with self._cond:
      self._closed = True
      self._cond.notify_all()
    if wait:
      self._thread.join(timeout=60)

  def _warmup(self) -> None:
    start = time.monotonic()
    compiled = 0
    lengths = _lengths(_MIN_WINDOW, self.context)
    with sharding.activate(self.mesh):
      for length in lengths:
        for other in lengths:  # every resize, from and to every length
          if other != length:
            _resize(_resize(self._cache, length=other), length=length)
            compiled += 1
        self._cache = _resize(self._cache, length=length)
        for a in _buckets(1, self.slots):
          for p in [p for p in _lengths(_MIN_PREFILL, self.context) if p <= length]:
            ones = np.ones(a, np.int32)
            prefilled, keys, first = _prefill(
                self.model, self.params, np.zeros((a, p), np.int32), ones, np.zeros((a, 2), np.uint32),
                ones.astype(np.float32), 0 * ones, ones.astype(np.float32), filtered=False)
            self._cache, self._keys, self._last = _insert(self._cache, self._keys, self._last, prefilled,
                                                          np.zeros(a, np.int32), ones, keys, first)
            compiled += 1 + (length == lengths[0] or p > lengths[lengths.index(length) - 1])  # (a new prefill)
        for rows in _buckets(self._dp, self.slots):
          # Idle rows: their writes are masked, and overwritten when a request is admitted.
          self._cache, self._last, new = _step(
              self.model, self.params, self._cache, self._last, self._position[:rows], np.zeros(rows, bool),
              self._keys[:rows], self._count[:rows], self._temperature[:rows], self._top_k[:rows],
              self._top_p[:rows], rows=rows, steps=self.decode_steps, filtered=False)
          compiled += 1
      self._cache = _resize(self._cache, length=lengths[0])
      self._length = lengths[0]
    jax.block_until_ready(new)
    logging.info("Compiled %d prefill, cache insert, cache resize and step programs in %.1f s.", compiled,
                 time.monotonic() - start)

  # -- the engine's thread ------------------------------------------------------------------------
  #
  # The loop launches the next device call before it hands out the last one's tokens: the host's work (the
  # clients' tokens, their threads woken, the next call's settings) overlaps the device's. The host's view of the
  # slots is thus one call behind: a request that ended at a stop token in the call in flight is decoded for one
  # more call (its tokens dropped: `_collect` hands a call's tokens only to the requests it was launched for, and
  # only until they end), and its slot is reused a call later. A request whose budget ends in the call in flight
  # is known to end: when more requests wait than slots are free, its slot goes to the next of them at once (the
  # prefill is queued on the device after the call in flight, which still reads and writes the old row), so
  # under a queue no slot idles for a call. When requests have just finished, the next launch waits (at most half
  # a call) for their clients' next requests, so that these join the next call (`_await_returning`).

  def _loop(self) -> None:
    in_flight = None  # the launched decoding call whose tokens the host has not taken yet
    try:
      while True:
        with self._cond:
          self._cond.wait_for(lambda: self._closed or self._queue or in_flight is not None
                              or any(r is not None for r in self._rows))
          if in_flight is not None:
            self._await_returning(in_flight)
          if self._closed:
            break
          admitted = self._admitting = []
          # Free slots, then those whose request has all its tokens in the call in flight (see above).
          free = itertools.chain(
              (slot for slot in range(self.slots) if self._rows[slot] is None),
              (slot for slot, r in enumerate(self._rows) if r is not None and self._launched_all(slot)))
          while self._queue and (slot := next(free, None)) is not None:
            request = self._queue.popleft()
            if request.cancelled:  # never started: nothing to free
              request._finish("cancelled")  # pylint: disable=protected-access
              free = itertools.chain([slot], free)
            else:
              admitted.append((slot, request))
        first = self._admit(admitted)
        with self._cond:
          self._admitting = []
        launched = self._launch()
        if in_flight is not None:
          self._collect(in_flight)
        if first is not None:
          self._collect(_Call(first, [(i, slot, request) for i, (slot, request) in enumerate(admitted)]))
        in_flight = launched
      reason = "the engine was closed"
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("the serving engine stopped")
      reason = f"the serving engine failed: {type(e).__name__}: {e}"
    with self._cond:
      self._closed, self._error = True, reason
      # (Requests whose slot went to another while their last call was in flight are only in that call.)
      pending = ([r for r in self._rows if r is not None] + [r for _, r in self._admitting] + list(self._queue)
                 + ([r for _, _, r in in_flight.decoded] if in_flight is not None else []))
      self._rows, self._queue = [None] * self.slots, collections.deque()
    for request in {id(r): r for r in pending if r.finish_reason is None}.values():
      request._finish("error", reason)  # pylint: disable=protected-access

  def _await_returning(self, in_flight: _Call) -> None:
    """Holds the next launch back (the caller's lock is released while waiting) until the clients whose requests
    just finished have sent their next ones, or until half the device time expected of the call in flight has
    passed (the next call is then launched well before the device runs out of work).

    In a closed loop a client sends its next request once it has the last one's tokens. Launching the next call as
    soon as the host has handed those out (before the client could answer) would leave each finished request's
    slot idle for that call too: two calls per request, where one is the least (the call in flight was launched
    before the request's end was seen)."""
    expected = self._call_s.get(in_flight.shape) if in_flight.shape else None
    if not expected or not self._returning or all(r is not None for r in self._rows):
      return
    timeout = max(in_flight.launched_at, self._device_free_at) + expected / 2 - time.monotonic()
    if timeout > 0:
      waited = time.monotonic()
      self._cond.wait_for(lambda: self._closed or not self._returning, timeout=timeout)
      self.stats["holds"] += 1
      self.stats["held_s"] += time.monotonic() - waited
    self._returning = 0  # whoever did not answer in time joins a later call, as any new client does

  def _admit(self, admitted: list[tuple[int, Request]]) -> jax.Array | None:
    """Launches the prefill of the `admitted` requests into their slots, in one call (padded to a power-of-two
    batch); returns their first tokens [A, 1] (on the device), or None when there are none."""
    if not admitted:
      return None
    a = _bucket(len(admitted), 1, self.slots)
    rows = admitted + [admitted[0]] * (a - len(admitted))  # padding: the first one again (same slot, same data)
    p = _length_for(max(len(r.prompt) for _, r in rows), _MIN_PREFILL, self.context)
    tokens = np.zeros((a, p), np.int32)
    for i, (_, r) in enumerate(rows):
      tokens[i, :len(r.prompt)] = r.prompt
    seeds = np.array([[r.params.seed & 0xFFFFFFFF, r.params.seed >> 32] for _, r in rows], np.uint32)
    settings = [r.params for _, r in rows]
    lengths = np.array([len(r.prompt) for _, r in rows], np.int32)
    self._fit(p, shrink=False)
    with sharding.activate(self.mesh):
      prefilled, keys, first = _prefill(
          self.model, self.params, tokens, lengths, seeds, np.array([q.temperature for q in settings], np.float32),
          np.array([q.top_k for q in settings], np.int32), np.array([q.top_p for q in settings], np.float32),
          filtered=any(q.filtered for q in settings))
      self._cache, self._keys, self._last = _insert(self._cache, self._keys, self._last, prefilled,
                                                    np.array([slot for slot, _ in rows], np.int32), lengths, keys,
                                                    first)
    for slot, request in admitted:
      q = request.params
      with self._cond:
        self._rows[slot] = request
      self._temperature[slot], self._top_k[slot], self._top_p[slot] = q.temperature, q.top_k, q.top_p
      self._position[slot], self._count[slot] = len(request.prompt), 1
      self.stats["admitted"] += 1
    return first[:, None]

  def _launch(self) -> _Call | None:
    """Launches `decode_steps` steps of every slot that may still need tokens; returns the call (its new tokens
    [rows, steps] on the device and the (row, slot, request) it decodes), or None when none needs any."""
    for slot, request in enumerate(self._rows):
      if request is not None and request.cancelled:
        self._free(slot, "cancelled")
    # Slots whose request has all its tokens in calls launched already are left out (they end when those
    # are collected); a request that stopped at a stop token in the call in flight is not known to yet.
    decoding_ = [(slot, r) for slot, r in enumerate(self._rows)
                 if r is not None and not self._launched_all(slot)]
    if not decoding_:
      return None
    rows = _bucket(decoding_[-1][0] + 1, self._dp, self.slots)
    self._fit(max(self._position[s] for s, _ in decoding_) + self.decode_steps, shrink=True)
    active = np.zeros(rows, bool)
    active[[s for s, _ in decoding_]] = True
    filtered = any(r.params.filtered for _, r in decoding_)
    # Copies: the host arrays change before the launched call may have read them (on CPU, jax can use a NumPy
    # array's memory without copying it).
    host = [x[:rows].copy() for x in (self._position, self._count, self._temperature, self._top_k, self._top_p)]
    with sharding.activate(self.mesh):
      self._cache, self._last, new = _step(
          self.model, self.params, self._cache, self._last, host[0], active, self._keys[:rows], *host[1:],
          rows=rows, steps=self.decode_steps, filtered=filtered)
    self.stats["steps"] += self.decode_steps
    self.stats["row_slots"] += rows * self.decode_steps
    for slot, _ in decoding_:
      self._position[slot] += self.decode_steps
      self._count[slot] += self.decode_steps
    return _Call(new, [(slot, slot, r) for slot, r in decoding_], (rows, self._length), time.monotonic())

  def _launched_all(self, slot: int) -> bool:
    """Whether the request in `slot` has all its tokens in calls launched already (by its budget)."""
    return self._count[slot] >= self._rows[slot].params.max_tokens

  def _fit(self, needed: int, *, shrink: bool) -> None:
    """Gives the cache the window length (64, 96, 128, 192, ...) that covers `needed` positions when it is
    shorter, or, with `shrink`, when that length has been at most 2/3 of its own for `_SHRINK_AFTER` calls in a
    row (a resize copies the cache: not for one length less, nor between one request and the next of a client).
    Attention reads the whole cache, so it stays near what is live; and it keeps its length between calls, so a
    call copies no window out of a longer cache and back (0.7 of 4.1 ms per step of 16 rows at 8 steps per call)."""
    target = _length_for(needed, _MIN_WINDOW, self.context)
    if shrink:
      self._shorter_calls = self._shorter_calls + 1 if 3 * target <= 2 * self._length else 0
    if target > self._length or self._shorter_calls >= _SHRINK_AFTER:
      self._shorter_calls = 0
      with sharding.activate(self.mesh):
        self._cache = _resize(self._cache, length=target)
      self._length = target
      self.stats["resizes"] += 1

  def _collect(self, call: _Call) -> None:
    """Waits for a launched call's tokens [rows, n] and hands row `row`'s to `request` (from `slot`), unless it
    has ended since the call was launched (a stop token, a cancel; its slot may be another's by now). Learns how long a
    decoding call of its shape takes on the device, when the host had to wait for it (it ended just then)."""
    start = time.monotonic()
    new = np.asarray(jax.device_get(call.new))
    done = time.monotonic()
    if done - start > 5e-4:  # the host waited: the device finished about now
      if call.shape:
        seconds = done - max(call.launched_at, self._device_free_at)
        known = self._call_s.get(call.shape)
        self._call_s[call.shape] = seconds if known is None else 0.8 * known + 0.2 * seconds
      self._device_free_at = done
    else:  # it finished earlier: `start` bounds that, and the next call's duration is not overestimated
      self._device_free_at = start
    for row, slot, request in call.decoded:
      if request.finish_reason is None:
        self._take(request, slot, new[row])

  def _take(self, request: Request, slot: int, tokens: Sequence[int]) -> None:
    """Hands the new `tokens` to `request` (decoded in `slot`), up to where it ends (its stop token, its
    budget); frees the slot, unless it was given to another already, when it is done."""
    p = request.params
    budget = p.max_tokens - len(request.generated)
    taken, reason = [], None
    for token in tokens[:budget]:
      taken.append(int(token))
      if taken[-1] in p.stop_ids:
        reason = "stop"
        break
    if reason is None and len(taken) == budget:
      reason = "length"
    elif reason is None and request.cancelled:
      reason = "cancelled"
    request._emit(taken)  # pylint: disable=protected-access
    self.stats["tokens"] += len(taken)
    if reason is not None:
      self._free(slot, reason, request)

  def _free(self, slot: int, reason: str, request: Request | None = None) -> None:
    """Ends `request` (default: the one in `slot`) and frees the slot if it still holds it."""
    request = request or self._rows[slot]
    with self._cond:
      if self._rows[slot] is request:
        self._rows[slot] = None
      if reason != "cancelled" and not request.cancelled:  # (a client that went away sends nothing more)
        self._returning = min(self.slots, self._returning + 1)
    request._finish(reason)  # pylint: disable=protected-access
    self.stats["finished_" + reason] += 1


def _cores() -> int:
  """The cores this process may run on (its affinity, where the OS tells it)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # (not on every OS)
    return os.cpu_count() or 1


def max_streams(slots: int, mesh: jax.sharding.Mesh | None = None) -> int:
  """The most engines `slots` slots make: each engine's slots are a multiple of the data-parallel size."""
  return max(1, slots // (sharding.data_parallel_size(mesh) if mesh is not None else 1))


def default_streams(slots: int, mesh: jax.sharding.Mesh | None = None) -> int:
  """How many engines `Pool` runs when not told: 2 on a CPU host with 2 or more cores and slots for 2 batches
  of the mesh's data-parallel size, else 1.

  XLA:CPU runs one call largely on one core (a 16-row decoding call of the default CPU model keeps 1.3 of 2 cores
  busy), while two calls launched from two threads run side by side: two 8-row calls took 20 ms together where one
  16-row call took 35-38 ms (2 cores). On an accelerator one engine's batch is what keeps the device busy."""
  devices = mesh.devices.flat if mesh is not None else jax.devices()[:1]
  cpu = all(d.platform == "cpu" for d in devices)
  return 2 if cpu and _cores() >= 2 and max_streams(slots, mesh) >= 2 else 1


class Pool:
  """`streams` engines (`Engine`), each with its share of the slots, its own cache and its own thread, serving
  one stream of requests: a request goes to the engine with the fewest requests (decoding and waiting), so that
  the engines' decoding calls run side by side (on a CPU host, on different cores; see `default_streams`).

  It offers `Engine`'s interface (submit, load, close, stats, slots, max_queue). A request is decoded in one
  engine from its start to its end, and what it gets does not depend on which (nor on the others in its batch).
  """

  def __init__(self, model: Any, params: Any, *, streams: int = 0, slots: int = 16, max_queue: int = 256,
               mesh: jax.sharding.Mesh | None = None, decode_steps: int = 8, warmup: bool = False):
    streams = streams or default_streams(slots, mesh)
    if not 1 <= streams <= max_streams(slots, mesh):
      raise ValueError(f"streams must be in [1, {max_streams(slots, mesh)}] for {slots} slots (each engine's slots "
                       f"a multiple of the data-parallel size), got {streams}")
    share = [slots // streams + (i < slots % streams) for i in range(streams)]
    # Each engine queues at least one request: requests reach its slots through its queue.
    queue_share = [max(1, max_queue // streams + (i < max_queue % streams)) for i in range(streams)]
    self.engines: list[Engine] = []
    try:
      for s, q in zip(share, queue_share):
        self.engines.append(Engine(model, params, slots=s, max_queue=q, mesh=mesh, decode_steps=decode_steps,
                                   warmup=warmup))
    except BaseException:
      self.close()
      raise
    self.slots = sum(e.slots for e in self.engines)
    self.max_queue = max_queue

  @property
  def stats(self) -> collections.Counter:
    """The engines' counters, summed."""
    return sum((collections.Counter(dict(e.stats)) for e in self.engines), collections.Counter())

  def submit(self, prompt: Sequence[int], params: SamplingParams) -> Request:
    """Queues a request in the least busy engine (see `Engine.submit`; QueueFull only when every queue is)."""
    if len(self.engines) == 1:
      return self.engines[0].submit(prompt, params)
    loads = [e.load() for e in self.engines]
    failed = next((load["error"] for load in loads if load["error"]), "")
    if failed:  # one engine's failure (a device lost) ends the pool's service, as it ends an engine's
      raise EngineClosed(failed)
    loads = [(load["active"] + load["queued"], i) for i, load in enumerate(loads)]
    for _, i in sorted(loads):
      try:
        return self.engines[i].submit(prompt, params)
      except QueueFull:
        continue
    raise QueueFull(f"{self.max_queue} requests are waiting already (--max_queue {self.max_queue})")

  def load(self) -> dict[str, Any]:
    """`Engine.load` over the engines: counts summed, the first error."""
    loads = [e.load() for e in self.engines]
    out = {key: sum(load[key] for load in loads) for key in ("active", "queued", "slots", "cancelled")}
    out["error"] = next((load["error"] for load in loads if load["error"]), "")
    return out

  def close(self) -> None:
    """Stops every engine's loop; unfinished requests end with EngineClosed."""
    for e in self.engines:  # every loop told first, so that they wind down together
      e.close(wait=False)
    for e in self.engines:
      e.close()
