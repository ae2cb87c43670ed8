"""Shared measuring tools of the benchmarks: the machine's limits, interleaved timing, JSON and tables.

These machines are shared and noisy, so every benchmark reports ratios measured in one run:
  * `matmul_peak` and `memory_bandwidth` measure the machine's limits in the same process as the workload;
  * `interleaved` times several workloads round-robin (a, b, a, b, ...), so a burst of load from elsewhere
    hits all of them alike, and reports each one's best and median; a ratio of two workloads is taken from
    their best times and, per round, from the median of the per-round ratios.
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable, Mapping, Sequence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from gptrl import hostmem  # pylint: disable=wrong-import-position

# The host allocator gptrl.launch sets up by default (gptrl/hostmem.py), before JAX starts. The peers run under
# the same settings: torch in this process, trl's subprocess through the exported MALLOC_* variables.
# GPTRL_HOST_MALLOC=system measures with glibc's defaults.
HOST_MALLOC = os.environ.get("GPTRL_HOST_MALLOC", "auto")
HOST_MALLOC_TUNED = hostmem.configure(HOST_MALLOC, export_env=True)

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position


def device_info() -> dict[str, Any]:
  """What ran the benchmark: the JAX device, CPU count and library versions."""
  device = jax.devices()[0]
  info = {"platform": device.platform, "kind": device.device_kind, "devices": jax.device_count(),
          "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
          "jax": jax.__version__, "host_malloc": "reuse" if HOST_MALLOC_TUNED else "system"}
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    if names:
      info["cpu_model"] = names[0]
  except OSError:
    pass
  return info


def matmul_peak(sizes: Sequence[int] = (1024, 2048, 3072), repeats: int = 5, dtype: Any = jnp.float32) -> dict:
  """The best FLOP/s of square `dtype` matmuls (2 n^3 FLOPs each), compiled first, over `sizes`."""
  per_size = {}
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      dot(a, b).block_until_ready()
      best = min(best, time.perf_counter() - t0)
    per_size[str(n)] = 2.0 * n ** 3 / best
  return {"flops": max(per_size.values()), "per_size_flops": per_size, "dtype": jnp.dtype(dtype).name}


def memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> dict:
  """The best bytes/s of a jitted, donated `x * 1.5 + 1` over a float32 array of `megabytes` (read once and
  written once in place; far larger than the caches): the streaming bandwidth a memory-bound step (decoding)
  can hope for. Donation matters: a fresh output buffer each call would time page faults, not memory."""
  n = megabytes * (1 << 20) // 4
  fn = jax.jit(lambda v: v * 1.5 + 1.0, donate_argnums=0)
  x = fn(jnp.arange(n, dtype=jnp.float32))
  x.block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    x = fn(x)
    x.block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return {"bytes_per_s": 2.0 * 4 * n / best, "array_bytes": 4 * n}


def interleaved(workloads: Mapping[str, Callable[[], Any]], rounds: int, pause_s: float = 0.5) -> dict[str, list[float]]:
  """Seconds of each workload per round, run round-robin `rounds` times. Each callable must block until its
  work is done (block_until_ready, or return host values).

  `pause_s` of sleep before each workload lets the previous one's thread pool go idle: torch's OpenMP threads
  spin for a while after each op, and on a small machine that spinning would be timed as the next workload's
  (jax matmuls measured 25% slower right after a torch op without the pause).
  """
  times: dict[str, list[float]] = {name: [] for name in workloads}
  for _ in range(rounds):
    for name, fn in workloads.items():
      time.sleep(pause_s)
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return times


def summary(seconds: Sequence[float]) -> dict[str, float]:
  return {"best_s": min(seconds), "median_s": statistics.median(seconds), "rounds": len(seconds)}


def ratio(numerator_s: Sequence[float], denominator_s: Sequence[float]) -> dict[str, float]:
  """Numerator seconds over denominator seconds (with a peer's times over ours: our speed over the peer's), from
  the best times and as the median of the per-round ratios (interleaved rounds)."""
  per_round = [a / b for a, b in zip(numerator_s, denominator_s)]
  return {"best": min(numerator_s) / min(denominator_s), "median_per_round": statistics.median(per_round)}


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
  """A plain-text table: `columns` are (key, header, format spec), e.g. ("tokens_per_s", "tokens/s", ",.0f")."""
  cells = [[h for _, h, _ in columns]]
  for row in rows:
    line = []
    for key, _, spec in columns:
      value = row.get(key)
      line.append("-" if value is None else format(value, spec) if spec else str(value))
    cells.append(line)
  widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
  out = []
  for j, r in enumerate(cells):
    out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if j == 0:
      out.append("  ".join("-" * w for w in widths))
  return "\n".join(out)


def write_json(path: str, report: Mapping[str, Any]) -> None:
  if not path:
    return
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2, default=_jsonable)
  print(f"\nWrote {path}")


def _jsonable(x: Any) -> Any:
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def gpt2_config(cfg: Any, **special_ids: int | None) -> Any:
  """transformers.GPT2Config of the gptrl model `cfg` (GPT-2's architecture): the peer's identical model."""
  import transformers  # pylint: disable=import-outside-toplevel
  from gptrl import hf  # pylint: disable=import-outside-toplevel
  hf_cfg = hf.hf_config_from_model_config(cfg, special_ids={"bos_token_id": None, "eos_token_id": None,
                                                            **special_ids}, dtype="float32")
  for key in ("architectures", "model_type", "dtype"):
    hf_cfg.pop(key)
  return transformers.GPT2Config(**hf_cfg)


def torch_threads() -> int:
  """Pins torch's intra-op threads to the CPU count (what XLA's CPU client uses) and returns it."""
  import torch  # pylint: disable=import-outside-toplevel
  n = os.cpu_count() or 1
  torch.set_num_threads(n)
  return n
