"""What every gradient-trained stage shares: the train state, the jitted train step, and the training loop.

A stage supplies a loss function `loss_fn(params, batch, rng) -> (loss_sum, sums)` where `sums["weight"]` is
the normaliser (e.g. the number of target tokens), plus its data iterator and its eval/sample callbacks. The
loop owns checkpointing, resume, preemption, logging and the progress bar.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import time
from typing import Any, Callable, Iterator, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils

from gptrl import checkpoint as ckpt_lib
from gptrl import sharding
from gptrl.config import TrainConfig
from gptrl.metrics import MetricsWriter

# Exit code of a run stopped by preemption after saving (EX_TEMPFAIL: "try again"); launchers retry on it.
EXIT_PREEMPTED = 75

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree checkpointed as a whole."""
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 key data; the step's key is fold_in(key, step), so resume replays the same draws


def create_train_state(init_params: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation,
                       seed: int, mesh: jax.sharding.Mesh) -> tuple[TrainState, Any]:
  """Initialises the state directly into its sharded layout (no full copy on one device).

  Args:
    init_params: rng -> params, boxed with logical axis names (e.g. `lambda r: model.init(r, x)["params"]`).
    optimizer: the gradient transformation whose state goes in the TrainState.
    seed: the run's seed; parameter init and the per-step RNG derive from it.
    mesh: the device mesh.
  Returns:
    (state, state_shardings), the latter a TrainState of NamedShardings.
  """
  def init(rng):
    init_rng, step_rng = jax.random.split(rng)
    params = init_params(init_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(step_rng))

  rng = jax.random.key(seed)
  with sharding.activate(mesh):
    abstract = jax.eval_shape(init, rng)
    shardings = sharding.tree_shardings(abstract, mesh)
    state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, lr_schedule: optax.Schedule,
                    grad_accum_steps: int = 1) -> Callable[[TrainState, Mapping[str, jax.Array]], Any]:
  """The (unjitted) train step: accumulate gradients over micro-batches, clip, update.

  The loss is sum(loss) / sum(weight) over the whole global batch, whatever the micro-batching. A step whose
  loss or gradient norm is not finite leaves params and optimizer state unchanged (selected, not multiplied:
  0 * NaN is NaN) and reports `train/skipped` = 1.
  """
  def grads_of(params, batch, rng):
    (loss_sum, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
    return loss_sum, sums, grads

  def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if grad_accum_steps == 1:
      loss_sum, sums, grads = grads_of(state.params, batch, rng)
    else:
      # Micro-batch i takes rows i, i+A, i+2A, ...: every device keeps an equal share of each micro-batch.
      def split(x):
        x = x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
      micro_batches = jax.tree.map(split, dict(batch))

      def accumulate(carry, inputs):
        micro_batch, index = inputs
        micro_batch = jax.tree.map(
            lambda x: nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1)), micro_batch)
        loss_sum, sums, grads = grads_of(state.params, micro_batch, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (loss_sum, sums, grads)), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grads_of, state.params,
                                                          jax.tree.map(lambda x: x[0], micro_batches), rng))
      (loss_sum, sums, grads), _ = jax.lax.scan(accumulate, zeros,
                                                (micro_batches, jnp.arange(grad_accum_steps)))
    weight = jnp.maximum(sums["weight"], 1.0)
    loss = loss_sum / weight
    grads = jax.tree.map(lambda g: g / weight, grads)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(step=state.step + 1, params=keep(new_params, state.params),
                              opt_state=keep(new_opt_state, state.opt_state))
    metrics = {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": lr_schedule(state.step),
               "train/skipped": (~finite).astype(jnp.int32)}
    metrics.update({f"train/{k}": v / weight for k, v in sums.items() if k != "weight"})
    metrics["train/weight"] = sums["weight"]
    return new_state, metrics

  return train_step


def jit_train_step(train_step: Callable, state_shardings: Any, mesh: jax.sharding.Mesh) -> Callable:
  """jit with explicit shardings: state in its layout (donated), batch over the data axes, metrics replicated."""
  jitted = jax.jit(train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))

  def call(state, batch):
    with sharding.activate(mesh):
      return jitted(state, batch)
  return call


class PreemptionGuard:
  """Turns SIGTERM (and, in multi-process jobs, JAX's preemption sync point) into 'save and stop'."""

  def __init__(self):
    self._signalled = False
    self._previous = None
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. under some test runners): rely on the sync point only
      self._previous = None

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self._signalled = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          return True
      except RuntimeError:  # the preemption service is not running in this job
        pass
      # Every process must agree, or the collective save would hang on the ones that carry on.
      return bool(multihost_utils.process_allgather(np.array(self._signalled)).any())
    return self._signalled

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class Loop:
  """The pieces of one stage's training run."""
  workdir: str
  train_cfg: TrainConfig
  mesh: jax.sharding.Mesh
  train_step: Callable  # jitted (state, global_batch) -> (state, metrics)
  train_iter: Iterator[dict[str, np.ndarray]]  # this process's batches; has get_state()
  checkpointer: ckpt_lib.Checkpointer
  meta: dict[str, Any]  # saved with each checkpoint
  data_fingerprint: str
  data_fingerprint_parts: dict[str, Any]  # what the fingerprint hashes, so a refused resume names what differs
  tokens_per_step: int  # global tokens per optimizer step, for tokens/s
  eval_fn: Callable[[TrainState], dict[str, float]] | None = None
  sample_fn: Callable[[TrainState], list[str]] | None = None
  flops_per_step: float = 0.0  # model FLOPs per optimizer step, for achieved FLOP/s
  # Called once after the last step, before its checkpoint: returns entries added to that checkpoint's meta
  # (and logged as metrics when numeric), e.g. the reward model's normalisation offset.
  final_meta_fn: Callable[[TrainState], dict[str, Any]] | None = None


