"""People label replies: a local web page that shows a prompt with K replies, lets a person rank them (drag, or
click in order of preference; keyboard too), optionally write a better reply, and submit or skip.

  python -m gptrl.label --checkpoint runs/sft_cpu --out runs/human_labels            # the built-in prompts
  python -m gptrl.label --checkpoint runs/sft_cpu --prompts my_prompts.jsonl --out runs/human_labels --k 4
  python -m gptrl.label --replies runs/label_cpu/replies.jsonl --out runs/human_labels   # no model needed

then open the printed address (http://127.0.0.1:8080/ by default; the server listens on localhost only unless
--host says otherwise). A team shares one server:

  python -m gptrl.label --replies runs/label_cpu/replies.jsonl --out runs/team_labels --host 0.0.0.0 \
      --team team.txt --overlap 2          # "NAME TOKEN" lines; each labeller opens the page with ?token=THEIRS
  python -m gptrl.label ... --names --overlap 2   # or each browser tab gives its labeller's name

Each prompt goes to --overlap different labellers (for agreement; default 1), never to more at once, and each
labeller works on one prompt at a time: while their page is open it tells the server every --assignment_timeout/4
seconds, and a prompt whose labeller has gone quiet for --assignment_timeout seconds goes to someone else (a
decision still sent for it is kept). The page's "Team and agreement" view shows each labeller's work and how alike
they rank (gptrl.agreement: per labeller, overall, Krippendorff's alpha; and against the judge whose scores came
with --replies, which people never see). Beyond loopback the page's data needs an access token (--token, $GPTRL_LABEL_TOKEN, or a
random one printed once in the address, ?token=...), and in every mode the Host header must name this server
(loopback names, --host, this machine's names, --allowed_host), against DNS rebinding: see gptrl/access.py.
Replies are sampled from the checkpoint (a chat-stage one: SFT, PPO) a few prompts ahead in a background thread,
each prompt with its own seed (from --seed and the prompt), so a restart shows the same replies; or they are
read from a replies file of the labelling stage (`{"messages"|"prompt", "responses"}`). Empty and repeated
replies are not shown: the reward stage needs distinct ones.

`--prompts`: JSONL files or folders (or the built-in `shakespeare_dialogue`) of prompts, `{"prompt"}` or
`{"messages"}` ending in a user turn, or of demonstrations (`{"prompt", "response"}`, or `{"messages"}` ending in
an assistant turn, which is cut off); in a seeded order (--seed), the first --num_prompts of them.

Written to --out, a local folder, each record appended, flushed and fsynced before the page hears it was saved
(copy it to a bucket afterwards if the reward stage reads from one; --checkpoint, --prompts and --replies may be
gs:// URLs):
  comparisons.jsonl     one ranked record per submitted prompt and labeller, the reward stage's format:
                        {"messages", "responses", "ranking": [best, ..., worst], "labeller": "human" or a name,
                         "prompt_id", "where", "time"}
  demonstrations.jsonl  one SFT record per better reply written: {"messages": prompt + reply, ...}
  label_log.jsonl       every decision (submitted or skipped, by whom) with its records: the journal the other
                        two are repaired from, and the list of decisions already made.
A prompt id is a hash of the prompt (and, with --replies, of its replies): labelling the same prompts again into
the same --out shows each labeller only what they have not decided and what still lacks --overlap labellers. Stopping the server at any moment (Ctrl-C, kill -9) loses nothing
the page was told was saved and duplicates nothing: on start, a line cut short by a kill is dropped, records of
the journal missing from the outputs are appended, and a submission the browser sends twice is written once.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import sys
import threading
import time
import urllib.parse
from typing import Any, Callable, Iterable, Iterator, Sequence

from gptrl import access as access_lib
from gptrl import chat
from gptrl import cli
from gptrl import fileio
from gptrl import labellers

_PROG = "gptrl.label"
_STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "label_static")
# Test hook: the N-th line appended by a LabelStore (1-based, over all its files) is written only in part,
# then the process kills itself with SIGKILL, as a power cut or kill -9 in the middle of a write would.
CRASH_ENV = "GPTRL_LABEL_TEST_CRASH_AT"
_PROMPT_EXPECTED = ("{'prompt'} or {'messages'} (a prompt), or {'prompt', 'response'} or {'messages'} ending in "
                    "an assistant turn (a demonstration)")
_REPLIES_EXPECTED = "{'messages' or 'prompt', 'responses': [str, ...]} (and optionally a judge's 'scores')"
MAX_NAME = 40  # characters of a labeller's name
_HUNGRY_S = 5.0  # a labeller who found nothing this recently makes the sampler go on
NAME_HEADER = "X-Labeller"  # the name a page sends (URI-encoded) where each browser session names its labeller


UsageError = cli.UsageError


@dataclasses.dataclass(frozen=True)
class Question:
  """One prompt and the replies a labeller ranks; `dropped` counts the empty or repeated replies not shown;
  `scores`: an automatic judge's, one per reply, when the replies came with them (never shown to people: they
  measure how the people agree with the judge)."""
  prompt_id: str
  where: str
  prompt: tuple[chat.Message, ...]
  replies: tuple[str, ...]
  dropped: int = 0
  scores: tuple[float, ...] | None = None
  judge: str = ""

  def as_json(self) -> dict[str, Any]:
    return {"prompt_id": self.prompt_id, "where": self.where, "messages": labellers.messages_json(self.prompt),
            "replies": list(self.replies), "dropped": self.dropped}


def prompt_id(prompt: Sequence[chat.Message], replies: Sequence[str] | None = None) -> str:
  """A stable id of a prompt (and of its replies, when they are given rather than sampled): 12 hex digits."""
  key = [labellers.messages_json(prompt)] + ([list(replies)] if replies is not None else [])
  return hashlib.sha256(json.dumps(key, ensure_ascii=False).encode("utf-8")).hexdigest()[:12]


def distinct_replies(replies: Iterable[str]) -> tuple[tuple[str, ...], int]:
  """(the non-empty replies, stripped, without repeats, in order; how many were dropped)."""
  replies = list(replies)
  kept = tuple(dict.fromkeys(r.strip() for r in replies if r.strip()))
  return kept, len(replies) - len(kept)


def check_name(name: Any, what: str = "a labeller's name") -> str:
  """`name` without surrounding spaces when it can name a person on the records; LabelError saying why not."""
  if not isinstance(name, str) or not name.strip():
    raise labellers.LabelError(f"{what} must be a non-empty string, got {name!r:.40}.")
  name = " ".join(name.split())
  if len(name) > MAX_NAME or not name.isprintable():
    raise labellers.LabelError(f"{what} must be at most {MAX_NAME} printable characters, got {name!r:.60}.")
  if name.startswith(("judge:", "user:")) or name == "unknown":
    raise labellers.LabelError(f"{what} {name!r} is reserved: \"judge:\" and \"user:\" name automatic judges and "
                               "gptrl.serve's users; give a person's name.")
  return name


# ----------------------------------------------------------------------------------------------
# Persistence.


class LabelStore:
  """The decisions made so far in one output folder, and the only writer of its files (see the module docstring).

  A decision is one line of label_log.jsonl: {"prompt_id", "labeller", "action": "submitted" | "skipped", "time",
  "comparison": record | null, "demonstration": record | null}; each labeller decides each prompt at most once.
  It is written (and fsynced) first, then its records to comparisons.jsonl and demonstrations.jsonl; on opening,
  any record the log has and an output lacks (a kill between the writes) is appended, so the log is the commit
  point. Logs written before decisions named their labeller take it from their records ("human" for a skip).
  """
  LOG, COMPARISONS, DEMONSTRATIONS = "label_log.jsonl", "comparisons.jsonl", "demonstrations.jsonl"

  def __init__(self, folder: str):
    self.folder = folder
    os.makedirs(folder, exist_ok=True)
    self._lock = threading.Lock()
    self._writer = fileio.DurableLines(CRASH_ENV)
    paths = {name: os.path.join(folder, name) for name in (self.LOG, self.COMPARISONS, self.DEMONSTRATIONS)}
    expected = "a record written by gptrl.label"
    existing = {name: list(fileio.iter_jsonl(path, expected=expected, error=UsageError))
                if fileio.repair_torn_tail(path) else [] for name, path in paths.items()}
    self._actions: dict[tuple[str, str], str] = {}  # (prompt id, labeller) -> action
    self._by_prompt: dict[str, dict[str, str]] = collections.defaultdict(dict)  # prompt id -> {labeller: action}
    for where, entry in existing[self.LOG]:
      if not isinstance(entry.get("prompt_id"), str) or entry.get("action") not in ("submitted", "skipped"):
        raise UsageError(f"{where}: expected a decision {{'prompt_id', 'action': 'submitted' | 'skipped', ...}}; "
                         "was this file written by another program?")
      self._decided(entry["prompt_id"], _labeller_of(entry), entry["action"])
    self._files = {name: open(path, "ab") for name, path in paths.items()}  # pylint: disable=consider-using-with
    fileio.fsync_dir(folder)
    self._comparisons = [r for _, r in existing[self.COMPARISONS]]
    # Repair: records of logged decisions that a kill kept out of the outputs.
    for name, field in ((self.COMPARISONS, "comparison"), (self.DEMONSTRATIONS, "demonstration")):
      have = {(r.get("prompt_id"), _labeller_of(r)) for _, r in existing[name]}
      missing = [e[field] for _, e in existing[self.LOG]
                 if e.get(field) and (e["prompt_id"], _labeller_of(e)) not in have]
      for record in missing:
        self._append(name, record)
        have.add((record["prompt_id"], _labeller_of(record)))
        if name == self.COMPARISONS:
          self._comparisons.append(record)
      if missing:
        logging.warning("%s: appended %d record(s) that label_log.jsonl holds but the file lacked (the server "
                        "was stopped between the two writes).", paths[name], len(missing))
      for pid, who in have - set(self._actions):  # a record with no decision: the log was removed or edited
        if pid is not None:
          self._decided(pid, who, "submitted")
    if self._actions:
      logging.info("%s: %d decision(s) on %d prompt(s) made before.", folder, len(self._actions),
                   len(self._by_prompt))

  def _decided(self, pid: str, labeller: str, action: str) -> None:
    if (pid, labeller) not in self._actions:
      self._actions[(pid, labeller)] = action
      self._by_prompt[pid][labeller] = action

  def _append(self, name: str, record: dict[str, Any]) -> None:
    self._writer.append(self._files[name], record)

  def action(self, pid: str, labeller: str) -> str | None:
    """"submitted", "skipped", or None when `labeller` has not decided `pid` yet."""
    with self._lock:
      return self._actions.get((pid, labeller))

  def decisions(self, pid: str) -> dict[str, str]:
    """{labeller: action} of the decisions on `pid`."""
    with self._lock:
      return dict(self._by_prompt.get(pid, {}))

  def counts(self, pids: Iterable[str], labeller: str | None = None) -> dict[str, int]:
    """How many decisions on `pids` (by `labeller`, or by anyone) were submissions and skips."""
    pids = set(pids)
    with self._lock:
      actions = [a for (p, who), a in self._actions.items() if p in pids and labeller in (None, who)]
    return {"submitted": actions.count("submitted"), "skipped": actions.count("skipped")}

  def per_labeller(self) -> dict[str, dict[str, int]]:
    """{labeller: {"submitted", "skipped"}} over every decision."""
    out: dict[str, dict[str, int]] = {}
    with self._lock:
      for (_, who), action in self._actions.items():
        out.setdefault(who, {"submitted": 0, "skipped": 0})[action] += 1
    return out

  def comparisons(self) -> list[dict[str, Any]]:
    """Every comparison record in comparisons.jsonl."""
    with self._lock:
      return list(self._comparisons)

  def commit(self, question: Question, label: labellers.Label | None, labeller: str) -> bool:
    """Writes `labeller`'s decision on `question` (None: skipped) and its records; False (nothing written) when
    that labeller already decided that prompt."""
    comparison = demonstration = None
    if label is not None:
      label.check(len(question.replies))
      extra = {"prompt_id": question.prompt_id, "where": question.where}
      if len(question.replies) >= 2:
        comparison = labellers.ranked_record(question.prompt, question.replies, label, labeller=labeller, **extra)
      if label.better_reply.strip():
        demonstration = labellers.demonstration_record(question.prompt, label.better_reply.strip(),
                                                       labeller=labeller, **extra)
      if comparison is None and demonstration is None:
        raise labellers.LabelError("nothing to save: fewer than 2 replies to rank and no better reply; skip it.")
    with self._lock:
      if (question.prompt_id, labeller) in self._actions:
        return False
      action = "skipped" if label is None else "submitted"
      self._append(self.LOG, {"prompt_id": question.prompt_id, "labeller": labeller, "action": action,
                              "time": round(time.time(), 3), "comparison": comparison,
                              "demonstration": demonstration})
      if comparison is not None:
        self._append(self.COMPARISONS, comparison)
        self._comparisons.append(comparison)
      if demonstration is not None:
        self._append(self.DEMONSTRATIONS, demonstration)
      self._decided(question.prompt_id, labeller, action)
    return True

  def close(self) -> None:
    with self._lock:
      for f in self._files.values():
        f.close()


def _labeller_of(entry: dict[str, Any]) -> str:
  """Who made a decision or record: its "labeller", else its records' (logs of single-person pages), else "human"."""
  for record in (entry, entry.get("comparison"), entry.get("demonstration")):
    if isinstance(record, dict) and isinstance(record.get("labeller"), str) and record["labeller"]:
      return record["labeller"]
  return "human"


