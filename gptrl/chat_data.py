"""Data for the stages after pretraining: conversations (SFT, prompts for labelling and PPO) and comparisons
(reward model), from JSONL, TFDS or the built-in Shakespeare dialogue, into fixed-shape grain batches.

SFT batches: {"inputs", "targets": int32[b, L], "weights": float32[b, L]}; one conversation per row, right-
padded, weights 1 on assistant tokens only (see gptrl/chat.py).

Reward batches, one prompt per row with up to K of its responses (InstructGPT: all the comparisons of a prompt
in one batch element, so each prompt counts once and its K responses need K forward passes, not 2 per pair):
  "tokens":    int32[b, K, L]    prompt + response + <|end|>, right-padded
  "last":      int32[b, K]       index of the last token (the reward is read there)
  "pairs":     float32[b, K, K]  pairs[i, j] = 1 if response i is preferred over response j
  "margins":   float32[b, K, K]  optional per-pair margin (0 when the record gives none)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from typing import Any, Collection, Sequence

import grain
import numpy as np

from gptrl import chat
from gptrl import data as data_lib
from gptrl import fileio
from gptrl import seeds
from gptrl import tokenizer as tokenizer_lib
from gptrl.data import DataError

Batch = dict[str, np.ndarray]

_CHAT_EXPECTED = "{'prompt', 'response'} or {'messages': [{'role', 'content'}, ...]}"
PREF_EXPECTED = ("{'prompt' or 'messages', 'chosen', 'rejected'} or {'prompt' or 'messages', 'responses', "
                  "'ranking'}")
# Margins are differences of ratings or judge scores; far below float32's limit, so a margin never becomes inf.
_MAX_MARGIN = 1e6


@dataclasses.dataclass(frozen=True)
class Conversation:
  where: str  # file:line or source#id
  group: str  # split unit: records of one group land on the same side (e.g. one play)
  messages: tuple[chat.Message, ...]


def prompt_and_reply(conv: Conversation) -> tuple[list[chat.Message], str] | None:
  """The conversation cut before its last assistant turn, and that turn's text; None without a prompt before it."""
  messages = list(conv.messages)
  while messages and messages[-1].role != "assistant":
    messages.pop()
  return (messages[:-1], messages[-1].content) if len(messages) >= 2 else None


def _builtin_sources(cache_dir: str | None) -> dict[str, Any]:
  def dialogue():
    from gptrl import corpus, dialogue as dialogue_lib  # pylint: disable=import-outside-toplevel
    records = dialogue_lib.shakespeare_dialogues(corpus.shakespeare_documents(cache_dir))
    return [(f"shakespeare_dialogue:{r['id']}", r) for r in records]
  return {"shakespeare_dialogue": dialogue}


def load_conversations(sources: Sequence[str], *, cache_dir: str | None = None) -> list[Conversation]:
  """Every demonstration of `sources`, validated.

  Fields other than the chat's own and `group` (a string or integer) are ignored, so records may carry ids or
  metadata. A bad record raises DataError naming file:line and the field (see chat.conversation).
  """
  out = []
  for where, record in data_lib.load_records(sources, expected=_CHAT_EXPECTED, builtin=_builtin_sources(cache_dir)):
    try:
      messages = chat.conversation(record, where)
    except chat.ChatFormatError as e:
      raise DataError(str(e)) from None
    group = record.get("group", where)
    if isinstance(group, bool) or not isinstance(group, (str, int)):
      raise DataError(f"{where}: field 'group' must be a string or an integer (records of one group stay on one "
                      f"side of the train/eval split), got {type(group).__name__} {group!r:.60}.")
    out.append(Conversation(where, str(group), tuple(messages)))
  if not out:
    raise DataError(f"data sources {list(sources)}: no conversation found.")
  return out


