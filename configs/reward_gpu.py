"""Train a 125M-7B reward model from an SFT run on NVIDIA GPUs: one process per host, one mesh.

  python launch/gpu.py --config configs/reward_gpu.py:size=1b --config.init.checkpoint=/shared/runs/sft_1b
  python launch/slurm.py --config configs/reward_gpu.py:size=7b --nodes 4 > reward_7b.sbatch && sbatch reward_7b.sbatch

The same run as configs/reward_tpu.py (`build` there) with GPU plans: variants `size=125m|350m|1b|3b|7b`
(default 1b), `chip=h100|h200|a100`, `chips=N` (GPUs in the job).
"""
import os
import runpy

# size: (prompts per step, tensor-parallel ways, {chip: (GPUs, prompts per GPU per micro-batch)}); 4 replies each.
PLANS = {
    "125m": (32, 1, {"h100": (8, 4), "h200": (8, 4), "a100": (8, 4)}),
    "350m": (32, 1, {"h100": (8, 4), "h200": (8, 4), "a100": (8, 4)}),
    "1b": (32, 1, {"h100": (8, 2), "h200": (8, 4), "a100": (8, 2)}),
    "3b": (32, 1, {"h100": (16, 2), "h200": (16, 2), "a100": (16, 2)}),
    "7b": (32, 1, {"h100": (32, 1), "h200": (32, 1), "a100": (32, 1)}),
}


def get_config(variant: str = ""):
  tpu = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "reward_tpu.py"))
  return tpu["build"](tpu["presets"].resolve_plan(variant, file="configs/reward_gpu.py", table=PLANS,
                                                  default_size="1b"))
