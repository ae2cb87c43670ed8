"""Serve any stage's model as an OpenAI-style HTTP API with a chat page, and keep what its users say about replies.

  python -m gptrl.serve --checkpoint runs/pipeline_cpu/ppo                  # then open http://127.0.0.1:8000/
  python -m gptrl.serve --checkpoint runs/pipeline_cpu/sft --reward_model runs/pipeline_cpu/reward   # best_of
  python -m gptrl.serve --checkpoint RUN --host 0.0.0.0 --allowed_host my-vm.example.com  # prints a token once

Endpoints (JSON; errors are {"error": {"message", "type", "param", "code"}} with the field named):
  POST /v1/chat/completions   messages -> the assistant's reply (a chat-stage checkpoint: SFT, PPO, GRPO, DPO ...)
  POST /v1/completions        prompt -> its continuation (any checkpoint but a reward model's; raw text)
  GET  /v1/models             the one model served, with its stage, step and manifest hash
  POST /v1/feedback           ratings, comparisons and edited replies (gptrl/feedback.py), stored durably
  GET  /health                {"status": "ok", "active", "queued", "slots"} (no token needed)
  GET  /                      the chat page: talk, regenerate, rate, compare and correct replies
Sampling parameters as in OpenAI's API: max_tokens (max_completion_tokens), temperature, top_p, n, stop, seed,
stream (server-sent events, with stream_options.include_usage); and top_k, as vLLM takes it. With
--reward_model, best_of > n samples best_of candidates and returns the n the reward model scores highest (each
choice carries its "reward"). Unknown fields and values out of range get a 400 naming the field; a prompt that
does not fit the context a 400 saying by how many tokens.

Requests are batched by gptrl/engine.py (continuous batching over --slots rows of KV cache, split among --streams
engines whose calls run side by side: 2 on a CPU host with 2+ cores); at most --max_queue wait for a slot, beyond
which requests get a 503 with Retry-After. Listening beyond loopback needs an access token (--token,
$GPTRL_SERVE_TOKEN, or a random one printed at start), sent as `Authorization: Bearer TOKEN` (the `api_key` of
OpenAI's clients; the chat page takes it from its address, ?token=...). The Host header must name this server
(loopback names, --host, this machine's names, --allowed_host), against DNS rebinding.

Conversations are not stored, except in feedback (and in conversations.jsonl with --log_conversations).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import logging
import os
import queue as queue_lib
import secrets
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Mapping, Sequence

from gptrl import access as access_lib
from gptrl import chat
from gptrl import checkpoint as ckpt_lib
from gptrl import cli
from gptrl import fileio
from gptrl import labellers

_PROG = "gptrl.serve"
_STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_static")
_SAMPLING = {"max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options", "stop", "seed", "user",
             "best_of", "presence_penalty", "frequency_penalty", "logprobs", "model"}
CHAT_FIELDS = _SAMPLING | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_FIELDS = _SAMPLING | {"prompt", "echo", "suffix"}
MAX_N = 16
UsageError = cli.UsageError


class ApiError(Exception):
  """A request the server refuses: HTTP `status`, a message naming what is wrong, the field (`param`)."""

  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code

  def body(self) -> dict[str, Any]:
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
            503: "server_overloaded"}.get(self.status, "invalid_request_error")
    return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------------------------
# Request parsing.


def _number(body: Mapping[str, Any], name: str, default: Any, lo: float, hi: float, *, integer: bool = False) -> Any:
  """body[name] (default when absent or null) checked to be a number (an integer) in [lo, hi]."""
  value = body.get(name)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
    kind = "an integer" if integer else "a number"
    raise ApiError(400, f"'{name}' must be {kind}, got {json.dumps(value)[:40]}", name)
  if not lo <= value <= hi:
    raise ApiError(400, f"'{name}' must be in [{lo:g}, {hi:g}], got {value}", name)
  return value


def _stops(body: Mapping[str, Any]) -> tuple[str, ...]:
  stop = body.get("stop")
  if stop is None:
    return ()
  stops = [stop] if isinstance(stop, str) else stop
  if (not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops)):
    raise ApiError(400, "'stop' must be a non-empty string or a list of at most 4 of them", "stop")
  return tuple(stops)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """The sampling settings of one request, checked."""
  max_tokens: int | None
  temperature: float
  top_p: float
  top_k: int
  n: int
  best_of: int
  seed: int | None
  stop: tuple[str, ...]
  stream: bool
  include_usage: bool
  user: str

  def as_json(self) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("stream", "include_usage", "user")}


def parse_sampling(body: Mapping[str, Any], fields: set[str], *, context: int) -> Sampling:
  """The sampling settings of a request body; ApiError (400) naming the first unknown or bad field."""
  unknown = sorted(set(body) - fields)
  if unknown:
    raise ApiError(400, f"unknown field '{unknown[0]}' (this server takes: {', '.join(sorted(fields))})", unknown[0])
  for name in ("presence_penalty", "frequency_penalty"):
    if _number(body, name, 0, -2, 2) != 0:
      raise ApiError(400, f"'{name}' is not supported (only 0)", name)
  for name in ("logprobs", "echo"):
    if body.get(name) not in (None, False, 0):
      raise ApiError(400, f"'{name}' is not supported", name)
  if body.get("suffix") is not None:
    raise ApiError(400, "'suffix' is not supported", "suffix")
  max_tokens = _number(body, "max_completion_tokens", None, 1, context, integer=True)
  max_tokens = _number(body, "max_tokens", max_tokens, 1, context, integer=True)
  n = _number(body, "n", 1, 1, MAX_N, integer=True)
  best_of = _number(body, "best_of", n, 1, 4 * MAX_N, integer=True)
  if best_of < n:
    raise ApiError(400, f"'best_of' ({best_of}) must be at least 'n' ({n})", "best_of")
  stream = body.get("stream", False)
  if stream is None:
    stream = False
  if not isinstance(stream, bool):
    raise ApiError(400, "'stream' must be true or false", "stream")
  options = body.get("stream_options") or {}
  if not isinstance(options, dict) or set(options) - {"include_usage"}:
    raise ApiError(400, "'stream_options' takes only {'include_usage': bool}", "stream_options")
  if options and not stream:
    raise ApiError(400, "'stream_options' needs 'stream': true", "stream_options")
  user = body.get("user", "")
  if not isinstance(user, str) or len(user) > 256:
    raise ApiError(400, "'user' must be a string of at most 256 characters", "user")
  if body.get("model") is not None and not isinstance(body.get("model"), str):
    raise ApiError(400, "'model' must be a string", "model")
  top_p = float(_number(body, "top_p", 1.0, 0, 1))
  if top_p <= 0:
    raise ApiError(400, "'top_p' must be in (0, 1], got 0", "top_p")
  top_k = max(0, _number(body, "top_k", 0, -1, 1 << 20, integer=True))  # -1 (vLLM) or 0: off
  return Sampling(max_tokens=max_tokens, temperature=float(_number(body, "temperature", 1.0, 0, 2)),
                  top_p=top_p, top_k=top_k, n=n, best_of=best_of,
                  seed=_number(body, "seed", None, 0, 2 ** 63 - 1, integer=True),
                  stop=_stops(body), stream=stream, include_usage=bool(options.get("include_usage", False)),
                  user=user)


def _check_encodable(text: str, field: str) -> None:
  """A 400 for text that is not Unicode (a lone surrogate, which JSON's \\ud800 escapes allow)."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ApiError(400, f"'{field}' holds an invalid character at position {e.start} (a lone surrogate)",
                   field) from None


