"""The scale-out configs (configs/*_tpu.py, configs/*_gpu.py) at every model size, built abstractly on a fake mesh
of the slice they are written for (jax.sharding.AbstractMesh: no devices, nothing allocated), and the memory
estimate (gptrl/memory.py) against independent references: the bytes of real sharded arrays, and XLA's own
count for a compiled train step.
"""
import dataclasses
import logging
import math
import os
import runpy
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptrl import config as config_lib
from gptrl import memory
from gptrl import presets
from gptrl import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [f"configs/{stage}_{platform}.py" for stage in ("pretrain", "sft", "reward", "ppo")
           for platform in ("tpu", "gpu")]
KIND = {"pretrain": "lm", "sft": "lm", "reward": "scalar", "ppo": "ppo"}
HEADROOM = 0.9  # a plan must leave 10% of device memory for what the estimate does not count

# The mesh axes every weight is meant to be split over, written out by hand (not from sharding.RULES): the
# embedding table and the output head over (vocabulary: tensor, width: fsdp); attention projections over
# (width: fsdp, heads: tensor); MLP matrices over (width: fsdp, hidden: tensor); norms and scalar biases whole.
EXPECTED_SPEC = {
    "token_embedding": ("tensor", "fsdp"),
    "head": ("fsdp", "tensor"),
    "query": ("fsdp", "tensor", None),
    "key": ("fsdp", "tensor", None),
    "value": ("fsdp", "tensor", None),
    "out": ("tensor", None, "fsdp"),
    "fc_in/kernel": ("fsdp", "tensor"),
    "fc_gate/kernel": ("fsdp", "tensor"),
    "fc_out/kernel": ("tensor", "fsdp"),
    "scale": (None,),
    "reward_head/kernel": ("fsdp",),
    "reward_head/bias": (),
    "value_head/kernel": ("fsdp",),
    "value_head/bias": (),
}


def load(path: str, variant: str) -> tuple[object, dict]:
  """The typed config of `path:variant` and the config file's module globals."""
  module = runpy.run_path(os.path.join(ROOT, path))
  return config_lib.stage_config(module["get_config"](variant)), module


def model_configs(cfg, size: str) -> tuple[config_lib.ModelConfig, config_lib.ModelConfig | None]:
  """The model a stage of this size builds: pretraining's from its config, the later stages' from the checkpoint
  of the previous stage (a pretraining run of `size`), with the stage's runtime settings applied."""
  if cfg.stage == "pretrain":
    return dataclasses.replace(cfg.model, vocab_size=cfg.tokenizer.vocab_size), None
  shape = config_lib.ModelConfig(**{**presets.model_shape(size), "vocab_size": presets.VOCAB_SIZE})
  model = cfg.model.apply(shape)
  return model, (model if cfg.stage == "ppo" else None)


def intended_mesh(cfg) -> dict[str, int]:
  """The mesh of config.hardware.num_chips devices, as gptrl/sharding.py resolves the config's mesh sizes."""
  n = cfg.hardware.num_chips
  assert n > 0, "a scale-out config names the slice it is sized for (hardware.num_chips)"
  return dict(zip(sharding.MESH_AXES, sharding.resolve_mesh_shape(cfg.mesh, n)))


def param_specs(params, mesh) -> dict[str, tuple]:
  """'path/to/param' -> the mesh axes of each dimension, for every parameter."""
  shardings = sharding.tree_shardings(params, mesh)
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(s.spec) for path, s in flat}


def expected_spec(path: str) -> tuple:
  for suffix, spec in EXPECTED_SPEC.items():
    if path == suffix or path.endswith("/" + suffix):
      return spec
  raise AssertionError(f"parameter {path} has no intended sharding in EXPECTED_SPEC: add it")


def padded(spec: tuple, ndim: int) -> tuple:
  return tuple(spec) + (None,) * (ndim - len(spec))


CASES = [(path, size) for path in CONFIGS for size in presets.MODEL_SIZES]


@pytest.mark.parametrize("path,size", CASES, ids=[f"{os.path.basename(p)[:-3]}:{s}" for p, s in CASES])
def test_config_builds_on_its_slice_shards_every_weight_as_intended_and_fits(path, size):
  cfg, _ = load(path, f"size={size}")
  mesh_shape = intended_mesh(cfg)
  assert math.prod(mesh_shape.values()) == cfg.hardware.num_chips
  remat = "block"
  if size in ("125m", "350m") and cfg.stage in ("pretrain", "sft", "reward"):  # TPUs: no remat; GPUs: dots
    remat = "none" if cfg.hardware.chip == "v5p" else "dots"
  assert cfg.model.dtype == "bfloat16" and cfg.model.remat == remat
  assert cfg.model.attention == ("splash" if presets.CHIPS[cfg.hardware.chip].platform == "tpu" else "xla")
  if cfg.stage == "pretrain":
    assert cfg.model.param_dtype == "float32"
  model_cfg, rm_cfg = model_configs(cfg, size)
  params, _ = memory.abstract_state(KIND[cfg.stage], model_cfg, cfg.optim, getattr(getattr(cfg, "ppo", None),
                                                                                    "critic", "separate"))
  # Every parameter split over exactly the mesh axes intended for it (a dimension the mesh does not divide
  # would be replicated instead, and fail here).
  mesh = memory.abstract_mesh(mesh_shape)
  unboxed = memory.unbox(params)
  leaves = {"/".join(str(getattr(k, "key", k)) for k in path): x
            for path, x in jax.tree_util.tree_flatten_with_path(unboxed)[0]}
  for name, spec in param_specs(params, mesh).items():
    ndim = leaves[name].ndim
    assert padded(spec, ndim) == padded(expected_spec(name), ndim), name
  # The size's name is its parameter count (the reward model has no vocabulary head: up to 20% fewer at 125m).
  n_params = memory.param_count(params.get("policy", params))
  nominal = {"125m": 0.134e9, "350m": 0.374e9, "1b": 1.26e9, "3b": 3.43e9, "7b": 6.74e9}[size]
  assert 0.8 * nominal < n_params < 1.01 * nominal
  estimate = memory.estimate(cfg, mesh_shape, model_cfg, rm_cfg)
  hbm = presets.CHIPS[cfg.hardware.chip].hbm_gib * memory.GIB
  assert estimate.peak_bytes <= HEADROOM * hbm, estimate.table(hbm, cfg.hardware.chip)


