"""Stage 2, supervised fine-tuning: next-token loss on demonstrations, only on the assistant's tokens.

The recipe: conversations split by group, encoded with loss weights on the assistant's tokens only; the model's
shape and tokenizer are those of the pretraining checkpoint `init.checkpoint`, whose parameters a fresh run starts
from (params only, fresh optimizer); eval is the held-out loss, samples are replies to held-out prompts.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import jax
import numpy as np

from gptrl import chat
from gptrl import chat_data
from gptrl import checkpoint as ckpt_lib
from gptrl import config as config_lib
from gptrl import data as data_lib
from gptrl import decoding
from gptrl import losses
from gptrl import model as model_lib
from gptrl import seeds
from gptrl import sharding
from gptrl import trainer
from gptrl.config import ChatSampleConfig, SFTConfig
from gptrl.stages import recipe as recipe_lib


def sample_exchanges(conversations: Sequence[chat_data.Conversation],
                     n: int) -> list[tuple[list[chat.Message], str]]:
  """(prompt messages, reference reply) for the last assistant turn of `n` conversations spread over the list."""
  picks = sorted({int(i) for i in np.linspace(0, len(conversations) - 1, n)}) if n and conversations else []
  cut = (chat_data.prompt_and_reply(conversations[i]) for i in picks)
  return [c for c in cut if c is not None]


def format_exchange(prompt: Sequence[chat.Message], reply: str, reference: str | None = None) -> str:
  lines = [f"[{m.role}] {m.content}" for m in prompt]
  lines.append(f"[assistant, sampled] {reply}")
  if reference is not None:
    lines.append(f"[assistant, reference] {reference}")
  return "\n".join(lines)


def make_chat_sample_fn(model: model_lib.GPT, mesh: jax.sharding.Mesh, tok: Any, sample_cfg: ChatSampleConfig,
                        prompts: Sequence[tuple[list[chat.Message], str]], seed: int):
  """Replies to held-out prompts, shown with the prompt and the reference reply."""
  max_prompt = model.config.max_len - sample_cfg.max_new_tokens
  encoded = [chat.prompt_tokens(p, tok, max_tokens=max_prompt) for p, _ in prompts]

  def sample_fn(state: trainer.TrainState) -> list[str]:
    if not encoded:
      return []
    rng = jax.random.fold_in(jax.random.key(seeds.stream(seed, seeds.SAMPLES)), int(state.step))
    with sharding.activate(mesh):
      outs = decoding.generate(model, state.params, encoded, max_new_tokens=sample_cfg.max_new_tokens, rng=rng,
                               temperature=sample_cfg.temperature, top_k=sample_cfg.top_k, top_p=sample_cfg.top_p,
                               stop_id=tok.end_of_turn_id, pad_id=tok.pad_id,
                               batch_multiple=sharding.data_parallel_size(mesh))
    return [format_exchange(p, chat.decode_reply(out, tok), ref) for (p, ref), out in zip(prompts, outs)]
  return sample_fn


def recipe(cfg: SFTConfig, ctx: recipe_lib.Context) -> recipe_lib.Recipe:
  # The data first: a bad record is reported before any checkpoint is read.
  conversations = chat_data.load_conversations(cfg.data.sources, cache_dir=ctx.cache_dir)
  model_cfg, tok, init_meta = recipe_lib.init_source(cfg.init, cfg.tokenizer_path, ctx.workdir, cfg.model,
                                                     expect_stage=("pretrain", "sft"))
  seq_len, batch_size = model_cfg.max_len, cfg.data.batch_size
  if cfg.sample.num_prompts and cfg.sample.max_new_tokens >= seq_len:
    raise config_lib.ConfigError(f"config.sample.max_new_tokens: {cfg.sample.max_new_tokens} leaves no room "
                                 f"for a prompt in the model's context of {seq_len} tokens; lower it.")
  train_convs, eval_convs = chat_data.split_by_group(conversations, eval_fraction=cfg.data.eval_fraction,
                                                     seed=cfg.data.split_seed)
  train_ex = chat_data.encode_sft(train_convs, tok, max_len=seq_len)
  eval_ex = chat_data.encode_sft(eval_convs, tok, max_len=seq_len)
  logging.info("SFT data: %d training conversations (%d skipped: no trainable token left; %d truncated), "
               "%d trainable tokens; %d eval conversations (%d trainable tokens).", len(train_ex.tokens),
               train_ex.skipped, train_ex.truncated, train_ex.trainable_tokens, len(eval_ex.tokens),
               eval_ex.trainable_tokens)
  dataset = chat_data.sft_dataset(train_ex, seq_len=seq_len, pad_id=tok.pad_id, seed=cfg.seed,
                                  global_batch_size=batch_size, process_index=jax.process_index(),
                                  process_count=jax.process_count())
  fingerprint_parts = dict(sources=list(cfg.data.sources), split_seed=cfg.data.split_seed,
                           eval_fraction=cfg.data.eval_fraction, seed=cfg.seed, seq_len=seq_len,
                           global_batch_size=batch_size, process_count=jax.process_count(),
                           tokenizer_sha256=tok.sha256, num_examples=len(train_ex.tokens),
                           trainable_tokens=train_ex.trainable_tokens)
  eval_batches = chat_data.sft_eval_batches(eval_ex, seq_len=seq_len, pad_id=tok.pad_id, batch_size=batch_size,
                                            max_batches=cfg.data.eval_batches, process_index=jax.process_index(),
                                            process_count=jax.process_count())

  def init_from(params, shardings):  # the pretrained model's parameters
    params, _, where = ckpt_lib.load_params(cfg.init.checkpoint, ckpt_lib.abstract_like(params, shardings),
                                            step=cfg.init.step, tokenizer_sha256=tok.sha256)
    logging.info("Initialised from %s.", where)
    return params

  model = model_lib.GPT(model_cfg)
  tokens_per_step = batch_size * seq_len
  return recipe_lib.Recipe(
      stage="sft", tokenizer=tok, model_config=model_cfg, model=model, seq_len=seq_len,
      loss_fn=losses.lm_loss_fn(model), train_iter=iter(dataset),
      fingerprint=data_lib.pipeline_fingerprint(stage="sft", **fingerprint_parts), fingerprint_parts=fingerprint_parts,
      tokens_per_step=tokens_per_step, flops_per_step=model_lib.flops_per_token(model_cfg, seq_len) * tokens_per_step,
      meta={"init_checkpoint": init_meta["init_checkpoint"]}, init_from=init_from,
      eval_fn=recipe_lib.lm_eval_fn(model, ctx.mesh, lambda: eval_batches),
      sample_fn=make_chat_sample_fn(model, ctx.mesh, tok, cfg.sample,
                                    sample_exchanges(eval_convs, cfg.sample.num_prompts), cfg.seed))


def run(cfg: SFTConfig) -> trainer.TrainState:
  """Fine-tunes (or resumes fine-tuning) the model of `cfg.init.checkpoint` on demonstrations."""
  return recipe_lib.train(cfg, lambda ctx: recipe(cfg, ctx))
