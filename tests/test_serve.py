"""Serving (`python -m gptrl.serve`): the continuous-batching engine against a no-cache reference, the OpenAI-style
API's checks (each bad request a 400 naming its field), access (token, Host), feedback stored in the stages'
formats with provenance, and a real server driven by the `openai` client: chat, streaming, n > 1, best-of-n with a
reward model, a client that drops mid-stream, and kill -9 while feedback arrives.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import re
import signal
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest
from flax import linen as nn

from gptrl import chat_data
from gptrl import config as config_lib
from gptrl import decoding
from gptrl import engine as engine_lib
from gptrl import feedback as feedback_lib
from gptrl import model as model_lib
from gptrl import serve
from helpers import ServerProcess, make_tiny_checkpoint

_TEXTS = ["Where does the king walk at dawn? The king walks to the market before dawn.",
          "What does the sailor carry? A silver cup, seven stones and nothing but his name.",
          "Who speaks with the merchant? Our neighbour, after supper, and a clever fox."] * 20


def _random_gpt(max_len: int = 64, vocab: int = 64, seed: int = 0):
  cfg = config_lib.ModelConfig(vocab_size=vocab, num_layers=2, num_heads=2, d_model=32, max_len=max_len)
  model = model_lib.GPT(cfg)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, max_len), np.int32)))
  rng = np.random.default_rng(seed)
  return model, jax.tree.map(lambda s: rng.normal(0.0, 0.5, s.shape).astype(s.dtype), shapes["params"])


# ----------------------------------------------------------------------------------------------
# The engine.


def _reference(model, params, prompt, p: engine_lib.SamplingParams) -> list[int]:
  """The request alone through the full-recompute sampler (no cache, no slots), stopped at its first stop id."""
  out = decoding.generate(model, params, [prompt], max_new_tokens=p.max_tokens, rng=engine_lib.request_key(p.seed),
                          temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, use_cache=False)[0]
  for i, t in enumerate(out):
    if t in p.stop_ids:
      return out[:i + 1]
  return out


def test_requests_joining_a_running_batch_get_what_they_would_get_alone():
  model, params = _random_gpt()
  engine = engine_lib.Engine(model, params, slots=3)
  rng = np.random.default_rng(1)
  settings = [(1.0, 0, 1.0), (0.0, 0, 1.0), (0.8, 5, 1.0), (1.0, 0, 0.9), (1.3, 3, 0.8), (0.7, 0, 1.0),
              (1.0, 0, 1.0), (0.0, 0, 1.0)]
  jobs = []
  try:
    for i, (temperature, top_k, top_p) in enumerate(settings):
      prompt = [int(t) for t in rng.integers(1, 64, size=int(rng.integers(1, 40)))]
      params_i = engine_lib.SamplingParams(max_tokens=int(rng.integers(3, 64 - len(prompt) + 1)),
                                           temperature=temperature,
                                           top_k=top_k, top_p=top_p, seed=int(rng.integers(0, 2 ** 62)),
                                           stop_ids=(7, 11))
      jobs.append((prompt, params_i, engine.submit(prompt, params_i)))
      if i % 3 == 1:  # later requests arrive while earlier ones are being decoded, and wait for a free slot
        next(iter(jobs[-1][2].tokens(timeout=120)))
    for prompt, p, request in jobs:
      got = request.result(timeout=120)
      assert got == _reference(model, params, prompt, p), (prompt, p)
      assert request.finish_reason == ("stop" if got[-1] in p.stop_ids else "length")
    assert engine.stats["admitted"] == len(settings) and engine.load()["active"] == 0
    assert engine.stats["row_slots"] < 3 * engine.stats["steps"]  # steps ran over fewer rows when fewer were busy
  finally:
    engine.close()


def test_a_slot_reused_after_a_request_that_ran_to_the_end_of_the_context_keeps_nothing_of_it():
  # The first request's last decoding call runs its row past the context (8 steps, 2 of them needed); the next
  # request in the same slot is short, so its window covers the whole row, stale slots included.
  model, params = _random_gpt()
  engine = engine_lib.Engine(model, params, slots=1, decode_steps=8)
  try:
    long = engine_lib.SamplingParams(max_tokens=27, seed=3)
    assert len(engine.submit(list(range(1, 35)), long).result(timeout=120)) == 27
    for prompt, seed in (([31], 7), ([5, 6], 8)):
      p = engine_lib.SamplingParams(max_tokens=20, seed=seed)
      assert engine.submit(prompt, p).result(timeout=120) == _reference(model, params, prompt, p)
  finally:
    engine.close()


def test_the_cache_grows_and_shrinks_with_what_the_live_requests_need():
  # Context 256: the cache holds 64, 96, 128, 192 or 256 positions. A long prompt (100 tokens, 60 new) grows it
  # while a short request decodes beside it; once only short ones are left for a few calls, it shrinks back.
  model, params = _random_gpt(max_len=256)
  engine = engine_lib.Engine(model, params, slots=2, decode_steps=4)
  lengths = []
  fit = engine._fit  # pylint: disable=protected-access

  def recording_fit(needed, *, shrink):
    fit(needed, shrink=shrink)
    lengths.append(engine._length)  # pylint: disable=protected-access
  engine._fit = recording_fit  # pylint: disable=protected-access
  rng = np.random.default_rng(4)
  try:
    short = engine_lib.SamplingParams(max_tokens=10, seed=1)
    assert engine.submit([5, 6, 7], short).result(timeout=120) == _reference(model, params, [5, 6, 7], short)
    assert set(lengths) == {64}
    long_prompt = [int(t) for t in rng.integers(1, 64, size=100)]
    long = engine_lib.SamplingParams(max_tokens=60, seed=2)
    long_request = engine.submit(long_prompt, long)
    beside = [(prompt, p, engine.submit(prompt, p)) for prompt, p in
              [([9, 8], engine_lib.SamplingParams(max_tokens=30, seed=3, temperature=0.7))]]
    assert long_request.result(timeout=120) == _reference(model, params, long_prompt, long)
    for prompt, p, request in beside:
      assert request.result(timeout=120) == _reference(model, params, prompt, p)
    assert {128, 192} <= set(lengths) and 256 not in lengths  # 100 + 60 tokens: the prompt's 128, then 192
    # Shrunk once four calls in a row needed at most 2/3 of it (not between one request and the next)
    after = engine_lib.SamplingParams(max_tokens=12, seed=4)
    assert engine.submit([3, 1], after).result(timeout=120) == _reference(model, params, [3, 1], after)
    assert lengths[-1] == 192
    after = engine_lib.SamplingParams(max_tokens=24, seed=5)
    assert engine.submit([3, 2], after).result(timeout=120) == _reference(model, params, [3, 2], after)
    assert lengths[-1] == 64 and engine.stats["resizes"] == 3, (lengths, engine.stats)
  finally:
    engine.close()


def test_the_next_call_is_launched_before_the_last_ones_tokens_are_handed_out_and_ended_requests_lose_nothing():
  # Requests that end inside a call (a budget of 1..9 tokens at 4 steps per call, stop ids) and new ones that
  # take their slots while a call for the old ones is still in flight.
  model, params = _random_gpt()
  engine = engine_lib.Engine(model, params, slots=2, decode_steps=4)
  rng = np.random.default_rng(5)
  try:
    jobs = []
    for i in range(12):
      prompt = [int(t) for t in rng.integers(1, 64, size=int(rng.integers(1, 20)))]
      p = engine_lib.SamplingParams(max_tokens=1 + i % 9, temperature=1.0, seed=100 + i, stop_ids=(7,))
      jobs.append((prompt, p, engine.submit(prompt, p)))
    for prompt, p, request in jobs:
      assert request.result(timeout=120) == _reference(model, params, prompt, p), (prompt, p)
    assert engine.load()["active"] == 0 and engine.stats["admitted"] == 12
  finally:
    engine.close()


def test_under_a_queue_a_slot_whose_budget_ends_in_the_call_in_flight_takes_the_next_request_at_once():
  # One long request in slot 0; twenty short ones queued (each: the prefill's token and one call of four). Each
  # short one's slot goes to the next in the queue while its last call is still in flight, so one ends per
  # call; waiting until the host has seen the end left the slot idle for a call (one per two calls: 7 of them
  # in the long one's 15 calls).
  model, params = _random_gpt()
  engine = engine_lib.Engine(model, params, slots=2, decode_steps=4)
  ended_at = {}  # request -> decoding steps launched when the engine ended it
  free = engine._free  # pylint: disable=protected-access

  def recording_free(slot, reason, request=None):
    ended_at[id(request or engine._rows[slot])] = engine.stats["steps"]  # pylint: disable=protected-access
    free(slot, reason, request)
  engine._free = recording_free  # pylint: disable=protected-access
  try:
    background = engine_lib.SamplingParams(max_tokens=60, seed=1)
    long_request = engine.submit([3, 4, 5], background)
    next(iter(long_request.tokens(timeout=120)))
    shorts = []
    for i in range(20):
      prompt, p = [1 + i, 2, 3], engine_lib.SamplingParams(max_tokens=5, seed=10 + i, temperature=0.0 if i % 3 else 1.0)
      shorts.append((prompt, p, engine.submit(prompt, p)))
    assert long_request.result(timeout=120) == _reference(model, params, [3, 4, 5], background)
    for prompt, p, request in shorts:
      assert request.result(timeout=120) == _reference(model, params, prompt, p), (prompt, p)
      assert request.finish_reason == "length"
    beside = sum(ended_at[id(r)] <= ended_at[id(long_request)] for _, _, r in shorts)
    assert beside >= 11, (beside, engine.stats)
    assert engine.load()["active"] == 0 and engine.stats["admitted"] == 21
  finally:
    engine.close()


class _CallsTake(dict):
  """An engine's learned device seconds per decoding call, fixed at `seconds` for every shape."""

  def __init__(self, seconds: float):
    super().__init__()
    self.seconds = seconds

  def get(self, key, default=None):  # pylint: disable=unused-argument
    return self.seconds


