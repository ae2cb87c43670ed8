"""Sampling speed of gptrl.sampling.generate with the KV cache against the full-recompute loop.

  python benchmarks/decode_speed.py
  python benchmarks/decode_speed.py --batch_size 4 --new_tokens 32 --repeats 1

The model is configs/pretrain_cpu.py's (4 layers, d_model 256, 4 heads, context 256, 4096 vocabulary) with
random parameters. For each mode, one call of `generate` compiles and warms up, then `--repeats` identical
calls are timed end to end (the result comes back to the host, so the device has finished). Every row
generates all `--new_tokens` tokens (no stop token), so tokens/s = batch_size * new_tokens / seconds.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flax.linen as nn  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from gptrl import config as config_lib  # pylint: disable=wrong-import-position
from gptrl import model as model_lib  # pylint: disable=wrong-import-position
from gptrl import sampling  # pylint: disable=wrong-import-position

MODEL = dict(vocab_size=4096, num_layers=4, num_heads=4, d_model=256, max_len=256)


def time_generate(model, params, prompts, *, new_tokens: int, repeats: int, use_cache: bool) -> dict:
  """Seconds of the first (compiling) call and the best of `repeats` timed calls of `generate`."""
  def call():
    return sampling.generate(model, params, prompts, max_new_tokens=new_tokens, rng=jax.random.key(0),
                             temperature=1.0, top_k=50, use_cache=use_cache)
  t0 = time.perf_counter()
  first = call()
  compile_s = time.perf_counter() - t0
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = call()
    best = min(best, time.perf_counter() - t0)
  assert out == first, "generate is not deterministic for a fixed rng"
  return {"compile_plus_first_s": compile_s, "seconds": best,
          "tokens_per_s": len(prompts) * new_tokens / best, "tokens": out}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch_size", type=int, default=16, help="prompts per generate call")
  p.add_argument("--prompt_len", type=int, default=32, help="tokens per prompt")
  p.add_argument("--new_tokens", type=int, default=128, help="tokens generated per prompt")
  p.add_argument("--repeats", type=int, default=1, help="timed calls per mode after the warmup (best reported)")
  p.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16")
  args = p.parse_args(argv)

  cfg = config_lib.ModelConfig(**MODEL, dtype=args.dtype)
  model = model_lib.GPT(cfg)
  params = jax.jit(lambda r: nn.meta.unbox(model.init(r, jnp.zeros((1, 8), jnp.int32))["params"]))(
      jax.random.key(0))
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, cfg.vocab_size, (args.batch_size, args.prompt_len)).tolist()

  results = {}
  for name, use_cache in (("no cache", False), ("kv cache", True)):
    results[name] = time_generate(model, params, prompts, new_tokens=args.new_tokens, repeats=args.repeats,
                                  use_cache=use_cache)
  same = results["kv cache"]["tokens"] == results["no cache"]["tokens"]

  device = jax.devices()[0]
  print(f"\nDevice: {device.platform} ({device.device_kind}), {os.cpu_count()} CPUs, jax {jax.__version__}")
  print(f"Model: {model_lib.count_params(params):,} params, {cfg.dtype}; batch {args.batch_size}, "
        f"prompt {args.prompt_len}, new tokens {args.new_tokens}, best of {args.repeats}\n")
  print(f"{'mode':<10}{'compile+1st s':>15}{'seconds':>10}{'tokens/s':>11}")
  for name, r in results.items():
    print(f"{name:<10}{r['compile_plus_first_s']:>15.2f}{r['seconds']:>10.3f}{r['tokens_per_s']:>11.0f}")
  speedup = results["kv cache"]["tokens_per_s"] / results["no cache"]["tokens_per_s"]
  print(f"\nspeedup (kv cache / no cache): {speedup:.1f}x; same tokens: {same}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
