"""Tests of the numerics guard (gptrl/trainer.py) and of the data-position checks on resume (trainer.resume).

Skipped steps (non-finite or spiking loss) leave params bitwise unchanged and are counted; N in a row roll back to
the last checkpoint with the data moving forward; repeated rollbacks stop the run with a one-line error; the spike
detector and its running statistics match NumPy; a changed data pipeline is refused unless data.reset_position.
A linear model on 4-row batches keeps each in-process run to about a second.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gptrl import checkpoint as ckpt_lib
from gptrl import data as data_lib
from gptrl import loop as loop_lib
from gptrl import optim
from gptrl import sharding
from gptrl import trainer
from gptrl.config import MeshConfig, OptimConfig, TrainConfig
from helpers import REPO, run as run_launcher, write_corpus

DIM, ROWS = 4, 4
PARTS = {"sources": ["toy"], "seed": 0, "global_batch_size": ROWS, "process_count": 1, "tokenizer_sha256": "t"}


def _linear_loss(params, batch, rng):  # pylint: disable=unused-argument
  """Squared error of a linear model, times the batch's `scale` (a scale of 30 makes a finite loss spike)."""
  err = batch["x"] @ params["w"] - batch["y"][:, 0]
  return (batch["weights"][:, 0] * err * err).sum() * batch["scale"][0, 0], {"weight": batch["weights"].sum()}


def _batches(n: int, *, poison=(), spikes=(), seed=0) -> list[dict[str, np.ndarray]]:
  """n regression batches; those in `poison` hold an inf input, those in `spikes` scale their loss by 30."""
  rng = np.random.default_rng(seed)
  w_true = np.linspace(-1.0, 1.0, DIM).astype(np.float32)
  out = []
  for i in range(n):
    x = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    y = (x @ w_true + 0.3 * rng.normal(size=ROWS)).astype(np.float32)[:, None]
    if i in poison:
      x[0, 0] = np.inf
    out.append({"x": x, "y": y, "weights": np.ones((ROWS, 1), np.float32),
                "scale": np.full((ROWS, 1), 30.0 if i in spikes else 1.0, np.float32)})
  return out


def _setup(train_cfg: TrainConfig, lr: float = 0.05):
  """(fresh state, its shardings, jitted train step, mesh) of the linear model on one device."""
  mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  optim_cfg = OptimConfig(lr=lr, warmup_steps=0, weight_decay=0.0)
  optimizer = optim.make_optimizer(optim_cfg, 100)
  state, shardings = trainer.create_train_state(lambda r: {"w": jax.random.normal(r, (DIM,))}, optimizer, 0, mesh)
  step = trainer.jit_train_step(
      trainer.make_train_step(_linear_loss, optimizer, optim.learning_rate_schedule(optim_cfg, 100),
                              **trainer.spike_options(train_cfg)), shardings, mesh)
  return state, shardings, step, mesh


class _Killed(Exception):
  """Stands in for a kill -9: the run stops where it is."""


class _Iterator:
  """A list of batches as a resumable data iterator that records what it hands out; raises _Killed at `kill_at`."""

  def __init__(self, batches, kill_at=None):
    self.batches, self.kill_at, self.index, self.handed_out = batches, kill_at, 0, []

  def __iter__(self):
    return self

  def __next__(self):
    if self.index == self.kill_at:
      raise _Killed(self.index)
    self.handed_out.append(self.index)
    self.index += 1
    return self.batches[self.index - 1]

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = state["index"]


def _train_cfg(**overrides) -> TrainConfig:
  fields = dict(steps=20, log_every=1, eval_every=1000, checkpoint_every=4, keep_checkpoints=50, progress_bar=False,
                max_bad_steps=3, max_rollbacks=2)
  return TrainConfig(**{**fields, **overrides})