def parse_messages(body: Mapping[str, Any]) -> list[chat.Message]:
  """The conversation of a chat request (OpenAI's message format: content a string or a list of text parts;
  "developer" is the system role); ApiError naming the message and field."""
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise ApiError(400, "'messages' must be a non-empty list of {'role', 'content'}", "messages")
  out = []
  for i, m in enumerate(messages):
    where = f"messages[{i}]"
    if not isinstance(m, dict):
      raise ApiError(400, f"'{where}' must be an object {{'role', 'content'}}", where)
    extra = sorted(set(m) - {"role", "content", "name"})
    if extra:
      raise ApiError(400, f"unknown field '{where}.{extra[0]}'", f"{where}.{extra[0]}")
    role = {"developer": "system"}.get(m.get("role"), m.get("role"))
    if role not in chat.ROLES:
      raise ApiError(400, f"'{where}.role' must be system, developer, user or assistant, got "
                     f"{json.dumps(m.get('role'))[:40]}", f"{where}.role")
    content = m.get("content")
    if isinstance(content, list):
      if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        raise ApiError(400, f"'{where}.content' parts must be {{'type': 'text', 'text': str}} (text only)",
                       f"{where}.content")
      content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
      raise ApiError(400, f"'{where}.content' must be a string", f"{where}.content")
    _check_encodable(content, f"{where}.content")
    out.append(chat.Message(role, content))
  if out[-1].role == "assistant":
    raise ApiError(400, "the last message is the assistant's; end with a user (or system) turn to get a reply",
                   f"messages[{len(out) - 1}].role")
  return out


