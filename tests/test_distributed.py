"""When the launcher joins a multi-process job (gptrl/distributed.py), decided from config and environment."""
from gptrl.config import DistributedConfig
from gptrl.distributed import initialize_kwargs


def test_single_process_by_default():
  assert initialize_kwargs(DistributedConfig(), env={}) is None


def test_tpu_pod_with_several_hosts_initializes_with_auto_detection():
  assert initialize_kwargs(DistributedConfig(), env={"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}) == {}


def test_single_host_tpu_vm_stays_single_process():
  assert initialize_kwargs(DistributedConfig(), env={"TPU_WORKER_HOSTNAMES": "localhost"}) is None


def test_slurm_job_with_several_tasks_initializes():
  assert initialize_kwargs(DistributedConfig(), env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == {}


def test_explicit_coordinator_from_config_is_passed_through():
  cfg = DistributedConfig(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)
  assert initialize_kwargs(cfg, env={}) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                                            "process_id": 1}


def test_coordinator_from_environment():
  assert initialize_kwargs(DistributedConfig(), env={"JAX_COORDINATOR_ADDRESS": "h:1"}) == {
      "coordinator_address": "h:1"}


def test_never_overrides_detection():
  cfg = DistributedConfig(initialize="never")
  assert initialize_kwargs(cfg, env={"TPU_WORKER_HOSTNAMES": "h0,h1"}) is None
