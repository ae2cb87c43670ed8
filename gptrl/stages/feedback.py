"""A round's feedback (the pipeline's `feedback` stage, in rounds after the first): what users said about the last
round's policy, as the next round's demonstrations and comparisons.

- With `sources` (folders written by `python -m gptrl.serve --feedback DIR`): their comparisons, demonstrations and
  ratings are checked (errors name file:line) and gathered into this stage's folder.
- Without: users are simulated. The policy of `init` is served by gptrl.serve in this process (its engine, its
  HTTP API on a free loopback port, its feedback store writing into this folder), and `clients` simulated users
  talk to it at once over HTTP, as people at the chat page would. User i takes prompt i of the training split
  (a seeded order, as the labelling stage's), asks for `replies` replies (one chat request with n, its own seed),
  and the judge (the labelling stage's, so the gold score stays the same) plays their taste: when the replies'
  scores differ by at least `judge.min_gap`, a comparison of the best and the worst; a rating of the first reply
  (thumbs up when the judge scores it above 0); and every `edit_every`-th user also "writes what it should have
  said": the judge's favourite of `edit_candidates` more replies, when it beats the first by min_gap (an edit: a
  demonstration, and a comparison of it over the first reply). Their records say user "simulated:<judge>", which
  the reward stage counts as that judge (chat_data.record_labeller), so round 2's reward model still has a gold
  judge.

Output, in the workdir: comparisons.jsonl, demonstrations.jsonl, ratings.jsonl, feedback_log.jsonl (the store's,
gptrl/feedback.py) and summary.json. Feedback ids are fixed per user, so a killed run resumes: what was stored is
not sent twice.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import threading
import urllib.error
import urllib.request
from typing import Any

import jax
import numpy as np
import tqdm

from gptrl import chat
from gptrl import chat_data
from gptrl import config as config_lib
from gptrl import feedback as feedback_lib
from gptrl import fileio
from gptrl import judges
from gptrl import labellers
from gptrl.config import FeedbackConfig
from gptrl.corpus import default_cache_dir
from gptrl.stages import recipe as recipe_lib

SIMULATED_PREFIX = "simulated:"  # the user name of simulated users: simulated:<judge>


def gather(cfg: FeedbackConfig, workdir: str) -> dict[str, int]:
  """Copies the records of `cfg.sources` (gptrl.serve feedback folders) into the workdir, each file checked."""
  counts = {}
  for name in feedback_lib.OUTPUTS:
    lines = []
    for folder in cfg.sources:
      path = os.path.join(folder, name)
      if not fileio.isfile(path):
        if not fileio.isdir(folder):
          raise config_lib.ConfigError(f"config.sources: {folder} is not a folder (give the --feedback folder of "
                                       "gptrl.serve)")
        continue
      lines += [json.dumps(r, ensure_ascii=False) for _, r in fileio.iter_jsonl(
          path, expected=f"a {name} record written by gptrl.serve", error=config_lib.ConfigError)]
    fileio.atomic_write(os.path.join(workdir, name), "".join(line + "\n" for line in lines))
    counts[name] = len(lines)
  # What the stages will read must parse as theirs does (file:line in the error otherwise).
  try:
    if counts[feedback_lib.COMPARISONS]:
      chat_data.load_comparisons([os.path.join(workdir, feedback_lib.COMPARISONS)], max_responses=64)
    if counts[feedback_lib.DEMONSTRATIONS]:
      chat_data.load_conversations([os.path.join(workdir, feedback_lib.DEMONSTRATIONS)])
  except chat_data.DataError as e:
    raise config_lib.ConfigError(f"config.sources: {e}") from None
  return counts


class SimulatedUsers:
  """Users played by a judge, talking to a running gptrl.serve at `url` (see the module docstring)."""

  def __init__(self, cfg: FeedbackConfig, url: str, model_id: str):
    self.cfg, self.url, self.model_id = cfg, url, model_id
    self.judge = judges.make_judge(cfg.judge.name)
    self.user = SIMULATED_PREFIX + cfg.judge.name
    self._lock = threading.Lock()  # the judges are not known to be thread-safe
    self.first_scores: list[float] = []

  def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())
    except urllib.error.HTTPError as e:
      raise RuntimeError(f"{path}: HTTP {e.code}: {e.read()[:300]!r}") from None

  def _replies(self, messages: list[dict[str, str]], n: int, seed: int) -> list[str]:
    body = {"model": self.model_id, "messages": messages, "n": n, "seed": seed, "user": self.user,
            "max_tokens": self.cfg.max_new_tokens, "temperature": self.cfg.temperature}
    return [c["message"]["content"].strip() for c in self._post("/v1/chat/completions", body)["choices"]]

  def _scores(self, texts: list[str]) -> list[float]:
    with self._lock:
      return self.judge(texts)

  def talk(self, index: int, prompt: list[chat.Message]) -> dict[str, int]:
    """One user's conversation: returns how many pieces of feedback of each type it sent."""
    cfg = self.cfg
    messages = labellers.messages_json(prompt)
    seed = int(np.random.default_rng([cfg.seed, index]).integers(0, 2 ** 62))
    replies = self._replies(messages, cfg.replies, seed)
    scores = self._scores(replies)
    with self._lock:
      self.first_scores.append(scores[0])
    sent = {"rating": 0, "comparison": 0, "edit": 0}

    def send(kind: str, **fields: Any) -> None:
      self._post("/v1/feedback", {"type": kind, "id": f"sim-{cfg.seed}-{index}-{kind}", "messages": messages,
                                  "user": self.user, **fields})
      sent[kind] += 1

    send("rating", reply=replies[0], rating=1 if scores[0] > 0 else -1)
    best, worst = int(np.argmax(scores)), int(np.argmin(scores))
    if scores[best] - scores[worst] >= cfg.judge.min_gap and replies[best] and replies[worst] \
        and replies[best] != replies[worst]:
      send("comparison", replies=[replies[best], replies[worst]], preferred=0)
    if cfg.edit_every and index % cfg.edit_every == 0:
      candidates = self._replies(messages, cfg.edit_candidates, seed + 1)
      candidate_scores = self._scores(candidates)
      top = int(np.argmax(candidate_scores))
      if candidate_scores[top] - scores[0] >= cfg.judge.min_gap and candidates[top] and candidates[top] != replies[0]:
        send("edit", reply=replies[0], edited=candidates[top])
    return sent


