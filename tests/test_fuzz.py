"""Fuzz: malformed input for every stage gives an error that says where, or a counted skip.

A seeded generator writes hundreds of broken records per input format (pretraining JSONL, SFT conversations,
reward-model comparisons, config groups and overrides), each with the outcome the format's specification
(README, gptrl/chat.py, gptrl/chat_data.py, gptrl/config.py) gives it:

  error      DataError (ConfigError for configs) naming file:line and the field (or the config key); never a
             bare KeyError / TypeError / UnicodeDecodeError / JSON error, nor anything raised from inside JAX;
  skip       loaded, then counted as skipped (pretraining: empty text; SFT: nothing trainable left after the
             conversation is cut to the context);
  truncated  loaded and kept, counted as cut to the context;
  ok         a valid record (extra fields are ignored, a BOM or CRLF is not text);
  ignored    no record at all (a blank line).

Each broken line sits at a random line of a file of valid records, so the line number in the message is checked
against where the generator put it. The few end-to-end checks at the bottom run `python -m gptrl.launch`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import subprocess
import sys
import typing

import numpy as np
import pytest

from gptrl import chat
from gptrl import chat_data
from gptrl import config as config_lib
from gptrl import data
from gptrl import tokenizer as tokenizer_lib
from gptrl.data import DataError
from helpers import REPO, env

SEED = 7
MAX_LEN = 96  # the context the SFT and comparison encoders cut to
HUGE = 5_000_000  # characters in a "huge line"
_WORDS = "good day to you my lord what say thou the king is here speak friend well met sir".split()


@dataclasses.dataclass
class Case:
  name: str
  line: bytes  # the line under test, without its newline
  expect: str  # "error" | "skip" | "truncated" | "ok" | "ignored"
  field: str | None = None  # what an error must name besides file:line (None: a line-level error)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  rng = random.Random(0)
  docs = ["\n".join(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 10))) + "." for _ in range(60))
          for _ in range(5)]
  return tokenizer_lib.train_tokenizer(docs, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=400)


def _text(rng: random.Random, lo: int = 2, hi: int = 6) -> str:
  return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))


def _long(rng: random.Random) -> str:
  """A text of several hundred tokens: longer than MAX_LEN."""
  return _text(rng, 400, 500)


def _dump(record: typing.Any, rng: random.Random, ascii_only: bool | None = None) -> bytes:
  ascii_only = rng.random() < 0.5 if ascii_only is None else ascii_only
  return json.dumps(record, ensure_ascii=ascii_only).encode("utf-8")


# Values of every JSON type but a string; NaN and Infinity are the literals Python's json reads and writes.
_NOT_A_STRING = [0, -3, 1.5, True, False, None, [], ["text"], {}, {"text": "x"}, float("nan"), float("inf")]
_BLANK_TEXTS = ["", " ", "\n\t  ", "\u3000", "\r\n"]
_LONE_SURROGATES = ["\ud800", "abc\udfff", "\udc00 tail", "x\ud83d"]  # half of a UTF-16 pair, escaped in JSON
_INVALID_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xf0\x28\x8c\x28",
                 b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80", b"\x80"]
_UNKNOWN_FIELDS = [{"id": 17}, {"source": "web", "score": 0.5}, {"meta": {"a": [1, None]}}, {"Text": None},
                   {"": ""}, {"\u00e9t\u00e9": "summer"}]


def _line_corruptions(good: bytes, rng: random.Random, prefix: str) -> list[Case]:
  """Damage to a valid line that no format accepts (or, for BOM/CRLF/blank lines, that every format ignores)."""
  cases = []
  for bad in _INVALID_UTF8:
    for at in rng.sample(range(1, len(good)), 2):
      cases.append(Case(f"{prefix}/invalid-utf8 {bad!r}@{at}", good[:at] + bad + good[at:], "error"))
  for at in sorted(rng.sample(range(1, len(good)), min(6, len(good) - 1))):
    cases.append(Case(f"{prefix}/truncated@{at}", good[:at], "error"))
  cases += [Case(f"{prefix}/non-object {top!r}", top, "error") for top in
            (b"[1, 2]", b'"text"', b"3", b"null", b"true", b"[]", b"[" + good + b"]", b"-0.5e3")]
  cases += [
      Case(f"{prefix}/two objects on one line", good + b" " + good, "error"),
      Case(f"{prefix}/trailing garbage", good + b" x", "error"),
      Case(f"{prefix}/raw NUL inside", good[:-2] + b"\x00" + good[-2:], "error"),
      Case(f"{prefix}/raw newline split", good[:len(good) // 2], "error"),
      Case(f"{prefix}/deep nesting", b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "error"),
      Case(f"{prefix}/number of 5000 digits", good[:-1] + b', "n": ' + b"7" * 5000 + b"}", "error"),
      Case(f"{prefix}/single quotes", good.replace(b'"', b"'"), "error"),
      Case(f"{prefix}/BOM", b"\xef\xbb\xbf" + good, "ok"),
      Case(f"{prefix}/CRLF", good + b"\r", "ok"),
  ]
  cases += [Case(f"{prefix}/blank {blank!r}", blank, "ignored") for blank in (b"", b"   ", b"\t", b"\r", b" \r")]
  return cases


# ----------------------------------------------------------------------------------------------
# Writing a case into a file of valid records and checking what the loader made of it.


def _file_with(tmp_path, index: int, case: Case, neighbours: list[bytes], rng: random.Random
               ) -> tuple[str, int, int]:
  """Writes valid lines around the case's line; returns (path, the case's line number, valid lines)."""
  before = rng.randint(0, 3)
  lines = neighbours[:before] + [case.line] + neighbours[before:before + rng.randint(1, 2)]
  path = tmp_path / f"case{index}.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  return str(path), before + 1, len(lines) - 1


def _error_problem(case: Case, error: BaseException, path: str, lineno: int) -> str | None:
  """Why an exception is not the error the case expects (None: it is)."""
  message = str(error)
  if not isinstance(error, DataError):
    return f"{case.name}: raised {type(error).__name__}: {message[:200]}"
  if case.expect != "error":
    return f"{case.name}: expected {case.expect}, got DataError: {message[:200]}"
  if f"{path}:{lineno}:" not in message:
    return f"{case.name}: the message does not name {path}:{lineno}: {message[:200]}"
  if case.field and case.field not in message:
    return f"{case.name}: the message does not name the field {case.field}: {message[:200]}"
  if len(message) > 2000:
    return f"{case.name}: a {len(message)}-character message (the bad value should be cut short)"
  return None


def _check_cases(tmp_path, cases: list[Case], neighbours: list[bytes], rng: random.Random, load) -> list[str]:
  """Runs `load(path, n_valid, case)` on every case; returns the problems (empty when all behave)."""
  problems = []
  for i, case in enumerate(cases):
    path, lineno, n_valid = _file_with(tmp_path, i, case, neighbours, rng)
    try:
      problem = load(path, n_valid, case)
    except Exception as e:  # pylint: disable=broad-except  (any other exception is what the fuzz looks for)
      problem = _error_problem(case, e, path, lineno)
    else:
      if case.expect == "error":
        problem = problem or f"{case.name}: expected an error naming {case.field or 'the line'}, got none"
    if problem:
      problems.append(problem)
  return problems


def _report(problems: list[str], cases: list[Case]) -> str:
  return f"{len(problems)} of {len(cases)} inputs misbehaved:\n" + "\n".join(problems[:40])


# ----------------------------------------------------------------------------------------------
# Pretraining JSONL: {"text": str} per line.


def pretrain_cases(rng: random.Random, huge: int = HUGE) -> list[Case]:
  def line(**record):
    return _dump(record, rng)
  cases = []
  for value in _NOT_A_STRING:
    cases.append(Case(f"text={value!r}", line(text=value), "error", "'text'"))
    cases.append(Case(f"text={value!r} +extra", line(text=value, id=rng.randint(0, 9)), "error", "'text'"))
  for key in ("txt", "Text", "body", "content", " text"):
    cases.append(Case(f"no text, {key!r} instead", line(**{key: _text(rng)}), "error", "'text'"))
  cases.append(Case("empty object", b"{}", "error", "'text'"))
  cases.append(Case("only a huge key", line(**{"k" * 100_000: "x"}), "error", "'text'"))
  cases.append(Case("extra huge key", line(text=_text(rng), **{"k" * 100_000: "x"}), "ok"))
  for blank in _BLANK_TEXTS:
    cases.append(Case(f"text={blank!r}", line(text=blank), "skip"))
  for surrogate in _LONE_SURROGATES:
    cases.append(Case(f"text has {surrogate!r}", _dump({"text": surrogate}, rng, ascii_only=True), "error", "'text'"))
  for extra in _UNKNOWN_FIELDS:
    cases.append(Case(f"extra {extra}", line(text=_text(rng), **extra), "ok"))
  cases += [Case("NUL escape in text", line(text="a\u0000b"), "ok"),
            Case("huge line", line(text="good day " * (huge // 9)), "ok"),
            Case("emoji as a surrogate pair", _dump({"text": "hi \U0001f600"}, rng, ascii_only=True), "ok")]
  for _ in range(20):  # random words as the text: always fine
    cases.append(Case("random text", line(text=_text(rng, 1, 40)), "ok"))
  goods = [line(text=_text(rng)), line(text="caf\u00e9 \u4e2d\u6587 " + _text(rng), id=3),
           line(meta={"tags": ["a", "b"]}, text=_text(rng, 20, 40))]
  return cases + [case for i, good in enumerate(goods) for case in _line_corruptions(good, rng, f"line{i}")]


def _pretrain_neighbours(rng):
  return [_dump({"text": f"{_text(rng)} {i}"}, rng) for i in range(6)]


def _load_pretrain(caplog):
  def load(path, n_valid, case):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      docs = data.load_documents([path])
    kept = {"ok": n_valid + 1, "skip": n_valid, "ignored": n_valid}.get(case.expect)
    if len(docs) != kept:
      return f"{case.name}: expected {case.expect} ({kept} documents), got {len(docs)} documents"
    if case.expect == "skip" and "skipped 1 line" not in caplog.text:
      return f"{case.name}: the empty text was skipped but not counted in the log: {caplog.text[-300:]!r}"
    return None
  return load


def test_pretraining_jsonl_fuzz(tmp_path, caplog):
  rng = random.Random(SEED)
  cases = pretrain_cases(rng)
  assert len(cases) >= 100
  problems = _check_cases(tmp_path, cases, _pretrain_neighbours(rng), rng, _load_pretrain(caplog))
  assert not problems, _report(problems, cases)


def test_token_ids_past_the_vocabulary_name_the_document(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(4)), encoding="utf-8")
  docs = data.load_documents([str(path)])
  rng = random.Random(SEED)
  cases = 0
  for bad_id in (10, 11, 57, 2**16, 2**31, 2**40, -1, -2**31):
    for position in (0, 1, 4):
      doc = rng.randrange(len(docs))

      class FakeTokenizer:  # ids from a tokenizer that disagrees with the model's vocabulary
        vocab_size, eos_id, sha256 = 10, 0, "f" * 64

        def encode_batch(self, texts, doc=doc, position=position, bad_id=bad_id):
          return [[1] * position + [bad_id] + [2] if i == doc else [3, 4] for i in range(len(texts))]

      with pytest.raises(DataError) as err:
        data.tokenize_documents(docs, FakeTokenizer())
      assert f"{path}:{doc + 1}" in str(err.value) and str(bad_id) in str(err.value)
      cases += 1
  for tokens in (np.zeros((4, 4), np.int32), np.zeros(64, np.float32), np.array(["a"] * 64)):
    with pytest.raises(DataError, match="1-D integer array"):
      data.lm_dataset(tokens, seq_len=4, seed=0, global_batch_size=2)
  assert cases == 24


# ----------------------------------------------------------------------------------------------
# SFT conversations: {"prompt", "response"} or {"messages": [{"role", "content"}, ...]} (+ "group").


def _messages(rng: random.Random, exchanges: int, system: bool) -> list[dict[str, str]]:
  turns = [{"role": "system", "content": _text(rng)}] if system else []
  for _ in range(exchanges):
    turns += [{"role": "user", "content": _text(rng)}, {"role": "assistant", "content": _text(rng)}]
  return turns


def sft_cases(rng: random.Random, huge: int = HUGE) -> list[Case]:
  cases = []
  pr = lambda **kw: {"prompt": _text(rng), "response": _text(rng), **kw}  # noqa: E731
  for field in ("prompt", "response"):
    for value in _NOT_A_STRING + _BLANK_TEXTS:
      cases.append(Case(f"{field}={value!r}", _dump({**pr(), field: value}, rng), "error", f"'{field}'"))
    for surrogate in _LONE_SURROGATES:
      cases.append(Case(f"{field} has {surrogate!r}", _dump({**pr(), field: surrogate}, rng, True), "error", field))
    record = pr()
    del record[field]
    cases.append(Case(f"no {field}", _dump(record, rng), "error", f"'{field}'"))
  cases.append(Case("prompt and messages", _dump({**pr(), "messages": _messages(rng, 1, False)}, rng), "error",
                    "'messages'"))
  cases.append(Case("only huge keys", _dump({f"{i}" * 50_000: i for i in range(1, 30)}, rng), "error", "'response'"))
  cases.append(Case("extra huge key", _dump({**pr(), "k" * 100_000: "x"}, rng), "ok"))
  for value in (1.5, True, None, [], {}, ["a"], float("nan")):
    cases.append(Case(f"group={value!r}", _dump(pr(group=value), rng), "error", "'group'"))
  for value in (7, "play", ""):
    cases.append(Case(f"group={value!r}", _dump(pr(group=value), rng), "ok"))
  for extra in _UNKNOWN_FIELDS:
    cases.append(Case(f"extra {extra}", _dump({**pr(), **extra}, rng), "ok"))
  # Longer than the context: a prompt that fills it leaves nothing to train on; a long reply is cut.
  cases.append(Case("prompt longer than the context", _dump(pr(prompt=_long(rng)), rng), "skip"))
  cases.append(Case("response longer than the context", _dump(pr(response=_long(rng)), rng), "truncated"))
  cases.append(Case("huge response line", _dump(pr(response="good day " * (huge // 9)), rng), "truncated"))

  for n in range(12):
    messages = _messages(rng, rng.randint(1, 3), system=n % 2 == 0)
    base = {"messages": messages, **({"group": f"g{n}"} if n % 3 else {})}
    i = rng.randrange(len(messages))
    where = f"messages[{i}]"

    def with_turn(change, base=base, i=i):
      record = copy.deepcopy(base)
      change(record["messages"], i)
      return record

    for value in _NOT_A_STRING[:6] + _NOT_A_STRING[8:]:  # not lists: a list of turns is the valid type
      cases.append(Case(f"messages={value!r}", _dump({**base, "messages": value}, rng), "error", "'messages'"))
    cases.append(Case("messages=[]", _dump({**base, "messages": []}, rng), "error", "'messages'"))
    cases.append(Case("no messages", _dump({k: v for k, v in base.items() if k != "messages"}, rng), "error",
                      "'messages'"))
    for value in (0, "user: hi", None, [], True, ["user", "hi"]):
      cases.append(Case(f"{where}={value!r}", _dump(with_turn(lambda m, i, v=value: m.__setitem__(i, v)), rng),
                        "error", where))
    for key in ("role", "content"):
      cases.append(Case(f"{where} without {key}", _dump(with_turn(lambda m, i, k=key: m[i].pop(k)), rng), "error",
                        where))
    for role in ("robot", "", "User", " user", "tool", "assistant ", 3, None, [], {"role": "user"}):
      cases.append(Case(f"{where}.role={role!r}", _dump(with_turn(lambda m, i, r=role: m[i].update(role=r)), rng),
                        "error", f"{where}.role"))
    for content in _NOT_A_STRING + _BLANK_TEXTS:
      cases.append(Case(f"{where}.content={content!r}",
                        _dump(with_turn(lambda m, i, c=content: m[i].update(content=c)), rng), "error",
                        f"{where}.content"))
    surrogate = rng.choice(_LONE_SURROGATES)
    cases.append(Case(f"{where}.content has {surrogate!r}",
                      _dump(with_turn(lambda m, i, c=surrogate: m[i].update(content=c)), rng, True), "error",
                      f"{where}.content"))
    cases.append(Case(f"{where} extra keys", _dump(with_turn(lambda m, i: m[i].update(name="x", weight=0)), rng),
                      "ok"))
    cases.append(Case("system turn not first", _dump({"messages": messages + [
        {"role": "system", "content": "late"}, {"role": "assistant", "content": "ok"}]}, rng), "error",
        f"messages[{len(messages)}]"))
    cases.append(Case("no assistant turn", _dump({"messages": [
        {**m, "role": "user" if m["role"] == "assistant" else m["role"]} for m in messages]}, rng), "error",
        "'messages'"))
    cases.append(Case("last turn not the assistant's", _dump({"messages": messages + [
        {"role": "user", "content": _text(rng)}]}, rng), "ok"))
    cases.append(Case("columnar turns of unequal length", _dump({"messages": {
        "role": [m["role"] for m in messages], "content": [m["content"] for m in messages][:-1]}}, rng), "error",
        "'messages'"))
    cases.append(Case("columnar turns", _dump({"messages": {
        "role": [m["role"] for m in messages], "content": [m["content"] for m in messages]}}, rng), "ok"))
    long_last_prompt = messages[:-2] + [{"role": "user", "content": _long(rng)}, messages[-1]]
    cases.append(Case("last prompt longer than the context", _dump({"messages": long_last_prompt}, rng), "skip"))
    early = [m for m in messages if m["role"] == "system"] + [{"role": "user", "content": _long(rng)},
                                                              {"role": "assistant", "content": _text(rng)}]
    cases.append(Case("early turn longer than the context",
                      _dump({"messages": early + [m for m in messages if m["role"] != "system"]}, rng), "truncated"))
  return cases + _line_corruptions(_dump(pr(), rng), rng, "line")


def _sft_neighbours(rng):
  return [_dump({"prompt": _text(rng), "response": _text(rng)} if i % 2 else
                {"messages": _messages(rng, 1, i % 3 == 0), "group": i}, rng) for i in range(6)]


def _load_sft(tok):
  def load(path, n_valid, case):
    conversations = chat_data.load_conversations([path])
    loaded = n_valid + (case.expect != "ignored")
    if len(conversations) != loaded:
      return f"{case.name}: expected {loaded} conversations, got {len(conversations)}"
    examples = chat_data.encode_sft(conversations, tok, max_len=MAX_LEN)
    skipped, truncated = int(case.expect == "skip"), int(case.expect == "truncated")
    if (examples.skipped, examples.truncated) != (skipped, truncated):
      return (f"{case.name}: expected {skipped} skipped and {truncated} truncated, counted {examples.skipped} and "
              f"{examples.truncated}")
    if any(len(t) > MAX_LEN + 1 or t[1:].sum() == 0 for t in examples.trainable):
      return f"{case.name}: an example longer than the context or with nothing to train on was kept"
    return None
  return load


def test_sft_conversations_fuzz(tmp_path, tok):
  rng = random.Random(SEED)
  cases = sft_cases(rng)
  assert len(cases) >= 300
  problems = _check_cases(tmp_path, cases, _sft_neighbours(rng), rng, _load_sft(tok))
  assert not problems, _report(problems, cases)


# ----------------------------------------------------------------------------------------------
# Comparisons: pairwise {"prompt"|"messages", "chosen", "rejected"[, "margin"]} or ranked {..., "responses",
# "ranking"}.


def _prompt_messages(rng):
  return _messages(rng, rng.randint(0, 2), rng.random() < 0.5) + [{"role": "user", "content": _text(rng)}]


def comparison_cases(rng: random.Random, huge: int = HUGE) -> list[Case]:
  cases = []
  def pair(**kw):
    return {"prompt": _text(rng), "chosen": "well met " + _text(rng), "rejected": "what say " + _text(rng), **kw}

  def ranked(k, **kw):
    responses = [f"{_text(rng)} {w}" for w in rng.sample(_WORDS, k)]
    ranking = list(range(k))
    rng.shuffle(ranking)
    return {"prompt": _text(rng), "responses": responses, "ranking": ranking, **kw}

  for field in ("chosen", "rejected", "prompt"):
    for value in _NOT_A_STRING + _BLANK_TEXTS:
      cases.append(Case(f"{field}={value!r}", _dump(pair(**{field: value}), rng), "error", f"'{field}'"))
    surrogate = rng.choice(_LONE_SURROGATES)
    cases.append(Case(f"{field} has {surrogate!r}", _dump(pair(**{field: surrogate}), rng, True), "error", field))
    record = pair()
    del record[field]
    cases.append(Case(f"no {field}", _dump(record, rng), "error", f"'{field}'"))
  same = _text(rng)
  cases.append(Case("chosen == rejected", _dump(pair(chosen=same, rejected=same), rng), "error", "'rejected'"))
  for margin in (float("nan"), float("inf"), float("-inf"), 1e300, -1e300, 10**400, "1", True, None, [], {}):
    cases.append(Case(f"margin={margin!r:.20}", _dump(pair(margin=margin), rng), "error", "'margin'"))
  for margin in (0, 2.5, -1.0, 7, 1e-9):
    cases.append(Case(f"margin={margin!r}", _dump(pair(margin=margin), rng), "ok"))
  cases.append(Case("prompt and messages", _dump(pair(messages=_prompt_messages(rng)), rng), "error", "'messages'"))
  cases.append(Case("pairwise and ranked", _dump({**ranked(3), "chosen": "a", "rejected": "b"}, rng), "error",
                    "'chosen'"))
  cases.append(Case("neither pairwise nor ranked", _dump({"prompt": "p", "answer": "a"}, rng), "error", "'chosen'"))
  cases.append(Case("a huge key instead", _dump({"prompt": "p", "k" * 100_000: "a"}, rng), "error", "'chosen'"))
  for extra in _UNKNOWN_FIELDS:
    cases.append(Case(f"extra {extra}", _dump({**pair(), **extra}, rng), "ok"))
  cases.append(Case("prompt longer than the context", _dump(pair(prompt=_long(rng)), rng), "truncated"))
  cases.append(Case("chosen longer than the context", _dump(pair(chosen=_long(rng)), rng), "truncated"))
  cases.append(Case("huge rejected line", _dump(pair(rejected="good day " * (huge // 9)), rng), "truncated"))

  for n in range(10):
    prompt = _prompt_messages(rng)
    base = {"messages": prompt, **pair()}
    del base["prompt"]
    i = rng.randrange(len(prompt))
    where = f"messages[{i}]"
    def with_turn(change, base=base, i=i):
      record = copy.deepcopy(base)
      change(record["messages"], i)
      return record
    cases.append(Case("prompt ends with the assistant", _dump({**base, "messages": prompt + [
        {"role": "assistant", "content": _text(rng)}]}, rng), "error", "'messages'"))
    cases.append(Case("messages=[]", _dump({**base, "messages": []}, rng), "error", "'messages'"))
    for role in ("robot", "", "Assistant", None, 1):
      cases.append(Case(f"{where}.role={role!r}", _dump(with_turn(lambda m, i, r=role: m[i].update(role=r)), rng),
                        "error", f"{where}.role"))
    for content in rng.sample(_NOT_A_STRING + _BLANK_TEXTS, 5):
      cases.append(Case(f"{where}.content={content!r}",
                        _dump(with_turn(lambda m, i, c=content: m[i].update(content=c)), rng), "error",
                        f"{where}.content"))
    cases.append(Case(f"{where}=null", _dump(with_turn(lambda m, i: m.__setitem__(i, None)), rng), "error", where))
    history = [{"role": "user", "content": _long(rng)}, {"role": "assistant", "content": "ok"}]
    cases.append(Case("long first turn", _dump({**base, "messages": history + [
        m for m in prompt if m["role"] != "system"]}, rng), "truncated"))

    k = rng.randint(2, 4)
    record = ranked(k)
    cases.append(Case(f"ranked k={k}", _dump(record, rng), "ok"))
    for value in (0, "a b", None, {}, True, float("nan")):
      cases.append(Case(f"responses={value!r}", _dump({**record, "responses": value}, rng), "error", "'responses'"))
    for short in ([], record["responses"][:1]):
      cases.append(Case(f"{len(short)} responses", _dump({**record, "responses": short, "ranking": [0][:len(short)]},
                                                          rng), "error", "'responses'"))
    j = rng.randrange(k)
    for value in rng.sample(_NOT_A_STRING + _BLANK_TEXTS, 4):
      responses = list(record["responses"])
      responses[j] = value
      cases.append(Case(f"responses[{j}]={value!r}", _dump({**record, "responses": responses}, rng), "error",
                        f"responses[{j}]"))
    cases.append(Case("duplicate responses", _dump({**record, "responses": [record["responses"][0]] * k}, rng),
                      "error", "'responses'"))
    cases.append(Case("more responses than max_responses", _dump(ranked(5), rng), "error", "'responses'"))
    perm = record["ranking"]
    not_permutations = [[0] * k, perm[:-1], perm + [k], [r + 1 for r in perm], [-1] + perm[1:],
                        [float(r) for r in perm], [bool(r) for r in perm], "".join(map(str, perm)), None, {},
                        [str(r) for r in perm], [[r] for r in perm], perm[:-1] + [perm[0]]]
    for ranking in not_permutations:
      cases.append(Case(f"ranking={ranking!r}", _dump({**record, "ranking": ranking}, rng), "error", "'ranking'"))
    for field in ("responses", "ranking"):
      cases.append(Case(f"no {field}", _dump({x: v for x, v in record.items() if x != field}, rng), "error",
                        f"'{field}'"))
    cases.append(Case("ranked with a NaN margin", _dump({**record, "margin": float("nan")}, rng), "error", "'margin'"))
  return cases + _line_corruptions(_dump(pair(), rng), rng, "line")


def _comparison_neighbours(rng):
  return [_dump({"prompt": f"{_text(rng)} {i}", "chosen": "well met", "rejected": f"what say {i}"}, rng)
          for i in range(6)]


def _load_comparisons(tok):
  def load(path, n_valid, case):
    groups = chat_data.load_comparisons([path], max_responses=4)
    loaded = n_valid + (case.expect != "ignored")
    records = sum(len(g.where) for g in groups)
    if records != loaded:
      return f"{case.name}: expected {loaded} records, got {records}"
    enc = chat_data.encode_comparisons(groups, tok, max_len=MAX_LEN, max_responses=4)
    if (enc.truncated > 0) != (case.expect == "truncated"):
      return f"{case.name}: expected {case.expect}, counted {enc.truncated} sequences cut to the context"
    if not (np.all(np.isfinite(enc.margins)) and np.all(enc.last < MAX_LEN) and enc.pairs.sum() >= len(groups)
            and np.all(enc.first <= enc.last)):
      return (f"{case.name}: the encoded batch holds non-finite margins, an index past the context, a response "
              "starting after its end or no pair")
    return None
  return load


def test_comparisons_fuzz(tmp_path, tok):
  rng = random.Random(SEED)
  cases = comparison_cases(rng)
  assert len(cases) >= 300
  problems = _check_cases(tmp_path, cases, _comparison_neighbours(rng), rng, _load_comparisons(tok))
  assert not problems, _report(problems, cases)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf\n", b"\x1f\x8b\x08\x00" + bytes(range(256)),
                                     b'{"text": " "}\n{"text": ""}\n'])
def test_a_file_without_one_usable_record_is_refused_naming_it(tmp_path, content):
  path = tmp_path / "data.jsonl"
  path.write_bytes(content)
  for load in (data.load_documents, chat_data.load_conversations,
               lambda sources: chat_data.load_comparisons(sources, max_responses=4)):
    with pytest.raises(DataError) as err:
      load([str(path)])
    assert str(path) in str(err.value)


def test_no_held_out_conversation_gives_no_eval_batch_not_an_error():
  empty = chat_data.SFTExamples([], [], skipped=3, truncated=0)
  assert chat_data.sft_eval_batches(empty, seq_len=8, pad_id=0, batch_size=2) == []
  with pytest.raises(DataError, match="every conversation was skipped"):
    chat_data.sft_dataset(empty, seq_len=8, pad_id=0, seed=0, global_batch_size=2)


def test_prompts_of_any_length_fit_the_budget(tok):
  """PPO and labelling prompts: whatever the conversation, the prompt fits and ends in <|assistant|>."""
  rng = random.Random(SEED)
  for n in range(150):
    messages = [chat.Message(m["role"], m["content"]) for m in _messages(rng, rng.randint(1, 4), n % 2 == 0)]
    if n % 3 == 0:
      k = rng.randrange(len(messages))
      messages[k] = chat.Message(messages[k].role, _long(rng))
    budget = rng.randint(8, 80)
    tokens = chat.prompt_tokens(messages[:-1], tok, max_tokens=budget)
    assert len(tokens) <= budget and tokens[0] == tok.eos_id and tokens[-1] == tok.assistant_id, (n, budget)
    seq = chat_data.response_sequence(messages[:-1], messages[-1].content, tok, max_len=budget)
    assert len(seq) <= budget, (n, budget)


# ----------------------------------------------------------------------------------------------
# Configs: every key of every typed group, of every stage (the pipeline nests them all).

# Values outside each field's documented range (gptrl/config.py comments); cross-field rules are listed once below.
_OUT_OF_RANGE: dict[tuple[str, str], list[typing.Any]] = {
    ("ModelConfig", "vocab_size"): [-1], ("ModelConfig", "num_layers"): [0, -1],
    ("ModelConfig", "num_heads"): [0, -4], ("ModelConfig", "d_model"): [0, -256, 250],
    ("ModelConfig", "mlp_ratio"): [0.0, -1.0], ("ModelConfig", "max_len"): [0, -1],
    ("ModelConfig", "dropout"): [-0.1, 1.0, 1.5], ("ModelConfig", "pos_embedding"): ["", "absolute", "LEARNED"],
    ("ModelConfig", "rope_theta"): [0.0, -1.0], ("ModelConfig", "norm"): ["", "batchnorm"],
    ("ModelConfig", "param_dtype"): ["fp32", "float64", ""], ("ModelConfig", "dtype"): ["int8", ""],
    ("ModelConfig", "logits_dtype"): ["bf16", ""],
    ("ModelConfig", "remat"): ["full", ""], ("ModelConfig", "attention"): ["flash", ""],
    ("ModelConfig", "init_std"): [0.0, -0.02],
    ("MeshConfig", "data"): [0, -2], ("MeshConfig", "fsdp"): [0, -2], ("MeshConfig", "tensor"): [0, -3],
    ("OptimConfig", "lr"): [0.0, -1e-3], ("OptimConfig", "warmup_steps"): [-1], ("OptimConfig", "decay_steps"): [-1],
    ("OptimConfig", "min_lr_ratio"): [-0.1, 1.5], ("OptimConfig", "b1"): [-0.1, 1.0], ("OptimConfig", "b2"): [1.0, 2.0],
    ("OptimConfig", "eps"): [0.0, -1e-8], ("OptimConfig", "weight_decay"): [-0.1], ("OptimConfig", "clip_norm"): [-1.0],
    ("OptimConfig", "grad_accum_steps"): [0, -1],
    ("TokenizerConfig", "vocab_size"): [0, 299, -1], ("TokenizerConfig", "model_type"): ["word", ""],
    ("DataConfig", "sources"): [[], [""], [" "]], ("DataConfig", "text_field"): [""],
    ("DataConfig", "eval_fraction"): [0.0, 1.0, -0.5, 2.0], ("DataConfig", "split_seed"): [-1],
    ("DataConfig", "batch_size"): [0, -1], ("DataConfig", "eval_batches"): [-1],
    ("SampleConfig", "max_new_tokens"): [-1, 10_000], ("SampleConfig", "temperature"): [-0.5],
    ("SampleConfig", "top_k"): [-1],
    ("TrainConfig", "steps"): [0, -1], ("TrainConfig", "log_every"): [0], ("TrainConfig", "eval_every"): [0],
    ("TrainConfig", "checkpoint_every"): [0], ("TrainConfig", "keep_checkpoints"): [0],
    ("DistributedConfig", "initialize"): ["sometimes", ""], ("DistributedConfig", "num_processes"): [-1],
    ("DistributedConfig", "process_id"): [-2],
    ("InitConfig", "step"): [-2],
    ("ModelRuntimeConfig", "dropout"): [1.0, -0.5], ("ModelRuntimeConfig", "dtype"): ["fp8"],
    ("ModelRuntimeConfig", "logits_dtype"): ["half"],
    ("ModelRuntimeConfig", "remat"): ["x"], ("ModelRuntimeConfig", "attention"): ["y"],
    ("ChatDataConfig", "sources"): [[], [""]], ("ChatDataConfig", "eval_fraction"): [0.0, 1.0],
    ("ChatDataConfig", "split_seed"): [-1], ("ChatDataConfig", "batch_size"): [0],
    ("ChatDataConfig", "eval_batches"): [-1],
    ("ChatSampleConfig", "num_prompts"): [-1], ("ChatSampleConfig", "max_new_tokens"): [0],
    ("ChatSampleConfig", "temperature"): [-1.0], ("ChatSampleConfig", "top_k"): [-1],
    ("ChatSampleConfig", "top_p"): [0.0, 1.5],
    ("JudgeConfig", "name"): ["gpt4", ""], ("JudgeConfig", "min_gap"): [-0.1],
    ("LabelConfig", "num_prompts"): [-1], ("LabelConfig", "responses_per_prompt"): [1, 0],
    ("LabelConfig", "batch_size"): [0],
    ("PreferenceDataConfig", "sources"): [[], [""]], ("PreferenceDataConfig", "eval_fraction"): [0.0, 1.5],
    ("PreferenceDataConfig", "split_seed"): [-1], ("PreferenceDataConfig", "batch_size"): [0],
    ("PreferenceDataConfig", "max_responses"): [1, 0], ("PreferenceDataConfig", "eval_batches"): [-1],
    ("RewardHeadConfig", "head_init_std"): [0.0, -1.0], ("RewardHeadConfig", "margin_scale"): [-1.0],
    ("RewardHeadConfig", "normalize_samples"): [-1], ("RewardHeadConfig", "normalize_max_new_tokens"): [0],
    ("PPOAlgoConfig", "rollout_batch_size"): [0], ("PPOAlgoConfig", "minibatch_size"): [0, 5],
    ("PPOAlgoConfig", "epochs"): [0], ("PPOAlgoConfig", "max_new_tokens"): [0],
    ("PPOAlgoConfig", "temperature"): [0.0, -1.0], ("PPOAlgoConfig", "top_k"): [-1],
    ("PPOAlgoConfig", "top_p"): [0.0, 1.1], ("PPOAlgoConfig", "kl_estimator"): ["k2", ""],
    ("PPOAlgoConfig", "init_beta"): [-0.1], ("PPOAlgoConfig", "target_kl"): [-1.0],
    ("PPOAlgoConfig", "kl_horizon"): [0], ("PPOAlgoConfig", "truncation_penalty"): [-1.0],
    ("PPOAlgoConfig", "gamma"): [1.1, -0.1], ("PPOAlgoConfig", "lam"): [1.5, -0.5],
    ("PPOAlgoConfig", "clip_eps"): [0.0, -0.2], ("PPOAlgoConfig", "vf_coef"): [-0.1],
    ("PPOAlgoConfig", "entropy_coef"): [-0.01], ("PPOAlgoConfig", "max_approx_kl"): [-1.0],
    ("PPOAlgoConfig", "ptx_coef"): [-1.0], ("PPOAlgoConfig", "critic"): ["both"],
    ("PPOAlgoConfig", "critic_init"): ["random"], ("PPOAlgoConfig", "value_head_init_std"): [0.0],
    ("PPOAlgoConfig", "num_eval_prompts"): [-1],
}
_STAGE_FIELDS_OUT_OF_RANGE = {"seed": [-1], "workdir": [""]}
_REQUIRED = {"sft": {"init": {"checkpoint": "runs/pretrain"}}, "label": {"init": {"checkpoint": "runs/sft"}},
             "reward": {"init": {"checkpoint": "runs/sft"}},
             "dpo": {"init": {"checkpoint": "runs/sft"}}, "feedback": {"init": {"checkpoint": "runs/ppo"}},
             **{stage: {"init": {"checkpoint": "runs/sft"}, "reward_model": {"checkpoint": "runs/reward"}}
                for stage in ("ppo", "grpo", "rloo", "rsft")}}


def _defaults(cls: type) -> dict[str, typing.Any]:
  """The dataclass's field defaults as plain dicts and lists (what a config file holds), without checking them."""
  out = {}
  for f in dataclasses.fields(cls):
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    out[f.name] = config_lib.to_dict(value) if dataclasses.is_dataclass(value) else (
        list(value) if isinstance(value, tuple) else value)
  return out


