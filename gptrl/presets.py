"""The model sizes and accelerator chips that the scale-out configs (`configs/*_tpu.py`, `configs/*_gpu.py`), the
memory estimate (gptrl/memory.py) and the job launchers (`launch/`) are written for.

Pure Python (no jax import), so the launchers can use it on a laptop that only has gcloud.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator kind: what the memory check needs, and how Cloud TPU names its slices."""
  name: str  # as in config.hardware.chip
  platform: str  # "tpu" | "gpu"
  hbm_gib: float  # memory of one JAX device (GiB): what the per-device estimate is compared with
  bf16_tflops: float  # peak dense bf16 matmul throughput of one device
  device_kinds: tuple[str, ...]  # `jax.devices()[0].device_kind` values that identify it
  # Cloud TPU only: accelerator type = f"{accelerator_prefix}-{chips * cores_per_chip}" (v4 and v5p count
  # TensorCores, two per chip; v5e and v6e count chips), and the TPU software version to create the VMs with.
  accelerator_prefix: str = ""
  cores_per_chip: int = 1
  runtime_version: str = ""
  chips_per_host: int = 8  # devices one host (one process) drives in a multi-host slice / GPU server
  hbm_gbps: float = 0.0  # HBM bandwidth of one device, GB/s (gptrl/compile.py's memory-bound time)
  link_gbps: float = 0.0  # one device's interconnect bandwidth, all links together, GB/s (ICI; NVLink)
  # Cloud TPU only: the dimensions of a slice's topology name (2: v5e:4x8; 3: v5p:2x4x4), and the chip
  # configuration to compile for (v4 and v5p: "megacore", one JAX device per chip, as they run).
  topology_dims: int = 0
  chip_config: str = ""


# HBM, bandwidth and peak figures from the Cloud TPU system-architecture pages (v4, v5e, v5p, v6e: interchip
# interconnect 2400 / 1600 / 4800 / 3584 Gbps per chip) and NVIDIA's datasheets (NVLink 600 / 900 GB/s);
# runtime versions from the Cloud TPU "TPU software versions" page (JAX on v4 and earlier: tpu-ubuntu2204-base).
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "tpu", 32.0, 275.0, ("TPU v4",), "v4", 2, "tpu-ubuntu2204-base", 4, hbm_gbps=1228.0,
               link_gbps=300.0, topology_dims=3, chip_config="megacore"),
    "v5e": Chip("v5e", "tpu", 16.0, 197.0, ("TPU v5 lite", "TPU v5e"), "v5litepod", 1, "v2-alpha-tpuv5-lite", 4,
                hbm_gbps=819.0, link_gbps=200.0, topology_dims=2),
    "v5p": Chip("v5p", "tpu", 95.0, 459.0, ("TPU v5", "TPU v5p"), "v5p", 2, "v2-alpha-tpuv5", 4, hbm_gbps=2765.0,
                link_gbps=600.0, topology_dims=3, chip_config="megacore"),
    "v6e": Chip("v6e", "tpu", 32.0, 918.0, ("TPU v6 lite", "TPU v6e"), "v6e", 1, "v2-alpha-tpuv6e", 4,
                hbm_gbps=1640.0, link_gbps=448.0, topology_dims=2),
    "a100": Chip("a100", "gpu", 80.0, 312.0, ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"), hbm_gbps=2039.0,
                 link_gbps=600.0),
    "h100": Chip("h100", "gpu", 80.0, 989.0, ("NVIDIA H100 80GB HBM3", "NVIDIA H100"), hbm_gbps=3350.0,
                 link_gbps=900.0),
    "h200": Chip("h200", "gpu", 141.0, 989.0, ("NVIDIA H200",), hbm_gbps=4800.0, link_gbps=900.0),
}


def chip_for_device_kind(device_kind: str) -> Chip | None:
  """The chip whose `device_kinds` names `device_kind` exactly, else the longest one it starts with, else None."""
  for chip in CHIPS.values():
    if device_kind in chip.device_kinds:
      return chip
  matches = [(len(k), chip) for chip in CHIPS.values() for k in chip.device_kinds if device_kind.startswith(k)]
  return max(matches, key=lambda m: m[0])[1] if matches else None


