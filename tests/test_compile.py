"""gptrl/compile.py: the programs of each stage compiled for a real TPU slice (v5e:2x2, compile-only devices from
libtpu on this CPU host), checked against independent figures: the bytes of the arguments against the sharded
state's own shard shapes, the flops against the model-FLOPs formula, the collectives an fsdp mesh must issue;
a plan too large is refused naming the program and the bytes. The configs' own plans at full size compile in
minutes each: `tests/test_compile.py::test_every_tpu_plan_compiles_and_fits` is marked slow."""
import dataclasses
import importlib.util
import json
import os
import runpy
import subprocess
import sys

import jax
from jax.experimental.compilation_cache import compilation_cache as cache
import numpy as np
import pytest

from gptrl import compile as compile_lib
from gptrl import config as config_lib
from gptrl import hlo
from gptrl import memory
from gptrl import presets
from gptrl import stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="compiling for a TPU needs libtpu (the test extras install it)")
TINY = config_lib.ModelConfig(vocab_size=512, num_layers=2, num_heads=4, d_model=128, max_len=256, dtype="bfloat16",
                              remat="block")


def tiny_pretrain(**changes) -> config_lib.PretrainConfig:
  return dataclasses.replace(config_lib.PretrainConfig(
      model=TINY, mesh=config_lib.MeshConfig(data=1, fsdp=-1, tensor=1),
      data=config_lib.DataConfig(batch_size=16), optim=config_lib.OptimConfig(grad_accum_steps=2),
      sample=config_lib.SampleConfig(max_new_tokens=32),
      hardware=config_lib.HardwareConfig(chip="v5e", num_chips=4)), **changes)


@pytest.fixture(scope="module")
def v5e():
  return compile_lib.tpu_topology("v5e:2x2")


@pytest.fixture(scope="module", autouse=True)
def _no_persistent_compilation_cache():
  """libtpu's compile-only client writes its executables into the persistent cache that conftest.py gives the run
  but cannot load them back (JAX warns and compiles again): the TPU compiles here go without it (_run_cli's too)."""
  was = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  cache.reset_cache()  # JAX decides once per process whether to use the cache: decide again
  yield
  jax.config.update("jax_enable_compilation_cache", was)
  cache.reset_cache()


@needs_libtpu
def test_a_mesh_axis_that_is_no_product_of_whole_torus_axes_splits_one_and_keeps_neighbours_together():
  # The 3b plan on v5p:4x4x4: tensor=2, fsdp=32. JAX's layout alone refuses an axis of 2 on a 4x4x4 torus.
  from gptrl import sharding  # pylint: disable=import-outside-toplevel
  devices = compile_lib.tpu_topology("v5p:4x4x4").devices
  mesh = sharding.make_mesh(config_lib.MeshConfig(data=1, fsdp=-1, tensor=2), devices, whole=True)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 32, "tensor": 2}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
  for pair in mesh.devices.reshape(-1, 2):  # each tensor pair: torus neighbours (one coordinate apart by 1)
    assert sorted(abs(a - b) for a, b in zip(pair[0].coords, pair[1].coords)) == [0, 0, 1]


@needs_libtpu
def test_topologies_are_whole_pods_one_device_per_chip():
  assert len(compile_lib.tpu_topology("v5p:2x2x2").devices) == 8  # megacore: one device per chip, as runs see it
  assert len(compile_lib.tpu_topology("v4:2x2x1").devices) == 4
  # A multi-host slice and a two-slice job: the devices of every process (the global program is compiled).
  assert {d.process_index for d in compile_lib.tpu_topology("v5e:4x4").devices} == {0, 1, 2, 3}
  two = compile_lib.tpu_topology("v5e:2x2", num_slices=2)
  assert len(two.devices) == 8 and two.name == "v5e:2x2 x 2 slices"
  with pytest.raises(compile_lib.CompileCheckError, match="must be one of"):
    compile_lib.tpu_topology("h100:8")


