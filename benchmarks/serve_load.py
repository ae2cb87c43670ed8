"""Serving under load: `python -m gptrl.serve` with 1, 4, 16 and 64 concurrent streaming clients, against the
same requests served one at a time and against transformers' `generate` in static batches, in one run.

  python benchmarks/serve_load.py                                  # clients 1, 4, 16, 64; torch peer
  python benchmarks/serve_load.py --clients 16 --peer none --out results/serve_load.json

Method:
* Model: configs/pretrain_cpu.py's shape (4 layers, d_model 256, 4 heads, context 256, 4096 vocabulary) with
  random weights (init std 0.02, so replies run to max_tokens: a random model almost never emits <eos>), saved as
  an SFT-stage checkpoint with a 4096-piece tokenizer trained on the Shakespeare corpus; served on 127.0.0.1 with
  the server's defaults (16 slots; 2 engines on a CPU host) in a subprocess, on one device.
* Requests: /v1/completions, streamed, a line of Shakespeare as the prompt (12-40 tokens), `--max_tokens` new
  tokens, temperature 1, no top-k/top-p; `--requests_per_client` per client (at least 32 in all), each client
  sending its next request when the last one finished. One untimed warm-up pass compiles every prompt bucket.
* Per run: tokens/s = completion tokens (the server's usage counts) / wall seconds from the first request to the
  last reply; time to first token (first streamed text) and per-request latency, p50 and p99.
* "x one at a time" = tokens/s over the 1-client run's (the same server serving the same kind of requests
  sequentially). Beside it: gptrl's offline sampler (decoding.generate, no server, one batch on one thread) on the
  same prompts in batches of 16 over one at a time, measured in the same run (the server's engines, 2 on a CPU
  host, decode two batches side by side and can pass it).
* The peer: transformers' GPT2LMHeadModel with the same config, `generate` with do_sample,
  temperature 1, top_k 0, exactly max_tokens new tokens, on the 16-client run's prompts in static batches of 16
  (left-padded), torch threads = CPU count; run after the server is stopped, so the two never share the CPUs.
The clients are Python threads on the same 2 cores as the server: at 64 clients their own work is part of what
is measured.
"""
from __future__ import annotations

import argparse
import http.client
import json
import pathlib
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import benchlib  # sets sys.path for gptrl

import jax
import numpy as np
from flax import linen as nn

from gptrl import checkpoint as ckpt_lib
from gptrl import config as config_lib
from gptrl import corpus
from gptrl import model as model_lib
from gptrl import tokenizer as tokenizer_lib

MODEL = dict(num_layers=4, num_heads=4, d_model=256, max_len=256)
SMALL = dict(num_layers=1, num_heads=2, d_model=32, max_len=64)  # --small: a smoke run of the whole method
REPO = pathlib.Path(__file__).resolve().parents[1]


def make_checkpoint(workdir: pathlib.Path) -> tuple[pathlib.Path, list[str]]:
  """An SFT-stage run of MODEL's shape with random weights; returns it and prompt lines."""
  docs = corpus.shakespeare_documents()
  text = "\n".join(d.text for d in docs[:12 if MODEL["d_model"] > 32 else 1])
  vocab = 4096 if MODEL["d_model"] > 32 else 512
  tok = tokenizer_lib.train_tokenizer(text.splitlines(), workdir / "tokenizer.model", vocab_size=vocab)
  cfg = config_lib.ModelConfig(vocab_size=tok.vocab_size, **MODEL)
  module = model_lib.GPT(cfg)
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), np.zeros((1, 8), np.int32)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0.0, 0.02, s.shape).astype(s.dtype), shapes["params"])
  checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  checkpointer.save(1, {"params": params, "step": np.int32(1)}, data={},
                    meta={"stage": "sft", "tokenizer_sha256": tok.sha256, "model": config_lib.to_dict(cfg)})
  checkpointer.close()
  longest = 160 if MODEL["max_len"] > 64 else 60
  lines = [line.strip() for line in text.splitlines() if longest * 3 // 8 <= len(line.strip()) <= longest]
  return workdir, lines


class Server:
  def __init__(self, checkpoint: pathlib.Path, log: pathlib.Path, slots: int, extra: list[str]):
    self.log = log
    with open(log, "w", encoding="utf-8") as f:
      self.proc = subprocess.Popen([sys.executable, "-m", "gptrl.serve", "--checkpoint", str(checkpoint), "--port",
                                    "0", "--feedback", "", "--single_device", "--slots", str(slots)] + list(extra), cwd=REPO,
                                   stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 1200
    while not (match := re.search(r"Serving on http://([\d.]+):(\d+)/", log.read_text())):
      if self.proc.poll() is not None or time.monotonic() > deadline:
        raise RuntimeError(f"the server did not start:\n{log.read_text()[-2000:]}")
      time.sleep(0.1)
    self.host, self.port = match.group(1), int(match.group(2))

  def stop(self) -> None:
    self.proc.send_signal(signal.SIGINT)
    try:
      self.proc.wait(20)
    except subprocess.TimeoutExpired:
      self.proc.kill()


def one_request(server: Server, prompt: str, max_tokens: int, seed: int) -> dict[str, float]:
  """A streamed completion: seconds to the first text, seconds in all, completion tokens."""
  body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "stream": True,
                     "stream_options": {"include_usage": True}})
  start = time.perf_counter()
  conn = http.client.HTTPConnection(server.host, server.port, timeout=600)
  conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
  response = conn.getresponse()
  if response.status != 200:
    raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
  first, tokens = None, 0
  for raw in response:
    line = raw.decode().strip()
    if not line.startswith("data: ") or line == "data: [DONE]":
      continue
    chunk = json.loads(line[len("data: "):])
    if chunk.get("usage"):
      tokens = chunk["usage"]["completion_tokens"]
    elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
      first = time.perf_counter() - start
  conn.close()
  total = time.perf_counter() - start
  return {"ttft_s": first if first is not None else total, "latency_s": total, "tokens": tokens}


