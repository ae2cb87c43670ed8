"""A round's feedback on a policy: users simulated by the labelling judge (VADER) talk to the policy served by
gptrl.serve (over HTTP, 8 at a time) and rate, compare and correct its replies (about a minute on 2 cores); or,
with `sources`, what real users told `python -m gptrl.serve` is gathered instead.

  python -m gptrl.launch --config configs/feedback_cpu.py --config.init.checkpoint=runs/ppo_cpu
  python -m gptrl.launch --config configs/feedback_cpu.py --config.sources="('runs/ppo_cpu/feedback',)"
  -> runs/feedback_cpu/{comparisons,demonstrations,ratings}.jsonl: the next round's reward-model and SFT data

The pipeline runs this stage in its later rounds (`--config.rounds=2` of configs/pipeline_cpu.py), on the previous
round's policy. Only what differs from the defaults (gptrl/config.py FeedbackConfig) is set here.
"""
from gptrl import config as config_lib


def get_config(variant: str = ""):
  c = config_lib.as_configdict(config_lib.FeedbackConfig)
  c.workdir = "runs/feedback_cpu"
  c.init.checkpoint = "runs/ppo_cpu"  # the policy to serve
  c.data.eval_fraction = 0.08  # the prompts: keep these equal to the SFT run's data settings
  c.conversations = 512
  c.edit_every = 2  # every other user also writes a better reply (the judge's best of 8)
  if variant == "tiny":
    c.workdir = "runs/feedback_cpu_tiny"
    c.conversations, c.edit_candidates, c.max_new_tokens, c.clients = 12, 3, 8, 4
  elif variant:
    raise ValueError(f"configs/feedback_cpu.py: unknown variant {variant!r}; known: 'tiny'.")
  return c
