"""Test setup shared by every module.

The fake 8-device CPU mesh must be configured before jax is imported anywhere, so it lives here.

Any XLA flags given to pytest (e.g. `XLA_FLAGS=--xla_cpu_max_isa=AVX2` to check that the numerical tests hold
under another code generation) are kept, for this process and, through `GPTRL_TEST_XLA_FLAGS`, for the
launcher subprocesses that `helpers.env()` starts.
"""
import os

os.environ.setdefault("GPTRL_TEST_XLA_FLAGS", os.environ.get("XLA_FLAGS", "").strip())
os.environ["XLA_FLAGS"] = (
    os.environ["GPTRL_TEST_XLA_FLAGS"] + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