def _tpu(chip: str) -> Chip:
  """The Chip of a Cloud TPU chip name; ValueError naming the TPU chips for any other."""
  spec = CHIPS[chip]
  if spec.platform != "tpu":
    tpus = [c for c, s in CHIPS.items() if s.platform == "tpu"]
    raise ValueError(f"{chip!r} is not a Cloud TPU chip; TPU chips: {tpus}")
  return spec


def accelerator_type(chip: str, num_chips: int) -> str:
  """The Cloud TPU accelerator type of a slice of `num_chips` chips, e.g. ("v5p", 64) -> "v5p-128"."""
  spec = _tpu(chip)
  return f"{spec.accelerator_prefix}-{num_chips * spec.cores_per_chip}"


# Slice shapes by chip count, as Cloud TPU builds them (2D torus for v5e/v6e, 3D for v4/v5p).
_TOPOLOGIES = {2: {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
               3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
                   512: "8x8x8", 1024: "8x8x16"}}


def topology_name(chip: str, num_chips: int) -> str:
  """The topology name of a slice of `num_chips` chips, as `jax.experimental.topologies.get_topology_desc` takes
  it, e.g. ("v5p", 64) -> "v5p:4x4x4", ("v5e", 32) -> "v5e:4x8"."""
  spec = _tpu(chip)
  shapes = _TOPOLOGIES[spec.topology_dims]
  if num_chips not in shapes:
    raise ValueError(f"no {chip} slice of {num_chips} chips; slices of {sorted(shapes)} chips exist "
                     f"(or give a topology such as {chip}:{shapes[16]})")
  return f"{chip}:{shapes[num_chips]}"


# Llama-style decoder shapes (rope, RMSNorm, SwiGLU MLP whose width is a multiple of 256, untied output head),
# 32k vocabulary, 2048-token context. The name is the parameter count, rounded.
_SHAPE_DEFAULTS = dict(vocab_size=0, max_len=2048, pos_embedding="rope", norm="rmsnorm", tie_embeddings=False,
                       gated_mlp=True, mlp_activation="silu", mlp_bias=False, dropout=0.0)
# size: (num_layers, num_heads, d_model, MLP width F); the parameter counts (with a 32000-token vocabulary) are
# 134M, 374M, 1.26B (TinyLlama's shape), 3.43B (OpenLLaMA 3B's) and 6.74B (Llama 2 7B's).
_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "125m": (12, 12, 768, 2048),
    "350m": (24, 16, 1024, 2816),
    "1b": (22, 16, 2048, 5632),
    "3b": (26, 32, 3200, 8640),
    "7b": (32, 32, 4096, 11008),
}
MODEL_SIZES = tuple(_SHAPES)
VOCAB_SIZE = 32000  # the scale-out configs' tokenizer size: divisible by 8 and 16 for tensor parallelism