def _base_config(stage: str) -> dict[str, typing.Any]:
  base = _defaults(config_lib.STAGE_CONFIGS[stage])
  for group, values in _REQUIRED.get(stage, {}).items():
    base[group].update(values)
  return base


def _leaves(cls: type, path: tuple[str, ...] = ()):
  """(path, owning class, type hint) of every field, groups included, depth first."""
  for name, hint in typing.get_type_hints(cls).items():
    yield path + (name,), cls, hint
    if dataclasses.is_dataclass(hint):
      yield from _leaves(hint, path + (name,))


def _wrong_types(hint: typing.Any) -> list[typing.Any]:
  if dataclasses.is_dataclass(hint):
    return [3, "model", [1], None, True]
  if typing.get_origin(hint) is tuple:
    return ["one source", [1], [None], None, 5, {"a": 1}, [["nested"]]]
  return {int: ["3", 3.5, None, [1], True, {"a": 1}, float("nan"), 2**31, -2**31 - 1, 10**100],
          float: ["0.1", None, True, [0.1], float("nan"), float("inf"), -float("inf"), 10**400],
          str: [3, None, ["a"], True, 1.5],
          bool: [1, "true", None, 0.0, []]}.get(hint, [])


def config_cases(rng: random.Random, full: bool = True) -> list[tuple[str, dict[str, typing.Any], str]]:
  """(name, config, the key its error must name) for every stage config.

  The pipeline nests every stage's groups again; without `full` it gets two wrong types per key (drawn by `rng`)
  instead of all, enough to check that its messages name the nested key.
  """
  cases = []
  def mutate(stage, path, value, key=None, delete=False):
    config = _base_config(stage)
    node = config
    for part in path[:-1]:
      node = node[part]
    if delete:
      del node[path[-1]]
    else:
      node[path[-1]] = value
    cases.append((f"{stage}:{'.'.join(path)}={value!r:.40}", config, key or ".".join(path)))

  for stage, cls in config_lib.STAGE_CONFIGS.items():
    for path, owner, hint in _leaves(cls):
      if path == ("stage",):
        continue
      wrong = _wrong_types(hint)
      for value in wrong if full or stage != "pipeline" else rng.sample(wrong, min(2, len(wrong))):
        mutate(stage, path, value)
      table = _STAGE_FIELDS_OUT_OF_RANGE if owner in config_lib.STAGE_CONFIGS.values() else {}
      for value in _OUT_OF_RANGE.get((owner.__name__, path[-1]), table.get(path[-1], [])):
        mutate(stage, path, value)
      if dataclasses.is_dataclass(hint):
        fields = [f.name for f in dataclasses.fields(hint)]
        name = rng.choice(fields)
        typo = name[:-2] + name[-1] + name[-2] if len(name) > 2 else name + "x"
        for unknown in {typo, name.upper(), "extra_" + name, "1"} - set(fields):
          mutate(stage, path + (unknown,), 1)
    for unknown in ("stpes", "model_name", "Seed"):
      mutate(stage, (unknown,), 1)
    mutate(stage, ("stage",), "s" + stage, key="stage")
  return cases


