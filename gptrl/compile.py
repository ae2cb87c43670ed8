"""Compile every program a run executes for its real TPU slice, on any host: nothing is allocated or run.

  python -m gptrl.compile --config configs/pretrain_tpu.py:size=1b [--topology v5p:2x4x4] [--json out.json]

With `libtpu` installed (`pip install 'gptrl[tpu-compile]'`, or `jax[tpu]`), `jax.experimental.topologies`
describes a slice's devices on a CPU host (the topology defaults to config.hardware's chip and chip count). The
run's mesh is laid over them, and each jitted function the stage would execute is lowered for ShapeDtypeStructs
carrying the run's shardings and compiled by XLA for that TPU, as the run would compile it:

  pretrain, sft: train step (grad accumulation and remat as configured), eval step, sampler (prefill + decode);
  reward: train step (one model or an ensemble), eval step, the SFT model's sampler for the reward normalisation;
  ppo: rollout sampler, scoring by the frozen models, shaping (log-probs, values, KL, GAE), the PPO update; under
    ppo.placement=split also the policy's copy from the learner's to the sampler's devices (a transfer, not a
    program: its bytes).

For each program it reports, per device: XLA's memory (arguments, outputs, temporaries, code) plus the run's
resident state the program does not take (e.g. the optimizer state during sampling) against the chip's HBM and
against gptrl/memory.py's estimate of that phase; the matmul flops of the optimised program (loops counted by
their trip counts: gptrl/hlo.py) against the model-FLOPs formula (6N + 12LHQT per trained token); two bounds on
the MFU the program can reach: at most model flops / compiled flops (every matmul at the chip's peak, nothing
else: what remat and masked work cost), and at least what a roofline time max(flops / peak, bytes / HBM bandwidth,
collective bytes / interconnect bandwidth) implies, where the bytes are every top-level instruction's operands
and results as XLA's own cost analysis counts them (reads that stay in on-chip memory included, so a bound); the
collectives per step (counts and bytes); and parameters that the sharding rules meant to split but had to
replicate. A program that cannot fit is an error that names it and the bytes (exit status 1); the
launchers run this check before creating hardware.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptrl import config as config_lib
from gptrl import decoding
from gptrl import hlo
from gptrl import memory
from gptrl import presets
from gptrl import sharding
from gptrl import stages

GIB = 1024 ** 3


class CompileCheckError(RuntimeError):
  """The plan cannot run as configured (a program does not fit, or does not compile); the message says which."""


# ----------------------------------------------------------------------------------------------
# The slice.


@dataclasses.dataclass(frozen=True)
class Target:
  """The devices compiled for: a TPU topology's (compile-only) devices, or this host's own."""
  name: str  # "v5p:2x4x4", or "local"
  chip: presets.Chip | None
  devices: tuple[Any, ...]


def tpu_topology(name: str, num_slices: int = 1) -> Target:
  """The compile-only devices of the TPU slice `name` ("v5p:2x4x4"; `num_slices` > 1: that many slices, a
  multi-slice job). Needs libtpu; raises CompileCheckError naming what to install."""
  chip_name = name.split(":")[0]
  chip = presets.CHIPS.get(chip_name)
  if chip is None or chip.platform != "tpu":
    tpus = [c for c, s in presets.CHIPS.items() if s.platform == "tpu"]
    raise CompileCheckError(f"--topology {name!r}: the chip before ':' must be one of {tpus}, e.g. v5p:2x4x4")
  import importlib.util  # pylint: disable=import-outside-toplevel
  if importlib.util.find_spec("libtpu") is None:
    raise CompileCheckError("compiling for a TPU needs libtpu, which is not installed: pip install "
                            "'gptrl[tpu-compile]' (or jax[tpu]); --skip-compile-check skips this check")
  # On a host without TPUs libtpu cannot discover its workers; it needs only a name to describe a slice. Compiling
  # touches no chip, so several processes may do it at once (libtpu otherwise holds a lock file per host).
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  kwargs: dict[str, Any] = {}
  if chip.chip_config:
    kwargs["chip_config_name"] = chip.chip_config
  if num_slices > 1:
    kwargs["num_slices"] = num_slices
  try:
    devices = topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices
  except Exception as e:  # pylint: disable=broad-except  # a name libtpu does not know
    raise CompileCheckError(f"libtpu cannot describe TPU topology {name!r}: {' '.join(str(e).split())[:300]}") from e
  return Target(name + (f" x {num_slices} slices" if num_slices > 1 else ""), chip, tuple(devices))


def local_target(chip: str = "") -> Target:
  """This host's devices (CPU tests; a GPU box compiling for itself)."""
  devices = tuple(jax.devices())
  spec = presets.CHIPS.get(chip) or presets.chip_for_device_kind(getattr(devices[0], "device_kind", ""))
  return Target("local", spec if devices[0].platform != "cpu" else None, devices)


# ----------------------------------------------------------------------------------------------
# Programs.


@dataclasses.dataclass
class Resident:
  """State that stays on a mesh's devices (a train state, frozen parameters): for the whole run, or only while the
  programs named in `programs` run (e.g. parameters a stage loads after training, for its sampler)."""
  name: str
  tree: Any  # ShapeDtypeStructs with shardings
  mesh: Any
  programs: tuple[str, ...] = ()  # the programs it is held for; (): every program on its mesh

  @property
  def bytes(self) -> float:
    return tree_bytes(self.tree)


@dataclasses.dataclass
class Program:
  """One jitted function of the run, ready to lower."""
  name: str
  lower: Callable[[], Any]  # -> jax.stages.Lowered
  mesh: Any
  takes: tuple[str, ...]  # the Residents passed as arguments (the others on its mesh stay in memory beside it)
  model_flops: float  # global model FLOPs of one call by the formula (6N + 12LHQT per trained token; 2N + ... forward)
  phase: str = ""  # gptrl/memory.py's phase of the run this program is the peak of ("": no estimate)


