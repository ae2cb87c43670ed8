"""Supervised fine-tuning of the pretrained CPU model on Shakespeare dialogue turned into chats
(about 10 minutes on 2 cores).

  python -m gptrl.launch --config configs/sft_cpu.py
  python -m gptrl.launch --config configs/sft_cpu.py:tiny --config.init.checkpoint=/tmp/tiny_pretrain ...

The model's shape and the tokenizer come from the init checkpoint (the pretraining run). Demonstrations: the
built-in "shakespeare_dialogue" source (gptrl/dialogue.py: two-speaker exchanges from the plays, one speaker
as the user, the other as the assistant), or JSONL files of {"prompt", "response"} / {"messages": [...]}.
Only what differs from the defaults (gptrl/config.py SFTConfig) is set here.
"""
from gptrl import config as config_lib


def get_config(variant: str = ""):
  c = config_lib.as_configdict(config_lib.SFTConfig)
  c.workdir = "runs/sft_cpu"
  c.init.checkpoint = "runs/pretrain_cpu"  # the pretraining run's workdir: its newest checkpoint

  c.optim.lr = 5e-4
  c.optim.warmup_steps = 20
  c.optim.weight_decay = 0.0

  c.data.eval_fraction = 0.08  # share of plays held out
  c.data.eval_batches = 16

  c.sample.temperature = 0.7

  c.train.steps = 200
  c.train.eval_every = 50
  c.train.checkpoint_every = 50
  c.train.keep_checkpoints = 2
  c.train.eval_at_start = True  # the starting point's held-out score, for comparison

  if variant == "tiny":
    c.workdir = "runs/sft_cpu_tiny"
    c.train.steps, c.train.eval_every, c.train.checkpoint_every = 20, 10, 10
    c.data.eval_batches = 2
    c.sample.num_prompts, c.sample.max_new_tokens = 2, 16
  elif variant:
    raise ValueError(f"configs/sft_cpu.py: unknown variant {variant!r}; known: 'tiny'.")
  return c
