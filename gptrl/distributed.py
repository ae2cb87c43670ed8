"""Multi-process (multi-host) start-up: decide whether this is one process of many, and join the others.

Detected, in order: an explicit coordinator (config or `JAX_COORDINATOR_ADDRESS`), a Cloud TPU VM slice with
several hosts (`TPU_WORKER_HOSTNAMES` lists more than one), a Slurm job with several tasks. JAX's own
auto-detection then fills in what the config leaves out.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax

from gptrl.config import DistributedConfig


def initialize_kwargs(cfg: DistributedConfig, env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
  """Arguments for `jax.distributed.initialize`, or None when this is a single-process job.

  Args:
    cfg: the `distributed` config group.
    env: the environment (default `os.environ`), a parameter so tests can fake a pod.
  """
  env = os.environ if env is None else env
  if cfg.initialize == "never":
    return None
  kwargs: dict[str, Any] = {}
  coordinator = cfg.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")
  if coordinator:
    kwargs["coordinator_address"] = coordinator
  if cfg.num_processes > 0:
    kwargs["num_processes"] = cfg.num_processes
  if cfg.process_id >= 0:
    kwargs["process_id"] = cfg.process_id
  tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  slurm_tasks = int(env.get("SLURM_NTASKS", "1") or 1) if "SLURM_JOB_ID" in env else 1
  multi = bool(coordinator) or len(tpu_hosts) > 1 or slurm_tasks > 1 or cfg.num_processes > 1
  if cfg.initialize == "always" or multi:
    return kwargs
  return None


def maybe_initialize(cfg: DistributedConfig) -> bool:
  """Calls `jax.distributed.initialize` when this is one process of a multi-process job.

  Must run before any other JAX call. Returns True if it initialized.
  """
  kwargs = initialize_kwargs(cfg)
  if kwargs is None:
    return False
  logging.info("Joining a multi-process job: jax.distributed.initialize(%s)", kwargs)
  jax.distributed.initialize(**kwargs)
  logging.info("Process %d of %d; %d local / %d global devices.", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True