@dataclasses.dataclass
class Transfer:
  """Arrays copied between meshes (ppo.placement=split): not a program, their bytes."""
  name: str
  bytes_sent_per_device: float
  bytes_received_per_device: float


@dataclasses.dataclass
class Plan:
  """What a config runs on a target: its programs, the resident state, and the estimate to check against."""
  title: str
  programs: list[Program]
  residents: list[Resident]
  estimate: memory.Estimate | None = None
  transfers: list[Transfer] = dataclasses.field(default_factory=list)
  replicated: list[str] = dataclasses.field(default_factory=list)  # parameters the rules could not split


def tree_bytes(tree: Any) -> float:
  """Bytes one device holds of a tree of ShapeDtypeStructs (or arrays) carrying shardings: the largest shard."""
  total = 0.0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


def abstract_batch(shapes: dict[str, tuple[tuple[int, ...], np.dtype]], mesh: Any) -> dict[str, Any]:
  """ShapeDtypeStructs of a batch laid out as sharding.host_to_global lays it: rows over the data axes."""
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in shapes.items()}


def on_mesh(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def rows_for(rows: int, multiple: int) -> int:
  return -(-rows // multiple) * multiple


def replicated_parameters(boxed_abstract: Any, mesh: Any) -> list[str]:
  """Parameters the sharding rules meant to split over a mesh axis of size > 1 that had to be replicated
  instead (a dimension not divisible by it): 'name shape: dim d (logical) not split over axis'."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  specs = nn.get_partition_spec(boxed_abstract)
  found = []
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # pylint: disable=unnecessary-lambda-assignment
  flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]
  shapes = jax.tree_util.tree_flatten_with_path(memory.unbox(boxed_abstract))[0]
  for (path, spec), (_, x) in zip(flat_specs, shapes):
    wanted = nn.logical_to_mesh_axes(tuple(spec), sharding.RULES)
    got = sharding.logical_to_named_sharding(spec, x.shape, mesh).spec
    for d, (w, g) in enumerate(zip(wanted, tuple(got) + (None,) * (len(wanted) - len(got)))):
      axes = (w,) if isinstance(w, str) else tuple(w or ())
      if axes and g is None and math.prod(mesh.shape[a] for a in axes) > 1:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        found.append(f"{name} {tuple(x.shape)}: dim {d} ({spec[d]}, size {x.shape[d]}) not split over "
                     f"{'x'.join(axes)}={math.prod(mesh.shape[a] for a in axes)}")
  return found


def reward_model_meta(cfg: Any) -> dict[str, Any]:
  """PPO: the reward model checkpoint's meta (ensemble size, pooling, context)."""
  from gptrl import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  return ckpt_lib.read_checkpoint_meta(cfg.reward_model.checkpoint, cfg.reward_model.step)[0]


def _scores_with_rm(cfg: Any) -> bool:
  """The stage loads a reward model: the policy optimisers, and DPO when one scores its evals."""
  return cfg.stage in stages.POLICY_RL or (cfg.stage == "dpo" and bool(cfg.reward_model.checkpoint))


def _model_configs(cfg: Any) -> tuple[config_lib.ModelConfig, config_lib.ModelConfig | None, dict[str, Any]]:
  """(model, reward model or None, the reward model's meta) as the run builds them: from the init checkpoints
  when they exist, else from config.hardware.model_size (the plan's preset shape, the presets' vocabulary)."""
  try:
    model_cfg, rm_cfg = memory.model_configs(cfg)
    return model_cfg, rm_cfg, (reward_model_meta(cfg) if cfg.stage in stages.POLICY_RL else {})
  except Exception as e:  # pylint: disable=broad-except  # the checkpoints do not exist yet (before booking)
    size = cfg.hardware.model_size
    if not size:
      raise CompileCheckError(f"the model shape: {type(e).__name__}: {' '.join(str(e).split())[:300]}; set "
                              f"config.hardware.model_size (one of {list(presets.MODEL_SIZES)}) to compile the "
                              f"plan before its init checkpoints exist.") from e
    shape = config_lib.ModelConfig(**{**presets.model_shape(size), "vocab_size": presets.VOCAB_SIZE})
    model_cfg = cfg.model.apply(shape)
    logging.info("No init checkpoint to read the model from (%s); compiling the %s shape of config.hardware."
                 "model_size.", type(e).__name__, size)
    return model_cfg, (model_cfg if _scores_with_rm(cfg) else None), {}


def _lm_plan(cfg: Any, model_cfg: config_lib.ModelConfig, mesh: Any) -> Plan:
  """Pretraining and SFT."""
  from gptrl import data as data_lib  # pylint: disable=import-outside-toplevel
  from gptrl import losses, optim, trainer  # pylint: disable=import-outside-toplevel
  from gptrl import model as model_lib  # pylint: disable=import-outside-toplevel
  from gptrl.stages import recipe as recipe_lib  # pylint: disable=import-outside-toplevel
  model, t, b = model_lib.GPT(model_cfg), model_cfg.max_len, cfg.data.batch_size
  optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
  init = recipe_lib.init_params(model, t)
  state, shardings = trainer.abstract_train_state(init, optimizer, mesh)
  step = recipe_lib.make_train_step(cfg, losses.lm_loss_fn(model), optimizer, shardings, mesh)
  batch = abstract_batch(data_lib.lm_batch_shapes(b, t), mesh)
  per_token = model_lib.flops_per_token(model_cfg, t)
  eval_step = trainer.JittedStep(jax.jit(recipe_lib.lm_eval_step(model)), mesh)
  programs = [
      Program("train step", lambda: step.lower(state, batch), mesh, ("train state",), per_token * b * t, "train step"),
      Program("eval step", lambda: eval_step.lower(state.params, batch), mesh, ("train state/params",),
              per_token / 3 * b * t, "eval (whole batch, no micro-batches)"),
  ]
  prompts = memory.eval_sample_rows(cfg.sample)
  new = cfg.sample.max_new_tokens
  if prompts and new and new < t:
    rows = rows_for(prompts, sharding.data_parallel_size(mesh))
    programs.append(Program(
        "sampler", functools.partial(_lower_sampler, mesh, model, state.params, rows, t - new, new, cfg.sample),
        mesh, ("train state/params",), per_token / 3 * rows * t, "eval sampling"))
  return Plan(f"{cfg.stage}: {_shape(model_cfg)}", programs, [Resident("train state", state, mesh)],
              replicated=replicated_parameters(memory.abstract_params(init), mesh))


def _lower_sampler(mesh: Any, model: Any, params: Any, rows: int, prompt_len: int, new: int, sample: Any,
                   sampling_logprobs: bool = False, group_size: int = 1) -> Any:
  from gptrl import decoding  # pylint: disable=import-outside-toplevel
  with sharding.activate(mesh):
    return decoding.lower_generate(model, params, rows=rows, prompt_len=prompt_len, max_new_tokens=new,
                                   temperature=sample.temperature, top_k=sample.top_k,
                                   top_p=getattr(sample, "top_p", 1.0), sampling_logprobs=sampling_logprobs,
                                   group_size=group_size)


def _reward_plan(cfg: Any, model_cfg: config_lib.ModelConfig, mesh: Any) -> Plan:
  from gptrl import chat_data, optim, reward_model, trainer  # pylint: disable=import-outside-toplevel
  from gptrl import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from gptrl import model as model_lib  # pylint: disable=import-outside-toplevel
  from gptrl.stages import recipe as recipe_lib  # pylint: disable=import-outside-toplevel
  from gptrl.stages import reward as reward_lib  # pylint: disable=import-outside-toplevel
  members, k, b = cfg.reward.ensemble, cfg.data.max_responses, cfg.data.batch_size
  seq_len = min(cfg.data.max_len or model_cfg.max_len, model_cfg.max_len)
  model = reward_model.make_reward_model(model_cfg, members, head_init_std=cfg.reward.head_init_std,
                                         pooling=cfg.reward.pooling)
  optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps, members=members)
  init = recipe_lib.init_params(model, seq_len)
  state, shardings = trainer.abstract_train_state(init, optimizer, mesh)
  step = recipe_lib.make_train_step(cfg, reward_lib.reward_loss_fn(model, cfg.reward.margin_scale), optimizer,
                                    shardings, mesh, members=members)
  batch = abstract_batch(chat_data.reward_batch_shapes(b, k, seq_len, members), mesh)
  eval_batch = abstract_batch(chat_data.reward_batch_shapes(b, k, seq_len), mesh)
  eval_step = trainer.JittedStep(jax.jit(reward_lib.reward_eval_step(model, cfg.reward.margin_scale)), mesh)
  per_token = model_lib.flops_per_token(model_cfg, seq_len, lm_head=False)
  programs = [
      Program("train step", lambda: step.lower(state, batch), mesh, ("train state",), per_token * b * k * seq_len *
              members, "train step"),
      Program("eval step", lambda: eval_step.lower(state.params, eval_batch), mesh, ("train state/params",),
              per_token / 3 * b * k * seq_len * members, "eval (whole batch)")]
  residents = [Resident("train state", state, mesh)]
  if cfg.reward.normalize_samples:  # after training the SFT model is loaded and samples, beside the train state
    policy = model_lib.GPT(model_cfg)
    abstract, policy_shardings = ckpt_lib.param_shardings(policy, np.zeros((1, model_cfg.max_len), np.int32), mesh)
    sft = on_mesh(abstract, policy_shardings)
    sampler = "sampler (reward normalisation)"
    residents.append(Resident("SFT parameters", sft, mesh, programs=(sampler,)))
    new = cfg.reward.normalize_max_new_tokens
    rows = rows_for(cfg.reward.normalize_samples, sharding.data_parallel_size(mesh))
    programs.append(Program(
        sampler,
        functools.partial(_lower_sampler, mesh, policy, sft, rows, seq_len - new, new,
                          config_lib.ChatSampleConfig(temperature=1.0, top_k=0)),
        mesh, ("SFT parameters",), model_lib.flops_per_token(model_cfg, seq_len) / 3 * rows * seq_len,
        "reward normalisation (SFT model samples)"))
  return Plan(f"reward: {_shape(model_cfg)}" + (f", ensemble of {members}" if members > 1 else ""), programs,
              residents, replicated=replicated_parameters(memory.abstract_params(init), mesh))


def _dpo_plan(cfg: Any, model_cfg: config_lib.ModelConfig, rm_cfg: config_lib.ModelConfig | None, mesh: Any) -> Plan:
  """DPO: its train and eval steps over comparison batches (with the cached reference log-probs); with a reward
  model, the generation eval's sampler beside the frozen reference and reward model it loads."""
  from gptrl import chat_data, optim, reward_model, trainer  # pylint: disable=import-outside-toplevel
  from gptrl import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from gptrl import model as model_lib  # pylint: disable=import-outside-toplevel
  from gptrl.stages import dpo  # pylint: disable=import-outside-toplevel
  from gptrl.stages import recipe as recipe_lib  # pylint: disable=import-outside-toplevel
  k, b = cfg.data.max_responses, cfg.data.batch_size
  seq_len = min(cfg.data.max_len or model_cfg.max_len, model_cfg.max_len)
  model = model_lib.GPT(model_cfg)
  optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
  init = recipe_lib.init_params(model, seq_len)
  state, shardings = trainer.abstract_train_state(init, optimizer, mesh)
  loss_fn = dpo.dpo_loss_fn(model, cfg.dpo)
  step = recipe_lib.make_train_step(cfg, loss_fn, optimizer, shardings, mesh)
  shapes = {**chat_data.reward_batch_shapes(b, k, seq_len), "ref_logp": ((b, k), np.dtype(np.float32))}
  batch = abstract_batch(shapes, mesh)
  eval_step = trainer.JittedStep(jax.jit(lambda params, batch: loss_fn(params, batch, None)), mesh)
  per_token = model_lib.flops_per_token(model_cfg, seq_len)
  programs = [
      Program("train step", lambda: step.lower(state, batch), mesh, ("train state",), per_token * b * k * seq_len,
              "train step"),
      Program("eval step", lambda: eval_step.lower(state.params, batch), mesh, ("train state/params",),
              per_token / 3 * b * k * seq_len, "eval (whole batch)")]
  residents = [Resident("train state", state, mesh)]
  if rm_cfg is not None and cfg.dpo.num_eval_prompts:  # the generation eval: reference and RM stay loaded
    example = np.zeros((1, model_cfg.max_len), np.int32)
    residents.append(Resident("reference policy", on_mesh(*ckpt_lib.param_shardings(model, example, mesh)), mesh))
    residents.append(Resident("reward model", on_mesh(*ckpt_lib.param_shardings(
        reward_model.make_reward_model(rm_cfg, 1), example, mesh)), mesh))
    new, t = cfg.dpo.max_new_tokens, model_cfg.max_len
    rows = rows_for(min(cfg.dpo.eval_batch_size, cfg.dpo.num_eval_prompts), sharding.data_parallel_size(mesh))
    programs.append(Program(
        "sampler (generation eval)",
        functools.partial(_lower_sampler, mesh, model, state.params, rows, t - new, new,
                          config_lib.ChatSampleConfig(temperature=cfg.dpo.temperature, top_k=0), True),
        mesh, ("train state/params",), model_lib.flops_per_token(model_cfg, t) / 3 * rows * t, "generation eval"))
  return Plan(f"dpo: {_shape(model_cfg)}", programs, residents,
              replicated=replicated_parameters(memory.abstract_params(init), mesh))


def _ppo_plan(cfg: Any, model_cfg: config_lib.ModelConfig, rm_cfg: config_lib.ModelConfig, rm_meta: dict[str, Any],
              devices: tuple[Any, ...]) -> Plan:
  from gptrl import optim, trainer  # pylint: disable=import-outside-toplevel
  from gptrl import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from gptrl import model as model_lib  # pylint: disable=import-outside-toplevel
  from gptrl.stages import ppo  # pylint: disable=import-outside-toplevel
  p = cfg.algo
  placement = ppo.make_placement(cfg.mesh, p, list(devices))
  learner, sampler, scorer = placement.learner, placement.sampler, placement.scorer
  models = ppo.make_models(model_cfg, rm_cfg, p, ensemble=int(rm_meta.get("ensemble", 1)),
                           pooling=rm_meta.get("pooling", "last"), reward_context=int(rm_meta.get("context", 0)),
                           end_id=1)
  optimizer = optim.make_optimizer(cfg.optim, ppo.num_updates(cfg))
  init = functools.partial(ppo.init_params, models)
  state, shardings = trainer.abstract_train_state(init, optimizer, learner)
  example = np.zeros((1, model_cfg.max_len), np.int32)
  ref = on_mesh(*ckpt_lib.param_shardings(models.policy, example, scorer))
  rm = on_mesh(*ckpt_lib.param_shardings(models.reward, example, scorer))
  residents = [Resident("train state", state, learner), Resident("reference policy", ref, scorer),
               Resident("reward model", rm, scorer)]
  policy_on_sampler = state.params["policy"]
  transfers = []
  if placement.split_sampler:
    policy_on_sampler = on_mesh(*ckpt_lib.param_shardings(models.policy, example, sampler))
    residents.append(Resident("policy copy", policy_on_sampler, sampler))
    transfers.append(Transfer("policy parameters, learner -> sampler (after every update phase)",
                              tree_bytes(state.params["policy"]), tree_bytes(policy_on_sampler)))

  # The rollout: R prompts (padded to the data-parallel sizes) of P tokens, N new ones.
  sampled = max(p.rollout_batch_size, p.eval_batch_size)  # replies sampled (and scored) together
  multiple = int(np.lcm(sharding.data_parallel_size(learner), sharding.data_parallel_size(scorer)))
  rows = rows_for(sampled, multiple)

  def batches(n):  # the rollout buffer of n rows, abstract on the scorer's and the learner's mesh
    host = ppo.build_rollout_batch([[1]] * n, [[1]] * n, prompt_len=models.prompt_len,
                                   new_tokens=models.new_tokens, pad_id=0, stop_id=1)
    host["group"] = np.arange(n, dtype=np.int32) // p.group_size
    host["sampler_logp"] = np.zeros(host["response_mask"].shape, np.float32)  # as Learner.rollout adds them
    if p.reward_fns:
      host["code_reward"] = np.zeros((n,), np.float32)
    shapes = {k: (v.shape, v.dtype) for k, v in host.items()}
    return abstract_batch(shapes, scorer), abstract_batch(shapes, learner)

  scorer_fn = ppo.make_score_fn(models, cfg, 0.0)
  scorer_batch, learner_batch = batches(rows)
  def frozen_on_learner_of(batch):  # the frozen models' outputs, as they arrive on the learner's mesh
    with sharding.activate(scorer):
      out = jax.eval_shape(scorer_fn.frozen, ref, rm, batch)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(learner, v.ndim))
            for k, v in out.items()}

  frozen_on_learner = frozen_on_learner_of(scorer_batch)
  beta = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(learner))
  update = ppo.make_update_step(cfg, models, optimizer, shardings, learner)
  minibatch = abstract_batch(ppo.minibatch_shapes(cfg, models, model_cfg.max_len), learner)

  def lower_in(mesh, fn, *args, **kwargs):
    with sharding.activate(mesh):
      return fn.lower(*args, **kwargs)

  t = model_cfg.max_len
  policy_token = model_lib.flops_per_token(model_cfg, t)
  scalar_token = model_lib.flops_per_token(model_cfg, t, lm_head=False)
  rm_token = model_lib.flops_per_token(rm_cfg, t, lm_head=False)
  critic_token = 0.0 if models.shared or models.critic is None else scalar_token
  sampler_rows = rows_for(sampled, sharding.data_parallel_size(sampler))
  update_flops = (policy_token + critic_token) * p.minibatch_size * t
  learn_group = ppo.learn_group_size(cfg, models, learner)
  if learn_group > 1:
    # Each group's prompt read once (critic-free): its P-1 tokens through every layer but the last, of which only
    # the keys and values are read; every row's N-token span through all, projected onto the vocabulary.
    layer_token = scalar_token / model_cfg.num_layers
    kv_token = 6.0 * 2 * model_cfg.d_model * model_cfg.kv_heads * model_cfg.head_dim
    prefix_tokens = p.minibatch_size // learn_group * (models.prompt_len - 1)
    span_tokens = p.minibatch_size * models.new_tokens
    update_flops = (prefix_tokens * ((model_cfg.num_layers - 1) * layer_token + kv_token)
                    + span_tokens * (scalar_token + 6.0 * model_cfg.vocab_size * model_cfg.d_model))
  if p.ptx_coef > 0:
    update_flops += policy_token * p.minibatch_size * t
  scoring = "scoring (policy, reference, critic, reward model over the rollout)"
  programs = [
      Program("rollout sampler", functools.partial(_lower_sampler, sampler, models.policy, policy_on_sampler,
                                                   sampler_rows, models.prompt_len, models.new_tokens,
                                                   config_lib.ChatSampleConfig(temperature=p.temperature, top_k=p.top_k,
                                                                               top_p=p.top_p), True),
              sampler, ("policy copy",) if placement.split_sampler else ("train state/params/policy",),
              policy_token / 3 * sampler_rows * t, "rollout sampling"),
      Program("scoring: frozen models", lambda: lower_in(scorer, scorer_fn.frozen, ref, rm, scorer_batch), scorer,
              ("reference policy", "reward model"), (policy_token + rm_token) / 3 * rows * t, scoring),
      Program("scoring: shaping", lambda: lower_in(learner, scorer_fn.shaping, state.params, frozen_on_learner,
                                                   learner_batch, beta), learner,
              ("train state/params",), (policy_token + critic_token) / 3 * rows * t, scoring),
  ]
  # The programs above are the eval's (every row read whole; the larger), which the memory estimate sizes. GRPO's
  # and RLOO's rollouts read each prompt once per group (Learner.rollout, Learner.score): those programs too.
  r, g = p.rollout_batch_size, p.group_size
  if decoding.groups_fit(r, g, sharding.data_parallel_size(sampler)):
    programs.append(Program(f"rollout sampler (groups of {g})", functools.partial(
        _lower_sampler, sampler, models.policy, policy_on_sampler, r, models.prompt_len, models.new_tokens,
        config_lib.ChatSampleConfig(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p), True, g),
        sampler, ("policy copy",) if placement.split_sampler else ("train state/params/policy",),
        policy_token / 3 * r * t))
  if ppo.score_group_size(cfg, models, learner, r, multiple) == g > 1:
    grouped_scorer, grouped_learner = batches(r)
    programs += [
        Program(f"scoring: frozen models (groups of {g})",
                lambda: lower_in(scorer, scorer_fn.frozen, ref, rm, grouped_scorer, group_size=g), scorer,
                ("reference policy", "reward model"), (policy_token + rm_token) / 3 * r * t),
        Program(f"scoring: shaping (groups of {g})",
                lambda: lower_in(learner, scorer_fn.shaping, state.params, frozen_on_learner_of(grouped_scorer),
                                 grouped_learner, beta, group_size=g), learner, ("train state/params",),
                (policy_token + critic_token) / 3 * r * t)]
  programs.append(Program(f"{cfg.stage.upper()} update", lambda: update.lower(state, minibatch), learner,
                          ("train state",), update_flops, "train step"))
  title = (f"{cfg.stage}: policy {_shape(model_cfg)}; critic {p.critic}; reward model {_shape(rm_cfg)}"
           + (f"; split placement: learner {learner.size}, sampler {sampler.size}, scorer {scorer.size} devices"
              if p.placement == "split" else ""))
  return Plan(title, programs, residents, transfers=transfers,
              replicated=replicated_parameters(memory.abstract_params(init), learner))


