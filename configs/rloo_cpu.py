"""RLOO on the CPU: PPO's task (configs/ppo_cpu.py: the same SFT policy, reward model, prompts, reply length,
optimizer and eval) without a critic: 4 replies to each prompt, each reply's KL-shaped return (RM score minus
beta times its summed per-token KL) against the mean of the other replies' returns.

  python -m gptrl.launch --config configs/rloo_cpu.py

Only what differs from configs/ppo_cpu.py and the RLOO defaults (gptrl/config.py RLOOAlgoConfig) is set here.
Variants: `tiny` (seconds, for smoke tests).
"""
import os

from gptrl import config as config_lib


def get_config(variant: str = ""):
  if variant not in ("", "tiny"):
    raise ValueError(f"configs/rloo_cpu.py: unknown variant {variant!r}; known: 'tiny'.")
  ppo = config_lib.load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ppo_cpu.py"), variant)
  c = config_lib.policy_rl_configdict(ppo, "rloo")
  if not variant:
    # 16 prompts x 4 replies per iteration, two updates of 32: about PPO's time per iteration on 2 cores.
    c.rloo.rollout_batch_size, c.rloo.minibatch_size, c.rloo.group_size = 64, 32, 4
    c.optim.lr = 1e-4  # one pass over each rollout (PPO: four)
  else:
    c.rloo.rollout_batch_size, c.rloo.minibatch_size, c.rloo.group_size = 8, 4, 2
  return c
