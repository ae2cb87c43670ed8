"""What every gradient-trained stage shares: the train state, the jitted train step, resume and rollback, and
`GradientTask`, the gradient step as a unit of work of the one run loop (gptrl/loop.py).

A stage supplies a loss function `loss_fn(params, batch, rng) -> (loss_sum, sums)` where `sums["weight"]` is
the normaliser (e.g. the number of target tokens), plus its data iterator and its eval/sample callbacks
(gptrl/stages/recipe.py puts them together).

Numerics guard: the jitted step skips (by selection) an update whose loss or gradient norm is not finite or
whose loss is a spike against the running statistics of recent good steps (`is_loss_spike`,
`update_loss_stats`), counting both in `TrainState.numerics`. After `train.max_bad_steps` skipped steps in a
row the loop rolls params and optimizer state back to the newest checkpoint from before they began and goes on
with the next batches (PaLM's recipe); after `train.max_rollbacks` rollbacks it stops with
TrainingDivergedError. Every decision depends only on the state and the data, so a resumed run repeats it.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptrl import checkpoint as ckpt_lib
from gptrl import data as data_lib
from gptrl import loop as loop_lib
from gptrl import sharding
from gptrl.config import TrainConfig

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


def _init_state(init_params: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation):
  def init(rng):
    init_rng, step_rng = jax.random.split(rng)
    params = init_params(init_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(step_rng), numerics=init_numerics())
  return init


def abstract_train_state(init_params: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation,
                         mesh: jax.sharding.Mesh) -> tuple[TrainState, Any]:
  """(the train state as ShapeDtypeStructs carrying their shardings, the shardings): what `create_train_state`
  would make, without allocating anything (gptrl/compile.py lowers the train step on it)."""
  init = _init_state(init_params, optimizer)
  key = jax.eval_shape(lambda: jax.random.key(0))  # abstract: nothing may run on a compile-only mesh
  with sharding.activate(mesh):
    abstract = jax.eval_shape(init, key)
    shardings = sharding.tree_shardings(abstract, mesh)
  unboxed = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
                         abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed, shardings), shardings


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
  init = _init_state(init_params, optimizer)
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


class JittedStep:
  """A jitted step bound to its mesh: called, it runs in the mesh's context (logical axis rules); `lower(...)`
  lowers the same program for abstract arguments (gptrl/compile.py compiles it for a TPU slice)."""

  def __init__(self, jitted: Any, mesh: jax.sharding.Mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args):
    with sharding.activate(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with sharding.activate(self.mesh):
      return self.jitted.lower(*args)


def jit_train_step(train_step: Callable, state_shardings: Any, mesh: jax.sharding.Mesh) -> JittedStep:
  """jit with explicit shardings: state in its layout (donated), batch over the data axes, metrics replicated."""
  return JittedStep(jax.jit(train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                            out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,)), mesh)


# ----------------------------------------------------------------------------------------------
# Resume, rollback, and the gradient step as the run loop's unit of work.


def resume(checkpointer: ckpt_lib.Checkpointer, state: TrainState, state_shardings: Any, *, tokenizer_sha256: str,
           fingerprint: str, fingerprint_parts: dict[str, Any], train_iter: Any,
           reset_data_position: bool = False, parents: dict[str, dict[str, Any]] | None = None,
           allow_changed: dict[str, bool] | None = None) -> tuple[int, TrainState, dict[str, Any]] | None:
  """Restores this workdir's newest valid checkpoint into (state, train_iter), checking that it belongs to the
  same tokenizer, data pipeline and parent checkpoints; returns (step, state, the checkpoint's data item), or
  None when there is none (a fresh start).

  A data pipeline whose fingerprint differs from the saved one is refused (naming what differs), unless
  `reset_data_position` (config data.reset_position): then the state is restored and `train_iter` keeps its
  fresh position; the returned data item then has "position_reset": True and no saved iterator positions.
  `parents` (checkpoint.parents_of(cfg)) that differ from those the checkpoint's meta recorded are refused
  unless `allow_changed[role]`; the returned data item's "parent_changes" lists the accepted changes, earlier
  ones included, for the next checkpoints' meta.
  """
  restored = checkpointer.restore_latest_valid(ckpt_lib.abstract_like(state, state_shardings))
  if restored is None:
    return None
  step, state, data_state, meta = restored
  where = f"{checkpointer.directory}/{step}"
  ckpt_lib.check_tokenizer(meta, tokenizer_sha256, where=f"The checkpoint {where}")
  changes = ckpt_lib.check_parents(meta, parents or {}, where=where, allowed=allow_changed or {})
  data_state = {**data_state, "parent_changes": list(meta.get("parent_changes") or []) + changes}
  try:
    data_lib.check_fingerprint(data_state["fingerprint"], fingerprint, where=where,
                               saved_parts=data_state.get("fingerprint_parts"), current_parts=fingerprint_parts)
  except data_lib.DataError:
    if not reset_data_position:
      raise
    saved_parts = data_state.get("fingerprint_parts")
    differs = data_lib.fingerprint_differences(saved_parts, fingerprint_parts) if saved_parts else "unrecorded parts"
    logging.warning("data.reset_position=True: the data position saved in %s belongs to another data pipeline "
                    "(differs in: %s); restored the model, optimizer state and step %d, and starting the data "
                    "iterator from the beginning.", where, differs, step)
    return step, state, {**data_state, "iterator": None, "ptx_iterator": None, "position_reset": True}
  train_iter.set_state(data_state["iterator"])
  logging.info("Resumed from %s.", where)
  return step, state, data_state


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
      restored, data, _ = checkpointer.restore(target, abstract)
      break
    except ckpt_lib.CheckpointError as e:  # damaged (and set aside by the Checkpointer): try the one before
      if target == candidates[0]:
        raise TrainingDivergedError(f"Training stopped at {unit} {done}: {what}, and no checkpoint to roll back to "
                                    f"could be restored (the oldest: {e}).") from e
      logging.error("Cannot roll back to %s/%d (%s); trying the checkpoint before it.", checkpointer.directory,
                    target, e)
  saved = jax.device_get(restored.numerics)
  numerics = numerics.replace(bad_streak=np.int32(0), rollbacks=np.int32(rollbacks + 1), good_steps=saved.good_steps,
                              loss_mean=saved.loss_mean, loss_var=saved.loss_var)
  state = jax.device_put(state.replace(params=restored.params, opt_state=restored.opt_state, numerics=numerics),
                         shardings)
  logging.warning("Rolled back at %s %d: %s; restored the params and optimizer state of %s/%d and going on with "
                  "the next batches (rollback %d of at most %d).", unit, done, what, checkpointer.directory, target,
                  rollbacks + 1, train_cfg.max_rollbacks)
  return state, target, data


class GradientTask(loop_lib.Task):
  """A gradient stage's unit of work for gptrl/loop.py: one batch of `train_iter` through the jitted `train_step`.

  Metrics of step s are fetched after step s+1 is dispatched (`lagged`), so the host never stalls the device; so
  is the numerics verdict of step s: when it completes `train.max_bad_steps` skipped steps in a row, step s+1
  (already running on the bad state) is discarded with them, params and optimizer state roll back (`rollback`),
  and the loop saves a checkpoint at once, so later rollbacks and resumes start from the rolled-back state.
  A checkpoint's data item holds the iterator's position and the data pipeline's fingerprint (and its parts, so
  that a refused resume names what differs).
  """
  lagged = True
  print_samples = True

  def __init__(self, *, train_step: Callable, train_iter: Iterator[dict[str, np.ndarray]], mesh: jax.sharding.Mesh,
               checkpointer: ckpt_lib.Checkpointer, train_cfg: TrainConfig, meta: dict[str, Any],
               data_fingerprint: str, data_fingerprint_parts: dict[str, Any], tokens_per_step: int,
               flops_per_step: float = 0.0, eval_fn: Callable[[TrainState], dict[str, float]] | None = None,
               sample_fn: Callable[[TrainState], list[str]] | None = None,
               final_meta_fn: Callable[[TrainState], dict[str, Any]] | None = None):
    """`final_meta_fn(state)`, called once after the last step, returns entries added to that checkpoint's meta
    (and logged as final/<name> when numeric), e.g. the reward model's normalisation offset."""
    self.train_step, self.train_iter, self.mesh, self.checkpointer = train_step, train_iter, mesh, checkpointer
    self.train_cfg, self.meta = train_cfg, meta
    self.data_fingerprint, self.data_fingerprint_parts = data_fingerprint, data_fingerprint_parts
    self.tokens_per_step, self.flops_per_step = tokens_per_step, flops_per_step
    self.eval_fn, self.sample_fn, self.final_meta_fn = eval_fn, sample_fn, final_meta_fn
    self._prev_streak: Any = None  # skipped steps in a row before the step about to run (a device scalar)
    self._prev_metrics: dict[str, Any] | None = None

  def step(self, state: TrainState, index: int) -> loop_lib.Outcome:
    if self._prev_streak is None:  # a resumed run continues the checkpoint's count
      self._prev_streak = int(jax.device_get(state.numerics.bad_streak)) if self.train_cfg.max_bad_steps else 0
    state, metrics = self.train_step(state, sharding.host_to_global(next(self.train_iter), self.mesh))
    self.checkpointer.poll()  # a failed background save stops the run now, not at the next save
    return loop_lib.Outcome(state, metrics)

  def check(self, state: TrainState, index: int, outcome: loop_lib.Outcome) -> tuple[TrainState, dict[str, Any], bool]:
    cfg, state, metrics = self.train_cfg, outcome.state, outcome.metrics
    if not cfg.max_bad_steps:
      return state, metrics, False
    streak = int(self._prev_streak)  # the previous step's verdict: waits for it while this step runs
    if streak and self._prev_metrics is not None:
      m = jax.device_get({k: self._prev_metrics[k] for k in ("train/loss", "train/grad_norm", "train/spikes")})
      logging.warning("Step %d skipped (%s: loss %.5g, grad norm %.5g); %d skipped in a row.", index,
                      "loss spike" if m["train/spikes"] else "not finite", m["train/loss"], m["train/grad_norm"],
                      streak)
    if streak < cfg.max_bad_steps:
      self._prev_streak, self._prev_metrics = metrics["train/bad_streak"], metrics
      return state, metrics, False
    state, _, _ = rollback(self.checkpointer, state, done=index + 1, streak=streak, first_bad=index - streak,
                           train_cfg=cfg)
    self._prev_streak, self._prev_metrics = 0, None
    # This step's row shows the state after the rollback, not the discarded update's counts.
    metrics = {**metrics, "train/bad_streak": 0, "train/rollbacks": int(jax.device_get(state.numerics.rollbacks))}
    return state, metrics, True

  def save(self, state: TrainState, done: int) -> None:
    data = {"iterator": self.train_iter.get_state(), "fingerprint": self.data_fingerprint,
            "fingerprint_parts": self.data_fingerprint_parts}
    self.checkpointer.save(done, state, data=data, meta=self.meta)

  def wait(self) -> None:
    self.checkpointer.wait()

  def evaluate(self, state: TrainState, done: int) -> tuple[dict[str, float], list[str] | None]:
    metrics = self.eval_fn(state) if self.eval_fn is not None else {}
    texts = self.sample_fn(state) if self.sample_fn is not None else None
    return metrics, texts

  def finish(self, state: TrainState) -> dict[str, Any]:
    if self.final_meta_fn is None:
      return {}
    extra = self.final_meta_fn(state)
    self.meta = {**self.meta, **extra}
    return extra

  def postfix(self, metrics: dict[str, float]) -> dict[str, str]:
    return {"loss": f"{metrics['train/loss']:.3f}", "tok_s": f"{metrics.get('train/tokens_per_sec', 0):.0f}"}