def _train(workdir: pathlib.Path, batches, cfg: TrainConfig, *, kill_at=None, parts=None, reset=False):
  """Runs (or resumes) the training loop in `workdir` as a stage does; returns (final state, iterator)."""
  parts = parts or PARTS
  fingerprint = data_lib.pipeline_fingerprint(**parts)
  state, shardings, step_fn, mesh = _setup(cfg)
  checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), keep=cfg.keep_checkpoints, async_save=True)
  it = _Iterator(batches, kill_at)
  try:
    resumed = trainer.resume(checkpointer, state, shardings, tokenizer_sha256="t", fingerprint=fingerprint,
                             fingerprint_parts=parts, train_iter=it, reset_data_position=reset)
    start = 0
    if resumed is not None:
      start, state, _ = resumed
    task = trainer.GradientTask(train_cfg=cfg, mesh=mesh, train_step=step_fn, train_iter=it,
                                checkpointer=checkpointer, meta={"stage": "test"}, data_fingerprint=fingerprint,
                                data_fingerprint_parts=parts, tokens_per_step=ROWS)
    state = loop_lib.run(task, state, start=start, cadence=loop_lib.Cadence.of(cfg), workdir=str(workdir),
                         desc="train")
  finally:
    checkpointer.close()
  return state, it


def _saved(workdir: pathlib.Path, step: int) -> dict:
  return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


def _assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _reference_stats(losses: np.ndarray, window: int) -> tuple[float, float]:
  """Mean and variance of `losses`, the t-th (1-based) weighing w_t * prod_{j>t}(1 - w_j), w_t = max(1/window, 1/t):
  the statistics update_loss_stats documents, computed from the weights in float64."""
  losses = np.asarray(losses, np.float64)
  w = np.array([max(1.0 / window, 1.0 / t) for t in range(1, len(losses) + 1)])
  c = np.array([w[t] * np.prod(1.0 - w[t + 1:]) for t in range(len(losses))])
  mean = float(np.sum(c * losses))
  return mean, float(np.sum(c * (losses - mean) ** 2))


def _reference_is_spike(loss, good_losses, *, zscore, warmup, window) -> bool:
  if not np.isfinite(loss) or len(good_losses) < warmup:
    return False
  mean, var = _reference_stats(np.array(good_losses), window)
  return bool(loss > mean + zscore * max(np.sqrt(var), 1e-3 * abs(mean)))


# ----------------------------------------------------------------------------------------------
# The detector's math.


