"""Best-of-n against the reward model: the baseline every policy-optimisation method is plotted against.

For each held-out prompt (the same ones PPO evaluates on, given the same data settings, seed and count), the SFT
policy samples N replies once. The reward model (the proxy, normalised by its stored offset, as PPO sees it) and
the labeller it imitates (the gold judge, when one automatic judge labelled all its comparisons) score every
reply, as do the watch judges. For n = 1, 2, 4, ..., N, `frontier.best_of_n` gives the expected gold, proxy and
judge scores of the reply the proxy prefers among n, averaged over every n-subset of the N samples (unbiased,
as in Gao et al. 2022), at the analytic KL(n) = log n - (n - 1)/n.

Writes `<workdir>/bon.json` (the table; the report's frontier figure reads it) and `<workdir>/bon_replies.jsonl`
(per prompt: the first sample, i.e. the SFT policy's reply, and the proxy's pick among the first `table_n`). The
result is a function of the config and the checkpoints only (fixed keys), so a killed run simply runs again.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptrl import chat
from gptrl import chat_data
from gptrl import checkpoint as ckpt_lib
from gptrl import decoding
from gptrl import fileio
from gptrl import frontier
from gptrl import judges as judges_lib
from gptrl import loop as loop_lib
from gptrl import model as model_lib
from gptrl import reward_model
from gptrl import seeds
from gptrl import sharding
from gptrl.config import BestOfNConfig
from gptrl.corpus import default_cache_dir
from gptrl.stages import ppo as ppo_lib
from gptrl.stages import recipe as recipe_lib

RESULT_FILE = "bon.json"
REPLIES_FILE = "bon_replies.jsonl"


def n_values(samples: int) -> list[int]:
  """1, 2, 4, ... up to and including `samples`."""
  values = [1 << i for i in range(samples.bit_length()) if 1 << i <= samples]
  return values + ([samples] if values[-1] != samples else [])


def frontier_table(proxy_PxN: np.ndarray, scores: dict[str, np.ndarray]) -> list[dict[str, float]]:
  """Rows {"n", "kl", "proxy", <name>: ...} for every n of `n_values`: the best-of-n expectation over the
  prompts' subsets of each score in `scores` ({name: [P, N]}, the proxy among them as "proxy")."""
  num_prompts, num_samples = proxy_PxN.shape
  names = sorted(scores)
  stacked = np.stack([scores[k] for k in names], axis=-1)  # [P, N, S]
  rows = []
  for n in n_values(num_samples):
    means = np.mean([frontier.best_of_n(proxy_PxN[p], stacked[p], n) for p in range(num_prompts)], axis=0)
    rows.append({"n": n, "kl": float(frontier.best_of_n_kl(n)), **{k: float(v) for k, v in zip(names, means)}})
  return rows


@dataclasses.dataclass
class Sampled:
  """The replies sampled so far (token ids) and their reward models' raw scores ([rows, M] per chunk)."""
  responses: list[list[int]] = dataclasses.field(default_factory=list)
  raw: list[np.ndarray] = dataclasses.field(default_factory=list)


