"""DPO for a 125M-7B policy on a Cloud TPU slice: the reward model's plan (configs/reward_tpu.py: mesh,
micro-batching, comparisons of up to 4 replies per prompt over the whole context) with the SFT policy trained and
its frozen copy's log-probs computed once; the generation eval as PPO's (configs/ppo_tpu.py: held-out prompts,
reply length, chunks), scored by the reward model.

  python launch/tpu_vm.py run --config configs/dpo_tpu.py:size=1b --name gptrl-dpo-1b --zone us-east5-a
  python -m gptrl.launch --config configs/dpo_tpu.py:size=1b --config.dpo.loss_type=ipo

Variants as configs/reward_tpu.py: `size=125m|350m|1b|3b|7b` (default 1b), `chip=v5p|v4|v6e|v5e`, `chips=N`.
The plan's micro-batches are the reward model's (the same activations, plus the LM head's logits); `python -m
gptrl.compile --config configs/dpo_tpu.py:size=1b` compiles its train and eval steps and the generation eval's
sampler for the slice (the launcher does so before booking it).
"""
import os
import runpy

from gptrl import config as config_lib

LEARNING_RATES = {"125m": 2e-6, "350m": 1.5e-6, "1b": 1e-6, "3b": 7e-7, "7b": 5e-7}


def get_config(variant: str = ""):
  here = os.path.dirname(os.path.abspath(__file__))
  reward_file = runpy.run_path(os.path.join(here, "reward_tpu.py"))
  ppo_file = runpy.run_path(os.path.join(here, "ppo_tpu.py"))
  plan = reward_file["presets"].resolve_plan(variant, file="configs/dpo_tpu.py", table=reward_file["PLANS"],
                                             default_size="1b")
  reward = reward_file["build"](plan)
  ppo = ppo_file["build"](ppo_file["presets"].resolve_plan(f"size={plan.size},chip={plan.chip}",
                                                           file="configs/dpo_tpu.py", table=ppo_file["PLANS"],
                                                           default_size="1b"))
  c = config_lib.as_configdict(config_lib.DPOConfig)
  for key in ("init", "model", "mesh", "optim", "data", "train", "hardware"):
    c[key] = reward[key]
  c.workdir = f"/mnt/gptrl/runs/dpo_{plan.size}"
  c.reward_model.checkpoint = f"/mnt/gptrl/runs/reward_{plan.size}"  # scores the eval replies only
  c.prompts = ppo.data
  for key in ("num_eval_prompts", "max_new_tokens", "temperature", "watch_judges"):
    c.dpo[key] = ppo.ppo[key]
  c.dpo.eval_batch_size = ppo.ppo.rollout_batch_size
  c.optim.lr = LEARNING_RATES[plan.size]
  c.optim.warmup_steps = 20
  c.optim.min_lr_ratio = 1.0
  c.train.steps = 500  # about one epoch of 16k prompts' comparisons at 32 prompts per step
  c.train.eval_every = c.train.checkpoint_every = 50
  return c
