"""What people talking to a served model say about its replies, kept durably in the formats the stages read.

Feedback (POST /v1/feedback of gptrl.serve, JSON) is one of:
  {"type": "rating", "messages": [conversation before the reply], "reply": str, "rating": 1 | -1, "reason": str}
  (the reply may be empty: a model that said nothing can be rated, and corrected)
  {"type": "comparison", "messages": [...], "replies": [str, str], "preferred": 0 | 1, "reason": str}
  {"type": "edit", "messages": [...], "reply": str, "edited": str}    what the model should have said
each with an optional "id" (the client's idempotency key: feedback sent twice is written once), "completion_id"
(the completion it is about: its sampling parameters join the provenance) and "user".

Written to one local folder, each line appended, flushed and fsynced before the client hears it was saved:
  comparisons.jsonl     the reward stage's ranked format: {"messages", "responses", "ranking": [best, worst],
                        "labeller": "user:<name>" | "user", ...provenance}; a comparison, and an edit (the edited
                        reply ranked above the model's)
  demonstrations.jsonl  SFT's format: {"messages": prompt + the edited reply, ...provenance}
  ratings.jsonl         {"messages", "reply", "rating", "reason", ...provenance}
  feedback_log.jsonl    the journal: one line per piece of feedback, {"id", "type", "time", "records": {file:
                        [record, ...]}}, written first; on start, a line cut short by a kill is dropped and
                        records the journal holds but an output file lacks are appended (a kill between the writes)
  conversations.jsonl   every completion served, only with `--log_conversations` (otherwise a conversation is
                        stored only where feedback is given)
Provenance on every record: "feedback_id", "source": "serve", "model" (the serving checkpoint: folder, step,
stage, manifest_sha256), "sampling" (the completion's parameters when `completion_id` is known), "user", "time".
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any, Mapping

from gptrl import chat
from gptrl import fileio
from gptrl import labellers

# Test hook, as gptrl.label's: the N-th line appended (1-based, over all files) is written in part, then the
# process kills itself with SIGKILL.
CRASH_ENV = "GPTRL_FEEDBACK_TEST_CRASH_AT"
LOG, COMPARISONS, DEMONSTRATIONS, RATINGS = ("feedback_log.jsonl", "comparisons.jsonl", "demonstrations.jsonl",
                                             "ratings.jsonl")
CONVERSATIONS = "conversations.jsonl"
OUTPUTS = (COMPARISONS, DEMONSTRATIONS, RATINGS)
TYPES = ("rating", "comparison", "edit")
_FIELDS = {"rating": {"reply", "rating", "reason"}, "comparison": {"replies", "preferred", "reason"},
           "edit": {"reply", "edited", "reason"}}
_COMMON = {"type", "id", "messages", "completion_id", "user"}


class FeedbackError(ValueError):
  """Feedback that cannot be stored; the message names the field and what was expected."""


def _text(body: Mapping[str, Any], name: str, *, required: bool = True) -> str:
  value = body.get(name, "")
  if not isinstance(value, str):
    raise FeedbackError(f"field {name!r} must be a string, got {type(value).__name__}")
  if required and not value.strip():
    raise FeedbackError(f"field {name!r} must be a non-empty string")
  return value.strip()


def records_of(body: Any, provenance: Mapping[str, Any]) -> tuple[str, str, dict[str, list[dict[str, Any]]]]:
  """(feedback id, type, {output file: [records]}) of one piece of feedback, the records carrying `provenance`.

  Raises:
    FeedbackError: not a JSON object, an unknown type or field, or a field of the wrong kind (named).
  """
  if not isinstance(body, dict):
    raise FeedbackError(f"expected a JSON object with 'type' ({' | '.join(TYPES)}) and 'messages'")
  kind = body.get("type")
  if kind not in TYPES:
    raise FeedbackError(f"field 'type' must be one of {', '.join(TYPES)}, got {kind!r:.40}")
  unknown = sorted(set(body) - _COMMON - _FIELDS[kind])
  if unknown:
    raise FeedbackError(f"unknown field {unknown[0]!r} for feedback of type {kind!r} (expected "
                        f"{', '.join(sorted(_COMMON | _FIELDS[kind]))})")
  feedback_id = body.get("id", "") or uuid.uuid4().hex
  if not isinstance(feedback_id, str) or len(feedback_id) > 128:
    raise FeedbackError("field 'id' must be a string of at most 128 characters")
  try:
    prompt = chat.prompt_messages({"messages": body.get("messages")}, "field 'messages'")
  except chat.ChatFormatError as e:
    raise FeedbackError(str(e)) from None
  if prompt[-1].role == "assistant":
    raise FeedbackError("field 'messages' must be the conversation before the reply, ending in a user (or system) "
                        "turn")
  user = _text(body, "user", required=False)
  extra = {"feedback_id": feedback_id, "source": "serve", **provenance, "user": user or None}
  labeller = f"user:{user}" if user else "user"
  reason = _text(body, "reason", required=False)
  if reason:
    extra["reason"] = reason
  messages = labellers.messages_json(prompt)
  stamp = round(time.time(), 3)
  if kind == "rating":  # an empty reply can be rated too (thumbs down, mostly)
    rating = body.get("rating")
    if rating not in (1, -1) or isinstance(rating, bool):
      raise FeedbackError(f"field 'rating' must be 1 (thumbs up) or -1 (thumbs down), got {rating!r:.40}")
    record = {"messages": messages, "reply": _text(body, "reply", required=False), "rating": rating, **extra,
              "time": stamp}
    return feedback_id, kind, {RATINGS: [record]}
  if kind == "comparison":
    replies, preferred = body.get("replies"), body.get("preferred")
    if (not isinstance(replies, list) or len(replies) != 2 or not all(isinstance(r, str) and r.strip()
                                                                        for r in replies)):
      raise FeedbackError("field 'replies' must be a list of two non-empty strings")
    replies = [r.strip() for r in replies]
    if replies[0] == replies[1]:
      raise FeedbackError("field 'replies' holds the same text twice; a comparison needs two different replies")
    if preferred not in (0, 1) or isinstance(preferred, bool):
      raise FeedbackError(f"field 'preferred' must be 0 or 1 (the better reply's index), got {preferred!r:.40}")
    record = {"messages": messages, "responses": replies, "ranking": [preferred, 1 - preferred],
              "labeller": labeller, **extra, "time": stamp}
    return feedback_id, kind, {COMPARISONS: [record]}
  reply, edited = _text(body, "reply", required=False), _text(body, "edited")
  if edited == reply:
    raise FeedbackError("field 'edited' is the same as 'reply'; an edit must change the reply")
  demonstration = {"messages": messages + [{"role": "assistant", "content": edited}], "labeller": labeller, **extra,
                   "time": stamp}
  out = {DEMONSTRATIONS: [demonstration]}
  if reply:  # the edit ranked above the model's reply (an empty reply cannot be ranked: the demonstration only)
    out[COMPARISONS] = [{"messages": messages, "responses": [edited, reply], "ranking": [0, 1], "labeller": labeller,
                         **extra, "time": stamp}]
  return feedback_id, kind, out


class FeedbackStore:
  """The feedback of one output folder, and the only writer of its files (see the module docstring)."""

  def __init__(self, folder: str, *, log_conversations: bool = False):
    if fileio.is_remote(folder):
      raise FeedbackError(f"{folder}: feedback is appended and fsynced record by record, which a bucket cannot do; "
                          "give a local folder and copy it to the bucket afterwards")
    self.folder = folder
    os.makedirs(folder, exist_ok=True)
    self._lock = threading.Lock()
    self._writer = fileio.DurableLines(CRASH_ENV)
    self._broken = ""
    names = (LOG,) + OUTPUTS + ((CONVERSATIONS,) if log_conversations else ())
    paths = {name: os.path.join(folder, name) for name in names}
    expected = "a record written by gptrl.serve"
    existing = {name: list(fileio.iter_jsonl(path, expected=expected, error=FeedbackError))
                if fileio.repair_torn_tail(path) else [] for name, path in paths.items()}
    self._ids: dict[str, str] = {}
    for where, entry in existing[LOG]:
      if not isinstance(entry.get("id"), str) or not isinstance(entry.get("records"), dict):
        raise FeedbackError(f"{where}: expected a journal line {{'id', 'type', 'records', ...}}; was this file "
                            "written by another program?")
      self._ids.setdefault(entry["id"], entry.get("type", ""))
    self._files = {name: open(path, "ab") for name, path in paths.items()}  # pylint: disable=consider-using-with
    fileio.fsync_dir(folder)
    for name in OUTPUTS:  # records of journalled feedback that a kill kept out of the outputs
      have = {r.get("feedback_id") for _, r in existing[name]}
      missing = [r for _, e in existing[LOG] if e["id"] not in have for r in e["records"].get(name, [])]
      for record in missing:
        self._append(name, record)
      if missing:
        logging.warning("%s: appended %d record(s) that %s holds but the file lacked (the server was stopped "
                        "between the writes).", paths[name], len(missing), LOG)
    if self._ids:
      logging.info("%s: %d piece(s) of feedback so far.", folder, len(self._ids))

  def _append(self, name: str, record: dict[str, Any]) -> None:
    self._writer.append(self._files[name], record)

  def add(self, feedback_id: str, kind: str, records: dict[str, list[dict[str, Any]]]) -> bool:
    """Writes one piece of feedback (journal first, then its records); False (nothing written) when `feedback_id`
    was stored before."""
    with self._lock:
      if feedback_id in self._ids:
        return False
      if self._broken:
        raise OSError(f"{self.folder}: an earlier write failed ({self._broken}); restart the server, which "
                      "repairs the files from the journal")
      self._append(LOG, {"id": feedback_id, "type": kind, "time": round(time.time(), 3), "records": records})
      self._ids[feedback_id] = kind  # committed: the journal holds it, and a restart repairs the outputs from it
      try:
        for name, items in records.items():
          for record in items:
            self._append(name, record)
      except OSError as e:
        self._broken = f"{type(e).__name__}: {e}"
        logging.error("%s: feedback %s is in the journal but not in every output file (%s); restart to repair.",
                      self.folder, feedback_id, self._broken)
    return True

  def log_conversation(self, record: dict[str, Any]) -> None:
    """Appends a served completion to conversations.jsonl (only opened with log_conversations)."""
    if CONVERSATIONS in self._files:
      with self._lock:
        self._append(CONVERSATIONS, record)

  def counts(self) -> dict[str, int]:
    """Pieces of feedback stored, by type."""
    with self._lock:
      kinds = list(self._ids.values())
    return {kind: kinds.count(kind) for kind in TYPES}

  def close(self) -> None:
    with self._lock:
      for f in self._files.values():
        f.close()
