"""What every gradient-trained stage shares: the train state, the jitted train step, and the training loop.

A stage supplies a loss function `loss_fn(params, batch, rng) -> (loss_sum, sums)` where `sums["weight"]` is
the normaliser (e.g. the number of target tokens), plus its data iterator and its eval/sample callbacks. The
loop owns checkpointing, resume, preemption, logging and the progress bar.

Numerics guard: the jitted step skips (by selection) an update whose loss or gradient norm is not finite or
whose loss is a spike against the running statistics of recent good steps (`is_loss_spike`,
`update_loss_stats`), counting both in `TrainState.numerics`. After `train.max_bad_steps` skipped steps in a
row the loop rolls params and optimizer state back to the newest checkpoint from before they began and goes on
with the next batches (PaLM's recipe); after `train.max_rollbacks` rollbacks it stops with
TrainingDivergedError. Every decision depends only on the state and the data, so a resumed run repeats it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
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
import orbax.checkpoint as ocp
import tqdm
from jax.experimental import multihost_utils

from gptrl import checkpoint as ckpt_lib
from gptrl import sharding
from gptrl.config import TrainConfig
from gptrl.metrics import MetricsWriter

# Exit code of a run stopped by preemption after saving (EX_TEMPFAIL: "try again"); launchers retry on it.
EXIT_PREEMPTED = 75

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


class TrainingDivergedError(RuntimeError):
  """Bad steps kept coming after the allowed rollbacks, or there was no checkpoint to roll back to."""


@flax.struct.dataclass
class NumericsState:
  """The numerics guard's counters and loss statistics (int32 / float32 scalars), checkpointed with the state so
  that a resumed run continues them."""
  bad_streak: jax.Array  # consecutive skipped steps, up to and including the latest
  skipped_total: jax.Array  # steps skipped in the whole run (non-finite loss or gradient, or a loss spike)
  spikes_total: jax.Array  # of those, the finite losses flagged as spikes
  rollbacks: jax.Array  # rollbacks to a checkpoint in the whole run
  good_steps: jax.Array  # steps whose loss entered the running statistics
  loss_mean: jax.Array  # running mean of the loss of good steps (see update_loss_stats)
  loss_var: jax.Array  # running variance of the same


def init_numerics() -> NumericsState:
  """All counters 0 and empty loss statistics."""
  zero = jnp.zeros((), jnp.int32)
  return NumericsState(bad_streak=zero, skipped_total=zero, spikes_total=zero, rollbacks=zero, good_steps=zero,
                       loss_mean=jnp.zeros((), jnp.float32), loss_var=jnp.zeros((), jnp.float32))


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree checkpointed as a whole."""
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 key data; the step's key is fold_in(key, step), so resume replays the same draws
  numerics: NumericsState  # the numerics guard's counters and loss statistics


def update_loss_stats(loss: jax.Array, mean: jax.Array, var: jax.Array, count: jax.Array, *,
                      window: int) -> tuple[jax.Array, jax.Array]:
  """Adds one good step's loss to the running mean and variance of the loss.

  With weight w = max(1 / window, 1 / (count + 1)):
    delta = loss - mean;   mean' = mean + w * delta;   var' = (1 - w) * (var + w * delta^2),
  which is exactly the mean and (population) variance of all the losses so far, the t-th weighing
  w_t * prod_{j > t} (1 - w_j): a plain average over the first `window` losses, then an exponential one with
  decay 1 - 1/window.

  Args:
    loss: the new loss (float scalar).
    mean, var: the statistics of the `count` losses before it.
    count: how many losses the statistics hold (int scalar).
    window: the number of recent losses the exponential average roughly covers (>= 1).
  Returns:
    (mean', var'), float32.
  """
  loss, mean, var = (jnp.asarray(x, jnp.float32) for x in (loss, mean, var))
  w = jnp.maximum(1.0 / window, 1.0 / (jnp.asarray(count, jnp.float32) + 1.0))
  delta = loss - mean
  return mean + w * delta, (1.0 - w) * (var + w * delta * delta)