# ----------------------------------------------------------------------------------------------
# Following a request's tokens as text.


def _held_back(text: str, stops: Sequence[str]) -> int:
  """How many trailing characters of `text` to hold back: an incomplete character (a byte-fallback piece decodes
  to U+FFFD until its other bytes come) or the start of a stop string."""
  hold = len(text) - len(text.rstrip("\ufffd"))
  for stop in stops:
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
      if text.endswith(stop[:k]):
        hold = max(hold, k)
        break
  return hold


class Follower:
  """Turns one engine request's tokens into text deltas, cut at the first stop string (the request is then
  cancelled: its slot is freed at the next step)."""

  def __init__(self, request: Any, decode: Callable[[Sequence[int]], str], stops: Sequence[str]):
    self.request, self.decode, self.stops = request, decode, stops
    self.sent = ""
    self.finish_reason: str | None = None
    self.tokens_used = 0  # the tokens the reply took (up to a stop string; the engine may have decoded more)

  def deltas(self, timeout: float | None = None) -> Iterator[str]:
    """Text pieces as they are decoded; their concatenation is the reply."""
    text = ""
    for _ in self.request.chunks(timeout):
      text = self.decode(self.request.generated)
      self.tokens_used = len(self.request.generated)
      cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
      if cut >= 0:
        text = text[:cut]
        self.request.cancel()
        self.finish_reason = "stop"
        break
      safe = text[:len(text) - _held_back(text, self.stops)]
      if len(safe) > len(self.sent) and safe.startswith(self.sent):
        yield safe[len(self.sent):]
        self.sent = safe
    else:
      self.finish_reason = "stop" if self.request.finish_reason == "stop" else "length"
    if text.startswith(self.sent) and len(text) > len(self.sent):
      yield text[len(self.sent):]
      self.sent = text

  def text(self, timeout: float | None = None) -> str:
    for _ in self.deltas(timeout):
      pass
    return self.sent


# ----------------------------------------------------------------------------------------------
# The server.


def _seeds(seed: int, count: int) -> list[int]:
  """`count` seeds for the choices of one request: the first is `seed` (so n=1 and n>1 agree on choice 0)."""
  derived = [int.from_bytes(hashlib.sha256(f"{seed}/{j}".encode()).digest()[:8], "big") >> 1 for j in range(count)]
  return [seed] + derived[1:]


