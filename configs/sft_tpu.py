"""Supervised fine-tuning of a 125M-7B pretrained model on a Cloud TPU slice: one process per host, one mesh.

  python launch/tpu_vm.py run --config configs/sft_tpu.py:size=1b --name gptrl-1b --zone us-east5-a
  # or, on every host of an existing slice:
  python -m gptrl.launch --config configs/sft_tpu.py:size=1b --config.init.checkpoint=/mnt/gptrl/runs/pretrain_1b

The model's shape and tokenizer come from the init checkpoint (a pretraining run of that size, e.g.
configs/pretrain_tpu.py:size=1b); the size variant picks the mesh, batch and micro-batching made for it.
Variants: `size=125m|350m|1b|3b|7b` (default 1b), `chip=v5p|v4|v6e|v5e`, `chips=N` (see configs/pretrain_tpu.py).
Demonstrations: JSONL of {"prompt", "response"} or {"messages": [...]} (gptrl/chat_data.py), or the built-in
"shakespeare_dialogue". Paths are on a filesystem every host sees (/mnt/gptrl: a gcsfuse mount or shared disk),
or gs:// URLs (workdir, data, init checkpoint; data.cache_dir stays local).
"""
import ml_collections

from gptrl import config as config_lib
from gptrl import presets

# size: (conversations per step, tensor-parallel ways, {chip: (chips, conversations per device per micro-batch)})
PLANS = {
    "125m": (64, 1, {"v5p": (8, 8), "v4": (8, 4), "v6e": (8, 4), "v5e": (16, 2)}),
    "350m": (64, 1, {"v5p": (8, 8), "v4": (16, 4), "v6e": (16, 4), "v5e": (16, 2)}),
    "1b": (64, 1, {"v5p": (16, 4), "v4": (16, 4), "v6e": (16, 4), "v5e": (32, 2)}),
    "3b": (64, 2, {"v5p": (32, 4), "v4": (32, 4), "v6e": (32, 4), "v5e": (64, 2)}),
    "7b": (64, 4, {"v5p": (64, 4), "v4": (64, 4), "v6e": (64, 4), "v5e": (128, 2)}),
}
LEARNING_RATES = {"125m": 5e-5, "350m": 3e-5, "1b": 2e-5, "3b": 2e-5, "7b": 1e-5}


def get_config(variant: str = ""):
  return build(presets.resolve_plan(variant, file="configs/sft_tpu.py", table=PLANS, default_size="1b"))


def build(plan: presets.Plan) -> ml_collections.ConfigDict:
  """The config of `plan` (also used by configs/sft_gpu.py with its own plans): only what differs from the
  defaults (gptrl/config.py SFTConfig)."""
  c = config_lib.as_configdict(config_lib.SFTConfig)
  c.workdir = f"/mnt/gptrl/runs/sft_{plan.size}"  # or gs://my-bucket/runs/sft_1b
  c.init.checkpoint = f"/mnt/gptrl/runs/pretrain_{plan.size}"  # the pretraining run (or its gs:// workdir)

  # How the checkpoint's model runs ("" / -1 keep the checkpoint's setting).
  c.model.dtype = "bfloat16"  # matmuls in bf16; params, optimizer state, softmax and losses in fp32
  c.model.logits_dtype = "bfloat16"  # written by the output projection, read as float32 (configs/pretrain_tpu.py)
  c.model.remat = plan.remat  # 125m/350m: none on TPUs, dots on GPUs; larger: block (presets.Plan.remat)
  c.model.attention = plan.attention  # TPUs: the splash kernel (gptrl/splash.py); GPUs: "xla"
  c.model.dropout = 0.0

  c.mesh.data = 1  # no pure data parallelism
  c.mesh.fsdp = -1  # the rest of the chips: parameters, optimizer state and the batch
  c.mesh.tensor = plan.tensor  # heads, MLP units and vocabulary split this many ways

  c.optim.lr = LEARNING_RATES[plan.size]
  c.optim.weight_decay = 0.0
  c.optim.grad_accum_steps = plan.grad_accum_steps  # micro-batches per step

  c.data.sources = ("/mnt/gptrl/data/sft",)  # JSONL files / folders / globs, tfds:..., or "shakespeare_dialogue"
  c.data.eval_fraction = 0.02  # share of groups (or records) held out
  c.data.batch_size = plan.batch  # conversations per step (up to the model's 2048 tokens each)
  c.data.cache_dir = "/mnt/gptrl/cache"

  c.sample.max_new_tokens = 128
  c.sample.temperature = 0.7

  c.train.steps = 2000
  c.train.keep_checkpoints = 2
  c.train.progress_bar = False
  c.train.eval_at_start = True  # the pretrained model's held-out score, for comparison

  c.hardware.chip = plan.chip  # the chip this plan is sized for
  c.hardware.num_chips = plan.chips  # the slice size
  c.hardware.model_size = plan.size  # the shape gptrl.compile builds before the checkpoints exist
  return c