class Sampling(loop_lib.Task):
  """The run loop's unit of work: one chunk of (prompt, sample) rows sampled by the policy and scored by the reward
  model. Nothing is checkpointed: the result is a function of the config and the checkpoints (fixed keys), so a
  stopped run samples again."""
  unit = "chunk"

  def __init__(self, *, models: ppo_lib.Models, policy_params: Any, rm_params: Any, prompts: list[list[int]],
               rows: list[tuple[int, int]], chunk: int, b: Any, tok: Any, mesh: jax.sharding.Mesh, rng: jax.Array):
    self.models, self.policy_params, self.rm_params, self.prompts, self.rows = (models, policy_params, rm_params,
                                                                                prompts, rows)
    self.chunk, self.b, self.tok, self.mesh, self.rng = chunk, b, tok, mesh, rng
    self.num_chunks = -(-len(rows) // chunk)
    self.score = jax.jit(lambda params, batch: ppo_lib.reward_model_score(models, params, batch))

  def step(self, state: Sampled, index: int) -> loop_lib.Outcome:
    lo, tok, dp = index * self.chunk, self.tok, sharding.data_parallel_size(self.mesh)
    part = [self.prompts[p] for p, _ in self.rows[lo:lo + self.chunk]]
    with sharding.activate(self.mesh):
      # Chunk `lo` draws from fold_in(key, lo), row by row (decoding.generate): fixed for a fixed batch_size.
      outs = decoding.generate(self.models.policy, self.policy_params, part, max_new_tokens=self.b.max_new_tokens,
                               rng=jax.random.fold_in(self.rng, lo), temperature=self.b.temperature,
                               stop_id=tok.end_of_turn_id, pad_id=tok.pad_id, batch_multiple=dp,
                               min_prompt_len=self.models.prompt_len)
      host = ppo_lib.build_rollout_batch(part, outs, prompt_len=self.models.prompt_len,
                                         new_tokens=self.b.max_new_tokens, pad_id=tok.pad_id,
                                         stop_id=tok.end_of_turn_id)
      pad = -len(part) % dp
      if pad:
        host = {k: np.concatenate([v, np.resize(v, (pad,) + v.shape[1:])]) for k, v in host.items()}
      state.raw.append(np.asarray(jax.device_get(self.score(self.rm_params,
                                                            sharding.host_to_global(host, self.mesh))))[:len(part)])
    state.responses.extend(outs)
    return loop_lib.Outcome(state, {})


def run(cfg: BestOfNConfig) -> dict[str, Any]:
  """Samples, scores and writes the best-of-n table; returns it."""
  workdir = recipe_lib.prepare_workdir(cfg)
  cache_dir = cfg.data.cache_dir or str(default_cache_dir())
  b = cfg.bon
  mesh = sharding.make_mesh(cfg.mesh)
  dp = sharding.data_parallel_size(mesh)
  model_cfg, tok, init_meta = recipe_lib.init_source(cfg.init, cfg.tokenizer_path, workdir, cfg.model,
                                                     expect_stage=("sft",))
  rm = ppo_lib.read_reward_model(cfg, tok)
  ppo_lib.check_reply_room("bon", b.max_new_tokens, model_cfg, rm)
  prompt_len = model_cfg.max_len - b.max_new_tokens
  members = int(rm.meta.get("ensemble", 1))
  models = ppo_lib.Models(policy=model_lib.GPT(model_cfg), critic=None, reward=reward_model.make_reward_model(
                              rm.model_config, members, pooling=rm.meta.get("pooling", "last")),
                          shared=False, prompt_len=prompt_len, new_tokens=b.max_new_tokens,
                          reward_context=int(rm.meta.get("context", 0)), end_id=tok.end_of_turn_id)
  example = np.zeros((1, model_cfg.max_len), np.int32)
  policy_params = ckpt_lib.load_frozen_params(models.policy, example, mesh, cfg.init, tokenizer_sha256=tok.sha256)
  rm_params = ckpt_lib.load_frozen_params(models.reward, example, mesh, cfg.reward_model, tokenizer_sha256=tok.sha256)
  rm_meta, readout = rm.meta, rm.readout
  offset = float(rm_meta.get("reward_offset", 0.0))
  gold_name = rm_meta.get("gold_judge")
  gold = judges_lib.make_judge(gold_name) if gold_name else None
  watch = {name: judges_lib.make_judge(name) for name in b.watch_judges}
  logging.info("Best-of-%d: policy %s, reward model %s (%s), gold judge %s.", b.samples,
               init_meta["init_checkpoint"], rm.where, readout, gold_name or "none")

  messages = chat_data.load_held_out_prompts(cfg.data, b.num_prompts, cfg.seed, cache_dir=cache_dir)
  prompts = [chat.prompt_tokens(m, tok, max_tokens=prompt_len) for m in messages]
  rows = [(p, s) for p in range(len(prompts)) for s in range(b.samples)]  # (prompt, sample) in a fixed order
  task = Sampling(models=models, policy_params=policy_params, rm_params=rm_params, prompts=prompts, rows=rows,
                  chunk=max(dp, b.batch_size // dp * dp), b=b, tok=tok, mesh=mesh,
                  rng=jax.random.key(seeds.stream(cfg.seed, seeds.BEST_OF_N)))
  sampled = loop_lib.run(task, Sampled(), start=0, workdir=workdir, desc="bon",
                         cadence=loop_lib.Cadence(total=task.num_chunks, progress_bar=cfg.progress_bar))
  responses, raw = sampled.responses, sampled.raw
  shape = (len(prompts), b.samples)
  centred = np.asarray(readout.centred(jnp.asarray(np.concatenate(raw))), np.float64)  # [P * N, M]
  proxy = reward_model.reduce_members(centred, readout.reduce, readout.penalty).reshape(shape)
  texts = [chat.decode_reply(r, tok) for r in responses]
  scores = {"proxy": proxy, "length": np.array([len(r) for r in responses], np.float64).reshape(proxy.shape)}
  if members > 1:  # the members' plain mean (the proxy without a penalty) and their disagreement
    scores["proxy_mean"] = centred.mean(axis=1).reshape(shape)
    scores["ensemble_std"] = centred.std(axis=1).reshape(shape)
  if gold is not None:
    scores["gold"] = np.asarray(gold(texts), np.float64).reshape(proxy.shape)
  for name, judge in watch.items():
    scores[f"judge_{name}"] = np.asarray(judge(texts), np.float64).reshape(proxy.shape)
  table = frontier_table(proxy, scores)
  result = {"policy": init_meta["init_checkpoint"], "reward_model": rm.where, "reward_offset": offset,
            "reward_readout": dataclasses.asdict(readout), "gold_judge": gold_name,
            "watch_judges": list(b.watch_judges), "samples": b.samples, "prompts": len(prompts),
            "max_new_tokens": b.max_new_tokens, "temperature": b.temperature, "seed": cfg.seed, "rows": table}
  if members > 1:
    # The frontier with and without the ensemble's penalty: the same samples picked by each reduction, every
    # table with every score (the picking reward as "proxy"): the replies come for free once sampled.
    result["by_reduce"] = {}
    for reduce in reward_model.ENSEMBLE_REDUCTIONS:
      picker = reward_model.reduce_members(centred, reduce, readout.penalty).reshape(shape)
      result["by_reduce"][reduce] = frontier_table(picker, {**scores, "proxy": picker})
  if jax.process_index() == 0:
    _write_replies(os.path.join(workdir, REPLIES_FILE), messages, texts, scores, b.samples, b.table_n)
    fileio.atomic_write(os.path.join(workdir, RESULT_FILE), json.dumps(result, indent=1))
  for row in table:
    logging.info("best-of-%d (KL %.3f): %s", row["n"], row["kl"],
                 " ".join(f"{k}={v:+.4f}" for k, v in row.items() if k not in ("n", "kl")))
  return result


def _write_replies(path: str, messages: list[list[chat.Message]], texts: list[str], scores: dict[str, np.ndarray],
                   samples: int, table_n: int) -> None:
  """Per prompt: its turns, the first sample (an SFT reply) and the proxy's pick among the first `table_n`."""
  def entry(p, s):
    return {"reply": texts[p * samples + s], **{k: float(v[p, s]) for k, v in scores.items()}}
  records = []
  for p, turns in enumerate(messages):
    pick = int(np.argmax(scores["proxy"][p, :table_n]))
    records.append({"prompt_index": p, "messages": [{"role": m.role, "content": m.content} for m in turns if m.content],
                    "sft": entry(p, 0), f"best_of_{table_n}": entry(p, pick)})
  chat_data.write_jsonl(path, records)