def test_a_client_whose_request_finished_gets_its_next_one_into_the_next_call():
  # A long request keeps calls in flight; a closed-loop client sends short ones (each needs one decoding call:
  # its first token comes from the prefill, four more from one call), 30 ms after its last one ended. The engine
  # launches the next call only once that client has answered (or half a call's expected time has passed: here
  # 10 s, so only the answer ends the hold), so its slot idles one call per request, not two (nor the dozens
  # of this tiny model's calls that fit in 30 ms).
  model, params = _random_gpt()
  engine = engine_lib.Engine(model, params, slots=2, decode_steps=4)
  engine._call_s = _CallsTake(20.0)  # pylint: disable=protected-access
  try:
    background = engine_lib.SamplingParams(max_tokens=60, seed=1)
    long_request = engine.submit([3, 4, 5], background)
    next(iter(long_request.tokens(timeout=120)))
    done = []
    while long_request.finish_reason is None:
      prompt = [1 + len(done) % 50, 2]
      p = engine_lib.SamplingParams(max_tokens=5, seed=10 + len(done))
      done.append((prompt, p, engine.submit(prompt, p).result(timeout=120)))
      time.sleep(0.03)
    calls = engine.stats["steps"] // 4
    # 60 tokens: the prefill's and 15 calls (59 more; the host sees the last one a call late). A short request
    # every other call: 7 or 8 of them; two idle calls per request would leave room for 5.
    assert long_request.result() == _reference(model, params, [3, 4, 5], background)
    assert 15 <= calls <= 17 and len(done) >= 7, (calls, len(done), engine.stats)
    for prompt, p, got in done:
      assert got == _reference(model, params, prompt, p)
  finally:
    engine.close()


