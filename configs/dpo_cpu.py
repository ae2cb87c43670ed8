"""DPO on the CPU: the SFT policy learns from the labelled comparisons directly (the reward model's data,
configs/reward_cpu.py), the frozen SFT policy its reference; the reward model only scores the held-out replies at
each eval, as PPO's are scored (configs/ppo_cpu.py's prompts, reply length and judges): the frontier's points.

  python -m gptrl.launch --config configs/dpo_cpu.py
  python -m gptrl.launch --config configs/dpo_cpu.py --config.dpo.loss_type=ipo             # IPO
  python -m gptrl.launch --config configs/dpo_cpu.py --config.dpo.label_smoothing=0.1      # conservative DPO

Only what differs from the defaults (gptrl/config.py DPOConfig) is set here. Variants: `tiny` (seconds).
"""
import os

from gptrl import config as config_lib


def _load(name: str, variant: str):
  return config_lib.load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), variant)


def get_config(variant: str = ""):
  if variant not in ("", "tiny"):
    raise ValueError(f"configs/dpo_cpu.py: unknown variant {variant!r}; known: 'tiny'.")
  reward, ppo = _load("reward_cpu.py", variant), _load("ppo_cpu.py", variant)
  c = config_lib.as_configdict(config_lib.DPOConfig)
  c.workdir = "runs/dpo_cpu" if not variant else "runs/dpo_cpu_tiny"
  c.init.checkpoint = reward.init.checkpoint  # the SFT run: policy start and frozen reference
  c.reward_model.checkpoint = ppo.reward_model.checkpoint  # scores the eval replies only
  c.data = reward.data  # the comparisons, split and cut as the reward model's
  c.prompts = ppo.data  # the held-out prompts of the generation eval, as PPO's
  for key in ("num_eval_prompts", "max_new_tokens", "temperature", "watch_judges"):
    c.dpo[key] = ppo.ppo[key]
  c.dpo.eval_batch_size = ppo.ppo.rollout_batch_size  # PPO's eval chunks: the same replies from the same policy

  c.optim.lr = 5e-5
  c.optim.warmup_steps = 10
  c.optim.min_lr_ratio = 1.0
  c.optim.weight_decay = 0.0

  c.train.steps = 160
  c.train.log_every = 10
  c.train.eval_every = 40
  c.train.checkpoint_every = 40
  c.train.keep_checkpoints = 2
  c.train.eval_at_start = True
  if variant:
    c.train.steps, c.train.eval_every, c.train.checkpoint_every = 8, 4, 4
  return c
