"""Labelling: the SFT model samples K replies to each training prompt, a judge scores them, and the pairs whose
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

import hashlib
import json
import logging
import os
import sys
from typing import Any

import jax
import numpy as np
import tqdm

from gptrl import chat
from gptrl import chat_data
from gptrl import fileio
from gptrl import judges
from gptrl import labellers
from gptrl import model as model_lib
from gptrl import sampling
from gptrl import sharding
from gptrl.config import LabelConfig
from gptrl.corpus import default_cache_dir
from gptrl.metrics import MetricsWriter
from gptrl.stages import common


def training_prompts(conversations: list[chat_data.Conversation], n: int, seed: int) -> list[list[chat.Message]]:
  """Up to `n` (0: all) prompts, each a conversation cut before its last assistant turn, in a seeded order."""
  prompts = [cut[0] for cut in map(chat_data.prompt_and_reply, conversations) if cut is not None]
  if len(prompts) < len(conversations):  # an assistant turn with nothing before it gives no prompt
    logging.warning("Skipped %d of %d conversations: no turn before the last assistant turn to use as a prompt.",
                    len(conversations) - len(prompts), len(conversations))
  order = np.random.default_rng(seed).permutation(len(prompts))
  if n:
    order = order[:n]
  return [prompts[i] for i in order]


def _write_state(path: str, state: dict[str, Any]) -> None:
  fileio.atomic_write(path, json.dumps(state, indent=1))


def run(cfg: LabelConfig) -> dict[str, Any]:
  """Samples, judges and writes comparisons; returns summary counts."""
  workdir = common.prepare_workdir(cfg)
  cache_dir = cfg.data.cache_dir or str(default_cache_dir())
  mesh = sharding.make_mesh(cfg.mesh)
  model_cfg, tok, init_meta = common.init_source(cfg.init, cfg.tokenizer_path, workdir, cfg.model,
                                                 expect_stage=("sft",))
  model = model_lib.GPT(model_cfg)
  params = common.load_frozen_params(model, np.zeros((1, model_cfg.max_len), np.int32), mesh, cfg.init,
                                     tokenizer_sha256=tok.sha256)
  labeller = labellers.JudgeLabeller(cfg.judge.name)  # people label through gptrl.label instead

  conversations = chat_data.load_conversations(cfg.data.sources, cache_dir=cache_dir)
  train_convs, _ = chat_data.split_by_group(conversations, eval_fraction=cfg.data.eval_fraction,
                                            seed=cfg.data.split_seed)
  prompts = training_prompts(train_convs, cfg.num_prompts, cfg.seed)
  k = cfg.responses_per_prompt
  per_chunk = max(1, cfg.batch_size // k)
  chunks = [prompts[i:i + per_chunk] for i in range(0, len(prompts), per_chunk)]
  max_prompt = model_cfg.max_len - cfg.sample.max_new_tokens
  if max_prompt < 8:
    raise common.config_lib.ConfigError(
        f"config.sample.max_new_tokens={cfg.sample.max_new_tokens} leaves {max_prompt} of the model's "
        f"{model_cfg.max_len} tokens for the prompt; lower it.")

  out_path = os.path.join(workdir, "comparisons.jsonl")
  replies_path = os.path.join(workdir, "replies.jsonl")
  state_path = os.path.join(workdir, "label_state.json")
  fingerprint = hashlib.sha256(json.dumps(
      [init_meta["init_checkpoint"], tok.sha256, list(cfg.data.sources), cfg.data.split_seed,
       cfg.data.eval_fraction, cfg.num_prompts, k, cfg.batch_size, cfg.seed, common.config_lib.to_dict(cfg.sample),
       common.config_lib.to_dict(cfg.judge)]).encode()).hexdigest()
  done = 0
  if fileio.exists(state_path):
    state = json.loads(fileio.read_text(state_path))
    if state.get("fingerprint") != fingerprint:
      raise common.config_lib.ConfigError(
          f"{state_path}: this workdir holds comparisons made with another model, data or sampling config. "
          "Use a fresh workdir (or delete that folder's files to start over).")
    done = state["chunks_done"]
    for path, size in ((out_path, state["comparisons_bytes"]), (replies_path, state["replies_bytes"])):
      fileio.truncate(path, size)  # drops lines of a chunk that was cut short by a kill
    logging.info("Resuming after %d of %d chunks.", done, len(chunks))
  else:
    for path in (out_path, replies_path):
      fileio.atomic_write(path, b"")
  logging.info("Labelling %d prompts x %d replies with judge %r (min gap %.2f), %d chunks.", len(prompts), k,
               cfg.judge.name, cfg.judge.min_gap, len(chunks))

  is_main = jax.process_index() == 0
  writer = MetricsWriter(workdir, enabled=is_main, resume_step=done)
  bar = tqdm.tqdm(total=len(chunks), initial=done, disable=not (is_main and cfg.progress_bar), desc="label",
                  file=sys.stderr, dynamic_ncols=True)
  totals = {"pairs": 0, "replies": 0, "empty": 0}
  try:
    for c in range(done, len(chunks)):
      chunk = chunks[c]
      encoded = [chat.prompt_tokens(p, tok, max_tokens=max_prompt) for p in chunk for _ in range(k)]
      with sharding.activate(mesh):
        outs = sampling.generate(model, params, encoded, max_new_tokens=cfg.sample.max_new_tokens,
                                 rng=jax.random.fold_in(jax.random.key(cfg.seed), c),
                                 temperature=cfg.sample.temperature, top_k=cfg.sample.top_k, top_p=cfg.sample.top_p,
                                 stop_id=tok.end_of_turn_id, pad_id=tok.pad_id,
                                 batch_multiple=sharding.data_parallel_size(mesh), min_prompt_len=max_prompt)
      replies = [chat.decode_reply(o, tok).strip() for o in outs]
      finished = [chat.reply_tokens(o, tok)[1] for o in outs]
      labels = labeller.label_many(chunk, [replies[p_i * k:(p_i + 1) * k] for p_i in range(len(chunk))])
      scores = [s for label in labels for s in label.scores]
      lines, reply_lines, kept, empty = [], [], 0, 0
      for p_i, prompt in enumerate(chunk):
        index = c * per_chunk + p_i
        texts, sc = replies[p_i * k:(p_i + 1) * k], list(labels[p_i].scores)
        messages = [{"role": m.role, "content": m.content} for m in prompt]
        reply_lines.append(json.dumps({"prompt_index": index, "messages": messages, "responses": texts,
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
                                   "prompt_index": index}, ensure_ascii=False) + "\n")
          kept += 1
      if is_main:
        # Appends, then the state that commits them (a bucket's objects are rewritten: fileio.append).
        fileio.append(out_path, "".join(lines), fsync=True)
        fileio.append(replies_path, "".join(reply_lines), fsync=True)
        _write_state(state_path, {"fingerprint": fingerprint, "chunks_done": c + 1,
                                  "comparisons_bytes": fileio.getsize(out_path),
                                  "replies_bytes": fileio.getsize(replies_path)})
      totals["pairs"] += kept
      totals["replies"] += len(replies)
      totals["empty"] += empty
      writer.write(c + 1, {"label/pairs": kept, "label/pairs_per_prompt": kept / len(chunk),
                           "label/mean_score": float(np.mean(scores)), "label/empty_replies": empty,
                           "label/finished_share": float(np.mean(finished)),
                           "label/reply_words": float(np.mean([len(t.split()) for t in replies]))})
      bar.update(1)
      bar.set_postfix(pairs=totals["pairs"], refresh=False)
  finally:
    bar.close()
    writer.close()
  with fileio.open(out_path) as f:
    n_pairs = sum(1 for _ in f)
  summary = {"prompts": len(prompts), "replies_per_prompt": k, "pairs": n_pairs, "judge": cfg.judge.name,
             "min_gap": cfg.judge.min_gap, "comparisons": out_path, "empty_replies_this_run": totals["empty"]}
  if is_main:
    _write_state(os.path.join(workdir, "summary.json"), summary)
  logging.info("Wrote %d comparisons for %d prompts to %s.", n_pairs, len(prompts), out_path)
  return summary
