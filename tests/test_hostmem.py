"""gptrl/hostmem.py: when the host allocator is tuned, and that it stops XLA:CPU's per-run page faults.

The effect is measured in child processes (malloc settings are per process and must precede JAX's threads): the
same jitted program, whose 256 MB temporary glibc would otherwise map and unmap on every run, is run with
`system` and with `reuse`, and the minor page faults per run are compared.
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys

import pytest

from gptrl import config as config_lib
from gptrl import hostmem

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys
from gptrl import hostmem
tuned = hostmem.configure(sys.argv[1])
import jax, jax.numpy as jnp
x = jnp.ones((65536, 64), jnp.float32)
w = jnp.full((64, 1024), 1e-3, jnp.float32)
f = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w) @ w.T))  # tanh(x @ w): a 256 MB temporary of the executable
for _ in range(2):
  f(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
runs = 4
for _ in range(runs):
  f(x, w).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / runs
print(json.dumps({"tuned": tuned, "faults_per_run": faults}))
"""


def _child(mode: str) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True, timeout=300,
                       check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="tunes glibc only")
def test_reuse_stops_the_page_faults_of_xla_temporaries():
  system, reuse = _child("system"), _child("reuse")
  assert not system["tuned"] and reuse["tuned"]
  temp_pages = 65536 * 1024 * 4 // 4096
  # glibc's defaults: the temporary is mapped afresh each run, so (nearly) all of its pages fault in again.
  assert system["faults_per_run"] > 0.5 * temp_pages, system
  assert reuse["faults_per_run"] < 0.05 * temp_pages, reuse


def test_auto_follows_the_platform_jax_will_use(monkeypatch):
  assert hostmem.jax_runs_on_cpu({"JAX_PLATFORMS": "cpu"})
  assert hostmem.jax_runs_on_cpu({"JAX_PLATFORMS": "cpu,tpu"})
  assert not hostmem.jax_runs_on_cpu({"JAX_PLATFORMS": "tpu"})
  assert not hostmem.jax_runs_on_cpu({"JAX_PLATFORMS": "cuda,cpu"})
  # Without JAX_PLATFORMS: an installed accelerator plugin means its devices will be used.
  monkeypatch.setattr(hostmem.importlib.metadata, "entry_points", lambda group: ["jax_cuda12_plugin"])
  assert not hostmem.jax_runs_on_cpu({})
  monkeypatch.setattr(hostmem.importlib.metadata, "entry_points", lambda group: [])
  monkeypatch.setattr(hostmem.importlib.util, "find_spec", lambda name: None)
  assert hostmem.jax_runs_on_cpu({})
  # "auto" on an accelerator, and "system", leave malloc alone.
  monkeypatch.setattr(hostmem, "jax_runs_on_cpu", lambda: False)
  monkeypatch.setattr(hostmem, "_glibc", lambda: pytest.fail("malloc must not be touched"))
  assert not hostmem.configure("auto")
  assert not hostmem.configure("system")


def test_a_process_that_already_runs_jax_is_left_alone(monkeypatch):
  """A test (or notebook) calling a CLI's main() in-process must not retune the allocator under JAX's threads."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.devices()
  monkeypatch.setattr(hostmem, "_glibc", lambda: pytest.fail("malloc must not be touched"))
  monkeypatch.setattr(hostmem, "_applied", None)
  assert not hostmem.configure("reuse")
  assert not any(k.startswith("MALLOC_") for k in os.environ if k not in _MALLOC_ENV_AT_IMPORT)


_MALLOC_ENV_AT_IMPORT = {k for k in os.environ if k.startswith("MALLOC_")}


def test_unknown_modes_are_refused():
  with pytest.raises(ValueError, match="host_malloc must be one of"):
    hostmem.configure("tcmalloc")
  with pytest.raises(config_lib.ConfigError, match="distributed.host_malloc"):
    config_lib.DistributedConfig(host_malloc="reused")
