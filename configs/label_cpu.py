"""Label comparisons for the reward model: the SFT model writes 8 replies to each of 1536 training prompts and
VADER sentiment ranks them ("kinder replies are better"), standing in for human raters (about 6 minutes on 2
cores). 8 replies give 28 pairs per prompt for 8 sequences of reward-model compute (InstructGPT ranked 4 to 9).

  python -m gptrl.launch --config configs/label_cpu.py
  -> runs/label_cpu/comparisons.jsonl (pairwise records: the reward stage's input), replies.jsonl

Swap the judge for people (`python -m gptrl.label`, a local web page) or skip this stage and point
configs/reward_cpu.py at your own comparisons JSONL. Only what differs from the defaults (gptrl/config.py
LabelConfig: the "vader" judge, replies sampled at temperature 1 without top-k) is set here.
"""
from gptrl import config as config_lib


def get_config(variant: str = ""):
  c = config_lib.as_configdict(config_lib.LabelConfig)
  c.workdir = "runs/label_cpu"
  c.init.checkpoint = "runs/sft_cpu"  # the SFT run: its newest checkpoint

  # The prompts: keep these equal to the SFT run's data settings.
  c.data.eval_fraction = 0.08
  c.data.eval_batches = 0  # unused here

  c.num_prompts = 1536
  c.responses_per_prompt = 8  # batch_size (64 sequences sampled at once): 8 prompts x 8 replies

  c.sample.num_prompts = 0  # unused here
  c.sample.max_new_tokens = 40
  c.sample.top_p = 0.95

  if variant == "tiny":
    c.workdir = "runs/label_cpu_tiny"
    c.num_prompts, c.responses_per_prompt, c.batch_size, c.sample.max_new_tokens = 16, 4, 32, 12
  elif variant:
    raise ValueError(f"configs/label_cpu.py: unknown variant {variant!r}; known: 'tiny'.")
  return c