class Server:
  """The model, its engine, the optional reward model and feedback store, and the request handlers."""

  def __init__(self, loaded: Any, engine: Any, *, model_id: str, reward: Any = None, store: Any = None,
               token: str = "", allowed_hosts: Sequence[str] = (), default_max_tokens: int = 0,
               request_timeout: float = 600.0):
    self.loaded, self.engine, self.model_id = loaded, engine, model_id
    self.source = loaded.source
    self.tok = self.source.tok
    self.chat = self.source.stage != "pretrain"
    self.context = self.source.model_config.max_len
    self.reward, self.store = reward, store
    self.access = access_lib.Access(token, allowed_hosts)
    self.default_max_tokens = default_max_tokens or self.context
    self.request_timeout = request_timeout
    self.manifest = ckpt_lib.manifest_sha256(f"{self.source.folder}/{self.source.step}")
    self.fingerprint = f"gptrl-{self.manifest[:12]}" if self.manifest else "gptrl"
    self.created = int(time.time())
    self._recent: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
    self._lock = threading.Lock()

  # -- checks -------------------------------------------------------------------------------------

  def check_host(self, host: str) -> None:
    if (problem := self.access.host_error(host)) is not None:
      raise ApiError(403, problem)

  def check_token(self, header: str) -> None:
    if (problem := self.access.token_error(header)) is not None:
      raise ApiError(401, problem)

  def check_model(self, body: Mapping[str, Any]) -> None:
    model = body.get("model")
    if model is not None and model != self.model_id:
      raise ApiError(404, f"model {model!r} is not served here; this server serves {self.model_id!r}", "model",
                     "model_not_found")

  # -- generation ---------------------------------------------------------------------------------

  def _decode_fn(self, raw: bool) -> Callable[[Sequence[int]], str]:
    tok = self.tok
    if raw:
      return lambda out: tok.decode([t for t in out if t != tok.eos_id])
    return lambda out: chat.decode_reply(out, tok)

  def _budget(self, prompt_len: int, sampling: Sampling, what: str) -> int:
    """max_tokens for a prompt of `prompt_len` tokens, or a 400 saying by how much it does not fit."""
    if prompt_len >= self.context:
      raise ApiError(400, f"the {what} is {prompt_len} tokens, {prompt_len - self.context + 1} more than fit the "
                     f"model's context of {self.context} tokens with room for one reply token", "messages"
                     if what == "conversation" else "prompt", "context_length_exceeded")
    room = self.context - prompt_len
    if sampling.max_tokens is None:
      return min(room, self.default_max_tokens)
    if sampling.max_tokens > room:
      raise ApiError(400, f"the {what} ({prompt_len} tokens) + max_tokens ({sampling.max_tokens}) is "
                     f"{prompt_len + sampling.max_tokens - self.context} tokens more than the model's context of "
                     f"{self.context}; lower max_tokens or shorten the {what}", "max_tokens",
                     "context_length_exceeded")
    return sampling.max_tokens

  def _submit(self, prompts: list[list[int]], budgets: list[int], sampling: Sampling, count: int,
              raw: bool) -> list[Follower]:
    """`count` generations of each prompt, all queued or none (a 503 when the queue is full)."""
    from gptrl import engine as engine_lib  # pylint: disable=import-outside-toplevel
    capacity = self.engine.max_queue + self.engine.slots
    if len(prompts) * count > capacity:
      raise ApiError(400, f"the request asks for {len(prompts) * count} generations, more than this server can hold "
                     f"at once ({capacity}: --slots + --max_queue)", "best_of" if count > sampling.n else "n")
    seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
    stop_ids = (self.tok.eos_id,) if raw else (self.tok.end_of_turn_id, self.tok.eos_id)
    requests = []
    try:
      for prompt, budget in zip(prompts, budgets):
        for s in _seeds(seed, count):
          params = engine_lib.SamplingParams(max_tokens=budget, temperature=sampling.temperature,
                                             top_k=sampling.top_k, top_p=sampling.top_p, seed=s, stop_ids=stop_ids)
          requests.append(self.engine.submit(prompt, params))
    except (engine_lib.QueueFull, engine_lib.EngineClosed) as e:
      for r in requests:
        r.cancel()
      if isinstance(e, engine_lib.QueueFull):
        raise ApiError(503, f"the server is busy: {e}; retry shortly", None, "queue_full") from None
      raise ApiError(503, f"the server is not serving: {e}", None, "engine_stopped") from None
    return [Follower(r, self._decode_fn(raw), sampling.stop) for r in requests]

  def _remember(self, completion_id: str, sampling: Sampling, conversation: dict[str, Any]) -> None:
    """Keeps a completion's sampling settings for the provenance of feedback on it (the last 10,000; the text
    is not kept), and with --log_conversations appends the conversation to conversations.jsonl."""
    with self._lock:
      self._recent[completion_id] = {"sampling": sampling.as_json()}
      while len(self._recent) > 10000:
        self._recent.popitem(last=False)
    if self.store is not None:
      self.store.log_conversation({"completion_id": completion_id, "sampling": sampling.as_json(), **conversation,
                                   "user": sampling.user or None, "time": round(time.time(), 3)})

  def provenance(self, completion_id: Any) -> dict[str, Any]:
    with self._lock:
      known = self._recent.get(completion_id) if isinstance(completion_id, str) else None
    return {"model": {"checkpoint": self.source.folder, "step": self.source.step, "stage": self.source.stage,
                      "manifest_sha256": self.manifest},
            "completion_id": completion_id if isinstance(completion_id, str) else None,
            "sampling": known["sampling"] if known else None}

  def complete(self, body: Mapping[str, Any], *, chat_api: bool) -> Any:
    """Handles a chat or text completion request: a JSON response body, or an iterator of SSE lines."""
    self.check_model(body)
    sampling = parse_sampling(body, CHAT_FIELDS if chat_api else COMPLETION_FIELDS, context=self.context)
    if chat_api:
      if not self.chat:
        raise ApiError(400, f"{self.source.where} is a pretraining checkpoint: it continues text but was never "
                       "taught to chat; use /v1/completions", "messages")
      messages = parse_messages(body)
      prompts = [chat.prompt_tokens(messages, self.tok, max_tokens=1 << 30)]
      what = "conversation"
    else:
      prompt = body.get("prompt")
      texts = [prompt] if isinstance(prompt, str) else prompt
      if not isinstance(texts, list) or not texts or len(texts) > MAX_N or not all(isinstance(t, str) for t in texts):
        raise ApiError(400, f"'prompt' must be a string or a list of 1 to {MAX_N} strings", "prompt")
      for i, t in enumerate(texts):
        _check_encodable(t, "prompt" if isinstance(prompt, str) else f"prompt[{i}]")
      prompts = [[self.tok.eos_id] + self.tok.encode(t) for t in texts]
      messages, what = None, "prompt"
    budgets = [self._budget(len(p), sampling, what) for p in prompts]
    if sampling.best_of > sampling.n:
      if self.reward is None:
        raise ApiError(400, "'best_of' picks with a reward model: start the server with --reward_model RUN",
                       "best_of")
      if sampling.stream or not chat_api:
        raise ApiError(400, "'best_of' works with non-streaming chat completions only", "best_of")
    count = sampling.best_of
    followers = self._submit(prompts, budgets, sampling, count, not chat_api)
    completion_id = ("chatcmpl-" if chat_api else "cmpl-") + uuid.uuid4().hex[:24]
    prompt_tokens = sum(len(p) for p in prompts)
    if sampling.stream:
      return self._stream(completion_id, followers, sampling, prompt_tokens, chat_api, messages)
    from gptrl import engine as engine_lib  # pylint: disable=import-outside-toplevel
    try:
      texts = [f.text(self.request_timeout) for f in followers]
    except engine_lib.EngineClosed as e:
      raise ApiError(503, f"the server stopped generating: {e}", None, "engine_stopped") from None
    except TimeoutError:
      raise ApiError(504, f"no progress for {self.request_timeout:.0f} s", None, "timeout") from None
    finally:
      for f in followers:
        f.request.cancel()
    choices = list(range(len(followers)))
    rewards: list[float | None] = [None] * len(followers)
    if count > sampling.n:
      from gptrl import sample as sample_lib  # pylint: disable=import-outside-toplevel
      scored = sample_lib.score(self.reward, messages, [t.strip() or " " for t in texts])
      rewards = [r for r, _ in scored]
      choices = sorted(range(len(texts)), key=lambda i: -rewards[i])[:sampling.n]
    usage = {"prompt_tokens": prompt_tokens,
             "completion_tokens": sum(f.tokens_used for f in followers)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    out = []
    for index, i in enumerate(choices):
      f = followers[i]
      if chat_api:
        choice = {"index": index, "message": {"role": "assistant", "content": texts[i]},
                  "finish_reason": f.finish_reason, "logprobs": None}
      else:
        choice = {"index": index, "text": texts[i], "finish_reason": f.finish_reason, "logprobs": None}
      if rewards[i] is not None:
        choice["reward"] = rewards[i]
      out.append(choice)
    self._remember(completion_id, sampling, {"messages": _messages_json(messages),
                                             "prompt": None if chat_api else body.get("prompt"),
                                             "replies": [texts[i] for i in choices]})
    return {"id": completion_id, "object": "chat.completion" if chat_api else "text_completion",
            "created": int(time.time()), "model": self.model_id, "system_fingerprint": self.fingerprint,
            "choices": out, "usage": usage}

  def _stream(self, completion_id: str, followers: list[Follower], sampling: Sampling, prompt_tokens: int,
              chat_api: bool, messages: Sequence[chat.Message] | None) -> Iterator[str]:
    """Server-sent events: one chunk per text delta of any choice, each choice's last chunk with its
    finish_reason, a usage chunk when asked, then [DONE]. A client that goes away cancels every choice."""
    created = int(time.time())
    kind = "chat.completion.chunk" if chat_api else "text_completion"
    events: queue_lib.SimpleQueue = queue_lib.SimpleQueue()  # (choice index, text delta or None: finished)

    def chunk(choice: dict[str, Any]) -> str:
      return "data: " + json.dumps({"id": completion_id, "object": kind, "created": created, "model": self.model_id,
                                    "system_fingerprint": self.fingerprint, "choices": [choice]},
                                   ensure_ascii=False) + "\n\n"

    def follow(index: int, follower: Follower) -> Iterator[tuple[int, str | None]]:
      """(index, text delta) as the choice's text grows, then (index, None) once it has finished."""
      try:
        for delta in follower.deltas(self.request_timeout):
          yield index, delta
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("choice %d of %s: %s", index, completion_id, e)
        follower.finish_reason = follower.finish_reason or "error"
      yield index, None

    def pump(index: int, follower: Follower) -> None:
      for event in follow(index, follower):
        events.put(event)

    def merged() -> Iterator[tuple[int, str | None]]:
      """Every choice's events in the order they come: one choice is followed in this thread, several each by
      a thread of its own."""
      if len(followers) == 1:
        yield from follow(0, followers[0])
        return
      threads = [threading.Thread(target=pump, args=(i, f), daemon=True) for i, f in enumerate(followers)]
      for t in threads:
        t.start()
      open_choices = len(followers)
      while open_choices:
        event = events.get()
        open_choices -= event[1] is None
        yield event

    def generate() -> Iterator[str]:
      texts = [""] * len(followers)
      try:
        if chat_api:
          for i in range(len(followers)):
            yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                         "logprobs": None})
        for index, delta in merged():
          if delta is None:
            finish = followers[index].finish_reason
            yield chunk({"index": index, "delta": {}, "finish_reason": finish, "logprobs": None} if chat_api else
                        {"index": index, "text": "", "finish_reason": finish, "logprobs": None})
            continue
          texts[index] += delta
          yield chunk({"index": index, "delta": {"content": delta}, "finish_reason": None, "logprobs": None}
                      if chat_api else {"index": index, "text": delta, "finish_reason": None, "logprobs": None})
        if sampling.include_usage:
          completion = sum(f.tokens_used for f in followers)
          yield "data: " + json.dumps({"id": completion_id, "object": kind, "created": created,
                                       "model": self.model_id, "choices": [],
                                       "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                                 "total_tokens": prompt_tokens + completion}}) + "\n\n"
        yield "data: [DONE]\n\n"
        self._remember(completion_id, sampling, {"messages": _messages_json(messages), "replies": texts})
      finally:  # also when the client went away mid-stream (the server closes this generator)
        for f in followers:
          f.request.cancel()
    return generate()

  # -- feedback -----------------------------------------------------------------------------------

  def feedback(self, body: Any) -> dict[str, Any]:
    from gptrl import feedback as feedback_lib  # pylint: disable=import-outside-toplevel
    if self.store is None:
      raise ApiError(404, "feedback is not collected by this server (started with --feedback '')")
    try:
      provenance = self.provenance(body.get("completion_id") if isinstance(body, dict) else None)
      feedback_id, kind, records = feedback_lib.records_of(body, provenance)
    except feedback_lib.FeedbackError as e:
      raise ApiError(400, str(e)) from None
    try:
      stored = self.store.add(feedback_id, kind, records)
    except OSError as e:
      raise ApiError(503, f"feedback not saved: {e}", None, "storage_error") from None
    return {"ok": True, "id": feedback_id, "duplicate": not stored,
            "saved": {name: len(items) for name, items in records.items()}}

  def close(self) -> None:
    """Stops the engine and closes the feedback files."""
    self.engine.close()
    if self.store is not None:
      self.store.close()

  def models(self) -> dict[str, Any]:
    return {"object": "list", "data": [{
        "id": self.model_id, "object": "model", "created": self.created, "owned_by": "gptrl",
        "stage": self.source.stage, "step": self.source.step, "checkpoint": self.source.folder,
        "manifest_sha256": self.manifest, "context_length": self.context, "chat": self.chat,
        "best_of": self.reward is not None}]}


def _messages_json(messages: Sequence[chat.Message] | None) -> list[dict[str, str]] | None:
  return None if messages is None else labellers.messages_json(messages)


def create_app(server: Server) -> Any:
  """The Flask app serving `server`'s endpoints (see the module docstring) and the chat page."""
  import flask  # pylint: disable=import-outside-toplevel
  app = flask.Flask(__name__, static_folder=_STATIC, static_url_path="/static")

  def error(e: ApiError) -> Any:
    response = flask.jsonify(e.body())
    response.status_code = e.status
    if e.status == 503:
      response.headers["Retry-After"] = "1"
    return response

  @app.before_request
  def guard():
    try:
      server.check_host(flask.request.host)
      if flask.request.path.startswith("/v1/"):  # the API; the page, its files and /health need no token
        server.check_token(flask.request.headers.get("Authorization", ""))
    except ApiError as e:
      return error(e)
    return None

  def json_body() -> Any:
    if not flask.request.is_json:
      raise ApiError(400, "expected a JSON body (Content-Type: application/json)")
    body = flask.request.get_json(silent=True)
    if body is None:
      raise ApiError(400, "the body is not valid JSON")
    if not isinstance(body, dict):
      raise ApiError(400, "expected a JSON object")
    return body

  def completion(chat_api: bool) -> Any:
    try:
      result = server.complete(json_body(), chat_api=chat_api)
    except ApiError as e:
      return error(e)
    if isinstance(result, dict):
      return flask.jsonify(result)
    return flask.Response(result, mimetype="text/event-stream", headers={"Cache-Control": "no-store",
                                                                        "X-Accel-Buffering": "no"})

  @app.post("/v1/chat/completions")
  def chat_completions():
    return completion(True)

  @app.post("/v1/completions")
  def completions():
    return completion(False)

  @app.post("/v1/feedback")
  def feedback():
    try:
      return flask.jsonify(server.feedback(json_body()))
    except ApiError as e:
      return error(e)

  @app.get("/v1/models")
  def models():
    return flask.jsonify(server.models())

  @app.get("/health")
  def health():
    load = server.engine.load()
    response = flask.jsonify({"status": "error" if load["error"] else "ok", **load})
    response.status_code = 503 if load["error"] else 200
    return response

  @app.get("/")
  def index():
    response = flask.send_from_directory(_STATIC, "index.html")
    response.headers["Cache-Control"] = "no-store"
    return response

  @app.errorhandler(404)
  def not_found(_):
    return error(ApiError(404, f"no endpoint {flask.request.method} {flask.request.path}"))

  @app.errorhandler(500)
  def internal(e):
    logging.error("%s %s failed: %s", flask.request.method, flask.request.path, getattr(e, "original_exception", e))
    return error(ApiError(500, "the server failed on this request; see its log"))

  @app.errorhandler(405)
  def not_allowed(_):
    return error(ApiError(405, f"{flask.request.method} is not allowed on {flask.request.path}"))

  return app


# ----------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=f"python -m {_PROG}", description=__doc__.split("\n\n", 1)[0],
                              epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  what = p.add_argument_group("what to serve")
  what.add_argument("--checkpoint", required=True, help="a run's workdir, its checkpoints/ folder or a step folder")
  what.add_argument("--step", type=int, default=-1, help="checkpoint step (default: the newest)")
  what.add_argument("--tokenizer", default="", help="tokenizer model (default: <run workdir>/tokenizer.model)")
  what.add_argument("--reward_model", "--reward-model", default="", metavar="RUN",
                    help="a reward-model run: offers best_of (candidates scored, the best returned)")
  what.add_argument("--served_model_name", default="", help="the model id clients send (default: the run's name)")
  what.add_argument("--dtype", default="", help="compute dtype (default: the checkpoint's)")
  run = p.add_argument_group("serving")
  run.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine)")
  run.add_argument("--port", type=int, default=8000, help="port (default %(default)s; 0: any free one)")
  run.add_argument("--token", default="", help="access token (default: $GPTRL_SERVE_TOKEN; beyond loopback a "
                   "random one is made and printed if neither is set)")
  run.add_argument("--allowed_host", action="append", default=[],
                   help="another name clients reach this server by (Host header; repeatable; * allows any)")
  run.add_argument("--slots", type=int, default=16, help="requests decoded at once (default %(default)s)")
  run.add_argument("--decode_steps", type=int, default=8, help="tokens decoded per call into the device; requests "
                   "join and leave between calls (default %(default)s)")
  run.add_argument("--streams", type=int, default=0, help="engines sharing the slots, each decoding its own "
                   "batch side by side (default: 2 on a CPU host with 2+ cores and 2+ slots per data-parallel "
                   "device, else 1)")
  run.add_argument("--max_queue", type=int, default=256, help="requests waiting beyond which new ones get a 503 "
                   "(default %(default)s)")
  run.add_argument("--max_tokens", type=int, default=0, help="default max_tokens of a request (default: what fits "
                   "the context)")
  run.add_argument("--single_device", action="store_true", help="use one device instead of all of them")
  run.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="compile every prompt-length bucket and batch size before listening (default: on)")
  fb = p.add_argument_group("feedback")
  fb.add_argument("--feedback", default=None, help="local folder for feedback (default: <run workdir>/feedback; "
                  "'' turns feedback off)")
  fb.add_argument("--log_conversations", action="store_true",
                  help="also store every completion served (conversations.jsonl); default: only those with feedback")
  return p


