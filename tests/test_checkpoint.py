"""Checkpoint integrity (gptrl/checkpoint.py): the manifest of every step, what happens to each kind of damage,
garbage collection that never counts a damaged step, background save errors, and restores onto other meshes.

A "run" here is a Checkpointer that saved steps 1, 2, 3 of a small state whose values are known in advance
(`_state(step)`), so a restore is compared with numbers computed independently of any checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import resource
import shutil
import signal
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gptrl import checkpoint as ckpt_lib
from gptrl.checkpoint import abstract_like
from gptrl import model as model_lib
from gptrl import optim
from gptrl import sharding
from gptrl import trainer
from gptrl.config import MeshConfig, ModelConfig, OptimConfig

ARRAY = 4096  # elements of the big array: its data file is the largest file of the step


def _state(step: int) -> dict:
  return {"w": np.arange(ARRAY, dtype=np.float32) * step, "b": {"c": np.full((3,), step, np.int32)}}


def _abstract() -> dict:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))


def _save_run(directory: pathlib.Path, steps=(1, 2, 3), keep: int = 5) -> pathlib.Path:
  checkpointer = ckpt_lib.Checkpointer(str(directory), keep=keep)
  for step in steps:
    checkpointer.save(step, _state(step), data={"position": step}, meta={"stage": "test", "step": step})
  checkpointer.close()
  return directory


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> pathlib.Path:
  return _save_run(tmp_path_factory.mktemp("run") / "checkpoints")


@pytest.fixture
def run(saved_run, tmp_path) -> pathlib.Path:
  """A private copy of the saved run, free to damage."""
  return pathlib.Path(shutil.copytree(saved_run, tmp_path / "checkpoints"))


def _array_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The file holding the big array's bytes: the largest file of the state item."""
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _resume(directory: pathlib.Path, abstract: dict | None = None) -> tuple[int, dict, dict]:
  checkpointer = ckpt_lib.Checkpointer(str(directory))
  try:
    step, state, data, _ = checkpointer.restore_latest_valid(abstract or _abstract())
  finally:
    checkpointer.close()
  return step, jax.device_get(state), data


def _assert_state(state: dict, step: int) -> None:
  expected = _state(step)
  assert np.array_equal(state["w"], expected["w"]) and np.array_equal(state["b"]["c"], expected["b"]["c"])


def _flip_byte(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01
  path.write_bytes(bytes(data))


def test_every_step_carries_a_manifest_of_its_files(saved_run):
  step_dir = saved_run / "3"
  manifest = json.loads((step_dir / "manifest.json").read_text())
  listed = {f["path"]: f for f in manifest["files"]}
  on_disk = {str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file()}
  assert on_disk - set(listed) == {"manifest.json", "_CHECKPOINT_METADATA", "commit_success.txt"}
  array = _array_file(step_dir)
  entry = listed[str(array.relative_to(step_dir))]
  import hashlib  # pylint: disable=import-outside-toplevel
  assert entry["size"] == array.stat().st_size
  assert entry["sha256"] == hashlib.sha256(array.read_bytes()).hexdigest()


# Each damage: (function applied to step 3's folder, the reason in the set-aside name, a file the log names).
def _flipped(step_dir):
  _flip_byte(_array_file(step_dir))
  return str(_array_file(step_dir).relative_to(step_dir))


def _truncated(step_dir):
  path = _array_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 2)
  return str(path.relative_to(step_dir))


def _deleted(step_dir):
  path = _array_file(step_dir)
  path.unlink()
  return str(path.relative_to(step_dir))


def _manifest_deleted(step_dir):
  (step_dir / "manifest.json").unlink()
  return "manifest.json"


def _manifest_garbage(step_dir):
  (step_dir / "manifest.json").write_bytes(b"\x00{not json")
  return "manifest.json"


def _extra_truncated_file(step_dir):
  (step_dir / "state" / "d" / "0123abcd").write_bytes(b"partial")
  return "state/d/0123abcd"