@needs_libtpu
def test_pretrain_plan_compiles_for_a_v5e_slice(v5e):
  # Widths that fill the TPU's (8, 128) tiles once split 4 ways, so that XLA's bytes are the shards' own (XLA
  # pads a smaller dimension to its tile).
  cfg = tiny_pretrain(model=dataclasses.replace(TINY, d_model=1024, num_heads=8, vocab_size=1024))
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=32))
  plan, results = compile_lib.check(cfg, v5e, progress=lambda m: None)
  by_name = {r.name: r for r in results}
  assert list(by_name) == ["train step", "eval step", "sampler"]
  train, evaluation = by_name["train step"], by_name["eval step"]
  assert all(r.fits for r in results) and all(r.hbm == 16 * memory.GIB for r in results)
  # XLA's argument bytes are the sharded train state's shards (counted from the shardings) plus the batch's.
  state = compile_lib.tree_bytes(plan.residents[0].tree)
  batch = 32 * 256 * (4 + 4 + 4) / 4  # inputs, targets, weights; rows over 4 devices
  assert train.arguments == pytest.approx(state + batch, rel=0.01)
  assert train.beside == 0  # the train step takes the whole state
  params = compile_lib.tree_bytes(plan.residents[0].tree.params)
  assert evaluation.beside == pytest.approx(state - params)  # the optimizer state waits beside the eval step
  # Flops: the train step recomputes each block's forward (remat) on top of 6N + 12LHQT; eval is a forward.
  assert 1.0 <= train.matmul_flops / train.model_flops <= 1.5
  assert 0.7 <= evaluation.matmul_flops / evaluation.model_flops <= 1.1
  # fsdp over 4 chips: weights gathered (all-gather, or its collective-permute ring), gradients reduced.
  gathered = sum(train.collectives.get(k, {}).get("count", 0) for k in ("all-gather", "collective-permute"))
  reduced = sum(train.collectives.get(k, {}).get("count", 0) for k in ("reduce-scatter", "all-reduce"))
  assert gathered > 0 and reduced > 0
  assert not plan.replicated
  assert 0 < train.projected_mfu < 1
  text = compile_lib.table(plan, results, v5e)
  assert "train step" in text and "every parameter split as the sharding rules say" in text


@needs_libtpu
def test_fsdp_weights_are_gathered_whole_before_their_products():
  # 16-way fsdp (v6e:4x4): left to itself, XLA computed each product whose contracting axis fsdp splits as a
  # loop over the 16 shards ("windowed einsum": a collective permute of the next [D/16, N] slice and a partial
  # product added into the whole output per step), which rereads and rewrites the output up to 16 times (the
  # 125m pretraining plan: 630 GB of memory traffic per step, 226 GB with the weights gathered).
  target = compile_lib.tpu_topology("v6e:4x4")
  cfg = tiny_pretrain(model=dataclasses.replace(TINY, d_model=512, num_heads=8, vocab_size=8192, num_layers=1,
                                                max_len=512),
                      hardware=config_lib.HardwareConfig(chip="v6e", num_chips=16))
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=64),
                            optim=dataclasses.replace(cfg.optim, grad_accum_steps=1))
  train = compile_lib.build_plan(cfg, target.devices).programs[0]
  assert train.name == "train step"
  text = train.lower().compile().as_text()
  assert "windowed_dot_general" not in text
  profile = hlo.profile(text)
  reduced = profile.collectives["reduce-scatter"].count + profile.collectives["all-reduce"].count
  assert profile.collectives["all-gather"].count > 0 and reduced > 0


@needs_libtpu
def test_a_program_that_does_not_fit_is_refused_naming_it_and_the_bytes(v5e):
  small = dataclasses.replace(v5e, chip=dataclasses.replace(presets.CHIPS["v5e"], hbm_gib=0.001))
  with pytest.raises(compile_lib.CompileCheckError,
                     match=r"train step does not fit v5e's 0.0 GiB per device: XLA needs \d+\.\d+ GiB \("):
    compile_lib.check(tiny_pretrain(), small, programs=("train",), progress=lambda m: None)


