"""Supervised fine-tuning of a 125M-7B pretrained model on NVIDIA GPUs: one process per host, one mesh.

  python launch/gpu.py --config configs/sft_gpu.py:size=1b --config.init.checkpoint=/shared/runs/pretrain_1b
  python launch/slurm.py --config configs/sft_gpu.py:size=7b --nodes 4 > sft_7b.sbatch && sbatch sft_7b.sbatch

The same run as configs/sft_tpu.py (`build` there) with GPU plans: variants `size=125m|350m|1b|3b|7b` (default
1b), `chip=h100|h200|a100`, `chips=N` (GPUs in the job). Parameters and optimizer state sharded over every GPU.
"""
import os
import runpy

# size: (conversations per step, tensor-parallel ways, {chip: (GPUs, conversations per GPU per micro-batch)})
PLANS = {
    "125m": (64, 1, {"h100": (8, 8), "h200": (8, 8), "a100": (8, 8)}),
    "350m": (64, 1, {"h100": (8, 8), "h200": (8, 8), "a100": (8, 8)}),
    "1b": (64, 1, {"h100": (8, 4), "h200": (8, 8), "a100": (8, 4)}),
    "3b": (64, 1, {"h100": (16, 4), "h200": (16, 4), "a100": (16, 4)}),
    "7b": (64, 1, {"h100": (32, 2), "h200": (32, 2), "a100": (32, 2)}),
}


def get_config(variant: str = ""):
  tpu = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sft_tpu.py"))
  return tpu["build"](tpu["presets"].resolve_plan(variant, file="configs/sft_gpu.py", table=PLANS, default_size="1b"))
