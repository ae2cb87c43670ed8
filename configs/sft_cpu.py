"""Supervised fine-tuning of the pretrained CPU model on Shakespeare dialogue turned into chats
(about 10 minutes on 2 cores).

  python -m gptrl.launch --config configs/sft_cpu.py
  python -m gptrl.launch --config configs/sft_cpu.py:tiny --config.init.checkpoint=/tmp/tiny_pretrain ...

The model's shape and the tokenizer come from the init checkpoint (the pretraining run). Demonstrations: the
built-in "shakespeare_dialogue" source (gptrl/dialogue.py: two-speaker exchanges from the plays, one speaker
as the user, the other as the assistant), or JSONL files of {"prompt", "response"} / {"messages": [...]}.
"""
import ml_collections

from gptrl import config as config_lib


def get_config(variant: str = ""):
  c = ml_collections.ConfigDict()
  c.stage = "sft"
  c.workdir = "runs/sft_cpu"
  c.seed = 0

  c.init = ml_collections.ConfigDict()
  c.init.checkpoint = "runs/pretrain_cpu"  # the pretraining run's workdir: its newest checkpoint
  c.init.step = -1
  c.tokenizer_path = ""  # "": the init run's tokenizer.model

  # Runtime settings of the model whose shape comes from the checkpoint; "" / -1 keep the checkpoint's.
  c.model = config_lib.as_configdict(config_lib.ModelRuntimeConfig())  # dropout, dtype, remat, attention

  c.mesh = config_lib.as_configdict(config_lib.MeshConfig())  # data=-1 (all devices), fsdp=1, tensor=1

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 20
  c.optim.decay_steps = 0
  c.optim.min_lr_ratio = 0.1
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0
  c.optim.grad_accum_steps = 1

  c.data = ml_collections.ConfigDict()
  c.data.sources = ("shakespeare_dialogue",)
  c.data.eval_fraction = 0.08  # share of plays held out
  c.data.split_seed = 0
  c.data.batch_size = 16  # conversations per step
  c.data.eval_batches = 16
  c.data.cache_dir = ""
  c.data.reset_position = False  # True: resume a changed data pipeline from its first batch instead of refusing

  c.sample = ml_collections.ConfigDict()
  c.sample.num_prompts = 4
  c.sample.max_new_tokens = 48
  c.sample.temperature = 0.7
  c.sample.top_k = 40
  c.sample.top_p = 1.0

  c.train = ml_collections.ConfigDict()
  c.train.steps = 200
  c.train.log_every = 10
  c.train.eval_every = 50
  c.train.checkpoint_every = 50
  c.train.keep_checkpoints = 2
  c.train.async_checkpoint = True
  c.train.progress_bar = True
  c.train.max_bad_steps = 8  # skipped steps (non-finite or spiking loss) in a row before rolling back (0: never)
  c.train.max_rollbacks = 3  # rollbacks to a checkpoint allowed in the run; needing one more stops it with an error
  c.train.spike_zscore = 0.0  # > 0: skip a step whose loss is this many std above the recent mean (0: off; 6 is usual)
  c.train.spike_warmup = 50  # good steps before a spike can be flagged
  c.train.spike_window = 100  # good steps the running mean/variance of the loss cover
  c.train.eval_at_start = True  # the starting point's held-out score, for comparison

  c.distributed = config_lib.as_configdict(config_lib.DistributedConfig())  # auto-detects multi-host jobs
  if variant == "tiny":
    c.workdir = "runs/sft_cpu_tiny"
    c.train.steps, c.train.eval_every, c.train.checkpoint_every = 20, 10, 10
    c.data.eval_batches = 2
    c.sample.num_prompts, c.sample.max_new_tokens = 2, 16
  elif variant:
    raise ValueError(f"configs/sft_cpu.py: unknown variant {variant!r}; known: 'tiny'.")
  return c
