"""Stage 2, supervised fine-tuning: next-token loss on demonstrations, only on the assistant's tokens.

Initialisation order: resume this workdir's own checkpoint if there is one; else the parameters of the
pretraining checkpoint `init.checkpoint` (params only, fresh optimizer). The model's shape and the tokenizer
come from that run; the tokenizer hash must match its checkpoint.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import jax
import numpy as np

from gptrl import chat
from gptrl import chat_data
from gptrl import checkpoint as ckpt_lib
from gptrl import data as data_lib
from gptrl import losses
from gptrl import model as model_lib
from gptrl import optim
from gptrl import sampling
from gptrl import sharding
from gptrl import trainer
from gptrl.config import ChatSampleConfig, SFTConfig
from gptrl.stages import common
from gptrl.stages.pretrain import lm_loss_fn


def make_batches_eval_fn(model: model_lib.GPT, mesh: jax.sharding.Mesh, batches: Sequence[dict[str, np.ndarray]],
                         prefix: str = "eval"):
  """Token-weighted loss and perplexity over fixed batches {"inputs", "targets", "weights"}."""
  @jax.jit
  def eval_step(params, batch):
    logits = model.apply({"params": params}, batch["inputs"])
    return losses.weighted_cross_entropy(logits, batch["targets"], batch["weights"])

  def eval_fn(state: trainer.TrainState) -> dict[str, float]:
    loss_sum, weight = 0.0, 0.0
    with sharding.activate(mesh):
      for batch in batches:
        s, w = eval_step(state.params, sharding.host_to_global(batch, mesh))
        loss_sum, weight = loss_sum + float(s), weight + float(w)
    loss = loss_sum / max(weight, 1.0)
    return {f"{prefix}/loss": loss, f"{prefix}/perplexity": float(np.exp(min(loss, 50.0))),
            f"{prefix}/tokens": weight}
  return eval_fn


def held_out_prompts(conversations: Sequence[chat_data.Conversation],
                     n: int) -> list[tuple[list[chat.Message], str]]:
  """(prompt messages, reference reply) for the last assistant turn of the first `n` conversations."""
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
    rng = jax.random.fold_in(jax.random.key(seed + 1), int(state.step))
    with sharding.activate(mesh):
      outs = sampling.generate(model, state.params, encoded, max_new_tokens=sample_cfg.max_new_tokens, rng=rng,
                               temperature=sample_cfg.temperature, top_k=sample_cfg.top_k, top_p=sample_cfg.top_p,
                               stop_id=tok.end_of_turn_id, pad_id=tok.pad_id,
                               batch_multiple=sharding.data_parallel_size(mesh))
    return [format_exchange(p, chat.decode_reply(out, tok), ref) for (p, ref), out in zip(prompts, outs)]
  return sample_fn


def run(cfg: SFTConfig) -> trainer.TrainState:
  """Fine-tunes (or resumes fine-tuning) the model of `cfg.init.checkpoint` on demonstrations."""
  workdir, cache_dir, mesh = common.setup(cfg)
  # The data first: a bad record is reported before any checkpoint is read.
  conversations = chat_data.load_conversations(cfg.data.sources, cache_dir=cache_dir)
  model_cfg, tok, init_meta = common.init_source(cfg.init, cfg.tokenizer_path, workdir, cfg.model,
                                                 expect_stage=("pretrain", "sft"))
  seq_len = model_cfg.max_len
  if cfg.sample.num_prompts and cfg.sample.max_new_tokens >= seq_len:
    raise common.config_lib.ConfigError(f"config.sample.max_new_tokens: {cfg.sample.max_new_tokens} leaves no room "
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
                                  global_batch_size=cfg.data.batch_size, process_index=jax.process_index(),
                                  process_count=jax.process_count())
  train_iter = iter(dataset)
  fingerprint_parts = dict(sources=list(cfg.data.sources), split_seed=cfg.data.split_seed,
                           eval_fraction=cfg.data.eval_fraction, seed=cfg.seed, seq_len=seq_len,
                           global_batch_size=cfg.data.batch_size, process_count=jax.process_count(),
                           tokenizer_sha256=tok.sha256, num_examples=len(train_ex.tokens),
                           trainable_tokens=train_ex.trainable_tokens)
  fingerprint = data_lib.pipeline_fingerprint(stage="sft", **fingerprint_parts)

  model = model_lib.GPT(model_cfg)
  optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
  state, state_shardings = trainer.create_train_state(
      lambda rng: model.init(rng, np.zeros((1, seq_len), np.int32))["params"], optimizer, cfg.seed, mesh)
  checkpointer = common.open_checkpointer(workdir, cfg.train)
  start_step = 0
  resumed = common.resume(checkpointer, state, state_shardings, tokenizer_sha256=tok.sha256, fingerprint=fingerprint,
                          fingerprint_parts=fingerprint_parts, train_iter=train_iter,
                          reset_data_position=cfg.data.reset_position)
  if resumed is not None:
    start_step, state, _ = resumed
  else:
    params, _, where = ckpt_lib.load_params(cfg.init.checkpoint, ckpt_lib.abstract_like(state.params,
                                                                                        state_shardings.params),
                                            step=cfg.init.step, tokenizer_sha256=tok.sha256)
    state = state.replace(params=params)
    logging.info("Initialised from %s.", where)

  train_step = trainer.jit_train_step(
      trainer.make_train_step(lm_loss_fn(model), optimizer, optim.learning_rate_schedule(cfg.optim, cfg.train.steps),
                              cfg.optim.grad_accum_steps, **trainer.spike_options(cfg.train)),
      state_shardings, mesh)
  eval_batches = chat_data.sft_eval_batches(eval_ex, seq_len=seq_len, pad_id=tok.pad_id,
                                            batch_size=cfg.data.batch_size, max_batches=cfg.data.eval_batches,
                                            process_index=jax.process_index(), process_count=jax.process_count())
  meta = {"stage": "sft", "tokenizer_sha256": tok.sha256, "model": common.config_lib.to_dict(model_cfg),
          "num_params": model_lib.count_params(state.params), "init_checkpoint": init_meta["init_checkpoint"]}
  loop = trainer.Loop(
      workdir=workdir, train_cfg=cfg.train, mesh=mesh, train_step=train_step, train_iter=train_iter,
      checkpointer=checkpointer, meta=meta, data_fingerprint=fingerprint, data_fingerprint_parts=fingerprint_parts,
      tokens_per_step=cfg.data.batch_size * seq_len,
      eval_fn=make_batches_eval_fn(model, mesh, eval_batches),
      sample_fn=make_chat_sample_fn(model, mesh, tok, cfg.sample, held_out_prompts(eval_convs, cfg.sample.num_prompts),
                                    cfg.seed),
      flops_per_step=model_lib.flops_per_token(model_cfg, seq_len) * cfg.data.batch_size * seq_len)
  try:
    state = trainer.run_loop(loop, state, start_step=start_step)
  finally:
    checkpointer.close()
  return state