def _shape(cfg: config_lib.ModelConfig) -> str:
  return (f"{cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.num_heads} heads, vocab {cfg.vocab_size}, "
          f"context {cfg.max_len}, {cfg.dtype}, remat {cfg.remat}")


def build_plan(cfg: Any, devices: tuple[Any, ...]) -> Plan:
  """The programs `cfg` runs over `devices` (a topology's, or real ones), with their abstract arguments."""
  if cfg.stage not in ("pretrain", "sft", "reward", "dpo") + stages.POLICY_RL:
    raise CompileCheckError(f"config.stage {cfg.stage!r}: the compile check covers pretrain, sft, reward, dpo, "
                            f"{', '.join(stages.POLICY_RL)}")
  model_cfg, rm_cfg, rm_meta = _model_configs(cfg)
  if cfg.stage in stages.POLICY_RL:
    plan = _ppo_plan(cfg, model_cfg, rm_cfg or model_cfg, rm_meta, devices)
    estimated = cfg.algo.placement == "colocated"  # the estimate is of every model on one mesh
  else:
    mesh = sharding.make_mesh(cfg.mesh, list(devices), whole=True)
    if cfg.stage == "dpo":
      plan = _dpo_plan(cfg, model_cfg, rm_cfg, mesh)
    elif cfg.stage in ("pretrain", "sft"):
      plan = _lm_plan(cfg, model_cfg, mesh)
    else:
      plan = _reward_plan(cfg, model_cfg, mesh)
    estimated = stages.get(cfg.stage).memory_estimate  # (DPO has no estimate of its own yet)
  if estimated:
    mesh_shape = dict(zip(sharding.MESH_AXES, sharding.resolve_mesh_shape(cfg.mesh, len(devices))))
    chip = presets.chip_for_device_kind(getattr(devices[0], "device_kind", ""))  # the devices', not the config's
    plan.estimate = memory.estimate(cfg, mesh_shape, model_cfg, rm_cfg, chip)
  return plan


