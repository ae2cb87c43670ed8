"""Best-of-n against the reward model on the CPU: the baseline of the gold-versus-KL frontier (a few minutes on 2
cores).

  python -m gptrl.launch --config configs/bon_cpu.py
  -> runs/bon_cpu/bon.json: for n = 1, 2, 4, ..., 64, the gold (the labeller's), proxy (the RM's) and watch-judge
     scores of the reply the RM prefers among n, at KL(n) = log n - (n-1)/n; bon_replies.jsonl

The SFT policy (runs/sft_cpu) samples 64 replies to each of PPO's held-out prompts: the prompts, reply length,
temperature, seed and watch judges are read from configs/ppo_cpu.py, so that best-of-n and PPO are measured on
the same footing. Only what differs from the defaults (gptrl/config.py BestOfNConfig) is set here.
Variants after the colon: `tiny` (seconds, for smoke tests).
"""
import os

from gptrl import config as config_lib


def get_config(variant: str = ""):
  if variant not in ("", "tiny"):
    raise ValueError(f"configs/bon_cpu.py: unknown variant {variant!r}; known: 'tiny'.")
  ppo = config_lib.load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ppo_cpu.py"), variant)
  c = config_lib.as_configdict(config_lib.BestOfNConfig)
  c.workdir = "runs/bon_cpu" if not variant else "runs/bon_cpu_tiny"
  c.init.checkpoint = ppo.init.checkpoint  # the SFT run
  c.reward_model = ppo.reward_model.copy_and_resolve_references()  # and how to read an ensemble
  c.seed = ppo.seed
  c.data = ppo.data.copy_and_resolve_references()
  c.bon.num_prompts = ppo.ppo.num_eval_prompts
  c.bon.max_new_tokens = ppo.ppo.max_new_tokens
  c.bon.temperature = ppo.ppo.temperature
  c.bon.watch_judges = tuple(ppo.ppo.watch_judges)
  if variant == "tiny":
    c.bon.samples, c.bon.table_n = 4, 2
  return c
