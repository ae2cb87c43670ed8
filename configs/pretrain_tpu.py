"""Pretrain a Llama-style GPT of 125M to 7B parameters on a Cloud TPU slice: one process per host, one mesh.

  # create the slice, install gptrl on every host, run, retry on preemption (see launch/README.md):
  python launch/tpu_vm.py run --config configs/pretrain_tpu.py:size=1b --name gptrl-1b --zone us-east5-a
  # or, on every host of a slice you already have (gptrl.launch joins the job when it sees a multi-host TPU VM):
  python -m gptrl.launch --config configs/pretrain_tpu.py:size=1b --config.workdir=/mnt/gptrl/runs/pretrain_1b

Variants after the colon, comma-separated: `size=125m|350m|1b|3b|7b` (default 1b; shapes in gptrl/presets.py),
`chip=v5p|v4|v6e|v5e` (default: the first in the size's row of PLANS), `chips=N` (default: the row's). The
global batch is fixed per size; the micro-batching (optim.grad_accum_steps) follows the rows per device of the
row, so a slice with other chips or another chip count keeps the same training run. The launcher prints the
per-device memory estimate (gptrl/memory.py) and refuses a plan that cannot fit (tests/test_configs.py
checks every row).

Numerics: parameters and optimizer state in float32, matmuls in bfloat16, every block rematerialised in the
backward pass (125m and 350m: none on TPUs, all but the matmul outputs on GPUs; presets.Plan.remat); attention
through the splash kernel (gptrl/splash.py: the [T, T] scores never reach HBM). Parameters and optimizer state are
sharded over all chips (mesh.fsdp), and for 3b/7b also over heads / MLP / vocabulary (mesh.tensor). Paths must be a
filesystem every host sees at the same path (a gcsfuse mount of a bucket, or a shared disk): /mnt/gptrl below;
or gs:// URLs for the workdir, data and checkpoints, with data.cache_dir on a local disk, e.g.
  --config.workdir=gs://my-bucket/runs/pretrain_1b --config.data.sources="('gs://my-bucket/data/pretrain',)" \
  --config.data.cache_dir=/tmp/gptrl-cache
"""
import ml_collections

from gptrl import config as config_lib
from gptrl import presets

# size: (global batch in sequences of 2048 tokens, tensor-parallel ways, {chip: (chips, rows per device per
# micro-batch)}). The eval forward runs the whole global batch at once (no micro-batches), which bounds the
# rows per device on the 16-32 GiB chips: hence larger slices there.
PLANS = {
    "125m": (256, 1, {"v5p": (8, 16), "v4": (16, 8), "v6e": (16, 8), "v5e": (32, 4)}),
    "350m": (256, 1, {"v5p": (16, 16), "v4": (16, 8), "v6e": (16, 8), "v5e": (32, 4)}),
    "1b": (512, 1, {"v5p": (32, 16), "v4": (32, 8), "v6e": (32, 8), "v5e": (64, 4)}),
    "3b": (512, 2, {"v5p": (64, 16), "v4": (64, 8), "v6e": (64, 8), "v5e": (128, 4)}),
    "7b": (1024, 4, {"v5p": (128, 16), "v4": (128, 8), "v6e": (128, 8), "v5e": (256, 4)}),
}
# Peak learning rate per size (GPT-3's table, Brown et al. 2020).
LEARNING_RATES = {"125m": 6e-4, "350m": 3e-4, "1b": 2e-4, "3b": 1.6e-4, "7b": 1.2e-4}


def get_config(variant: str = ""):
  return build(presets.resolve_plan(variant, file="configs/pretrain_tpu.py", table=PLANS, default_size="1b"))


def build(plan: presets.Plan) -> ml_collections.ConfigDict:
  """The config of `plan` (also used by configs/pretrain_gpu.py with its own plans): only what differs from the
  defaults (gptrl/config.py PretrainConfig)."""
  c = config_lib.as_configdict(config_lib.PretrainConfig)
  c.workdir = f"/mnt/gptrl/runs/pretrain_{plan.size}"  # checkpoints, metrics.jsonl, tensorboard/, tokenizer.model
  # or in a bucket, no mount needed: c.workdir = f"gs://my-bucket/runs/pretrain_{plan.size}"

  c.model.update(presets.model_shape(plan.size))  # layers, heads, width, rope, SwiGLU, ...
  # Parameters and optimizer state stay float32 (model.param_dtype).
  c.model.dtype = "bfloat16"  # matmuls and activations; norms, softmax and losses stay float32
  # The output projection writes bfloat16 logits, read as float32 by the loss: half the bytes of the largest tensor
  # (125m on v6e: 121 -> 110 GB of HBM traffic per train step, projected MFU 43% -> 47%; benchmarks/README.md).
  c.model.logits_dtype = "bfloat16"
  c.model.remat = plan.remat  # 125m/350m: none on TPUs, dots on GPUs; larger: block (presets.Plan.remat)
  c.model.attention = plan.attention  # TPUs: the splash kernel (gptrl/splash.py); GPUs: "xla"

  c.mesh.data = 1  # no pure data parallelism: every chip holds a shard of the parameters instead
  c.mesh.fsdp = -1  # the rest of the chips: parameters, optimizer state and the batch are split over them
  c.mesh.tensor = plan.tensor  # heads, MLP units and vocabulary split this many ways (within a host)

  c.optim.lr = LEARNING_RATES[plan.size]  # peak learning rate
  c.optim.warmup_steps = 2000
  c.optim.grad_accum_steps = plan.grad_accum_steps  # micro-batches per step (from the plan's rows per device)

  # tokenizer.path: a sentencepiece model every host reads (python -m gptrl.tokenizer --input ... --vocab_size
  # 32000); "" (the default): each process trains the same one on the training split (slow on a large corpus).
  c.tokenizer.vocab_size = presets.VOCAB_SIZE  # 32000: divisible by the tensor-parallel ways

  c.data.sources = ("/mnt/gptrl/data/pretrain",)  # a folder of .txt / .jsonl files, or tfds:name:split
  c.data.eval_fraction = 0.01  # share of documents held out (whole documents)
  c.data.batch_size = plan.batch  # sequences per optimizer step (x 2048 tokens)
  c.data.cache_dir = "/mnt/gptrl/cache"  # tokenized corpus, shared by the hosts; local or a mount, never gs://

  c.sample.prompts = ("The meaning of life is", "Once upon a time,", "The capital of France is")
  c.sample.max_new_tokens = 64

  c.train.steps = 100_000  # optimizer steps
  c.train.log_every = 50
  c.train.eval_every = 2000
  c.train.checkpoint_every = 1000  # also on preemption (SIGTERM): the launcher restarts and resumes
  c.train.progress_bar = False  # logs, not a bar: the output goes to launcher logs
  c.train.spike_zscore = 6.0  # skip a step whose loss is this many std above the recent mean (0: off)
  c.train.spike_warmup = 200  # good steps before a spike can be flagged

  c.hardware.chip = plan.chip  # the chip this plan is sized for (its HBM is the memory limit)
  c.hardware.num_chips = plan.chips  # the slice size: launch/ creates it; mesh.fsdp = num_chips / mesh.tensor
  c.hardware.model_size = plan.size  # the shape gptrl.compile builds before the checkpoints exist
  return c