@pytest.mark.parametrize("damage, reason", [
    (_flipped, "hash-mismatch"), (_truncated, "size-mismatch"), (_deleted, "missing-file"),
    (_manifest_deleted, "no-manifest"), (_manifest_garbage, "bad-manifest"), (_extra_truncated_file, "unexpected-file"),
], ids=["flipped-byte", "truncated", "deleted-file", "deleted-manifest", "garbage-manifest", "extra-file"])
def test_damaged_newest_step_is_set_aside_and_the_previous_one_used(run, caplog, damage, reason):
  named = damage(run / "3")
  before = sorted(str(p.relative_to(run / "3")) for p in (run / "3").rglob("*"))
  with caplog.at_level(logging.ERROR):
    step, state, data = _resume(run)
  assert step == 2 and data == {"position": 2}
  _assert_state(state, 2)
  aside = [p for p in run.iterdir() if p.name.startswith("3.corrupt-")]
  assert len(aside) == 1 and aside[0].name.startswith(f"3.corrupt-{reason}-"), os.listdir(run)
  assert sorted(str(p.relative_to(aside[0])) for p in aside[0].rglob("*")) == before  # moved, not deleted
  assert not (run / "3").exists()
  lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
  assert len(lines) == 1, lines
  assert f"{run}/3" in lines[0] and named in lines[0] and aside[0].name in lines[0], lines[0]


def test_empty_step_folder_is_set_aside(run, caplog):
  (run / "4").mkdir()
  with caplog.at_level(logging.ERROR):
    step, state, _ = _resume(run)
  assert step == 3
  _assert_state(state, 3)
  assert [p.name for p in run.iterdir() if p.name.startswith("4.")][0].startswith("4.corrupt-empty-")
  assert any("holds no files" in r.getMessage() for r in caplog.records)


def test_leftover_temporary_folder_of_an_interrupted_save_is_set_aside(run, caplog):
  partial = run / "4.orbax-checkpoint-tmp"
  shutil.copytree(run / "3" / "state", partial / "state")  # a save killed after writing its arrays
  with caplog.at_level(logging.WARNING):
    step, state, _ = _resume(run)
  assert step == 3
  _assert_state(state, 3)
  aside = [p for p in run.iterdir() if p.name.startswith("4.")]
  assert len(aside) == 1 and aside[0].name.startswith("4.corrupt-interrupted-save-")
  assert (aside[0] / "state").is_dir()
  assert any("interrupted save of step 4" in r.getMessage() for r in caplog.records)


def test_every_damaged_step_is_passed_over_until_a_valid_one(run):
  _flipped(run / "3")
  _truncated(run / "2")
  step, state, _ = _resume(run)
  assert step == 1
  _assert_state(state, 1)
  names = sorted(p.name.split("-")[0] for p in run.iterdir() if ".corrupt-" in p.name)
  assert names == ["2.corrupt", "3.corrupt"]


def test_restoring_a_named_step_checks_it_first(run):
  checkpointer = ckpt_lib.Checkpointer(str(run))  # opening checks the newest step (3) only
  named = _truncated(run / "2")  # e.g. the step a rollback goes back to
  with pytest.raises(ckpt_lib.CheckpointError, match=f"/2 is damaged: {named}: .* moved to 2.corrupt-size-mismatch-"):
    checkpointer.restore(2, _abstract())
  state, _, _ = checkpointer.restore(3, _abstract())
  checkpointer.close()
  _assert_state(jax.device_get(state), 3)
  assert [p.name for p in run.iterdir() if p.name.startswith("2")][0].startswith("2.corrupt-size-mismatch-")


def test_step_written_before_manifests_is_resumed_unverified(tmp_path, caplog):
  # A plain orbax manager with the same items: what gptrl wrote before checkpoints carried manifests.
  manager = ocp.CheckpointManager(tmp_path / "c", item_names=("state", "data", "meta"))
  manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(_state(7)), data=ocp.args.JsonSave({}),
                                          meta=ocp.args.JsonSave({"stage": "old"})))
  manager.close()
  with caplog.at_level(logging.WARNING):
    step, state, _ = _resume(tmp_path / "c")
  assert step == 7
  _assert_state(state, 7)
  assert any("has no manifest.json" in r.getMessage() for r in caplog.records)


def test_handoff_refuses_another_runs_damaged_step_naming_the_file(run):
  named = _flipped(run / "3")
  for step in (-1, 3):
    with pytest.raises(ckpt_lib.CheckpointError, match="damaged") as info:
      ckpt_lib.load_params(str(run), _abstract()["w"], step=step, tokenizer_sha256=None, subtree="w")
    assert named in str(info.value) and f"{run}/3" in str(info.value)
    with pytest.raises(ckpt_lib.CheckpointError, match=named):
      ckpt_lib.read_step_meta(str(run), step if step > 0 else 3)
  assert (run / "3").is_dir() and not any(".corrupt-" in p.name for p in run.iterdir())  # left as it was
  assert ckpt_lib.read_step_meta(str(run), 2)["step"] == 2  # an older step, when asked for by number


def _params_state(step: int) -> dict:
  return {"params": {"w": _state(step)["w"]}}


