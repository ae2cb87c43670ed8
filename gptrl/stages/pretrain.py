"""Stage 1, pretraining: next-token loss on raw text -> the base model.

The recipe: documents split by group into training and eval text, a tokenizer (the workdir's, a configured one,
or one trained on the training text), windows of `model.max_len` tokens, a fresh GPT, the next-token loss; eval is
the held-out loss over fixed windows, samples continue the configured prompts.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax

from gptrl import checkpoint as ckpt_lib
from gptrl import data as data_lib
from gptrl import decoding
from gptrl import losses
from gptrl import model as model_lib
from gptrl import seeds
from gptrl import sharding
from gptrl import trainer
from gptrl.config import PretrainConfig
from gptrl.stages import recipe as recipe_lib


def make_sample_fn(model: model_lib.GPT, mesh: jax.sharding.Mesh, tok: Any, cfg: PretrainConfig):
  """Continuations of the configured prompts, each shown as prompt + sampled text."""
  prompts = [[tok.eos_id] + tok.encode(p) for p in cfg.sample.prompts]

  def sample_fn(state: trainer.TrainState) -> list[str]:
    if not prompts or cfg.sample.max_new_tokens == 0:
      return []
    rng = jax.random.fold_in(jax.random.key(seeds.stream(cfg.seed, seeds.SAMPLES)), int(state.step))
    with sharding.activate(mesh):
      outs = decoding.generate(model, state.params, prompts, max_new_tokens=cfg.sample.max_new_tokens, rng=rng,
                               temperature=cfg.sample.temperature, top_k=cfg.sample.top_k, stop_id=tok.eos_id,
                               pad_id=tok.pad_id, batch_multiple=sharding.data_parallel_size(mesh))
    return [text + tok.decode([t for t in out if t != tok.eos_id]) for text, out in zip(cfg.sample.prompts, outs)]
  return sample_fn


def recipe(cfg: PretrainConfig, ctx: recipe_lib.Context) -> recipe_lib.Recipe:
  docs = data_lib.load_documents(cfg.data.sources, text_field=cfg.data.text_field, cache_dir=ctx.cache_dir)
  train_docs, eval_docs = data_lib.split_documents(docs, eval_fraction=cfg.data.eval_fraction,
                                                   seed=cfg.data.split_seed)
  logging.info("%d training and %d eval documents (eval: %s).", len(train_docs), len(eval_docs),
               ", ".join(sorted({d.group for d in eval_docs}))[:300])
  tok = recipe_lib.load_or_train_tokenizer(cfg.tokenizer, ctx.workdir, train_docs)
  model_cfg = recipe_lib.resolve_vocab_size(cfg.model, tok)
  latest = ctx.checkpointer.latest_step()
  if latest is not None:  # before the tokenization below, which takes a while
    ckpt_lib.check_tokenizer(ctx.checkpointer.read_meta(latest), tok.sha256,
                             where=f"The checkpoint {ctx.checkpointer.directory}/{latest}")

  token_cache = os.path.join(ctx.cache_dir, "tokens")
  train_tokens = data_lib.tokenize_documents(train_docs, tok, cache_dir=token_cache)
  eval_tokens = data_lib.tokenize_documents(eval_docs, tok, cache_dir=token_cache)
  seq_len, batch_size = model_cfg.max_len, cfg.data.batch_size
  logging.info("%d training tokens (%.1f steps per epoch), %d eval tokens.", train_tokens.size,
               train_tokens.size / (seq_len * batch_size), eval_tokens.size)
  dataset = data_lib.lm_dataset(train_tokens, seq_len=seq_len, seed=cfg.seed, process_index=jax.process_index(),
                                process_count=jax.process_count(), global_batch_size=batch_size)
  fingerprint_parts = dict(sources=list(cfg.data.sources), text_field=cfg.data.text_field,
                           split_seed=cfg.data.split_seed, eval_fraction=cfg.data.eval_fraction, seed=cfg.seed,
                           seq_len=seq_len, global_batch_size=batch_size, process_count=jax.process_count(),
                           tokenizer_sha256=tok.sha256, num_tokens=int(train_tokens.size))
  model = model_lib.GPT(model_cfg)
  eval_batches = lambda: data_lib.eval_batches(  # pylint: disable=unnecessary-lambda-assignment
      eval_tokens, seq_len=seq_len, batch_size=batch_size, max_batches=cfg.data.eval_batches or None,
      process_index=jax.process_index(), process_count=jax.process_count())
  tokens_per_step = batch_size * seq_len
  return recipe_lib.Recipe(
      stage="pretrain", tokenizer=tok, model_config=model_cfg, model=model, seq_len=seq_len,
      loss_fn=losses.lm_loss_fn(model), train_iter=iter(dataset),
      fingerprint=data_lib.pipeline_fingerprint(**fingerprint_parts), fingerprint_parts=fingerprint_parts,
      tokens_per_step=tokens_per_step, flops_per_step=model_lib.flops_per_token(model_cfg, seq_len) * tokens_per_step,
      eval_fn=recipe_lib.lm_eval_fn(model, ctx.mesh, eval_batches), sample_fn=make_sample_fn(model, ctx.mesh, tok, cfg))


def run(cfg: PretrainConfig) -> trainer.TrainState:
  """Trains (or resumes training) the base model described by `cfg`; returns the final state."""
  return recipe_lib.train(cfg, lambda ctx: recipe(cfg, ctx))