# ----------------------------------------------------------------------------------------------
# Who labels what.


class Assignments:
  """Hands the questions to labellers: each prompt to `overlap` different labellers, at most that many at once
  (so with overlap 1 no two people ever work on one prompt), each labeller one prompt at a time, in the
  questions' order. A labeller keeps their prompt while their page is heard from (it asks every `timeout` / 4
  seconds); after `timeout` seconds of silence (a closed tab, a lost laptop) the prompt returns to the pool for
  someone else. A decision sent for a prompt that went to someone else meanwhile is still accepted (it is a real
  label; that prompt then has one labeller more than `overlap`).

  Prompts are added as they become ready (`add`: sampled ones block while `ahead` free assignments wait, or a
  labeller has found nothing), then `close` says no more will come. `members`: the labellers there can be
  (a team file, or the one person of a single-person page), None when anyone may give a name.
  """

  def __init__(self, store: LabelStore, *, overlap: int = 1, timeout: float = 600.0, ahead: int = 2,
               members: Sequence[str] | None = None, clock: Callable[[], float] = time.monotonic):
    self.store, self.overlap, self.timeout, self.ahead = store, overlap, timeout, ahead
    self.members = None if members is None else tuple(members)
    self._clock = clock
    self._cond = threading.Condition()
    self._questions: dict[str, Question] = {}
    self._open: list[str] = []  # prompt ids not yet labelled by `overlap` labellers, in order
    self._holding: dict[str, tuple[str, float]] = {}  # labeller -> (prompt id, when their page was last heard)
    self._given: dict[str, set[str]] = collections.defaultdict(set)  # prompt id -> everyone it was given to
    self._hungry: dict[str, float] = {}  # labeller -> when they last found nothing to do
    self.closed = False

  # The rules, under the lock.
  def _submitted(self, pid: str) -> int:
    return sum(a == "submitted" for a in self.store.decisions(pid).values())

  def wanted(self, pid: str) -> bool:
    """Whether `pid` still needs a labeller: fewer than `overlap` submitted it, and a member has not decided it."""
    decisions = self.store.decisions(pid)
    if sum(a == "submitted" for a in decisions.values()) >= self.overlap:
      return False
    return self.members is None or any(m not in decisions for m in self.members)

  def _holders(self, pid: str, now: float, other_than: str = "") -> list[str]:
    return [who for who, (held, seen) in self._holding.items()
            if held == pid and who != other_than and now - seen <= self.timeout
            and self.store.action(pid, who) is None]

  def _free(self, pid: str, now: float, other_than: str = "") -> int:
    """Assignments of `pid` nobody (other than `other_than`) holds or has done."""
    return self.overlap - self._submitted(pid) - len(self._holders(pid, now, other_than))

  def _available(self, pid: str, labeller: str, now: float) -> bool:
    return self.store.action(pid, labeller) is None and self._free(pid, now, labeller) > 0

  def _prune(self) -> None:
    self._open = [pid for pid in self._open if self.wanted(pid)]

  # What the server calls.
  def next_for(self, labeller: str) -> Question | None:
    """The question `labeller` is working on (kept while they are heard from), else the first one they may take
    (it is then theirs), else None. Each call counts as hearing from them."""
    with self._cond:
      now = self._clock()
      held = self._holding.pop(labeller, None)
      if held is not None:
        pid, seen = held
        if self.store.action(pid, labeller) is None and (now - seen <= self.timeout
                                                         or self._available(pid, labeller, now)):
          self._holding[labeller] = (pid, now)
          return self._questions[pid]
        self._cond.notify_all()  # theirs went elsewhere or is done: a free assignment may have appeared
      self._prune()
      for pid in self._open:
        if self._available(pid, labeller, now):
          self._holding[labeller] = (pid, now)
          self._given[pid].add(labeller)
          self._hungry.pop(labeller, None)
          return self._questions[pid]
      self._hungry[labeller] = now
      self._cond.notify_all()
      return None

  def question(self, pid: str) -> Question | None:
    with self._cond:
      return self._questions.get(pid)

  def claim(self, pid: str, labeller: str) -> bool:
    """Whether `labeller` may decide `pid`: it was handed to them (now or before), or it is free for them now
    (a page that got it before a restart sends its decision again), and then it is theirs."""
    with self._cond:
      if labeller in self._given.get(pid, ()):
        return True
      now = self._clock()
      if pid not in self._questions or not self._available(pid, labeller, now):
        return False
      self._holding[labeller] = (pid, now)
      self._given[pid].add(labeller)
      self._cond.notify_all()
      return True

  def release(self, pid: str, labeller: str) -> None:
    """`labeller` decided `pid`: it is no longer theirs to hold."""
    with self._cond:
      if self._holding.get(labeller, ("",))[0] == pid:
        del self._holding[labeller]
      self._cond.notify_all()

  def left_for(self, labeller: str) -> str:
    """Why `next_for(labeller)` found nothing: "done" (nothing can come their way any more), "held" (the prompts
    left are with other labellers; one comes back if its labeller goes quiet) or "coming" (more are on the way)."""
    with self._cond:
      self._prune()
      if not self.closed:
        return "coming"
      return "held" if any(self.store.action(pid, labeller) is None for pid in self._open) else "done"

  def holding(self) -> dict[str, tuple[str, float]]:
    """{labeller: (prompt id, seconds since their page was last heard)} of the assignments in progress."""
    with self._cond:
      now = self._clock()
      return {who: (pid, now - seen) for who, (pid, seen) in self._holding.items()
              if now - seen <= self.timeout and self.store.action(pid, who) is None}

  def complete(self, pids: Iterable[str]) -> int:
    """How many of `pids` have `overlap` submissions."""
    return sum(self._submitted(pid) >= self.overlap for pid in set(pids))

  def add(self, question: Question, block: bool = True) -> None:
    """Adds a question to hand out; with `block`, first waits while at least `ahead` free assignments are waiting
    and nobody has asked in vain in the last few seconds (sampling ahead of the people, not of the whole list)."""
    with self._cond:
      while block and not self._needed(self._clock()):
        self._cond.wait(timeout=0.5)
      self._questions.setdefault(question.prompt_id, question)
      if question.prompt_id not in self._open and self.wanted(question.prompt_id):
        self._open.append(question.prompt_id)
      self._cond.notify_all()

  def _needed(self, now: float) -> bool:
    if any(now - when < _HUNGRY_S for when in self._hungry.values()):
      return True
    self._prune()
    return sum(max(0, self._free(pid, now)) for pid in self._open) < self.ahead

  def close(self) -> None:
    """No more questions will be added."""
    with self._cond:
      self.closed = True
      self._cond.notify_all()