def test_the_next_call_is_held_back_at_most_half_a_call_for_clients_that_do_not_return():
  model, params = _random_gpt()
  engine = engine_lib.Engine(model, params, slots=3, decode_steps=4)
  engine._call_s = _CallsTake(0.2)  # pylint: disable=protected-access
  try:
    long_request = engine.submit([3, 4, 5], engine_lib.SamplingParams(max_tokens=40, seed=1))
    for i in range(2):  # they end, and their clients go away
      engine.submit([7, 8], engine_lib.SamplingParams(max_tokens=5, seed=2 + i)).result(timeout=120)
    start = time.monotonic()
    long_request.result(timeout=120)
    holds, held = engine.stats["holds"], engine.stats["held_s"]
    assert holds >= 1 and held <= holds * (0.1 + 0.05), engine.stats
    assert time.monotonic() - start < 10 * 0.1 + 5  # the remaining calls, each held back at most once
  finally:
    engine.close()


def test_filter_rows_keeps_each_rows_top_k_and_top_p_as_numpy_does():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 2, (6, 50)).astype(np.float32)
  top_k = np.array([0, 1, 5, 0, 3, 50], np.int32)
  top_p = np.array([1.0, 1.0, 0.9, 0.5, 0.7, 0.999], np.float32)
  got = np.asarray(decoding.filter_rows(logits, top_k, top_p))
  for row, k, p, out in zip(logits, top_k, top_p, got):
    keep = np.ones(50, bool)
    if k > 0:
      keep &= row >= np.sort(row)[::-1][k - 1]
    if p < 1.0:
      masked = np.where(keep, row.astype(np.float64), -np.inf)
      probs = np.exp(masked - masked.max())
      probs /= probs.sum()
      order = np.argsort(-masked)
      need = int(np.searchsorted(np.cumsum(probs[order]), p)) + 1  # the smallest prefix holding p of the mass
      keep &= masked >= masked[order[need - 1]]
    np.testing.assert_array_equal(out > np.finfo(np.float32).min, keep)


def test_cancel_frees_the_slot_a_full_queue_refuses_and_an_oversized_request_is_named():
  model, params = _random_gpt()
  engine = engine_lib.Engine(model, params, slots=1, max_queue=1)
  try:
    long = engine.submit([1, 2, 3], engine_lib.SamplingParams(max_tokens=60, seed=1))
    next(iter(long.tokens(timeout=120)))
    waiting = engine.submit([4, 5], engine_lib.SamplingParams(max_tokens=4, seed=2))
    with pytest.raises(engine_lib.QueueFull, match="1 requests are waiting"):
      engine.submit([6], engine_lib.SamplingParams(max_tokens=4))
    long.cancel()
    assert len(waiting.result(timeout=120)) == 4 and waiting.finish_reason == "length"
    assert long.finish_reason == "cancelled" and len(long.generated) < 60
    with pytest.raises(ValueError, match=r"longer than the context \(64\) by 6"):
      engine.submit([1] * 30, engine_lib.SamplingParams(max_tokens=40))
    with pytest.raises(ValueError, match="top_p must be in"):
      engine.submit([1], engine_lib.SamplingParams(max_tokens=4, top_p=0.0))
  finally:
    engine.close()
  with pytest.raises(engine_lib.EngineClosed):
    engine.submit([1], engine_lib.SamplingParams(max_tokens=4))


def test_seeds_use_all_their_bits_and_a_failing_engine_ends_every_request():
  assert not bool(engine_lib.request_key(2 ** 32 + 5) == jax.random.key(5))
  assert bool(engine_lib.request_key(5) == jax.random.key(5))
  model, params = _random_gpt()
  engine = engine_lib.Engine(model, params, slots=1)
  failures = iter([RuntimeError("device lost")])

  def failing_step(*args, **kwargs):
    raise next(failures)
  engine._launch = failing_step  # pylint: disable=protected-access  # the next decoding call fails
  running = engine.submit([1, 2], engine_lib.SamplingParams(max_tokens=8, seed=1))
  waiting = engine.submit([3], engine_lib.SamplingParams(max_tokens=8, seed=2))
  for request in (running, waiting):
    with pytest.raises(engine_lib.EngineClosed, match="device lost"):
      request.result(timeout=60)
  assert engine.load()["error"].endswith("RuntimeError: device lost")
  with pytest.raises(engine_lib.EngineClosed):
    engine.submit([1], engine_lib.SamplingParams(max_tokens=2))


