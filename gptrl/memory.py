"""Per-device memory estimate of a run, from abstract sharded shapes: nothing is allocated.

Parameters and optimizer state are counted exactly: `jax.eval_shape` of the stage's own initialisation (the
model's `init` and the optimizer's `init`, as gptrl/trainer.py:create_train_state runs them) gives every array's
shape and dtype, and gptrl/sharding.py's rules give its NamedSharding on a `jax.sharding.AbstractMesh` of the
run's mesh shape, hence the shape of the shard one device holds.

Everything transient is a formula over the shapes of the tensors gptrl/model.py makes, per device (the batch
split over data x fsdp, heads / MLP / vocabulary over tensor), assuming XLA keeps what the backward pass needs
and no more:
  - train step: gradients (+ the accumulator with optim.grad_accum_steps > 1) and the optimizer's update, both
    sharded like the parameters; every layer's weights gathered whole over fsdp in the compute dtype (with
    micro-batches XLA holds them through the accumulation loop; with one micro-batch under remat they are freed
    before the backward pass's peak, and v5e's compiles gather them layer by layer: _one_micro_batch; with
    micro-batches also the query/key/value kernels' lane-padded head-major copies: _head_major_kernels), for
    each trained model; on TPUs the step's program code (a line fitted to the compiles: train_step_code);
    activations of one micro-batch: per layer what the remat policy saves (none: every tensor of the block
    incl. the [B, H, T, T] float32 attention probabilities, but the elementwise outputs XLA recomputes from
    tensors it keeps: norms and rotary embedding, and on v5e/v6e the gated MLP's product; through the splash
    kernel the head-major arrays padded to TPU's 128 lanes; "dots": the block input and the matmul outputs;
    "block": the block input), plus the one layer being recomputed, plus the larger of the logits' gradient
    [B, T, V] (compute dtype) and the logits at the loss (model.logits_dtype), with that gradient beside them
    where the two dtypes differ;
  - sampling (KV cache): keys and values [B, G, S, K] of every layer, every layer's weights gathered over fsdp
    (held through the decoding loop), one layer's prefill over the prompt and the last position's logits;
  - eval: the larger of one layer's forward and the logits in model.logits_dtype, beside one layer's gathered
    weights; PPO scoring: one layer's forward at a time and the logits it keeps.
The peak is the persistent state (parameters, optimizer state, frozen models) plus the largest phase.
Compiler temporaries and fragmentation come on top: the launcher warns under 10% headroom. The train step's
estimate is what the step needs: `python -m gptrl.compile --least_memory train` compiles it for a TPU slice with
XLA's scheduler saving memory and compares (given free HBM, XLA keeps far more alive for speed: the 1b plan's
train step takes 60 GiB per device by default and 10 GiB when pressed).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptrl import checkpoint as ckpt_lib
from gptrl import config as config_lib
from gptrl import presets
from gptrl import stages
from gptrl import sharding

GIB = 1024 ** 3
LITE_TPUS = ("v5e", "v6e")  # one TensorCore per chip (v4 and v5p: two, as one megacore device)
HEADROOM_WARNING = 0.10  # warn when less than this share of the device's memory is left


@dataclasses.dataclass
class Estimate:
  """Bytes per device: what stays resident, and each phase's transient needs (only one phase runs at a time)."""
  title: str
  persistent: dict[str, float]
  phases: dict[str, dict[str, float]]

  @property
  def persistent_bytes(self) -> float:
    return float(sum(self.persistent.values()))

  def phase_bytes(self, phase: str) -> float:
    return float(sum(self.phases[phase].values()))

  @property
  def peak_phase(self) -> str:
    return max(self.phases, key=self.phase_bytes) if self.phases else ""

  @property
  def peak_bytes(self) -> float:
    """Persistent state plus the largest phase."""
    return self.persistent_bytes + (self.phase_bytes(self.peak_phase) if self.phases else 0.0)

  def table(self, capacity_bytes: float | None = None, device: str = "") -> str:
    """The estimate as one text table; with `capacity_bytes`, the device's memory and the headroom left."""
    rows = [self.title]

    def line(name: str, value: float, indent: int = 2, note: str = "") -> None:
      rows.append(f"{' ' * indent}{name:<64}{format_bytes(value):>11}{note}")

    rows.append("  resident")
    for name, value in self.persistent.items():
      line(name, value, 4)
    for phase in self.phases:
      line(f"{phase}:", self.phase_bytes(phase), 2, "  <- peak" if phase == self.peak_phase else "")
      for name, value in self.phases[phase].items():
        if value:  # e.g. no weights to gather without fsdp
          line(name, value, 4)
    line(f"peak (resident + {self.peak_phase or 'nothing'})", self.peak_bytes)
    if capacity_bytes:
      left = capacity_bytes - self.peak_bytes
      line("device memory", capacity_bytes, 2, f"  ({device})")
      line("headroom", left, 2, f"  ({100 * left / capacity_bytes:.0f}%)")
    else:
      rows.append(f"  device memory: unknown ({device or 'no accelerator'}); not checked")
    return "\n".join(rows)


def format_bytes(n: float) -> str:
  """'1.50 GiB', '12.0 MiB', '3.0 KiB' (negative for a shortfall)."""
  for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
    if abs(n) >= size or unit == "KiB":
      return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
  return f"{n:.0f} B"


def format_count(n: int) -> str:
  """'6.74B', '134M', '136K'."""
  for suffix, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= size:
      return f"{n / size:.2f}{suffix}" if suffix == "B" else f"{n / size:.0f}{suffix}"
  return str(n)


# ----------------------------------------------------------------------------------------------
# Exact: parameters and optimizer state from abstract shapes.


def abstract_mesh(mesh_shape: Mapping[str, int]) -> jax.sharding.AbstractMesh:
  """An AbstractMesh with gptrl's axes (data, fsdp, tensor) of the given sizes: shardings without devices."""
  sizes = tuple(int(mesh_shape[a]) for a in sharding.MESH_AXES)
  return jax.sharding.AbstractMesh(sizes, sharding.MESH_AXES,
                                   axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))


