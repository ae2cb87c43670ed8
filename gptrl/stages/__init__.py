"""Pipeline stages, and the one registry of them that the launcher, the pipeline, the config loader, the report and
the memory check read. Each stage module exposes `run(config)` taking its typed config from gptrl/config.py.

Import-light (no JAX): `python -m gptrl.launch --help` and config parsing read it.
"""
from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: its name (`config.stage`, a pipeline sub-folder), the module that runs it and its config class."""
  name: str
  module: str  # the module whose run(config) runs it
  config: str  # its config class in gptrl/config.py
  init_from: str = ""  # the stage whose checkpoint `init.checkpoint` is (the pipeline wires it)
  reads_reward_model: bool = False  # it scores with the `reward_model.checkpoint` of a reward stage
  memory_estimate: bool = False  # gptrl/memory.py estimates its per-device memory before launch


# In pipeline order.
STAGES = (
    Stage("pretrain", "gptrl.stages.pretrain", "PretrainConfig", memory_estimate=True),
    Stage("sft", "gptrl.stages.sft", "SFTConfig", init_from="pretrain", memory_estimate=True),
    Stage("label", "gptrl.stages.autolabel", "LabelConfig", init_from="sft", memory_estimate=True),
    Stage("reward", "gptrl.stages.reward", "RewardConfig", init_from="sft", memory_estimate=True),
    Stage("bon", "gptrl.stages.bon", "BestOfNConfig", init_from="sft", reads_reward_model=True),
    Stage("ppo", "gptrl.stages.ppo", "PPOConfig", init_from="sft", reads_reward_model=True, memory_estimate=True),
    # PPO's stage without a critic: group-normalised (GRPO) or leave-one-out (RLOO) advantages.
    Stage("grpo", "gptrl.stages.ppo", "GRPOConfig", init_from="sft", reads_reward_model=True, memory_estimate=True),
    Stage("rloo", "gptrl.stages.ppo", "RLOOConfig", init_from="sft", reads_reward_model=True, memory_estimate=True),
    # Best-of-n by the reward model, then supervised updates on the winners, iterated (PPO's code path too).
    Stage("rsft", "gptrl.stages.ppo", "RSFTConfig", init_from="sft", reads_reward_model=True, memory_estimate=True),
    # Learns from the comparisons directly; the reward model (optional) only scores its evals.
    Stage("dpo", "gptrl.stages.dpo", "DPOConfig", init_from="sft", reads_reward_model=True),
    # Users' feedback on a served policy (or users simulated by the judge): the next round's data. The pipeline
    # runs it in rounds after the first (config.rounds), on the last round's policy.
    Stage("feedback", "gptrl.stages.feedback", "FeedbackConfig", init_from="ppo"),
)
# The whole pipeline, launched like a stage (config.stage = "pipeline").
PIPELINE = Stage("pipeline", "gptrl.stages.pipeline", "PipelineConfig")

PIPELINE_ORDER = tuple(s.name for s in STAGES)
# What a pipeline runs unless `config.stages` says otherwise: InstructGPT's stages and best-of-n, its baseline.
DEFAULT_PIPELINE = ("pretrain", "sft", "label", "reward", "bon", "ppo")
# The stages that optimise a policy against the reward model by sampling (gptrl/stages/ppo.py runs them all).
POLICY_RL = ("ppo", "grpo", "rloo", "rsft")
_BY_NAME = {s.name: s for s in STAGES + (PIPELINE,)}
NAMES = tuple(_BY_NAME)  # every name `config.stage` may hold


def get(name: str) -> Stage:
  """The stage called `name` (KeyError naming the known ones otherwise)."""
  try:
    return _BY_NAME[name]
  except KeyError:
    raise KeyError(f"unknown stage {name!r}; known: {list(_BY_NAME)}") from None


def module(name: str) -> ModuleType:
  """The module that runs stage `name` (imported now: JAX and the stage's dependencies load)."""
  return importlib.import_module(get(name).module)