def save_checkpoint(loop: Loop, state: TrainState, step: int) -> None:
  data = {"iterator": loop.train_iter.get_state(), "fingerprint": loop.data_fingerprint,
          "fingerprint_parts": loop.data_fingerprint_parts}
  loop.checkpointer.save(step, state, data=data, meta=loop.meta)


def run_loop(loop: Loop, state: TrainState, *, start_step: int) -> TrainState:
  """Trains from `start_step` to `train_cfg.steps`, logging, evaluating, sampling and checkpointing.

  Metrics of step s are fetched after step s+1 is dispatched, so the host never stalls the device.
  Exits the process with EXIT_PREEMPTED after saving when preempted.
  """
  cfg = loop.train_cfg
  is_main = jax.process_index() == 0
  # A fresh start (step 0) keeps no earlier rows: a run killed before its first checkpoint starts over.
  writer = MetricsWriter(loop.workdir, enabled=is_main, resume_step=start_step if start_step else -1)
  guard = PreemptionGuard()
  bar = tqdm.tqdm(total=cfg.steps, initial=start_step, disable=not (is_main and cfg.progress_bar),
                  dynamic_ncols=True, desc="train", file=sys.stderr)
  pending: tuple[int, Any] | None = None
  last_log = (start_step, time.perf_counter())

  def flush(pending):
    nonlocal last_log
    step, metrics = pending
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    steps_done = step - last_log[0]
    if steps_done > 0:
      metrics["train/tokens_per_sec"] = steps_done * loop.tokens_per_step / (now - last_log[1])
      metrics["train/steps_per_sec"] = steps_done / (now - last_log[1])
      if loop.flops_per_step:
        metrics["train/flops_per_sec"] = steps_done * loop.flops_per_step / (now - last_log[1])
    last_log = (step, now)
    writer.write(step, metrics)
    bar.set_postfix(loss=f"{metrics['train/loss']:.3f}",
                    tok_s=f"{metrics.get('train/tokens_per_sec', 0):.0f}", refresh=False)

  try:
    if start_step == 0 and cfg.eval_at_start:
      evaluate(loop, state, 0, writer)
      last_log = (0, time.perf_counter())
    for step in range(start_step, cfg.steps):
      if guard.should_stop(step):
        if pending:
          flush(pending)
        save_checkpoint(loop, state, step)
        loop.checkpointer.wait()
        logging.warning("Preempted at step %d: checkpoint saved; exiting with code %d.", step, EXIT_PREEMPTED)
        bar.close()
        writer.close()
        sys.exit(EXIT_PREEMPTED)
      batch = sharding.host_to_global(next(loop.train_iter), loop.mesh)
      state, metrics = loop.train_step(state, batch)
      if pending:
        flush(pending)
        pending = None
      done = step + 1
      bar.update(1)
      if done % cfg.log_every == 0 or done == cfg.steps:
        pending = (done, metrics)
      if done % cfg.eval_every == 0 or done == cfg.steps:
        if pending:
          flush(pending)
          pending = None
        evaluate(loop, state, done, writer)
        last_log = (done, time.perf_counter())  # eval time is not training throughput
      if done == cfg.steps and loop.final_meta_fn is not None:
        extra = loop.final_meta_fn(state)
        loop.meta = {**loop.meta, **extra}
        writer.write(done, {f"final/{k}": float(v) for k, v in extra.items() if isinstance(v, (int, float))})
      if done % cfg.checkpoint_every == 0 or done == cfg.steps:
        save_checkpoint(loop, state, done)
    if pending:
      flush(pending)
    loop.checkpointer.wait()
  finally:
    bar.close()
    writer.close()
    guard.restore()
  return state


def evaluate(loop: Loop, state: TrainState, step: int, writer: MetricsWriter) -> None:
  """Runs the stage's eval and sampling callbacks and logs what they return."""
  if loop.eval_fn is not None:
    metrics = loop.eval_fn(state)
    writer.write(step, metrics)
    logging.info("step %d eval: %s", step, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
  if loop.sample_fn is not None:
    texts = loop.sample_fn(state)
    writer.write_texts(step, "samples", texts)
    if jax.process_index() == 0:
      tqdm.tqdm.write(f"--- samples at step {step} ---")
      for text in texts:
        tqdm.tqdm.write(text.rstrip() + "\n---")
