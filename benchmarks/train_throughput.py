"""Train-step throughput and MFU of gptrl on this machine, against a measured fp32 matmul peak.

  python benchmarks/train_throughput.py --model small --steps 10 --out results.json
  python benchmarks/train_throughput.py --model 100m --steps 3

1. Peak: the best FLOP/s of several square fp32 jnp.dot (2 n^3 FLOPs each), compiled first, timed with
   block_until_ready.
2. Train steps: gptrl.trainer.create_train_state / make_train_step / jit_train_step on random token batches
   (the real pretraining loss); compiled and warmed up first, then `--steps` steps timed end to end.
3. MFU = model FLOP/s (gptrl.model.flops_per_token; `full` counts the whole attention matrix, `causal`
   only its unmasked half) / measured peak.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from gptrl import config as config_lib  # pylint: disable=wrong-import-position
from gptrl import model as model_lib  # pylint: disable=wrong-import-position
from gptrl import optim  # pylint: disable=wrong-import-position
from gptrl import sharding  # pylint: disable=wrong-import-position
from gptrl import trainer  # pylint: disable=wrong-import-position
from gptrl.stages.pretrain import lm_loss_fn  # pylint: disable=wrong-import-position

# name -> (ModelConfig overrides, global batch size)
MODELS = {
    # configs/pretrain_cpu.py's model with its 4096-token tokenizer.
    "small": (dict(vocab_size=4096, num_layers=4, num_heads=4, d_model=256, max_len=256), 16),
    # ~100M parameters (GPT-2-small shape with a 4096 vocabulary: ~89M matmul + embeddings).
    "100m": (dict(vocab_size=4096, num_layers=12, num_heads=12, d_model=768, max_len=256), 4),
    # A toy model, for a quick check of the script.
    "tiny": (dict(vocab_size=512, num_layers=2, num_heads=2, d_model=64, max_len=64), 8),
}


def measure_peak(sizes: list[int], repeats: int) -> dict:
  """Best fp32 matmul FLOP/s over `sizes` (n x n @ n x n), each compiled then timed `repeats` times."""
  per_size = {}
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      dot(a, b).block_until_ready()
      best = min(best, time.perf_counter() - t0)
    per_size[n] = 2.0 * n ** 3 / best
  return {"peak_flops": max(per_size.values()), "per_size_flops": per_size}


def measure_train(name: str, steps: int, warmup: int, batch_size: int | None, seed: int = 0) -> dict:
  overrides, default_batch = MODELS[name]
  batch_size = batch_size or default_batch
  model_cfg = config_lib.ModelConfig(**overrides)
  seq_len = model_cfg.max_len
  mesh = sharding.make_mesh(config_lib.MeshConfig())
  model = model_lib.GPT(model_cfg)
  optim_cfg = config_lib.OptimConfig()
  total_steps = warmup + steps
  optimizer = optim.make_optimizer(optim_cfg, total_steps)
  init_tokens = np.zeros((1, seq_len), np.int32)
  state, shardings = trainer.create_train_state(lambda r: model.init(r, init_tokens)["params"], optimizer, seed,
                                                mesh)
  n_params = model_lib.count_params(state.params)
  step_fn = trainer.jit_train_step(
      trainer.make_train_step(lm_loss_fn(model), optimizer, optim.learning_rate_schedule(optim_cfg, total_steps)),
      shardings, mesh)

  rng = np.random.default_rng(seed)

  def batch():
    windows = rng.integers(0, model_cfg.vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
    return sharding.host_to_global({"inputs": windows[:, :-1].copy(), "targets": windows[:, 1:].copy(),
                                    "weights": np.ones((batch_size, seq_len), np.float32)}, mesh)

  batches = [batch() for _ in range(min(total_steps, 4))]
  t0 = time.perf_counter()
  state, metrics = step_fn(state, batches[0])
  jax.block_until_ready((state, metrics))
  compile_s = time.perf_counter() - t0
  for i in range(1, warmup):
    state, metrics = step_fn(state, batches[i % len(batches)])
  jax.block_until_ready((state, metrics))

  t0 = time.perf_counter()
  for i in range(steps):
    state, metrics = step_fn(state, batches[i % len(batches)])
  jax.block_until_ready((state, metrics))
  elapsed = time.perf_counter() - t0
  loss = float(metrics["train/loss"])
  assert np.isfinite(loss), loss

  tokens_per_step = batch_size * seq_len
  tokens_per_s = steps * tokens_per_step / elapsed
  fpt_full = model_lib.flops_per_token(model_cfg, seq_len)
  fpt_causal = model_lib.flops_per_token(model_cfg, seq_len, causal_halved=True)
  return {
      "model": name, "model_config": dataclasses.asdict(model_cfg), "num_params": n_params,
      "batch_size": batch_size, "seq_len": seq_len, "devices": mesh.size, "warmup_steps": warmup,
      "steps": steps, "compile_plus_first_step_s": compile_s, "seconds": elapsed,
      "step_ms": 1000 * elapsed / steps, "tokens_per_s": tokens_per_s, "final_loss": loss,
      "flops_per_token_full": fpt_full, "flops_per_token_causal": fpt_causal,
      "model_flops_full": fpt_full * tokens_per_s, "model_flops_causal": fpt_causal * tokens_per_s,
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", action="append", choices=sorted(MODELS),
                 help="model config(s) to measure (repeatable); default: small")
  p.add_argument("--steps", type=int, default=10, help="timed train steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps (the first one compiles)")
  p.add_argument("--batch_size", type=int, default=0, help="override the model's default global batch size")
  p.add_argument("--peak_sizes", default="2048,3072,4096", help="matmul sizes n for the peak, comma-separated")
  p.add_argument("--peak_repeats", type=int, default=5)
  p.add_argument("--out", default="", help="write the results as JSON here")
  args = p.parse_args(argv)
  models = args.model or ["small"]

  peak = measure_peak([int(s) for s in args.peak_sizes.split(",")], args.peak_repeats)
  results = []
  for name in models:
    results.append(measure_train(name, args.steps, max(args.warmup, 1), args.batch_size or None))
    r = results[-1]
    r["mfu_full"] = r["model_flops_full"] / peak["peak_flops"]
    r["mfu_causal"] = r["model_flops_causal"] / peak["peak_flops"]

  device = jax.devices()[0]
  print(f"\nDevice: {jax.device_count()} x {device.platform} ({device.device_kind}), {os.cpu_count()} CPUs, "
        f"jax {jax.__version__}")
  print("fp32 matmul peak: " + ", ".join(f"n={n}: {f / 1e9:.1f}" for n, f in peak["per_size_flops"].items())
        + f" GFLOP/s -> best {peak['peak_flops'] / 1e9:.1f} GFLOP/s\n")
  header = (f"{'model':<7}{'params':>12}{'batch':>7}{'ctx':>6}{'step ms':>10}{'tokens/s':>11}"
            f"{'GFLOP/s full':>14}{'GFLOP/s causal':>16}{'MFU full':>10}{'MFU causal':>12}")
  print(header)
  print("-" * len(header))
  for r in results:
    print(f"{r['model']:<7}{r['num_params']:>12,}{r['batch_size']:>7}{r['seq_len']:>6}{r['step_ms']:>10.1f}"
          f"{r['tokens_per_s']:>11.0f}{r['model_flops_full'] / 1e9:>14.2f}{r['model_flops_causal'] / 1e9:>16.2f}"
          f"{r['mfu_full']:>10.1%}{r['mfu_causal']:>12.1%}")
  report = {"device": {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count(),
                       "cpus": os.cpu_count(), "machine": platform.machine(), "jax": jax.__version__},
            "peak": {"peak_flops": peak["peak_flops"],
                     "per_size_flops": {str(k): v for k, v in peak["per_size_flops"].items()}},
            "results": results}
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
    print(f"\nWrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