def test_replicated_parameters_are_listed():
  mesh = memory.abstract_mesh({"data": 1, "fsdp": 2, "tensor": 2})
  odd = dataclasses.replace(TINY, vocab_size=511)
  params = memory.abstract_params(memory.init_fn("lm", odd))
  found = compile_lib.replicated_parameters(params, mesh)
  assert found and all("vocab" in x and "size 511" in x and "tensor=2" in x for x in found)
  assert not compile_lib.replicated_parameters(memory.abstract_params(memory.init_fn("lm", TINY)), mesh)


def _tiny_later_stage(monkeypatch, stage_cfg):
  """A stage after pretraining with the tiny shape, as if read from its init checkpoints."""
  monkeypatch.setattr(memory, "model_configs", lambda cfg: (cfg.model.apply(TINY),
                                                            cfg.model.apply(TINY) if cfg.stage in stages.POLICY_RL
                                                            else None))
  monkeypatch.setattr(compile_lib, "reward_model_meta", lambda cfg: {})
  return stage_cfg


@needs_libtpu
def test_reward_ensemble_plan_compiles(v5e, monkeypatch):
  cfg = _tiny_later_stage(monkeypatch, config_lib.RewardConfig(
      init=config_lib.InitConfig(checkpoint="runs/sft"),
      model=config_lib.ModelRuntimeConfig(dtype="bfloat16", remat="block"),
      mesh=config_lib.MeshConfig(data=1, fsdp=-1), data=config_lib.PreferenceDataConfig(batch_size=8, max_responses=4),
      reward=config_lib.RewardHeadConfig(ensemble=2, normalize_samples=8, normalize_max_new_tokens=32)))
  plan, results = compile_lib.check(cfg, v5e, progress=lambda m: None)
  assert [r.name for r in results] == ["train step", "eval step", "sampler (reward normalisation)"]
  train = results[0]
  # Two members' parameters and moments: twice one model's, to the byte.
  one = compile_lib.tree_bytes(compile_lib.build_plan(dataclasses.replace(
      cfg, reward=dataclasses.replace(cfg.reward, ensemble=1)), v5e.devices).residents[0].tree)
  assert compile_lib.tree_bytes(plan.residents[0].tree) == pytest.approx(2 * one, rel=0.01)
  assert 1.0 <= train.matmul_flops / train.model_flops <= 1.5
  # The SFT model is loaded after training (stages/reward.py make_normalizer): nothing waits beside the train step;
  # the optimizer state beside the eval step; the trained state and the SFT parameters beside the sampler.
  state, sft = (compile_lib.tree_bytes(r.tree) for r in plan.residents)
  params = compile_lib.tree_bytes(plan.residents[0].tree.params)
  assert [r.beside for r in results] == pytest.approx([0.0, state - params, state])
  assert results[2].arguments >= sft


@needs_libtpu
# split compiles the same four programs as colocated, and the transfer; colocated (~50 s) with -m slow.
@pytest.mark.parametrize("placement", [pytest.param("colocated", marks=pytest.mark.slow), "split"])
def test_ppo_plan_compiles(v5e, monkeypatch, placement):
  split = dict(placement="split", sampler_devices=1, scorer_devices=1, split_tensor=1) if placement == "split" else {}
  cfg = _tiny_later_stage(monkeypatch, config_lib.PPOConfig(
      init=config_lib.InitConfig(checkpoint="runs/sft"),
      reward_model=config_lib.RewardModelConfig(checkpoint="runs/reward"),
      model=config_lib.ModelRuntimeConfig(dtype="bfloat16", remat="block"),
      mesh=config_lib.MeshConfig(data=1, fsdp=-1),
      ppo=config_lib.PPOAlgoConfig(rollout_batch_size=16, minibatch_size=8, max_new_tokens=32, **split)))
  plan, results = compile_lib.check(cfg, v5e, progress=lambda m: None)
  names = [r.name for r in results]
  assert names == ["rollout sampler", "scoring: frozen models", "scoring: shaping", "PPO update"]
  assert all(r.fits for r in results)
  update = results[-1]
  assert 1.0 <= update.matmul_flops / update.model_flops <= 1.5
  if placement == "split":
    assert [t.name.split(",")[0] for t in plan.transfers] == ["policy parameters"]
    # The learner's 2 devices each send half the policy; the sampler's one device receives all of it.
    assert plan.transfers[0].bytes_received_per_device == pytest.approx(2 * plan.transfers[0].bytes_sent_per_device,
                                                                        rel=0.01)
    assert plan.estimate is None
  else:
    assert not plan.transfers and plan.estimate is not None