# ----------------------------------------------------------------------------------------------
# Compiling and reading the results.


@dataclasses.dataclass
class Result:
  """One program compiled: bytes and seconds per device."""
  name: str
  compile_s: float
  arguments: float
  outputs: float
  aliased: float
  temporaries: float
  code: float
  beside: float  # resident state on its devices that the program does not take
  hbm: float | None
  estimate: float | None  # gptrl/memory.py: resident + this program's phase
  model_flops: float  # per device, by the formula
  xla_flops: float  # cost_analysis()["flops"] (a loop's body counted once)
  matmul_flops: float  # gptrl/hlo.py: every dot/convolution, loops by their trip counts
  bytes_accessed: float
  xla_optimal_seconds: float | None
  projected_seconds: float | None
  collectives: dict[str, dict[str, float]]
  unknown_loops: list[str]
  peak_flops: float | None  # the chip's dense bf16 FLOP/s
  # Compiled again with XLA's scheduler told to save memory (LEAST_MEMORY; `check(least=...)`): its temporaries
  # and matmul flops. Where HBM is free XLA keeps more alive for speed (e.g. recomputes remat'd blocks early);
  # pressed, it shows what the program needs, at the recompute it adds.
  least_temporaries: float | None = None
  least_matmul_flops: float | None = None

  @property
  def total(self) -> float:
    """What the devices hold while the program runs: its buffers, its code, and the resident state beside it."""
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code + self.beside

  @property
  def least_total(self) -> float | None:
    """`total` with the fewer temporaries of the two compiles: the memory-saving one's, unless the default
    schedule needs less (3b pretraining on v5p: 9.00 GB of temporaries by default, 9.65 pressed)."""
    if self.least_temporaries is None:
      return None
    return self.total - self.temporaries + min(self.temporaries, self.least_temporaries)

  @property
  def estimate_ratio(self) -> float | None:
    """The estimate over XLA's total: the memory-saving compile's where there is one (what the program needs)."""
    total = self.least_total or self.total
    return None if self.estimate is None or not total else self.estimate / total

  @property
  def fits(self) -> bool | None:
    return None if not self.hbm else self.total <= self.hbm

  @property
  def compute_mfu(self) -> float | None:
    """The MFU if every matmul ran at peak and nothing else took time: model flops over compiled flops."""
    return self.model_flops / self.matmul_flops if self.matmul_flops and self.model_flops else None

  @property
  def projected_mfu(self) -> float | None:
    """The MFU of the roofline time (`projected_seconds`): a lower bound."""
    if not self.projected_seconds or not self.peak_flops:
      return None
    return self.model_flops / self.projected_seconds / self.peak_flops


