"""Train-step speed of pretraining, SFT and the reward model: MFU against the measured matmul peak, and tokens/s
against a PyTorch peer (transformers' GPT-2, random weights) on the identical model and batch, in one run.

  python benchmarks/train_throughput.py                          # small model, all three stages, torch peer
  python benchmarks/train_throughput.py --model 100m --rounds 3 --out results/train_100m.json
  python benchmarks/train_throughput.py --stage pretrain --peer none --attention dot_product

Method:
1. Peak: the best FLOP/s of square fp32 matmuls in this process (benchlib.matmul_peak).
2. gptrl: the real train step of each stage (trainer.make_train_step + jit_train_step: loss, gradients, clip,
   AdamW, the numerics guard), on a random batch of that stage's shape: pretraining windows; SFT rows of one
   chat each, right-padded, loss on the reply's tokens only; reward-model rows of K responses per prompt
   scored at their last token with the Bradley-Terry loss over every ranked pair. The model is GPT-2's
   architecture (learned positions, LayerNorm, tanh-GELU, biases, tied head), so the peer can be identical.
3. Peer: transformers' GPT2LMHeadModel (SFT: labels -100 outside the reply) or GPT2Model + a linear scalar
   head (reward model), torch AdamW + clip_grad_norm_, fp32, torch threads = CPU count, torch's default
   attention (SDPA).
4. Each round runs one gptrl step and one peer step (interleaved; compiled and warmed up first). tokens/s
   counts every position computed (padding included: both sides compute it); MFU uses the model FLOPs per token
   (gptrl.model.flops_per_token: `full` counts the whole attention matrix, `causal` its unmasked half; the
   reward model has no vocabulary head) over the measured peak. speedup = peer seconds / gptrl seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable

import benchlib  # sets sys.path for gptrl

import jax
import numpy as np

from gptrl import config as config_lib
from gptrl import model as model_lib
from gptrl import optim
from gptrl import reward_model
from gptrl import sharding
from gptrl import trainer
from gptrl.losses import lm_loss_fn
from gptrl.stages import recipe
from gptrl.stages.reward import reward_loss_fn

# name -> (ModelConfig overrides, rows per batch, responses per reward-model prompt)
MODELS = {
    # configs/pretrain_cpu.py's model with its 4096-token tokenizer, GPT-2's biases.
    "small": (dict(vocab_size=4096, num_layers=4, num_heads=4, d_model=256, max_len=256), 16, 4),
    # GPT-2 small's shape (124M with its 50257-token vocabulary; 89M here with 4096 tokens).
    "100m": (dict(vocab_size=4096, num_layers=12, num_heads=12, d_model=768, max_len=256), 4, 2),
    # A toy model, for a quick check of the script.
    "tiny": (dict(vocab_size=512, num_layers=2, num_heads=2, d_model=64, max_len=64), 8, 2),
}
STAGES = ("pretrain", "sft", "reward")
LR = 1e-4


def model_config(name: str, attention: str, remat: str) -> config_lib.ModelConfig:
  return config_lib.ModelConfig(**MODELS[name][0], attention_bias=True, attention=attention, remat=remat)


def make_batch(stage: str, cfg: config_lib.ModelConfig, rows: int, k: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A random batch of `stage`'s shape, as host arrays (the gptrl layout; the peer converts it)."""
  rng = np.random.default_rng(seed)
  t = cfg.max_len
  if stage == "reward":
    # `rows` sequences = rows // k prompts x k responses, right-padded; response i ranked above j for i < j.
    prompts = max(rows // k, 1)
    tokens = rng.integers(0, cfg.vocab_size, (prompts, k, t), dtype=np.int32)
    last = rng.integers(t // 2, t, (prompts, k)).astype(np.int32)
    pad = np.arange(t)[None, None, :] > last[:, :, None]
    tokens[pad] = 0
    pairs = np.triu(np.ones((k, k), np.float32), 1)[None].repeat(prompts, 0)
    return {"tokens": tokens, "last": last, "pairs": pairs, "margins": np.zeros_like(pairs)}
  windows = rng.integers(0, cfg.vocab_size, (rows, t + 1), dtype=np.int32)
  weights = np.ones((rows, t), np.float32)
  if stage == "sft":  # one chat per row: a prompt (no loss), a reply (loss), then padding (no loss)
    prompt_end = rng.integers(t // 8, t // 2, rows)
    chat_end = rng.integers(t // 2, t + 1, rows)
    pos = np.arange(t)[None, :]
    weights = ((pos >= prompt_end[:, None]) & (pos < chat_end[:, None])).astype(np.float32)
    windows[:, 1:][pos >= chat_end[:, None]] = 0
  return {"inputs": windows[:, :-1].copy(), "targets": windows[:, 1:].copy(), "weights": weights}


def gptrl_step(stage: str, cfg: config_lib.ModelConfig, batch: dict[str, np.ndarray], steps: int
               ) -> tuple[Callable[[], Any], int, Callable[[], float]]:
  """(run one step, parameter count, last loss) for gptrl's train step of `stage`."""
  mesh = sharding.make_mesh(config_lib.MeshConfig())
  optim_cfg = config_lib.OptimConfig(lr=LR, warmup_steps=0)
  optimizer = optim.make_optimizer(optim_cfg, steps)
  if stage == "reward":
    model = reward_model.ScalarHeadModel(cfg)
    loss_fn = reward_loss_fn(model, margin_scale=0.0)
  else:
    model = model_lib.GPT(cfg)
    loss_fn = lm_loss_fn(model)
  # Parameters as the stage's recipe initialises them.
  state, shardings = trainer.create_train_state(recipe.init_params(model, cfg.max_len), optimizer, 0, mesh)
  n_params = model_lib.count_params(state.params)
  step_fn = trainer.jit_train_step(
      trainer.make_train_step(loss_fn, optimizer, optim.learning_rate_schedule(optim_cfg, steps)), shardings, mesh)
  device_batch = sharding.host_to_global(batch, mesh)
  box: dict[str, Any] = {"state": state, "metrics": None}

  def run():
    box["state"], box["metrics"] = step_fn(box["state"], device_batch)
    jax.block_until_ready(box["metrics"])
  return run, n_params, lambda: float(box["metrics"]["train/loss"])


def torch_step(stage: str, cfg: config_lib.ModelConfig, batch: dict[str, np.ndarray]
               ) -> tuple[Callable[[], Any], int, Callable[[], float]]:
  """The same for transformers' GPT-2 with torch AdamW (the peer)."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  transformers.logging.set_verbosity_error()
  gpt2_cfg = benchlib.gpt2_config(cfg)
  torch.manual_seed(0)
  if stage == "reward":
    backbone = transformers.GPT2Model(gpt2_cfg)
    head = torch.nn.Linear(cfg.d_model, 1)
    module = torch.nn.ModuleList([backbone, head])
    tokens = torch.tensor(batch["tokens"].reshape(-1, cfg.max_len), dtype=torch.long)
    last = torch.tensor(batch["last"].reshape(-1), dtype=torch.long)
    p, k = batch["last"].shape
    pairs = torch.tensor(batch["pairs"])
    weights = pairs / pairs.sum(dim=(1, 2), keepdim=True).clamp(min=1.0)

    def loss_fn():
      hidden = backbone(tokens).last_hidden_state
      scores = head(hidden[torch.arange(tokens.shape[0]), last]).reshape(p, k)
      diff = scores[:, :, None] - scores[:, None, :]
      return -(weights * torch.nn.functional.logsigmoid(diff)).sum() / p
  else:
    module = transformers.GPT2LMHeadModel(gpt2_cfg)
    inputs = torch.tensor(batch["inputs"], dtype=torch.long)
    labels = torch.tensor(batch["targets"], dtype=torch.long)
    labels[torch.tensor(batch["weights"]) == 0] = -100

    def loss_fn():
      logits = module(inputs).logits
      return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               ignore_index=-100)
  module.train()
  opt = torch.optim.AdamW(module.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
  box: dict[str, Any] = {}

  def run():
    loss = loss_fn()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    opt.step()
    box["loss"] = loss.item()
  return run, sum(p.numel() for p in module.parameters()), lambda: box["loss"]


def measure(stage: str, model_name: str, *, attention: str, remat: str, peer: str, rounds: int, warmup: int,
            peak_flops: float) -> dict[str, Any]:
  cfg = model_config(model_name, attention, remat)
  _, rows, k = MODELS[model_name]
  batch = make_batch(stage, cfg, rows, k)
  workloads, params, losses = {}, {}, {}
  workloads["gptrl"], params["gptrl"], losses["gptrl"] = gptrl_step(stage, cfg, batch, warmup + rounds)
  if peer == "torch":
    workloads["torch"], params["torch"], losses["torch"] = torch_step(stage, cfg, batch)
  for fn in workloads.values():
    for _ in range(warmup):
      fn()
  times = benchlib.interleaved(workloads, rounds)
  tokens = rows if stage != "reward" else max(rows // k, 1) * k
  tokens *= cfg.max_len
  fpt = {kind: model_lib.flops_per_token(cfg, cfg.max_len, causal_halved=kind == "causal",
                                         lm_head=stage != "reward") for kind in ("full", "causal")}
  result: dict[str, Any] = {"stage": stage, "model": model_name, "attention": attention, "remat": remat,
                            "tokens_per_step": tokens, "flops_per_token": fpt, "params": params}
  for name, seconds in times.items():
    loss = losses[name]()
    assert np.isfinite(loss), (name, loss)
    s = benchlib.summary(seconds)
    result[name] = {**s, "tokens_per_s": tokens / s["best_s"], "final_loss": loss,
                    "mfu_full": fpt["full"] * tokens / s["best_s"] / peak_flops,
                    "mfu_causal": fpt["causal"] * tokens / s["best_s"] / peak_flops}
  if "torch" in times:
    result["speedup_over_torch"] = benchlib.ratio(times["torch"], times["gptrl"])
  return result


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="small", choices=sorted(MODELS))
  p.add_argument("--stage", action="append", choices=STAGES, help="stage(s) to measure (repeatable); default: all")
  p.add_argument("--peer", default="torch", choices=("torch", "none"))
  p.add_argument("--attention", default="xla", choices=("xla", "dot_product"), help="gptrl's model.attention")
  p.add_argument("--remat", default="none", choices=("none", "block", "dots"), help="gptrl's model.remat")
  p.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds (one step of each side)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps per side (gptrl's first compiles)")
  p.add_argument("--peak_sizes", default="1024,2048,3072", help="matmul sizes n for the peak, comma-separated")
  p.add_argument("--out", default="", help="write the results as JSON here")
  args = p.parse_args(argv)
  if args.peer == "torch":
    threads = benchlib.torch_threads()
  peak = benchlib.matmul_peak([int(s) for s in args.peak_sizes.split(",")])
  results = [measure(stage, args.model, attention=args.attention, remat=args.remat, peer=args.peer,
                     rounds=args.rounds, warmup=max(args.warmup, 1), peak_flops=peak["flops"])
             for stage in args.stage or STAGES]

  info = benchlib.device_info()
  cfg = model_config(args.model, args.attention, args.remat)
  print(f"\nDevice: {info['devices']} x {info['platform']} ({info.get('cpu_model', info['kind'])}), "
        f"{info['cpus']} CPUs, jax {info['jax']}, host malloc {info['host_malloc']}"
        + (f", torch threads {threads}" if args.peer == "torch" else ""))
  print(f"fp32 matmul peak: {peak['flops'] / 1e9:.1f} GFLOP/s (best of n = {args.peak_sizes})")
  print(f"Model '{args.model}': {cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.num_heads} heads, context "
        f"{cfg.max_len}, vocabulary {cfg.vocab_size}; attention={args.attention}, remat={args.remat}; "
        f"best of {args.rounds} interleaved rounds\n")
  rows = []
  for r in results:
    for side in ("gptrl", "torch"):
      if side in r:
        s = r[side]
        rows.append({"stage": r["stage"], "side": side, "params": r["params"][side], "tokens": r["tokens_per_step"],
                     "ms": 1000 * s["best_s"], "median_ms": 1000 * s["median_s"], "tps": s["tokens_per_s"],
                     "mfu_full": s["mfu_full"], "mfu_causal": s["mfu_causal"],
                     "speedup": r["speedup_over_torch"]["best"] if side == "gptrl" and "speedup_over_torch" in r
                     else None})
  print(benchlib.format_table(rows, [("stage", "stage", ""), ("side", "side", ""), ("params", "params", ",d"),
                                     ("tokens", "tokens/step", ",d"), ("ms", "best ms", ".0f"),
                                     ("median_ms", "median ms", ".0f"), ("tps", "tokens/s", ",.0f"),
                                     ("mfu_full", "MFU full", ".1%"), ("mfu_causal", "MFU causal", ".1%"),
                                     ("speedup", "x torch", ".2f")]))
  benchlib.write_json(args.out, {"device": info, "peak": peak, "args": vars(args),
                                 "model_config": dataclasses.asdict(cfg), "results": results})
  return 0


if __name__ == "__main__":
  sys.exit(main())
