"""RLHF with PPO for a 125M-7B policy on a Cloud TPU slice (multi-host): one process per host, one mesh over
every chip for all four models (policy, critic, frozen reference, frozen reward model).

  python launch/tpu_vm.py run --config configs/ppo_tpu.py:size=1b --name gptrl-1b --zone us-east5-a
  # or, on every host of an existing slice (gptrl.launch joins the job when it detects a multi-host TPU VM):
  python -m gptrl.launch --config configs/ppo_tpu.py:size=1b --config.workdir=/mnt/gptrl/runs/ppo_1b \\
      --config.init.checkpoint=/mnt/gptrl/runs/sft_1b --config.reward_model.checkpoint=/mnt/gptrl/runs/reward_1b

Paths must be a filesystem every host sees at the same path (a gcsfuse mount of a GCS bucket or a shared
persistent disk), or gs:// URLs (data.cache_dir stays local): process 0 writes config.json and the tokenizer copy,
every process writes its shards of each checkpoint. Model shapes come from the SFT and reward checkpoints; the
size variant picks the mesh, batches and micro-batching made for that size. Variants: `size=125m|350m|1b|3b|7b`
(default 1b), `chip=v5p|v4|v6e|v5e`, `chips=N` (see configs/pretrain_tpu.py). Parameters and optimizer state are
sharded over all chips (fsdp), and for 3b/7b over heads / MLP / vocabulary too (tensor); compute in bfloat16 with
fp32 parameters; each block is rematerialised in the backward pass. Rollouts run over the whole context (prompts
left-padded to max_len - max_new_tokens), so the rollout batch per device bounds the slice from below.
"""
import ml_collections

from gptrl import config as config_lib
from gptrl import presets

# size: (responses per minibatch update, tensor-parallel ways, {chip: (chips, responses per device per
# micro-batch)}). ROLLOUTS: responses sampled per iteration.
PLANS = {
    "125m": (64, 1, {"v5p": (8, 8), "v4": (16, 4), "v6e": (16, 4), "v5e": (32, 2)}),
    "350m": (64, 1, {"v5p": (16, 4), "v4": (16, 4), "v6e": (16, 4), "v5e": (32, 2)}),
    "1b": (64, 1, {"v5p": (32, 2), "v4": (32, 2), "v6e": (32, 2), "v5e": (64, 1)}),
    "3b": (64, 2, {"v5p": (64, 2), "v4": (64, 2), "v6e": (64, 2), "v5e": (128, 1)}),
    "7b": (64, 4, {"v5p": (128, 2), "v4": (128, 2), "v6e": (128, 2), "v5e": (256, 1)}),
}
ROLLOUTS = {"125m": 256, "350m": 256, "1b": 512, "3b": 512, "7b": 512}
LEARNING_RATES = {"125m": 3e-6, "350m": 2e-6, "1b": 1.5e-6, "3b": 1e-6, "7b": 1e-6}


def get_config(variant: str = ""):
  return build(presets.resolve_plan(variant, file="configs/ppo_tpu.py", table=PLANS, default_size="1b"))


def build(plan: presets.Plan) -> ml_collections.ConfigDict:
  """The config of `plan` (also used by configs/ppo_gpu.py with its own plans): only what differs from the
  defaults (gptrl/config.py PPOConfig)."""
  c = config_lib.as_configdict(config_lib.PPOConfig)
  c.workdir = f"/mnt/gptrl/runs/ppo_{plan.size}"  # or gs://my-bucket/runs/ppo_1b
  c.init.checkpoint = f"/mnt/gptrl/runs/sft_{plan.size}"  # policy start and frozen reference
  c.reward_model.checkpoint = f"/mnt/gptrl/runs/reward_{plan.size}"  # frozen; its reward_offset is subtracted

  c.model.dtype = "bfloat16"  # matmuls in bf16; params, optimizer state, log-probs and losses in fp32
  c.model.remat = "block"  # recompute each block in the backward pass
  c.model.attention = plan.attention  # TPUs: the splash kernel (gptrl/splash.py); GPUs: "xla"
  c.model.dropout = 0.0  # PPO's ratio needs the same function at rollout and update

  c.mesh.data = 1  # no pure data parallelism
  c.mesh.fsdp = -1  # every chip: params, optimizer state and the batch are sharded over it
  c.mesh.tensor = plan.tensor  # heads, MLP units and vocabulary split this many ways

  c.optim.lr = LEARNING_RATES[plan.size]
  c.optim.warmup_steps = 10
  c.optim.min_lr_ratio = 1.0  # constant after warmup
  c.optim.weight_decay = 0.0
  c.optim.grad_accum_steps = plan.grad_accum_steps  # micro-batches per minibatch update

  # The prompts: keep these equal to the SFT run's data settings.
  c.data.sources = ("/mnt/gptrl/data/sft",)  # JSONL/TFDS prompts: {"prompt"} / {"messages"}, or shakespeare_dialogue
  c.data.eval_fraction = 0.02
  c.data.batch_size = plan.batch  # unused here (see ppo.rollout_batch_size, ppo.minibatch_size)
  c.data.eval_batches = 0  # unused here
  c.data.cache_dir = "/mnt/gptrl/cache"

  c.ppo.rollout_batch_size = ROLLOUTS[plan.size]  # responses sampled and scored per iteration
  c.ppo.minibatch_size = plan.batch  # responses per optimizer step
  c.ppo.max_new_tokens = 128
  c.ppo.init_beta = 0.02
  c.ppo.truncation_penalty = 1.0  # subtracted from replies that hit max_new_tokens unfinished
  c.ppo.max_approx_kl = 0.05  # stop an iteration's updates once a minibatch's approximate KL exceeds this
  c.ppo.num_eval_prompts = 512  # held-out prompts, answered in chunks of rollout_batch_size
  # Placement: "colocated" (the default: every model on the whole slice, the plan below is sized for) or "split":
  # disjoint sub-meshes, the learner on the first chips (config.mesh), then sampler_devices chips generating with
  # a copy of the policy (moved chip to chip after every update phase), then scorer_devices chips for the frozen
  # reference and reward model; sub-meshes are (data=-1, fsdp=1, tensor=split_tensor). E.g. on 64 chips
  # (mesh.fsdp=-1 then spans the learner's 32):
  #   --config.ppo.placement=split --config.ppo.sampler_devices=16 --config.ppo.scorer_devices=16
  c.ppo.split_tensor = plan.tensor

  c.train.steps = 500  # PPO iterations
  c.train.log_every = 1
  c.train.eval_every = 25
  c.train.checkpoint_every = 25
  c.train.progress_bar = False
  c.train.eval_at_start = True

  c.hardware.chip = plan.chip  # the chip this plan is sized for
  c.hardware.num_chips = plan.chips  # the slice size
  c.hardware.model_size = plan.size  # the shape gptrl.compile builds before the checkpoints exist
  return c