def split_by_group(items: Sequence[Any], *, eval_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
  """(train, eval) by each item's `.group`, deterministically; both sides non-empty when possible.

  Groups are ranked as data.split_documents ranks them, so with the same seed and a matching fraction the
  built-in dialogue holds out the plays that pretraining held out (groups are the plays' document groups).
  """
  groups = sorted({x.group for x in items})
  scored = sorted(groups, key=lambda g: (data_lib.unit_hash(seed, g), g))
  n_eval = min(max(1, round(eval_fraction * len(groups))), len(groups) - 1) if len(groups) > 1 else 0
  eval_groups = set(scored[:n_eval])
  return ([x for x in items if x.group not in eval_groups], [x for x in items if x.group in eval_groups])


@dataclasses.dataclass
class SFTExamples:
  tokens: list[np.ndarray]
  trainable: list[np.ndarray]
  skipped: int  # conversations with no trainable token left after truncation
  truncated: int  # conversations that lost leading turns or the end of their last reply

  @property
  def trainable_tokens(self) -> int:
    return int(sum(t[1:].sum() for t in self.trainable))


def encode_sft(conversations: Sequence[Conversation], tok: tokenizer_lib.Tokenizer, *, max_len: int) -> SFTExamples:
  """Renders and truncates each conversation (see chat.encode_for_training); counts what was skipped."""
  tokens, trainable, skipped, truncated = [], [], 0, 0
  for conv in conversations:
    enc = chat.encode_for_training(conv.messages, tok, max_len=max_len)
    if enc is None:
      skipped += 1
      continue
    truncated += int(enc.truncated)
    tokens.append(enc.tokens)
    trainable.append(enc.trainable)
  return SFTExamples(tokens, trainable, skipped, truncated)


class _RowsToSFTBatch:
  """Example ids of one global batch -> this process's padded rows."""

  def __init__(self, examples: SFTExamples, seq_len: int, pad_id: int, lo: int, hi: int):
    self._ex, self._seq_len, self._pad = examples, seq_len, pad_id
    self._lo, self._hi = lo, hi

  def __call__(self, ids: np.ndarray) -> Batch:
    ids = np.asarray(ids, np.int64).reshape(-1)[self._lo:self._hi]
    rows = self._hi - self._lo
    seq = np.full((rows, self._seq_len + 1), self._pad, np.int32)
    weights = np.zeros((rows, self._seq_len + 1), np.float32)
    for r, i in enumerate(ids):
      t, w = self._ex.tokens[i], self._ex.trainable[i]
      seq[r, :len(t)] = t
      weights[r, :len(w)] = w
    return {"inputs": seq[:, :-1].copy(), "targets": seq[:, 1:].copy(), "weights": weights[:, 1:].copy()}


def _read_options() -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _shard_bounds(global_batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
  if global_batch_size % process_count:
    raise DataError(f"global batch size {global_batch_size} is not divisible by process_count={process_count}.")
  per = global_batch_size // process_count
  return process_index * per, (process_index + 1) * per


def sft_dataset(examples: SFTExamples, *, seq_len: int, pad_id: int, seed: int, global_batch_size: int,
                process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                num_epochs: int | None = None) -> grain.IterDataset:
  """Shuffled (per epoch), repeated, fixed-shape SFT batches; the iterator state is checkpointable."""
  n = len(examples.tokens)
  if n == 0:
    raise DataError("no SFT example left to train on: every conversation was skipped (its prompt fills the "
                    "context, leaving no reply token to train on); use shorter prompts or a longer context.")
  lo, hi = _shard_bounds(global_batch_size, process_index, process_count)
  ds = data_lib.index_batches(n, seed=seed, batch_size=global_batch_size, shuffle=shuffle, num_epochs=num_epochs)
  return ds.map(_RowsToSFTBatch(examples, seq_len, pad_id, lo, hi)).to_iter_dataset(_read_options())


def sft_eval_batches(examples: SFTExamples, *, seq_len: int, pad_id: int, batch_size: int,
                     max_batches: int = 0, process_index: int = 0, process_count: int = 1) -> list[Batch]:
  """Every eval example once, in order; the last batch padded with weight-0 rows. None at all: []."""
  if not examples.tokens:  # a single group (nothing held out), or every held-out conversation skipped
    logging.warning("No held-out SFT example to evaluate on; eval/loss will be 0 over 0 tokens.")
    return []
  ds = sft_dataset(examples, seq_len=seq_len, pad_id=pad_id, seed=0, global_batch_size=batch_size,
                   process_index=process_index, process_count=process_count, shuffle=False, num_epochs=1)
  batches = []
  for i, batch in enumerate(ds):
    if max_batches and i >= max_batches:
      break
    if batch["inputs"].shape[0] < (batch_size // process_count):  # grain's final partial batch
      pad = batch_size // process_count - batch["inputs"].shape[0]
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    batches.append(batch)
  return batches


# ----------------------------------------------------------------------------------------------
# Comparisons for the reward model.


@dataclasses.dataclass
class PromptComparisons:
  """All the compared responses to one prompt (at most K of them) and which beat which."""
  prompt: tuple[chat.Message, ...]
  responses: list[str]
  pairs: list[tuple[int, int, float]]  # (winner index, loser index, margin)
  where: list[str]
  labellers: list[str] = dataclasses.field(default_factory=list)  # per record: `record_labeller`

  @property
  def group(self) -> str:
    return json.dumps([dataclasses.astuple(m) for m in self.prompt])


def pairs_of_record(record: dict[str, Any], where: str) -> tuple[list[str], list[tuple[int, int, float]]]:
  """(responses, [(winner, loser, margin)]) of one pairwise or ranked record; DataError on anything wrong."""
  def text(value, name):
    if not isinstance(value, str) or not value.strip():
      raise DataError(f"{where}: field {name!r} must be a non-empty string, got {value!r:.60}.")
    return value
  margin = record.get("margin", 0.0)
  if not isinstance(margin, (int, float)) or isinstance(margin, bool):
    raise DataError(f"{where}: field 'margin' must be a number, got {type(margin).__name__} {margin!r:.60}.")
  try:
    margin = float(margin)
  except OverflowError:
    margin = math.inf
  # NaN/Infinity are valid JSON to Python's parser, and a margin past float32's range becomes inf in the batch.
  if not math.isfinite(margin) or abs(margin) > _MAX_MARGIN:
    raise DataError(f"{where}: field 'margin' must be a finite number of magnitude at most {_MAX_MARGIN:g}, "
                    f"got {margin!r:.60}.")
  pairwise, ranked = ("chosen" in record or "rejected" in record), ("responses" in record or "ranking" in record)
  if pairwise and ranked:
    raise DataError(f"{where}: a record is either pairwise ('chosen', 'rejected') or ranked ('responses', "
                    f"'ranking'), not both; got keys {chat.record_keys(record)}.")
  if pairwise:
    for name in ("chosen", "rejected"):
      if name not in record:
        raise DataError(f"{where}: a pairwise comparison needs both 'chosen' and 'rejected'; {name!r} is missing.")
    chosen, rejected = text(record["chosen"], "chosen"), text(record["rejected"], "rejected")
    if chosen == rejected:
      raise DataError(f"{where}: 'chosen' and 'rejected' are the same text; a comparison needs two different "
                      "responses.")
    return [chosen, rejected], [(0, 1, margin)]
  if ranked:
    for name in ("responses", "ranking"):
      if name not in record:
        raise DataError(f"{where}: a ranked comparison needs both 'responses' and 'ranking'; {name!r} is missing.")
    responses, ranking = record["responses"], record["ranking"]
    if not isinstance(responses, list) or len(responses) < 2:
      got = f"{len(responses)} item(s)" if isinstance(responses, list) else f"{type(responses).__name__}"
      raise DataError(f"{where}: field 'responses' must be a list of at least 2 strings, got {got}.")
    responses = [text(r, f"responses[{i}]") for i, r in enumerate(responses)]
    if len(set(responses)) != len(responses):
      raise DataError(f"{where}: field 'responses' holds the same text twice; each ranked response must differ.")
    k = len(responses)
    if (not isinstance(ranking, list) or any(isinstance(r, bool) or not isinstance(r, int) for r in ranking)
        or sorted(ranking) != list(range(k))):
      raise DataError(f"{where}: field 'ranking' must list the indices 0..{k - 1} of 'responses' once each, best "
                      f"first; got {ranking!r:.80}.")
    # A ranking of K responses gives all K(K-1)/2 pairs.
    return responses, [(ranking[a], ranking[b], margin) for a in range(k) for b in range(a + 1, k)]
  raise DataError(f"{where}: expected {PREF_EXPECTED}; got keys {chat.record_keys(record)}.")


SIMULATED_USER = "user:simulated:"  # the feedback stage's users played by a judge: user:simulated:<judge>


def record_labeller(record: dict[str, Any]) -> str:
  """Who labelled a comparison record: "judge:<name>" for an automatic judge (the labelling stage writes
  "judge"; the feedback stage's simulated users, "user:simulated:<name>", are that judge too), the record's
  "labeller" otherwise (the labelling page writes "human" or a name, gptrl.serve "user[:<name>]"), or "unknown"."""
  if isinstance(record.get("judge"), str) and record["judge"]:
    return f"judge:{record['judge']}"
  labeller = record.get("labeller")
  if isinstance(labeller, str) and labeller.startswith(SIMULATED_USER) and len(labeller) > len(SIMULATED_USER):
    return "judge:" + labeller[len(SIMULATED_USER):]
  if isinstance(labeller, str) and labeller:
    return labeller
  return "unknown"


def gold_judge(groups: Sequence[PromptComparisons]) -> str | None:
  """The automatic judge that labelled every record of `groups`, or None when people (or several judges, or
  unknown labellers) did: only then is there a *gold* score to measure a policy by."""
  names = {name for g in groups for name in g.labellers}
  if len(names) == 1 and next(iter(names)).startswith("judge:"):
    return next(iter(names))[len("judge:"):]
  return None


def load_comparisons(sources: Sequence[str], *, max_responses: int,
                     drop_labellers: Collection[str] = ()) -> list[PromptComparisons]:
  """Comparisons grouped by prompt, each group holding at most `max_responses` distinct responses; the records
  of `drop_labellers` (`record_labeller` names) are left out.

  Pairwise records of the same prompt are merged (responses matched by text); a prompt with more distinct
  responses than `max_responses` is split into several groups. A single ranking longer than `max_responses`
  is refused: its pairs belong together.
  """
  groups: dict[str, list[PromptComparisons]] = {}
  order: list[PromptComparisons] = []
  n_records = 0
  for where, record in data_lib.load_records(sources, expected=PREF_EXPECTED):
    try:
      prompt = tuple(chat.prompt_messages(record, where))
    except chat.ChatFormatError as e:
      raise DataError(str(e)) from None
    if prompt[-1].role == "assistant":
      raise DataError(f"{where}: field 'messages': the prompt's last turn is the assistant's; the compared "
                      "responses must answer a user (or system) turn.")
    responses, pairs = pairs_of_record(record, where)
    if record_labeller(record) in drop_labellers:
      continue
    if len(responses) > max_responses:
      raise DataError(f"{where}: field 'responses' holds {len(responses)} ranked responses, more than "
                      f"data.max_responses={max_responses}; raise data.max_responses.")
    n_records += 1
    key = json.dumps([dataclasses.astuple(m) for m in prompt])
    target = None
    for g in groups.get(key, []):
      if len(set(g.responses) | set(responses)) <= max_responses:
        target = g
        break
    if target is None:
      target = PromptComparisons(prompt, [], [], [])
      groups.setdefault(key, []).append(target)
      order.append(target)
    index = []
    for r in responses:
      if r not in target.responses:
        target.responses.append(r)
      index.append(target.responses.index(r))
    target.pairs.extend((index[w], index[l], m) for w, l, m in pairs)
    target.where.append(where)
    target.labellers.append(record_labeller(record))
  if not order:
    raise DataError(f"data sources {list(sources)}: no comparison found"
                    + (f" once the records of {sorted(drop_labellers)} were left out." if drop_labellers else "."))
  logging.info("%d comparison records -> %d prompt groups, %d pairs.", n_records, len(order),
               sum(len(g.pairs) for g in order))
  return order


@dataclasses.dataclass
class EncodedComparisons:
  tokens: np.ndarray  # int32[N, K, L]
  last: np.ndarray  # int32[N, K]
  pairs: np.ndarray  # float32[N, K, K]
  margins: np.ndarray  # float32[N, K, K]
  truncated: int = 0  # sequences whose prompt or response was cut to fit max_len
  first: np.ndarray | None = None  # int32[N, K]: where each response starts (for reward_model.pool_scores)
  ref_logp: np.ndarray | None = None  # float32[N, K]: DPO's reference log-probs of the responses, once computed

  def __post_init__(self):
    if self.first is None:
      object.__setattr__(self, "first", np.zeros_like(self.last))


def response_sequence(prompt: Sequence[chat.Message], response: str, tok: tokenizer_lib.Tokenizer, *,
                      max_len: int, return_start: bool = False) -> list[int] | tuple[list[int], int]:
  """Prompt + response + <|end|>, at most `max_len` tokens: the prompt keeps its latest turns, and a long
  response keeps its beginning (at least half the context is left to it). With return_start, also the position
  of the response's first token."""
  seq, _, start = _response_sequence(prompt, response, tok, max_len=max_len)
  return (seq, start) if return_start else seq


def _response_sequence(prompt: Sequence[chat.Message], response: str, tok: tokenizer_lib.Tokenizer, *,
                       max_len: int) -> tuple[list[int], bool, int]:
  """(response_sequence(...), whether anything was cut to fit, where the response starts)."""
  reply = chat.encode_content(response, tok) + [tok.end_of_turn_id]
  whole_prompt = chat.prompt_tokens(prompt, tok, max_tokens=sys.maxsize)
  if len(whole_prompt) + len(reply) <= max_len:
    return whole_prompt + reply, False, len(whole_prompt)
  reply = reply[:max(max_len // 2, max_len - len(chat.prompt_tokens(prompt, tok, max_tokens=max_len)))]
  cut_prompt = chat.prompt_tokens(prompt, tok, max_tokens=max_len - len(reply))
  return cut_prompt + reply, True, len(cut_prompt)


def encode_comparisons(groups: Sequence[PromptComparisons], tok: tokenizer_lib.Tokenizer, *, max_len: int,
                       max_responses: int) -> EncodedComparisons:
  """Every group's responses as prompt + response + <|end|> rows (see response_sequence) and its pair matrices.

  A prompt or response longer than the context is cut (the prompt keeps its latest turns, the response its
  beginning) and counted in `truncated`; nothing is dropped.
  """
  n, k = len(groups), max_responses
  tokens = np.full((n, k, max_len), tok.pad_id, np.int32)
  last = np.zeros((n, k), np.int32)
  first = np.zeros((n, k), np.int32)
  pairs = np.zeros((n, k, k), np.float32)
  margins = np.zeros((n, k, k), np.float32)
  truncated = 0
  for g_index, g in enumerate(groups):
    for r_index, response in enumerate(g.responses):
      seq, cut, start = _response_sequence(g.prompt, response, tok, max_len=max_len)
      tokens[g_index, r_index, :len(seq)] = seq
      last[g_index, r_index] = len(seq) - 1
      first[g_index, r_index] = start
      truncated += int(cut)
    for w, l, m in g.pairs:
      pairs[g_index, w, l] += 1.0
      margins[g_index, w, l] = m
  return EncodedComparisons(tokens, last, pairs, margins, truncated, first)


def split_comparisons(groups: Sequence[PromptComparisons], data: Any, tok: tokenizer_lib.Tokenizer, *,
                      seq_len: int, what: str) -> tuple[list[PromptComparisons], list[PromptComparisons],
                                                        EncodedComparisons, EncodedComparisons]:
  """(training groups, held-out groups, their encodings) of comparisons split by prompt as `data` (a
  PreferenceDataConfig) says, each reply cut to `seq_len`; logged as `what`'s data. DataError when there are
  fewer training prompts than data.batch_size."""
  train_groups, eval_groups = split_by_group(groups, eval_fraction=data.eval_fraction, seed=data.split_seed)
  if len(train_groups) < data.batch_size:
    raise DataError(f"only {len(train_groups)} training prompts with comparisons, fewer than "
                    f"data.batch_size={data.batch_size}; add comparisons or lower the batch size.")
  train_enc = encode_comparisons(train_groups, tok, max_len=seq_len, max_responses=data.max_responses)
  eval_enc = encode_comparisons(eval_groups, tok, max_len=seq_len, max_responses=data.max_responses)
  logging.info("%s data: %d training prompts (%d pairs), %d held-out prompts (%d pairs); %d sequences cut to the "
               "context of %d tokens.", what, len(train_groups), int(train_enc.pairs.sum()), len(eval_groups),
               int(eval_enc.pairs.sum()), train_enc.truncated + eval_enc.truncated, seq_len)
  return train_groups, eval_groups, train_enc, eval_enc


class _RowsToRewardBatch:
  def __init__(self, enc: EncodedComparisons, lo: int, hi: int):
    self._enc, self._lo, self._hi = enc, lo, hi

  def __call__(self, ids: np.ndarray) -> Batch:
    ids = np.asarray(ids, np.int64).reshape(-1)[self._lo:self._hi]
    rows = self._hi - self._lo
    out = {}
    for name in ("tokens", "last", "first", "pairs", "margins") + (("ref_logp",) if self._enc.ref_logp is not None
                                                                    else ()):
      src = getattr(self._enc, name)
      arr = np.zeros((rows,) + src.shape[1:], src.dtype)
      arr[:ids.size] = src[ids]
      out[name] = arr
    return out


def reward_dataset(enc: EncodedComparisons, *, seed: int, global_batch_size: int, process_index: int = 0,
                   process_count: int = 1, shuffle: bool = True, num_epochs: int | None = None) -> grain.IterDataset:
  lo, hi = _shard_bounds(global_batch_size, process_index, process_count)
  ds = data_lib.index_batches(enc.tokens.shape[0], seed=seed, batch_size=global_batch_size, shuffle=shuffle,
                              num_epochs=num_epochs)
  return ds.map(_RowsToRewardBatch(enc, lo, hi)).to_iter_dataset(_read_options())


def reward_batch_shapes(batch_size: int, max_responses: int, seq_len: int,
                        members: int = 1) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """name -> (global shape, dtype) of a reward-model batch of `batch_size` prompts with `max_responses` replies
  each: what `reward_dataset` yields, or with `members` > 1 `reward_member_batches` ([B, M, ...])."""
  b, k = (batch_size,) + ((members,) if members > 1 else ()), max_responses
  return {"tokens": ((*b, k, seq_len), np.dtype(np.int32)), "last": ((*b, k), np.dtype(np.int32)),
          "first": ((*b, k), np.dtype(np.int32)), "pairs": ((*b, k, k), np.dtype(np.float32)),
          "margins": ((*b, k, k), np.dtype(np.float32))}


class MemberBatches:
  """One batch per ensemble member, each from its own iterator (its own data order), stacked along axis 1:
  [B, M, ...], so the batch axis stays first and shards over the data-parallel axes as usual. get_state() /
  set_state() carry every member's position (a checkpoint's data item)."""

  def __init__(self, iterators: Sequence[Any]):
    self._iterators = list(iterators)

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    batches = [next(it) for it in self._iterators]
    return {name: np.stack([b[name] for b in batches], axis=1) for name in batches[0]}

  def get_state(self) -> dict[str, Any]:
    return {"members": [it.get_state() for it in self._iterators]}

  def set_state(self, state: dict[str, Any]) -> None:
    states = state.get("members") if isinstance(state, dict) else None
    if not isinstance(states, list) or len(states) != len(self._iterators):
      raise ValueError(f"the saved data position is not that of {len(self._iterators)} ensemble members: {state!r}")
    for it, member_state in zip(self._iterators, states):
      it.set_state(member_state)


def reward_member_batches(enc: EncodedComparisons, *, seed: int, members: int, global_batch_size: int,
                          process_index: int = 0, process_count: int = 1) -> MemberBatches:
  """Training batches for `members` reward models: member m shuffles with seed + m (member 0 sees the data
  order a single model trained with `seed` would)."""
  return MemberBatches([iter(reward_dataset(enc, seed=seed + m, global_batch_size=global_batch_size,
                                            process_index=process_index, process_count=process_count))
                        for m in range(members)])


def reward_eval_batches(enc: EncodedComparisons, *, batch_size: int, max_batches: int = 0, process_index: int = 0,
                        process_count: int = 1) -> list[Batch]:
  """Every held-out prompt once; rows past the end are all-zero (no pairs, so they weigh nothing)."""
  ds = reward_dataset(enc, seed=0, global_batch_size=batch_size, process_index=process_index,
                      process_count=process_count, shuffle=False, num_epochs=1)
  return [b for i, b in enumerate(ds) if not max_batches or i < max_batches]


def training_prompts(conversations: Sequence[Conversation], n: int, seed: int) -> list[list[chat.Message]]:
  """Up to `n` (0: all) prompts, each a conversation cut before its last assistant turn, in a seeded order."""
  prompts = [cut[0] for cut in map(prompt_and_reply, conversations) if cut is not None]
  if len(prompts) < len(conversations):  # an assistant turn with nothing before it gives no prompt
    logging.warning("Skipped %d of %d conversations: no turn before the last assistant turn to use as a prompt.",
                    len(conversations) - len(prompts), len(conversations))
  order = np.random.default_rng(seed).permutation(len(prompts))
  if n:
    order = order[:n]
  return [prompts[i] for i in order]


def held_out_prompts(eval_conversations: Sequence[Conversation], num: int, seed: int) -> list[list[chat.Message]]:
  """The `num` held-out prompts every policy evaluation uses (PPO's eval, best-of-n): the same list for the same
  conversations, count and seed."""
  return training_prompts(eval_conversations, num, seeds.stream(seed, seeds.EVAL_PROMPTS))


def load_held_out_prompts(data: Any, num: int, seed: int, *, cache_dir: str) -> list[list[chat.Message]]:
  """`held_out_prompts` of the eval split of `data` (a chat data config: sources, eval_fraction, split_seed)."""
  conversations = load_conversations(data.sources, cache_dir=cache_dir)
  _, eval_convs = split_by_group(conversations, eval_fraction=data.eval_fraction, seed=data.split_seed)
  return held_out_prompts(eval_convs, num, seed)


def write_jsonl(path: str, records: Sequence[dict[str, Any]]) -> None:
  """Writes records atomically (a crash leaves the old file or the new one, never half of one)."""
  fileio.atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