# XLA TPU's scheduler keeps its live memory under this share of HBM (95 by default): at 1 it orders the program
# for the least memory it can, recomputing some values instead of keeping them.
LEAST_MEMORY = {"xla_tpu_scheduler_percent_shared_memory_limit": 1}


def beside_bytes(program: Program, plan: Plan) -> float:
  """The resident state on the program's devices while it runs, less what it takes as arguments: a resident by
  name, or a part of one by path (e.g. "train state/params": the optimizer state stays beside it)."""
  here = {r.name: r for r in plan.residents
          if r.mesh is program.mesh and (not r.programs or program.name in r.programs)}
  taken = 0.0
  for path in program.takes:
    name, *keys = path.split("/")
    part = here[name].tree
    for key in keys:
      part = part[key] if isinstance(part, dict) else getattr(part, key)
    taken += tree_bytes(part)
  return sum(r.bytes for r in here.values()) - taken


def release_host_memory() -> None:
  """Returns what a finished compile freed to the OS: the compiler's heap otherwise stays with the process, and the
  next compile's peak comes on top of it (the 350m PPO plan for v4 by the einsum path: 21.6 GB of host memory and
  rising in its update's least-memory compile without this, stopped there; 17.9 GB at most with it)."""
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages mapped
  except (OSError, AttributeError):  # not glibc
    pass


