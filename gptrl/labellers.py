"""Labellers: who says which replies to a prompt are better. One interface, two kinds of labeller:

- `JudgeLabeller`: an automatic judge of gptrl/judges.py (what the labelling stage, gptrl/stages/autolabel.py, uses);
- people, at the labelling web page (`python -m gptrl.label`: one person, or a team with an overlap).

A labeller is given a prompt (chat messages) and the K replies to it, and returns a `Label`:
  ranking       the reply indices best first, each once: a strict order, no ties. That is what the reward
                stage's ranked format holds ({"responses", "ranking"}), and a person ranking on the page always
                gives one. A judge's ties are broken by reply index; its `scores` keep the ties.
  scores        optional, higher is better, one per reply. When present they decide the pairs (a pair is kept
                when its score gap is at least `min_gap`, so ties and near-ties are dropped).
  better_reply  optional: a reply the labeller wrote, better than all K (an SFT demonstration).
A labeller may also decline a prompt (a person skips it): `label` returns None.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

from gptrl import chat
from gptrl import judges


class LabelError(ValueError):
  """A label does not fit the replies it labels; the message says what was expected."""


@dataclasses.dataclass(frozen=True)
class Label:
  """One labeller's verdict on the replies to one prompt (see the module docstring)."""
  ranking: tuple[int, ...]
  scores: tuple[float, ...] | None = None
  better_reply: str = ""

  def check(self, num_replies: int) -> Label:
    """Returns self when it labels `num_replies` replies; raises LabelError saying what is wrong otherwise."""
    ranking = list(self.ranking)
    if any(isinstance(r, bool) or not isinstance(r, int) for r in ranking) or sorted(ranking) != list(
        range(num_replies)):
      raise LabelError(f"ranking must list the reply indices 0..{num_replies - 1} once each, best first; got "
                       f"{ranking!r:.80}.")
    if self.scores is not None and len(self.scores) != num_replies:
      raise LabelError(f"scores must hold one number per reply ({num_replies}), got {len(self.scores)}.")
    if not isinstance(self.better_reply, str):
      raise LabelError(f"better_reply must be a string, got {type(self.better_reply).__name__}.")
    return self


class Labeller:
  """Ranks the replies to prompts. Subclasses implement `label` or, when batching pays, `label_many`."""
  name = "labeller"

  def label(self, prompt: Sequence[chat.Message], replies: Sequence[str]) -> Label | None:
    """The label of `replies` to `prompt`, or None when the labeller declines (skips) this prompt."""
    return self.label_many([prompt], [replies])[0]

  def label_many(self, prompts: Sequence[Sequence[chat.Message]],
                 replies: Sequence[Sequence[str]]) -> list[Label | None]:
    """`label` of each (prompt, replies), in order."""
    if type(self).label is Labeller.label:
      raise NotImplementedError(f"{type(self).__name__} implements neither label nor label_many.")
    return [self.label(p, r) for p, r in zip(prompts, replies, strict=True)]


def ranking_of(scores: Sequence[float]) -> tuple[int, ...]:
  """Indices by score, highest first; equal scores keep index order (a stable sort)."""
  return tuple(sorted(range(len(scores)), key=lambda i: -scores[i]))


class JudgeLabeller(Labeller):
  """An automatic judge (gptrl/judges.py) as a labeller: scores every reply on its own, ranks by score.

  The judge sees only the reply texts (not the prompt), so all the replies of a batch are scored in one call.
  """

  def __init__(self, judge_name: str):
    self.name = judge_name
    self._judge = judges.make_judge(judge_name)

  def label_many(self, prompts: Sequence[Sequence[chat.Message]],
                 replies: Sequence[Sequence[str]]) -> list[Label | None]:
    if len(prompts) != len(replies):
      raise ValueError(f"{len(prompts)} prompts but {len(replies)} lists of replies.")
    flat = [text for group in replies for text in group]
    scores = self._judge(flat)
    labels: list[Label | None] = []
    start = 0
    for group in replies:
      sc = tuple(scores[start:start + len(group)])
      start += len(group)
      labels.append(Label(ranking_of(sc), sc))
    return labels


def messages_json(prompt: Sequence[chat.Message]) -> list[dict[str, str]]:
  """The prompt as JSONL records hold it: [{"role", "content"}, ...]."""
  return [{"role": m.role, "content": m.content} for m in prompt]


def ranked_record(prompt: Sequence[chat.Message], replies: Sequence[str], label: Label, *, labeller: str,
                  **extra: Any) -> dict[str, Any]:
  """A comparison in the reward stage's ranked format (gptrl/chat_data.load_comparisons) with the labeller's
  name, its scores when it gave any, the time (Unix seconds) and `extra` fields (e.g. "prompt_id").

  The replies must be distinct and non-empty, as the reward stage requires."""
  label.check(len(replies))
  if len(replies) < 2 or len(set(replies)) != len(replies) or not all(r.strip() for r in replies):
    raise LabelError(f"a ranked comparison needs at least 2 distinct non-empty replies, got {list(replies)!r:.120}.")
  record = {"messages": messages_json(prompt), "responses": list(replies), "ranking": list(label.ranking)}
  if label.scores is not None:
    record["scores"] = list(label.scores)
  return {**record, "labeller": labeller, **extra, "time": round(time.time(), 3)}


def demonstration_record(prompt: Sequence[chat.Message], reply: str, *, labeller: str,
                         **extra: Any) -> dict[str, Any]:
  """An SFT demonstration ({"messages": prompt + the assistant's reply}) with the labeller's name, `extra`
  fields and the time."""
  if not reply.strip():
    raise LabelError("a demonstration needs a non-empty reply.")
  messages = messages_json(prompt) + [{"role": "assistant", "content": reply}]
  return {"messages": messages, "labeller": labeller, **extra, "time": round(time.time(), 3)}