def model_shape(size: str) -> dict[str, Any]:
  """The `model` config fields of a named size (a ModelConfig's keyword arguments, vocab_size 0 = the tokenizer's)."""
  if size not in _SHAPES:
    raise ValueError(f"unknown model size {size!r}; known: {list(_SHAPES)}")
  layers, heads, d_model, mlp_dim = _SHAPES[size]
  # mlp_dim = round(mlp_ratio * d_model) in ModelConfig: the exact ratio gives the intended width back.
  return dict(_SHAPE_DEFAULTS, num_layers=layers, num_heads=heads, d_model=d_model, mlp_ratio=mlp_dim / d_model)


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one config runs one model size on one chip: the slice, the mesh and the micro-batching."""
  size: str
  chip: str
  chips: int  # devices in the job (TPU chips or GPUs)
  tensor: int  # tensor-parallel ways (mesh.tensor); fsdp takes the rest of the chips
  batch: int  # the global batch that is split into micro-batches (sequences, or PPO minibatch responses)
  grad_accum_steps: int  # micro-batches per optimizer step

  @property
  def fsdp(self) -> int:
    return self.chips // self.tensor

  @property
  def attention(self) -> str:
    """model.attention for the chip: the splash kernel on TPUs (no [T, T] scores in HBM: the 125m pretraining
    step's roofline time 476 -> 274 ms on v5p, benchmarks/README.md); the einsum path on GPUs."""
    return "splash" if CHIPS[self.chip].platform == "tpu" else "xla"

  @property
  def remat(self) -> str:
    """model.remat of pretraining, SFT and the reward model for the size and chip: 125m and 350m keep every
    activation on TPUs ("none") and their matmul outputs on GPUs ("dots"); larger models keep only each block's
    input ("block"). Compiled for their TPU slices (benchmarks/README.md), "dots" against "block" does 14-16% fewer
    flops on v5p and "none" cuts the 125m / 350m step's roofline time on v5p 274 -> 170 / 491 -> 281 ms for 18 / 38
    GiB of 95 (pretraining; SFT 75 -> 49 / 184 -> 117 ms for 9.3 / 19.6 GiB), the reward models' 14-20% on every
    chip."""
    if self.size not in ("125m", "350m"):
      return "block"
    return "none" if CHIPS[self.chip].platform == "tpu" else "dots"


# One row of a config's plan table: (global batch, tensor-parallel ways, {chip: (chips, rows per device per
# micro-batch)}); the first chip listed is the size's default.
PlanRow = tuple[int, int, dict[str, tuple[int, int]]]


def resolve_plan(variant: str, *, file: str, table: dict[str, PlanRow], default_size: str) -> Plan:
  """The plan a config's variant picks: "size=7b", "chip=v5e", "chips=256" (any subset, comma-separated).

  The chips default to the table's for that chip; the micro-batching follows the table's rows per device:
  grad_accum_steps = batch / (fsdp * rows), at least 1.

  Raises:
    ValueError: an unknown size, a chip the table has no row for, chips that tensor parallelism or the batch do
      not divide; the message names the config file and what is allowed.
  """
  values = parse_variant(variant, file=file, allowed={"size": default_size, "chip": "", "chips": 0})
  size = values["size"]
  if size not in table:
    raise ValueError(f"{file}: unknown size {size!r}; sizes: {list(table)}")
  batch, tensor, per_chip = table[size]
  chip = values["chip"] or next(iter(per_chip))
  if chip not in per_chip:
    raise ValueError(f"{file}: no plan for chip {chip!r} at size {size}; chips: {list(per_chip)}")
  chips, rows = per_chip[chip]
  chips = values["chips"] or chips
  if chips % tensor:
    raise ValueError(f"{file}: chips={chips} is not a multiple of the {tensor} tensor-parallel ways of size {size}")
  fsdp = chips // tensor
  if batch % fsdp:
    raise ValueError(f"{file}: the batch of {batch} does not split over fsdp={fsdp} ({chips} chips / tensor "
                     f"{tensor}); pick chips so that {batch} is divisible by chips / {tensor}")
  accum = max(1, batch // (fsdp * rows))
  while batch % (fsdp * accum):  # the nearest smaller micro-batch count that splits the batch evenly
    accum += 1
  return Plan(size=size, chip=chip, chips=chips, tensor=tensor, batch=batch, grad_accum_steps=accum)


def parse_variant(variant: str, *, file: str, allowed: dict[str, Any]) -> dict[str, Any]:
  """Parses a config variant "key=value,key=value" (after the colon in `--config file.py:variant`).

  Args:
    variant: the text after the colon ("" for none).
    file: the config file, for messages.
    allowed: key -> default; a value is converted to the default's type (int or str).
  Returns:
    `allowed` updated with the variant's values.
  Raises:
    ValueError: an unknown key, a piece without "=", or a value of the wrong type, naming the file and the key.
  """
  values = dict(allowed)
  for piece in filter(None, (p.strip() for p in variant.split(","))):
    key, sep, value = piece.partition("=")
    if not sep:
      raise ValueError(f"{file}: variant piece {piece!r} is not key=value; keys: {sorted(allowed)} "
                       f"(e.g. --config {file}:size=1b)")
    if key not in allowed:
      raise ValueError(f"{file}: unknown variant key {key!r}; keys: {sorted(allowed)}")
    if isinstance(allowed[key], int):
      try:
        values[key] = int(value)
      except ValueError:
        raise ValueError(f"{file}: variant {key}={value!r} must be an integer") from None
    else:
      values[key] = value
  return values