def unbox(tree: Any) -> Any:
  """A tree boxed with logical axis names (nn.Partitioned), unboxed without applying sharding constraints (which
  need a concrete mesh)."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def sharded_bytes(boxed_abstract: Any, mesh: Any) -> int:
  """Bytes one device holds of a tree of abstract arrays boxed with logical axis names (as `model.init` returns
  them), laid out by gptrl/sharding.py's rules on `mesh` (a Mesh or AbstractMesh)."""
  shardings = sharding.tree_shardings(boxed_abstract, mesh)
  leaves = jax.tree.leaves(unbox(boxed_abstract))
  return int(sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                 for s, x in zip(jax.tree.leaves(shardings), leaves)))


def abstract_params(init_params: Callable[[jax.Array], Any]) -> Any:
  """The boxed abstract parameters `init_params(rng)` would make (e.g. `lambda r: model.init(r, x)["params"]`)."""
  return jax.eval_shape(init_params, jax.random.key(0))


def abstract_train_state(init_params: Callable[[jax.Array], Any], optimizer: Any) -> tuple[Any, Any]:
  """(params, optimizer state), boxed and abstract, initialised as trainer.create_train_state does."""
  def init(rng):
    params = init_params(rng)
    return params, optimizer.init(params)
  return jax.eval_shape(init, jax.random.key(0))


def _shape_only(cfg: config_lib.ModelConfig) -> config_lib.ModelConfig:
  """The model config with the settings that do not change parameter shapes reset (a cache key)."""
  return dataclasses.replace(cfg, dtype="float32", remat="none", attention="xla", dropout=0.0)


def init_fn(kind: str, model_cfg: config_lib.ModelConfig, critic: str = "separate") -> Callable[[jax.Array], Any]:
  """rng -> boxed parameters of a stage's trained model, built as the stage builds them.

  kind: "lm" (GPT: pretraining, SFT, labelling), "scalar" (the reward model), "ppo" ({"policy", "value"} with
  `critic` "separate" (a scalar-head transformer) or "shared" (a value head on the policy's hidden states);
  {"policy"} alone with "none": GRPO, RLOO).
  """
  from gptrl import model as model_lib  # pylint: disable=import-outside-toplevel
  from gptrl import reward_model  # pylint: disable=import-outside-toplevel
  from gptrl.stages import ppo, recipe  # pylint: disable=import-outside-toplevel
  if kind == "lm":
    return recipe.init_params(model_lib.GPT(model_cfg), model_cfg.max_len)
  if kind == "scalar":
    return recipe.init_params(reward_model.make_reward_model(model_cfg, 1), model_cfg.max_len)
  if kind != "ppo":
    raise ValueError(f"memory.init_fn: unknown kind {kind!r}")
  # (A shared critic is a head on the policy's trunk: its trunk starts from SFT, as the config requires.)
  algo = (config_lib.PPOAlgoConfig(critic=critic, critic_init="sft" if critic == "shared" else "reward")
          if critic != "none" else
          config_lib.PPOAlgoConfig(critic="none", critic_init="sft", advantage="group", group_size=2))
  models = ppo.make_models(model_cfg, model_cfg, algo)
  return functools.partial(ppo.init_params, models)


@functools.lru_cache(maxsize=64)
def _cached_state(kind: str, model_cfg: config_lib.ModelConfig, critic: str, clip: bool) -> tuple[Any, Any]:
  from gptrl import optim  # pylint: disable=import-outside-toplevel
  # Only the optimizer's structure matters here (a clipping stage or not), not its numbers.
  optimizer = optim.make_optimizer(config_lib.OptimConfig(clip_norm=1.0 if clip else 0.0), 1000)
  return abstract_train_state(init_fn(kind, model_cfg, critic), optimizer)


def abstract_state(kind: str, model_cfg: config_lib.ModelConfig, optim_cfg: config_lib.OptimConfig | None = None,
                   critic: str = "separate") -> tuple[Any, Any]:
  """(params, optimizer state) of `init_fn(kind, ...)`, boxed and abstract; cached by parameter shapes, since
  tracing a large model's init takes seconds."""
  clip = True if optim_cfg is None else optim_cfg.clip_norm > 0
  return _cached_state(kind, _shape_only(model_cfg), critic, clip)


