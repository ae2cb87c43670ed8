"""People label replies: a local web page that shows a prompt with K replies, lets a person rank them (drag, or
click in order of preference; keyboard too), optionally write a better reply, and submit or skip.

  python -m gptrl.label --checkpoint runs/sft_cpu --out runs/human_labels            # the built-in prompts
  python -m gptrl.label --checkpoint runs/sft_cpu --prompts my_prompts.jsonl --out runs/human_labels --k 4
  python -m gptrl.label --replies runs/label_cpu/replies.jsonl --out runs/human_labels   # no model needed

then open the printed address (http://127.0.0.1:8080/ by default; the server listens on localhost only unless
--host says otherwise). Beyond loopback the page's data needs an access token (--token, $GPTRL_LABEL_TOKEN, or a
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
  comparisons.jsonl     one ranked record per submitted prompt, the reward stage's format:
                        {"messages", "responses", "ranking": [best, ..., worst], "labeller": "human",
                         "prompt_id", "where", "time"}
  demonstrations.jsonl  one SFT record per better reply written: {"messages": prompt + reply, ...}
  label_log.jsonl       every decision (submitted or skipped) with its records: the journal the other two are
                        repaired from, and the list of prompt ids already done.
A prompt id is a hash of the prompt (and, with --replies, of its replies): labelling the same prompts again into
the same --out shows only those not done yet. Stopping the server at any moment (Ctrl-C, kill -9) loses nothing
the page was told was saved and duplicates nothing: on start, a line cut short by a kill is dropped, records of
the journal missing from the outputs are appended, and a submission the browser sends twice is written once.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import queue
import sys
import threading
import time
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
_REPLIES_EXPECTED = "{'messages' or 'prompt', 'responses': [str, ...]}"


UsageError = cli.UsageError


@dataclasses.dataclass(frozen=True)
class Question:
  """One prompt and the replies a labeller ranks; `dropped` counts the empty or repeated replies not shown."""
  prompt_id: str
  where: str
  prompt: tuple[chat.Message, ...]
  replies: tuple[str, ...]
  dropped: int = 0

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


# ----------------------------------------------------------------------------------------------
# Persistence.


class LabelStore:
  """The decisions made so far in one output folder, and the only writer of its files (see the module docstring).

  A decision is one line of label_log.jsonl: {"prompt_id", "action": "submitted" | "skipped", "time",
  "comparison": record | null, "demonstration": record | null}. It is written (and fsynced) first, then its
  records to comparisons.jsonl and demonstrations.jsonl; on opening, any record the log has and an output lacks
  (a kill between the writes) is appended, so the log is the commit point.
  """
  LOG, COMPARISONS, DEMONSTRATIONS = "label_log.jsonl", "comparisons.jsonl", "demonstrations.jsonl"

  def __init__(self, folder: str):
    self.folder = folder
    os.makedirs(folder, exist_ok=True)
    self._cond = threading.Condition()
    self._writer = fileio.DurableLines(CRASH_ENV)
    paths = {name: os.path.join(folder, name) for name in (self.LOG, self.COMPARISONS, self.DEMONSTRATIONS)}
    expected = "a record written by gptrl.label"
    existing = {name: list(fileio.iter_jsonl(path, expected=expected, error=UsageError))
                if fileio.repair_torn_tail(path) else [] for name, path in paths.items()}
    self._actions: dict[str, str] = {}
    for where, entry in existing[self.LOG]:
      if not isinstance(entry.get("prompt_id"), str) or entry.get("action") not in ("submitted", "skipped"):
        raise UsageError(f"{where}: expected a decision {{'prompt_id', 'action': 'submitted' | 'skipped', ...}}; "
                         "was this file written by another program?")
      self._actions.setdefault(entry["prompt_id"], entry["action"])
    self._files = {name: open(path, "ab") for name, path in paths.items()}  # pylint: disable=consider-using-with
    fileio.fsync_dir(folder)
    # Repair: records of logged decisions that a kill kept out of the outputs.
    for name, field in ((self.COMPARISONS, "comparison"), (self.DEMONSTRATIONS, "demonstration")):
      have = {r.get("prompt_id") for _, r in existing[name]}
      missing = [e[field] for _, e in existing[self.LOG] if e.get(field) and e["prompt_id"] not in have]
      for record in missing:
        self._append(name, record)
        have.add(record["prompt_id"])
      if missing:
        logging.warning("%s: appended %d record(s) that label_log.jsonl holds but the file lacked (the server "
                        "was stopped between the two writes).", paths[name], len(missing))
      for pid in have - set(self._actions):  # a record with no decision: the log was removed or edited
        if pid is not None:
          self._actions[pid] = "submitted"
    if self._actions:
      logging.info("%s: %d prompt(s) already labelled or skipped.", folder, len(self._actions))

  def _append(self, name: str, record: dict[str, Any]) -> None:
    self._writer.append(self._files[name], record)

  def action(self, pid: str) -> str | None:
    """"submitted", "skipped", or None when `pid` has no decision yet."""
    with self._cond:
      return self._actions.get(pid)

  def counts(self, pids: Iterable[str]) -> dict[str, int]:
    """How many of `pids` were submitted and skipped."""
    with self._cond:
      actions = [self._actions.get(p) for p in pids]
    return {"submitted": actions.count("submitted"), "skipped": actions.count("skipped")}

  def commit(self, question: Question, label: labellers.Label | None, labeller: str) -> bool:
    """Writes the decision on `question` (None: skipped) and its records; False (nothing written) when that
    prompt already has one."""
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
    with self._cond:
      if question.prompt_id in self._actions:
        return False
      action = "skipped" if label is None else "submitted"
      self._append(self.LOG, {"prompt_id": question.prompt_id, "action": action, "time": round(time.time(), 3),
                              "comparison": comparison, "demonstration": demonstration})
      if comparison is not None:
        self._append(self.COMPARISONS, comparison)
      if demonstration is not None:
        self._append(self.DEMONSTRATIONS, demonstration)
      self._actions[question.prompt_id] = action
      self._cond.notify_all()
    return True

  def wait_for(self, pid: str, timeout: float) -> bool:
    """Waits until `pid` has a decision; False after `timeout` seconds without one."""
    with self._cond:
      return self._cond.wait_for(lambda: pid in self._actions, timeout=timeout)

  def close(self) -> None:
    with self._cond:
      for f in self._files.values():
        f.close()


# ----------------------------------------------------------------------------------------------
# The person at the page, as a labeller.

_PENDING = object()


class WebLabeller(labellers.Labeller):
  """The labeller behind the web page: `label` puts the question on the page and waits for the person.

  The page reads `question`; its submit and skip requests call `answer`. Used from one labelling thread.
  """
  def __init__(self, name: str = "human"):
    self.name = name  # what the records say labelled them ("labeller"): a person's name, or "human"
    self._cond = threading.Condition()
    self._question: Question | None = None
    self._answer: Any = _PENDING
    self._answered: set[str] = set()  # prompt ids answered in this session (their writing may be under way)

  def label(self, prompt: Sequence[chat.Message], replies: Sequence[str]) -> labellers.Label | None:
    """The Labeller interface: asks about `replies` (distinct, non-empty) to `prompt` on the page; see `ask`."""
    return self.ask(Question(prompt_id(prompt, replies), "", tuple(prompt), tuple(replies)))

  def ask(self, question: Question) -> labellers.Label | None:
    """Shows `question` on the page and blocks until the person submits it (a Label) or skips it (None)."""
    with self._cond:
      self._question, self._answer = question, _PENDING
      self._cond.notify_all()
      self._cond.wait_for(lambda: self._answer is not _PENDING)
      answer, self._question = self._answer, None
    return answer

  @property
  def question(self) -> Question | None:
    """The question waiting for the person, if any."""
    with self._cond:
      return self._question

  def answer(self, pid: str, label: labellers.Label | None) -> bool:
    """The person's answer to the question `pid` (None: skip); False when that is not the waiting question.
    A second answer to the same question is ignored (the first one counts)."""
    with self._cond:
      if self._question is None or self._question.prompt_id != pid:
        return False
      if self._answer is _PENDING:
        self._answer = label
        self._answered.add(pid)
        self._cond.notify_all()
      return True

  def was_answered(self, pid: str) -> bool:
    """Whether the question `pid` got an answer from the page since the server started."""
    with self._cond:
      return pid in self._answered


@dataclasses.dataclass
class Progress:
  """What the background threads are doing, for the page while no question is waiting."""
  message: str = "starting"
  done: bool = False
  error: str = ""


def labelling_loop(questions: Iterable[Question], labeller: WebLabeller, store: LabelStore,
                   progress: Progress) -> None:
  """Asks the person about each question not decided yet and stores each decision, until none is left."""
  try:
    for question in questions:
      if store.action(question.prompt_id) is None:
        label = labeller.ask(question)
        store.commit(question, label, labeller.name)
    progress.message, progress.done = "every prompt is labelled or skipped", True
  except Exception as e:  # pylint: disable=broad-except
    logging.exception("labelling stopped")
    progress.error = f"{type(e).__name__}: {e}"


def prefetch(items: Iterator[Question], ahead: int, progress: Progress) -> Iterator[Question]:
  """`items`, computed up to `ahead` items in advance in a background thread (sampling while a person reads)."""
  buffer: queue.Queue = queue.Queue(maxsize=max(1, ahead))
  end = object()

  def produce():
    try:
      for item in items:
        buffer.put(item)
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("sampling stopped")
      progress.error = f"{type(e).__name__}: {e}"
    buffer.put(end)

  threading.Thread(target=produce, name="label-sampler", daemon=True).start()
  while (item := buffer.get()) is not end:
    yield item


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
    questions.setdefault(pid, Question(pid, where, tuple(prompt), replies, dropped))
  if not questions:
    raise UsageError(f"--replies {path}: no record found.")
  return list(questions.values())


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


def sampled_questions(source: Any, prompts: Sequence[tuple[str, list[chat.Message]]], store: LabelStore, *,
                      k: int, seed: int, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                      progress: Progress) -> Iterator[Question]:
  """Questions with `k` replies sampled from the checkpoint `source` (gptrl.sample.Source) for each prompt not
  decided yet; each prompt's key is fold_in(key(seed), its id), so its replies do not depend on the others."""
  import jax  # pylint: disable=import-outside-toplevel
  from gptrl import config as config_lib  # pylint: disable=import-outside-toplevel
  from gptrl import sample as sample_lib  # pylint: disable=import-outside-toplevel
  from gptrl import sharding  # pylint: disable=import-outside-toplevel
  progress.message = f"loading the model of {source.where}"
  loaded = sample_lib.load(source, sharding.make_mesh(config_lib.MeshConfig(), jax.devices()[:1]))
  tok, max_len = source.tok, source.model_config.max_len
  for where, prompt in prompts:
    pid = prompt_id(prompt)
    if store.action(pid) is not None:
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


