"""Labelling by an automatic judge (the pipeline's `label` stage; people label through `python -m gptrl.label`):
the SFT model samples K replies to each training prompt, a judge scores them, and the pairs whose
scores differ enough become comparisons for the reward model.

Output, in the workdir:
  comparisons.jsonl   one pairwise record per line, the reward stage's input format:
                      {"messages": [...prompt...], "chosen", "rejected", "margin": score gap,
                       "scores": [chosen, rejected], "judge", "prompt_index"}
  replies.jsonl       every sampled reply with its score, also those in no pair (for inspection, and for
                      people who want to rank them themselves)
  metrics.jsonl       per chunk: pairs kept, mean score, reply length, finished share
  label_state.json    progress: a killed run resumes after the last complete chunk

Prompts are the conversations of the SFT training split (same sources, split seed and eval fraction as the
SFT config), each cut before its last assistant turn, so the reward model's held-out prompts and the SFT
model's held-out plays stay out of this stage.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

import jax
import numpy as np

from gptrl import chat
from gptrl import chat_data
from gptrl import checkpoint as ckpt_lib
from gptrl import config as config_lib
from gptrl import decoding
from gptrl import fileio
from gptrl import judges
from gptrl import labellers
from gptrl import loop as loop_lib
from gptrl import model as model_lib
from gptrl import sharding
from gptrl.config import LabelConfig
from gptrl.corpus import default_cache_dir
from gptrl.stages import recipe as recipe_lib


def _write_state(path: str, state: dict[str, Any]) -> None:
  fileio.atomic_write(path, json.dumps(state, indent=1))


@dataclasses.dataclass
class Totals:
  """What this run labelled (the loop's state: the files are the record)."""
  pairs: int = 0
  replies: int = 0
  empty: int = 0


class LabelTask(loop_lib.Task):
  """One chunk of prompts as the run loop's unit of work: sample K replies each, judge them, append the pairs and
  replies, then commit the chunk in `label_state.json` (so a chunk is either wholly in the files or not at all)."""
  unit = "chunk"

  def __init__(self, cfg: LabelConfig, *, model: model_lib.GPT, params: Any, tok: Any, mesh: jax.sharding.Mesh,
               chunks: list[list[list[chat.Message]]], per_chunk: int, max_prompt: int, fingerprint: str,
               paths: dict[str, str]):
    self.cfg, self.model, self.params, self.tok, self.mesh = cfg, model, params, tok, mesh
    self.chunks, self.per_chunk, self.max_prompt, self.fingerprint, self.paths = (chunks, per_chunk, max_prompt,
                                                                                  fingerprint, paths)
    self.labeller = labellers.JudgeLabeller(cfg.judge.name)  # people label through gptrl.label instead
    self.is_main = jax.process_index() == 0

  def step(self, state: Totals, index: int) -> loop_lib.Outcome:
    cfg, tok, k, chunk = self.cfg, self.tok, self.cfg.responses_per_prompt, self.chunks[index]
    encoded = [chat.prompt_tokens(p, tok, max_tokens=self.max_prompt) for p in chunk for _ in range(k)]
    with sharding.activate(self.mesh):
      outs = decoding.generate(self.model, self.params, encoded, max_new_tokens=cfg.sample.max_new_tokens,
                               rng=jax.random.fold_in(jax.random.key(cfg.seed), index),
                               temperature=cfg.sample.temperature, top_k=cfg.sample.top_k, top_p=cfg.sample.top_p,
                               stop_id=tok.end_of_turn_id, pad_id=tok.pad_id,
                               batch_multiple=sharding.data_parallel_size(self.mesh), min_prompt_len=self.max_prompt)
    replies = [chat.decode_reply(o, tok).strip() for o in outs]
    finished = [chat.reply_tokens(o, tok)[1] for o in outs]
    labels = self.labeller.label_many(chunk, [replies[p_i * k:(p_i + 1) * k] for p_i in range(len(chunk))])
    scores = [s for label in labels for s in label.scores]
    lines, reply_lines, kept, empty = [], [], 0, 0
    for p_i, prompt in enumerate(chunk):
      prompt_index = index * self.per_chunk + p_i
      texts, sc = replies[p_i * k:(p_i + 1) * k], list(labels[p_i].scores)
      messages = [{"role": m.role, "content": m.content} for m in prompt]
      reply_lines.append(json.dumps({"prompt_index": prompt_index, "messages": messages, "responses": texts,
                                     "scores": sc}, ensure_ascii=False) + "\n")
      valid = [i for i, t in enumerate(texts) if t]
      empty += k - len(valid)
      seen = set()
      for w, l, gap in judges.preference_pairs([sc[i] for i in valid], cfg.judge.min_gap):
        w, l = valid[w], valid[l]
        if texts[w] == texts[l] or (texts[w], texts[l]) in seen:
          continue
        seen.add((texts[w], texts[l]))
        lines.append(json.dumps({"messages": messages, "chosen": texts[w], "rejected": texts[l],
                                 "margin": round(gap, 4), "scores": [sc[w], sc[l]], "judge": cfg.judge.name,
                                 "prompt_index": prompt_index}, ensure_ascii=False) + "\n")
        kept += 1
    if self.is_main:
      # Appends, then the state that commits them (a bucket's objects are rewritten: fileio.append).
      out_path, replies_path = self.paths["comparisons"], self.paths["replies"]
      fileio.append(out_path, "".join(lines), fsync=True)
      fileio.append(replies_path, "".join(reply_lines), fsync=True)
      _write_state(self.paths["state"], {"fingerprint": self.fingerprint, "chunks_done": index + 1,
                                         "comparisons_bytes": fileio.getsize(out_path),
                                         "replies_bytes": fileio.getsize(replies_path)})
    state = Totals(pairs=state.pairs + kept, replies=state.replies + len(replies), empty=state.empty + empty)
    return loop_lib.Outcome(state, {
        "label/pairs": kept, "label/pairs_per_prompt": kept / len(chunk), "label/mean_score": float(np.mean(scores)),
        "label/empty_replies": empty, "label/finished_share": float(np.mean(finished)),
        "label/reply_words": float(np.mean([len(t.split()) for t in replies]))})

  def postfix(self, metrics: dict[str, float]) -> dict[str, str]:
    return {"pairs": f"{metrics['label/pairs']:.0f}"}


def run(cfg: LabelConfig) -> dict[str, Any]:
  """Samples, judges and writes comparisons; returns summary counts."""
  workdir = recipe_lib.prepare_workdir(cfg)
  cache_dir = cfg.data.cache_dir or str(default_cache_dir())
  mesh = sharding.make_mesh(cfg.mesh)
  model_cfg, tok, init_meta = recipe_lib.init_source(cfg.init, cfg.tokenizer_path, workdir, cfg.model,
                                                     expect_stage=("sft",))
  model = model_lib.GPT(model_cfg)
  params = ckpt_lib.load_frozen_params(model, np.zeros((1, model_cfg.max_len), np.int32), mesh, cfg.init,
                                       tokenizer_sha256=tok.sha256)

  conversations = chat_data.load_conversations(cfg.data.sources, cache_dir=cache_dir)
  train_convs, _ = chat_data.split_by_group(conversations, eval_fraction=cfg.data.eval_fraction,
                                            seed=cfg.data.split_seed)
  prompts = chat_data.training_prompts(train_convs, cfg.num_prompts, cfg.seed)
  k = cfg.responses_per_prompt
  per_chunk = max(1, cfg.batch_size // k)
  chunks = [prompts[i:i + per_chunk] for i in range(0, len(prompts), per_chunk)]
  max_prompt = model_cfg.max_len - cfg.sample.max_new_tokens
  if max_prompt < 8:
    raise config_lib.ConfigError(
        f"config.sample.max_new_tokens={cfg.sample.max_new_tokens} leaves {max_prompt} of the model's "
        f"{model_cfg.max_len} tokens for the prompt; lower it.")

  paths = {"comparisons": os.path.join(workdir, "comparisons.jsonl"),
           "replies": os.path.join(workdir, "replies.jsonl"), "state": os.path.join(workdir, "label_state.json")}
  fingerprint = hashlib.sha256(json.dumps(
      [init_meta["init_checkpoint"], tok.sha256, list(cfg.data.sources), cfg.data.split_seed,
       cfg.data.eval_fraction, cfg.num_prompts, k, cfg.batch_size, cfg.seed, config_lib.to_dict(cfg.sample),
       config_lib.to_dict(cfg.judge)]).encode()).hexdigest()
  done = 0
  if fileio.exists(paths["state"]):
    saved = json.loads(fileio.read_text(paths["state"]))
    if saved.get("fingerprint") != fingerprint:
      raise config_lib.ConfigError(
          f"{paths['state']}: this workdir holds comparisons made with another model, data or sampling config. "
          "Use a fresh workdir (or delete that folder's files to start over).")
    done = saved["chunks_done"]
    for path, size in ((paths["comparisons"], saved["comparisons_bytes"]), (paths["replies"], saved["replies_bytes"])):
      fileio.truncate(path, size)  # drops lines of a chunk that was cut short by a kill
    logging.info("Resuming after %d of %d chunks.", done, len(chunks))
  else:
    for path in (paths["comparisons"], paths["replies"]):
      fileio.atomic_write(path, b"")
  logging.info("Labelling %d prompts x %d replies with judge %r (min gap %.2f), %d chunks.", len(prompts), k,
               cfg.judge.name, cfg.judge.min_gap, len(chunks))

  task = LabelTask(cfg, model=model, params=params, tok=tok, mesh=mesh, chunks=chunks, per_chunk=per_chunk,
                   max_prompt=max_prompt, fingerprint=fingerprint, paths=paths)
  totals = loop_lib.run(task, Totals(), start=done, workdir=workdir, desc="label",
                        cadence=loop_lib.Cadence(total=len(chunks), progress_bar=cfg.progress_bar))
  with fileio.open(paths["comparisons"]) as f:
    n_pairs = sum(1 for _ in f)
  summary = {"prompts": len(prompts), "replies_per_prompt": k, "pairs": n_pairs, "judge": cfg.judge.name,
             "min_gap": cfg.judge.min_gap, "comparisons": paths["comparisons"], "empty_replies_this_run": totals.empty}
  if jax.process_index() == 0:
    _write_state(os.path.join(workdir, "summary.json"), summary)
  logging.info("Wrote %d comparisons for %d prompts to %s.", n_pairs, len(prompts), paths["comparisons"])
  return summary