@dataclasses.dataclass
class Progress:
  """What the background threads are doing, for the page while no question is waiting."""
  message: str = "starting"
  error: str = ""


def hand_out(questions: Iterable[Question], assignments: Assignments, progress: Progress, block: bool = True) -> None:
  """Adds each question to `assignments` (sampled as they are consumed), then closes it; errors go to `progress`."""
  try:
    for question in questions:
      assignments.add(question, block=block)
  except Exception as e:  # pylint: disable=broad-except
    logging.exception("sampling stopped")
    progress.error = f"{type(e).__name__}: {e}"
  finally:
    assignments.close()


# ----------------------------------------------------------------------------------------------
# Questions: from a replies file, or sampled from a checkpoint.


def replies_questions(path: str, k: int) -> list[Question]:
  """One question per record of a replies file ({"messages"|"prompt", "responses"}), its first `k` replies."""
  if not fileio.isfile(path):
    raise UsageError(f"--replies {path}: no such file; give the replies.jsonl of a labelling run.")
  questions: dict[str, Question] = {}
  for where, record in fileio.iter_jsonl(path, expected=_REPLIES_EXPECTED, error=UsageError):
    prompt = _prompt_of(record, where, cut_reply=False)
    responses = record.get("responses")
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
      raise UsageError(f"{where}: field 'responses' must be a list of strings; expected {_REPLIES_EXPECTED}.")
    replies, dropped = distinct_replies(responses[:k])
    pid = prompt_id(prompt, replies)
    scores, judge = _judge_scores(record, responses[:k], replies)
    questions.setdefault(pid, Question(pid, where, tuple(prompt), replies, dropped, scores, judge))
  if not questions:
    raise UsageError(f"--replies {path}: no record found.")
  return list(questions.values())


