"""Stage 1, pretraining: next-token loss on raw text -> the base model.

Initialisation order (written once, here): resume this workdir's own checkpoint if there is one, else start
from scratch. Everything a resume needs is in the checkpoint: params, optimizer state, step, RNG, and the
data iterator's position together with the fingerprint of the pipeline it belongs to.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

from gptrl import checkpoint as ckpt_lib
from gptrl import data as data_lib
from gptrl import losses
from gptrl import model as model_lib
from gptrl import optim
from gptrl import sampling
from gptrl import sharding
from gptrl import trainer
from gptrl.config import PretrainConfig
from gptrl.stages import common


def lm_loss_fn(model: model_lib.GPT):
  """Token-weighted next-token cross-entropy; the loss_fn of pretraining and SFT."""
  deterministic = model.config.dropout == 0.0

  def loss_fn(params, batch, rng):
    logits_BxTxV = model.apply({"params": params}, batch["inputs"], deterministic=deterministic,
                               rngs=None if deterministic else {"dropout": rng})
    loss_sum, weight = losses.weighted_cross_entropy(logits_BxTxV, batch["targets"], batch["weights"])
    return loss_sum, {"weight": weight}
  return loss_fn


def make_eval_fn(model: model_lib.GPT, mesh: jax.sharding.Mesh, eval_tokens: np.ndarray, *, seq_len: int,
                 batch_size: int, max_batches: int):
  """Held-out loss and perplexity over the first `max_batches` eval batches (0: all), the same each time."""
  @jax.jit
  def eval_step(params, batch):
    logits = model.apply({"params": params}, batch["inputs"])
    return losses.weighted_cross_entropy(logits, batch["targets"], batch["weights"])

  def eval_fn(state: trainer.TrainState) -> dict[str, float]:
    loss_sum, weight = 0.0, 0.0
    batches = data_lib.eval_batches(eval_tokens, seq_len=seq_len, batch_size=batch_size,
                                    max_batches=max_batches or None, process_index=jax.process_index(),
                                    process_count=jax.process_count())
    with sharding.activate(mesh):
      for batch in batches:
        s, w = eval_step(state.params, sharding.host_to_global(batch, mesh))
        loss_sum, weight = loss_sum + float(s), weight + float(w)
    loss = loss_sum / max(weight, 1.0)
    return {"eval/loss": loss, "eval/perplexity": float(np.exp(min(loss, 50.0))), "eval/tokens": weight}
  return eval_fn


def make_sample_fn(model: model_lib.GPT, mesh: jax.sharding.Mesh, tok: Any, cfg: PretrainConfig):
  """Continuations of the configured prompts, each shown as prompt + sampled text."""
  prompts = [[tok.eos_id] + tok.encode(p) for p in cfg.sample.prompts]

  def sample_fn(state: trainer.TrainState) -> list[str]:
    if not prompts or cfg.sample.max_new_tokens == 0:
      return []
    rng = jax.random.fold_in(jax.random.key(cfg.seed + 1), int(state.step))
    with sharding.activate(mesh):
      outs = sampling.generate(model, state.params, prompts, max_new_tokens=cfg.sample.max_new_tokens, rng=rng,
                               temperature=cfg.sample.temperature, top_k=cfg.sample.top_k, stop_id=tok.eos_id,
                               pad_id=tok.pad_id, batch_multiple=sharding.data_parallel_size(mesh))
    return [text + tok.decode([t for t in out if t != tok.eos_id]) for text, out in zip(cfg.sample.prompts, outs)]
  return sample_fn


def run(cfg: PretrainConfig) -> trainer.TrainState:
  """Trains (or resumes training) the base model described by `cfg`; returns the final state."""
  workdir, cache_dir, mesh = common.setup(cfg)

  docs = data_lib.load_documents(cfg.data.sources, text_field=cfg.data.text_field, cache_dir=cache_dir)
  train_docs, eval_docs = data_lib.split_documents(docs, eval_fraction=cfg.data.eval_fraction,
                                                   seed=cfg.data.split_seed)
  logging.info("%d training and %d eval documents (eval: %s).", len(train_docs), len(eval_docs),
               ", ".join(sorted({d.group for d in eval_docs}))[:300])
  tok = common.load_or_train_tokenizer(cfg.tokenizer, workdir, train_docs)
  model_cfg = common.resolve_vocab_size(cfg.model, tok)

  checkpointer = common.open_checkpointer(workdir, cfg.train)
  latest = checkpointer.latest_step()
  if latest is not None:
    ckpt_lib.check_tokenizer(checkpointer.read_meta(latest), tok.sha256,
                             where=f"The checkpoint {checkpointer.directory}/{latest}")

  token_cache = os.path.join(cache_dir, "tokens")
  train_tokens = data_lib.tokenize_documents(train_docs, tok, cache_dir=token_cache)
  eval_tokens = data_lib.tokenize_documents(eval_docs, tok, cache_dir=token_cache)
  seq_len = model_cfg.max_len
  logging.info("%d training tokens (%.1f steps per epoch), %d eval tokens.", train_tokens.size,
               train_tokens.size / (seq_len * cfg.data.batch_size), eval_tokens.size)
  dataset = data_lib.lm_dataset(train_tokens, seq_len=seq_len, seed=cfg.seed,
                                process_index=jax.process_index(), process_count=jax.process_count(),
                                global_batch_size=cfg.data.batch_size)
  train_iter = iter(dataset)
  fingerprint_parts = dict(sources=list(cfg.data.sources), text_field=cfg.data.text_field,
                           split_seed=cfg.data.split_seed, eval_fraction=cfg.data.eval_fraction, seed=cfg.seed,
                           seq_len=seq_len, global_batch_size=cfg.data.batch_size,
                           process_count=jax.process_count(), tokenizer_sha256=tok.sha256,
                           num_tokens=int(train_tokens.size))
  fingerprint = data_lib.pipeline_fingerprint(**fingerprint_parts)

  model = model_lib.GPT(model_cfg)
  optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
  init_tokens = np.zeros((1, seq_len), np.int32)
  state, state_shardings = trainer.create_train_state(
      lambda rng: model.init(rng, init_tokens)["params"], optimizer, cfg.seed, mesh)
  n_params = model_lib.count_params(state.params)
  logging.info("Model: %s parameters, %s.", f"{n_params:,}", model_cfg)

  start_step = 0
  resumed = common.resume(checkpointer, state, state_shardings, tokenizer_sha256=tok.sha256, fingerprint=fingerprint,
                          fingerprint_parts=fingerprint_parts, train_iter=train_iter,
                          reset_data_position=cfg.data.reset_position)
  if resumed is not None:
    start_step, state, _ = resumed

  train_step = trainer.jit_train_step(
      trainer.make_train_step(lm_loss_fn(model), optimizer, optim.learning_rate_schedule(cfg.optim, cfg.train.steps),
                              cfg.optim.grad_accum_steps, **trainer.spike_options(cfg.train)),
      state_shardings, mesh)
  tokens_per_step = cfg.data.batch_size * seq_len
  meta = {"stage": "pretrain", "tokenizer_sha256": tok.sha256, "model": common.config_lib.to_dict(model_cfg),
          "num_params": n_params}
  loop = trainer.Loop(
      workdir=workdir, train_cfg=cfg.train, mesh=mesh, train_step=train_step,
      train_iter=train_iter, checkpointer=checkpointer, meta=meta, data_fingerprint=fingerprint,
      data_fingerprint_parts=fingerprint_parts, tokens_per_step=tokens_per_step,
      eval_fn=make_eval_fn(model, mesh, eval_tokens, seq_len=seq_len, batch_size=cfg.data.batch_size,
                           max_batches=cfg.data.eval_batches),
      sample_fn=make_sample_fn(model, mesh, tok, cfg),
      flops_per_step=model_lib.flops_per_token(model_cfg, seq_len) * tokens_per_step)
  try:
    state = trainer.run_loop(loop, state, start_step=start_step)
  finally:
    checkpointer.close()
  return state

