"""Train a 125M-7B Bradley-Terry reward model from an SFT run on a Cloud TPU slice: one process per host.

  python launch/tpu_vm.py run --config configs/reward_tpu.py:size=1b --name gptrl-1b --zone us-east5-a
  # or, on every host of an existing slice:
  python -m gptrl.launch --config configs/reward_tpu.py:size=1b --config.init.checkpoint=/mnt/gptrl/runs/sft_1b

The model (the SFT transformer with a scalar head) takes its shape and tokenizer from the SFT checkpoint; the size
variant picks the mesh, batch and micro-batching made for it. Variants: `size=125m|350m|1b|3b|7b` (default 1b),
`chip=v5p|v4|v6e|v5e`, `chips=N` (see configs/pretrain_tpu.py). Comparisons: JSONL of pairwise
{"prompt"|"messages", "chosen", "rejected"} or ranked {"responses", "ranking"} records (e.g. the labelling
stage's comparisons.jsonl). After training, the SFT model answers `reward.normalize_samples` training prompts
and the mean reward of its answers is stored as the checkpoint's reward_offset (PPO subtracts it).
"""
import ml_collections

from gptrl import config as config_lib
from gptrl import presets

# size: (prompts per step, tensor-parallel ways, {chip: (chips, prompts per device per micro-batch)}); each prompt
# brings data.max_responses = 4 sequences of up to 2048 tokens.
PLANS = {
    "125m": (32, 1, {"v5p": (8, 4), "v4": (8, 2), "v6e": (8, 2), "v5e": (16, 1)}),
    "350m": (32, 1, {"v5p": (8, 4), "v4": (16, 2), "v6e": (16, 2), "v5e": (16, 1)}),
    "1b": (32, 1, {"v5p": (16, 2), "v4": (16, 2), "v6e": (16, 2), "v5e": (32, 1)}),
    "3b": (32, 2, {"v5p": (32, 2), "v4": (32, 2), "v6e": (32, 2), "v5e": (64, 1)}),
    "7b": (32, 4, {"v5p": (64, 2), "v4": (64, 2), "v6e": (64, 2), "v5e": (128, 1)}),
}
LEARNING_RATES = {"125m": 3e-5, "350m": 2e-5, "1b": 1e-5, "3b": 9e-6, "7b": 9e-6}


def get_config(variant: str = ""):
  return build(presets.resolve_plan(variant, file="configs/reward_tpu.py", table=PLANS, default_size="1b"))


def build(plan: presets.Plan) -> ml_collections.ConfigDict:
  """The config of `plan` (also used by configs/reward_gpu.py with its own plans): only what differs from the
  defaults (gptrl/config.py RewardConfig)."""
  c = config_lib.as_configdict(config_lib.RewardConfig)
  c.workdir = f"/mnt/gptrl/runs/reward_{plan.size}"  # or gs://my-bucket/runs/reward_1b (data.cache_dir stays local)
  c.init.checkpoint = f"/mnt/gptrl/runs/sft_{plan.size}"  # the SFT run: its newest checkpoint

  c.model.dtype = "bfloat16"  # matmuls in bf16; params, optimizer state, the scalar head and the loss in fp32
  c.model.remat = plan.remat  # 125m/350m: none on TPUs, dots on GPUs; larger: block (presets.Plan.remat)
  c.model.attention = plan.attention  # TPUs: the splash kernel (gptrl/splash.py); GPUs: "xla"
  c.model.dropout = 0.0

  c.mesh.data = 1  # no pure data parallelism
  c.mesh.fsdp = -1  # the rest of the chips: parameters, optimizer state and the batch
  c.mesh.tensor = plan.tensor  # heads, MLP units and vocabulary split this many ways

  c.optim.lr = LEARNING_RATES[plan.size]
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.0
  c.optim.grad_accum_steps = plan.grad_accum_steps  # micro-batches per step

  # Each prompt brings data.max_responses = 4 replies (the default; K(K-1)/2 pairs), the whole context.
  c.data.sources = (f"/mnt/gptrl/runs/label_{plan.size}/comparisons.jsonl",)  # JSONL files / folders / globs
  c.data.eval_fraction = 0.05  # share of prompts held out
  c.data.batch_size = plan.batch  # prompts per step, each with up to max_responses replies
  c.data.eval_batches = 16  # 0: every held-out prompt
  c.data.cache_dir = "/mnt/gptrl/cache"

  # SFT replies whose mean reward becomes reward_offset (0: skip): sampled in one call, so it sets the KV cache
  c.reward.normalize_samples = 128
  c.reward.normalize_max_new_tokens = 128

  # train.steps: the default 1000, about one epoch of 32k comparisons: more over-fits (InstructGPT trains one epoch)
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 2
  c.train.progress_bar = False
  c.train.eval_at_start = True

  c.hardware.chip = plan.chip  # the chip this plan is sized for
  c.hardware.num_chips = plan.chips  # the slice size
  c.hardware.model_size = plan.size  # the shape gptrl.compile builds before the checkpoints exist
  return c
