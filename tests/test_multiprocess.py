"""Multi-host correctness on one machine: two CPU processes joined by jax.distributed (a coordinator on 127.0.0.1)
run the real training loop (gptrl/trainer.py: train step, Orbax checkpoints, resume) on one mesh spanning both,
and must end where one process driving all the devices ends.

Each process has 2 CPU devices; the mesh is data=1 x fsdp=2 x tensor=2 over the 4, so every parameter and
optimizer state is split across the two processes (fsdp) and within each (tensor), and each process reads its
own rows of every global batch. Checked: the two processes' rows assembled into the global batch equal the
one-process batch; a checkpoint written by both processes, restored by both, resumes training; the final
parameters equal those of one process over 4 devices trained without interruption.

This file is also the worker: `python tests/test_multiprocess.py WORKDIR PROCESS_ID NUM_PROCESSES PORT`.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, RESTART_AT, BATCH, SEQ_LEN, VOCAB = 4, 2, 8, 32, 256


def worker(workdir: str, process_id: int, num_processes: int, port: int) -> None:
  """One process of the job: train STEPS steps, stopping at RESTART_AT to restore from the checkpoint."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from gptrl import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from gptrl import config as config_lib  # pylint: disable=import-outside-toplevel
  from gptrl import data as data_lib  # pylint: disable=import-outside-toplevel
  from gptrl import distributed  # pylint: disable=import-outside-toplevel
  from gptrl import model as model_lib  # pylint: disable=import-outside-toplevel
  from gptrl import optim  # pylint: disable=import-outside-toplevel
  from gptrl import sharding  # pylint: disable=import-outside-toplevel
  from gptrl import trainer  # pylint: disable=import-outside-toplevel
  from gptrl import loop as loop_lib  # pylint: disable=import-outside-toplevel
  from gptrl import losses  # pylint: disable=import-outside-toplevel

  if num_processes > 1:  # the launcher's path: an explicit coordinator in the config
    assert distributed.maybe_initialize(config_lib.DistributedConfig(
        coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id))
  assert (jax.process_count(), jax.device_count()) == (num_processes, 4)
  report = {"process_index": jax.process_index(), "local_devices": jax.local_device_count()}

  mesh = sharding.make_mesh(config_lib.MeshConfig(data=1, fsdp=2, tensor=2))
  tokens = np.random.default_rng(0).integers(0, VOCAB, size=20_000).astype(np.int32)

  def dataset(index: int, count: int):
    return iter(data_lib.lm_dataset(tokens, seq_len=SEQ_LEN, seed=0, process_index=index, process_count=count,
                                    global_batch_size=BATCH))

  # Data sharding by process: this process's rows, assembled over the mesh and gathered back whole, are the
  # global batch one process reads alone.
  local = next(dataset(jax.process_index(), jax.process_count()))
  assert local["inputs"].shape[0] == BATCH // num_processes
  global_batch = sharding.host_to_global(local, mesh)
  gathered = multihost_utils.process_allgather(global_batch["inputs"], tiled=True)
  report["batch_equals_single_process"] = bool(np.array_equal(gathered, next(dataset(0, 1))["inputs"]))

  model_cfg = config_lib.ModelConfig(vocab_size=VOCAB, num_layers=2, num_heads=4, d_model=64, max_len=SEQ_LEN)
  model = model_lib.GPT(model_cfg)
  optim_cfg = config_lib.OptimConfig(lr=1e-2, warmup_steps=1)
  optimizer = optim.make_optimizer(optim_cfg, STEPS)
  init = lambda rng: model.init(rng, np.zeros((1, SEQ_LEN), np.int32))["params"]
  state, shardings = trainer.create_train_state(init, optimizer, 0, mesh)
  step_fn = trainer.jit_train_step(trainer.make_train_step(losses.lm_loss_fn(model), optimizer,
                                                           optim.learning_rate_schedule(optim_cfg, STEPS)),
                                   shardings, mesh)
  fingerprint_parts = {"process_count": jax.process_count(), "batch": BATCH}
  fingerprint = data_lib.pipeline_fingerprint(**fingerprint_parts)
  checkpoints = os.path.join(workdir, "checkpoints")

  def loop(steps: int, state, train_iter, start: int):
    checkpointer = ckpt_lib.Checkpointer(checkpoints, keep=3, async_save=True)
    cfg = config_lib.TrainConfig(steps=steps, log_every=1, eval_every=1000, checkpoint_every=RESTART_AT,
                                 progress_bar=False)
    task = trainer.GradientTask(
        train_step=step_fn, train_iter=train_iter, mesh=mesh, train_cfg=cfg, checkpointer=checkpointer,
        meta={"stage": "pretrain", "tokenizer_sha256": "synthetic"}, data_fingerprint=fingerprint,
        data_fingerprint_parts=fingerprint_parts, tokens_per_step=BATCH * SEQ_LEN)
    state = loop_lib.run(task, state, start=start, cadence=loop_lib.Cadence.of(cfg), workdir=workdir, desc="train")
    checkpointer.close()
    return state

  if num_processes > 1:  # stop at RESTART_AT, then restore what both processes wrote, and go on
    state = loop(RESTART_AT, state, dataset(jax.process_index(), jax.process_count()), 0)
    # The restore target: zeros in the same layout, so whatever the restored state holds came from the files.
    fresh = jax.tree.map(jax.numpy.zeros_like, state)
    train_iter = dataset(jax.process_index(), jax.process_count())
    checkpointer = ckpt_lib.Checkpointer(checkpoints, keep=3, async_save=False)
    start, state, _ = trainer.resume(checkpointer, fresh, shardings, tokenizer_sha256="synthetic",
                                    fingerprint=fingerprint, fingerprint_parts=fingerprint_parts,
                                    train_iter=train_iter)
    checkpointer.close()
    report["resumed_at"] = int(start)
    report["restored_step"] = int(jax.device_get(state.step))
    report["restored_params_nonzero"] = bool(all(float(jax.numpy.abs(x).sum()) > 0
                                                 for x in jax.tree.leaves(state.params)))
    state = loop(STEPS, state, train_iter, start)
  else:
    state = loop(STEPS, state, dataset(0, 1), 0)
  params = jax.tree_util.tree_flatten_with_path(multihost_utils.process_allgather(state.params, tiled=True))[0]
  if jax.process_index() == 0:
    np.savez(os.path.join(workdir, "final_params.npz"),
             **{"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in params})
  with open(os.path.join(workdir, f"report_{jax.process_index()}.json"), "w", encoding="utf-8") as f:
    json.dump(report, f)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, process_id: int, num_processes: int, port: int) -> subprocess.Popen:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
         "XLA_FLAGS": (os.environ.get("GPTRL_TEST_XLA_FLAGS", "")  # pytest's own flags (tests/conftest.py)
                       + f" --xla_force_host_platform_device_count={4 // num_processes}").strip()}
  for key in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES"):  # no other job to join
    env.pop(key, None)
  # pylint: disable-next=consider-using-with
  log = open(os.path.join(workdir, f"log_{process_id}.txt"), "w", encoding="utf-8")
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(workdir), str(process_id),
                           str(num_processes), str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait(procs, workdirs, timeout: float = 600) -> None:
  try:
    for proc in procs:
      proc.wait(timeout=timeout)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, workdir in zip(procs, workdirs):
    logs = "\n".join(open(os.path.join(workdir, f), encoding="utf-8").read()[-3000:]
                     for f in sorted(os.listdir(workdir)) if f.startswith("log_"))
    assert proc.returncode == 0, logs