def test_loss_stats_are_a_plain_average_then_an_exponential_one():
  losses = np.random.default_rng(0).gamma(2.0, 1.5, size=30)
  mean, var = 0.0, 0.0
  update = jax.jit(trainer.update_loss_stats, static_argnames="window")
  for i, loss in enumerate(losses):
    mean, var = update(np.float32(loss), mean, var, i, window=8)
    if i < 8:
      np.testing.assert_allclose([mean, var], [np.mean(losses[:i + 1]), np.var(losses[:i + 1])], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose([mean, var], _reference_stats(losses[:i + 1], 8), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("loss,mean,var,count,expected", [
    (8.1, 2.0, 1.0, 50, True),  # 6.1 standard deviations above the mean
    (7.9, 2.0, 1.0, 50, False),  # 5.9
    (8.1, 2.0, 1.0, 49, False),  # still warming up
    (-30.0, 2.0, 1.0, 50, False),  # far below is not a spike
    (np.inf, 2.0, 1.0, 50, False),  # non-finite: skipped as such, not counted as a spike
    (np.nan, 2.0, 1.0, 50, False),
    (2.0115, 2.0, 0.0, 50, False),  # zero variance: the std is taken as 1e-3 * |mean| = 0.002 (threshold 2.012)
    (2.0125, 2.0, 0.0, 50, True),
])
def test_spike_is_a_finite_loss_zscore_standard_deviations_above_the_mean(loss, mean, var, count, expected):
  got = trainer.is_loss_spike(np.float32(loss), np.float32(mean), np.float32(var), np.int32(count), zscore=6.0,
                              warmup=50)
  assert bool(got) == expected
  with np.errstate(invalid="ignore"):
    reference = (np.isfinite(loss) and count >= 50 and loss > mean + 6.0 * max(np.sqrt(var), 1e-3 * abs(mean)))
  assert bool(reference) == expected
  assert not bool(trainer.is_loss_spike(np.float32(1e9), 2.0, 1.0, 1000, zscore=0.0, warmup=2))  # 0: off


# ----------------------------------------------------------------------------------------------
# The jitted step: skip by selection, count, keep the statistics clean.


def test_inf_in_a_batch_is_skipped_by_selection_and_counted():
  state, _, step, mesh = _setup(_train_cfg())
  batches = _batches(3, poison={1})
  state, _ = step(state, sharding.host_to_global(batches[0], mesh))
  before = jax.device_get((state.params, state.opt_state))
  state, metrics = step(state, sharding.host_to_global(batches[1], mesh))
  assert not np.isfinite(float(metrics["train/loss"]))
  _assert_trees_equal(jax.device_get((state.params, state.opt_state)), before)
  assert (int(metrics["train/skipped"]), int(metrics["train/skipped_total"]), int(metrics["train/bad_streak"])) == (
      1, 1, 1)
  assert int(state.step) == 2
  state, metrics = step(state, sharding.host_to_global(batches[2], mesh))
  assert (int(metrics["train/skipped"]), int(metrics["train/skipped_total"]), int(metrics["train/bad_streak"])) == (
      0, 1, 0)
  assert not np.array_equal(np.asarray(state.params["w"]), before[0]["w"])


def test_spikes_and_non_finite_steps_match_a_numpy_replay_and_do_not_poison_the_statistics():
  cfg = _train_cfg(spike_zscore=6.0, spike_warmup=5, spike_window=10)
  state, _, step, mesh = _setup(cfg)
  spikes, poison = {20, 33}, {25, 26}
  losses, skipped, spiked = [], [], []
  for i, batch in enumerate(_batches(40, poison=poison, spikes=spikes)):
    before = jax.device_get(state.params)
    state, metrics = step(state, sharding.host_to_global(batch, mesh))
    losses.append(float(metrics["train/loss"]))
    skipped.append(int(metrics["train/skipped"]))
    spiked.append(int(metrics["train/spikes"]))
    if skipped[-1]:
      _assert_trees_equal(jax.device_get(state.params), before)
    else:
      assert not np.array_equal(np.asarray(state.params["w"]), before["w"]), i

  # NumPy replay of the rule on the losses the step reported: statistics from good steps only.
  good, want_spiked, want_skipped = [], [], []
  for loss in losses:
    spike = _reference_is_spike(loss, good, zscore=6.0, warmup=5, window=10)
    want_spiked.append(int(spike))
    want_skipped.append(int(spike or not np.isfinite(loss)))
    if not want_skipped[-1]:
      good.append(loss)
  assert spiked == want_spiked
  assert skipped == want_skipped
  assert {i for i, s in enumerate(spiked) if s} == spikes  # the injected spikes are found, and nothing else
  assert {i for i, s in enumerate(skipped) if s} == spikes | poison
  numerics = jax.device_get(state.numerics)
  assert (int(numerics.skipped_total), int(numerics.spikes_total), int(numerics.good_steps)) == (4, 2, 36)
  np.testing.assert_allclose([numerics.loss_mean, numerics.loss_var], _reference_stats(np.array(good), 10),
                             rtol=1e-4)
  poisoned_mean, _ = _reference_stats(np.array([x for x in losses if np.isfinite(x)]), 10)
  assert abs(poisoned_mean - float(numerics.loss_mean)) > 1.0  # the spikes would have shifted the mean


# ----------------------------------------------------------------------------------------------
# The loop: rollback, the stop after repeated rollbacks, determinism under kills.

# Batches 9..12 hold inf. With max_bad_steps=3 and checkpoints every 4 steps: steps 9-11 are skipped, checkpoint 12
# holds that streak, the loop sees the third skip while step 12 runs, discards step 12, restores checkpoint 8 (the
# newest from before step 10) and saves the rolled-back state as step 13; training goes on with batch 13.
ROLLBACK_POISON = frozenset(range(9, 13))


@pytest.fixture(scope="module")
def rolled_back(tmp_path_factory):
  """(workdir, final state, batches handed out, warning lines) of one uninterrupted 20-step run with a rollback."""
  workdir = tmp_path_factory.mktemp("rollback")
  records: list[logging.LogRecord] = []
  handler = logging.Handler(logging.WARNING)
  handler.emit = records.append
  logging.getLogger().addHandler(handler)
  try:
    state, it = _train(workdir, _batches(20, poison=ROLLBACK_POISON), _train_cfg())
  finally:
    logging.getLogger().removeHandler(handler)
  return workdir, jax.device_get(state), it.handed_out, [r.getMessage() for r in records]


def test_consecutive_bad_steps_roll_back_to_the_checkpoint_and_the_data_moves_forward(rolled_back):
  workdir, state, handed_out, warnings = rolled_back
  assert handed_out == list(range(20))  # every batch once, in order: nothing replayed
  ckpt8, ckpt12, ckpt13 = _saved(workdir, 8), _saved(workdir, 12), _saved(workdir, 13)
  _assert_trees_equal(ckpt13["params"], ckpt8["params"])
  _assert_trees_equal(ckpt13["opt_state"], ckpt8["opt_state"])
  assert not np.array_equal(ckpt12["params"]["w"], ckpt8["params"]["w"])  # step 8 was good: undone
  assert int(ckpt12["numerics"]["bad_streak"]) == 3 and int(ckpt13["step"]) == 13
  counts = {k: int(ckpt13["numerics"][k]) for k in ("rollbacks", "bad_streak", "skipped_total")}
  assert counts == {"rollbacks": 1, "bad_streak": 0, "skipped_total": 4}  # steps 9-11, and 12 discarded
  assert (int(state.numerics.rollbacks), int(state.numerics.skipped_total), int(state.numerics.bad_streak)) == (
      1, 4, 0)
  rollback_lines = [w for w in warnings if w.startswith("Rolled back")]
  assert len(rollback_lines) == 1 and "checkpoints/8 " in rollback_lines[0], rollback_lines
  assert rollback_lines[0].startswith("Rolled back at step 13: 3 updates in a row were skipped from step 10 on")
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["train/rollbacks"] for r in rows if r["step"] in (12, 13)] == [0, 1]


@pytest.mark.parametrize("kill_at,resumes_from", [(11, 8), (12, 12), (13, 13)])
def test_rolled_back_run_killed_and_resumed_ends_bitwise_equal(rolled_back, tmp_path, kill_at, resumes_from):
  # Killed before batch 11: checkpoint 8 is from before the bad steps, which replay; before 12: checkpoint 12 holds
  # the streak with the rollback still to come; before 13: checkpoint 13 is the rolled-back state.
  batches, cfg = _batches(20, poison=ROLLBACK_POISON), _train_cfg()
  with pytest.raises(_Killed):
    _train(tmp_path, batches, cfg, kill_at=kill_at)
  resumed, it = _train(tmp_path, batches, cfg)
  assert it.handed_out == list(range(resumes_from, 20))
  _assert_trees_equal(jax.device_get(resumed), rolled_back[1])


def test_repeated_rollbacks_stop_with_a_one_line_error(tmp_path):
  cfg = _train_cfg(steps=30, checkpoint_every=2, max_bad_steps=2, max_rollbacks=2)
  with pytest.raises(trainer.TrainingDivergedError) as err:
    _train(tmp_path, _batches(30, poison=set(range(6, 30))), cfg)
  message = str(err.value)
  assert "\n" not in message
  assert message.startswith("Training stopped at step ")
  assert "2 updates in a row were skipped" in message
  assert "after 2 rollback(s) already (train.max_rollbacks=2)" in message
  assert "optim.lr" in message  # says what to try
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert max(r["train/rollbacks"] for r in rows) == 2


def test_bad_steps_before_the_first_checkpoint_stop_naming_the_missing_checkpoint(tmp_path):
  with pytest.raises(trainer.TrainingDivergedError, match=r"holds no checkpoint from step 1 or earlier"):
    _train(tmp_path, _batches(20, poison=set(range(1, 20))), _train_cfg(checkpoint_every=10))


# ----------------------------------------------------------------------------------------------
# The data position on resume.


def test_changed_data_pipeline_is_refused_unless_reset_position(tmp_path, caplog):
  batches, cfg = _batches(20), _train_cfg(steps=4)
  _train(tmp_path, batches, cfg)
  changed = {**PARTS, "global_batch_size": 2 * ROWS}
  with pytest.raises(data_lib.DataError, match=r"global_batch_size \(saved 4, now 8\)") as err:
    _train(tmp_path, batches, _train_cfg(steps=6), parts=changed)
  assert "reset_position=True" in str(err.value)

  caplog.set_level(logging.WARNING)
  state, it = _train(tmp_path, batches, _train_cfg(steps=6), parts=changed, reset=True)
  assert it.handed_out == [0, 1]  # steps 4 and 5 from the first batches: the iterator started over
  assert int(state.step) == 6
  assert any("data.reset_position=True" in r.getMessage() and "global_batch_size (saved 4, now 8)" in r.getMessage()
             for r in caplog.records)
  # The params went on from the checkpoint: step 4 of the first run, then two updates.
  assert not np.array_equal(_saved(tmp_path, 4)["params"]["w"], _saved(tmp_path, 6)["params"]["w"])
  # A retry with the flag still set resumes the position of the new pipeline (saved at step 6) as usual.
  _, it = _train(tmp_path, batches, _train_cfg(steps=8), parts=changed, reset=True)
  assert it.handed_out == [2, 3]


def test_checkpoint_without_the_numerics_counters_is_refused_and_kept(tmp_path):
  # A state saved without TrainState.numerics (another state layout) is not restored into a fresh guess: the
  # resume stops with a message naming the step, and the checkpoint stays where it is.
  state, shardings, _, _ = _setup(_train_cfg())
  old_params = {"w": jnp.arange(DIM, dtype=jnp.float32)}
  legacy = {"step": jnp.int32(3), "params": old_params, "opt_state": state.opt_state, "rng": state.rng}
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  checkpointer.save(3, legacy, data={"iterator": {"index": 3}, "fingerprint": data_lib.pipeline_fingerprint(**PARTS),
                                     "fingerprint_parts": PARTS}, meta={"stage": "test"})
  checkpointer.close()
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  it = _Iterator(_batches(4))
  with pytest.raises(ckpt_lib.CheckpointError, match="checkpoints/3 does not fit"):
    trainer.resume(checkpointer, state, shardings, tokenizer_sha256="t",
                   fingerprint=data_lib.pipeline_fingerprint(**PARTS), fingerprint_parts=PARTS, train_iter=it)
  checkpointer.close()
  assert it.index == 0
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]  # not set aside as unreadable