def test_every_plan_row_fits_its_chip():
  """Each config's rows for the other chips (v4/v6e/v5e, a100/h200) too: mesh, micro-batching and the estimate."""
  misfits = []
  for path in CONFIGS:
    module = runpy.run_path(os.path.join(ROOT, path))
    for size, (_, _, per_chip) in module["PLANS"].items():
      for chip in per_chip:
        cfg = config_lib.stage_config(module["get_config"](f"size={size},chip={chip}"))
        assert cfg.hardware.chip == chip and cfg.hardware.num_chips == per_chip[chip][0]
        mesh_shape = intended_mesh(cfg)
        batch = cfg.ppo.minibatch_size if cfg.stage == "ppo" else cfg.data.batch_size
        assert batch % (mesh_shape["fsdp"] * cfg.optim.grad_accum_steps) == 0, (path, size, chip)
        model_cfg, rm_cfg = model_configs(cfg, size)
        estimate = memory.estimate(cfg, mesh_shape, model_cfg, rm_cfg)
        hbm = presets.CHIPS[chip].hbm_gib * memory.GIB
        if estimate.peak_bytes > HEADROOM * hbm:
          misfits.append(f"{path}:size={size},chip={chip}: {estimate.peak_bytes / memory.GIB:.1f} GiB "
                         f"({estimate.peak_phase}) of {hbm / memory.GIB:.0f}")
  assert not misfits, "\n".join(misfits)


def test_variant_with_another_slice_keeps_the_global_batch_and_changes_the_micro_batching():
  base, _ = load("configs/pretrain_tpu.py", "size=1b")  # 32 v5p chips, 16 rows per chip per micro-batch
  bigger, _ = load("configs/pretrain_tpu.py", "size=1b,chips=64")
  assert base.data.batch_size == bigger.data.batch_size == 512
  assert (base.optim.grad_accum_steps, bigger.optim.grad_accum_steps) == (1, 1)
  smaller, _ = load("configs/pretrain_tpu.py", "size=1b,chips=8")
  assert smaller.optim.grad_accum_steps == 4 and smaller.hardware.num_chips == 8  # 512 / (8 chips x 16 rows)


@pytest.mark.parametrize("variant,message", [
    ("size=13b", "unknown size '13b'"),
    ("chip=h100", "no plan for chip 'h100'"),
    ("size=7b,chips=6", "not a multiple of the 4 tensor-parallel ways"),
    ("size=1b,chips=3", "does not split over fsdp=3"),
    ("sise=1b", "unknown variant key 'sise'"),
    ("1b", "is not key=value"),
])
def test_bad_variant_is_refused_naming_the_file_and_what_is_allowed(variant, message):
  module = runpy.run_path(os.path.join(ROOT, "configs/pretrain_tpu.py"))
  with pytest.raises(ValueError, match="configs/pretrain_tpu.py") as e:
    module["get_config"](variant)
  assert message in str(e.value)


def test_config_accepts_exactly_the_chips_presets_knows():
  assert set(config_lib.HARDWARE_CHIPS) == set(presets.CHIPS)
  with pytest.raises(config_lib.ConfigError, match="config.hardware.chip: .*Did you mean 'v5p'"):
    config_lib.HardwareConfig(chip="v5pp")


def test_accelerator_types_and_topologies_follow_cloud_tpu_naming():
  # v4 and v5p count TensorCores (2 per chip), v5e and v6e count chips; topologies are chips in a 2-D (v5e, v6e)
  # or 3-D (v4, v5p) torus, as jax.experimental.topologies names them (gptrl/compile.py).
  assert presets.accelerator_type("v5p", 64) == "v5p-128" and presets.topology_name("v5p", 64) == "v5p:4x4x4"
  assert presets.accelerator_type("v4", 16) == "v4-32" and presets.topology_name("v4", 8) == "v4:2x2x2"
  assert presets.accelerator_type("v5e", 32) == "v5litepod-32" and presets.topology_name("v5e", 32) == "v5e:4x8"
  assert presets.accelerator_type("v6e", 8) == "v6e-8" and presets.topology_name("v6e", 256) == "v6e:16x16"
  with pytest.raises(ValueError, match="not a Cloud TPU chip"):
    presets.accelerator_type("h100", 8)
  with pytest.raises(ValueError, match="not a Cloud TPU chip"):
    presets.topology_name("h100", 8)
  with pytest.raises(ValueError, match="no v5e slice of 12 chips"):
    presets.topology_name("v5e", 12)


# ----------------------------------------------------------------------------------------------
# The estimate against independent references.