def is_loss_spike(loss: jax.Array, mean: jax.Array, var: jax.Array, count: jax.Array, *, zscore: float,
                  warmup: int) -> jax.Array:
  """True when a finite `loss` lies more than `zscore` standard deviations above the running `mean`.

  Only once the statistics hold `warmup` good losses (`count`); the standard deviation is taken as at least
  1e-3 * |mean|, so that a nearly constant loss (variance ~0) does not flag rounding noise. `zscore` <= 0: never.
  Returns a bool scalar.
  """
  if zscore <= 0:
    return jnp.zeros((), bool)
  loss, mean, var = (jnp.asarray(x, jnp.float32) for x in (loss, mean, var))
  std = jnp.maximum(jnp.sqrt(jnp.maximum(var, 0.0)), 1e-3 * jnp.abs(mean))
  return jnp.isfinite(loss) & (count >= warmup) & (loss > mean + zscore * std)


def spike_options(train_cfg: TrainConfig) -> dict[str, Any]:
  """The spike-detector keyword arguments of make_train_step, from the `train` config group."""
  return {"spike_zscore": train_cfg.spike_zscore, "spike_warmup": train_cfg.spike_warmup,
          "spike_window": train_cfg.spike_window}


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
                      rng=jax.random.key_data(step_rng), numerics=init_numerics())

  rng = jax.random.key(seed)
  with sharding.activate(mesh):
    abstract = jax.eval_shape(init, rng)
    shardings = sharding.tree_shardings(abstract, mesh)
    state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, lr_schedule: optax.Schedule,
                    grad_accum_steps: int = 1, *, spike_zscore: float = 0.0, spike_warmup: int = 50,
                    spike_window: int = 100, members: int = 1) -> Callable[[TrainState, Mapping[str, jax.Array]], Any]:
  """The (unjitted) train step: accumulate gradients over micro-batches, clip, update.

  The loss is sum(loss) / sum(weight) over the whole global batch, whatever the micro-batching. An ensemble of
  `members` independent models trained in one step (gptrl/reward_model.py RewardEnsemble) returns the sum of
  their loss sums and weights: the loss reported is then the members' mean, and the gradients are multiplied by
  `members`, so that each member's is that of its own loss, as if it were trained alone. A step whose
  loss or gradient norm is not finite, or whose loss is a spike (`is_loss_spike` with `spike_zscore` and
  `spike_warmup`; 0: off), leaves params and optimizer state unchanged (selected, not multiplied: 0 * NaN is
  NaN) and reports `train/skipped` = 1 (`train/spikes` = 1 for a spike). Only the losses of applied steps enter
  the running statistics (`update_loss_stats` with `spike_window`), so skipped values never shift them.
  Metrics also carry the run's totals from `state.numerics`: `train/skipped_total`, `train/spikes_total`,
  `train/bad_streak` (skipped steps in a row) and `train/rollbacks`.
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
    grads = jax.tree.map(lambda g: g * (members / weight), grads)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    stats = state.numerics
    spike = finite & is_loss_spike(loss, stats.loss_mean, stats.loss_var, stats.good_steps, zscore=spike_zscore,
                                   warmup=spike_warmup)
    good = finite & ~spike
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(good, n, o), new, old)
    mean, var = update_loss_stats(loss, stats.loss_mean, stats.loss_var, stats.good_steps, window=spike_window)
    skipped, spiked = (~good).astype(jnp.int32), spike.astype(jnp.int32)
    numerics = stats.replace(
        bad_streak=jnp.where(good, 0, stats.bad_streak + 1), skipped_total=stats.skipped_total + skipped,
        spikes_total=stats.spikes_total + spiked, good_steps=stats.good_steps + good.astype(jnp.int32),
        loss_mean=keep(mean, stats.loss_mean), loss_var=keep(var, stats.loss_var))
    # A branch, not an elementwise select over every parameter and moment (which cost 7% of a 12-layer step).
    params, opt_state = jax.lax.cond(good, lambda: (new_params, new_opt_state),
                                     lambda: (state.params, state.opt_state))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, numerics=numerics)
    metrics = {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": lr_schedule(state.step),
               "train/skipped": skipped, "train/spikes": spiked, "train/skipped_total": numerics.skipped_total,
               "train/spikes_total": numerics.spikes_total, "train/bad_streak": numerics.bad_streak,
               "train/rollbacks": numerics.rollbacks}
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


# ----------------------------------------------------------------------------------------------
# Restoring a TrainState, and rolling back to a checkpoint.


def _saved_state_keys(directory: str, step: int) -> set[str] | None:
  """Top-level names of checkpoint `step`'s saved state, or None when its metadata cannot be read."""
  try:
    return set(ocp.PyTreeCheckpointer().metadata(os.path.join(directory, str(step), "state")).item_metadata.keys())
  except Exception:  # pylint: disable=broad-except  # unreadable: the restore itself reports (or sets it aside)
    return None