# ----------------------------------------------------------------------------------------------
# End to end: the launcher's exit status and message.


def test_diverging_launch_rolls_back_then_exits_1_with_the_reason(tmp_path):
  write_corpus(tmp_path / "corpus")
  # A learning rate of 1e38: the first update makes the params huge, every later loss is NaN.
  flags = {"workdir": tmp_path / "w", "data.sources": f"('{tmp_path / 'corpus'}',)", "data.cache_dir": tmp_path / "c",
           "tokenizer.vocab_size": 300, "model.max_len": 32, "data.batch_size": 8, "train.progress_bar": False,
           "sample.max_new_tokens": 0, "train.steps": 12, "train.checkpoint_every": 1, "train.eval_every": 100,
           "optim.lr": 1e38, "optim.warmup_steps": 0, "train.max_bad_steps": 2, "train.max_rollbacks": 1}
  result = run_launcher([sys.executable, "-m", "gptrl.launch", "--config", str(REPO / "configs/pretrain_cpu.py:tiny")]
                        + [f"--config.{k}={v}" for k, v in flags.items()])
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Rolled back at step 4: 2 updates in a row were skipped from step 2 on" in result.stderr, result.stderr[-3000:]
  # One line says why (the launcher may or may not print a traceback above it).
  lines = [line for line in result.stderr.splitlines() if "TrainingDivergedError: Training stopped at step" in line]
  assert lines and "Training stopped at step 7: 2 updates in a row were skipped from step 5 on" in lines[-1], lines
  assert "train.max_rollbacks=1" in lines[-1]