def _judge_scores(record: dict[str, Any], responses: Sequence[str], replies: Sequence[str]
                  ) -> tuple[tuple[float, ...] | None, str]:
  """(the scores of `replies`, the distinct ones shown, by the record's judge; the judge's name) when the record
  has one finite score per response (a labelling run's replies.jsonl does), else (None, "")."""
  scores = record.get("scores")
  if (not isinstance(scores, list) or len(scores) < len(responses)
      or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in scores)):
    return None, ""
  first: dict[str, float] = {}
  for reply, score in zip(responses, scores):
    first.setdefault(reply.strip(), float(score))
  judge = record.get("judge") if isinstance(record.get("judge"), str) and record.get("judge") else "replies"
  return tuple(first[r] for r in replies), judge


def _prompt_of(record: dict[str, Any], where: str, *, cut_reply: bool) -> list[chat.Message]:
  """The prompt of a record; with `cut_reply`, a demonstration is cut before its (last) assistant reply."""
  try:
    messages = chat.prompt_messages(record, where)
  except chat.ChatFormatError as e:
    raise UsageError(str(e)) from None
  if cut_reply and messages[-1].role == "assistant":
    messages = messages[:-1]
  if not messages or messages[-1].role == "assistant":
    raise UsageError(f"{where}: the prompt must end in a user (or system) turn for the model to answer.")
  return messages