def build(args: argparse.Namespace) -> Server:
  """Loads what `args` asks to serve and returns the Server (the engine running)."""
  import jax  # pylint: disable=import-outside-toplevel
  from gptrl import config as config_lib  # pylint: disable=import-outside-toplevel
  from gptrl import engine as engine_lib  # pylint: disable=import-outside-toplevel
  from gptrl import feedback as feedback_lib  # pylint: disable=import-outside-toplevel
  from gptrl import sample as sample_lib  # pylint: disable=import-outside-toplevel
  from gptrl import sharding  # pylint: disable=import-outside-toplevel
  if args.slots < 1 or args.decode_steps < 1 or args.max_queue < 0 or args.max_tokens < 0:
    raise UsageError("--slots and --decode_steps must be >= 1, --max_queue and --max_tokens >= 0.")
  source = sample_lib.open_checkpoint(args.checkpoint, step=args.step, tokenizer_path=args.tokenizer,
                                      dtype=args.dtype)
  if source.stage == sample_lib.REWARD_STAGE:
    raise UsageError(f"{source.where} is a reward model's checkpoint: it scores replies, it does not write them; "
                     "serve a policy and attach it with --reward_model.")
  reward_source = None
  if args.reward_model:
    reward_source = sample_lib.open_reward_model(args.reward_model, source, tokenizer_path=args.tokenizer,
                                                 dtype=args.dtype)
  folder = args.feedback
  if folder is None:
    run_dir = os.path.dirname(source.folder)
    folder = "" if fileio.is_remote(run_dir) else os.path.join(run_dir, "feedback")
  store = None
  if folder:
    try:
      store = feedback_lib.FeedbackStore(folder, log_conversations=args.log_conversations)
    except feedback_lib.FeedbackError as e:
      raise UsageError(f"--feedback {e}") from None
  devices = jax.devices()[:1] if args.single_device else None
  mesh = sharding.make_mesh(config_lib.MeshConfig(), devices)
  if not 0 <= args.streams <= engine_lib.max_streams(args.slots, mesh):
    raise UsageError(f"--streams must be in [0, {engine_lib.max_streams(args.slots, mesh)}] for --slots {args.slots} "
                     f"on {mesh.devices.size} device(s) (0: automatic), got {args.streams}.")
  loaded = sample_lib.load(source, mesh)
  reward = sample_lib.load(reward_source, mesh) if reward_source else None
  engine = engine_lib.Pool(loaded.model, loaded.params, streams=args.streams, slots=args.slots,
                           max_queue=args.max_queue, mesh=mesh, decode_steps=args.decode_steps, warmup=args.warmup)
  token, made = access_lib.resolve_token(args.token or os.environ.get("GPTRL_SERVE_TOKEN", ""), args.host)
  if made:
    args.generated_token = token
  model_id = args.served_model_name or os.path.basename(os.path.dirname(source.folder.rstrip("/"))) or "gptrl"
  return Server(loaded, engine, model_id=model_id, reward=reward, store=store, token=token,
                allowed_hosts=access_lib.allowed_hosts(args.host, args.allowed_host),
                default_max_tokens=args.max_tokens)


def run(args: argparse.Namespace) -> None:
  """Serves until interrupted."""
  server = build(args)
  app = create_app(server)
  http = cli.http_server(args.host, args.port, app, on_error=server.close)
  logging.info("Serving %r (stage %s, step %d) with %d slots in %d engine(s); feedback %s.", server.model_id,
               server.source.stage, server.source.step, server.engine.slots, len(server.engine.engines),
               server.store.folder if server.store else "off")
  address = access_lib.page_address(args.host, http.server_port, getattr(args, "generated_token", ""))
  print(f"Serving on {address}  (OpenAI base URL: http://{access_lib.shown_host(args.host)}:{http.server_port}/v1; "
        "Ctrl-C stops)", file=sys.stderr, flush=True)
  cli.serve_until_interrupted(http, server.close)


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status (0, or 2 after a one-line usage error on stderr)."""
  return cli.main(_PROG, _parser(), run, lambda: cli.setup_logging(
      ("absl", "orbax", "jax._src", "etils", "werkzeug"), logging.WARNING), argv)


if __name__ == "__main__":
  sys.exit(main())
