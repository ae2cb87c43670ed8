"""Decoding speed: gptrl.decoding.generate (KV cache, one jitted loop) against transformers' `generate` on the
identical GPT-2 model, at several batch sizes, and the bytes each step must move over the measured memory
bandwidth, in one run.

  python benchmarks/decode_speed.py                               # batch 1, 16, 64; torch peer
  python benchmarks/decode_speed.py --batch 1 --batch 8 --new_tokens 128 --out results/decode.json
  python benchmarks/decode_speed.py --peer none --recompute      # also gptrl's no-cache reference loop

Method:
* Model: configs/pretrain_cpu.py's shape (4 layers, d_model 256, 4 heads, context 256, 4096 vocabulary) in
  GPT-2's architecture, random weights; the peer is transformers' GPT2LMHeadModel with the same config
  (gptrl.hf.hf_config_from_model_config), fp32, torch threads = CPU count, torch.inference_mode.
* Both sample with temperature 1 and top-k 50 from random prompts of `--prompt_len` tokens and generate exactly
  `--new_tokens` tokens per row (no stop token: transformers gets min_new_tokens = max_new_tokens).
  tokens/s = batch * new_tokens / seconds of the whole call (prefill included), after one untimed call each
  (gptrl's compiles); rounds alternate gptrl and peer calls, best time reported.
* Bytes per decode step (a lower bound on what one token step must read): every parameter once, the keys and
  values cached so far (2 x layers x batch x live length x d_model x 4 bytes, live length averaged over the
  steps) and the logits written. Achieved bytes/s = that x steps per second; "of bandwidth" divides it by the
  streaming bandwidth measured in this process (benchlib.memory_bandwidth). At batch 1 decoding is bound by
  memory, so that fraction is the number to push up; at larger batches it turns compute-bound.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable

import benchlib  # sets sys.path for gptrl

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptrl import config as config_lib
from gptrl import decoding
from gptrl import model as model_lib

MODEL = dict(vocab_size=4096, num_layers=4, num_heads=4, d_model=256, max_len=256)
TOP_K = 50


def gptrl_generate(cfg: config_lib.ModelConfig, prompts: list[list[int]], new_tokens: int, use_cache: bool
                   ) -> tuple[Callable[[], Any], int]:
  model = model_lib.GPT(cfg)
  params = jax.jit(lambda r: nn.meta.unbox(model.init(r, jnp.zeros((1, 8), jnp.int32))["params"]))(
      jax.random.key(0))

  def run():
    out = decoding.generate(model, params, prompts, max_new_tokens=new_tokens, rng=jax.random.key(0),
                            temperature=1.0, top_k=TOP_K, use_cache=use_cache)
    assert all(len(r) == new_tokens for r in out)
    return out
  return run, model_lib.count_params(params)


def torch_generate(cfg: config_lib.ModelConfig, prompts: list[list[int]], new_tokens: int) -> Callable[[], Any]:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  transformers.logging.set_verbosity_error()
  torch.manual_seed(0)
  module = transformers.GPT2LMHeadModel(benchlib.gpt2_config(cfg, pad_token_id=0)).eval()
  input_ids = torch.tensor(prompts, dtype=torch.long)
  attention_mask = torch.ones_like(input_ids)

  def run():
    with torch.inference_mode():
      out = module.generate(input_ids, attention_mask=attention_mask, do_sample=True, top_k=TOP_K,
                            temperature=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            pad_token_id=0, use_cache=True)
    assert out.shape == (len(prompts), input_ids.shape[1] + new_tokens), out.shape
    return out
  return run


def bytes_per_step(cfg: config_lib.ModelConfig, n_params: int, batch: int, prompt_len: int, new_tokens: int
                   ) -> float:
  live = prompt_len + new_tokens / 2  # the average number of cached positions over the steps
  kv = 2 * cfg.num_layers * batch * live * cfg.d_model * 4
  return 4.0 * n_params + kv + 4.0 * batch * cfg.vocab_size


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, action="append", help="batch size(s) (repeatable); default: 1, 16, 64")
  p.add_argument("--prompt_len", type=int, default=32, help="tokens per prompt")
  p.add_argument("--new_tokens", type=int, default=64, help="tokens generated per row")
  p.add_argument("--rounds", type=int, default=3, help="timed interleaved rounds per batch size")
  p.add_argument("--peer", default="torch", choices=("torch", "none"))
  p.add_argument("--recompute", action="store_true", help="also time gptrl's no-cache reference loop")
  p.add_argument("--out", default="", help="write the results as JSON here")
  args = p.parse_args(argv)
  batches = args.batch or [1, 16, 64]
  if args.peer == "torch":
    threads = benchlib.torch_threads()
  bandwidth = benchlib.memory_bandwidth()
  cfg = config_lib.ModelConfig(**MODEL, attention_bias=True)
  rng = np.random.default_rng(0)

  results = []
  for batch in batches:
    prompts = rng.integers(1, cfg.vocab_size, (batch, args.prompt_len)).tolist()
    workloads: dict[str, Callable[[], Any]] = {}
    workloads["gptrl"], n_params = gptrl_generate(cfg, prompts, args.new_tokens, use_cache=True)
    if args.recompute:
      workloads["gptrl no cache"], _ = gptrl_generate(cfg, prompts, args.new_tokens, use_cache=False)
    if args.peer == "torch":
      workloads["transformers"] = torch_generate(cfg, prompts, args.new_tokens)
    for fn in workloads.values():
      fn()
    times = benchlib.interleaved(workloads, args.rounds)
    step_bytes = bytes_per_step(cfg, n_params, batch, args.prompt_len, args.new_tokens)
    row: dict[str, Any] = {"batch": batch, "bytes_per_step": step_bytes}
    for name, seconds in times.items():
      s = benchlib.summary(seconds)
      steps_per_s = args.new_tokens / s["best_s"]
      row[name] = {**s, "tokens_per_s": batch * steps_per_s, "bytes_per_s": step_bytes * steps_per_s,
                   "of_bandwidth": step_bytes * steps_per_s / bandwidth["bytes_per_s"]}
    if "transformers" in times:
      row["speedup_over_transformers"] = benchlib.ratio(times["transformers"], times["gptrl"])
    results.append(row)

  info = benchlib.device_info()
  print(f"\nDevice: {info['platform']} ({info.get('cpu_model', info['kind'])}), {info['cpus']} CPUs, jax "
        f"{info['jax']}, host malloc {info['host_malloc']}" + (f", torch threads {threads}" if args.peer == "torch" else ""))
  print(f"Memory bandwidth (jitted stream over {bandwidth['array_bytes'] >> 20} MiB): "
        f"{bandwidth['bytes_per_s'] / 1e9:.1f} GB/s")
  print(f"Model: {n_params:,} parameters, fp32; prompt {args.prompt_len}, {args.new_tokens} new tokens, top-k "
        f"{TOP_K}; best of {args.rounds} interleaved rounds\n")
  table = []
  for r in results:
    for name in ("gptrl", "gptrl no cache", "transformers"):
      if name in r:
        s = r[name]
        table.append({"batch": r["batch"], "side": name, "ms": 1000 * s["best_s"], "tps": s["tokens_per_s"],
                      "mb": r["bytes_per_step"] / 1e6, "gbs": s["bytes_per_s"] / 1e9, "frac": s["of_bandwidth"],
                      "speedup": r["speedup_over_transformers"]["best"]
                      if name == "gptrl" and "speedup_over_transformers" in r else None})
  print(benchlib.format_table(table, [("batch", "batch", "d"), ("side", "side", ""), ("ms", "best ms", ".0f"),
                                      ("tps", "tokens/s", ",.0f"), ("mb", "MB/step", ".1f"),
                                      ("gbs", "GB/s", ".2f"), ("frac", "of bandwidth", ".1%"),
                                      ("speedup", "x transformers", ".2f")]))
  benchlib.write_json(args.out, {"device": info, "bandwidth": bandwidth, "args": vars(args),
                                 "model_config": dataclasses.asdict(cfg), "results": results})
  return 0


if __name__ == "__main__":
  sys.exit(main())
