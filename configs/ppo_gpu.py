"""RLHF with PPO for a 125M-7B policy on NVIDIA GPUs: one process per host, all four models on one mesh.

  python launch/gpu.py --config configs/ppo_gpu.py:size=1b --config.init.checkpoint=/shared/runs/sft_1b \\
      --config.reward_model.checkpoint=/shared/runs/reward_1b
  python launch/slurm.py --config configs/ppo_gpu.py:size=7b --nodes 8 > ppo_7b.sbatch && sbatch ppo_7b.sbatch

The same run as configs/ppo_tpu.py (`build` there) with GPU plans: variants `size=125m|350m|1b|3b|7b` (default
1b), `chip=h100|h200|a100`, `chips=N` (GPUs in the job).
"""
import os
import runpy

# size: (responses per minibatch update, tensor-parallel ways, {chip: (GPUs, responses per GPU per micro-batch)})
PLANS = {
    "125m": (64, 1, {"h100": (8, 8), "h200": (8, 8), "a100": (8, 8)}),
    "350m": (64, 1, {"h100": (16, 4), "h200": (8, 8), "a100": (16, 4)}),
    "1b": (64, 1, {"h100": (32, 2), "h200": (16, 4), "a100": (32, 2)}),
    "3b": (64, 1, {"h100": (64, 1), "h200": (32, 2), "a100": (64, 1)}),
    "7b": (64, 1, {"h100": (64, 1), "h200": (64, 1), "a100": (64, 1)}),
}


def get_config(variant: str = ""):
  tpu = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ppo_tpu.py"))
  return tpu["build"](tpu["presets"].resolve_plan(variant, file="configs/ppo_gpu.py", table=PLANS, default_size="1b"))