def param_count(boxed_abstract: Any) -> int:
  """Total number of parameters (all devices) of an abstract parameter tree."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(unbox(boxed_abstract))))


# ----------------------------------------------------------------------------------------------
# Formulas: activations, logits, KV cache (per device).


LANES = 128  # TPU HBM tiles: an array's last dimension is padded to a multiple of this many elements


@dataclasses.dataclass(frozen=True)
class _Shard:
  """Per-device widths of one model on one mesh: a dimension is split over tensor only when divisible (as the
  sharding rules do), rows over data x fsdp (rounded up: the samplers pad the batch to a multiple)."""
  cfg: config_lib.ModelConfig
  tensor: int
  batch_ways: int
  chip: presets.Chip | None = None  # the accelerator compiled for (what its compiler keeps); None: not known

  def split(self, n: int) -> int:
    return n // self.tensor if n % self.tensor == 0 else n

  def rows(self, global_rows: int) -> int:
    return max(1, -(-global_rows // self.batch_ways))

  @property
  def c(self) -> int:  # bytes of the compute dtype
    return np.dtype(jnp.dtype(self.cfg.dtype)).itemsize

  @property
  def logit_bytes(self) -> int:  # bytes of a logit as the output projection writes it
    return np.dtype(jnp.dtype(self.cfg.logits_dtype)).itemsize

  @property
  def heads(self) -> int:
    return self.split(self.cfg.num_heads)

  @property
  def kv_heads(self) -> int:
    return self.split(self.cfg.kv_heads)

  @property
  def vocab(self) -> int:
    return self.split(self.cfg.vocab_size)

  def layer_full(self, b: int, t: int, cache: int | None = None) -> float:
    """Bytes one block keeps for its backward pass without remat, for b rows of t tokens (`cache`: a pass over a
    decoding cache of that many slots, as a sampler's prefill is)."""
    return (self._attention_part(b, t, cache) + self._mlp_part(b, t)
            + 2 * b * t * self.cfg.d_model * self.c)  # + input, sum

  def _attention_part(self, b: int, t: int, cache: int | None = None) -> float:
    """The attention sublayer's tensors: its norm output, query, key, value (rotated), output and projection, and
    the float32 softmax weights (and their cast for the value matmul under a narrower compute dtype) over the score
    blocks causal attention computes (model.causal_chunk; the mask is built from iotas, not stored); through the
    splash kernel, its float32 log-sum-exp per query and head instead (the scores never leave the chip); over a
    decoding cache, dense scores of the t queries over its slots (decoding attends by the einsum path)."""
    cfg, c, k, d = self.cfg, self.c, self.cfg.head_dim, self.cfg.d_model
    h, g = self.heads, self.kv_heads
    per_token = 2 * d + (h + 2 * g) * k + ((h + g) * k if cfg.pos_embedding == "rope" else 0) + h * k
    if self.splash(t, decode=cache is not None):
      return b * t * (per_token * c + h * 4)
    return b * t * per_token * c + self._dense_weights(self._area(b, t, cache))

  def _area(self, b: int, t: int, cache: int | None = None) -> float:
    """Score entries per head of dense attention: causal blocks over t tokens, or t queries over cache slots."""
    return float(b * t * cache) if cache is not None else self.score_area(b, t)

  def _dense_weights(self, area: float) -> float:
    """The float32 softmax weights over `area` score entries per head, and their cast to a narrower compute dtype
    for the value matmul (what a backward pass reads)."""
    return self.heads * area * (4 + (self.c if self.c != 4 else 0))

  def splash(self, t: int, decode: bool = False) -> bool:
    """Whether attention over t tokens goes through the splash kernel (gptrl.model.uses_splash)."""
    from gptrl import model as model_lib  # pylint: disable=import-outside-toplevel
    return model_lib.uses_splash(self.cfg, t, decode)

  def _mlp_part(self, b: int, t: int) -> float:
    """The MLP sublayer's tensors: its norm output, fc_in (and fc_gate) outputs, activation output, its output."""
    f = self.split(self.cfg.mlp_dim)
    return b * t * self.c * (2 * self.cfg.d_model + f * (3 if self.cfg.gated_mlp else 2))

  def recomputed(self, b: int, t: int) -> float:
    """What the backward pass of one block holds of its recomputed forward, on top of the saved tensors: nothing
    without remat; under "dots" the whole layer's tensors; under "block" (nothing saved but the block's input) the
    larger of its two sublayers and the residual sum: the least-memory TPU compiles recompute a block in pieces
    (the attention again for its own backward once the MLP's is done: 1.13x the matmul flops of the 1b train step),
    so the attention's tensors and the MLP's are not live together."""
    if self.cfg.remat == "none":
      return 0.0
    if self.cfg.remat == "block":
      return max(self._attention_part(b, t), self._mlp_part(b, t)) + b * t * self.cfg.d_model * self.c
    return self.layer_full(b, t)

  def layer_saved(self, b: int, t: int, remat: str) -> float:
    """Bytes a block keeps until the backward pass under the remat policy."""
    cfg, c, d = self.cfg, self.c, self.cfg.d_model
    if remat == "block":  # nothing_saveable: only the block's input survives
      return float(b * t * d * c)
    if remat == "dots":  # dots without batch dims: the projections and MLP matmuls (not the attention einsums;
      h, g, f = self.heads, self.kv_heads, self.split(cfg.mlp_dim)  # the splash kernel's output and log-sum-exp)
      kernel = b * t * h * (cfg.head_dim * c + 4) if self.splash(t) else 0
      return float(b * t * c * (3 * d + (h + 2 * g) * cfg.head_dim + f * (2 if cfg.gated_mlp else 1)) + kernel)
    return self.layer_full(b, t)

  def score_area(self, b: int, t: int) -> float:
    """Score entries per head of causal attention over b rows of t tokens: query blocks of length C only reach
    the keys up to their end (gptrl.model.causal_chunk_length), n = T / C blocks cover T^2 (n + 1) / 2n."""
    from gptrl import model as model_lib  # pylint: disable=import-outside-toplevel
    chunk = min(model_lib.causal_chunk_length(self.cfg, t), t)
    n = -(-t // chunk)
    return float(b * sum(min(chunk, t - i * chunk) * min((i + 1) * chunk, t) for i in range(n)))

  def training(self, b: int, t: int) -> float:
    """Activations of a forward + backward pass over b rows of t tokens (no logits): what every layer keeps for
    the backward pass under its remat policy, plus, under remat, what the block being recomputed holds
    (`recomputed`). That is the peak XLA's TPU compiles show for the 125m and 1b train steps under memory
    pressure (their live ranges): all layers' saved tensors, one block's recompute, the logits' gradient."""
    return self.saved(b, t) + self.recomputed(b, t)

  def saved(self, b: int, t: int) -> float:
    """What every layer keeps for the backward pass under the remat policy (b rows of t tokens)."""
    cfg = self.cfg
    if cfg.remat == "none":
      # through the splash kernel XLA also keeps the kernel's head-major output transposed to token-major, the
      # layout the output projection's weight gradient reads (the buffer dumps of the 125m and 350m train steps)
      transposed = b * t * self.heads * cfg.head_dim * self.c if self.splash(t) else 0
      return cfg.num_layers * (self.layer_full(b, t) - self.recomputed_elementwise(b, t) + transposed
                               + self.splash_lane_padding(b, t))
    return cfg.num_layers * self.layer_saved(b, t, cfg.remat)

  def splash_lane_padding(self, b: int, t: int) -> float:
    """What TPU's HBM layout adds to the head-major tensors a layer keeps for the splash kernel's backward pass
    (the rotated query and key, the value, the kernel's output: [B, H, T, K]): their last dimension is laid out in
    128-lane tiles, so a head size K below a multiple of 128 is padded up to one (K = 64: twice the bytes). The
    buffer dumps of the 125m pretraining and reward train steps on v5p hold 4 such tensors per layer at their peak,
    2.4 and 2.2 GB of padding in their 15 and 13 GB (the dumps' live-range reports count them unpadded)."""
    if not self.splash(t):
      return 0.0
    k = self.cfg.head_dim
    return float(b * t * (-(-k // LANES) * LANES - k) * 2 * (self.heads + self.kv_heads) * self.c)

  def recomputed_elementwise(self, b: int, t: int) -> float:
    """What XLA recomputes in the backward pass rather than keep, without remat: the two norms' outputs (from the
    block inputs it keeps) and the query and key before the rotary embedding (it keeps the rotated ones). The live
    buffers of the 125m and 350m TPU train steps at their peak (buffer dumps of the v6e compiles) hold per layer
    the MLP's two matmul outputs, the rotated query and key, the value, the attention output (twice: `saved`) and
    the residual stream, about 22 and 30 KB per token. The v4 and v5p compiles hold about one [tokens, MLP width]
    tensor per layer more than v6e's at the same rows per device (125m: 7.5 against 6.7 GiB): the gated MLP's
    activation product, which the estimate counts on those chips (25.5 and 34.5 KB per token here) and not on
    the one-TensorCore chips, v5e and v6e (LITE_TPUS), whose compiles recompute it."""
    cfg, c, d = self.cfg, self.c, self.cfg.d_model
    rope = (self.heads + self.kv_heads) * cfg.head_dim if cfg.pos_embedding == "rope" else 0
    product = self.split(cfg.mlp_dim) if cfg.gated_mlp and self.chip is not None and self.chip.name in LITE_TPUS else 0
    return float(b * t * c * (2 * d + rope + product))

  def loss_peak(self, b: int, t: int) -> float:
    """What the next-token loss adds to `training` at the step's peak: the logits' gradient [b, t, V] in the
    compute dtype while the last layers' backward pass runs, or, at the loss itself, the logits (model.logits_dtype)
    and, where the compute dtype differs, their gradient in it (less the recomputed layer `training` counts, which
    is not live then). Where the two dtypes agree XLA writes one [b, t, V] array: the TPU compiles of 125m and 1b
    pretraining with bfloat16 logits compute the loss and the logits' gradient in one fusion."""
    per_token = self.vocab * (self.logit_bytes + (self.c if self.c != self.logit_bytes else 0))
    recomputed = self.recomputed(b, t)
    return max(self.logits_gradient(b, t), b * t * per_token - recomputed)

  def logits_gradient(self, b: int, t: int) -> float:
    """The logits' gradient [b, t, V] in the compute dtype (the head matmul's output dtype)."""
    return float(b * t * self.vocab * self.c)

  def forward(self, b: int, t: int, cache: int | None = None) -> float:
    """Transient of a forward pass alone (no gradients): one layer's tensors at a time (`cache`: over a decoding
    cache of that many slots, as a sampler's prefill). Every per-token tensor of the layer, as the backward pass
    would keep: more than a forward pass holds live (the 1b eval step on v5p, during its layers: the residual and
    the MLP's two [B, T, F] outputs), about what XLA allocates for it (the 125m reward eval step on v5p allocates
    1.1 GB for a live peak of 0.5 GB with the arrays' lane padding: the rotary embedding's float32 halves,
    [B, T, H, 32], take four times their bytes). Dense attention (the einsum path, and every pass over a decoding
    cache): the float32 scores and softmax weights, 8 bytes a score entry, and the mask [B, 1, T, S] as booleans
    and as the compute dtype's bias. XLA writes 3-8 bytes an entry: the prefill of the 125m PPO rollout sampler
    on v5p:2x2x2 (32 rows a device) allocates one f32[32, 12, 1920, 2048] (6.0 GB), the softmax fused into the
    value matmul, while the same sampler for v4:2x2x4 and v6e:4x4 (16 rows a device) takes nearly as much (8.4
    against 9.5 GB of temporaries); at 8 the PPO rollout and reward-normalisation samplers come within 0.99-1.7 of
    XLA's totals (they were 1.4-2.6 when the raw and masked scores and the weights' cast were counted too)."""
    if cache is None and self.splash(t):
      return self.layer_full(b, t)
    area = self._area(b, t, cache)
    return self.layer_full(b, t, cache) - self._dense_weights(area) + self.heads * area * 8 + area * (1 + self.c)

  def eval_pass(self, b: int, t: int) -> float:
    """A forward pass to the loss (an eval step): the larger of one layer's transient (`forward`) and the logits
    [B, T, V] in model.logits_dtype beside the last hidden state. The loss reads them as logit(target) minus
    their float32 log-sum-exp (losses.token_log_probs): the log-softmax is never written (the 1b eval step on
    v5p: 2.10 of its 2.39 GB of temporaries are the bfloat16 logits)."""
    return max(self.forward(b, t), b * t * (self.vocab * self.logit_bytes + self.cfg.d_model * self.c))

  def logits(self, b: int, t: int, copies: int) -> float:
    """`copies` float32 [b, t, V] tensors (logits, their log-softmax, their gradient, ...)."""
    return float(copies * b * t * self.vocab * 4)

  def kv_cache(self, b: int, s: int) -> float:
    """Keys and values [b, S, G, K] of every layer in the compute dtype, and the valid-slot mask."""
    cfg = self.cfg
    return float(cfg.num_layers * (2 * b * s * self.kv_heads * cfg.head_dim * self.c + b * s))


def _gathered_weights(params: Any, mesh_shape: Mapping[str, int], compute_bytes: int) -> float:
  """FSDP: every layer's weights gathered whole over fsdp (still split over tensor) in the compute dtype, and the
  output projection's table. Each product reads its weight whole (`model._in_use`), and XLA's TPU compiles hold
  the gathered copies from the forward to the backward pass (the 1b train step under remat "block": 2.0 GiB more
  temporaries than with the products computed over the fsdp shards, the bfloat16 copy of its weights).
  `params`: one model's boxed abstract parameters (PPO counts the policy's and a separate critic's)."""
  if mesh_shape["fsdp"] == 1:
    return 0.0
  tensor_only = abstract_mesh({"data": 1, "fsdp": 1, "tensor": mesh_shape["tensor"]})
  tree = params.get("transformer", params)  # a scalar-head model keeps the GPT under "transformer"
  stored = sum(sharded_bytes(v, tensor_only) for k, v in tree.items() if k.startswith("block_"))
  stored += max([sharded_bytes(tree[k], tensor_only) for k in ("head", "token_embedding") if k in tree] or [0])
  param_bytes = jnp.dtype(jax.tree.leaves(unbox(tree))[0].dtype).itemsize
  return float(stored) * compute_bytes / param_bytes


# XLA:TPU's generated code of a train step (memory_analysis().generated_code_size_in_bytes; it sits in HBM beside
# the buffers), per layer of each model the step trains: the layers are unrolled, and wider ones take more code.
# Fitted to the train steps of benchmarks/results/compile (125m-3b; pretraining, SFT and reward on v4, v5e, v5p
# and v6e: 17-33 MB per layer, each within 16% of this line); a PPO update's code is 1.15-1.3x this for its policy
# and critic.
TPU_CODE_PER_LAYER = 12.7e6
TPU_CODE_PER_LAYER_PER_1024_WIDTH = 6.7e6


def train_step_code(model_cfg: config_lib.ModelConfig, chip: presets.Chip | None, models: int = 1) -> float:
  """The program code of a train step over `models` trained models of `model_cfg`'s shape on `chip` (TPU only:
  0 elsewhere, where it is not measured)."""
  if chip is None or chip.platform != "tpu":
    return 0.0
  per_layer = TPU_CODE_PER_LAYER + TPU_CODE_PER_LAYER_PER_1024_WIDTH * model_cfg.d_model / 1024
  return models * model_cfg.num_layers * per_layer


# The chips whose compiles gather each layer's weights as the layer runs (forward and recompute) when a train step
# has one micro-batch under remat, where the others gather every layer's early in the forward pass: the SFT 1b
# step for v5e:4x8 holds 0.94 GB of temporaries at least, the same step for v5p:2x4x4 (the same shards per
# device) 2.57 GB, and 2.57 still when compiled with v5p's HBM limited to v5e's 16 GiB (xla_tpu_max_hbm_size_mib):
# the chip's compiler decides, not the memory it has. (With micro-batches both hoist the gathers out of the loop.)
GATHER_PER_LAYER = ("v5e",)


def _head_major_kernels(shard: _Shard, mesh_shape: Mapping[str, int]) -> float:
  """The query, key and value kernels of every layer, gathered over fsdp, once more in head-major layout
  [d_model, H, K] with the head size padded to TPU's 128 lanes: where K is not a multiple of 128 the layout is a
  copy, not a reshape, and with micro-batches XLA hoists both the gathered kernels and that copy out of the
  accumulation loop (v5e's compiles with one micro-batch hold part of them: HEAD_MAJOR_AT_PEAK). The 3b
  pretraining step on v5e:8x16 (K = 100, two micro-batches) holds at its peak 78 [3200, 1600] gathered kernels
  and 93 [3200, 16, 100] copies (1.0 GB padded; its estimate was 0.83 of XLA's total without them); at K = 128
  (1b) the steps hold no such copies. TPU chips only (`shard.chip`): the lanes are theirs."""
  cfg = shard.cfg
  k = cfg.head_dim
  if shard.chip is None or shard.chip.platform != "tpu" or mesh_shape["fsdp"] == 1 or k % LANES == 0:
    return 0.0
  heads = shard.heads + 2 * shard.kv_heads
  return float(cfg.num_layers * cfg.d_model * heads * -(-k // LANES) * LANES * shard.c)


# With one micro-batch under remat, the share of every layer's head-major q/k/v copies (_head_major_kernels) that
# GATHER_PER_LAYER chips' train steps hold at their peak, beside the activations. The buffer dumps of the 3b SFT and
# reward steps on v5e:8x8 (K = 100: 1.02 GB of copies; one micro-batch of 2 and 4 rows a device) peak at different
# places. Reward, at the backward's saved activations (1.47 GB of block inputs, 2.20 GB live with the arrays'
# padding) beside 12 of the 78 copies, each layer's regathered as it goes; SFT, late in the backward pass with all
# 78 copies live (1.02 GB), every layer's output projection and part of the MLP's gathered (0.7 GB) and 0.36 GB of
# activations (2.08 GB live). Neither peak holds the other's whole, and XLA allocates 0.3 GB more than either's
# live bytes: the larger of activations and copies gives 0.75 / 0.92 of XLA's total, their sum 1.00 / 1.17; two
# thirds of the copies beside the activations, 0.91 / 1.09 (fitted to these two steps, the only such plans).
HEAD_MAJOR_AT_PEAK = 2 / 3


def _one_micro_batch(step: dict[str, float], held: float, model_cfg: config_lib.ModelConfig, accum: int,
                     chip: presets.Chip | None, head_major: float = 0.0) -> None:
  """With one micro-batch under remat, replaces the step's every-layer gathered weights (held beside the
  activations) by what the compiles keep of them at the step's peak, `held` being the activations and logits
  there: on most TPUs they are gathered early in the forward pass and freed (the recomputed blocks gather again),
  so the peak is the larger of the two (the 1b TPU compiles of pretraining on v5p, SFT and reward on v5p/v6e); on
  GATHER_PER_LAYER chips about one layer's worth is live beside the activations (the SFT 1b step on v5e at its
  peak: 125 MB of gathered weights, a layer's being 103 MB). With micro-batches XLA gathers once, ahead of the
  accumulation loop (loop-invariant), and holds them through it; without remat the backward pass reads the
  forward's gathered weights. `head_major`: the gathered attention kernels' head-major copies
  (_head_major_kernels), which the accumulation loop holds too; with one micro-batch GATHER_PER_LAYER chips
  count HEAD_MAJOR_AT_PEAK of them beside the activations."""
  if accum > 1 and model_cfg.remat != "none" and head_major:
    step[_HEAD_MAJOR] = head_major
  if accum > 1 or model_cfg.remat == "none" or _GATHERED not in step:
    return
  gathered = step.pop(_GATHERED)
  if chip is not None and chip.name in GATHER_PER_LAYER:
    step["weights gathered layer by layer (one layer's worth)"] = _one_layer(gathered, model_cfg)
    if head_major:
      step[_HEAD_MAJOR_SHARE] = HEAD_MAJOR_AT_PEAK * head_major
  else:
    step["gathered weights beyond the backward's peak (one micro-batch)"] = max(0.0, gathered - held)


# ----------------------------------------------------------------------------------------------
# The stages.


def _title(stage: str, mesh_shape: Mapping[str, int], *models: str) -> str:
  """"Per-device memory estimate: <stage> on mesh ...", then one indented line per model."""
  n = math.prod(mesh_shape.values())
  mesh = f"data={mesh_shape['data']} fsdp={mesh_shape['fsdp']} tensor={mesh_shape['tensor']} ({n} devices)"
  return "\n".join([f"Per-device memory estimate: {stage} on mesh {mesh}", *(f"  {m}" for m in models)])


def _shape_title(cfg: config_lib.ModelConfig, n_params: int) -> str:
  return (f"{format_count(n_params)} params ({cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.num_heads} heads, "
          f"vocab {cfg.vocab_size}, context {cfg.max_len}; {cfg.dtype} compute, {cfg.param_dtype} params, "
          f"remat {cfg.remat})")


_GATHERED = "weights gathered over fsdp (every layer's, compute dtype)"
_HEAD_MAJOR = "gathered q/k/v kernels, head-major copies (128 lanes)"  # _head_major_kernels
_HEAD_MAJOR_SHARE = "gathered q/k/v kernels, head-major copies (128 lanes; the share live at the peak)"


def _trained(kind: str, model_cfg: config_lib.ModelConfig, optim_cfg: config_lib.OptimConfig,
             mesh_shape: Mapping[str, int], critic: str = "separate") -> tuple[dict[str, float], dict[str, float], Any]:
  """Resident (params, optimizer state) and train-step (gradients, update, gathered weights) bytes, and the
  boxed abstract parameters."""
  mesh = abstract_mesh(mesh_shape)
  params, opt_state = abstract_state(kind, model_cfg, optim_cfg, critic)
  params_b = sharded_bytes(params, mesh)
  resident = {"parameters (trained)": params_b, "optimizer state (AdamW moments)": sharded_bytes(opt_state, mesh)}
  models = [params]
  if "policy" in params:  # PPO: the policy, and a separate critic (a scalar-head transformer)
    models = [params["policy"]] + ([params["value"]] if "transformer" in params.get("value", {}) else [])
  grads = {"gradients" + (" + accumulator" if optim_cfg.grad_accum_steps > 1 else ""):
           params_b * (2 if optim_cfg.grad_accum_steps > 1 else 1),
           "optimizer update": params_b,
           _GATHERED: sum(
               _gathered_weights(model, mesh_shape, jnp.dtype(model_cfg.dtype).itemsize) for model in models)}
  return resident, grads, params


def _sampling(shard: _Shard, rows: int, new_tokens: int, gathered: float) -> dict[str, float]:
  """A sampler call over `rows` prompts in a buffer of the model's context (prompt + new tokens). `gathered`: the
  model's every-layer weights gathered over fsdp (_gathered_weights), which XLA gathers once, ahead of the
  decoding loop (loop-invariant), and holds through it: the 1b pretraining sampler on v5p holds them (2.4 GB)
  beside the KV cache at its peak. The prefill projects the last prompt position only (logits_at_B)."""
  b, s = shard.rows(rows), shard.cfg.max_len
  prompt = max(s - new_tokens, 1)
  return {f"KV cache ({rows} rows x {s} slots)": shard.kv_cache(b, s),
          "weights gathered over fsdp (every layer's, held through decoding)": gathered,
          "prefill: one layer + scores": shard.forward(b, prompt, cache=s),
          "prefill logits (last position)": shard.logits(b, 1, 1)}


def _one_layer(gathered: float, model_cfg: config_lib.ModelConfig) -> float:
  """About one layer's share of a model's gathered weights (the output projection's table counted as a layer)."""
  return gathered / (model_cfg.num_layers + 1)


def _micro_rows(global_rows: int, accum: int, shard: _Shard) -> int:
  return shard.rows(max(global_rows // accum, 1))


def eval_sample_rows(sample: Any) -> int:
  """Prompts sampled at each eval of pretraining (its configured prompts) or SFT (held-out prompts)."""
  return len(sample.prompts) if hasattr(sample, "prompts") else sample.num_prompts


def estimate_lm(cfg: Any, model_cfg: config_lib.ModelConfig, mesh_shape: Mapping[str, int],
                chip: presets.Chip | None = None) -> Estimate:
  """Pretraining and SFT: next-token loss over data.batch_size rows of model.max_len tokens."""
  resident, step, params = _trained("lm", model_cfg, cfg.optim, mesh_shape)
  shard = _Shard(model_cfg, mesh_shape["tensor"], mesh_shape["data"] * mesh_shape["fsdp"], chip)
  t, accum = model_cfg.max_len, cfg.optim.grad_accum_steps
  b = _micro_rows(cfg.data.batch_size, accum, shard)
  activations, logits = shard.training(b, t), shard.loss_peak(b, t)
  step.update({f"activations ({b} x {t} tokens per device, {accum} micro-batches)": activations,
               "logits at the loss, or their gradient": logits})
  gathered = step[_GATHERED]  # every layer's, as _trained counted them (before the one-micro-batch rule)
  _one_micro_batch(step, activations + logits, model_cfg, accum, chip, _head_major_kernels(shard, mesh_shape))
  code = train_step_code(model_cfg, chip)
  if code:
    step["program code (XLA:TPU, fitted)"] = code
  b_eval = shard.rows(cfg.data.batch_size)
  # A forward pass alone gathers each layer's weights as it runs (the eval step's buffers on v5p).
  phases = {"train step": step,
            "eval (whole batch, no micro-batches)": {
                "forward: one layer's transient, or the logits at the loss": shard.eval_pass(b_eval, t),
                "weights gathered layer by layer (one layer's worth)": _one_layer(gathered, model_cfg)}}
  sample_rows = eval_sample_rows(cfg.sample)
  if sample_rows and cfg.sample.max_new_tokens:
    phases["eval sampling"] = _sampling(shard, sample_rows, cfg.sample.max_new_tokens, gathered)
  title = _title(cfg.stage, mesh_shape, "model: " + _shape_title(model_cfg, param_count(params)))
  return Estimate(title, resident, phases)


def estimate_reward(cfg: Any, model_cfg: config_lib.ModelConfig, mesh_shape: Mapping[str, int],
                    chip: presets.Chip | None = None) -> Estimate:
  """The reward model: K responses per prompt through the scalar-head model; then the SFT model samples replies
  to normalise the reward (with its parameters loaded beside the trained state)."""
  resident, step, params = _trained("scalar", model_cfg, cfg.optim, mesh_shape)
  members = cfg.reward.ensemble  # an ensemble holds and trains `members` models at once (reward_model.RewardEnsemble)
  if members > 1:
    resident = {f"{name} x {members} members": value * members for name, value in resident.items()}
    step = {f"{name} x {members} members": value * members for name, value in step.items()}
  shard = _Shard(model_cfg, mesh_shape["tensor"], mesh_shape["data"] * mesh_shape["fsdp"], chip)
  t, accum, k = model_cfg.max_len, cfg.optim.grad_accum_steps, cfg.data.max_responses
  b = _micro_rows(cfg.data.batch_size * k, accum, shard) * members
  activations = shard.training(b, t)
  step[f"activations ({b} x {t} tokens per device, {accum} micro-batches)"] = activations
  if members == 1:  # (an ensemble's gathered weights are counted held, per member)
    _one_micro_batch(step, activations, model_cfg, accum, chip, _head_major_kernels(shard, mesh_shape))
  code = train_step_code(model_cfg, chip)  # (an ensemble's members are one program, vmapped)
  if code:
    step["program code (XLA:TPU, fitted)"] = code
  phases = {"train step": step,
            "eval (whole batch)": {
                "forward: one layer + scores": shard.forward(shard.rows(cfg.data.batch_size * k) * members, t)}}
  if cfg.reward.normalize_samples:
    # The SFT model is the reward model's trunk with the LM head (untied) instead of the scalar head.
    sft_params = dict(params["transformer"])
    if not model_cfg.tie_embeddings:
      sft_params["head"] = nn.LogicallyPartitioned(jax.ShapeDtypeStruct(
          (model_cfg.d_model, model_cfg.vocab_size), jnp.dtype(model_cfg.param_dtype)), ("embed", "vocab"))
    phases["reward normalisation (SFT model samples)"] = {
        "SFT parameters (loaded for sampling)": sharded_bytes(sft_params, abstract_mesh(mesh_shape)),
        **_sampling(shard, cfg.reward.normalize_samples, cfg.reward.normalize_max_new_tokens,
                    _gathered_weights(sft_params, mesh_shape, shard.c))}
  title = _title("reward", mesh_shape, "reward model: " + _shape_title(model_cfg, param_count(params)))
  return Estimate(title, resident, phases)


def estimate_label(cfg: Any, model_cfg: config_lib.ModelConfig, mesh_shape: Mapping[str, int]) -> Estimate:
  """Labelling: the SFT model's parameters and its sampler over batch_size rows."""
  params, _ = abstract_state("lm", model_cfg)
  shard = _Shard(model_cfg, mesh_shape["tensor"], mesh_shape["data"] * mesh_shape["fsdp"])
  rows = max(1, cfg.batch_size // cfg.responses_per_prompt) * cfg.responses_per_prompt
  title = _title("label", mesh_shape, "model: " + _shape_title(model_cfg, param_count(params)))
  return Estimate(title, {"parameters (frozen)": sharded_bytes(params, abstract_mesh(mesh_shape))},
                  {"sampling": _sampling(shard, rows, cfg.sample.max_new_tokens,
                                         _gathered_weights(params, mesh_shape, shard.c))})


def estimate_ppo(cfg: Any, model_cfg: config_lib.ModelConfig, rm_cfg: config_lib.ModelConfig,
                 mesh_shape: Mapping[str, int]) -> Estimate:
  """PPO (and GRPO, RLOO), every model on the one mesh: policy and critic (if any) trained; reference and reward
  model frozen."""
  p = cfg.algo
  shared = p.critic in ("shared", "none")
  resident, step, params = _trained("ppo", model_cfg, cfg.optim, mesh_shape, critic=p.critic)
  mesh = abstract_mesh(mesh_shape)
  resident["reference policy (frozen)"] = sharded_bytes(params["policy"], mesh)  # the policy's shape
  rm_params, _ = abstract_state("scalar", rm_cfg)
  resident["reward model (frozen)"] = sharded_bytes(rm_params, mesh)
  dp = mesh_shape["data"] * mesh_shape["fsdp"]
  shard = _Shard(model_cfg, mesh_shape["tensor"], dp)
  rm_shard = _Shard(rm_cfg, mesh_shape["tensor"], dp)
  t, n, accum = model_cfg.max_len, p.max_new_tokens, cfg.optim.grad_accum_steps
  b = _micro_rows(p.minibatch_size, accum, shard)
  # The policy reads its logits at the N response positions only (float32: log-softmax, entropy and their
  # gradient). It also projects only there now (GPT's logits_slice), but XLA's least-memory allocation of the
  # 125m update on v5p:2x2x2 did not drop with that (3.46 -> 3.54 GiB): the term that sized the whole buffer's
  # logits gradient [b, L, V] (compute dtype) stays as a stand-in. The update's buffer dump shows what it stands
  # for: a live peak of 1.6 GB (both models' block inputs, one block's recompute, a third of the layers' gathered
  # weights; the estimate's other terms: 1.95 GB) in a 2.05 GB allocation (the head-major [B, H, T, 64] arrays
  # and the rotary embedding's float32 halves padded to 128 lanes), and 0.56 GB of code, which the LM steps'
  # train_step_code counts and this estimate does not. The critic's own recomputed layer is not live beside the
  # policy's.
  step.update({f"policy activations ({b} x {t} tokens per device, {accum} micro-batches)": shard.training(b, t),
               "policy logits: [b, L, V] in the compute dtype, float32 over the responses":
                   shard.logits_gradient(b, t) + shard.logits(b, n, 3)})
  if not shared:
    step["critic activations (saved by every layer)"] = shard.saved(b, t)
  if p.ptx_coef > 0:
    step["PPO-ptx: pretraining batch activations + logits"] = shard.saved(b, t) + shard.loss_peak(b, t)
  sampled = max(p.rollout_batch_size, p.eval_batch_size)  # replies sampled (and scored) together
  rows = shard.rows(sampled)
  phases = {
      "rollout sampling": _sampling(shard, sampled, n, _gathered_weights(params["policy"], mesh_shape, shard.c)),
      "scoring (policy, reference, critic, reward model over the rollout)": {
          # Two models per program (reference and reward model; policy and critic), independent, so one layer
          # of each may be live together; the logits are projected at the N response positions only. The 125m
          # programs on v5p:2x2x2 (buffer dumps): frozen models 2.67 GB of temporaries, shaping 4.78 (one
          # f32[32, 128, 32000] of logits each); this phase: 4.56 (it was 20.4 with the whole buffer's logits).
          "forward: one layer of each of two models": shard.forward(rows, t) + max(
              rm_shard.forward(rows, t), 0.0 if shared else shard.forward(rows, t)),
          "policy or reference logits over the responses (float32)": shard.logits(rows, n, 1)},
      "train step": step}
  title = _title(cfg.stage, mesh_shape,
                 "policy (and reference): " + _shape_title(model_cfg, param_count(params["policy"])),
                 f"critic: {p.critic}; reward model: " + _shape_title(rm_cfg, param_count(rm_params)))
  return Estimate(title, resident, phases)


def estimate(cfg: Any, mesh_shape: Mapping[str, int], model_cfg: config_lib.ModelConfig,
             rm_cfg: config_lib.ModelConfig | None = None, chip: presets.Chip | None = None) -> Estimate:
  """The estimate of a typed stage config on a mesh of `mesh_shape` ({"data", "fsdp", "tensor"} sizes).

  Args:
    cfg: a typed stage config (PretrainConfig, SFTConfig, LabelConfig, RewardConfig, PPOConfig).
    mesh_shape: the resolved mesh sizes.
    model_cfg: the model's shape with its vocabulary size set (for SFT/label/reward/PPO: the init checkpoint's,
      with cfg.model's runtime settings applied).
    rm_cfg: PPO only: the reward model's shape.
    chip: the accelerator the run compiles for (how XLA schedules the step, and its program code); by default
      config.hardware.chip's, none where that is unset.
  """
  if chip is None:
    chip = presets.CHIPS.get(getattr(getattr(cfg, "hardware", None), "chip", "") or "")
  if model_cfg.vocab_size <= 0:
    raise ValueError("memory.estimate: model_cfg.vocab_size must be set (the tokenizer's size).")
  if cfg.stage in ("pretrain", "sft"):
    return estimate_lm(cfg, model_cfg, mesh_shape, chip)
  if cfg.stage == "reward":
    return estimate_reward(cfg, model_cfg, mesh_shape, chip)
  if cfg.stage == "label":
    return estimate_label(cfg, model_cfg, mesh_shape)
  if cfg.stage in stages.POLICY_RL:
    return estimate_ppo(cfg, model_cfg, rm_cfg or model_cfg, mesh_shape)
  raise ValueError(f"memory.estimate: no estimate for stage {cfg.stage!r}")


# ----------------------------------------------------------------------------------------------
# At launch.


def device_memory(chip: str = "", devices: Sequence[Any] | None = None) -> tuple[float | None, str]:
  """(bytes one device may use, a description): what the device reports (`memory_stats()["bytes_limit"]`),
  else the HBM of `chip` (config.hardware.chip) or of the chip its device_kind names; None on a CPU."""
  device = (devices or jax.local_devices())[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    stats = {}
  if stats.get("bytes_limit"):
    return float(stats["bytes_limit"]), f"{device.device_kind} (as the device reports it)"
  spec = presets.CHIPS.get(chip) or presets.chip_for_device_kind(getattr(device, "device_kind", ""))
  if spec is not None and (device.platform != "cpu" or chip):
    return spec.hbm_gib * GIB, f"{spec.name}, {spec.hbm_gib:g} GiB HBM" + ("" if device.platform != "cpu" else
                                                                           " (config.hardware.chip; running on CPU)")
  return None, getattr(device, "device_kind", device.platform)


def model_configs(cfg: Any) -> tuple[config_lib.ModelConfig, config_lib.ModelConfig | None]:
  """The run's model shape(s) as the stage will build them: pretraining's from the config (the vocabulary from
  the tokenizer it is given or will train), the other stages' from their init checkpoints."""
  if cfg.stage == "pretrain":
    vocab = cfg.model.vocab_size or cfg.tokenizer.vocab_size
    if not cfg.model.vocab_size and cfg.tokenizer.path:
      from gptrl import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
      vocab = tokenizer_lib.load_tokenizer(cfg.tokenizer.path).vocab_size
    return dataclasses.replace(cfg.model, vocab_size=vocab), None
  meta, _, _ = ckpt_lib.read_checkpoint_meta(cfg.init.checkpoint, cfg.init.step)
  model_cfg = cfg.model.apply(ckpt_lib.model_config_from_meta(meta))
  rm_cfg = None
  if cfg.stage in stages.POLICY_RL or (cfg.stage == "dpo" and cfg.reward_model.checkpoint):
    rm_meta, _, _ = ckpt_lib.read_checkpoint_meta(cfg.reward_model.checkpoint, cfg.reward_model.step)
    rm_cfg = cfg.model.apply(ckpt_lib.model_config_from_meta(rm_meta))
  return model_cfg, rm_cfg


def check_at_launch(cfg: Any) -> Estimate | None:
  """Logs the per-device estimate of `cfg` next to the device's memory; refuses a run that cannot fit.

  Called by gptrl/launch.py before the stage runs. `config.hardware.memory_check`: "refuse" (default) raises,
  "warn" logs, "off" skips the estimate. A config whose estimate cannot be made (a missing init checkpoint, an
  unknown stage, a mesh that does not fit the devices) is left to the stage to report.

  Raises:
    config_lib.ConfigError: the estimate exceeds the device's memory and memory_check is "refuse".
  """
  hardware = getattr(cfg, "hardware", None)
  if (hardware is None or hardware.memory_check == "off" or cfg.stage not in stages.NAMES
      or not stages.get(cfg.stage).memory_estimate):
    return None
  try:
    mesh_shape = dict(zip(sharding.MESH_AXES, sharding.resolve_mesh_shape(cfg.mesh, jax.device_count())))
    model_cfg, rm_cfg = model_configs(cfg)
    device = jax.local_devices()[0]
    chip = presets.CHIPS.get(hardware.chip) or (
        presets.chip_for_device_kind(device.device_kind) if device.platform != "cpu" else None)
    result = estimate(cfg, mesh_shape, model_cfg, rm_cfg, chip)
  except Exception as e:  # pylint: disable=broad-except  # the estimate must never be why a run fails
    logging.info("No memory estimate: %s: %s", type(e).__name__, e)
    return None
  capacity, device = device_memory(hardware.chip)
  logging.info("%s", result.table(capacity, device))
  if capacity and result.peak_bytes > capacity:
    remat = "" if getattr(cfg.model, "remat", "") == "block" else "set model.remat='block', "
    message = (f"the per-device memory estimate, {result.peak_bytes / GIB:.1f} GiB at its peak ({result.peak_phase}), "
               f"exceeds the {capacity / GIB:.1f} GiB of one device ({device}). Use smaller micro-batches "
               f"(a larger optim.grad_accum_steps or a smaller batch), shard more (mesh.fsdp / mesh.tensor), "
               f"{remat}or run on more or larger chips; config.hardware.memory_check='warn' runs it anyway.")
    if hardware.memory_check == "refuse":
      raise config_lib.ConfigError(f"config.hardware.memory_check: {message}")
    logging.warning("%s", message)
  elif capacity and result.peak_bytes > (1 - HEADROOM_WARNING) * capacity:
    logging.warning("Less than %d%% of device memory is left by the estimate (%.1f of %.1f GiB): compiler "
                    "temporaries may not fit.", 100 * HEADROOM_WARNING, result.peak_bytes / GIB, capacity / GIB)
  return result
