"""The chat template: the one definition of how a conversation becomes tokens, used by every stage after
pretraining (SFT, labelling, the reward model, PPO) and by sampling.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`. Its tokens:

  <eos>  <|system|> content <|end|>  <|user|> content <|end|>  <|assistant|> content <|end|>  ...

- The leading <eos> is the document boundary the base model saw between pretraining documents, so a chat
  starts where a pretraining document would.
- Each turn is its role marker, the content's tokens, then <|end|>. Role markers are reserved ids of the
  tokenizer (gptrl/tokenizer.py), never produced by encoding content: any literal marker text inside a
  message ("<|user|>") is encoded byte by byte through the byte-fallback pieces, so it decodes back to the
  same characters but cannot open a turn.
- A prompt for generation is the conversation so far followed by <|assistant|>; the reply is everything the
  model emits up to its <|end|> (or <eos>).
- Loss weights (SFT) are 1 on the tokens of assistant contents and on their <|end|> (the model must learn to
  stop), 0 elsewhere: system and user text, role markers and padding.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import numpy as np

from gptrl import tokenizer as tokenizer_lib

ROLES = ("system", "user", "assistant")
_MARKERS = tokenizer_lib.USER_DEFINED_SYMBOLS[1:]  # the role markers and <|end|>; "\n" is ordinary text
# One pattern for all markers: a single left-to-right scan, linear in the text even when it holds many markers.
_MARKER_PATTERN = re.compile("|".join(re.escape(m) for m in _MARKERS))


class ChatFormatError(ValueError):
  """A conversation record is malformed; the message names where it came from and what was expected."""


@dataclasses.dataclass(frozen=True)
class Message:
  role: str
  content: str


def _role_ids(tok: tokenizer_lib.Tokenizer) -> dict[str, int]:
  return {"system": tok.system_id, "user": tok.user_id, "assistant": tok.assistant_id}


def encode_content(text: str, tok: tokenizer_lib.Tokenizer) -> list[int]:
  """Token ids of message text; literal role-marker strings are spelled in byte pieces, not as markers."""
  ids: list[int] = []
  start = 0
  for hit in _MARKER_PATTERN.finditer(text):
    if hit.start() > start:
      ids.extend(tok.encode(text[start:hit.start()]))
    ids.extend(tokenizer_lib.NUM_RESERVED - 256 + b for b in hit.group().encode("utf-8"))
    start = hit.end()
  if start < len(text):
    ids.extend(tok.encode(text[start:]))
  return ids


def _as_messages(value: Any, where: str) -> list[Message]:
  if (isinstance(value, Mapping) and set(value) == {"role", "content"} and isinstance(value["role"], list)
      and isinstance(value["content"], list) and len(value["role"]) == len(value["content"])):
    # Columnar form, as TFDS returns a Sequence of {role, content} features: {"role": [...], "content": [...]}.
    value = [{"role": r, "content": c} for r, c in zip(value["role"], value["content"])]
  if not isinstance(value, list) or not value:
    got = "an empty list" if isinstance(value, list) else _describe(value)
    raise ChatFormatError(f"{where}: field 'messages' must be a non-empty list of "
                          f"{{'role', 'content'}} objects, got {got}.")
  out = []
  for i, m in enumerate(value):
    if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
      missing = [k for k in ("role", "content") if k not in m] if isinstance(m, Mapping) else []
      raise ChatFormatError(f"{where}: messages[{i}] must be an object with 'role' and 'content'"
                            + (f"; {' and '.join(repr(k) for k in missing)} missing" if missing else "")
                            + f", got {_describe(m)}.")
    role, content = m["role"], m["content"]
    if not isinstance(role, str) or role not in ROLES:
      raise ChatFormatError(f"{where}: messages[{i}].role must be one of {list(ROLES)}, got {_describe(role)}.")
    _check_text(content, f"messages[{i}].content", where)
    if role == "system" and i != 0:
      raise ChatFormatError(f"{where}: messages[{i}] is a system message; only the first message may be one.")
    out.append(Message(role, content))
  return out


def record_keys(record: Mapping[str, Any]) -> str:
  """The first keys of a record, each cut short, for messages about a record that holds the wrong ones."""
  keys = sorted(str(k) for k in record)
  return "[" + ", ".join(repr(k[:40]) for k in keys[:20]) + (", ..." if len(keys) > 20 else "") + "]"


def _describe(value: Any) -> str:
  """A short description of a bad value for messages: its JSON type and the start of its text."""
  kind = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "the string",
          list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
  return f"{kind} {value!r:.60}" if value is not None else kind


def _check_text(value: Any, field: str, where: str) -> str:
  """`value` if it is a string with some non-whitespace text; ChatFormatError naming `field` otherwise."""
  if not isinstance(value, str):
    raise ChatFormatError(f"{where}: field {field!r} must be a string, got {_describe(value)}.")
  if not value.strip():
    raise ChatFormatError(f"{where}: field {field!r} is empty or whitespace only; give it text or drop the "
                          "record.")
  return value


def prompt_messages(record: Mapping[str, Any], where: str) -> list[Message]:
  """The prompt of a record: `"prompt": str` (one user turn) or `"messages": [...]` (a conversation so far).

  Every text must be a string holding something besides whitespace; ChatFormatError (naming `where` and the
  field) otherwise.
  """
  has_prompt, has_messages = "prompt" in record, "messages" in record
  if has_prompt == has_messages:
    raise ChatFormatError(f"{where}: expected exactly one of 'prompt' (a string) or 'messages' (a list of "
                          f"turns), got keys {record_keys(record)}.")
  if has_prompt:
    return [Message("user", _check_text(record["prompt"], "prompt", where))]
  return _as_messages(record["messages"], where)


def conversation(record: Mapping[str, Any], where: str) -> list[Message]:
  """A demonstration: `{"prompt", "response"}` or `{"messages": [...]}` with at least one assistant turn."""
  if "response" in record:
    messages = prompt_messages(record, where)
    messages = messages + [Message("assistant", _check_text(record["response"], "response", where))]
  elif "messages" in record:
    messages = _as_messages(record["messages"], where)
  else:
    raise ChatFormatError(f"{where}: expected {{'prompt', 'response'}} or {{'messages': [...]}}, got keys "
                          f"{record_keys(record)}.")
  if not any(m.role == "assistant" for m in messages):
    raise ChatFormatError(f"{where}: field 'messages': the conversation has no assistant turn, so nothing to learn "
                          "from.")
  return messages


def _turn_tokens(message: Message, tok: tokenizer_lib.Tokenizer) -> list[int]:
  return [_role_ids(tok)[message.role]] + encode_content(message.content, tok) + [tok.end_of_turn_id]


def render(messages: Sequence[Message], tok: tokenizer_lib.Tokenizer, *,
           add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
  """Tokens of a conversation and their loss mask.

  Returns:
    (tokens, trainable): trainable[i] = 1 if tokens[i] is part of an assistant content or its <|end|>.
    With `add_generation_prompt`, <|assistant|> is appended (not trainable).
  """
  tokens, trainable = [tok.eos_id], [0]
  for m in messages:
    turn = _turn_tokens(m, tok)
    tokens.extend(turn)
    trainable.extend([0] + [int(m.role == "assistant")] * (len(turn) - 1))
  if add_generation_prompt:
    tokens.append(tok.assistant_id)
    trainable.append(0)
  return tokens, trainable


def _suffix_lengths(turns: Sequence[list[int]]) -> list[int]:
  """lengths[i] = total tokens of turns[i:] (lengths[len(turns)] = 0)."""
  lengths = [0] * (len(turns) + 1)
  for i in range(len(turns) - 1, -1, -1):
    lengths[i] = lengths[i + 1] + len(turns[i])
  return lengths


def prompt_tokens(messages: Sequence[Message], tok: tokenizer_lib.Tokenizer, *, max_tokens: int) -> list[int]:
  """The generation prompt for `messages`, keeping the system message and the most recent turns that fit.

  Each turn is encoded once (a long conversation costs one pass of the tokenizer, not one per candidate cut).
  If not even the last turn fits in `max_tokens`, its end (the most recent words) is kept behind a clean start.
  """
  messages = list(messages)
  system = [_turn_tokens(messages[0], tok)] if messages and messages[0].role == "system" else []
  turns = [_turn_tokens(m, tok) for m in messages[len(system):]]
  if not turns:  # a system message alone is the whole prompt
    turns, system = system, []
  after = _suffix_lengths(turns)
  for start in range(len(turns)):
    for sys_part in (system, []):
      if 2 + sum(map(len, sys_part)) + after[start] <= max_tokens:  # 2: the leading <eos> and <|assistant|>
        return [tok.eos_id] + [t for turn in sys_part + turns[start:] for t in turn] + [tok.assistant_id]
  tokens = [tok.eos_id] + (turns[-1] if turns else []) + [tok.assistant_id]
  return [tok.eos_id] + tokens[len(tokens) - max_tokens + 1:]


def reply_tokens(generated: Sequence[int], tok: tokenizer_lib.Tokenizer) -> tuple[list[int], bool]:
  """Cuts a sampled continuation at the end of the assistant's turn.

  Returns:
    (content tokens without the stop token, finished): finished is False when no <|end|>/<eos> was produced.
  """
  for i, t in enumerate(generated):
    if t in (tok.end_of_turn_id, tok.eos_id):
      return list(generated[:i]), True
  return [t for t in generated if t != tok.pad_id], False


def decode_reply(generated: Sequence[int], tok: tokenizer_lib.Tokenizer) -> str:
  """The text of a sampled reply (up to <|end|>); other role markers the model emitted are dropped."""
  content, _ = reply_tokens(generated, tok)
  special = {tok.system_id, tok.user_id, tok.assistant_id, tok.end_of_turn_id, tok.eos_id, tok.bos_id, tok.pad_id}
  return tok.decode([t for t in content if t not in special])


def parse(tokens: Sequence[int], tok: tokenizer_lib.Tokenizer) -> list[Message]:
  """Inverse of `render`: the messages in a rendered token sequence (a trailing open turn is kept)."""
  roles = {v: k for k, v in _role_ids(tok).items()}
  messages: list[Message] = []
  role, content = None, []
  for t in tokens:
    if t in roles:
      role, content = roles[t], []
    elif t == tok.end_of_turn_id and role is not None:
      messages.append(Message(role, tok.decode(content)))
      role = None
    elif role is not None:
      content.append(t)
  if role is not None:
    messages.append(Message(role, tok.decode(content)))
  return messages


@dataclasses.dataclass(frozen=True)
class Encoded:
  """One training example: `tokens` (length <= max_len + 1) and per-token loss weights of the same length."""
  tokens: np.ndarray
  trainable: np.ndarray
  dropped_turns: int  # leading turns removed to fit
  truncated: bool = False  # True when turns were dropped or the last reply was cut to fit


def encode_for_training(messages: Sequence[Message], tok: tokenizer_lib.Tokenizer, *,
                        max_len: int) -> Encoded | None:
  """Renders a demonstration for SFT, truncating it to `max_len + 1` tokens (inputs and shifted targets).

  Truncation keeps the most recent turns: trailing non-assistant turns are dropped (nothing to learn), then
  the oldest turns after the system message (kept while it fits) until the rest fits; if the final exchange
  alone is too long, its end is cut, keeping the prompt and the first part of the reply. Each turn is encoded
  once, however many cuts are tried.

  Returns:
    The encoded example, or None when no assistant token is left to train on.
  """
  messages = list(messages)
  while messages and messages[-1].role != "assistant":
    messages.pop()
  if not messages:
    return None
  has_system = messages[0].role == "system"
  encoded = [_turn_tokens(m, tok) for m in messages]
  system, turns = encoded[:int(has_system)], encoded[int(has_system):]
  roles = [m.role for m in messages[int(has_system):]]

  def assemble(sys_part: list[list[int]], first: int) -> tuple[list[int], list[int]]:
    tokens, trainable = [tok.eos_id], [0]
    for turn, role in zip(sys_part + turns[first:], ["system"] * len(sys_part) + roles[first:]):
      tokens.extend(turn)
      trainable.extend([0] + [int(role == "assistant")] * (len(turn) - 1))
    return tokens, trainable

  budget = max_len + 1
  after = _suffix_lengths(turns)
  for start in range(len(turns)):
    if roles[start] == "assistant" and start > 0:
      continue  # a conversation should not start with an assistant turn when its prompt can be kept
    for sys_part in (system, []):
      if 1 + sum(map(len, sys_part)) + after[start] <= budget:
        tokens, trainable = assemble(sys_part, start)
        return Encoded(np.asarray(tokens, np.int32), np.asarray(trainable, np.int32), start,
                       truncated=start > 0 or len(sys_part) < len(system))
  first = max(len(turns) - 2, 0)
  tokens, trainable = assemble([], first)
  tokens, trainable = tokens[:budget], trainable[:budget]
  # Targets are tokens[1:]: an example needs a trainable token past position 0.
  if sum(trainable[1:]) == 0:
    return None
  return Encoded(np.asarray(tokens, np.int32), np.asarray(trainable, np.int32), first, truncated=True)