def load_run(server: Server, prompts: list[str], clients: int, per_client: int, max_tokens: int) -> dict[str, Any]:
  results: list[dict[str, float]] = []
  lock = threading.Lock()
  errors: list[str] = []

  def client(c: int) -> None:
    for i in range(per_client):
      try:
        r = one_request(server, prompts[(c * per_client + i) % len(prompts)], max_tokens, seed=c * 1000 + i)
      except Exception as e:  # pylint: disable=broad-except
        errors.append(f"{type(e).__name__}: {e}")
        return
      with lock:
        results.append(r)
  threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
  start = time.perf_counter()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - start
  if errors:
    raise RuntimeError(f"{len(errors)} client(s) failed, e.g. {errors[0]}")
  ttft = sorted(r["ttft_s"] for r in results)
  latency = sorted(r["latency_s"] for r in results)
  pct = lambda xs, q: xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]
  tokens = sum(r["tokens"] for r in results)
  return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
          "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": pct(ttft, 0.99),
          "latency_p50_s": statistics.median(latency), "latency_p99_s": pct(latency, 0.99)}


def transformers_static(checkpoint: pathlib.Path, prompts: list[str], max_tokens: int, batch: int) -> dict[str, Any]:
  """The same prompts through transformers' generate in static batches of `batch`: tokens/s over all of them."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  transformers.logging.set_verbosity_error()
  threads = benchlib.torch_threads()
  tok = tokenizer_lib.load_tokenizer(str(checkpoint / "tokenizer.model"))
  cfg = config_lib.ModelConfig(vocab_size=tok.vocab_size, **MODEL)
  torch.manual_seed(0)
  module = transformers.GPT2LMHeadModel(benchlib.gpt2_config(cfg, pad_token_id=tok.pad_id)).eval()
  ids = [[tok.eos_id] + tok.encode(p) for p in prompts]

  def run_batches() -> int:
    tokens = 0
    for i in range(0, len(ids), batch):
      rows = ids[i:i + batch]
      width = max(len(r) for r in rows)
      input_ids = torch.tensor([[tok.pad_id] * (width - len(r)) + r for r in rows])
      mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
      with torch.inference_mode():
        out = module.generate(input_ids, attention_mask=mask, do_sample=True, top_k=0, temperature=1.0,
                              max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=tok.pad_id)
      tokens += (out.shape[1] - width) * len(rows)
    return tokens
  run_batches()  # warm-up
  start = time.perf_counter()
  tokens = run_batches()
  wall = time.perf_counter() - start
  return {"batch": batch, "requests": len(ids), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
          "torch_threads": threads}


def offline_ceiling(checkpoint: pathlib.Path, prompts: list[str], max_tokens: int) -> dict[str, Any]:
  """gptrl's offline sampler (decoding.generate, no server) on the same prompts one at a time and in batches of 16:
  what batching gains one batch on one thread."""
  from gptrl import decoding  # pylint: disable=import-outside-toplevel
  tok = tokenizer_lib.load_tokenizer(str(checkpoint / "tokenizer.model"))
  module = model_lib.GPT(config_lib.ModelConfig(vocab_size=tok.vocab_size, **MODEL))
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), np.zeros((1, 8), np.int32)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0.0, 0.02, s.shape).astype(s.dtype), shapes["params"])
  ids = [[tok.eos_id] + tok.encode(p) for p in prompts]
  longest = max(len(i) for i in ids)
  out = {}
  for batch in (1, 16):
    def run():
      n = 0
      for i in range(0, len(ids), batch):
        rows = decoding.generate(module, params, ids[i:i + batch], max_new_tokens=max_tokens,
                                 rng=jax.random.key(i), temperature=1.0, min_prompt_len=longest, batch_multiple=batch)
        n += sum(len(r) for r in rows)
      return n
    run()  # compiles
    start = time.perf_counter()
    n = run()
    out[f"batch_{batch}_tokens_per_s"] = n / (time.perf_counter() - start)
  out["batch_16_over_1"] = out["batch_16_tokens_per_s"] / out["batch_1_tokens_per_s"]
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--clients", type=int, action="append", help="concurrent clients (repeatable); default 1 4 16 64")
  p.add_argument("--max_tokens", type=int, default=64, help="new tokens per request (default %(default)s)")
  p.add_argument("--requests_per_client", type=int, default=8,
                 help="(at least 32 requests per run in all); enough that the runs' start and end weigh little")
  p.add_argument("--server_args", default="", help="more flags for `gptrl.serve`, e.g. '--decode_steps 16'")
  p.add_argument("--slots", type=int, default=16, help="the server's --slots (default %(default)s)")
  p.add_argument("--peer", default="torch", choices=("torch", "none"))
  p.add_argument("--small", action="store_true", help="a 1-layer d32 model of context 64 (a smoke run)")
  p.add_argument("--out", default="", help="write the results as JSON here")
  args = p.parse_args(argv)
  if args.small:
    MODEL.update(SMALL)
  clients = args.clients or [1, 4, 16, 64]
  with tempfile.TemporaryDirectory() as tmp:
    checkpoint, lines = make_checkpoint(pathlib.Path(tmp) / "sft")
    rng = np.random.default_rng(0)
    prompts = [lines[i] for i in rng.permutation(len(lines))]
    server = Server(checkpoint, pathlib.Path(tmp) / "serve.log", args.slots, shlex.split(args.server_args))
    runs = []
    try:
      # Warm-up: every prompt bucket and step size compiled before anything is timed.
      load_run(server, prompts, 16, 2, args.max_tokens)
      for c in clients:
        per_client = max(args.requests_per_client, -(-32 // c))
        runs.append(load_run(server, prompts, c, per_client, args.max_tokens))
        print(f"{c} clients: {runs[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    finally:
      server.stop()
    one = next((r for r in runs if r["clients"] == 1), None)
    for r in runs:
      r["x_one_at_a_time"] = r["tokens_per_s"] / one["tokens_per_s"] if one else None
    sixteen_prompts = prompts[:next((r["requests"] for r in runs if r["clients"] == 16), 32)]
    ceiling = offline_ceiling(checkpoint, sixteen_prompts, args.max_tokens)
    peer = None
    if args.peer == "torch":
      sixteen = next((r for r in runs if r["clients"] == 16), runs[-1])
      peer = transformers_static(checkpoint, prompts[:sixteen["requests"]], args.max_tokens, 16)
      for r in runs:
        r["x_transformers_static"] = r["tokens_per_s"] / peer["tokens_per_s"]

  info = benchlib.device_info()
  print(f"\nDevice: {info['platform']} ({info.get('cpu_model', info['kind'])}), {info['cpus']} CPUs, jax {info['jax']}")
  print(f"Model: {MODEL}, random weights; {args.max_tokens} new tokens per request; server slots {args.slots}\n")
  print(benchlib.format_table(runs, [
      ("clients", "clients", "d"), ("requests", "requests", "d"), ("tokens_per_s", "tokens/s", ",.0f"),
      ("x_one_at_a_time", "x one at a time", ".2f"), ("x_transformers_static", "x transformers", ".2f"),
      ("ttft_p50_s", "TTFT p50 s", ".3f"), ("ttft_p99_s", "TTFT p99 s", ".3f"),
      ("latency_p50_s", "latency p50 s", ".2f"), ("latency_p99_s", "latency p99 s", ".2f")]))
  print(f"\ngptrl's offline sampler on the same prompts (no server): {ceiling['batch_1_tokens_per_s']:,.0f} tokens/s "
        f"one at a time, {ceiling['batch_16_tokens_per_s']:,.0f} in batches of 16 (x{ceiling['batch_16_over_1']:.2f}: "
        "what batching gains one engine)")
  if peer:
    print(f"transformers generate, static batches of {peer['batch']}: {peer['tokens_per_s']:,.0f} tokens/s "
          f"({peer['requests']} requests)")
  benchlib.write_json(args.out, {"device": info, "args": vars(args), "model": MODEL, "runs": runs, "peer": peer,
                                 "offline": ceiling})
  return 0


if __name__ == "__main__":
  sys.exit(main())