@needs_libtpu
def test_grpo_plan_compiles_without_a_critic(v5e, monkeypatch):
  cfg = _tiny_later_stage(monkeypatch, config_lib.GRPOConfig(
      init=config_lib.InitConfig(checkpoint="runs/sft"),
      reward_model=config_lib.RewardModelConfig(checkpoint="runs/reward"),
      model=config_lib.ModelRuntimeConfig(dtype="bfloat16", remat="block"),
      mesh=config_lib.MeshConfig(data=1, fsdp=-1),
      grpo=config_lib.GRPOAlgoConfig(rollout_batch_size=16, minibatch_size=16, group_size=4, max_new_tokens=32)))
  plan, results = compile_lib.check(cfg, v5e, progress=lambda m: None)
  assert [r.name for r in results][-1] == "GRPO update" and all(r.fits for r in results)
  # The rollout's programs that read each prompt once per group of 4 (4 groups: one per data-parallel shard).
  assert {"rollout sampler (groups of 4)", "scoring: frozen models (groups of 4)",
          "scoring: shaping (groups of 4)"} <= {r.name for r in results}
  assert set(plan.residents[0].tree.params) == {"policy"}  # no critic: the train state is the policy's
  assert 1.0 <= results[-1].matmul_flops / results[-1].model_flops <= 1.5
  assert plan.estimate is not None


@needs_libtpu
def test_dpo_plan_compiles_with_its_generation_eval(v5e, monkeypatch):
  monkeypatch.setattr(memory, "model_configs", lambda cfg: (cfg.model.apply(TINY), cfg.model.apply(TINY)))
  cfg = config_lib.DPOConfig(
      init=config_lib.InitConfig(checkpoint="runs/sft"),
      reward_model=config_lib.RewardModelConfig(checkpoint="runs/reward"),
      model=config_lib.ModelRuntimeConfig(dtype="bfloat16", remat="block"),
      mesh=config_lib.MeshConfig(data=1, fsdp=-1), data=config_lib.PreferenceDataConfig(batch_size=8, max_responses=2),
      dpo=config_lib.DPOAlgoConfig(num_eval_prompts=8, eval_batch_size=8, max_new_tokens=32))
  plan, results = compile_lib.check(cfg, v5e, progress=lambda m: None)
  assert [r.name for r in results] == ["train step", "eval step", "sampler (generation eval)"]
  assert all(r.fits for r in results)
  assert [r.name for r in plan.residents] == ["train state", "reference policy", "reward model"]
  # The LM head's logits over every compared reply: the model's flops, as the formula counts them.
  assert 1.0 <= results[0].matmul_flops / results[0].model_flops <= 1.5


def _write_config(tmp_path, batch: int, vocab: int = 32000, context: int = 2048) -> str:
  path = tmp_path / "tiny.py"
  path.write_text(f'''from gptrl import config as config_lib
def get_config(variant=""):
  c = config_lib.as_configdict(config_lib.PretrainConfig)
  c.model.update(dict(vocab_size={vocab}, num_layers=2, num_heads=4, d_model=128, max_len={context}, dtype="bfloat16",
                      remat="block"))
  c.mesh.data, c.mesh.fsdp = 1, -1
  c.data.batch_size = {batch}
  c.hardware.chip, c.hardware.num_chips = "v5e", 4
  return c
''')
  return str(path)


def _run_cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_ENABLE_COMPILATION_CACHE": "false"}  # (see above)
  return subprocess.run([sys.executable, "-m", "gptrl.compile", *args], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=600)