def test_two_processes_shard_the_data_checkpoint_resume_and_match_one_process(tmp_path):
  two, one = tmp_path / "two", tmp_path / "one"
  two.mkdir()
  one.mkdir()
  port = _free_port()
  procs = [_start(two, i, 2, port) for i in range(2)] + [_start(one, 0, 1, 0)]
  _wait(procs, [two, two, one])

  reports = [json.loads((two / f"report_{i}.json").read_text()) for i in range(2)]
  assert sorted(r["process_index"] for r in reports) == [0, 1]
  assert all(r["local_devices"] == 2 for r in reports)
  assert all(r["batch_equals_single_process"] for r in reports)
  assert all(r["resumed_at"] == RESTART_AT and r["restored_step"] == RESTART_AT and r["restored_params_nonzero"]
             for r in reports)
  # Both processes wrote their shards of the checkpoint (one OCDBT store per process under the state item).
  state_dir = two / "checkpoints" / str(RESTART_AT) / "state"
  assert {p.name for p in state_dir.iterdir() if p.name.startswith("ocdbt.process_")} == {
      "ocdbt.process_0", "ocdbt.process_1"}, sorted(p.name for p in state_dir.iterdir())

  import numeric  # pylint: disable=import-outside-toplevel  (this file is also the workers' script: no jax at import)
  multi, single = np.load(two / "final_params.npz"), np.load(one / "final_params.npz")
  assert sorted(multi.files) == sorted(single.files) and len(multi.files) > 10
  for name in single.files:
    numeric.assert_close(multi[name], single[name], err_msg=name)


if __name__ == "__main__":
  if len(sys.argv) != 5:
    sys.exit(__doc__)
  worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