def test_sharded_bytes_equal_the_bytes_of_real_sharded_arrays():
  """The exact part of the estimate: per-device bytes of params and optimizer state from abstract shapes equal
  the bytes each device holds of a real train state initialised on the fake 8-device mesh."""
  from gptrl import model as model_lib  # pylint: disable=import-outside-toplevel
  from gptrl import optim  # pylint: disable=import-outside-toplevel
  from gptrl import trainer  # pylint: disable=import-outside-toplevel
  cfg = config_lib.ModelConfig(vocab_size=512, num_layers=2, num_heads=4, d_model=64, max_len=32, gated_mlp=True,
                               tie_embeddings=False, pos_embedding="rope", norm="rmsnorm")
  model = model_lib.GPT(cfg)
  optimizer = optim.make_optimizer(config_lib.OptimConfig(), 10)
  init = lambda r: model.init(r, jnp.zeros((1, 32), jnp.int32))["params"]
  mesh_cfg = config_lib.MeshConfig(data=1, fsdp=4, tensor=2)
  state, _ = trainer.create_train_state(init, optimizer, 0, sharding.make_mesh(mesh_cfg))
  device = jax.devices()[0]

  def held(tree):
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)

  params, opt_state = memory.abstract_train_state(init, optimizer)
  mesh = memory.abstract_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  assert memory.sharded_bytes(params, mesh) == held(state.params)
  assert memory.sharded_bytes(opt_state, mesh) == held(state.opt_state)
  assert held(state.params) < sum(x.nbytes for x in jax.tree.leaves(state.params)) / 4  # really sharded


def test_train_step_estimate_is_close_to_xla_count_for_a_compiled_step():
  """Resident state + the train-step phase against XLA's buffer assignment for the real jitted train step of a
  small model on one CPU device: arguments + temporaries + outputs not aliased to donated inputs. Only float32
  without remat is comparable on CPU: XLA's CPU backend computes bfloat16 in float32 and its scheduler does not
  honour remat policies (its temporaries are the same with and without them)."""
  from gptrl import model as model_lib  # pylint: disable=import-outside-toplevel
  from gptrl import optim  # pylint: disable=import-outside-toplevel
  from gptrl import trainer  # pylint: disable=import-outside-toplevel
  from gptrl import losses  # pylint: disable=import-outside-toplevel
  model_cfg = config_lib.ModelConfig(vocab_size=1024, num_layers=2, num_heads=4, d_model=64, max_len=128)
  cfg = config_lib.PretrainConfig(model=model_cfg, data=config_lib.DataConfig(batch_size=8),
                                  sample=config_lib.SampleConfig(max_new_tokens=16))
  est = memory.estimate(cfg, {"data": 1, "fsdp": 1, "tensor": 1}, model_cfg)
  ours = est.persistent_bytes + est.phase_bytes("train step")
  model = model_lib.GPT(model_cfg)
  optimizer = optim.make_optimizer(cfg.optim, 10)
  mesh = sharding.make_mesh(config_lib.MeshConfig(data=1), devices=jax.devices()[:1])
  state, _ = trainer.create_train_state(lambda r: model.init(r, jnp.zeros((1, 128), jnp.int32))["params"],
                                        optimizer, 0, mesh)
  step = trainer.make_train_step(losses.lm_loss_fn(model), optimizer, lambda s: 1e-3)
  batch = {"inputs": jnp.zeros((8, 128), jnp.int32), "targets": jnp.zeros((8, 128), jnp.int32),
           "weights": jnp.ones((8, 128), jnp.float32)}
  with sharding.activate(mesh):
    analysis = jax.jit(step, donate_argnums=(0,)).lower(state, batch).compile().memory_analysis()
  xla = (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes + analysis.output_size_in_bytes
         - analysis.alias_size_in_bytes)
  assert 0.7 < ours / xla < 1.3, (ours, xla, est.table())


def test_activation_formula_scales_as_the_model_code_does():
  """Hand-computed bytes for one layer of a small model (the tensors of gptrl/model.py, written out)."""
  cfg = config_lib.ModelConfig(vocab_size=1000, num_layers=3, num_heads=4, d_model=32, max_len=16, dtype="bfloat16")
  shard = memory._Shard(cfg, tensor=2, batch_ways=4)  # pylint: disable=protected-access
  b, t = 2, 16
  h, k, d, f = 2, 8, 32, 64  # heads and MLP split over tensor=2
  per_token = 4 * d + 3 * h * k + h * k + 2 * d + 2 * f
  # t = 16 < 128: causal attention is one dense block; float32 weights + their bfloat16 cast
  assert shard.layer_full(b, t) == b * t * per_token * 2 + b * h * t * t * (4 + 2)
  # 256 tokens: four query blocks of 64 reach 64, 128, 192 and 256 keys (5/8 of the square)
  assert shard.score_area(b, 256) == b * 64 * (64 + 128 + 192 + 256) == b * 256 * 256 * 5 / 8
  fp32 = memory._Shard(dataclasses.replace(cfg, dtype="float32"), tensor=2, batch_ways=4)  # pylint: disable=protected-access
  assert fp32.layer_full(b, t) == b * t * per_token * 4 + b * h * t * t * 4  # no cast under float32 compute
  assert shard.layer_saved(b, t, "block") == b * t * d * 2
  assert shard.kv_cache(b, t) == 3 * (2 * b * t * h * k * 2 + b * t)
  assert shard.logits(b, t, 3) == 3 * b * t * 500 * 4
  assert shard.rows(10) == 3  # 10 rows over 4 data-parallel ways: the sampler pads to 12


