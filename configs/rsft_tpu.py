"""Rejection-sampling fine-tuning for a 125M-7B policy on a Cloud TPU slice: the plan of configs/ppo_tpu.py
(mesh, micro-batching, rollout size, reply length, eval, placement) without the critic; each iteration samples 8
replies per prompt and learns from the reward model's pick of each group.

  python launch/tpu_vm.py run --config configs/rsft_tpu.py:size=1b --name gptrl-rsft-1b --zone us-east5-a

Variants as configs/ppo_tpu.py: `size=125m|350m|1b|3b|7b` (default 1b), `chip=v5p|v4|v6e|v5e`, `chips=N`.
"""
import os
import runpy

from gptrl import config as config_lib


def get_config(variant: str = ""):
  ppo = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ppo_tpu.py"))
  plan = ppo["presets"].resolve_plan(variant, file="configs/rsft_tpu.py", table=ppo["PLANS"], default_size="1b")
  c = config_lib.policy_rl_configdict(ppo["build"](plan), "rsft")
  c.rsft.group_size = 8  # replies per prompt: rollout_batch_size / 8 winners per iteration
  c.rsft.minibatch_size = c.rsft.rollout_batch_size // 8  # one update per iteration, on all the winners
  return c