@needs_libtpu
def test_least_total_takes_the_fewer_temporaries_of_the_two_compiles():
  """The memory-saving compile is what the program needs, unless XLA's default schedule needed less (3b pretraining
  on v5p: 9.00 GB of temporaries by default, 9.65 pressed): the estimate is held against the smaller."""
  base = dict(name="train step", compile_s=1.0, arguments=10.0, outputs=4.0, aliased=4.0, temporaries=100.0,
              code=5.0, beside=1.0, hbm=None, estimate=120.0, model_flops=1.0, xla_flops=1.0, matmul_flops=1.0,
              bytes_accessed=1.0, xla_optimal_seconds=None, projected_seconds=None, collectives={},
              unknown_loops=[], peak_flops=None)
  assert compile_lib.Result(**base).total == 116.0
  pressed = compile_lib.Result(**base, least_temporaries=60.0)
  assert pressed.least_total == 76.0 and pressed.estimate_ratio == 120.0 / 76.0
  loose = compile_lib.Result(**base, least_temporaries=130.0)
  assert loose.least_total == 116.0 and loose.estimate_ratio == 120.0 / 116.0
  assert compile_lib.Result(**base).least_total is None


def test_cli_prints_the_table_and_writes_json(tmp_path):
  out = tmp_path / "plan.json"
  proc = _run_cli("--config", _write_config(tmp_path, 4, vocab=512, context=256), "--config.data.batch_size=8",
                  "--programs", "train,eval", "--least_memory", "train", "--json", str(out))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "train step" in proc.stdout and "eval step" in proc.stdout and "on v5e:2x2: 4 devices" in proc.stdout
  assert "train step, compiled for the least memory: temp" in proc.stdout
  report = json.loads(out.read_text())
  assert report["overrides"] == ["--config.data.batch_size=8"]  # the plan compiled: the file's, and these
  assert report["topology"] == "v5e:2x2" and [p["name"] for p in report["programs"]] == ["train step", "eval step"]
  assert all(p["fits"] for p in report["programs"])
  train, evaluation = report["programs"]
  # The train step compiled a second time with XLA's scheduler saving memory; the estimate is held against that.
  assert train["least_temporaries"] >= 0 and train["least_matmul_flops"] > 0  # (a tiny step may fit on-chip)
  assert train["least_total"] == pytest.approx(
      train["total"] - train["temporaries"] + min(train["temporaries"], train["least_temporaries"]))
  assert train["estimate_ratio"] == pytest.approx(train["estimate"] / train["least_total"])
  assert evaluation["least_total"] is None
  assert evaluation["estimate_ratio"] == pytest.approx(evaluation["estimate"] / evaluation["total"])


@needs_libtpu
def test_cli_refuses_a_plan_too_large_for_the_chip(tmp_path):
  # 512 rows of 2048 tokens with a 32k vocabulary: 128 rows per chip, whose logits alone need 16 GiB.
  proc = _run_cli("--config", _write_config(tmp_path, 512), "--programs", "train")
  assert proc.returncode == 1
  message = proc.stderr.strip().splitlines()[-1]
  assert message.startswith("gptrl.compile: train step does not fit v5e's 16 GiB per device on v5e:2x2: XLA: "
                            "RESOURCE_EXHAUSTED")
  assert "HBM" in message and "grad_accum_steps" in message


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("path,size", [(f"configs/{stage}_tpu.py", size) for stage in ("pretrain", "sft", "reward",
                                                                                        "ppo")
                                       for size in presets.MODEL_SIZES])
def test_every_tpu_plan_compiles_and_fits(path, size):
  cfg = config_lib.stage_config(runpy.run_path(os.path.join(ROOT, path))["get_config"](f"size={size}"))
  target = compile_lib.tpu_topology(presets.topology_name(cfg.hardware.chip, cfg.hardware.num_chips))
  _, results = compile_lib.check(cfg, target, progress=lambda m: None)
  assert all(r.fits for r in results)
  assert np.isfinite([r.total for r in results]).all()


def test_without_libtpu_the_check_says_what_to_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
  with pytest.raises(compile_lib.CompileCheckError, match=r"needs libtpu.*pip install 'gptrl\[tpu-compile\]'"):
    compile_lib.tpu_topology("v5e:2x2")