def compile_program(program: Program, plan: Plan, chip: presets.Chip | None, least: bool = False) -> Result:
  """Lowers and compiles one program; reads XLA's memory and cost analyses and the optimised HLO. With `least`
  (on TPU devices), compiles it a second time under LEAST_MEMORY and records that compile's memory and flops."""
  t0 = time.perf_counter()
  lowered = program.lower()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, list):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  profile = hlo.profile(compiled.as_text())
  del compiled  # (read what it tells: its host memory is not held through the least-memory compile below)
  release_host_memory()
  least_temporaries = least_flops = None
  if least and program.mesh.devices.flat[0].platform == "tpu":  # the option is libtpu's
    pressed = lowered.compile(compiler_options=LEAST_MEMORY)
    least_temporaries = float(pressed.memory_analysis().temp_size_in_bytes)
    least_flops = hlo.profile(pressed.as_text()).matmul_flops
    del pressed
    release_host_memory()
  beside = beside_bytes(program, plan)
  estimate = None
  if plan.estimate is not None and program.phase in plan.estimate.phases:
    estimate = plan.estimate.persistent_bytes + plan.estimate.phase_bytes(program.phase)
  projected = None
  if chip is not None and chip.hbm_gbps and chip.link_gbps:
    projected = max(profile.matmul_flops / (chip.bf16_tflops * 1e12), profile.bytes_accessed / (chip.hbm_gbps * 1e9),
                    profile.collective_bytes / (chip.link_gbps * 1e9))
  optimal = cost.get("optimal_seconds")
  return Result(
      name=program.name, compile_s=compile_s, arguments=float(mem.argument_size_in_bytes),
      outputs=float(mem.output_size_in_bytes), aliased=float(mem.alias_size_in_bytes),
      temporaries=float(mem.temp_size_in_bytes), code=float(mem.generated_code_size_in_bytes), beside=float(beside),
      hbm=chip.hbm_gib * GIB if chip is not None else None, estimate=estimate,
      model_flops=program.model_flops / program.mesh.size, xla_flops=float(cost.get("flops", 0.0)),
      matmul_flops=profile.matmul_flops, bytes_accessed=profile.bytes_accessed,
      xla_optimal_seconds=float(optimal) if optimal is not None and optimal > 0 else None,
      projected_seconds=projected,
      collectives={k: {"count": c.count, "bytes": c.bytes} for k, c in profile.collectives.items() if c.count},
      unknown_loops=profile.unknown_loops, peak_flops=chip.bf16_tflops * 1e12 if chip is not None else None,
      least_temporaries=least_temporaries, least_matmul_flops=least_flops)