def test_a_failed_write_leaves_no_partial_line_and_the_journal_repairs_the_outputs(tmp_path, monkeypatch):
  store = feedback_lib.FeedbackStore(str(tmp_path))
  body = {"type": "edit", "messages": _HELLO, "reply": "No.", "edited": "At dawn.", "id": "e1"}
  _, kind, records = feedback_lib.records_of(body, {})
  real_append = store._writer.append  # pylint: disable=protected-access
  calls = []

  class FullDisk:  # writes half of a line, then the disk is full
    def __init__(self, f):
      self.f = f

    def write(self, data):
      self.f.write(data[:len(data) // 2])
      raise OSError(28, "No space left on device")

    def __getattr__(self, name):
      return getattr(self.f, name)

  def append(f, record):
    calls.append(record)
    real_append(FullDisk(f) if len(calls) == 3 else f, record)  # journal, demonstration ok; comparison fails
  monkeypatch.setattr(store._writer, "append", append)  # pylint: disable=protected-access
  assert store.add("e1", kind, records)
  assert not store.add("e1", kind, records)  # committed by the journal: a retry is a duplicate
  with pytest.raises(OSError, match="restart the server"):
    store.add("e2", kind, records)
  store.close()
  assert (tmp_path / "comparisons.jsonl").read_bytes() == b""  # the half line was cut off again
  feedback_lib.FeedbackStore(str(tmp_path)).close()  # the restart appends what the journal holds
  assert [json.loads(line)["feedback_id"] for line in (tmp_path / "comparisons.jsonl").read_text().splitlines()] == [
      "e1"]
  assert len((tmp_path / "demonstrations.jsonl").read_text().splitlines()) == 1


def test_a_sharded_engine_serves_what_one_device_does():
  model, params = _random_gpt()
  from gptrl import sharding  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(config_lib.MeshConfig(data=4, fsdp=2, tensor=1))
  with sharding.activate(mesh):
    sharded = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  one, many = engine_lib.Engine(model, params, slots=4), engine_lib.Engine(model, sharded, slots=4, mesh=mesh)
  try:
    assert many.slots == 8  # a multiple of the data-parallel size
    p = engine_lib.SamplingParams(max_tokens=20, temperature=0.9, seed=5)
    prompts = [[3, 4, 5], [9] * 12, [1, 2]]
    a = [one.submit(x, p) for x in prompts]
    b = [many.submit(x, p) for x in prompts]
    assert [r.result(timeout=120) for r in a] == [r.result(timeout=120) for r in b]
  finally:
    one.close()
    many.close()


@contextlib.contextmanager
def _engines_held(pool):
  """Holds every engine's lock (reentrant: `submit` and `load` still run in this thread): no engine takes a request
  off its queue meanwhile, so where the pool sends requests does not depend on the engines' threads."""
  with contextlib.ExitStack() as stack:
    for e in pool.engines:
      stack.enter_context(e._cond)  # pylint: disable=protected-access
    yield


def test_a_pool_of_engines_spreads_the_requests_and_each_gets_what_it_would_get_alone():
  model, params = _random_gpt()
  pool = engine_lib.Pool(model, params, streams=2, slots=5, decode_steps=4)
  assert [e.slots for e in pool.engines] == [3, 2] and pool.slots == 5
  rng = np.random.default_rng(2)
  try:
    jobs = []
    with _engines_held(pool):
      for i in range(9):
        prompt = [int(t) for t in rng.integers(1, 64, size=int(rng.integers(1, 20)))]
        p = engine_lib.SamplingParams(max_tokens=int(rng.integers(20, 40)), temperature=(0.0, 1.0, 0.8)[i % 3],
                                      top_k=3 * (i % 2), seed=100 + i, stop_ids=(7,))
        jobs.append((prompt, p, pool.submit(prompt, p)))
      # Each request went to the engine with the fewest: 5 and 4.
      assert [e.load()["queued"] for e in pool.engines] == [5, 4]
    for prompt, p, request in jobs:
      assert request.result(timeout=120) == _reference(model, params, prompt, p), (prompt, p)
    assert [e.stats["admitted"] for e in pool.engines] == [5, 4]
    assert pool.stats["admitted"] == 9 and pool.load() == {"active": 0, "queued": 0, "slots": 5, "cancelled": 0,
                                                          "error": ""}
  finally:
    pool.close()


def test_a_pool_refuses_only_when_every_queue_is_full_and_one_failing_engine_stops_its_service():
  model, params = _random_gpt()
  pool = engine_lib.Pool(model, params, streams=2, slots=2, max_queue=2)
  long = engine_lib.SamplingParams(max_tokens=60, seed=1)
  try:
    with _engines_held(pool):
      queued = [pool.submit([1, 2], long) for _ in range(2)]  # one in each engine's queue of 1
      assert [e.load()["queued"] for e in pool.engines] == [1, 1]
      with pytest.raises(engine_lib.QueueFull, match="--max_queue 2"):
        pool.submit([4], long)
    for r in queued:
      r.cancel()
  finally:
    pool.close()
  pool = engine_lib.Pool(model, params, streams=2, slots=2)
  failures = iter([RuntimeError("device lost")])

  def failing_step(*args, **kwargs):
    raise next(failures)
  pool.engines[1]._launch = failing_step  # pylint: disable=protected-access  # its first decoding call fails
  try:
    p = engine_lib.SamplingParams(max_tokens=8, seed=1)
    with _engines_held(pool):
      healthy, doomed = pool.submit([5, 6], p), pool.submit([5, 6], p)  # one to each engine
    with pytest.raises(engine_lib.EngineClosed, match="device lost"):
      doomed.result(timeout=120)
    assert healthy.result(timeout=120) == _reference(model, params, [5, 6], p)  # the other engine's ends as it would
    assert pool.load()["error"].endswith("RuntimeError: device lost")
    with pytest.raises(engine_lib.EngineClosed, match="device lost"):  # and the pool takes no more
      pool.submit([1], engine_lib.SamplingParams(max_tokens=2))
  finally:
    pool.close()


def test_streams_default_to_two_on_a_cpu_host_with_two_cores_and_slots_for_two_batches(monkeypatch):
  from gptrl import sharding  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(engine_lib, "_cores", lambda: 2)
  assert engine_lib.default_streams(16) == 2 and engine_lib.default_streams(1) == 1
  mesh = sharding.make_mesh(config_lib.MeshConfig(data=4, fsdp=2, tensor=1))  # data-parallel size 8
  assert engine_lib.default_streams(8, mesh) == 1 and engine_lib.default_streams(16, mesh) == 2
  monkeypatch.setattr(engine_lib, "_cores", lambda: 1)
  assert engine_lib.default_streams(16) == 1
  model, params = _random_gpt()
  with pytest.raises(ValueError, match=r"streams must be in \[1, 2\] for 16 slots .*, got 3"):
    engine_lib.Pool(model, params, streams=3, slots=16, mesh=mesh)


# ----------------------------------------------------------------------------------------------
# The API in process (Flask's test client).


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve")
  sft = make_tiny_checkpoint(root / "sft", _TEXTS)
  reward = make_tiny_checkpoint(root / "reward", _TEXTS, stage="reward", seed=1, tokenizer=sft / "tokenizer.model")
  return sft, reward


def _args(checkpoint, **kw) -> argparse.Namespace:
  defaults = dict(checkpoint=str(checkpoint), step=-1, tokenizer="", reward_model="", served_model_name="tiny",
                  dtype="", host="127.0.0.1", port=0, token="", allowed_host=[], slots=4, max_queue=8, max_tokens=0,
                  single_device=True, feedback="", log_conversations=False, warmup=False, decode_steps=4,
                  streams=0)
  return argparse.Namespace(**{**defaults, **kw})


@pytest.fixture(scope="module")
def api(tiny_runs, tmp_path_factory):
  sft, reward = tiny_runs
  server = serve.build(_args(sft, reward_model=str(reward), token="s3cret",
                             feedback=str(tmp_path_factory.mktemp("feedback"))))
  client = serve.create_app(server).test_client()

  def post(path, body, *, token="s3cret", host="127.0.0.1:8000", raw=None, content_type="application/json"):
    return client.post(path, data=raw if raw is not None else json.dumps(body), content_type=content_type,
                       headers={"Authorization": f"Bearer {token}", "Host": host})
  yield server, client, post
  server.engine.close()
  server.store.close()


_HELLO = [{"role": "user", "content": "Where does the king walk?"}]


@pytest.mark.parametrize("body, status, param, message", [
    ({"messages": _HELLO, "temprature": 1}, 400, "temprature", "unknown field 'temprature'"),
    ({"messages": _HELLO, "temperature": 3}, 400, "temperature", r"must be in \[0, 2\], got 3"),
    ({"messages": _HELLO, "temperature": "hot"}, 400, "temperature", "must be a number"),
    ({"messages": _HELLO, "n": 0}, 400, "n", r"'n' must be in \[1, 16\]"),
    ({"messages": _HELLO, "max_tokens": 2.5}, 400, "max_tokens", "must be an integer"),
    ({"messages": _HELLO, "stream": "yes"}, 400, "stream", "must be true or false"),
    ({"messages": _HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"messages": _HELLO, "best_of": 2, "n": 3}, 400, "best_of", "at least 'n'"),
    ({"messages": _HELLO, "best_of": 2, "stream": True}, 400, "best_of", "non-streaming"),
    ({"messages": _HELLO, "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ({"messages": _HELLO, "logprobs": True}, 400, "logprobs", "not supported"),
    ({"messages": []}, 400, "messages", "non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "must be system"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "must be a string"),
    ({"messages": _HELLO + [{"role": "assistant", "content": "x"}]}, 400, "messages[1].role", "assistant's"),
    ({"messages": [{"role": "user", "content": "king " * 80}]}, 400, "messages", r"\d+ more than fit"),
    ({"messages": _HELLO, "max_tokens": 63}, 400, "max_tokens", r"is \d+ tokens more than the model's context of 64"),
    ({"messages": _HELLO, "model": "gpt-4"}, 404, "model", "'gpt-4' is not served here; this server serves 'tiny'"),
])
def test_a_bad_chat_request_gets_an_error_naming_its_field(api, body, status, param, message):
  _, _, post = api
  response = post("/v1/chat/completions", body)
  assert response.status_code == status, response.json
  assert response.json["error"]["param"] == param
  assert re.search(message, response.json["error"]["message"]), response.json


def test_more_streams_than_the_slots_make_are_refused(tiny_runs):
  with pytest.raises(serve.UsageError, match=r"--streams must be in \[0, 4\] for --slots 4 on 1 device.*got 5"):
    serve.build(_args(tiny_runs[0], streams=5))


def test_malformed_bodies_tokens_and_hosts_are_refused(api):
  _, client, post = api
  assert post("/v1/chat/completions", None, raw="{not json").status_code == 400
  response = post("/v1/chat/completions", None, raw="a=1", content_type="text/plain")
  assert "JSON body" in response.json["error"]["message"]
  assert post("/v1/completions", {"prompt": 5}).json["error"]["param"] == "prompt"
  response = post("/v1/chat/completions", {"messages": _HELLO}, token="wrong")
  assert response.status_code == 401 and "access token" in response.json["error"]["message"]
  assert client.get("/v1/models").status_code == 401  # no token
  response = post("/v1/chat/completions", {"messages": _HELLO}, host="attacker.example:8000")
  assert response.status_code == 403 and "DNS rebinding" in response.json["error"]["message"]
  assert client.get("/health", headers={"Host": "localhost:8000"}).json["status"] == "ok"
  assert client.get("/", headers={"Host": "[::1]:8000"}).status_code == 200  # the page itself needs no token


def test_capacity_surrogates_hosts_and_lists_of_prompts(api):
  server, client, post = api
  response = post("/v1/chat/completions", {"messages": _HELLO, "n": 16})  # 4 slots + 8 queued < 16
  assert response.status_code == 400 and "more than this server can hold at once (12" in response.json["error"][
      "message"]
  response = post("/v1/chat/completions", None, raw='{"messages": [{"role": "user", "content": "a\\ud800b"}]}')
  assert response.status_code == 400 and response.json["error"]["param"] == "messages[0].content"
  for host, status in (("[::1]", 200), ("[::1]:80", 200), ("LOCALHOST", 200), ("127.0.0.1.evil.com", 403)):
    assert client.get("/health", headers={"Host": host}).status_code == status, host
  body = {"prompt": ["The king", "A sailor"], "n": 2, "max_tokens": 5, "seed": 3}
  choices = post("/v1/completions", body).json["choices"]
  assert [c["index"] for c in choices] == [0, 1, 2, 3]
  alone = post("/v1/completions", {**body, "prompt": "A sailor"}).json["choices"]
  assert [c["text"] for c in choices[2:]] == [c["text"] for c in alone]  # prompt-major order, seeds per prompt
  filtered = {"messages": _HELLO, "max_tokens": 10, "seed": 5, "top_k": 3, "top_p": 0.9, "temperature": 0.7}
  replies = [post("/v1/chat/completions", filtered).json["choices"][0]["message"]["content"] for _ in range(2)]
  assert replies[0] == replies[1]  # top-k/top-p (the filtered programs) are seeded like the rest
  assert server.engine.load() == {"active": 0, "queued": 0, "slots": 4, "cancelled": 0, "error": ""}


def test_replies_stream_as_events_that_add_up_to_the_reply(api):
  server, _, post = api
  body = {"messages": _HELLO, "max_tokens": 20, "seed": 7, "temperature": 0.9}
  whole = post("/v1/chat/completions", body).json
  assert whole["object"] == "chat.completion" and whole["usage"]["prompt_tokens"] > 0
  events = post("/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
  assert events.mimetype == "text/event-stream"
  lines = [line[len("data: "):] for line in events.get_data(as_text=True).split("\n\n") if line]
  assert lines[-1] == "[DONE]"
  chunks = [json.loads(line) for line in lines[:-1]]
  text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
  assert text == whole["choices"][0]["message"]["content"]  # same seed, same reply, streamed or not
  assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
  assert chunks[-1]["usage"] == whole["usage"]
  assert server.engine.load()["active"] == 0


def test_a_stop_string_cuts_the_reply_and_frees_the_slot(api):
  _, _, post = api
  body = {"messages": _HELLO, "max_tokens": 40, "seed": 3, "temperature": 1.0}
  text = post("/v1/chat/completions", body).json["choices"][0]["message"]["content"]
  stop = text[len(text) // 2:len(text) // 2 + 2]
  assert stop.strip(), text
  choice = post("/v1/chat/completions", {**body, "stop": stop}).json["choices"][0]
  assert choice["message"]["content"] == text[:text.index(stop)] and choice["finish_reason"] == "stop"


def test_best_of_returns_the_candidates_the_reward_model_prefers(api):
  server, _, post = api
  from gptrl import sample as sample_lib  # pylint: disable=import-outside-toplevel
  body = {"messages": _HELLO, "max_tokens": 12, "seed": 11}
  candidates = post("/v1/chat/completions", {**body, "n": 4}).json["choices"]
  best = post("/v1/chat/completions", {**body, "n": 2, "best_of": 4}).json["choices"]
  texts = [c["message"]["content"] for c in candidates]
  rewards = [r for r, _ in sample_lib.score(server.reward, serve.parse_messages({"messages": _HELLO}),
                                            [t.strip() or " " for t in texts])]
  order = np.argsort(rewards)[::-1][:2]
  assert [c["message"]["content"] for c in best] == [texts[i] for i in order]
  np.testing.assert_allclose([c["reward"] for c in best], [rewards[i] for i in order], rtol=1e-5)


def test_feedback_is_stored_as_the_stages_read_it_with_its_provenance(api):
  server, _, post = api
  completion = post("/v1/chat/completions", {"messages": _HELLO, "max_tokens": 8, "seed": 1}).json
  reply = completion["choices"][0]["message"]["content"] or "(empty)"
  common = {"messages": _HELLO, "completion_id": completion["id"], "user": "ann"}
  assert post("/v1/feedback", {**common, "type": "rating", "reply": reply, "rating": -1, "reason": "rude",
                               "id": "f1"}).json == {"ok": True, "id": "f1", "duplicate": False,
                                                     "saved": {"ratings.jsonl": 1}}
  assert post("/v1/feedback", {**common, "type": "rating", "reply": reply, "rating": -1, "id": "f1"}).json["duplicate"]
  post("/v1/feedback", {**common, "type": "comparison", "replies": ["The king walks.", reply + " no"],
                        "preferred": 0, "id": "f2"})
  post("/v1/feedback", {**common, "type": "edit", "reply": reply, "edited": "To the market, at dawn.", "id": "f3"})
  for body, field in [({"type": "rating", "messages": _HELLO, "reply": "x", "rating": 2}, "'rating'"),
                      ({"type": "vote", "messages": _HELLO}, "'type'"),
                      ({"type": "edit", "messages": _HELLO, "reply": "x", "edited": "x"}, "'edited'"),
                      ({"type": "comparison", "messages": _HELLO, "replies": ["a"], "preferred": 0}, "'replies'"),
                      ({"type": "rating", "messages": _HELLO, "reply": "x", "rating": 1, "stars": 5}, "'stars'"),
                      ({"type": "rating", "messages": "hi", "reply": "x", "rating": 1}, "'messages'")]:
    response = post("/v1/feedback", body)
    assert response.status_code == 400 and field in response.json["error"]["message"], response.json
  folder = pathlib.Path(server.store.folder)
  ratings = [json.loads(line) for line in (folder / "ratings.jsonl").read_text().splitlines()]
  assert len(ratings) == 1 and ratings[0]["rating"] == -1 and ratings[0]["reason"] == "rude"
  assert ratings[0]["model"]["manifest_sha256"] == server.manifest and len(server.manifest) == 64
  assert ratings[0]["sampling"]["seed"] == 1 and ratings[0]["user"] == "ann"
  groups = chat_data.load_comparisons([str(folder / "comparisons.jsonl")], max_responses=2)
  assert sorted(g.responses[g.pairs[0][0]] for g in groups) == ["The king walks.", "To the market, at dawn."]
  demos = chat_data.load_conversations([str(folder / "demonstrations.jsonl")])
  assert [m.content for m in demos[0].messages] == ["Where does the king walk?", "To the market, at dawn."]
  assert not (folder / "conversations.jsonl").exists()  # nothing stored beyond the feedback


# ----------------------------------------------------------------------------------------------
# A real server.


class Server(ServerProcess):
  """`python -m gptrl.serve --port 0 --single_device ...` in a subprocess; waits until it listens."""

  def __init__(self, args: list, log: pathlib.Path, extra_env: dict[str, str] | None = None):
    super().__init__("gptrl.serve", ["--single_device", "--no-warmup", *args], log, r"Serving on (http://[\d.:]+)/",
                     extra_env)

  def post(self, path: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    return self.request(path, body, timeout)

  def health(self) -> dict:
    return self.request("/health")[1]


def test_the_openai_client_chats_streams_and_completes(tiny_runs, tmp_path):
  openai = pytest.importorskip("openai", reason="the openai client is in the test extras")
  sft, _ = tiny_runs
  server = Server(["--checkpoint", sft, "--feedback", tmp_path / "fb", "--log_conversations",
                   "--served_model_name", "tiny", "--warmup"], tmp_path / "serve.log")
  try:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused-on-loopback", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    reply = client.chat.completions.create(model="tiny", messages=_HELLO, max_tokens=10, seed=4, n=3)
    assert len(reply.choices) == 3 and reply.usage.completion_tokens <= 30
    assert len({c.message.content for c in reply.choices}) > 1  # three different samples
    again = client.chat.completions.create(model="tiny", messages=_HELLO, max_tokens=10, seed=4)
    assert again.choices[0].message.content == reply.choices[0].message.content  # choice 0 of n=3 is n=1's
    stream = client.chat.completions.create(model="tiny", messages=_HELLO, max_tokens=10, seed=4, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == again.choices[0].message.content
    text = client.completions.create(model="tiny", prompt="The king", max_tokens=6, temperature=0)
    assert text.choices[0].finish_reason in ("length", "stop") and text.object == "text_completion"
    with pytest.raises(openai.BadRequestError, match="unknown field 'foo'"):
      client.chat.completions.create(model="tiny", messages=_HELLO, extra_body={"foo": 1})
    logged = (tmp_path / "fb" / "conversations.jsonl").read_text().splitlines()
    assert len(logged) >= 4 and json.loads(logged[0])["sampling"]["seed"] == 4

  finally:
    server.stop()


def test_a_client_that_drops_mid_stream_leaves_no_slot_taken(tmp_path):
  long_context = make_tiny_checkpoint(tmp_path / "sft", _TEXTS, max_len=1024)
  server = Server(["--checkpoint", long_context, "--feedback", "", "--decode_steps", "1"], tmp_path / "serve.log")
  try:
    request = urllib.request.Request(server.url + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"messages": _HELLO, "max_tokens": 1000, "stream": True,
                                                      "temperature": 1.0, "seed": 9}).encode())
    response = urllib.request.urlopen(request, timeout=60)  # pylint: disable=consider-using-with
    response.readline()
    response.close()
    deadline = time.monotonic() + 60  # (queued or decoding: the stream's headers go out before either ends)
    while (load := server.health())["active"] + load["queued"] and time.monotonic() < deadline:
      time.sleep(0.05)
    # The slot is free again. (Whether by the cancel or by the reply's own end is not told apart here: this random
    # model emits a stop token within a few hundred tokens.)
    assert (load["active"], load["queued"]) == (0, 0), (load, server.log.read_text()[-2000:])
  finally:
    server.stop()


def test_concurrent_clients_get_what_each_would_get_alone(tiny_runs, tmp_path):
  sft, _ = tiny_runs
  server = Server(["--checkpoint", sft, "--feedback", "", "--slots", "4"], tmp_path / "serve.log")
  try:
    bodies = [{"messages": [{"role": "user", "content": f"Who speaks with the merchant {i}?"}], "max_tokens": 12 + i,
               "seed": i, "temperature": 1.0} for i in range(12)]
    alone = [server.post("/v1/chat/completions", b)[1]["choices"][0]["message"]["content"] for b in bodies]
    together: list = [None] * len(bodies)

    def ask(i):
      together[i] = server.post("/v1/chat/completions", bodies[i])[1]["choices"][0]["message"]["content"]
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for t in threads:
      t.start()
    for t in threads:
      t.join(120)
    assert together == alone
  finally:
    server.stop()


def test_kill_during_feedback_loses_no_acknowledged_record_and_duplicates_none(tiny_runs, tmp_path):
  sft, _ = tiny_runs
  out = tmp_path / "fb"
  acked: dict[str, int] = {}
  server = Server(["--checkpoint", sft, "--feedback", out], tmp_path / "serve.log",
                  extra_env={feedback_lib.CRASH_ENV: "9"})  # the 9th line written is cut in half, then kill -9

  def send(i):
    try:
      status, body = server.post("/v1/feedback", {"type": "comparison", "messages": _HELLO, "id": f"c{i}",
                                                  "replies": [f"Yes {i}.", f"No {i}."], "preferred": i % 2},
                                 timeout=10)
      if status == 200:
        acked[f"c{i}"] = i % 2
    except OSError:
      pass  # the server died mid-request: never acknowledged
  threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(30)
  assert server.proc.wait(30) == -signal.SIGKILL
  assert 0 < len(acked) < 12
  server = Server(["--checkpoint", sft, "--feedback", out], tmp_path / "restart.log")
  try:
    for i in range(12):  # the clients retry everything: acknowledged ones are duplicates, the rest are written
      status, body = server.post("/v1/feedback", {"type": "comparison", "messages": _HELLO, "id": f"c{i}",
                                                  "replies": [f"Yes {i}.", f"No {i}."], "preferred": i % 2})
      assert status == 200 and (body["duplicate"] or f"c{i}" not in acked)
  finally:
    server.stop()
  lines = (out / "comparisons.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines]
  assert sorted(r["feedback_id"] for r in records) == sorted(f"c{i}" for i in range(12))  # each exactly once
  assert all(r["ranking"][0] == int(r["feedback_id"][1:]) % 2 for r in records)
  log = [json.loads(line) for line in (out / "feedback_log.jsonl").read_text().splitlines()]
  assert len({e["id"] for e in log}) == len(log) == 12


def _wait(predicate, timeout: float = 60, what: str = "the page"):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    try:
      value = predicate()
    except Exception:  # pylint: disable=broad-except  # an element replaced while it was read
      value = None
    if value:
      return value
    time.sleep(0.05)
  raise AssertionError(f"timed out waiting for {what}")


def test_the_chat_page_talks_and_turns_ratings_regenerates_and_edits_into_feedback(browser, tiny_runs, tmp_path):
  from selenium.webdriver.common.by import By  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.common.keys import Keys  # pylint: disable=import-outside-toplevel
  sft, _ = tiny_runs
  out = tmp_path / "fb"
  server = Server(["--checkpoint", sft, "--feedback", out, "--token", "page-token", "--max_tokens", "12"],
                  tmp_path / "serve.log")
  try:
    browser.get(server.url + "/?token=page-token")
    _wait(lambda: "sft" in browser.find_element(By.ID, "model").text, what="the model's name")
    assert "token" not in browser.current_url  # taken out of the address bar

    def say(text):
      before = len(browser.find_elements(By.CSS_SELECTOR, ".turn.assistant .actions:not([hidden])"))
      box = browser.find_element(By.ID, "input")
      box.send_keys(text)
      box.send_keys(Keys.ENTER)
      _wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".turn.assistant > .actions:not([hidden])")) > before,
            what="the reply")
      return browser.find_elements(By.CSS_SELECTOR, ".turn.assistant")[-1]

    def saved(n):
      _wait(lambda: len((out / "feedback_log.jsonl").read_text().splitlines()) == n if (out / "feedback_log.jsonl")
            .exists() else False, what=f"{n} pieces of feedback on disk")

    turn = say("Where does the king walk?")
    turn.find_element(By.CLASS_NAME, "rate-down").click()
    reason = _wait(lambda: turn.find_element(By.CLASS_NAME, "reason"))
    reason.send_keys("not an answer")
    reason.send_keys(Keys.ENTER)
    saved(1)
    first = turn.find_element(By.CLASS_NAME, "text").get_attribute("textContent")
    turn.find_element(By.CLASS_NAME, "regen").click()
    _wait(lambda: turn.find_element(By.CLASS_NAME, "choose-b").is_displayed(), what="the second reply")
    second = turn.find_element(By.CLASS_NAME, "option-b").get_attribute("textContent")
    turn.find_element(By.CLASS_NAME, "choose-b").click()
    if first.strip() != second.strip():
      saved(2)
    _wait(lambda: turn.find_element(By.CLASS_NAME, "text").get_attribute("textContent") == second,
          what="the chosen reply")
    turn.find_element(By.CLASS_NAME, "edit").click()
    editor = _wait(lambda: turn.find_element(By.CLASS_NAME, "editor"))
    editor.clear()
    editor.send_keys("At dawn, to the market.")
    turn.find_element(By.CLASS_NAME, "save-edit").click()
    n = 3 if first.strip() != second.strip() else 2
    saved(n)
    next_turn = say("And the sailor?")
    next_turn.find_element(By.CLASS_NAME, "rate-up").click()
    _wait(lambda: next_turn.find_element(By.CLASS_NAME, "save-rating")).click()
    saved(n + 1)
  finally:
    server.stop()
  ratings = [json.loads(line) for line in (out / "ratings.jsonl").read_text().splitlines()]
  assert [r["rating"] for r in ratings] == [-1, 1] and ratings[0]["reason"] == "not an answer"
  assert ratings[0]["reply"] == first.strip()
  # The conversation went on from the edited reply.
  assert [m["content"] for m in ratings[1]["messages"]] == ["Where does the king walk?", "At dawn, to the market.",
                                                            "And the sailor?"]
  demos = [json.loads(line) for line in (out / "demonstrations.jsonl").read_text().splitlines()]
  assert demos[0]["messages"][-1] == {"role": "assistant", "content": "At dawn, to the market."}
  comparisons = [json.loads(line) for line in (out / "comparisons.jsonl").read_text().splitlines()]
  assert comparisons[-1]["responses"] == ["At dawn, to the market.", second.strip()]
  if first.strip() != second.strip():
    assert comparisons[0]["responses"] == [first.strip(), second.strip()] and comparisons[0]["ranking"] == [1, 0]
