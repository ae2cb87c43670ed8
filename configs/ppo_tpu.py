"""RLHF with PPO on a Cloud TPU pod slice (multi-host): one process per host, one mesh over every chip.

  # on every host of the slice (gptrl.launch joins the job when it detects a multi-host TPU VM):
  python -m gptrl.launch --config configs/ppo_tpu.py --config.workdir=/mnt/gptrl/runs/ppo \\
      --config.init.checkpoint=/mnt/gptrl/runs/sft --config.reward_model.checkpoint=/mnt/gptrl/runs/reward

Paths must be a filesystem every host sees at the same path (a gcsfuse mount of a GCS bucket or a shared
persistent disk): process 0 writes config.json and the tokenizer copy, every process writes its shards of each
checkpoint. Model shapes come from the SFT and reward checkpoints; this file sets how they run and how PPO
learns. Parameters and optimizer state are sharded over all chips (fsdp); compute in bfloat16 with fp32
parameters; each block is rematerialised in the backward pass.
"""
import ml_collections

from gptrl import config as config_lib


def get_config(variant: str = ""):
  c = ml_collections.ConfigDict()
  c.stage = "ppo"
  c.workdir = "/mnt/gptrl/runs/ppo"
  c.seed = 0

  c.init = ml_collections.ConfigDict()
  c.init.checkpoint = "/mnt/gptrl/runs/sft"  # policy start and frozen reference
  c.init.step = -1
  c.reward_model = ml_collections.ConfigDict()
  c.reward_model.checkpoint = "/mnt/gptrl/runs/reward"
  c.reward_model.step = -1
  c.tokenizer_path = ""

  c.model = config_lib.as_configdict(config_lib.ModelRuntimeConfig())
  c.model.dtype = "bfloat16"  # matmuls in bf16; params, optimizer state, log-probs and losses in fp32
  c.model.remat = "block"

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1  # every chip: params, optimizer state and the batch are sharded over it
  c.mesh.tensor = 1  # raise (4, 8) for models whose layers do not fit one chip's share

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-6
  c.optim.warmup_steps = 10
  c.optim.decay_steps = 0
  c.optim.min_lr_ratio = 1.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0
  c.optim.grad_accum_steps = 4  # micro-batches per minibatch update

  c.data = ml_collections.ConfigDict()
  c.data.sources = ("shakespeare_dialogue",)  # or JSONL/TFDS prompts: {"prompt"} / {"messages"}
  c.data.eval_fraction = 0.08
  c.data.split_seed = 0
  c.data.batch_size = 512  # unused here (see ppo.rollout_batch_size)
  c.data.eval_batches = 0
  c.data.cache_dir = ""

  c.ppo = config_lib.as_configdict(config_lib.PPOAlgoConfig())
  c.ppo.rollout_batch_size = 512
  c.ppo.minibatch_size = 64
  c.ppo.epochs = 4
  c.ppo.max_new_tokens = 128
  c.ppo.kl_estimator = "k1"
  c.ppo.init_beta = 0.02
  c.ppo.target_kl = 6.0
  c.ppo.critic = "separate"
  c.ppo.critic_init = "reward"
  c.ppo.whiten_rewards = False
  c.ppo.truncation_penalty = 1.0
  c.ppo.max_approx_kl = 0.05
  c.ppo.num_eval_prompts = 512

  c.train = ml_collections.ConfigDict()
  c.train.steps = 500  # PPO iterations
  c.train.log_every = 1
  c.train.eval_every = 25
  c.train.checkpoint_every = 25
  c.train.keep_checkpoints = 3
  c.train.async_checkpoint = True
  c.train.progress_bar = True
  c.train.eval_at_start = True

  c.distributed = config_lib.as_configdict(config_lib.DistributedConfig())  # "auto": detects the TPU pod
  if variant:
    raise ValueError(f"configs/ppo_tpu.py: unknown variant {variant!r}.")
  return c