def load_prompts(sources: Sequence[str], *, cache_dir: str | None, num_prompts: int, seed: int,
                 eval_fraction: float = 0.08, split_seed: int = 0) -> list[tuple[str, list[chat.Message]]]:
  """(where, prompt) of every record of `sources` (see the module docstring), without repeats, in a seeded order;
  the first `num_prompts` (0: all). The built-in dialogue gives only its training split (`eval_fraction`,
  `split_seed`: keep them equal to the SFT run's data settings), so the plays held out for SFT eval stay out."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from gptrl import chat_data  # pylint: disable=import-outside-toplevel
  from gptrl import data as data_lib  # pylint: disable=import-outside-toplevel

  def dialogue():
    convs = chat_data.load_conversations(["shakespeare_dialogue"], cache_dir=cache_dir)
    convs, _ = chat_data.split_by_group(convs, eval_fraction=eval_fraction, seed=split_seed)
    return [(c.where, {"messages": labellers.messages_json(c.messages)}) for c in convs]
  try:
    records = data_lib.load_records(sources, expected=_PROMPT_EXPECTED, builtin={"shakespeare_dialogue": dialogue})
  except data_lib.DataError as e:
    raise UsageError(str(e)) from None
  prompts: dict[str, tuple[str, list[chat.Message]]] = {}
  for where, record in records:
    if "response" in record:
      record = {k: v for k, v in record.items() if k != "response"}
    prompt = _prompt_of(record, where, cut_reply=True)
    prompts.setdefault(prompt_id(prompt), (where, prompt))
  if not prompts:
    raise UsageError(f"--prompts {list(sources)}: no prompt found.")
  order = np.random.default_rng(seed).permutation(len(prompts))
  items = list(prompts.values())
  return [items[i] for i in (order[:num_prompts] if num_prompts else order)]


def sampled_questions(source: Any, prompts: Sequence[tuple[str, list[chat.Message]]], wanted: Callable[[str], bool],
                      *, k: int, seed: int, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                      progress: Progress) -> Iterator[Question]:
  """Questions with `k` replies sampled from the checkpoint `source` (gptrl.sample.Source) for each prompt still
  `wanted` (by its id); each prompt's key is fold_in(key(seed), its id), so its replies do not depend on the
  others."""
  import jax  # pylint: disable=import-outside-toplevel
  from gptrl import config as config_lib  # pylint: disable=import-outside-toplevel
  from gptrl import sample as sample_lib  # pylint: disable=import-outside-toplevel
  from gptrl import sharding  # pylint: disable=import-outside-toplevel
  progress.message = f"loading the model of {source.where}"
  loaded = sample_lib.load(source, sharding.make_mesh(config_lib.MeshConfig(), jax.devices()[:1]))
  tok, max_len = source.tok, source.model_config.max_len
  for where, prompt in prompts:
    pid = prompt_id(prompt)
    if not wanted(pid):
      continue
    progress.message = "sampling replies"
    ids = chat.prompt_tokens(prompt, tok, max_tokens=max_len - max_new_tokens)
    rng = jax.random.fold_in(jax.random.key(seed), int(pid[:7], 16))
    outs = sample_lib.generate(loaded, [ids], num_samples=k, max_new_tokens=max_new_tokens, rng=rng,
                               temperature=temperature, top_k=top_k, top_p=top_p, stop_id=tok.end_of_turn_id)[0]
    replies, dropped = distinct_replies(chat.decode_reply(o, tok) for o in outs)
    yield Question(pid, where, tuple(prompt), replies, dropped)


# ----------------------------------------------------------------------------------------------
# The web app.


def create_app(store: LabelStore, assignments: Assignments, progress: Progress, prompt_ids: Sequence[str], *,
               labeller: str | None = "human", access: access_lib.Access | None = None) -> Any:
  """The Flask app: the page (label_static/), GET /api/state and /api/team, POST /api/submit and /api/skip.

  Who asks: with a team (`access.team`), the member whose token the request carries; else `labeller`, the one
  person of this page; or, when `labeller` is None, the name the page sends in the X-Labeller header (URI-encoded;
  each browser tab asks its person once).
  /api/state: {"status": "ready" | "waiting" | "done" | "error" | "name", "labeller", "question", "message",
  "progress": this labeller's {"submitted", "skipped", "total"}, "team": {"overlap", "complete", "total"},
  "heartbeat_s"}; "name": the page must ask its person's name first. Each call counts as hearing from that
  labeller (their prompt stays theirs: `Assignments`).
  /api/submit {"prompt_id", "ranking": [best, ..., worst], "better_reply"} and /api/skip {"prompt_id"} answer
  {"ok": true, "duplicate": bool, "action"} once the decision is on disk; sending one again is harmless
  ("duplicate"). They take JSON only, which a page of another site cannot send here without the browser asking
  first, and this server never agrees: other sites cannot label on the person's behalf.
  /api/team: each labeller's decisions, current prompt and agreement with the others (and with the replies'
  judge, when they came with scores), overall agreement and Krippendorff's alpha (gptrl.agreement).
  `access` (default: loopback names, no token) checks every request's Host header (403) and the /api/ requests'
  token (401).
  """
  import flask  # pylint: disable=import-outside-toplevel
  app = flask.Flask(__name__, static_folder=_STATIC, static_url_path="/static")
  prompt_ids = list(dict.fromkeys(prompt_ids))
  access = access or access_lib.Access("", access_lib.allowed_hosts("127.0.0.1"))
  single = labeller is not None and not access.team and assignments.overlap == 1

  @app.before_request
  def guard():
    problem = access.host_error(flask.request.host)
    if problem is not None:
      return flask.jsonify(error=problem), 403
    if flask.request.path.startswith("/api/"):  # the prompts, replies and decisions; the page itself is public
      problem = access.token_error(flask.request.headers.get("Authorization", ""))
      if problem is not None:
        return flask.jsonify(error=problem), 401
    return None

  def who() -> tuple[str | None, str]:
    """(the labeller asking, or None; what is wrong when None)."""
    if access.team:
      return access.member(flask.request.headers.get("Authorization", "")), ""
    if labeller is not None:
      return labeller, ""
    given = flask.request.headers.get(NAME_HEADER, "")
    if not given:
      return None, "say who you are: each labeller gives their name once per browser tab"
    try:
      return check_name(urllib.parse.unquote(given), "your name"), ""
    except labellers.LabelError as e:
      return None, str(e)

  def state():
    body: dict[str, Any] = {"out": store.folder, "heartbeat_s": max(1.0, assignments.timeout / 4),
                            "team": {"overlap": assignments.overlap, "total": len(prompt_ids),
                                     "complete": assignments.complete(prompt_ids)}}
    name, problem = who()
    if name is None:
      return {**body, "status": "name", "message": problem}
    body.update(labeller=name, progress={**store.counts(prompt_ids, name), "total": len(prompt_ids)})
    question = assignments.next_for(name)
    if question is not None:
      return {**body, "status": "ready", "question": question.as_json()}
    if progress.error:
      return {**body, "status": "error", "message": progress.error}
    left = assignments.left_for(name)
    if left == "done":
      message = ("every prompt is labelled or skipped" if single else
                 f"nothing left for you: every prompt has {assignments.overlap} labeller(s) or your decision")
      return {**body, "status": "done", "message": message}
    if left == "held":
      return {**body, "status": "waiting", "message": "the prompts left are with other labellers; one comes back "
              f"here if its labeller is away for {assignments.timeout:g} s"}
    return {**body, "status": "waiting", "message": progress.message}

  def decide(make_label: Callable[[Question], labellers.Label | None]):
    name, problem = who()
    if name is None:
      return flask.jsonify(error=problem), 400
    body = flask.request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("prompt_id"), str):
      return flask.jsonify(error="expected a JSON object with a string 'prompt_id'"), 400
    pid = body["prompt_id"]
    if store.action(pid, name) is not None:  # a retry of a decision already on disk
      return flask.jsonify(ok=True, duplicate=True, action=store.action(pid, name))
    question = assignments.question(pid)
    if question is None or not assignments.claim(pid, name):
      return flask.jsonify(error=f"prompt {pid} is not assigned to you ({name}); reload the page"), 409
    try:
      label = make_label(question)
      if label is not None:
        label.check(len(question.replies))
        if len(question.replies) < 2 and not label.better_reply.strip():
          raise labellers.LabelError("fewer than 2 replies to rank: write a better reply or skip.")
      written = store.commit(question, label, name)
    except (labellers.LabelError, TypeError, ValueError) as e:
      return flask.jsonify(error=str(e)), 400
    except OSError as e:  # e.g. a full disk: nothing of this decision stays (fileio.DurableLines)
      logging.exception("could not save a decision on %s by %s", pid, name)
      return flask.jsonify(error=f"not saved: {e}; see the server's log"), 503
    assignments.release(pid, name)
    return flask.jsonify(ok=True, duplicate=not written, action=store.action(pid, name))

  def submitted(question: Question) -> labellers.Label:
    body = flask.request.get_json()
    ranking, better = body.get("ranking"), body.get("better_reply", "")
    if not isinstance(ranking, list):
      raise labellers.LabelError("expected 'ranking': a list of reply indices, best first")
    return labellers.Label(tuple(ranking), None, better if isinstance(better, str) else None)

  def no_store(response):
    response.headers["Cache-Control"] = "no-store"
    return response

  @app.get("/")
  def index():
    return flask.send_from_directory(_STATIC, "index.html")

  @app.get("/api/state")
  def api_state():
    return no_store(flask.jsonify(state()))

  @app.get("/api/team")
  def api_team():
    return no_store(flask.jsonify(team_status(store, assignments, prompt_ids)))

  @app.post("/api/submit")
  def api_submit():
    return decide(submitted)

  @app.post("/api/skip")
  def api_skip():
    return decide(lambda question: None)

  return app


def team_status(store: LabelStore, assignments: Assignments, prompt_ids: Sequence[str]) -> dict[str, Any]:
  """The page's team view: each labeller's decisions, the prompt they hold (and for how long they have been
  quiet), their agreement with the other people and with the replies' judge; overall agreement and alpha."""
  from gptrl import agreement  # pylint: disable=import-outside-toplevel
  comparisons = store.comparisons()
  people = agreement.judgements((f"{store.folder}/{LabelStore.COMPARISONS}", r) for r in comparisons)
  among = agreement.measure(people)
  judged, judges = [], set()  # the judge's preference on each pair of replies it scored apart
  for pid in dict.fromkeys(r.get("prompt_id") for r in comparisons):
    question = assignments.question(pid) if isinstance(pid, str) else None
    if question is None or question.scores is None:
      continue
    judges.add(question.judge)
    for i, j in itertools.combinations(range(len(question.replies)), 2):
      if question.scores[i] != question.scores[j]:
        win, lose = (i, j) if question.scores[i] > question.scores[j] else (j, i)
        judged.append(("judge", {"messages": labellers.messages_json(question.prompt), "judge": question.judge,
                                 "chosen": question.replies[win], "rejected": question.replies[lose]}))
  with_judge = agreement.measure({**people, **agreement.judgements(judged)}) if judged else None
  holding, decisions = assignments.holding(), store.per_labeller()
  names = sorted(set(decisions) | set(holding) | set(assignments.members or ()))
  rows = []
  for name in names:
    row: dict[str, Any] = {"name": name, **decisions.get(name, {"submitted": 0, "skipped": 0})}
    if name in holding:
      row.update(holding=holding[name][0], quiet_s=round(holding[name][1], 1))
    if name in among.per_labeller:
      row["compared"], row["agreement"] = among.per_labeller[name]
    if with_judge is not None:
      for judge in judges:
        key = tuple(sorted((name, f"judge:{judge}")))
        if key in with_judge.pairs:
          row["judge_compared"], row["judge_agreement"] = with_judge.pairs[key]
    rows.append(row)
  return {"overlap": assignments.overlap, "total": len(set(prompt_ids)), "complete": assignments.complete(prompt_ids),
          "labellers": rows, "judge": sorted(judges),
          "agreement": {"compared": among.overall[0], "agreement": among.overall[1] if among.overall[0] else None,
                        "alpha": among.alpha, "shared_units": among.shared_units,
                        "pairs": [{"labellers": list(k), "units": n, "agreement": a}
                                  for k, (n, a) in among.pairs.items()]}}


