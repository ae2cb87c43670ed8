"""RLOO for a 125M-7B policy on a Cloud TPU slice: the plan of configs/ppo_tpu.py (mesh, micro-batching,
rollout and minibatch sizes, reply length, optimizer, eval, placement) without the critic, whose memory and compute
it saves.

  python launch/tpu_vm.py run --config configs/rloo_tpu.py:size=1b --name gptrl-rloo-1b --zone us-east5-a
  python -m gptrl.launch --config configs/rloo_tpu.py:size=1b --config.init.checkpoint=/mnt/gptrl/runs/sft_1b \\
      --config.reward_model.checkpoint=/mnt/gptrl/runs/reward_1b

Variants as configs/ppo_tpu.py: `size=125m|350m|1b|3b|7b` (default 1b), `chip=v5p|v4|v6e|v5e`, `chips=N`.
"""
import os
import runpy

from gptrl import config as config_lib


def get_config(variant: str = ""):
  ppo = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ppo_tpu.py"))
  plan = ppo["presets"].resolve_plan(variant, file="configs/rloo_tpu.py", table=ppo["PLANS"], default_size="1b")
  c = config_lib.policy_rl_configdict(ppo["build"](plan), "rloo")
  c.rloo.group_size = 4  # replies per prompt: rollout_batch_size / group_size prompts
  return c