def test_handoff_reads_an_intact_step(tmp_path):
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "c"))
  checkpointer.save(5, _params_state(5), data={}, meta={"stage": "test"})
  checkpointer.close()
  params, meta, where = ckpt_lib.load_params(str(tmp_path / "c"), {"w": _abstract()["w"]}, tokenizer_sha256=None)
  assert np.array_equal(np.asarray(params["w"]), _state(5)["w"]) and meta["stage"] == "test"
  assert where.endswith("/5")


# -- garbage collection


def _steps(directory: pathlib.Path) -> list[str]:
  return sorted(p.name for p in directory.iterdir() if p.is_dir())


def test_old_steps_beyond_keep_are_deleted(tmp_path):
  _save_run(tmp_path / "c", steps=(1, 2, 3, 4), keep=2)
  assert _steps(tmp_path / "c") == ["3", "4"]


def test_garbage_collection_does_not_count_a_damaged_step(tmp_path):
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "c"), keep=2)
  for step in (1, 2):
    checkpointer.save(step, _state(step), data={}, meta={})
  checkpointer.wait()
  _truncated(tmp_path / "c" / "2")  # damaged on disk after it was written
  checkpointer.save(3, _state(3), data={}, meta={})
  checkpointer.close()
  steps = _steps(tmp_path / "c")
  # Orbax's max_to_keep=2 would have kept 2 (damaged) and 3, deleting 1: one good step left.
  assert len(steps) == 3 and steps[0] == "1" and steps[1].startswith("2.corrupt-size-mismatch-") and steps[2] == "3"
  assert _resume(tmp_path / "c")[0] == 3


def test_deletion_a_kill_interrupted_is_finished_at_the_next_open(run):
  (run / "1").rename(run / "1.gc-deleting")  # what garbage collection renames a step to before deleting it
  assert _resume(run)[0] == 3
  assert _steps(run) == ["2", "3"]


def test_committed_step_failing_its_check_raises_and_deletes_nothing(tmp_path, monkeypatch):
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "c"), keep=1)
  checkpointer.save(1, _state(1), data={}, meta={})
  checkpointer.wait()
  real_write = ckpt_lib.write_manifest

  def wrong_size(step_dir, step):  # as if a file changed between hashing and the commit
    manifest = real_write(step_dir, step)
    manifest["files"][0]["size"] += 1
    with open(os.path.join(step_dir, "manifest.json"), "w", encoding="utf-8") as f:
      json.dump(manifest, f)
    return manifest

  monkeypatch.setattr(ckpt_lib, "write_manifest", wrong_size)
  checkpointer.save(2, _state(2), data={}, meta={})
  with pytest.raises(ckpt_lib.CheckpointError, match=r"/2 was committed but fails its manifest check"):
    checkpointer.wait()
  checkpointer.close()
  steps = _steps(tmp_path / "c")
  assert steps[0] == "1" and steps[1].startswith("2.corrupt-size-mismatch-") and len(steps) == 2
  step, state, _ = _resume(tmp_path / "c")
  assert step == 1
  _assert_state(state, 1)


def test_manifest_is_inside_the_folder_before_orbax_renames_it(tmp_path, monkeypatch):
  seen = []
  real_write = ckpt_lib.write_manifest
  monkeypatch.setattr(ckpt_lib, "write_manifest", lambda d, s: (seen.append(os.path.basename(d)), real_write(d, s))[1])
  _save_run(tmp_path / "c", steps=(1,))
  assert seen == ["1.orbax-checkpoint-tmp"]  # so the rename that commits the step also commits its manifest
  assert (tmp_path / "c" / "1" / "manifest.json").is_file()


# -- background save errors