# ----------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=f"python -m {_PROG}", description=__doc__.split("\n\n", 1)[0],
                              epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  what = p.add_argument_group("what to label (one of --checkpoint or --replies)")
  what.add_argument("--checkpoint", default="", help="a chat-stage run's workdir, checkpoints/ folder or step folder")
  what.add_argument("--step", type=int, default=-1, help="checkpoint step (default: the newest)")
  what.add_argument("--tokenizer", default="", help="tokenizer model (default: <run workdir>/tokenizer.model)")
  what.add_argument("--prompts", action="append", default=[],
                    help="prompts: JSONL file or folder, or shakespeare_dialogue (default; repeatable)")
  what.add_argument("--num_prompts", type=int, default=0, help="label at most this many prompts (0: all)")
  what.add_argument("--eval_fraction", type=float, default=0.08,
                    help="shakespeare_dialogue: share of plays held out, as in the SFT run (default %(default)s)")
  what.add_argument("--split_seed", type=int, default=0, help="shakespeare_dialogue: the SFT run's data.split_seed")
  what.add_argument("--replies", default="", help="rank the replies of this replies.jsonl instead of sampling")
  what.add_argument("--out", required=True, help="folder for comparisons.jsonl, demonstrations.jsonl, label_log.jsonl")
  team = p.add_argument_group("who labels (one person by default)")
  team.add_argument("--labeller", default=None, help="the one person labelling: the records' \"labeller\" "
                    "(default human)")
  team.add_argument("--team", default="", help="a team: a file of 'NAME TOKEN' lines, a labeller each; every "
                    "labeller opens the page with their own ?token= and is known by it")
  team.add_argument("--names", action="store_true", help="a team whose members each give their name on the page "
                    "(once per browser tab); no identity check beyond the page's token")
  team.add_argument("--overlap", type=int, default=1, help="different labellers who rank each prompt (default "
                    "%(default)s; python -m gptrl.agreement and the page's team view measure how alike they rank)")
  team.add_argument("--assignment_timeout", type=float, default=600.0, help="seconds without a word from a "
                    "labeller's page after which their prompt goes to someone else (default %(default)s)")
  what.add_argument("--k", type=int, default=4, help="replies per prompt (default %(default)s; the reward stage's "
                    "data.max_responses must be at least this)")
  gen = p.add_argument_group("sampling")
  gen.add_argument("--seed", type=int, default=0, help="prompt order and sampling seed (default %(default)s)")
  gen.add_argument("--max_new_tokens", type=int, default=0, help="tokens per reply (default: min(64, context/2))")
  gen.add_argument("--temperature", type=float, default=1.0, help="(default %(default)s)")
  gen.add_argument("--top_k", type=int, default=0, help="0 disables (default %(default)s)")
  gen.add_argument("--top_p", type=float, default=0.95, help="1.0 disables (default %(default)s)")
  gen.add_argument("--ahead", type=int, default=2, help="prompts sampled ahead of the person (default %(default)s)")
  serve = p.add_argument_group("serving")
  serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine)")
  serve.add_argument("--port", type=int, default=8080, help="port (default %(default)s; 0: any free one)")
  serve.add_argument("--token", default="", help="access token (default: $GPTRL_LABEL_TOKEN; beyond loopback a "
                     "random one is made and printed once if neither is set)")
  serve.add_argument("--allowed_host", action="append", default=[],
                     help="another name labellers reach this server by (Host header; repeatable; * allows any)")
  return p


