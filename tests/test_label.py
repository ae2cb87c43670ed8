"""People in the loop: the labeller interface, `python -m gptrl.label`'s records and their persistence (kill -9
mid-write, restart: nothing acknowledged lost, nothing duplicated), its JSON API, and the page itself in a real
headless browser (Debian's chromium + chromedriver through selenium; skipped when they are not installed).

Servers run as subprocesses on a free 127.0.0.1 port, mostly on a replies file (no model: they start in about a
second); one runs on a tiny SFT-stage checkpoint written here (random weights: the replies are noise, which is all
the page needs).
"""
from __future__ import annotations

import http.client
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from gptrl import access as access_lib
from gptrl import chat
from gptrl import label
from gptrl import labellers
from helpers import REPO, ServerProcess, env, make_tiny_checkpoint

USER = [chat.Message("user", "Where does the fox walk?")]

# Readable replies for the page (a labelling run's replies.jsonl has the same fields).
_REPLIES = [
    ("Where does the king walk at dawn?",
     ["The king walks to the market before dawn.", "He does not walk; he rides.",
      "To the northern hills, with great care, as every morning.", "I cannot say."]),
    ("What does the sailor carry?",
     ["A silver cup.", "Seven stones from the winter garden.", "Nothing but his name.", "An empty boat, somehow."]),
    ("Who speaks with the merchant?",
     ["Our neighbour, after supper.", "A clever fox.", "The quiet river, in its way.", "Nobody at all."]),
    ("Where is the wooden bridge?",
     ["Near the sea.", "At the gate of the tall tower.", "Past the market.", "Near the sea."]),  # a repeat: 3 shown
]


def _write_replies(path: pathlib.Path, n: int | None = None) -> pathlib.Path:
  with open(path, "w", encoding="utf-8") as f:
    for i, (prompt, replies) in enumerate(_REPLIES[:n]):
      messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": prompt}]
      f.write(json.dumps({"prompt_index": i, "messages": messages, "responses": replies,
                          "scores": [0.0] * len(replies)}) + "\n")
  return path


def _many_replies(path: pathlib.Path, n: int) -> pathlib.Path:
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      f.write(json.dumps({"prompt": f"Question {i}?", "responses": [f"Answer {i}.{j}." for j in range(4)]}) + "\n")
  return path