def _gib(x: float | None) -> str:
  return "-" if x is None else f"{x / GIB:.2f}"


def table(plan: Plan, results: list[Result], target: Target) -> str:
  """The results as text: memory, flops, projected time and MFU, collectives; then transfers and warnings."""
  chip = target.chip
  lines = [f"{plan.title}", f"on {target.name}: {len(target.devices)} devices"
           + (f" ({chip.name}, {chip.hbm_gib:g} GiB HBM, {chip.bf16_tflops:g} bf16 TFLOP/s each)" if chip else "")]
  head = (f"{'program':<32}{'args':>8}{'temp':>8}{'out-al':>8}{'code':>7}{'beside':>8}{'total':>8}{'HBM':>7}"
          f"{'estim.':>8}{'est/xla':>8}{'flops/formula':>14}{'roofline ms':>12}{'MFU from-to':>12}{'compile s':>10}")
  lines += ["per device, GiB", head]
  for r in results:
    ratio = "-" if r.estimate_ratio is None else f"{r.estimate_ratio:.2f}"
    flops = "-" if not r.model_flops else f"{r.matmul_flops / r.model_flops:.2f}"
    mfu = "-" if r.compute_mfu is None else f"<={100 * r.compute_mfu:.0f}%"
    if r.compute_mfu is not None and r.projected_mfu:
      mfu = f"{100 * r.projected_mfu:.0f}-{100 * r.compute_mfu:.0f}%"
    ms = "-" if r.projected_seconds is None else f"{1e3 * r.projected_seconds:.1f}"
    lines.append(f"{r.name:<32}{_gib(r.arguments):>8}{_gib(r.temporaries):>8}{_gib(r.outputs - r.aliased):>8}"
                 f"{_gib(r.code):>7}{_gib(r.beside):>8}{_gib(r.total):>8}{_gib(r.hbm):>7}{_gib(r.estimate):>8}"
                 f"{ratio:>8}{flops:>14}{ms:>12}{mfu:>12}{r.compile_s:>10.1f}")
  for r in results:
    if r.least_temporaries is not None:
      lines.append(f"{r.name}, compiled for the least memory: temp {_gib(r.least_temporaries)}, total "
                   f"{_gib(r.least_total)} GiB (est/xla above is against this), at "
                   f"{r.least_matmul_flops / r.matmul_flops:.2f}x the matmul flops")
  lines.append("collectives per step (count, GiB per device):")
  for r in results:
    parts = [f"{k} {v['count']:.0f}x {v['bytes'] / GIB:.2f}" for k, v in r.collectives.items()]
    lines.append(f"  {r.name:<32}{'; '.join(parts) or 'none'}")
  for t in plan.transfers:
    lines.append(f"transfer: {t.name}: {_gib(t.bytes_sent_per_device)} GiB out of each learner device, "
                 f"{_gib(t.bytes_received_per_device)} GiB into each sampler device")
  for r in results:
    if r.unknown_loops:
      lines.append(f"note: {r.name}: {len(r.unknown_loops)} loops of unknown trip count, counted once")
  if plan.replicated:
    lines.append(f"replicated against the sharding rules ({len(plan.replicated)}):")
    lines += [f"  {x}" for x in plan.replicated[:20]]
  else:
    lines.append("every parameter split as the sharding rules say")
  return "\n".join(lines)