def restore_target(directory: str, step: int, abstract_state: TrainState) -> Any:
  """The restore target for checkpoint `directory/step`: `abstract_state` (ShapeDtypeStructs), or a dict of its
  fields but `numerics` for a checkpoint written before TrainState had them (turned back by `as_train_state`),
  so that an older run's checkpoints still resume instead of failing the restore."""
  keys = _saved_state_keys(directory, step)
  if keys is not None and "params" in keys and "numerics" not in keys:
    return {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(TrainState) if f.name != "numerics"}
  return abstract_state


def as_train_state(restored: Any, fresh_numerics: NumericsState) -> TrainState:
  """A restored state as a TrainState; one restored through `restore_target`'s dict gets `fresh_numerics`."""
  if isinstance(restored, TrainState):
    return restored
  logging.warning("The checkpoint predates the numerics guard's counters; they start from 0.")
  return TrainState(**restored, numerics=fresh_numerics)


def rollback(checkpointer: ckpt_lib.Checkpointer, state: TrainState, *, done: int, streak: int, first_bad: int,
             train_cfg: TrainConfig, unit: str = "step") -> tuple[TrainState, int, dict[str, Any]]:
  """Rolls params, optimizer state and loss statistics back to the newest checkpoint from before a run of bad steps.

  The step, the RNG and the counters stay, and the data iterator is not touched: training goes on with the
  next batches, so the bad ones are skipped (PaLM). `bad_streak` restarts at 0 and `rollbacks` goes up by one.

  Args:
    checkpointer: the run's Checkpointer (its pending saves are awaited first).
    state: the current state, `done` steps (PPO: iterations) into the run.
    done: steps done, for messages.
    streak: how many updates in a row were skipped, for messages.
    first_bad: the step count when the bad steps began: the newest checkpoint at or before it is restored.
    train_cfg: `max_rollbacks` decides whether another rollback is allowed.
    unit: "step" or "iteration", for messages.
  Returns:
    (state, the restored checkpoint's step, that checkpoint's data item).
  Raises:
    TrainingDivergedError: `max_rollbacks` rollbacks were done already, or no checkpoint is old enough.
  """
  numerics = jax.device_get(state.numerics)
  rollbacks = int(numerics.rollbacks)
  checkpointer.wait()
  candidates = [k for k in checkpointer.all_steps() if k <= first_bad]
  what = (f"{streak} updates in a row were skipped from {unit} {first_bad + 1} on (non-finite or spiking loss; "
          f"{int(numerics.skipped_total)} skipped in the run, {int(numerics.spikes_total)} of them spikes)")
  advice = (f"Try a lower optim.lr, a longer optim.warmup_steps or a smaller optim.clip_norm, or look at the data "
            f"near {unit} {first_bad + 1}")
  problem = None
  if rollbacks >= train_cfg.max_rollbacks:
    problem = (f"{what}, after {rollbacks} rollback(s) already (train.max_rollbacks={train_cfg.max_rollbacks}). "
               f"{advice}; the checkpoints in {checkpointer.directory} are kept.")
  elif not candidates:
    problem = (f"{what}, and {checkpointer.directory} holds no checkpoint from {unit} {first_bad} or earlier to roll "
               f"back to. {advice}, or save checkpoints more often (train.checkpoint_every).")
  if problem is not None:
    message = f"Training stopped at {unit} {done}: {problem}"
    logging.error("%s", message)
    raise TrainingDivergedError(message)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  for target in reversed(candidates):
    try:
      restored, data, _ = checkpointer.restore(target, restore_target(checkpointer.directory, target, abstract))
      break
    except ckpt_lib.CheckpointError as e:  # damaged (and set aside by the Checkpointer): try the one before
      if target == candidates[0]:
        raise TrainingDivergedError(f"Training stopped at {unit} {done}: {what}, and no checkpoint to roll back to "
                                    f"could be restored (the oldest: {e}).") from e
      logging.error("Cannot roll back to %s/%d (%s); trying the checkpoint before it.", checkpointer.directory,
                    target, e)
  restored = as_train_state(restored, init_numerics())
  saved = jax.device_get(restored.numerics)
  numerics = numerics.replace(bad_streak=np.int32(0), rollbacks=np.int32(rollbacks + 1), good_steps=saved.good_steps,
                              loss_mean=saved.loss_mean, loss_var=saved.loss_var)
  state = jax.device_put(state.replace(params=restored.params, opt_state=restored.opt_state, numerics=numerics),
                         shardings)
  logging.warning("Rolled back at %s %d: %s; restored the params and optimizer state of %s/%d and going on with "
                  "the next batches (rollback %d of at most %d).", unit, done, what, checkpointer.directory, target,
                  rollbacks + 1, train_cfg.max_rollbacks)
  return state, target, data


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

  Metrics of step s are fetched after step s+1 is dispatched, so the host never stalls the device; so is the
  numerics verdict of step s: when it completes `train.max_bad_steps` skipped steps in a row, step s+1 (already
  running on the bad state) is discarded with them, params and optimizer state roll back (`rollback`), and a
  checkpoint is saved at once, so later rollbacks and resumes start from the rolled-back state.
  Exits the process with EXIT_PREEMPTED after saving when preempted.
  Raises:
    TrainingDivergedError: bad steps again after `train.max_rollbacks` rollbacks, or none possible.
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
  # Skipped steps in a row before the step about to run (a resumed run continues the checkpoint's count).
  prev_streak: Any = int(jax.device_get(state.numerics.bad_streak)) if cfg.max_bad_steps else 0
  prev_metrics: dict[str, Any] | None = None

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
        writer.sync()  # a bucket workdir's metrics rows first, then the checkpoint they lead up to
        save_checkpoint(loop, state, step)
        loop.checkpointer.wait()
        logging.warning("Preempted at step %d: checkpoint saved; exiting with code %d.", step, EXIT_PREEMPTED)
        bar.close()
        writer.close()
        sys.exit(EXIT_PREEMPTED)
      batch = sharding.host_to_global(next(loop.train_iter), loop.mesh)
      state, metrics = loop.train_step(state, batch)
      loop.checkpointer.poll()  # a failed background save stops the run now, not at the next save
      rolled_back = False
      if cfg.max_bad_steps:
        streak = int(prev_streak)  # the previous step's verdict: waits for it while this step runs
        if streak and prev_metrics is not None:
          m = jax.device_get({k: prev_metrics[k] for k in ("train/loss", "train/grad_norm", "train/spikes")})
          logging.warning("Step %d skipped (%s: loss %.5g, grad norm %.5g); %d skipped in a row.", step,
                          "loss spike" if m["train/spikes"] else "not finite", m["train/loss"], m["train/grad_norm"],
                          streak)
        if streak >= cfg.max_bad_steps:
          state, _, _ = rollback(loop.checkpointer, state, done=step + 1, streak=streak, first_bad=step - streak,
                                 train_cfg=cfg)
          rolled_back, prev_streak, prev_metrics = True, 0, None
          # This step's row shows the state after the rollback, not the discarded update's counts.
          metrics = {**metrics, "train/bad_streak": 0, "train/rollbacks": int(jax.device_get(state.numerics.rollbacks))}
        else:
          prev_streak, prev_metrics = metrics["train/bad_streak"], metrics
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
      if done % cfg.checkpoint_every == 0 or done == cfg.steps or rolled_back:
        if pending:  # its row goes with the checkpoint (a bucket workdir uploads the rows at `sync`)
          flush(pending)
          pending = None
        writer.sync()
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
