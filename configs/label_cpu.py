"""Label comparisons for the reward model: the SFT model writes 8 replies to each of 1536 training prompts and
VADER sentiment ranks them ("kinder replies are better"), standing in for human raters (about 6 minutes on 2
cores). 8 replies give 28 pairs per prompt for 8 sequences of reward-model compute (InstructGPT ranked 4 to 9).

  python -m gptrl.launch --config configs/label_cpu.py
  -> runs/label_cpu/comparisons.jsonl (pairwise records: the reward stage's input), replies.jsonl

Swap the judge for people (`python -m gptrl.label`, a local web page) or skip this stage and point
configs/reward_cpu.py at your own comparisons JSONL.
"""
import ml_collections

from gptrl import config as config_lib


def get_config(variant: str = ""):
  c = ml_collections.ConfigDict()
  c.stage = "label"
  c.workdir = "runs/label_cpu"
  c.seed = 0

  c.init = ml_collections.ConfigDict()
  c.init.checkpoint = "runs/sft_cpu"  # the SFT run: its newest checkpoint
  c.init.step = -1
  c.tokenizer_path = ""

  # Runtime settings of the model whose shape comes from the checkpoint; "" / -1 keep the checkpoint's.
  c.model = config_lib.as_configdict(config_lib.ModelRuntimeConfig())  # dropout, dtype, remat, attention

  c.mesh = config_lib.as_configdict(config_lib.MeshConfig())  # data=-1 (all devices), fsdp=1, tensor=1

  c.data = ml_collections.ConfigDict()  # the prompts: keep these equal to the SFT run's data settings
  c.data.sources = ("shakespeare_dialogue",)
  c.data.eval_fraction = 0.08
  c.data.split_seed = 0
  c.data.batch_size = 16  # unused here
  c.data.eval_batches = 0  # unused here
  c.data.cache_dir = ""

  c.num_prompts = 1536
  c.responses_per_prompt = 8
  c.batch_size = 64  # sequences sampled at once (8 prompts x 8 replies)

  c.sample = ml_collections.ConfigDict()
  c.sample.num_prompts = 0  # unused here
  c.sample.max_new_tokens = 40
  c.sample.temperature = 1.0
  c.sample.top_k = 0
  c.sample.top_p = 0.95

  c.judge = ml_collections.ConfigDict()
  c.judge.name = "vader"  # "vader" | "length"
  c.judge.min_gap = 0.3  # pairs closer than this are dropped

  c.progress_bar = True

  c.distributed = config_lib.as_configdict(config_lib.DistributedConfig())  # auto-detects multi-host jobs
  if variant == "tiny":
    c.workdir = "runs/label_cpu_tiny"
    c.num_prompts, c.responses_per_prompt, c.batch_size, c.sample.max_new_tokens = 16, 4, 32, 12
  elif variant:
    raise ValueError(f"configs/label_cpu.py: unknown variant {variant!r}; known: 'tiny'.")
  return c