def test_train_step_holds_every_layers_weights_gathered_over_fsdp_in_the_compute_dtype():
  """Each product reads its weight whole over fsdp (model._in_use) and XLA holds the gathered copies from the
  forward to the backward pass: every layer's weights, split over tensor only, in bfloat16, and the output
  layer's table; for PPO the policy's and the separate critic's."""
  cfg = config_lib.ModelConfig(vocab_size=1000, num_layers=3, num_heads=4, d_model=32, max_len=16, dtype="bfloat16",
                               remat="block")
  d, f = 32, 128
  # Per layer over tensor=2: query/key/value/out split by heads, fc_in (kernel, bias) and fc_out's kernel by MLP
  # units; fc_out's bias and both norms' scale and bias whole. The tied [1000, 32] table split by vocabulary.
  layer = 4 * d * d // 2 + (d * f + f) // 2 + d * f // 2 + d + 4 * d
  expected = (3 * layer + 1000 * d // 2) * 2
  mesh = {"data": 1, "fsdp": 4, "tensor": 2}
  gathered, trained = memory._gathered_weights, memory._trained  # pylint: disable=protected-access
  params, _ = memory.abstract_state("lm", cfg)
  assert gathered(params, mesh, 2) == expected
  assert gathered(params, {"data": 4, "fsdp": 1, "tensor": 2}, 2) == 0  # no fsdp: nothing to gather
  _, step, _ = trained("ppo", cfg, config_lib.OptimConfig(), mesh, critic="separate")
  assert [v for k, v in step.items() if k.startswith("weights gathered")] == [2 * expected]


@pytest.mark.parametrize("remat", ["block", "none"])
def test_with_one_micro_batch_and_remat_the_gathered_weights_are_not_beside_the_backward_peak(remat):
  """Micro-batches: the weights are gathered ahead of the accumulation loop and held through it, so the step adds
  them to the activations and logits. One micro-batch under remat: gathered early in the forward pass and freed
  (the recomputed blocks gather again), so the step's transient is the larger of the two (the 1b TPU compiles)."""
  model_cfg = config_lib.ModelConfig(vocab_size=128, num_layers=3, num_heads=4, d_model=64, max_len=16,
                                     dtype="bfloat16", remat=remat)
  mesh = {"data": 1, "fsdp": 4, "tensor": 1}
  steps = {}
  for accum in (1, 2):
    cfg = config_lib.PretrainConfig(model=model_cfg, data=config_lib.DataConfig(batch_size=8),
                                    optim=config_lib.OptimConfig(grad_accum_steps=accum),
                                    sample=config_lib.SampleConfig(max_new_tokens=8))
    steps[accum] = memory.estimate_lm(cfg, model_cfg, mesh).phases["train step"]
  params, _ = memory.abstract_state("lm", model_cfg)
  gathered = memory._gathered_weights(params, mesh, 2)  # pylint: disable=protected-access
  shard = memory._Shard(model_cfg, tensor=1, batch_ways=4)  # pylint: disable=protected-access
  held = {accum: shard.training(8 // 4 // accum, 16) + shard.loss_peak(8 // 4 // accum, 16) for accum in (1, 2)}
  others = {accum: sum(v for k, v in step.items() if k.startswith(("gradients", "optimizer"))) for accum, step in
            steps.items()}
  assert sum(steps[2].values()) == others[2] + gathered + held[2]
  if remat == "none":  # the backward pass reads the forward's gathered weights
    assert sum(steps[1].values()) == others[1] + gathered + held[1]
  else:
    assert sum(steps[1].values()) == others[1] + max(gathered, held[1])
    assert gathered > held[1] > 0  # the case where the rule matters, for this small model


def test_head_major_copies_of_the_attention_kernels_only_where_the_head_size_is_padded():
  """Where the head size is not a multiple of TPU's 128 lanes, the gathered [d, H * K] query/key/value kernels
  are copied to [d, H, K] (padded to 128) and, with micro-batches, both are held through the loop (the 3b
  pretraining step on v5e, K = 100); at K = 128 the layout is a reshape (the 1b steps), and without fsdp nothing
  is gathered. Split over tensor like the heads; grouped key/value heads count as theirs. TPU chips only; with one
  micro-batch on v5e, two thirds of them (the SFT and reward 3b steps)."""
  head_major = memory._head_major_kernels  # pylint: disable=protected-access
  def kernels(d_model, heads, kv_heads, tensor=1, fsdp=4, chip="v5e"):
    cfg = config_lib.ModelConfig(vocab_size=128, num_layers=2, num_heads=heads, num_kv_heads=kv_heads, d_model=d_model,
                                 max_len=16, dtype="bfloat16", remat="block")
    shard = memory._Shard(cfg, tensor=tensor, batch_ways=fsdp, chip=presets.CHIPS.get(chip))  # pylint: disable=protected-access
    return head_major(shard, {"data": 1, "fsdp": fsdp, "tensor": tensor})
  assert kernels(400, 4, 4) == 2 * 400 * 12 * 128 * 2  # K = 100 -> 128 lanes
  assert kernels(400, 4, 2, tensor=2) == 2 * 400 * (2 + 2 * 1) * 128 * 2  # heads and kv heads over tensor
  assert kernels(512, 4, 4) == 0  # K = 128: a reshape
  assert kernels(400, 4, 4, fsdp=1) == 0  # nothing gathered
  assert kernels(400, 4, 4, chip="h100") == kernels(400, 4, 4, chip="") == 0  # not a TPU, or not known
  # In the train step: with micro-batches under remat, on a TPU.
  model_cfg = config_lib.ModelConfig(vocab_size=128, num_layers=2, num_heads=4, d_model=400, max_len=16,
                                     dtype="bfloat16", remat="block")
  mesh = {"data": 1, "fsdp": 4, "tensor": 1}
  def step(accum, chip, remat="block"):
    mcfg = dataclasses.replace(model_cfg, remat=remat)
    cfg = config_lib.PretrainConfig(model=mcfg, data=config_lib.DataConfig(batch_size=8),
                                    optim=config_lib.OptimConfig(grad_accum_steps=accum),
                                    sample=config_lib.SampleConfig(max_new_tokens=8))
    return memory.estimate_lm(cfg, mcfg, mesh, presets.CHIPS.get(chip)).phases["train step"]
  name = "gathered q/k/v kernels, head-major copies (128 lanes)"
  assert step(2, "v5e")[name] == step(2, "v5p")[name] == kernels(400, 4, 4)
  # One micro-batch: v5e's steps hold part of every layer's copies at their peak (two thirds, beside the
  # activations: the SFT and reward 3b steps); the other TPUs gather all weights early and free them (the larger of
  # those and the backward's peak).
  share = "gathered q/k/v kernels, head-major copies (128 lanes; the share live at the peak)"
  assert name not in step(1, "v5e") and step(1, "v5e")[share] == pytest.approx(kernels(400, 4, 4) * 2 / 3)
  assert name not in step(1, "v5p") and name not in step(2, "h100") and name not in step(2, "v5e", remat="none")
  assert share not in step(1, "v5p") and share not in step(2, "v5e")


def test_the_chip_decides_what_of_the_gathered_weights_the_step_holds_and_adds_its_program_code():
  """One micro-batch under remat: v5e's compiles gather each layer's weights as it runs (about one layer's worth
  live at the peak), the other TPUs' gather every layer's early in the forward pass (the larger of those and the
  backward's peak); the reward step follows the same rule. On TPUs the step's program code is counted (the line
  fitted to the compiles: 12.7 MB + 6.7 MB per 1024 of d_model, per layer); on GPUs and unknown chips it is not."""
  model_cfg = config_lib.ModelConfig(vocab_size=128, num_layers=3, num_heads=4, d_model=64, max_len=16,
                                     dtype="bfloat16", remat="block")
  mesh = {"data": 1, "fsdp": 4, "tensor": 1}
  cfg = config_lib.PretrainConfig(model=model_cfg, data=config_lib.DataConfig(batch_size=8),
                                  sample=config_lib.SampleConfig(max_new_tokens=8))
  params, _ = memory.abstract_state("lm", model_cfg)
  gathered = memory._gathered_weights(params, mesh, 2)  # pylint: disable=protected-access
  shard = memory._Shard(model_cfg, tensor=1, batch_ways=4)  # pylint: disable=protected-access
  held = shard.training(2, 16) + shard.loss_peak(2, 16)
  code = 3 * (12.7e6 + 6.7e6 * 64 / 1024)
  assert memory.train_step_code(model_cfg, presets.CHIPS["v5p"]) == pytest.approx(code)
  assert memory.train_step_code(model_cfg, presets.CHIPS["v5p"], models=2) == pytest.approx(2 * code)
  assert memory.train_step_code(model_cfg, presets.CHIPS["h100"]) == memory.train_step_code(model_cfg, None) == 0
  steps = {chip: memory.estimate_lm(cfg, model_cfg, mesh, presets.CHIPS.get(chip)).phases["train step"]
           for chip in ("v5e", "v5p", "h100", "")}
  others = sum(v for k, v in steps[""].items() if k.startswith(("gradients", "optimizer")))
  assert sum(steps[""].values()) == pytest.approx(others + max(gathered, held))
  assert sum(steps["h100"].values()) == pytest.approx(others + max(gathered, held))
  assert sum(steps["v5p"].values()) == pytest.approx(others + max(gathered, held) + code)
  assert steps["v5e"]["weights gathered layer by layer (one layer's worth)"] == pytest.approx(gathered / 4)
  # (and, head size 16 not being a multiple of 128 lanes, two thirds of every layer's q/k/v head-major copies)
  head_major = 3 * 64 * 12 * 128 * 2 * 2 / 3
  assert sum(steps["v5e"].values()) == pytest.approx(others + held + gathered / 4 + head_major + code)
  # The reward step: the same rule (its activations alone at the backward's peak: no logits).
  rcfg = config_lib.RewardConfig(model=model_cfg, data=config_lib.PreferenceDataConfig(batch_size=4, max_responses=2),
                                 reward=config_lib.RewardHeadConfig(normalize_samples=0),
                                 init=config_lib.InitConfig(checkpoint="sft"))
  step = memory.estimate_reward(rcfg, model_cfg, mesh, presets.CHIPS["v5p"]).phases["train step"]
  rparams, _ = memory.abstract_state("scalar", model_cfg)
  rgathered = memory._gathered_weights(rparams, mesh, 2)  # pylint: disable=protected-access
  assert memory._GATHERED not in step  # pylint: disable=protected-access
  assert step["gathered weights beyond the backward's peak (one micro-batch)"] == max(
      0.0, rgathered - shard.training(2, 16))


def test_eval_holds_its_logits_once_and_the_sampler_every_layers_gathered_weights():
  """The eval step (a forward pass to the loss) holds the larger of one layer's tensors and the logits in
  model.logits_dtype (the log-softmax is never written: losses.token_log_probs), beside about one layer's gathered
  weights; a sampler holds every layer's gathered weights through its decoding loop (XLA hoists the gathers out
  of it) beside the KV cache, and projects the last prompt position only (the 1b pretraining plan's compiles)."""
  model_cfg = config_lib.ModelConfig(vocab_size=8000, num_layers=3, num_heads=4, d_model=64, max_len=32,
                                     dtype="bfloat16", remat="block", logits_dtype="bfloat16")
  mesh = {"data": 1, "fsdp": 4, "tensor": 1}
  cfg = config_lib.PretrainConfig(model=model_cfg, data=config_lib.DataConfig(batch_size=8),
                                  sample=config_lib.SampleConfig(prompts=("a", "b", "c"), max_new_tokens=8))
  phases = memory.estimate_lm(cfg, model_cfg, mesh).phases
  params, _ = memory.abstract_state("lm", model_cfg)
  gathered = memory._gathered_weights(params, mesh, 2)  # pylint: disable=protected-access
  shard = memory._Shard(model_cfg, tensor=1, batch_ways=4)  # pylint: disable=protected-access
  b, t = 2, 32
  logits = b * t * (8000 * 2 + 64 * 2)  # bfloat16 logits beside the last hidden state
  assert logits > shard.forward(b, t)  # the logits are this small model's eval peak
  assert sum(phases["eval (whole batch, no micro-batches)"].values()) == pytest.approx(logits + gathered / 4)
  wide = memory._Shard(dataclasses.replace(model_cfg, logits_dtype="float32"), tensor=1, batch_ways=4)  # pylint: disable=protected-access
  assert wide.eval_pass(b, t) == b * t * (8000 * 4 + 64 * 2)
  sampling = phases["eval sampling"]
  rows = 1  # 3 prompts over 4 devices
  kv = 3 * (2 * rows * 32 * 4 * 16 * 2 + rows * 32)
  assert sum(sampling.values()) == pytest.approx(kv + gathered + shard.forward(rows, 24, cache=32) + rows * 8000 * 4)


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_ppo_scoring_holds_a_layer_of_each_model_and_the_response_logits(critic):
  """Each scoring program runs two independent models (reference and reward model; policy and a separate
  critic), so one layer of each may be live together, and projects onto the vocabulary at the N response
  positions only: one float32 [rows, N, V] array (the 125m programs' buffer dumps)."""
  model_cfg = config_lib.ModelConfig(vocab_size=1000, num_layers=2, num_heads=4, d_model=64, max_len=64,
                                     dtype="bfloat16", remat="block")
  rm_cfg = dataclasses.replace(model_cfg, num_layers=1, d_model=32)
  cfg = config_lib.PPOConfig(init=config_lib.InitConfig("unused"), reward_model=config_lib.InitConfig("unused"),
                             ppo=config_lib.PPOAlgoConfig(rollout_batch_size=16, minibatch_size=8, max_new_tokens=8,
                                                         critic=critic, num_eval_prompts=0,
                                                         critic_init="sft" if critic == "shared" else "reward"))
  mesh = {"data": 1, "fsdp": 4, "tensor": 1}
  scoring = memory.estimate_ppo(cfg, model_cfg, rm_cfg, mesh).phases[
      "scoring (policy, reference, critic, reward model over the rollout)"]
  shard = memory._Shard(model_cfg, tensor=1, batch_ways=4)  # pylint: disable=protected-access
  rm_shard = memory._Shard(rm_cfg, tensor=1, batch_ways=4)  # pylint: disable=protected-access
  rows = 16 // 4
  second = shard.forward(rows, 64) if critic == "separate" else rm_shard.forward(rows, 64)
  assert shard.forward(rows, 64) > rm_shard.forward(rows, 64)  # the larger partner decides
  assert sum(scoring.values()) == pytest.approx(shard.forward(rows, 64) + second + rows * 8 * 1000 * 4)


def test_one_tensorcore_tpus_recompute_the_gated_mlps_product_without_remat():
  """Without remat the v4/v5p compiles keep one [tokens, MLP width] tensor per layer more than the v5e/v6e ones
  at the same rows per device (the 125m buffer dumps): the gated MLP's activation product."""
  cfg = config_lib.ModelConfig(vocab_size=1000, num_layers=3, num_heads=4, d_model=64, max_len=128,
                               dtype="bfloat16", remat="none", gated_mlp=True, attention="xla")
  b, t = 2, 128
  kept = {chip: memory._Shard(cfg, 1, 1, presets.CHIPS[chip]).saved(b, t)  # pylint: disable=protected-access
          for chip in ("v4", "v5p", "v5e", "v6e")}
  assert kept["v4"] == kept["v5p"] == memory._Shard(cfg, 1, 1).saved(b, t)  # pylint: disable=protected-access
  assert kept["v5e"] == kept["v6e"] == kept["v5p"] - 3 * b * t * cfg.mlp_dim * 2
  plain = dataclasses.replace(cfg, gated_mlp=False)
  assert (memory._Shard(plain, 1, 1, presets.CHIPS["v6e"]).saved(b, t)  # pylint: disable=protected-access
          == memory._Shard(plain, 1, 1).saved(b, t))  # pylint: disable=protected-access


def test_train_step_peak_is_saved_tensors_one_recomputed_block_and_the_logits_or_their_gradient():
  """What the compiled TPU train steps hold at their peak (XLA's live ranges; benchmarks/README.md): every
  layer's saved tensors, what the block being recomputed holds, and the logits' gradient in the compute dtype, or, at the
  loss, the logits in float32 and the compute dtype."""
  cfg = config_lib.ModelConfig(vocab_size=1000, num_layers=3, num_heads=4, d_model=32, max_len=16, dtype="bfloat16",
                               remat="block")
  shard = memory._Shard(cfg, tensor=2, batch_ways=4)  # pylint: disable=protected-access
  b, t, v = 2, 16, 500  # the vocabulary split over tensor=2
  h, k, d, f = 2, 8, 32, 64  # heads and MLP split over tensor=2
  # Under remat "block" XLA recomputes a block in pieces: the larger sublayer's tensors (here the attention's,
  # with its float32 weights and their bfloat16 cast) and the residual sum, not the whole layer at once.
  attention = b * t * (2 * d + 3 * h * k + h * k) * 2 + b * h * t * t * (4 + 2)
  mlp = b * t * (2 * d + 2 * f) * 2
  assert attention > mlp
  recomputed = attention + b * t * d * 2
  assert recomputed < shard.layer_full(b, t)
  assert shard.training(b, t) == 3 * b * t * 32 * 2 + recomputed
  assert shard.loss_peak(b, t) == max(b * t * v * 2, b * t * v * (4 + 2) - recomputed)
  wide = memory._Shard(dataclasses.replace(cfg, vocab_size=32000), tensor=2, batch_ways=4)  # pylint: disable=protected-access
  # A large vocabulary: the logits at the loss outweigh the recomputed block and the gradient
  assert wide.loss_peak(b, t) == b * t * 16000 * 6 - recomputed > b * t * 16000 * 2
  # Under "dots" the projections and MLP matmuls are saved and the rest of the layer is recomputed at once
  dots = memory._Shard(dataclasses.replace(cfg, remat="dots"), tensor=2, batch_ways=4)  # pylint: disable=protected-access
  assert dots.training(b, t) == 3 * dots.layer_saved(b, t, "dots") + dots.layer_full(b, t)
  plain = memory._Shard(dataclasses.replace(cfg, remat="none"), tensor=2, batch_ways=4)  # pylint: disable=protected-access
  # nothing recomputed but the elementwise outputs whose inputs are kept: here the two norms' outputs
  assert plain.training(b, t) == 3 * (plain.layer_full(b, t) - b * t * 2 * d * 2)
  # and with rotary embeddings also the query and key before rotation (a gated MLP's activation product is kept)
  llama = memory._Shard(dataclasses.replace(cfg, remat="none", pos_embedding="rope", gated_mlp=True), tensor=2,  # pylint: disable=protected-access
                        batch_ways=4)
  assert llama.training(b, t) == 3 * (llama.layer_full(b, t) - b * t * (2 * d + 2 * h * k) * 2)
  assert plain.loss_peak(b, t) == b * t * v * 6
  fp32 = memory._Shard(dataclasses.replace(cfg, dtype="float32", remat="none"), tensor=2, batch_ways=4)  # pylint: disable=protected-access
  assert fp32.loss_peak(b, t) == b * t * v * 4  # one float32 copy: the logits are float32 already
  # bfloat16 logits (the TPU plans): one [b, t, V] bfloat16 array, the logits' gradient written in their place
  narrow = memory._Shard(dataclasses.replace(wide.cfg, logits_dtype="bfloat16"), tensor=2, batch_ways=4)  # pylint: disable=protected-access
  assert narrow.loss_peak(b, t) == b * t * 16000 * 2
  assert narrow.loss_peak(b, t) == narrow.logits_gradient(b, t) < wide.loss_peak(b, t)


@pytest.mark.parametrize("head_dim", [64, 128, 96])
def test_without_remat_the_splash_kernels_head_major_tensors_count_their_128_lane_padding(head_dim):
  """TPU lays an array's last dimension out in 128-lane tiles: the rotated query and key, the value and the
  kernel's output that a layer keeps in [B, H, T, K] for the splash kernel's backward pass take K rounded up to a
  multiple of 128 (K = 64: twice their bytes, as the 125m train steps' buffers on v5p hold them)."""
  heads, kv_heads, layers = 4, 2, 3
  cfg = config_lib.ModelConfig(vocab_size=1000, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                               d_model=heads * head_dim, max_len=256, dtype="bfloat16", remat="none",
                               attention="splash", pos_embedding="rope", gated_mlp=True)
  shard = memory._Shard(cfg, tensor=1, batch_ways=1)  # pylint: disable=protected-access
  b, t = 2, 256
  padded = {64: 128, 128: 128, 96: 128}[head_dim]
  # q and the output over `heads`, k and v over `kv_heads`, two bytes each, (padded - K) lanes more
  assert shard.splash_lane_padding(b, t) == b * t * (padded - head_dim) * 2 * (heads + kv_heads) * 2
  unpadded = shard.layer_full(b, t) - shard.recomputed_elementwise(b, t) + b * t * heads * head_dim * 2
  assert shard.saved(b, t) == layers * (unpadded + shard.splash_lane_padding(b, t))
  # the einsum path keeps no head-major copies for a kernel; under remat "block" only the blocks' inputs are kept
  einsum = memory._Shard(dataclasses.replace(cfg, attention="xla"), tensor=1, batch_ways=1)  # pylint: disable=protected-access
  assert einsum.splash_lane_padding(b, t) == 0
  block = memory._Shard(dataclasses.replace(cfg, remat="block"), tensor=1, batch_ways=1)  # pylint: disable=protected-access
  assert block.saved(b, t) == layers * b * t * cfg.d_model * 2


def test_logits_dtype_is_the_runs_choice_not_the_checkpoints():
  """A later stage's model takes its shape, compute dtype and remat from the checkpoint unless its config says
  otherwise, but not the logits' dtype: PPO from an SFT run that wrote bfloat16 logits reads float32 ones."""
  checkpoint = config_lib.ModelConfig(vocab_size=1000, dtype="bfloat16", remat="block", logits_dtype="bfloat16")
  assert config_lib.ModelRuntimeConfig().apply(checkpoint).logits_dtype == "float32"
  assert config_lib.ModelRuntimeConfig().apply(checkpoint).dtype == "bfloat16"
  assert config_lib.ModelRuntimeConfig(logits_dtype="").apply(checkpoint).logits_dtype == "bfloat16"
  for path in ("configs/pretrain_tpu.py", "configs/sft_tpu.py"):
    assert load(path, "size=125m")[0].model.logits_dtype == "bfloat16", path
  assert load("configs/ppo_tpu.py", "size=125m")[0].model.logits_dtype == "float32"
  with pytest.raises(config_lib.ConfigError, match=r"model\.logits_dtype.*'float32'.*got 'bf16'"):
    config_lib.ModelConfig(logits_dtype="bf16")



def test_splash_attention_keeps_a_log_sum_exp_instead_of_the_scores():
  """model.attention="splash" (whole sequences of a multiple of 128 tokens): the scores stay on the chip, the
  kernel keeps its float32 log-sum-exp per query and head; remat "dots" saves the kernel's output and that;
  a decoding pass (the sampler's prefill) still takes the einsum path and its scores."""
  cfg = config_lib.ModelConfig(vocab_size=1000, num_layers=3, num_heads=4, d_model=32, max_len=256, dtype="bfloat16",
                               remat="dots", attention="splash")
  shard = memory._Shard(cfg, tensor=2, batch_ways=4)  # pylint: disable=protected-access
  b, t = 2, 256
  h, k, d, f = 2, 8, 32, 64  # heads and MLP split over tensor=2
  per_token = 4 * d + 3 * h * k + h * k + 2 * d + 2 * f
  assert shard.layer_full(b, t) == b * t * per_token * 2 + b * t * h * 4
  assert shard.forward(b, t) == shard.layer_full(b, t)  # the kernel's tiles stay on the chip
  assert shard.layer_saved(b, t, "dots") == b * t * 2 * (3 * d + 3 * h * k + f) + b * t * h * (k * 2 + 4)
  einsum = memory._Shard(dataclasses.replace(cfg, attention="xla"),  # pylint: disable=protected-access
                         tensor=2, batch_ways=4)
  # Over a decoding cache (a sampler's prefill): the einsum path's float32 scores and softmax weights of the t
  # queries over the slots, and the mask as booleans and as bfloat16
  dense = b * t * per_token * 2 + h * b * t * 384 * 8 + b * t * 384 * (1 + 2)
  assert shard.forward(b, t, cache=384) == einsum.forward(b, t, cache=384) == dense > shard.forward(b, t)
  assert shard.layer_full(b, 200) == einsum.layer_full(b, 200)  # not a multiple of 128: the einsum path


# ----------------------------------------------------------------------------------------------
# At launch.


def test_check_at_launch_refuses_a_plan_that_cannot_fit_and_warn_lets_it_run(caplog):
  cfg, _ = load("configs/pretrain_tpu.py", "size=7b,chip=v5e")
  cfg = dataclasses.replace(cfg, mesh=config_lib.MeshConfig(data=1, fsdp=-1, tensor=4))  # on the 8 CPU devices
  with pytest.raises(config_lib.ConfigError, match=r"config.hardware.memory_check: .* exceeds the 16.0 GiB"):
    memory.check_at_launch(cfg)
  warn = dataclasses.replace(cfg, hardware=dataclasses.replace(cfg.hardware, memory_check="warn"))
  with caplog.at_level(logging.INFO):
    result = memory.check_at_launch(warn)
  assert result.peak_bytes > 16 * memory.GIB
  assert "Per-device memory estimate: pretrain on mesh" in caplog.text and "headroom" in caplog.text
  off = dataclasses.replace(cfg, hardware=dataclasses.replace(cfg.hardware, memory_check="off"))
  assert memory.check_at_launch(off) is None


def test_launcher_prints_the_estimate_and_refuses_before_touching_the_workdir(tmp_path):
  workdir = tmp_path / "run"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", "gptrl.launch", "--config", "configs/pretrain_tpu.py:size=7b,chip=v5e",
                         f"--config.workdir={workdir}"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Per-device memory estimate: pretrain on mesh data=1 fsdp=2 tensor=4 (8 devices)" in proc.stderr
  assert "model: 6.74B params (32 layers, d_model 4096" in proc.stderr
  assert "device memory" in proc.stderr and "(v5e, 16 GiB HBM" in proc.stderr
  assert "gptrl.launch: ConfigError: config.hardware.memory_check:" in proc.stderr
  assert not workdir.exists()


def test_cpu_devices_without_a_configured_chip_are_not_checked():
  capacity, device = memory.device_memory("")
  assert capacity is None and device
  capacity, _ = memory.device_memory("v5p")
  assert capacity == 95 * memory.GIB
  assert np.isclose(presets.CHIPS["h100"].hbm_gib, 80)