@pytest.fixture
def file_size_limit():
  """Sets a per-process file size limit (writes past it fail with EFBIG, like a full disk); restores it."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

  def limit(size):
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
  yield limit
  resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  signal.signal(signal.SIGXFSZ, previous)


def _big_state() -> dict:
  return {"w": np.random.default_rng(0).random(50_000).astype(np.float32)}


def _poll_until_it_raises(checkpointer):
  for _ in range(3000):
    checkpointer.poll()  # returns at once while the save is still being written
    time.sleep(0.01)


def test_a_save_without_room_on_the_disk_is_refused_before_writing_anything(tmp_path, monkeypatch):
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "c"), keep=3)
  checkpointer.save(1, _big_state(), data={}, meta={})
  checkpointer.wait()
  step1 = sum(p.stat().st_size for p in (tmp_path / "c" / "1").rglob("*") if p.is_file())
  monkeypatch.setattr(ckpt_lib.fileio, "free_bytes", lambda path: 1000)
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    checkpointer.save(2, _big_state(), data={}, meta={})
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"Not enough disk space to save checkpoint 2 in {tmp_path / 'c'}: 0.00 GB (1000 bytes) "
                            "free, the step needs about ")
  needed = int(message.split("needs about ")[1].split("(")[1].split(" bytes")[0])
  assert step1 < needed < 1.1 * step1  # the newest step's files, plus 5%
  assert "(from step 1, plus 5%)" in message and "newest complete checkpoint is step 1" in message
  monkeypatch.undo()
  checkpointer.close()
  assert _steps(tmp_path / "c") == ["1"]  # nothing was written for step 2


@pytest.mark.parametrize("surfaces_in", ["wait", "save", "poll"])
def test_background_save_error_surfaces_at_the_next_call(tmp_path, file_size_limit, surfaces_in, caplog):
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "c"), keep=3)
  checkpointer.save(1, _big_state(), data={}, meta={})
  checkpointer.wait()
  file_size_limit(20_000)  # the array file of a step is ~200 kB
  checkpointer.save(2, _big_state(), data={}, meta={})  # returns: the writing happens in the background
  with pytest.raises(ckpt_lib.CheckpointError, match=r"Saving checkpoint .*/2 failed in the background.*File too "
                                                     r"large.*bytes free; the step needs about \d+ bytes\. Nothing was "
                                                     r"committed.*newest complete checkpoint is step 1") as e:
    if surfaces_in == "wait":
      checkpointer.wait()
    elif surfaces_in == "poll":
      _poll_until_it_raises(checkpointer)
    else:
      checkpointer.save(3, _big_state(), data={}, meta={})
  assert "\n" not in str(e.value)
  # One line, not orbax's tracebacks from each of its background threads.
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR and "orbax" in r.pathname]
  file_size_limit(resource.RLIM_INFINITY)
  checkpointer.save(4, _big_state(), data={}, meta={})  # the checkpointer still works once the disk does
  checkpointer.close()
  assert _steps(tmp_path / "c") == ["1", "2.orbax-checkpoint-tmp", "4"]
  assert _resume(tmp_path / "c", jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _big_state()))[0] == 4
  assert any(p.startswith("2.corrupt-interrupted-save-") for p in _steps(tmp_path / "c"))


# -- restoring onto another mesh

CFG = ModelConfig(vocab_size=64, num_layers=1, num_heads=4, d_model=32, max_len=8)


def _mesh(shape):
  if shape is None:
    return sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  return sharding.make_mesh(MeshConfig(*shape))


def _abstract_train_state(mesh):
  """(ShapeDtypeStructs of trainer.create_train_state's TrainState for CFG with AdamW, its shardings on `mesh`).

  create_train_state's jit is replaced by shape evaluation: the layout is the trainer's own, and nothing is
  compiled (compiling the init for every mesh would take most of this file's time budget).
  """
  model = model_lib.GPT(CFG)
  optimizer = optim.make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0), 10)

  def shapes_only(fun, out_shardings):
    return lambda *args: abstract_like(jax.eval_shape(fun, *args), out_shardings)
  with mock.patch.object(jax, "jit", shapes_only):
    return trainer.create_train_state(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"], optimizer,
                                      0, mesh)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
  """A TrainState on mesh (1, 2, 4) (params and optimizer state split over fsdp and tensor) holding random
  values, saved; with those values on the host as the reference."""
  abstract, shardings = _abstract_train_state(_mesh((1, 2, 4)))
  rng = np.random.default_rng(0)
  host = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                      else rng.integers(0, 1000, x.shape).astype(x.dtype), abstract)  # numpy: no sharding
  state = jax.tree.map(jax.device_put, host, shardings)
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
  directory = tmp_path_factory.mktemp("sharded") / "checkpoints"
  checkpointer = ckpt_lib.Checkpointer(str(directory))
  checkpointer.save(1, state, data={}, meta={})
  checkpointer.close()
  return directory, host


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 8, 1), None], ids=str)
def test_restore_onto_another_mesh_gives_the_same_values(sharded_run, shape):
  directory, reference = sharded_run
  abstract, shardings = _abstract_train_state(_mesh(shape))
  checkpointer = ckpt_lib.Checkpointer(str(directory))
  step, restored, _, _ = checkpointer.restore_latest_valid(abstract)
  checkpointer.close()
  assert step == 1
  got, want = jax.tree.leaves(restored), jax.tree.leaves(reference)
  assert len(got) == len(want) > 10
  for restored_leaf, saved, target_sharding in zip(got, want, jax.tree.leaves(shardings)):
    assert restored_leaf.sharding == target_sharding
    assert restored_leaf.dtype == saved.dtype and np.array_equal(np.asarray(restored_leaf), saved)


def test_compression_is_a_save_option_and_restores_read_either_kind(tmp_path):
  """train.checkpoint_compression: zstd shrinks a compressible state on disk; a run resumes from steps written
  either way (e.g. a run that turned compression off keeps its older compressed steps usable)."""
  zeros = {"w": np.zeros((64 * 1024,), np.float32), "b": {"c": np.zeros((3,), np.int32)}}
  sizes = {}
  for compression in (True, False):
    directory = tmp_path / f"compression-{compression}"
    checkpointer = ckpt_lib.Checkpointer(str(directory), keep=5, compression=compression)
    checkpointer.save(1, zeros, data={"position": 1}, meta={"stage": "test"})
    checkpointer.save(2, _state(2), data={"position": 2}, meta={"stage": "test"})
    checkpointer.close()
    sizes[compression] = sum(p.stat().st_size for p in (directory / "1" / "state").rglob("*") if p.is_file())
    # Restored by a Checkpointer with the other setting.
    reader = ckpt_lib.Checkpointer(str(directory), compression=not compression)
    try:
      assert np.array_equal(jax.device_get(reader.restore(1, _abstract_of(zeros))[0])["w"], zeros["w"])
    finally:
      reader.close()
    step, state, data = _resume(directory)
    assert (step, data) == (2, {"position": 2})
    _assert_state(state, 2)
  assert sizes[False] >= zeros["w"].nbytes  # the raw bytes are all there
  assert sizes[True] < sizes[False] / 4, sizes  # 256 KiB of zeros compress to almost nothing


def _abstract_of(tree: dict) -> dict:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_old_steps_are_deleted_off_the_callers_thread(tmp_path):
  """Garbage collection renames an old step on the caller's thread (so it stops being a step at once) and
  deletes its files in the background; close() waits for that deletion."""
  import threading  # pylint: disable=import-outside-toplevel
  release, started = threading.Event(), threading.Event()
  real_rmtree = ckpt_lib.fileio.rmtree

  def slow_rmtree(path, **kwargs):
    if path.endswith(".gc-deleting") and os.path.isdir(path):
      started.set()
      assert release.wait(30)
    return real_rmtree(path, **kwargs)

  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "c"), keep=1)
  with mock.patch.object(ckpt_lib.fileio, "rmtree", slow_rmtree):
    checkpointer.save(1, _state(1), data={}, meta={})
    checkpointer.save(2, _state(2), data={}, meta={})
    checkpointer.wait()  # commits step 2, then collects step 1: returns while its files are still being deleted
    assert started.wait(30)
    assert _steps(tmp_path / "c") == ["1.gc-deleting", "2"] and checkpointer.all_steps() == [2]
    release.set()
    checkpointer.close()
  assert _steps(tmp_path / "c") == ["2"]


def test_check_parents_refuses_a_rewritten_parent_step_and_accepts_it_when_allowed():
  was = {"checkpoint": "/runs/sft/checkpoints/12", "manifest_sha256": "a" * 64, "stage": "sft"}
  saved = {"parents": {"init": was, "reward_model": {**was, "checkpoint": "/runs/rm/checkpoints/10"}}}
  same = dict(saved["parents"])
  assert ckpt_lib.check_parents(saved, same, where="/w/checkpoints/4", allowed={}) == []
  rewritten = {**same, "init": {**was, "manifest_sha256": "b" * 64}}
  with pytest.raises(ckpt_lib.CheckpointError, match=r"/w/checkpoints/4 started from init checkpoint "
                     r"/runs/sft/checkpoints/12 \(sha256 aaaaaaaaaaaa\), which was rewritten since \(manifest "
                     r"sha256 now bbbbbbbbbbbb\).*config\.init\.allow_changed=True"):
    ckpt_lib.check_parents(saved, rewritten, where="/w/checkpoints/4", allowed={"reward_model": True})
  [change] = ckpt_lib.check_parents(saved, rewritten, where="/w/checkpoints/4", allowed={"init": True})
  assert change == {"role": "init", "was": was, "now": rewritten["init"], "resumed_from": "/w/checkpoints/4"}
  # Checkpoints from before lineage was kept, and steps without a manifest, are not refused.
  assert ckpt_lib.check_parents({}, rewritten, where="w", allowed={}) == []
  unhashed = {"init": {**was, "manifest_sha256": ""}}
  assert ckpt_lib.check_parents(saved, unhashed, where="w", allowed={}) == []