def _config_problems(cases) -> list[str]:
  problems = []
  for name, config, key in cases:
    try:
      config_lib.stage_config(config)
    except config_lib.ConfigError as e:
      if not str(e).startswith(f"config.{key}"):
        problems.append(f"{name}: the message does not start with config.{key}: {str(e)[:200]}")
      elif len(str(e)) > 2000 or "\n" in str(e):
        problems.append(f"{name}: not a one-line message of reasonable length")
    except Exception as e:  # pylint: disable=broad-except
      problems.append(f"{name}: raised {type(e).__name__}: {str(e)[:200]}")
    else:
      problems.append(f"{name}: accepted")
  return problems


def test_config_fuzz_every_key_of_every_stage():
  for stage in config_lib.STAGE_CONFIGS:  # the bases themselves are valid
    config_lib.stage_config(_base_config(stage))
  cases = config_cases(random.Random(SEED), full=False)
  assert len(cases) >= 1000
  problems = _config_problems(cases)
  assert not problems, f"{len(problems)} of {len(cases)} configs misbehaved:\n" + "\n".join(problems[:40])


@pytest.mark.parametrize("stage,changes,keys", [
    ("pretrain", {"model": {"num_heads": 3}}, ("model.d_model", "model.num_heads")),
    ("pretrain", {"optim": {"grad_accum_steps": 3}}, ("data.batch_size", "optim.grad_accum_steps")),
    ("pretrain", {"mesh": {"data": -1, "fsdp": -1}}, ("mesh",)),
    ("pretrain", {"model": {"pos_embedding": "rope", "d_model": 12, "num_heads": 4}}, ("model.d_model",)),
    ("ppo", {"ppo": {"critic": "shared", "critic_init": "reward"}}, ("ppo.critic_init", "ppo.critic")),
    ("ppo", {"ppo": {"ptx_coef": 0.5, "ptx_sources": []}}, ("ppo.ptx_sources",)),
])
def test_cross_field_config_errors_name_one_of_the_keys(stage, changes, keys):
  config = _base_config(stage)
  for group, values in changes.items():
    config[group].update(values)
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.stage_config(config)
  assert str(err.value).startswith(tuple(f"config.{k}" for k in keys)), str(err.value)