def to_json(plan: Plan, results: list[Result], target: Target, config: str,
            overrides: Sequence[str] = ()) -> dict[str, Any]:
  return {"config": config, "overrides": list(overrides), "title": plan.title, "topology": target.name,
          "devices": len(target.devices), "chip": target.chip.name if target.chip else None,
          "programs": [{**dataclasses.asdict(r),
                        "total": r.total, "fits": r.fits, "projected_mfu": r.projected_mfu,
                        "least_total": r.least_total, "estimate_ratio": r.estimate_ratio,
                        "compute_mfu": r.compute_mfu} for r in results],
          "transfers": [dataclasses.asdict(t) for t in plan.transfers], "replicated": plan.replicated}


def check(cfg: Any, target: Target, *, programs: tuple[str, ...] = (), least: tuple[str, ...] = (),
          progress: Callable[[str], None] = print) -> tuple[Plan, list[Result]]:
  """Compiles the plan's programs (those whose names start with one of `programs`, default all) for `target`;
  those whose names start with one of `least` also for the least memory (`compile_program`).

  Raises:
    CompileCheckError: a program does not fit the chip's HBM (the message names it and the bytes), or XLA
      refused to compile it.
  """
  plan = build_plan(cfg, target.devices)
  chosen = [p for p in plan.programs if not programs or any(p.name.startswith(x) for x in programs)]
  results = []
  for program in chosen:
    progress(f"compiling {program.name} for {target.name} ...")
    try:
      results.append(compile_program(program, plan, target.chip,
                                     least=any(program.name.startswith(x) for x in least)))
    except Exception as e:  # pylint: disable=broad-except  # XLA's errors (e.g. out of memory) are long
      text = " ".join(str(e).split())
      if "RESOURCE_EXHAUSTED" in text and target.chip is not None:  # XLA itself found it cannot fit
        raise CompileCheckError(f"{program.name} does not fit {target.chip.name}'s {target.chip.hbm_gib:g} GiB per "
                                f"device on {target.name}: XLA: {text[text.index('RESOURCE_EXHAUSTED'):][:300]}. "
                                f"{_ADVICE}") from e
      raise CompileCheckError(f"{program.name} does not compile for {target.name}: {text[:600]}") from e
  misfits = [r for r in results if r.fits is False]
  if misfits:
    r = misfits[0]
    raise CompileCheckError(
        f"{r.name} does not fit {target.chip.name}'s {r.hbm / GIB:.1f} GiB per device: XLA needs "
        f"{r.total / GIB:.2f} GiB ({r.arguments / GIB:.2f} arguments + {r.temporaries / GIB:.2f} temporaries + "
        f"{(r.outputs - r.aliased) / GIB:.2f} outputs not donated + {r.code / GIB:.2f} code + {r.beside / GIB:.2f} "
        f"resident beside it). {_ADVICE}")
  return plan, results


_ADVICE = ("Use smaller micro-batches (optim.grad_accum_steps), shard more (mesh.fsdp / mesh.tensor), set "
           "model.remat='block', or use more or larger chips.")


# ----------------------------------------------------------------------------------------------
# The command.


def main(argv: list[str] | None = None) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from gptrl import launch  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("topology", "", "TPU slice to compile for, e.g. v5p:2x4x4 (default: config.hardware's chip "
                      "and num_chips); 'local': this host's devices")
  flags.DEFINE_integer("num_slices", 1, "slices of the topology (a multi-slice job)")
  flags.DEFINE_string("json", "", "write the results here as JSON")
  flags.DEFINE_list("programs", [], "compile only the programs whose names start with these")
  flags.DEFINE_list("least_memory", [], "compile these programs (names start with) a second time with XLA's "
                    "scheduler saving memory: what they need, against which the memory estimate is checked")
  argv = sys.argv if argv is None else argv
  if "--help" in argv or "-h" in argv:
    print(__doc__)
    print("Flags: --config FILE[:variant] [--config.a.b=value ...] --topology NAME (or 'local') --num_slices N "
          "--json FILE --programs NAME,... --least_memory NAME,...")
    return
  cfg = launch.parse(argv)
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", force=True)
  f = flags.FLAGS
  config_arg = next((a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv)
                     if a == "--config" or a.startswith("--config=")), "")
  try:
    if f.topology == "local":
      target = local_target(cfg.hardware.chip)
    else:
      name = f.topology
      if not name:
        if not cfg.hardware.chip or not cfg.hardware.num_chips:
          raise CompileCheckError("no topology: give --topology (e.g. v5p:2x4x4) or set config.hardware.chip and "
                                  "config.hardware.num_chips")
        name = presets.topology_name(cfg.hardware.chip, cfg.hardware.num_chips)
      target = tpu_topology(name, f.num_slices)
    plan, results = check(cfg, target, programs=tuple(f.programs), least=tuple(f.least_memory),
                          progress=lambda m: print(m, file=sys.stderr, flush=True))
  except (CompileCheckError, config_lib.ConfigError, ValueError) as e:
    print(f"gptrl.compile: {e}", file=sys.stderr)
    sys.exit(1)
  print(table(plan, results, target))
  if f.json:
    os.makedirs(os.path.dirname(os.path.abspath(f.json)), exist_ok=True)
    with open(f.json, "w", encoding="utf-8") as fh:
      overrides = [a for a in argv if a.startswith("--config.")]  # (the plan compiled: the file's and these)
      json.dump(to_json(plan, results, target, config_arg, overrides), fh, indent=1)
    print(f"wrote {f.json}")


if __name__ == "__main__":
  main()