def simulate(cfg: FeedbackConfig, workdir: str) -> dict[str, Any]:
  """Serves `cfg.init`'s policy in this process and lets the simulated users talk to it."""
  from gptrl import cli  # pylint: disable=import-outside-toplevel
  from gptrl import serve  # pylint: disable=import-outside-toplevel
  cache_dir = cfg.data.cache_dir or str(default_cache_dir())
  conversations = chat_data.load_conversations(cfg.data.sources, cache_dir=cache_dir)
  train, _ = chat_data.split_by_group(conversations, eval_fraction=cfg.data.eval_fraction, seed=cfg.data.split_seed)
  prompts = chat_data.training_prompts(train, cfg.conversations, cfg.seed)
  args = argparse.Namespace(
      checkpoint=cfg.init.checkpoint, step=cfg.init.step, tokenizer=cfg.tokenizer_path, reward_model="",
      served_model_name="policy", dtype="", host="127.0.0.1", port=0, token="", allowed_host=[],
      slots=min(64, cfg.clients * max(cfg.replies, cfg.edit_candidates)), max_queue=256, max_tokens=0,
      single_device=jax.device_count() == 1, feedback=workdir, log_conversations=False, warmup=False, decode_steps=4,
      streams=0)
  try:
    server = serve.build(args)
  except cli.UsageError as e:
    raise config_lib.ConfigError(f"config.init.checkpoint: {e}") from None
  room = server.context - cfg.max_new_tokens
  fits = [(i, p) for i, p in enumerate(prompts) if len(chat.prompt_tokens(p, server.tok, max_tokens=1 << 30)) <= room]
  if not fits:
    server.close()
    raise config_lib.ConfigError(f"config.max_new_tokens={cfg.max_new_tokens}: no prompt fits the policy's context "
                                 f"of {server.context} tokens with that many new ones")
  logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per simulated request
  http = cli.http_server("127.0.0.1", 0, serve.create_app(server), on_error=server.close)
  thread = threading.Thread(target=http.serve_forever, name="feedback-server", daemon=True)
  thread.start()
  users = SimulatedUsers(cfg, f"http://127.0.0.1:{http.server_port}", server.model_id)
  sent = {"rating": 0, "comparison": 0, "edit": 0}
  logging.info("Simulated users (judge %r): %d conversations with %s, %d at a time.", cfg.judge.name, len(fits),
               cfg.init.checkpoint, cfg.clients)
  try:
    with concurrent.futures.ThreadPoolExecutor(cfg.clients) as pool:
      futures = [pool.submit(users.talk, i, p) for i, p in fits]
      for future in tqdm.tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="feedback",
                              disable=jax.process_index() != 0):
        for kind, n in future.result().items():
          sent[kind] += n
  finally:
    http.shutdown()
    http.server_close()
    server.close()
  return {"conversations": len(fits), "skipped_too_long": len(prompts) - len(fits), "sent": sent,
          "judge": cfg.judge.name, "mean_judge_score_of_first_replies": float(np.mean(users.first_scores)),
          "server": {"slots": server.engine.slots, "tokens": int(server.engine.stats["tokens"])}}


def run(cfg: FeedbackConfig) -> dict[str, Any]:
  """Gathers or simulates the round's feedback into the workdir; returns its summary."""
  workdir = recipe_lib.prepare_workdir(cfg)
  if fileio.is_remote(workdir):
    raise config_lib.ConfigError(f"config.workdir={workdir}: the feedback stage writes record by record with fsync; "
                                 "give a local folder")
  if cfg.sources:
    summary: dict[str, Any] = {"sources": list(cfg.sources), "records": gather(cfg, workdir)}
  else:
    summary = simulate(cfg, workdir)
    summary["records"] = {}
    for name in feedback_lib.OUTPUTS:
      with fileio.open(os.path.join(workdir, name)) as f:
        summary["records"][name] = sum(1 for _ in f)
  if jax.process_index() == 0:
    fileio.atomic_write(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=1))
  logging.info("Feedback for the next round: %s.", ", ".join(f"{n} {k}" for k, n in summary["records"].items()))
  return summary
