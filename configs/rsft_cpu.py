"""Rejection-sampling fine-tuning on the CPU: PPO's task (configs/ppo_cpu.py: the same SFT policy, reward model,
prompts, reply length, optimizer and eval); each iteration the policy samples 8 replies to each of 8 prompts, the
reward model picks the best of each, and one pass of next-token updates learns from the 8 winners.

  python -m gptrl.launch --config configs/rsft_cpu.py

Only what differs from configs/ppo_cpu.py and the defaults (gptrl/config.py RSFTAlgoConfig) is set here.
Variants: `tiny` (seconds, for smoke tests).
"""
import os

from gptrl import config as config_lib


def get_config(variant: str = ""):
  if variant not in ("", "tiny"):
    raise ValueError(f"configs/rsft_cpu.py: unknown variant {variant!r}; known: 'tiny'.")
  ppo = config_lib.load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ppo_cpu.py"), variant)
  c = config_lib.policy_rl_configdict(ppo, "rsft")
  if not variant:
    c.rsft.rollout_batch_size, c.rsft.minibatch_size, c.rsft.group_size = 64, 8, 8
    c.optim.lr = 1e-4  # supervised steps on the winners (SFT's own rate was 5e-4)
  else:
    c.rsft.rollout_batch_size, c.rsft.minibatch_size, c.rsft.group_size = 8, 2, 4
  return c
