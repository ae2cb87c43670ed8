"""GRPO on the CPU: PPO's task (configs/ppo_cpu.py: the same SFT policy, reward model, prompts, reply length,
optimizer and eval) without a critic: 8 replies to each prompt, each reply's advantage its reward against its
group's mean over the group's std, the KL to the SFT reference as a k3 loss term.

  python -m gptrl.launch --config configs/grpo_cpu.py
  python -m gptrl.launch --config configs/grpo_cpu.py --config.grpo.group_std_norm=False \\
      --config.grpo.loss_aggregation=sequence_sum          # Dr. GRPO
  python -m gptrl.launch --config configs/grpo_cpu.py --config.grpo.clip_eps_high=0.28 \\
      --config.grpo.loss_aggregation=token_mean --config.grpo.init_beta=0   # DAPO's clip-higher, token-level loss

Only what differs from configs/ppo_cpu.py and the GRPO defaults (gptrl/config.py GRPOAlgoConfig) is set here.
Variants: `tiny` (seconds, for smoke tests).
"""
import os

from gptrl import config as config_lib


def get_config(variant: str = ""):
  if variant not in ("", "tiny"):
    raise ValueError(f"configs/grpo_cpu.py: unknown variant {variant!r}; known: 'tiny'.")
  ppo = config_lib.load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ppo_cpu.py"), variant)
  c = config_lib.policy_rl_configdict(ppo, "grpo")
  if not variant:
    # 8 prompts x 8 replies per iteration, two updates of 32: about PPO's time per iteration on 2 cores (twice
    # its replies, a quarter of its updates, no critic).
    c.grpo.rollout_batch_size, c.grpo.minibatch_size, c.grpo.group_size = 64, 32, 8
    c.optim.lr = 1e-4  # one pass over each rollout (PPO: four)
  else:
    c.grpo.rollout_batch_size, c.grpo.minibatch_size, c.grpo.group_size = 8, 4, 4
  return c