def _questions(args: argparse.Namespace, progress: Progress
               ) -> tuple[Callable[[Callable[[str], bool]], Iterable[Question]], list[str], bool]:
  """Checks what to label; returns (wanted -> the questions whose prompt id is still wanted, sampled as they are
  consumed; every prompt id; whether sampling should wait for the labellers)."""
  if args.replies:
    questions = replies_questions(args.replies, args.k)
    return lambda wanted: questions, [q.prompt_id for q in questions], False
  from gptrl import sample as sample_lib  # pylint: disable=import-outside-toplevel
  try:
    source = sample_lib.open_checkpoint(args.checkpoint, step=args.step, tokenizer_path=args.tokenizer)
  except sample_lib.UsageError as e:
    raise UsageError(str(e)) from None
  if source.stage in (sample_lib.PRETRAIN_STAGE, sample_lib.REWARD_STAGE):
    raise UsageError(f"--checkpoint {source.where} is a checkpoint of stage {source.stage!r}, which does not chat; "
                     "give an SFT or PPO run.")
  max_len = source.model_config.max_len
  max_new = args.max_new_tokens or min(64, max_len // 2)
  if max_new >= max_len:
    raise UsageError(f"--max_new_tokens={max_new} must be less than the context length {max_len}.")
  prompts = load_prompts(args.prompts or ["shakespeare_dialogue"], cache_dir=None, num_prompts=args.num_prompts,
                         seed=args.seed, eval_fraction=args.eval_fraction, split_seed=args.split_seed)

  def questions(wanted: Callable[[str], bool]) -> Iterator[Question]:
    return sampled_questions(source, prompts, wanted, k=args.k, seed=args.seed, max_new_tokens=max_new,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, progress=progress)
  return questions, [prompt_id(p) for _, p in prompts], True


def _who(args: argparse.Namespace) -> tuple[str | None, dict[str, str]]:
  """(the one labeller's name, or None when the team names itself or comes from --team; {name: token} of --team)."""
  if sum(map(bool, (args.labeller is not None, args.team, args.names))) > 1:
    raise UsageError("give one of --labeller NAME (one person), --team FILE (a token each) or --names (the page "
                     "asks each labeller's name).")
  if args.team and args.token:
    raise UsageError("--token is the one token of a page without --team; with --team each labeller has their own.")
  team: dict[str, str] = {}
  if args.team:
    if not fileio.isfile(args.team):
      raise UsageError(f"--team {args.team}: no such file; expected 'NAME TOKEN' lines, one per labeller.")
    try:
      team = access_lib.team_tokens(args.team, fileio.read_text(args.team))
      for name in team:
        check_name(name, f"{args.team}: the name")
    except (access_lib.TeamFileError, labellers.LabelError) as e:
      raise UsageError(str(e)) from None
    if args.overlap > len(team):
      raise UsageError(f"--overlap {args.overlap}: the team in {args.team} has only {len(team)} labeller(s).")
    return None, team
  if args.names:
    return None, {}
  try:
    name = check_name(args.labeller or "human", "--labeller")
  except labellers.LabelError as e:
    raise UsageError(str(e)) from None
  if args.overlap > 1:
    raise UsageError(f"--overlap {args.overlap} needs a team: --team FILE (a token each) or --names (the page asks "
                     "each labeller's name); one person ranks each prompt once.")
  return name, {}


def run(args: argparse.Namespace) -> None:
  """Serves the labelling page until interrupted.

  Raises:
    UsageError: flags that cannot work together, a checkpoint or file that cannot be used.
  """
  if bool(args.checkpoint) == bool(args.replies):
    raise UsageError("give --checkpoint RUN (sample replies) or --replies replies.jsonl (rank given ones), not both.")
  if fileio.is_remote(args.out):
    raise UsageError(f"--out {args.out}: must be a local folder (each decision is appended and fsynced before the "
                     "page hears it was saved, which a bucket cannot do); copy it to the bucket afterwards, e.g. "
                     "gcloud storage cp -r.")
  if args.replies and (args.prompts or args.num_prompts):
    raise UsageError("--prompts and --num_prompts pick prompts to sample from a --checkpoint; with --replies the "
                     "file's prompts are used.")
  if args.k < 2 or args.ahead < 1 or not 0.0 < args.top_p <= 1.0 or args.temperature < 0 or args.top_k < 0:
    raise UsageError("--k must be >= 2, --ahead >= 1, --top_p in (0, 1], --temperature and --top_k >= 0.")
  if args.overlap < 1 or args.assignment_timeout <= 0:
    raise UsageError("--overlap must be >= 1 and --assignment_timeout > 0.")
  name, team = _who(args)
  progress = Progress()
  questions_in, prompt_ids, sampled = _questions(args, progress)
  store = LabelStore(args.out)
  members = [name] if name is not None else (list(team) or None)
  assignments = Assignments(store, overlap=args.overlap, timeout=args.assignment_timeout, ahead=args.ahead,
                            members=members)
  token, made = ("", False) if team else access_lib.resolve_token(
      args.token or os.environ.get("GPTRL_LABEL_TOKEN", ""), args.host)
  access = access_lib.Access(token, access_lib.allowed_hosts(args.host, args.allowed_host), team=team)
  app = create_app(store, assignments, progress, prompt_ids, labeller=name, access=access)
  server = cli.http_server(args.host, args.port, app, on_error=store.close)
  threading.Thread(target=hand_out, args=(questions_in(assignments.wanted), assignments, progress, sampled),
                   name="label-questions", daemon=True).start()
  counts = store.counts(prompt_ids)
  logging.info("%d prompts, %d decision(s) on them before; %s; writing to %s.", len(set(prompt_ids)),
               sum(counts.values()), f"{args.overlap} labeller(s) per prompt" if args.overlap > 1 else "one labeller "
               "per prompt", args.out)
  address = access_lib.page_address(args.host, server.server_port, token if made else "")
  if team:
    print(f"Team of {len(team)} ({', '.join(team)}): each opens {address}?token=<their token in {args.team}>",
          file=sys.stderr, flush=True)
  print(f"Labelling page: {address}  (Ctrl-C stops; nothing saved is lost)", file=sys.stderr, flush=True)
  cli.serve_until_interrupted(server, store.close)


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status (0, or 2 after a one-line usage error on stderr)."""
  return cli.main(_PROG, _parser(), run, lambda: cli.setup_logging(
      ("absl", "orbax", "jax._src", "etils", "werkzeug"), logging.WARNING), argv)


if __name__ == "__main__":
  sys.exit(main())