def _jsonl(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  data = path.read_text(encoding="utf-8")
  assert not data or data.endswith("\n"), f"{path} ends in a partial line"
  return [json.loads(line) for line in data.splitlines()]


# ----------------------------------------------------------------------------------------------
# The labeller interface.


def test_judge_labeller_ranks_as_the_judges_scores_say():
  replies = ["two words", "four words right here", "", "one"]
  got = labellers.JudgeLabeller("length").label(USER, replies)
  assert got.scores == (2.0, 4.0, 0.0, 1.0)  # word counts, by hand
  assert got.ranking == (1, 0, 3, 2) and got.better_reply == ""
  # Ties keep reply order; a batch is labelled as its prompts one by one.
  batch = labellers.JudgeLabeller("length").label_many([USER, USER], [["a b", "c d", "e"], replies])
  assert batch[0].ranking == (0, 1, 2) and batch[1] == got


def test_label_check_refuses_what_is_not_a_ranking_of_the_replies():
  labellers.Label((2, 0, 1)).check(3)
  for ranking in [(0, 0, 1), (0, 1), (1, 2, 3), (0, True, 2)]:
    with pytest.raises(labellers.LabelError, match="ranking must list the reply indices 0..2"):
      labellers.Label(ranking).check(3)


class Clock:
  """A clock the test moves by hand."""
  def __init__(self):
    self.now = 1000.0

  def __call__(self) -> float:
    return self.now


def _questions(n: int) -> list[label.Question]:
  return [label.Question(f"{i:012x}", f"q.jsonl:{i + 1}", (chat.Message("user", f"Question {i}?"),),
                         (f"Answer {i}a.", f"Answer {i}b.")) for i in range(n)]


def _assigned(tmp_path, n=4, **kwargs):
  store, clock = label.LabelStore(str(tmp_path / "out")), Clock()
  assignments = label.Assignments(store, clock=clock, **kwargs)
  questions = _questions(n)
  label.hand_out(questions, assignments, label.Progress(), block=False)
  return store, assignments, clock, [q.prompt_id for q in questions]


def _decide(store, assignments, pid, who, ranking=(0, 1)):
  assert assignments.claim(pid, who)
  assert store.commit(assignments.question(pid), None if ranking is None else labellers.Label(ranking), who)
  assignments.release(pid, who)


def test_each_prompt_goes_to_overlap_labellers_never_two_at_once_on_one_assignment(tmp_path):
  store, assignments, _, ids = _assigned(tmp_path, overlap=2)
  got = {who: assignments.next_for(who).prompt_id for who in ("ann", "bob", "cy")}
  assert got == {"ann": ids[0], "bob": ids[0], "cy": ids[1]}  # the first prompt's two assignments are taken
  assert assignments.next_for("ann").prompt_id == ids[0]  # asking again: the same one, still hers
  _decide(store, assignments, ids[0], "ann")
  assert assignments.next_for("ann").prompt_id == ids[1]  # with cy: the second prompt's other assignment
  assert not assignments.claim(ids[1], "bob")  # both of its assignments are held; bob cannot take a third
  _decide(store, assignments, ids[0], "bob", None)  # bob skips: the first prompt needs another labeller
  assert assignments.next_for("bob").prompt_id == ids[2]
  assert assignments.next_for("dee").prompt_id == ids[0]
  assert assignments.complete(ids) == 0
  _decide(store, assignments, ids[0], "dee", (1, 0))
  assert assignments.complete(ids) == 1 and not assignments.wanted(ids[0])
  assert store.decisions(ids[0]) == {"ann": "submitted", "bob": "skipped", "dee": "submitted"}
  store.close()


def test_an_abandoned_assignment_returns_to_the_pool_and_a_late_decision_still_counts(tmp_path):
  store, assignments, clock, ids = _assigned(tmp_path, overlap=1, timeout=60)
  assert assignments.next_for("ann").prompt_id == ids[0]
  assert assignments.next_for("bob").prompt_id == ids[1]  # overlap 1: never the one ann holds
  for _ in range(5):  # ann's page says it is there every 30 s: hers for as long as that goes on
    clock.now += 30
    assert assignments.next_for("ann").prompt_id == ids[0]
    assert assignments.next_for("bob").prompt_id == ids[1]
  clock.now += 61  # ann's tab is closed; bob finishes his
  _decide(store, assignments, ids[1], "bob")
  assert assignments.next_for("bob").prompt_id == ids[0]  # ann's, abandoned
  assert set(assignments.holding()) == {"bob"}
  assert assignments.next_for("ann").prompt_id == ids[2]  # back: hers went to bob; she gets the next
  _decide(store, assignments, ids[0], "ann")  # her page still had it: her label is kept
  _decide(store, assignments, ids[0], "bob", (1, 0))
  assert store.decisions(ids[0]) == {"ann": "submitted", "bob": "submitted"}
  # Back after a while with nobody else taking it: ann's own prompt is still hers.
  clock.now += 600
  assert assignments.next_for("ann").prompt_id == ids[2]
  store.close()


def test_what_a_labeller_with_nothing_to_do_is_told(tmp_path):
  store, assignments, clock, ids = _assigned(tmp_path, n=2, overlap=1, timeout=60)
  assert assignments.next_for("ann").prompt_id == ids[0]
  assert assignments.next_for("bob").prompt_id == ids[1]
  _decide(store, assignments, ids[1], "bob")
  assert assignments.next_for("bob") is None and assignments.left_for("bob") == "held"  # ann's may come back
  clock.now += 61
  assert assignments.next_for("bob").prompt_id == ids[0]
  _decide(store, assignments, ids[0], "bob")
  assert assignments.left_for("ann") == assignments.left_for("bob") == "done"
  assert not assignments.claim("0123456789ab", "ann")  # not a prompt of this server
  store.close()
  # Sampled prompts still coming: "coming", and sampling goes on while someone waits in vain.
  store = label.LabelStore(str(tmp_path / "other"))
  assignments = label.Assignments(store, overlap=1, ahead=1, members=["ann"])
  assert assignments.next_for("ann") is None and assignments.left_for("ann") == "coming"
  for question in _questions(2):
    assignments.add(question)  # returns: ann asked in vain a moment ago
  assert assignments.next_for("ann").prompt_id == ids[0]
  store.close()


def test_decisions_are_per_labeller_and_survive_a_restart(tmp_path):
  store, assignments, _, ids = _assigned(tmp_path, overlap=2, members=["ann", "bob"])
  _decide(store, assignments, assignments.next_for("ann").prompt_id, "ann", None)
  _decide(store, assignments, assignments.next_for("bob").prompt_id, "bob")
  assert not store.commit(assignments.question(ids[0]), labellers.Label((1, 0)), "bob")  # once per labeller
  store.close()
  store = label.LabelStore(str(tmp_path / "out"))
  assert store.decisions(ids[0]) == {"ann": "skipped", "bob": "submitted"}
  assert [(e["prompt_id"], e["labeller"], e["action"]) for e in _jsonl(tmp_path / "out" / "label_log.jsonl")] == [
      (ids[0], "ann", "skipped"), (ids[0], "bob", "submitted")]
  assignments = label.Assignments(store, overlap=2, members=["ann", "bob"])
  label.hand_out(_questions(4), assignments, label.Progress(), block=False)
  assert assignments.next_for("ann").prompt_id == ids[1] and assignments.next_for("bob").prompt_id == ids[1]
  assert not assignments.wanted(ids[0]) or store.decisions(ids[0]).keys() == {"ann", "bob"}
  store.close()


def test_a_log_written_before_decisions_named_their_labeller_is_read_as_its_records_say(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  q = _questions(2)
  record = labellers.ranked_record(q[0].prompt, q[0].replies, labellers.Label((0, 1)), labeller="alice",
                                   prompt_id=q[0].prompt_id)
  with open(out / "label_log.jsonl", "w", encoding="utf-8") as f:
    for entry in ({"prompt_id": q[0].prompt_id, "action": "submitted", "comparison": record},
                  {"prompt_id": q[1].prompt_id, "action": "skipped"}):
      f.write(json.dumps(entry) + "\n")
  store = label.LabelStore(str(out))  # comparisons.jsonl lacks alice's record: repaired from the log
  assert store.decisions(q[0].prompt_id) == {"alice": "submitted"}
  assert store.decisions(q[1].prompt_id) == {"human": "skipped"}
  assert [r["labeller"] for r in _jsonl(out / "comparisons.jsonl")] == ["alice"]
  store.close()


# ----------------------------------------------------------------------------------------------
# The JSON API, in process (Flask's test client).


def _app(tmp_path: pathlib.Path, access=None, labeller="human", overlap=1, members=("human",)):
  """(Flask test client, store) of a labelling app on the readable replies."""
  replies = _write_replies(tmp_path / "replies.jsonl")
  store = label.LabelStore(str(tmp_path / "out"))
  questions = label.replies_questions(str(replies), k=4)
  assignments, progress = label.Assignments(store, overlap=overlap, members=members), label.Progress()
  label.hand_out(questions, assignments, progress, block=False)
  app = label.create_app(store, assignments, progress, [q.prompt_id for q in questions], labeller=labeller,
                         access=access)
  return app.test_client(), store


@pytest.fixture
def web(tmp_path):
  """A labelling app on the readable replies, its loop running; .post(path, body) -> (status, json)."""
  client, store = _app(tmp_path)
  client_ = client  # (the class body below cannot read a name it also assigns from this scope)

  class Web:
    out = tmp_path / "out"
    client = client_

    @staticmethod
    def state():
      deadline = time.monotonic() + 5
      while (body := client.get("/api/state").get_json())["status"] == "waiting" and time.monotonic() < deadline:
        time.sleep(0.01)
      return body

    @staticmethod
    def post(path, body):
      response = client.post(path, json=body)
      return response.status_code, response.get_json()
  yield Web
  store.close()


def test_beyond_loopback_the_api_needs_the_token_and_every_request_a_known_host(tmp_path):
  hosts = access_lib.allowed_hosts("10.1.2.3", ["labels.example.org"])
  client, store = _app(tmp_path, access_lib.Access("s3cret", hosts))
  good = {"Host": "10.1.2.3:8080", "Authorization": "Bearer s3cret"}
  try:
    assert client.get("/", headers={"Host": "labels.example.org"}).status_code == 200  # the page itself is public
    for headers in ({"Host": "10.1.2.3:8080"}, {"Host": "10.1.2.3", "Authorization": "Bearer wrong"}):
      response = client.get("/api/state", headers=headers)
      assert response.status_code == 401 and "access token" in response.get_json()["error"]
    # A page on another site that rebinds its own name to this address: refused, with or without the token.
    for path in ("/", "/api/state"):
      response = client.get(path, headers={**good, "Host": "evil.example:8080"})
      assert response.status_code == 403 and "--allowed_host" in response.get_json()["error"]
    deadline = time.monotonic() + 5
    while (state := client.get("/api/state", headers=good).get_json())["status"] != "ready":
      assert time.monotonic() < deadline, state
      time.sleep(0.01)
    pid = state["question"]["prompt_id"]
    body = {"prompt_id": pid, "ranking": [0, 1, 2, 3]}
    assert client.post("/api/submit", json=body, headers={"Host": "10.1.2.3"}).status_code == 401
    # A form post (what another site's page can send without asking) is not JSON: refused, nothing written.
    form = client.post("/api/submit", data={"prompt_id": pid, "ranking": "0"}, headers=good)
    assert form.status_code == 400 and store.counts([pid]) == {"submitted": 0, "skipped": 0}
    assert client.post("/api/submit", json=body, headers=good).get_json()["ok"]
    assert store.counts([pid])["submitted"] == 1
  finally:
    store.close()


def test_on_loopback_no_token_is_needed_but_the_host_is_still_checked(web):
  assert web.state()["status"] == "ready"  # the fixture's app: loopback defaults
  response = web.client.get("/api/state", headers={"Host": "attacker.example"})
  assert response.status_code == 403


def test_listening_beyond_loopback_prints_a_token_once_in_the_address(tmp_path):
  replies = _write_replies(tmp_path / "replies.jsonl")
  server = Server(["--replies", replies, "--out", tmp_path / "out", "--host", "0.0.0.0"], tmp_path / "open.log")
  try:
    log = (tmp_path / "open.log").read_text()
    token = re.search(r"Access token \(shown once\): (\S+)", log).group(1)
    assert f"Labelling page: {server.url}/?token={token}" in log and log.count(token) == 2
    assert server.request("/api/state")[0] == 401
    request = urllib.request.Request(server.url + "/api/state", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
      assert response.status == 200 and "progress" in json.loads(response.read())
  finally:
    server.stop()


def test_a_submission_is_a_ranked_comparison_and_a_demonstration_the_stages_read(web):
  from gptrl import chat_data  # pylint: disable=import-outside-toplevel
  question = web.state()["question"]
  assert question["replies"] == _REPLIES[0][1] and question["messages"][-1]["content"] == _REPLIES[0][0]
  status, body = web.post("/api/submit", {"prompt_id": question["prompt_id"], "ranking": [2, 0, 3, 1],
                                          "better_reply": "  To the hills, gladly.  "})
  assert status == 200 and body == {"ok": True, "duplicate": False, "action": "submitted"}
  [record] = _jsonl(web.out / "comparisons.jsonl")
  assert record["ranking"] == [2, 0, 3, 1] and record["responses"] == _REPLIES[0][1]
  assert record["labeller"] == "human" and record["prompt_id"] == question["prompt_id"] and record["time"] > 0
  [group] = chat_data.load_comparisons([str(web.out / "comparisons.jsonl")], max_responses=4)
  r = _REPLIES[0][1]
  expected = {(r[2], r[0]), (r[2], r[3]), (r[2], r[1]), (r[0], r[3]), (r[0], r[1]), (r[3], r[1])}  # by hand
  assert {(group.responses[w], group.responses[l]) for w, l, _ in group.pairs} == expected
  [demo] = chat_data.load_conversations([str(web.out / "demonstrations.jsonl")])
  assert [m.content for m in demo.messages] == ["Answer briefly.", _REPLIES[0][0], "To the hills, gladly."]
  assert web.state()["progress"] == {"submitted": 1, "skipped": 0, "total": 4}


def test_a_decision_sent_twice_is_written_once(web):
  pid = web.state()["question"]["prompt_id"]
  first = web.post("/api/submit", {"prompt_id": pid, "ranking": [0, 1, 2, 3]})
  again = web.post("/api/submit", {"prompt_id": pid, "ranking": [3, 2, 1, 0]})  # a browser retry; first one counts
  skip = web.post("/api/skip", {"prompt_id": pid})
  assert first[0] == again[0] == skip[0] == 200 and again[1]["duplicate"] and skip[1]["duplicate"]
  assert [r["ranking"] for r in _jsonl(web.out / "comparisons.jsonl")] == [[0, 1, 2, 3]]
  assert [e["prompt_id"] for e in _jsonl(web.out / "label_log.jsonl")] == [pid]
  assert web.state()["question"]["prompt_id"] != pid


def test_a_bad_or_stale_submission_is_refused_and_writes_nothing(web):
  pid = web.state()["question"]["prompt_id"]
  status, body = web.post("/api/submit", {"prompt_id": pid, "ranking": [0, 0, 1, 2]})
  assert status == 400 and "ranking must list the reply indices 0..3" in body["error"]
  status, body = web.post("/api/submit", {"prompt_id": "0123456789ab", "ranking": [0, 1, 2, 3]})
  assert status == 409 and "is not assigned to you (human)" in body["error"]
  assert web.post("/api/submit", {"ranking": [0, 1, 2, 3]})[0] == 400
  assert not any(_jsonl(web.out / name) for name in ("comparisons.jsonl", "label_log.jsonl"))
  assert web.state()["question"]["prompt_id"] == pid


def test_skipped_and_submitted_prompts_are_not_asked_again_after_a_restart(web, tmp_path):
  first = web.state()["question"]
  assert web.post("/api/skip", {"prompt_id": first["prompt_id"]})[1]["action"] == "skipped"
  second = web.state()["question"]
  assert web.post("/api/submit", {"prompt_id": second["prompt_id"], "ranking": [1, 0, 2, 3]})[0] == 200
  assert not _jsonl(web.out / "demonstrations.jsonl") and len(_jsonl(web.out / "comparisons.jsonl")) == 1
  store = label.LabelStore(str(web.out))  # what a restarted server reads
  questions = label.replies_questions(str(tmp_path / "replies.jsonl"), k=4)
  assert [store.action(q.prompt_id, "human") for q in questions] == ["skipped", "submitted", None, None]
  # The repeated reply of the last prompt is shown once; the record keeps the 3 distinct ones.
  assert questions[3].replies == tuple(_REPLIES[3][1][:3]) and questions[3].dropped == 1
  store.close()


# ----------------------------------------------------------------------------------------------
# A real server, killed.


class Server(ServerProcess):
  """`python -m gptrl.label --port 0 ...` in a subprocess; waits until it listens."""

  def __init__(self, args: list[str], log: pathlib.Path, extra_env: dict[str, str] | None = None,
               timeout: float = 60):
    super().__init__("gptrl.label", args, log, r"Labelling page: (http://\S+)/", extra_env, timeout)

  def question(self, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while (state := self.request("/api/state")[1])["status"] == "waiting" and time.monotonic() < deadline:
      time.sleep(0.05)
    assert state["status"] == "ready", state
    return state["question"]


def _ranking_for(pid: str) -> list[int]:
  """A ranking that differs between prompts, the same for every send of one prompt."""
  r = [0, 1, 2, 3]
  shift = int(pid[:4], 16) % 4
  return r[shift:] + r[:shift]


def _assert_each_once(out: pathlib.Path, acked: dict) -> dict:
  """Every acknowledged decision (a prompt id, or (prompt id, labeller) for a team) is in the log and
  comparisons.jsonl exactly once, with its ranking; no labeller's decision on a prompt twice."""
  team = any(isinstance(key, tuple) for key in acked)

  def key(record):
    return (record["prompt_id"], record["labeller"]) if team else record["prompt_id"]
  comparisons, log = _jsonl(out / "comparisons.jsonl"), _jsonl(out / "label_log.jsonl")
  for records in (comparisons, log, _jsonl(out / "demonstrations.jsonl")):
    keys = [key(r) for r in records]
    assert len(keys) == len(set(keys)), "a record was written twice"
  by_key = {key(r): r for r in comparisons}
  assert set(acked) <= set(by_key) and set(acked) <= {key(e) for e in log}, "an acknowledged record is lost"
  assert all(by_key[k]["ranking"] == ranking for k, ranking in acked.items())
  return by_key


@pytest.mark.parametrize("torn", ["decision", "comparison"])
def test_kill_mid_write_then_restart_loses_and_duplicates_nothing(tmp_path, torn):
  replies, out = _many_replies(tmp_path / "replies.jsonl", 6), tmp_path / "out"
  # Each submission appends 3 lines: its decision (label_log), its comparison, its demonstration. The 3rd one's
  # decision (line 7) or comparison (line 8) is cut in half, then the server kills itself (SIGKILL).
  line = {"decision": 7, "comparison": 8}[torn]
  server = Server(["--replies", replies, "--out", out], tmp_path / "crash.log", {label.CRASH_ENV: str(line)})
  acked = {}
  with pytest.raises((urllib.error.URLError, ConnectionError)):
    for i in range(6):
      pid = server.question()["prompt_id"]
      status, body = server.request("/api/submit", {"prompt_id": pid, "ranking": _ranking_for(pid),
                                                    "better_reply": f"Better {i}."})
      assert status == 200, body
      acked[pid] = _ranking_for(pid)
  assert server.proc.wait(10) == -signal.SIGKILL and len(acked) == 2
  torn_file = out / ("label_log.jsonl" if torn == "decision" else "comparisons.jsonl")
  assert not torn_file.read_text(encoding="utf-8").endswith("\n")

  server = Server(["--replies", replies, "--out", out], tmp_path / "restart.log")
  try:
    restart_log = server.log.read_text()
    assert f"{torn_file}: dropped a partial last line" in restart_log
    third = label.replies_questions(str(replies), k=4)[2].prompt_id
    if torn == "decision":  # never decided: asked again
      assert server.question()["prompt_id"] == third
    else:  # decided: its records come back from the log, and it is not asked again
      assert "appended 1 record(s)" in restart_log and server.question()["prompt_id"] != third
      acked[third] = _ranking_for(third)
    pid = server.question()["prompt_id"]
    assert server.request("/api/submit", {"prompt_id": pid, "ranking": _ranking_for(pid)})[0] == 200
    acked[pid] = _ranking_for(pid)
    by_id = _assert_each_once(out, acked)
    assert set(by_id) == set(acked)
    demos = {d["prompt_id"]: d["messages"][-1]["content"] for d in _jsonl(out / "demonstrations.jsonl")}
    assert set(demos) == set(acked) - {pid}  # the last one had no better reply
  finally:
    server.stop()


def _kill_during(server: Server, clients: list[threading.Thread], acked: dict, at_least: int,
                 stop: threading.Event) -> None:
  """Starts the `clients` (they submit and record in `acked` what was acknowledged), kills the server (SIGKILL)
  once `acked` holds `at_least` decisions, sets `stop` and waits for the clients."""
  for t in clients:
    t.start()
  deadline = time.monotonic() + 30
  while len(acked) < at_least and time.monotonic() < deadline:
    time.sleep(0.005)
  server.proc.send_signal(signal.SIGKILL)
  server.proc.wait(10)
  stop.set()
  for t in clients:
    t.join(10)
  assert len(acked) >= at_least


def test_kill_during_a_burst_of_submissions_loses_and_duplicates_nothing(tmp_path):
  replies, out = _many_replies(tmp_path / "replies.jsonl", 200), tmp_path / "out"
  server = Server(["--replies", replies, "--out", out], tmp_path / "burst.log")
  acked: dict[str, list[int]] = {}
  lock, stop = threading.Lock(), threading.Event()

  def client():  # three of these send the same prompt's decision at once: double submits under load
    while not stop.is_set():
      try:
        state = server.request("/api/state", timeout=5)[1]
        if state["status"] != "ready":
          continue
        pid = state["question"]["prompt_id"]
        status, _ = server.request("/api/submit", {"prompt_id": pid, "ranking": _ranking_for(pid)}, timeout=5)
      except (OSError, ValueError, http.client.HTTPException):  # URLError, ConnectionError are OSErrors
        return  # the server is gone
      if status == 200:
        with lock:
          acked[pid] = _ranking_for(pid)

  _kill_during(server, [threading.Thread(target=client) for _ in range(3)], acked, 12, stop)
  server = Server(["--replies", replies, "--out", out], tmp_path / "burst-restart.log")
  try:
    by_id = _assert_each_once(out, acked)
    state = server.request("/api/state")[1]
    assert state["progress"]["submitted"] == len(by_id) and state["question"]["prompt_id"] not in by_id
  finally:
    server.stop()


# ----------------------------------------------------------------------------------------------
# A tiny checkpoint to sample from.


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
  """An SFT-stage workdir holding a 1-layer GPT with random weights and a 320-piece tokenizer (made in ~1 s)."""
  texts = [prompt + " " + " ".join(replies) for prompt, replies in _REPLIES] * 20
  return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "sft", texts)


def _prompts_file(path: pathlib.Path) -> pathlib.Path:
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps({"prompt": "Where does the king walk?"}) + "\n")
    f.write(json.dumps({"prompt": "What does the sailor carry?", "response": "A cup."}) + "\n")  # cut: a prompt
  return path


def test_sampled_replies_depend_only_on_the_prompt_and_the_seed(tiny_sft, tmp_path):
  from gptrl import sample  # pylint: disable=import-outside-toplevel
  source = sample.open_checkpoint(str(tiny_sft))
  prompts = label.load_prompts([str(_prompts_file(tmp_path / "prompts.jsonl"))], cache_dir=None, num_prompts=0,
                               seed=0)
  assert sorted(p[-1].content for _, p in prompts) == ["What does the sailor carry?", "Where does the king walk?"]

  def replies(order, seed=0, wanted=lambda pid: True):
    questions = label.sampled_questions(source, [prompts[i] for i in order], wanted, k=3, seed=seed,
                                        max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0,
                                        progress=label.Progress())
    return {q.prompt_id: q.replies for q in questions}
  forward = replies([0, 1])
  assert forward == replies([1, 0])  # the other prompts and their order do not matter
  second = label.prompt_id(prompts[1][1])
  assert replies([1], seed=1)[second] != forward[second]  # the seed does
  assert list(replies([0, 1], wanted=lambda pid: pid != second)) == [label.prompt_id(prompts[0][1])]


# ----------------------------------------------------------------------------------------------
# The page in a real browser.


def _wait(predicate, timeout: float = 30, what: str = "the page"):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    time.sleep(0.05)
  raise AssertionError(f"timed out waiting for {what}")


def _shown_id(driver, by) -> str:
  task = driver.find_element(by.ID, "task")
  return driver.find_element(by.ID, "prompt-id").text if task.is_displayed() else ""


def _card(driver, by, letter: str):
  index = "ABCDEFGHIJKLMNOPQRSTUVWXYZ".index(letter)
  return driver.find_element(by.CSS_SELECTOR, f'.card[data-index="{index}"]')


def _order(driver, by, list_id: str) -> list[int]:
  return [int(c.get_attribute("data-index")) for c in driver.find_elements(by.CSS_SELECTOR, f"#{list_id} .card")]


def test_the_page_ranks_by_keys_clicks_and_drags_and_saves_what_it_shows(browser, tmp_path):
  from selenium.webdriver.common.action_chains import ActionChains  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.common.by import By  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.common.keys import Keys  # pylint: disable=import-outside-toplevel
  replies, out = _write_replies(tmp_path / "replies.jsonl"), tmp_path / "out"
  ids = [q.prompt_id for q in label.replies_questions(str(replies), k=4)]
  server = Server(["--replies", replies, "--out", out], tmp_path / "page.log")
  try:
    browser.get(server.url + "/")
    _wait(lambda: _shown_id(browser, By) == ids[0], what="the first prompt")
    assert "Where does the king walk at dawn?" in browser.find_element(By.ID, "prompt").text
    assert not browser.find_element(By.ID, "status").is_displayed()  # "Connecting…" is gone
    assert "0 / 4 done" in browser.find_element(By.ID, "progress").text
    submit = browser.find_element(By.ID, "submit")
    assert not submit.is_enabled()
    # C first by its key, then A by a click, then D dragged above C; B is left over: the worst.
    ActionChains(browser).send_keys("c").perform()
    _card(browser, By, "A").find_element(By.CLASS_NAME, "text").click()
    assert _order(browser, By, "ranked") == [2, 0] and _order(browser, By, "pool") == [1, 3]
    target = browser.find_elements(By.CSS_SELECTOR, "#ranked .card")[0]
    ActionChains(browser).click_and_hold(_card(browser, By, "D")).move_by_offset(0, -20).move_to_element_with_offset(
        target, 0, -target.size["height"] // 2 + 4).pause(0.1).release().perform()
    assert _order(browser, By, "ranked") == [3, 2, 0] and _order(browser, By, "pool") == [1]
    assert submit.is_enabled()
    browser.find_element(By.ID, "better").send_keys("To the northern hills, at first light.")
    if os.environ.get("GPTRL_LABEL_SCREENSHOT"):
      browser.save_screenshot(os.environ["GPTRL_LABEL_SCREENSHOT"])
    submit.click()
    _wait(lambda: _shown_id(browser, By) == ids[1], what="the second prompt")
    [record] = _jsonl(out / "comparisons.jsonl")
    assert record["prompt_id"] == ids[0] and record["ranking"] == [3, 2, 0, 1]
    assert record["responses"] == _REPLIES[0][1] and record["labeller"] == "human"
    [demo] = _jsonl(out / "demonstrations.jsonl")
    assert demo["messages"][-1] == {"role": "assistant", "content": "To the northern hills, at first light."}

    browser.find_element(By.ID, "skip").click()  # the second prompt
    _wait(lambda: _shown_id(browser, By) == ids[2], what="the third prompt")
    # Rank B, A, C with their buttons, move A up, then undo C (Backspace) and redo it; submit with Ctrl+Enter.
    for letter in "BAC":
      _card(browser, By, letter).find_element(By.TAG_NAME, "button").click()
    browser.find_element(By.CSS_SELECTOR, 'button[title="Move reply A up"]').click()
    ActionChains(browser).send_keys(Keys.BACKSPACE).perform()
    assert _order(browser, By, "ranked") == [0, 1] and _order(browser, By, "pool") == [2, 3]
    ActionChains(browser).send_keys("c").key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()
    _wait(lambda: _shown_id(browser, By) == ids[3], what="the fourth prompt")
    assert [r["ranking"] for r in _jsonl(out / "comparisons.jsonl")] == [[3, 2, 0, 1], [0, 1, 2, 3]]
    assert [(e["prompt_id"], e["action"]) for e in _jsonl(out / "label_log.jsonl")] == [
        (ids[0], "submitted"), (ids[1], "skipped"), (ids[2], "submitted")]
    assert "3 / 4 done" in browser.find_element(By.ID, "progress").text
    # The fourth prompt's repeated reply is shown once, with a note saying so.
    assert len(browser.find_elements(By.CSS_SELECTOR, "#pool .card")) == 3
    assert "1 of the 4 sampled replies were empty or repeated" in browser.find_element(By.ID, "dropped").text
  finally:
    server.stop()


def test_the_page_labels_replies_sampled_from_a_checkpoint(browser, tiny_sft, tmp_path):
  from selenium.webdriver.common.by import By  # pylint: disable=import-outside-toplevel
  out = tmp_path / "out"
  server = Server(["--checkpoint", tiny_sft, "--prompts", _prompts_file(tmp_path / "prompts.jsonl"), "--out", out,
                   "--k", 3, "--max_new_tokens", 8, "--top_p", 1.0], tmp_path / "model.log")
  try:
    statuses, deadline = [], time.monotonic() + 120
    while (state := server.request("/api/state")[1])["status"] == "waiting" and time.monotonic() < deadline:
      statuses.append(state["message"])
      time.sleep(0.02)
    assert statuses and state["status"] == "ready", (statuses, state)  # "loading the model…" came first
    question = state["question"]
    browser.get(server.url + "/")
    _wait(lambda: _shown_id(browser, By) == question["prompt_id"], what="the sampled replies")
    shown = [c.find_element(By.CLASS_NAME, "text").text for c in browser.find_elements(By.CSS_SELECTOR, "#pool .card")]
    assert len(shown) == len(question["replies"]) >= 1
    k = len(question["replies"])
    for i in range(k - 1, 0, -1):  # the last reply first; the first one is left over: the worst
      browser.find_element(By.CSS_SELECTOR, f'#pool .card[data-index="{i}"] button').click()
    browser.find_element(By.ID, "better").send_keys("The king walks to the market.")
    browser.find_element(By.ID, "submit").click()
    _wait(lambda: browser.find_element(By.ID, "message").text == "Saved.", what="the page to hear it was saved")
    if len(question["replies"]) >= 2:
      [record] = _jsonl(out / "comparisons.jsonl")
      assert record["responses"] == question["replies"] and record["ranking"] == list(range(k - 1, 0, -1)) + [0]
    [demo] = _jsonl(out / "demonstrations.jsonl")
    assert demo["messages"][:-1] == question["messages"] and demo["prompt_id"] == question["prompt_id"]
  finally:
    server.stop()


def test_the_page_opened_from_the_printed_address_keeps_its_token_out_of_the_address_bar(browser, tmp_path):
  from selenium.webdriver.common.by import By  # pylint: disable=import-outside-toplevel
  replies, out = _write_replies(tmp_path / "replies.jsonl"), tmp_path / "out"
  ids = [q.prompt_id for q in label.replies_questions(str(replies), k=4)]
  server = Server(["--replies", replies, "--out", out, "--host", "0.0.0.0"], tmp_path / "token.log")
  try:
    address = re.search(r"Labelling page: (\S+)", (tmp_path / "token.log").read_text()).group(1)
    assert "?token=" in address
    browser.get(address)
    _wait(lambda: _shown_id(browser, By) == ids[0], what="the first prompt, fetched with the token")
    assert "token" not in browser.current_url
    browser.refresh()  # the tab keeps it
    _wait(lambda: _shown_id(browser, By) == ids[0], what="the first prompt after a reload")
    for letter in "ABCD":
      _card(browser, By, letter).find_element(By.TAG_NAME, "button").click()
    browser.find_element(By.ID, "submit").click()
    _wait(lambda: _shown_id(browser, By) == ids[1], what="the second prompt")
    assert [r["prompt_id"] for r in _jsonl(out / "comparisons.jsonl")] == [ids[0]]
    browser.execute_script("sessionStorage.clear()")  # a page without the token: told so, not left waiting
    browser.get(server.url + "/")
    _wait(lambda: "access token" in browser.find_element(By.ID, "status-text").text, what="the token message")
  finally:
    server.stop()


def test_a_team_labels_the_same_replies_under_their_names_and_their_agreement_is_measured(tmp_path):
  from gptrl import agreement  # pylint: disable=import-outside-toplevel
  replies = _write_replies(tmp_path / "replies.jsonl")
  folders = {}
  for name, flip in (("alice", None), ("bob", 0)):  # bob ranks the first prompt the other way round
    out = folders[name] = tmp_path / f"labels_{name}"
    server = Server(["--replies", replies, "--out", out, "--labeller", name], tmp_path / f"{name}.log")
    try:
      for i in range(2):
        pid = server.question()["prompt_id"]
        ranking = [3, 2, 1, 0] if i == flip else [0, 1, 2, 3]
        assert server.request("/api/submit", {"prompt_id": pid, "ranking": ranking})[0] == 200
    finally:
      server.stop()
    assert {r["labeller"] for r in _jsonl(out / "comparisons.jsonl")} == {name}
  result = agreement.of_sources([str(f / "comparisons.jsonl") for f in folders.values()])
  assert result.pairs[("alice", "bob")] == (12, 0.5)  # 2 prompts x 6 reply pairs; the first all unlike
  bad = subprocess.run([sys.executable, "-m", "gptrl.label", "--replies", str(replies), "--out", str(tmp_path / "x"),
                        "--labeller", "judge:me"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and "--labeller 'judge:me'" in bad.stderr


# ----------------------------------------------------------------------------------------------
# A team on one page.


def test_where_the_team_names_itself_each_request_says_who_and_a_bad_name_is_refused(tmp_path):
  client, store = _app(tmp_path, labeller=None, overlap=2, members=None)
  try:
    state = client.get("/api/state").get_json()
    assert state["status"] == "name" and "say who you are" in state["message"] and "question" not in state
    bad = client.get("/api/state", headers={label.NAME_HEADER: "judge%3Ame"}).get_json()
    assert bad["status"] == "name" and "reserved" in bad["message"]
    as_ = {who: {label.NAME_HEADER: urllib.parse.quote(who)} for who in ("Zoë Ng", "bob")}
    states = {who: client.get("/api/state", headers=h).get_json() for who, h in as_.items()}
    pid = states["bob"]["question"]["prompt_id"]
    assert states["Zoë Ng"]["question"]["prompt_id"] == pid and states["Zoë Ng"]["labeller"] == "Zoë Ng"
    assert client.post("/api/submit", json={"prompt_id": pid, "ranking": [0, 1, 2, 3]}).status_code == 400  # nameless
    for who, ranking in (("Zoë Ng", [0, 1, 2, 3]), ("bob", [1, 0, 2, 3])):
      response = client.post("/api/submit", json={"prompt_id": pid, "ranking": ranking}, headers=as_[who])
      assert response.get_json() == {"ok": True, "duplicate": False, "action": "submitted"}
    assert [(r["labeller"], r["ranking"]) for r in _jsonl(tmp_path / "out" / "comparisons.jsonl")] == [
        ("Zoë Ng", [0, 1, 2, 3]), ("bob", [1, 0, 2, 3])]
    state = client.get("/api/state", headers=as_["bob"]).get_json()
    assert state["progress"] == {"submitted": 1, "skipped": 0, "total": 4}
    assert state["team"] == {"overlap": 2, "total": 4, "complete": 1}
  finally:
    store.close()


def test_the_team_view_measures_agreement_among_people_and_with_the_replies_judge(tmp_path):
  replies = tmp_path / "replies.jsonl"
  with open(replies, "w", encoding="utf-8") as f:  # a labelling run's replies: the judge's scores come along
    for i in range(3):
      f.write(json.dumps({"prompt": f"Question {i}?", "responses": ["w", "x", "y", "z"],
                          "scores": [3.0, 2.0, 1.0, 1.0]}) + "\n")
  store = label.LabelStore(str(tmp_path / "out"))
  questions = label.replies_questions(str(replies), k=4)
  assert questions[0].scores == (3.0, 2.0, 1.0, 1.0) and questions[0].judge == "replies"
  assignments = label.Assignments(store, overlap=2, members=["ann", "bob", "cy"])
  label.hand_out(questions, assignments, label.Progress(), block=False)
  rankings = {"ann": [[0, 1, 2, 3], [0, 1, 2, 3]], "bob": [[0, 1, 3, 2], [3, 2, 1, 0]]}
  for who, theirs in rankings.items():
    for q, ranking in zip(questions, theirs):
      _decide(store, assignments, q.prompt_id, who, tuple(ranking))
  assert assignments.next_for("cy").prompt_id == questions[2].prompt_id  # the first two have their 2 labellers
  team = label.team_status(store, assignments, [q.prompt_id for q in questions])
  # By hand: 12 reply pairs (2 prompts x 6); ann and bob order alike 5 of 6 on the first (y~z flipped), none on
  # the second: 5/12. The judge scores 5 pairs per prompt apart (y = z tie) and ann agrees on all 10; bob on
  # 5 of the first prompt's and none of the second's: 5/10.
  rows = {r["name"]: r for r in team["labellers"]}
  assert team["agreement"]["compared"] == 12 and team["agreement"]["agreement"] == pytest.approx(5 / 12)
  assert rows["ann"]["agreement"] == rows["bob"]["agreement"] == pytest.approx(5 / 12)
  assert (rows["ann"]["judge_compared"], rows["ann"]["judge_agreement"]) == (10, 1.0)
  assert (rows["bob"]["judge_compared"], rows["bob"]["judge_agreement"]) == (10, 0.5)
  assert rows["cy"] == {"name": "cy", "submitted": 0, "skipped": 0, "holding": questions[2].prompt_id,
                        "quiet_s": pytest.approx(0, abs=1)}
  assert team["complete"] == 2 and team["judge"] == ["replies"]
  # Alpha from gptrl.agreement on the same records (tested there against Krippendorff's published example).
  from gptrl import agreement  # pylint: disable=import-outside-toplevel
  assert team["agreement"]["alpha"] == agreement.of_sources([str(tmp_path / "out" / "comparisons.jsonl")]).alpha
  store.close()


def _team_file(path: pathlib.Path, names=("alice", "bob")) -> dict[str, str]:
  team = {name: f"{name}-token-{'x' * 16}" for name in names}
  path.write_text("# name token\n" + "".join(f"{n} {t}\n" for n, t in team.items()), encoding="utf-8")
  return team


def test_a_team_file_names_each_labeller_by_their_token_and_a_bad_one_is_refused_by_line(tmp_path, capsys):
  team = access_lib.team_tokens("t.txt", "# team\nAnn Lee   ann-token-0123456789\n\nbob\tbob-token-0123456789\n")
  assert team == {"Ann Lee": "ann-token-0123456789", "bob": "bob-token-0123456789"}
  access = access_lib.Access("", ["127.0.0.1"], team=team)
  assert access.member("Bearer bob-token-0123456789") == "bob" and access.member("Bearer nope") is None
  assert access.token_error("") and access.token_error("Bearer ann-token-0123456789") is None
  for text, problem in (("ann short\n", "t.txt:1: ann's token must be at least 16"),
                        ("ann-token-0123456789\n", "t.txt:1: expected 'NAME TOKEN'"),
                        ("a tok-0123456789abcdef\na tok-0123456789abcdeX\n", "t.txt:2: 'a' is named twice"),
                        ("a tok-0123456789abcdef\nb tok-0123456789abcdef\n", "t.txt:2: 'b' has the same token as 'a'"),
                        ("# nobody\n", "t.txt: no member found")):
    with pytest.raises(access_lib.TeamFileError, match=re.escape(problem)):
      access_lib.team_tokens("t.txt", text)
  replies = _write_replies(tmp_path / "replies.jsonl")
  _team_file(tmp_path / "team.txt")
  (tmp_path / "bad.txt").write_text("judge:x tok-0123456789abcdef\n", encoding="utf-8")
  base = ["--replies", str(replies), "--out", str(tmp_path / "out")]
  for args, problem in (
      (["--team", str(tmp_path / "team.txt"), "--overlap", "3"], "has only 2 labeller(s)"),
      (["--team", str(tmp_path / "bad.txt")], f"{tmp_path / 'bad.txt'}: the name 'judge:x' is reserved"),
      (["--team", str(tmp_path / "none.txt")], "no such file"),
      (["--overlap", "2"], "--overlap 2 needs a team"),
      (["--names", "--labeller", "ann"], "give one of --labeller NAME"),
      (["--team", str(tmp_path / "team.txt"), "--token", "abc"], "with --team each labeller has their own")):
    assert label.main(base + args) == 2
    assert problem in capsys.readouterr().err


def test_a_team_killed_during_their_submissions_loses_and_duplicates_nothing(tmp_path):
  replies, out = _many_replies(tmp_path / "replies.jsonl", 200), tmp_path / "out"
  team = _team_file(tmp_path / "team.txt")
  args = ["--replies", replies, "--out", out, "--team", tmp_path / "team.txt", "--overlap", 2]
  server = Server(args, tmp_path / "team.log")
  acked: dict[tuple[str, str], list[int]] = {}
  lock, stop = threading.Lock(), threading.Event()

  def request(path, who, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {team[who]}"})
    try:
      with urllib.request.urlopen(req, timeout=5) as response:
        return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
      return e.code, json.loads(e.read())

  def client(who, flip):  # two tabs per labeller: each decision may be sent twice at once
    while not stop.is_set():
      try:
        state = request("/api/state", who)[1]
        if state["status"] != "ready":
          continue
        pid = state["question"]["prompt_id"]
        ranking = _ranking_for(pid)[::-1] if flip else _ranking_for(pid)
        status, _ = request("/api/submit", who, {"prompt_id": pid, "ranking": ranking})
      except (OSError, ValueError, http.client.HTTPException):
        return  # the server is gone
      if status == 200:
        with lock:
          acked[(pid, who)] = ranking

  threads = [threading.Thread(target=client, args=(who, who == "bob")) for who in team for _ in range(2)]
  _kill_during(server, threads, acked, 24, stop)
  assert {who for _, who in acked} == {"alice", "bob"}
  server = Server(args, tmp_path / "team-restart.log")
  try:
    by_key = _assert_each_once(out, acked)
    per_prompt = {}
    for pid, who in by_key:
      per_prompt.setdefault(pid, []).append(who)
    assert all(sorted(names) in (["alice"], ["bob"], ["alice", "bob"]) for names in per_prompt.values())
    both = [pid for pid, names in per_prompt.items() if len(names) == 2]
    assert len(both) >= 8  # the two worked through the same prompts side by side
    states = {who: request("/api/state", who)[1] for who in team}
    for who, state in states.items():  # after the restart each goes on where they were
      assert state["progress"]["submitted"] == sum(w == who for _, w in by_key)
      assert (state["question"]["prompt_id"], who) not in by_key
    assert states["alice"]["team"]["complete"] == len(both)
    assert request("/api/state", "alice")[0] == 200 and server.request("/api/state")[0] == 401  # no token: no entry
  finally:
    server.stop()


def test_two_labellers_rank_side_by_side_in_one_browser_and_see_their_agreement(browser, tmp_path):
  from selenium.webdriver.common.by import By  # pylint: disable=import-outside-toplevel
  replies, out = _write_replies(tmp_path / "replies.jsonl", 2), tmp_path / "out"
  ids = [q.prompt_id for q in label.replies_questions(str(replies), k=4)]
  team = _team_file(tmp_path / "team.txt")
  server = Server(["--replies", replies, "--out", out, "--team", tmp_path / "team.txt", "--overlap", 2],
                  tmp_path / "team-page.log")
  tabs = {}
  try:
    assert "Team of 2 (alice, bob)" in server.log.read_text()
    for who in team:  # a tab each: each keeps its own token (sessionStorage is per tab)
      if tabs:
        browser.switch_to.new_window("tab")
      tabs[who] = browser.current_window_handle
      browser.get(f"{server.url}/?token={team[who]}")
      _wait(lambda: _shown_id(browser, By) == ids[0], what=f"{who}'s first prompt")
      assert browser.find_element(By.ID, "whoami").text == f"Labelling as {who}"
    orders = {"alice": "ABCD", "bob": "BACD"}  # they differ on one pair of 6
    for prompt in range(2):
      for who in team:
        browser.switch_to.window(tabs[who])
        _wait(lambda: _shown_id(browser, By) == ids[prompt], what=f"{who}'s prompt {prompt}")
        for letter in orders[who]:
          _card(browser, By, letter).find_element(By.TAG_NAME, "button").click()
        browser.find_element(By.ID, "submit").click()
        _wait(lambda: browser.find_element(By.ID, "message").get_attribute("textContent") == "Saved.",
              what=f"{who}'s save")
    browser.switch_to.window(tabs["bob"])
    _wait(lambda: browser.find_element(By.ID, "finished").is_displayed(), what="the end")
    assert "2 / 2 done" in browser.find_element(By.ID, "progress").text
    assert "team: 2 / 2 prompts ranked by 2 labellers" in browser.find_element(By.ID, "progress").text
    browser.find_element(By.CSS_SELECTOR, "#team summary").click()
    _wait(lambda: browser.find_elements(By.ID, "team-summary"), what="the team view")
    rows = {r.get_attribute("data-name"): r.text for r in browser.find_elements(By.CSS_SELECTOR, "#team tbody tr")}
    assert set(rows) == {"alice", "bob"} and "83% of 12" in rows["alice"]  # 10 of 12 pairs alike, by hand
    assert "with the judge" in browser.find_element(By.CSS_SELECTOR, "#team thead").text  # the replies had scores
    assert "83.3% over 12 comparisons" in browser.find_element(By.ID, "team-summary").text
    records = _jsonl(out / "comparisons.jsonl")
    assert sorted((r["prompt_id"], r["labeller"]) for r in records) == sorted(
        (pid, who) for pid in ids for who in team)
  finally:
    for who, handle in list(tabs.items())[1:]:
      browser.switch_to.window(handle)
      browser.close()
    if tabs:
      browser.switch_to.window(tabs["alice"])
    server.stop()