# ----------------------------------------------------------------------------------------------
# The expensive sweep: more seeds, every case of every format.


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_fuzz_sweep_more_seeds(tmp_path, tok, caplog, seed):
  for name, make, neighbours, load in (
      ("pretrain", pretrain_cases, _pretrain_neighbours, _load_pretrain(caplog)),
      ("sft", sft_cases, _sft_neighbours, _load_sft(tok)),
      ("comparisons", comparison_cases, _comparison_neighbours, _load_comparisons(tok))):
    rng = random.Random(seed)
    cases = make(rng)
    folder = tmp_path / name
    folder.mkdir()
    problems = _check_cases(folder, cases, neighbours(rng), rng, load)
    assert not problems, f"{name}, seed {seed}: " + _report(problems, cases)
  problems = _config_problems(config_cases(random.Random(seed)))
  assert not problems, f"configs, seed {seed}:\n" + "\n".join(problems[:40])


# ----------------------------------------------------------------------------------------------
# End to end through the launcher: exit code, one line naming the place, no traceback.


def _launch(config: str, **flags) -> list[str]:
  return [sys.executable, "-m", "gptrl.launch", "--config", str(REPO / f"configs/{config}")] + [
      f"--config.{k}={v}" for k, v in flags.items()]


def test_launcher_reports_bad_input_in_one_line(tmp_path):
  """Each stage's reader refuses a bad line before any model or checkpoint is touched."""
  good_chat = json.dumps({"prompt": "good day", "response": "well met"})
  files = {
      "pretrain": (["{\"text\": \"good day to you\"}"] * 3 + ['{"text": 42}'], 4, "'text'"),
      "sft": ([good_chat, '{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}'],
              2, "messages[1].role"),
      "reward": ([json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})] * 2 + [
          '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}'], 3, "'margin'"),
  }
  cache = tmp_path / "cache"
  runs = {}
  for stage, (lines, _, _) in files.items():
    path = tmp_path / f"{stage}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    flags = {"workdir": tmp_path / f"run_{stage}", "data.sources": f"('{path}',)", "data.cache_dir": cache}
    if stage != "pretrain":
      flags["init.checkpoint"] = tmp_path / "no_such_run"
    runs[stage] = (path, _launch(f"{stage}_cpu.py:tiny", **flags))
  bad_config = tmp_path / "bad_config.py"
  bad_config.write_text("def get_config():\n  return {'stage': 'pretrain',\n          'train': {'steps': 1 / 0}}\n")
  runs["config file"] = (bad_config, [sys.executable, "-m", "gptrl.launch", "--config", str(bad_config)])
  runs["override"] = (None, _launch("pretrain_cpu.py:tiny", **{"optim.lr": "nan", "workdir": tmp_path / "o"}))
  # All at once: each is mostly interpreter and JAX start-up.
  procs = {name: subprocess.Popen(argv, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for name, (_, argv) in runs.items()}
  results = {name: proc.communicate(timeout=300) + (proc.returncode,) for name, proc in procs.items()}
  expected = {stage: f"{runs[stage][0]}:{line}:" for stage, (_, line, _) in files.items()}
  expected["config file"] = f"{bad_config}:3:"
  expected["override"] = "config.optim.lr:"
  fields = {**{stage: field for stage, (_, _, field) in files.items()}, "config file": "ZeroDivisionError",
            "override": "finite"}
  for name, (_, stderr, code) in results.items():
    assert code not in (0, None), f"{name}: exit code {code}\n{stderr[-2000:]}"
    assert "Traceback" not in stderr, f"{name}:\n{stderr[-3000:]}"
    lines = [line for line in stderr.splitlines() if line.startswith("gptrl.launch:")]
    assert len(lines) == 1 and expected[name] in lines[0] and fields[name] in lines[0], f"{name}:\n{stderr[-2000:]}"


def test_nan_margins_never_reach_the_loss(tmp_path, tok):
  """The batch the reward model trains on holds finite margins only, whatever the file said."""
  lines = [json.dumps({"prompt": f"p {i}", "chosen": "a", "rejected": "b", "margin": m})
           for i, m in enumerate([0.5, -2.0, 1e6, 0])]
  path = tmp_path / "c.jsonl"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  enc = chat_data.encode_comparisons(chat_data.load_comparisons([str(path)], max_responses=2), tok, max_len=MAX_LEN,
                                     max_responses=2)
  assert np.all(np.isfinite(enc.margins)) and sorted(enc.margins[:, 0, 1].tolist()) == [-2.0, 0.0, 0.5, 1e6]
  assert math.isfinite(float(enc.margins.astype(np.float32).max()))
