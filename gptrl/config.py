"""Typed, validated configuration.

Experiments are Python files under `configs/` that return an `ml_collections.ConfigDict`; the launcher turns
each group of it into one of the frozen dataclasses below with `from_configdict`, which refuses unknown keys
(suggesting the closest valid one) and values of the wrong type, and each dataclass checks its own fields in
`__post_init__`. The library only ever sees these dataclasses, never a raw ConfigDict.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Mapping


class ConfigError(ValueError):
  """A configuration value or key is wrong; the message names the key and what is allowed."""


def _fail(key: str, message: str) -> typing.NoReturn:
  raise ConfigError(f"config.{key}: {message}")


def _check(condition: bool, key: str, message: str) -> None:
  if not condition:
    _fail(key, message)


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
  remat: str = "none"  # "none" | "block" (recompute each block in the backward pass) | "dots"
  attention: str = "xla"  # "xla" (einsum) | "dot_product" (jax.nn.dot_product_attention)
  init_std: float = 0.02

  def __post_init__(self):
    _check(self.vocab_size >= 0, "model.vocab_size", f"must be >= 0 (0 = from tokenizer), got {self.vocab_size}")
    for name in ("num_layers", "num_heads", "d_model", "max_len"):
      _check(getattr(self, name) > 0, f"model.{name}", f"must be > 0, got {getattr(self, name)}")
    _check(self.d_model % self.num_heads == 0, "model.d_model",
           f"must be divisible by model.num_heads={self.num_heads}, got {self.d_model}")
    _check(self.mlp_ratio > 0, "model.mlp_ratio", f"must be > 0, got {self.mlp_ratio}")
    _check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")
    _check(self.pos_embedding in ("learned", "rope"), "model.pos_embedding",
           f"must be 'learned' or 'rope', got {self.pos_embedding!r}")
    if self.pos_embedding == "rope":
      _check(self.head_dim % 2 == 0, "model.d_model", f"rope needs an even head dim, got {self.head_dim}")
    _check(self.norm in ("layernorm", "rmsnorm"), "model.norm", f"must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
    for name in ("param_dtype", "dtype"):
      _check(getattr(self, name) in ("float32", "bfloat16", "float16"), f"model.{name}",
             f"must be 'float32', 'bfloat16' or 'float16', got {getattr(self, name)!r}")
    _check(self.remat in ("none", "block", "dots"), "model.remat",
           f"must be 'none', 'block' or 'dots', got {self.remat!r}")
    _check(self.attention in ("xla", "dot_product"), "model.attention",
           f"must be 'xla' or 'dot_product', got {self.attention!r}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

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
    _check(0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0, "optim.b1", "b1 and b2 must be in [0, 1)")
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
    _check(self.model_type in ("bpe", "unigram"), "tokenizer.model_type",
           f"must be 'bpe' or 'unigram', got {self.model_type!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Pretraining text and how it is batched."""
  sources: tuple[str, ...] = ("shakespeare",)  # see gptrl.data.load_documents for the accepted forms
  text_field: str = "text"  # field read from JSONL / TFDS records
  eval_fraction: float = 0.05  # share of document groups held out for eval
  split_seed: int = 0
  batch_size: int = 16  # global batch, in sequences, per optimizer step
  eval_batches: int = 8  # eval batches per evaluation (0: the whole eval split)
  cache_dir: str = ""  # corpus / token cache; "": $GPTRL_CACHE or ~/.cache/gptrl

  def __post_init__(self):
    _check(len(self.sources) > 0, "data.sources", "must name at least one source")
    _check(0.0 < self.eval_fraction < 1.0, "data.eval_fraction", f"must be in (0, 1), got {self.eval_fraction}")
    _check(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
    _check(self.eval_batches >= 0, "data.eval_batches", f"must be >= 0, got {self.eval_batches}")


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
  progress_bar: bool = True
  eval_at_start: bool = False  # also evaluate before the first step of a fresh run (the starting point's score)

  def __post_init__(self):
    for name in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
      _check(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Multi-process (multi-host) start-up; see gptrl/distributed.py."""
  initialize: str = "auto"  # "auto" (detect a pod / Slurm / coordinator env) | "always" | "never"
  coordinator_address: str = ""  # host:port of process 0; "" = from the environment
  num_processes: int = 0  # 0 = from the environment
  process_id: int = -1  # -1 = from the environment

  def __post_init__(self):
    _check(self.initialize in ("auto", "always", "never"), "distributed.initialize",
           f"must be 'auto', 'always' or 'never', got {self.initialize!r}")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """Everything the pretraining stage reads."""
  stage: str = "pretrain"
  workdir: str = "runs/pretrain"
  seed: int = 0
  model: ModelConfig = ModelConfig()
  mesh: MeshConfig = MeshConfig()
  optim: OptimConfig = OptimConfig()
  tokenizer: TokenizerConfig = TokenizerConfig()
  data: DataConfig = DataConfig()
  sample: SampleConfig = SampleConfig()
  train: TrainConfig = TrainConfig()
  distributed: DistributedConfig = DistributedConfig()

  def __post_init__(self):
    _check(bool(self.workdir), "workdir", "must be set")
    _check(self.data.batch_size % self.optim.grad_accum_steps == 0, "data.batch_size",
           f"must be divisible by optim.grad_accum_steps={self.optim.grad_accum_steps}, got {self.data.batch_size}")


def _check_trainable_stage(cfg: Any, *, init_from: str) -> None:
  """Checks shared by the stages that train from another stage's checkpoint."""
  _check(bool(cfg.workdir), "workdir", "must be set")
  _check(bool(cfg.init.checkpoint), "init.checkpoint", f"must name {init_from} to start from")
  _check(cfg.data.batch_size % cfg.optim.grad_accum_steps == 0, "data.batch_size",
         f"must be divisible by optim.grad_accum_steps={cfg.optim.grad_accum_steps}, got {cfg.data.batch_size}")


@dataclasses.dataclass(frozen=True)
class InitConfig:
  """Where a stage's parameters start: another stage's checkpoint (params only, onto the current mesh)."""
  checkpoint: str = ""  # a workdir, its checkpoints/ folder, or one step folder (checkpoints/<step>)
  step: int = -1  # -1: the newest valid step

  def __post_init__(self):
    _check(self.step >= -1, "init.step", f"must be >= 0 or -1 (newest), got {self.step}")


@dataclasses.dataclass(frozen=True)
class ModelRuntimeConfig:
  """How to run a model whose shape comes from its checkpoint; "" / -1 keep the checkpoint's setting."""
  dropout: float = -1.0
  dtype: str = ""
  remat: str = ""
  attention: str = ""

  def apply(self, model: ModelConfig) -> ModelConfig:
    changes = {k: v for k, v in dataclasses.asdict(self).items() if v not in ("", -1.0)}
    return dataclasses.replace(model, **changes)  # ModelConfig checks the values, naming config.model.<key>

  def __post_init__(self):
    if self.dropout != -1.0:
      _check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1) or -1 (keep), got {self.dropout}")
    for name, allowed in (("dtype", ("float32", "bfloat16", "float16")), ("remat", ("none", "block", "dots")),
                          ("attention", ("xla", "dot_product"))):
      value = getattr(self, name)
      _check(value == "" or value in allowed, f"model.{name}",
             f"must be one of {list(allowed)} or '' (keep the checkpoint's), got {value!r}")


@dataclasses.dataclass(frozen=True)
class ChatDataConfig:
  """Conversations for SFT (and the prompts the labelling stage and PPO sample from)."""
  # JSONL files/folders/globs of {"prompt","response"} or {"messages": [...]}, tfds:NAME[:SPLIT] with the same
  # fields, or "shakespeare_dialogue" (two-speaker exchanges from the plays, built by gptrl/dialogue.py).
  sources: tuple[str, ...] = ("shakespeare_dialogue",)
  eval_fraction: float = 0.05  # share of groups (plays, or records) held out
  split_seed: int = 0
  batch_size: int = 16  # conversations per optimizer step
  eval_batches: int = 8  # 0: the whole eval split
  cache_dir: str = ""

  def __post_init__(self):
    _check(len(self.sources) > 0, "data.sources", "must name at least one source")
    _check(0.0 < self.eval_fraction < 1.0, "data.eval_fraction", f"must be in (0, 1), got {self.eval_fraction}")
    _check(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
    _check(self.eval_batches >= 0, "data.eval_batches", f"must be >= 0, got {self.eval_batches}")


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
  workdir: str = "runs/sft"
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

  def __post_init__(self):
    _check_trainable_stage(self, init_from="the pretraining run")


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
  """The automatic rater that stands in for people when labelling comparisons."""
  name: str = "vader"  # "vader": VADER sentiment compound score (kinder replies are better) | "length"
  min_gap: float = 0.3  # drop pairs whose judge scores differ by less than this

  def __post_init__(self):
    _check(self.name in ("vader", "length"), "judge.name", f"must be 'vader' or 'length', got {self.name!r}")
    _check(self.min_gap >= 0, "judge.min_gap", f"must be >= 0, got {self.min_gap}")


@dataclasses.dataclass(frozen=True)
class LabelConfig:
  """Labelling: the SFT model samples K replies per prompt, a judge compares them -> comparisons JSONL."""
  stage: str = "label"
  workdir: str = "runs/label"
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

  def __post_init__(self):
    _check(bool(self.workdir), "workdir", "must be set")
    _check(bool(self.init.checkpoint), "init.checkpoint", "must name the SFT run to sample from")
    _check(self.num_prompts >= 0, "num_prompts", f"must be >= 0 (0 = all), got {self.num_prompts}")
    _check(self.responses_per_prompt >= 2, "responses_per_prompt", f"must be >= 2, got {self.responses_per_prompt}")
    _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class PreferenceDataConfig:
  """Comparisons for the reward model: pairwise {chosen, rejected} or ranked {responses, ranking} JSONL."""
  sources: tuple[str, ...] = ("runs/label/comparisons.jsonl",)
  eval_fraction: float = 0.1  # share of prompts held out
  split_seed: int = 0
  batch_size: int = 16  # prompts per optimizer step (each with all its compared responses)
  max_responses: int = 4  # K: responses per prompt in one batch element; a prompt with more is split
  eval_batches: int = 0  # 0: the whole eval split
  cache_dir: str = ""

  def __post_init__(self):
    _check(len(self.sources) > 0, "data.sources", "must name at least one source")
    _check(0.0 < self.eval_fraction < 1.0, "data.eval_fraction", f"must be in (0, 1), got {self.eval_fraction}")
    _check(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
    _check(self.max_responses >= 2, "data.max_responses", f"must be >= 2, got {self.max_responses}")
    _check(self.eval_batches >= 0, "data.eval_batches", f"must be >= 0, got {self.eval_batches}")


@dataclasses.dataclass(frozen=True)
class RewardHeadConfig:
  """The scalar head and its loss."""
  head_init_std: float = 1e-3  # fresh head, small so initial rewards are near 0
  margin_scale: float = 0.0  # loss -log sigmoid(r_c - r_r - margin_scale * margin); margin from each record
  normalize_samples: int = 64  # SFT replies to training prompts scored to centre the reward (0: skip)
  normalize_max_new_tokens: int = 48

  def __post_init__(self):
    _check(self.head_init_std > 0, "reward.head_init_std", f"must be > 0, got {self.head_init_std}")
    _check(self.margin_scale >= 0, "reward.margin_scale", f"must be >= 0, got {self.margin_scale}")
    _check(self.normalize_samples >= 0, "reward.normalize_samples", f"must be >= 0, got {self.normalize_samples}")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """Stage 3: a Bradley-Terry reward model initialised from the SFT checkpoint."""
  stage: str = "reward"
  workdir: str = "runs/reward"
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

  def __post_init__(self):
    _check_trainable_stage(self, init_from="the SFT run")


@dataclasses.dataclass(frozen=True)
class PPOAlgoConfig:
  """PPO for RLHF (Ziegler et al. 2019; InstructGPT): rollout, rewards, and the learning update."""
  rollout_batch_size: int = 32  # prompts (= responses) per iteration
  minibatch_size: int = 16  # responses per optimizer step
  epochs: int = 4  # passes over each rollout
  max_new_tokens: int = 40
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
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
  # Learning.
  gamma: float = 1.0
  lam: float = 0.95
  whiten_advantages: bool = True
  clip_eps: float = 0.2
  clip_eps_value: float = 0.2  # <= 0: no value clipping
  vf_coef: float = 0.1
  entropy_coef: float = 0.0
  max_approx_kl: float = 0.0  # > 0: stop an iteration's epochs early once approximate KL exceeds it
  # PPO-ptx (InstructGPT): add ptx_coef * the next-token loss on pretraining text to each update (0: off).
  ptx_coef: float = 0.0
  ptx_sources: tuple[str, ...] = ("shakespeare",)  # as data.sources of pretraining; its training split is used
  # Models.
  critic: str = "separate"  # "separate" (its own transformer) | "shared" (a value head on the policy's trunk)
  critic_init: str = "reward"  # "reward" (the reward model's weights) | "sft" (the SFT transformer, fresh head)
  value_head_init_std: float = 1e-3  # for a fresh value head
  # Debugging.
  save_rollouts: bool = False  # write each iteration's rollout to <workdir>/rollouts/ (grain-readable)
  num_eval_prompts: int = 32  # held-out prompts scored at each eval (fixed set, greedy-free sampling, same key)

  def __post_init__(self):
    for name in ("rollout_batch_size", "minibatch_size", "epochs", "max_new_tokens", "kl_horizon"):
      _check(getattr(self, name) >= 1, f"ppo.{name}", f"must be >= 1, got {getattr(self, name)}")
    _check(self.rollout_batch_size % self.minibatch_size == 0, "ppo.minibatch_size",
           f"must divide ppo.rollout_batch_size={self.rollout_batch_size}, got {self.minibatch_size}")
    _check(self.kl_estimator in ("k1", "k3", "full"), "ppo.kl_estimator",
           f"must be 'k1', 'k3' or 'full', got {self.kl_estimator!r}")
    _check(self.critic in ("separate", "shared"), "ppo.critic", f"must be 'separate' or 'shared', got {self.critic!r}")
    _check(self.critic_init in ("reward", "sft"), "ppo.critic_init",
           f"must be 'reward' or 'sft', got {self.critic_init!r}")
    _check(not (self.critic == "shared" and self.critic_init == "reward"), "ppo.critic_init",
           "a shared critic lives on the policy's trunk (SFT weights); use critic_init='sft' or critic='separate'")
    _check(self.init_beta >= 0 and self.target_kl >= 0, "ppo.init_beta", "init_beta and target_kl must be >= 0")
    _check(0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0, "ppo.gamma", "gamma and lam must be in [0, 1]")
    _check(self.clip_eps > 0, "ppo.clip_eps", f"must be > 0, got {self.clip_eps}")
    _check(self.temperature > 0, "ppo.temperature",
           f"must be > 0 (PPO needs a sampling policy), got {self.temperature}")
    _check(self.num_eval_prompts >= 0, "ppo.num_eval_prompts", f"must be >= 0, got {self.num_eval_prompts}")
    _check(self.ptx_coef >= 0, "ppo.ptx_coef", f"must be >= 0 (0: off), got {self.ptx_coef}")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """Stage 4: RLHF with PPO against a frozen reward model, KL-anchored to the frozen SFT policy."""
  stage: str = "ppo"
  workdir: str = "runs/ppo"
  seed: int = 0
  init: InitConfig = InitConfig()  # the SFT run: the policy's start and the frozen reference
  reward_model: InitConfig = InitConfig()  # the reward-model run
  tokenizer_path: str = ""
  model: ModelRuntimeConfig = ModelRuntimeConfig()
  mesh: MeshConfig = MeshConfig()
  optim: OptimConfig = OptimConfig()
  data: ChatDataConfig = ChatDataConfig()  # prompts: training split for rollouts, held-out split for eval
  ppo: PPOAlgoConfig = PPOAlgoConfig()
  train: TrainConfig = TrainConfig()  # steps = PPO iterations; eval/checkpoint cadence in iterations
  distributed: DistributedConfig = DistributedConfig()

  def __post_init__(self):
    _check(bool(self.workdir), "workdir", "must be set")
    _check(bool(self.init.checkpoint), "init.checkpoint", "must name the SFT run (policy start and reference)")
    _check(bool(self.reward_model.checkpoint), "reward_model.checkpoint", "must name the reward-model run")


STAGE_CONFIGS: dict[str, type] = {"pretrain": PretrainConfig, "sft": SFTConfig, "label": LabelConfig,
                                  "reward": RewardConfig, "ppo": PPOConfig}


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
      _fail(key, f"expected a list or tuple, got {type(value).__name__} {value!r}")
    (item_hint, _) = typing.get_args(hint)
    return tuple(_coerce(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value))
  if hint is bool:
    if not isinstance(value, bool):
      _fail(key, f"expected True or False, got {type(value).__name__} {value!r}")
    return value
  if hint is int:
    if isinstance(value, bool) or not isinstance(value, int):
      _fail(key, f"expected an integer, got {type(value).__name__} {value!r}")
    return value
  if hint is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      _fail(key, f"expected a number, got {type(value).__name__} {value!r}")
    return float(value)
  if hint is str:
    if not isinstance(value, str):
      _fail(key, f"expected a string, got {type(value).__name__} {value!r}")
    return value
  return value


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
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in config.items():
    full = f"{prefix}.{key}" if prefix else key
    if key not in fields:
      _fail(full, f"unknown key.{_suggest(key, fields)} Valid keys here: {', '.join(sorted(fields))}.")
    kwargs[key] = _coerce(value, hints[key], full)
  return cls(**kwargs)


def as_configdict(config: Any) -> Any:
  """A dataclass config (e.g. `MeshConfig()`) as an ml_collections.ConfigDict, for config files to start from."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  return ml_collections.ConfigDict(to_dict(config))


def to_dict(config: Any) -> dict[str, Any]:
  """The dataclass config as plain JSON-able nested dicts (tuples become lists)."""
  return dataclasses.asdict(config)


def stage_config(config: Mapping[str, Any] | Any) -> Any:
  """Picks the typed config class for `config.stage` and converts the whole ConfigDict into it."""
  stage = config.get("stage", None) if hasattr(config, "get") else None
  if stage not in STAGE_CONFIGS:
    _fail("stage", f"must be one of {sorted(STAGE_CONFIGS)}, got {stage!r}.{_suggest(str(stage), STAGE_CONFIGS)}")
  return from_configdict(STAGE_CONFIGS[stage], config)
