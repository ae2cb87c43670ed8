"""Pretrain a Llama-style GPT of 125M to 7B parameters on NVIDIA GPUs: one process per host, one mesh.

  # one 8-GPU host (launch/gpu.py sets the XLA/NCCL environment and retries on preemption):
  python launch/gpu.py --config configs/pretrain_gpu.py:size=350m
  # several hosts under Slurm (one task per host; gptrl.launch joins the job from the Slurm environment):
  python launch/slurm.py --config configs/pretrain_gpu.py:size=7b > pretrain_7b.sbatch && sbatch pretrain_7b.sbatch

The same run as configs/pretrain_tpu.py (same model, numerics, global batch and schedule; `build` there), with
GPU plans: variants `size=125m|350m|1b|3b|7b` (default 1b), `chip=h100|h200|a100`, `chips=N` (GPUs in the job).
Parameters and optimizer state are sharded over every GPU (mesh.fsdp, ZeRO-3); no tensor parallelism.
"""
import os
import runpy

# size: (global batch, tensor-parallel ways, {chip: (GPUs, rows per GPU per micro-batch)}); 8 GPUs per host.
PLANS = {
    "125m": (256, 1, {"h100": (8, 16), "h200": (8, 32), "a100": (8, 16)}),
    "350m": (256, 1, {"h100": (8, 16), "h200": (8, 32), "a100": (8, 16)}),
    "1b": (512, 1, {"h100": (16, 16), "h200": (16, 32), "a100": (16, 16)}),
    "3b": (512, 1, {"h100": (32, 8), "h200": (32, 16), "a100": (32, 8)}),
    "7b": (1024, 1, {"h100": (64, 8), "h200": (64, 16), "a100": (64, 8)}),
}


def get_config(variant: str = ""):
  tpu = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain_tpu.py"))
  # model.attention stays "xla"; "dot_product" lets XLA use cuDNN's fused attention where it supports the shapes.
  return tpu["build"](tpu["presets"].resolve_plan(variant, file="configs/pretrain_gpu.py", table=PLANS,
                                                  default_size="1b"))