def create_app(store: LabelStore, labeller: WebLabeller, progress: Progress, prompt_ids: Sequence[str],
               save_timeout: float = 60.0, access: access_lib.Access | None = None) -> Any:
  """The Flask app: the page (label_static/), GET /api/state, POST /api/submit and /api/skip (JSON bodies).

  /api/state: {"status": "ready" | "waiting" | "done" | "error", "question", "message", "progress"}.
  /api/submit {"prompt_id", "ranking": [best, ..., worst], "better_reply"} and /api/skip {"prompt_id"} answer
  {"ok": true, "duplicate": bool} once the decision is on disk; sending one again is harmless ("duplicate").
  They take JSON only, which a page of another site cannot send here without the browser asking first, and
  this server never agrees: other sites cannot label on the person's behalf. `access` (default: loopback names,
  no token) checks every request's Host header (403) and the /api/ requests' token (401).
  """
  import flask  # pylint: disable=import-outside-toplevel
  app = flask.Flask(__name__, static_folder=_STATIC, static_url_path="/static")
  prompt_ids = list(dict.fromkeys(prompt_ids))
  access = access or access_lib.Access("", access_lib.allowed_hosts("127.0.0.1"))

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

  def state():
    counts = store.counts(prompt_ids)
    body: dict[str, Any] = {"progress": {**counts, "total": len(prompt_ids)}, "out": store.folder}
    question = labeller.question
    if question is not None and store.action(question.prompt_id) is None:
      return {**body, "status": "ready", "question": question.as_json()}
    if progress.error:
      return {**body, "status": "error", "message": progress.error}
    if progress.done:
      return {**body, "status": "done", "message": progress.message}
    return {**body, "status": "waiting", "message": progress.message}

  def decide(make_label: Callable[[Question], labellers.Label | None]):
    body = flask.request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("prompt_id"), str):
      return flask.jsonify(error="expected a JSON object with a string 'prompt_id'"), 400
    pid = body["prompt_id"]
    if store.action(pid) is not None:  # a retry of a decision already on disk
      return flask.jsonify(ok=True, duplicate=True, action=store.action(pid))
    question, asked = labeller.question, False
    if question is not None and question.prompt_id == pid:
      try:
        label = make_label(question)
        if label is not None:
          label.check(len(question.replies))
          if len(question.replies) < 2 and not label.better_reply.strip():
            raise labellers.LabelError("fewer than 2 replies to rank: write a better reply or skip.")
      except (labellers.LabelError, TypeError, ValueError) as e:
        return flask.jsonify(error=str(e)), 400
      asked = labeller.answer(pid, label)
    if not asked and not labeller.was_answered(pid):
      return flask.jsonify(error=f"prompt {pid} is not the one waiting for a label; reload the page"), 409
    # Answered now or a moment ago (a retry racing the first send): acknowledged once it is on disk.
    if not store.wait_for(pid, timeout=save_timeout):
      return flask.jsonify(error=progress.error or "not saved yet: the server is busy or failing; see its log"), 503
    return flask.jsonify(ok=True, duplicate=not asked, action=store.action(pid))

  def submitted(question: Question) -> labellers.Label:
    body = flask.request.get_json()
    ranking, better = body.get("ranking"), body.get("better_reply", "")
    if not isinstance(ranking, list):
      raise labellers.LabelError("expected 'ranking': a list of reply indices, best first")
    return labellers.Label(tuple(ranking), None, better if isinstance(better, str) else None)

  @app.get("/")
  def index():
    return flask.send_from_directory(_STATIC, "index.html")

  @app.get("/api/state")
  def api_state():
    response = flask.jsonify(state())
    response.headers["Cache-Control"] = "no-store"
    return response

  @app.post("/api/submit")
  def api_submit():
    return decide(submitted)

  @app.post("/api/skip")
  def api_skip():
    return decide(lambda question: None)

  return app


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
  what.add_argument("--labeller", default="human", help="who labels: the records' \"labeller\" (default "
                    "%(default)s). A team labels the same prompts (the same --replies, or --prompts and --seed) into "
                    "a folder each under its own names; python -m gptrl.agreement measures how alike they rank, and "
                    "the reward stage's data.min_agreement can leave out who disagrees")
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
               ) -> tuple[Callable[[LabelStore], Iterator[Question]], list[str]]:
  """Checks what to label; returns (store -> the questions not decided in it yet, sampled as they are consumed;
  every prompt id)."""
  if args.replies:
    questions = replies_questions(args.replies, args.k)
    return lambda store: iter(questions), [q.prompt_id for q in questions]
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

  def questions(store: LabelStore) -> Iterator[Question]:
    sampled = sampled_questions(source, prompts, store, k=args.k, seed=args.seed, max_new_tokens=max_new,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, progress=progress)
    return prefetch(sampled, args.ahead, progress)
  return questions, [prompt_id(p) for _, p in prompts]


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
  if not args.labeller.strip() or args.labeller.startswith(("judge:", "user:")):
    raise UsageError(f"--labeller {args.labeller!r}: give a person's name (\"judge:\" and \"user:\" name automatic "
                     "judges and gptrl.serve's users).")
  progress = Progress()
  questions_in, prompt_ids = _questions(args, progress)
  store = LabelStore(args.out)
  labeller = WebLabeller(args.labeller)
  token, made = access_lib.resolve_token(args.token or os.environ.get("GPTRL_LABEL_TOKEN", ""), args.host)
  access = access_lib.Access(token, access_lib.allowed_hosts(args.host, args.allowed_host))
  app = create_app(store, labeller, progress, prompt_ids, access=access)
  server = cli.http_server(args.host, args.port, app, on_error=store.close)
  threading.Thread(target=labelling_loop, args=(questions_in(store), labeller, store, progress), name="label-loop",
                   daemon=True).start()
  counts = store.counts(prompt_ids)
  logging.info("%d prompts, %d done before; writing to %s.", len(set(prompt_ids)), sum(counts.values()), args.out)
  address = access_lib.page_address(args.host, server.server_port, token if made else "")
  print(f"Labelling page: {address}  (Ctrl-C stops; nothing saved is lost)", file=sys.stderr, flush=True)
  cli.serve_until_interrupted(server, store.close)


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status (0, or 2 after a one-line usage error on stderr)."""
  return cli.main(_PROG, _parser(), run, lambda: cli.setup_logging(
      ("absl", "orbax", "jax._src", "etils", "werkzeug"), logging.WARNING), argv)


if __name__ == "__main__":
  sys.exit(main())
