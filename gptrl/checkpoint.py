"""Orbax checkpoints: the one place that saves and restores training state and hands it between stages.

A checkpoint directory `<workdir>/checkpoints/<step>/` holds three items and a manifest:
  state: the TrainState pytree (params, optimizer state, step, RNG), sharded arrays written by every process;
  data:  the data iterator's state and the fingerprint of the pipeline it belongs to (JSON);
  meta:  what a later stage or a resume must check: stage, tokenizer hash, model config (JSON);
  manifest.json: every file of the step with its size and sha256.

Integrity. Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` when complete. The
manifest is written inside that temporary folder after every item is final and before the rename (orbax's
post-finalization callback, on process 0, which reads back and fsyncs every file), so a step that reached its
final name always carries its manifest: there is no moment at which a kill leaves a committed step without one.
A committed step without manifest.json is therefore either damaged (its meta says it was written with one) or
written by a version of gptrl that had no manifests (accepted with a warning, unverified). Orbax rewrites two of
its own bookkeeping files at the rename (`_CHECKPOINT_METADATA`, `commit_success.txt`); they are not hashed.

In a bucket (gs://; every file operation here goes through gptrl/fileio.py) orbax writes the step in place and
commits it by writing `<step>/commit_success.txt` last, since a rename would copy every object. The manifest is
written just before that file, a `<step>` folder without it is an interrupted save, writing the manifest reads
the step's objects back once, and setting a step aside (a rename) copies its objects.

Opening a Checkpointer on a run's own folder (what resume does) sets aside, by renaming and never deleting:
leftover temporary folders of interrupted saves, and, newest first, every step that fails its manifest (missing
or extra file, wrong size, wrong sha256, missing or unreadable manifest, empty folder) until a valid one is found.
Each gets one log line naming the step, the file and what was wrong, and becomes `<step>.corrupt-<reason>-<time>`.
`restore` of a named step (a rollback) checks it the same way first. A step that passes its manifest but does not
restore into the configured state is an error, never a reason to fall back.
Another run's checkpoint (the hand-off between stages) is verified the same way but never touched: a damaged
step is refused with a CheckpointError naming the file, also when the newest step was asked for (step=-1), so a
stage never silently starts from an older model than the one named.

Old steps are deleted by this module, not by orbax, and only once `keep` newer steps pass the manifest check, so
a newest step that turns out damaged can never cost the last good one. Multi-process: process 0 alone writes
manifests, verifies, renames and deletes; the others wait at a barrier and take process 0's decision.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from gptrl import fileio
from gptrl.tokenizer import TokenizerMismatchError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "gptrl-checkpoint-manifest/1"
# Written into every step's meta: a step whose meta says this but has no manifest.json lost its manifest.
MANIFEST_META_KEY = "manifest"
# Orbax rewrites these at the step's root after the manifest is written (commit time, commit marker): not hashed.
_ORBAX_LATE_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step being written (atomicity.TMP_DIR_SUFFIX)
_GC_SUFFIX = ".gc-deleting"  # an old step this module was deleting when the process stopped
_COMMIT_FILE = "commit_success.txt"  # what marks a step committed in orbax's commit-file mode (gs://)
_HASH_CHUNK = 4 << 20


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable, damaged, or belongs to another model/tokenizer."""


@dataclasses.dataclass(frozen=True)
class Problem:
  """Why a step fails verification: `reason` names it in the set-aside folder, `file` is relative to the step."""
  reason: str  # empty | no-manifest | bad-manifest | missing-file | size-mismatch | unexpected-file | hash-mismatch
  file: str
  what: str

  def __str__(self) -> str:
    return f"{self.file}: {self.what}"


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying `shardings`, the restore target for `tree` (arrays or ShapeDtypeStructs)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------------------------
# The manifest: writing and verifying.


def _step_files(step_dir: str, *, hashed_only: bool = True) -> dict[str, str]:
  """Relative path -> full path of every file of a step; `hashed_only`: except the manifest and orbax's late
  files."""
  out = {}
  for root, dirs, files in fileio.walk(step_dir):
    dirs.sort()
    for name in files:
      path = os.path.join(root, name)
      rel = path[len(step_dir):].lstrip("/" + os.sep).replace(os.sep, "/")
      if hashed_only and (rel == MANIFEST or rel in _ORBAX_LATE_FILES):
        continue
      out[rel] = path
  return out


def _sha256(path: str, *, fsync: bool = False) -> str:
  """The sha256 of a file's bytes; with `fsync`, a local file is also flushed to the disk."""
  digest = hashlib.sha256()
  with fileio.open(path, "rb") as f:
    while chunk := f.read(_HASH_CHUNK):
      digest.update(chunk)
    if fsync and not fileio.is_remote(path):
      os.fsync(f.fileno())
  return digest.hexdigest()


def write_manifest(step_dir: str, step: int) -> dict[str, Any]:
  """Hashes every file of `step_dir` (reading it back from disk or the bucket, and fsyncing a local one) and
  writes `manifest.json` atomically (fileio.atomic_write). Returns the manifest."""
  files = []
  for rel, path in sorted(_step_files(step_dir).items()):
    files.append({"path": rel, "size": fileio.getsize(path), "sha256": _sha256(path, fsync=True)})
  if not fileio.is_remote(step_dir):
    for root, _, _ in os.walk(step_dir):
      fileio.fsync_dir(root)
  manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files, "unhashed": list(_ORBAX_LATE_FILES)}
  fileio.atomic_write(os.path.join(step_dir, MANIFEST), json.dumps(manifest, indent=1))
  return manifest


def _read_meta_dir(step_dir: str) -> dict[str, Any]:
  return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(step_dir, "meta"),
                                                              args=ocp.args.JsonRestore())


def verify_step(step_dir: str, *, hashes: bool = True) -> Problem | None:
  """Checks a committed step folder against its manifest.

  Args:
    step_dir: `<checkpoints>/<step>`.
    hashes: also compare sha256 (reads every byte); False: names and sizes only (a stat per file).
  Returns:
    None when the step is intact, or was written without a manifest by an older version (see the module
    docstring); otherwise the first Problem found: an empty folder, a missing or unreadable manifest, a file
    missing, of another size, not in the manifest, or with other bytes.
  """
  present = _step_files(step_dir)
  manifest_path = os.path.join(step_dir, MANIFEST)
  if not present and not fileio.exists(manifest_path):
    return Problem("empty", ".", "the step folder holds no files (its save never wrote anything)")
  if not fileio.exists(manifest_path):
    try:
      meta = _read_meta_dir(step_dir)
    except Exception as e:  # pylint: disable=broad-except
      return Problem("no-manifest", MANIFEST, f"missing, and meta/ cannot be read either ({type(e).__name__})")
    if isinstance(meta, dict) and MANIFEST_META_KEY in meta:
      return Problem("no-manifest", MANIFEST, "missing, but the step's meta says it was written with one")
    return None  # written before checkpoints carried manifests: nothing to verify against
  try:
    with fileio.open(manifest_path) as f:
      manifest = json.load(f)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
      raise ValueError(f"format is not {MANIFEST_FORMAT!r}")
    listed = {entry["path"]: (int(entry["size"]), str(entry["sha256"])) for entry in manifest["files"]}
  except (OSError, ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
    return Problem("bad-manifest", MANIFEST, f"unreadable ({type(e).__name__}: {e})")
  for rel, (size, _) in sorted(listed.items()):
    if rel not in present:
      return Problem("missing-file", rel, "listed in the manifest but missing")
    actual = fileio.getsize(present[rel])
    if actual != size:
      return Problem("size-mismatch", rel, f"{actual} bytes, the manifest says {size} (truncated or overwritten)")
  extra = sorted(set(present) - set(listed))
  if extra:
    return Problem("unexpected-file", extra[0],
                   f"not in the manifest ({fileio.getsize(present[extra[0]])} bytes; written after the step "
                   "was committed, e.g. by an interrupted copy)")
  if hashes:
    for rel, (_, sha) in sorted(listed.items()):
      if _sha256(present[rel]) != sha:
        return Problem("hash-mismatch", rel, "its sha256 differs from the manifest (bytes changed on disk)")
  return None


def _has_manifest(step_dir: str) -> bool:
  return fileio.exists(os.path.join(step_dir, MANIFEST))


# ----------------------------------------------------------------------------------------------
# Multi-process agreement: process 0 decides, everyone follows.


def _gb(n: int | None) -> str:
  return f"{n / 1e9:.2f} GB ({n} bytes)" if n is not None else "?"


class _QuietBackgroundErrors(logging.Filter):
  """Drops orbax's error records of a failed background save (a traceback from each thread involved, and again
  from wait_until_finished): the Checkpointer raises the same error at its next call, as one line
  (`_finish_pending`), so a full disk ends a run with that line instead of pages of tracebacks."""
  _SAVE_FAILURES = ("_SignalingThread.run() raised an exception", "in background save thread",
                    "Save Finalize thread")

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or "orbax" not in record.pathname:
      return True
    message = record.getMessage()
    return not any(s in message for s in self._SAVE_FAILURES)


logging.getLogger("absl").addFilter(_QuietBackgroundErrors())  # orbax logs through absl's logger


def _is_primary() -> bool:
  return jax.process_index() == 0


def _broadcast(value: int) -> int:
  """Process 0's `value` on every process."""
  if jax.process_count() == 1:
    return value
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def _all_true(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.array(flag))))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _commit_file_mode(directory: str) -> bool:
  """Whether orbax commits steps in `directory` by writing commit_success.txt into them rather than by renaming a
  temporary folder: its choice for gs:// (orbax atomicity_defaults), where a rename copies every object."""
  return directory.startswith("gs://")


def _numbered(directory: str) -> list[int]:
  """Steps with a committed folder in `directory`, ascending (in commit-file mode: holding commit_success.txt)."""
  if not fileio.isdir(directory):
    return []
  steps = [n for n in fileio.listdir(directory) if n.isdigit() and fileio.isdir(os.path.join(directory, n))]
  if _commit_file_mode(directory):
    steps = [n for n in steps if fileio.exists(os.path.join(directory, n, _COMMIT_FILE))]
  return sorted(int(n) for n in steps)


def _set_aside(directory: str, name: str, step: int, reason: str) -> str:
  """Renames `directory/name` to `<step>.corrupt-<reason>-<time>` (a free name) and returns the new name."""
  stamp = time.strftime("%Y%m%dT%H%M%S")
  target = f"{step}.corrupt-{reason}-{stamp}"
  n = 1
  while fileio.exists(os.path.join(directory, target)):
    n += 1
    target = f"{step}.corrupt-{reason}-{stamp}-{n}"
  fileio.rename(os.path.join(directory, name), os.path.join(directory, target))
  return target


def _delete_quietly(path: str) -> None:
  """rmtree for a background thread: a failure is logged (the next open retries), never raised into nowhere."""
  try:
    fileio.rmtree(path, missing_ok=True)
  except OSError as e:
    logging.warning("Checkpoint: could not finish deleting %s (%s: %s); the next run's open retries.", path,
                    type(e).__name__, e)


class Checkpointer:
  """Saves and restores (state, data-iterator state, metadata) under `directory`, keeping the newest `keep`.

  Opening it sets aside interrupted saves and damaged newest steps (see the module docstring), so that
  `latest_step`, `read_meta` and `restore_latest_valid` see only steps that can be resumed from.
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, compression: bool = False):
    """compression: zstd-compress the arrays of new saves (restores read either kind). Off by default: dense
    float32 training state shrinks by about 8% while saving and restoring become CPU-bound on the codec
    (benchmarks/checkpoint_io.py: restore about 3.5x slower on a 2-core host)."""
    self.directory = fileio.abspath(directory)
    self.keep = keep
    self._async = async_save
    self._pending: int | None = None  # the step whose save may still be running in the background
    self._verified: set[int] = set()  # steps whose sha256s were checked by this process
    self._unverifiable: set[int] = set()  # steps without a manifest (older than manifests), warned about once
    self._last_problem = ""  # what the last step set aside had, for error messages
    self._deleter: threading.Thread | None = None  # deleting the files of an old step (local folders)
    self._need = 0  # bytes the pending save needs on disk (`_check_space`), for a disk-full message
    if _is_primary():
      fileio.makedirs(self.directory)
      self._clear_interrupted()
      for step in reversed(_numbered(self.directory)):
        if self._verify_or_set_aside(step, then="looking at the previous step"):
          break
    _barrier(f"gptrl-checkpointer-open:{self.directory}")
    # Orbax's own garbage collection (max_to_keep) is off: it would count damaged steps (see _collect_garbage).
    # Saves are always asynchronous inside orbax, the only mode with a hook before the commit rename; a
    # synchronous Checkpointer waits for each save.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=True, enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_pending_manifest))
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
        "state": ocp.PyTreeCheckpointHandler(use_compression=compression),
        "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

  # -- what is on disk

  def latest_step(self) -> int | None:
    """The newest complete step, or None (temporary directories of interrupted saves are ignored)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _clear_interrupted(self) -> None:
    """Sets aside the folders of saves a kill interrupted (temporary folders; in commit-file mode, step folders
    without commit_success.txt) and finishes deletions of old steps (process 0)."""
    if not fileio.isdir(self.directory):
      return
    names = sorted(fileio.listdir(self.directory))
    for name in names:
      if name.endswith(_GC_SUFFIX):
        path = os.path.join(self.directory, name)
        logging.info("Checkpoint %s: finishing the deletion of old step %s.", self.directory, name)
        if fileio.is_remote(path):  # a marker object (see _delete_step); the step folder is still named <step>
          fileio.rmtree(os.path.join(self.directory, name[:-len(_GC_SUFFIX)]), missing_ok=True)
          fileio.remove(path)
        else:
          fileio.rmtree(path, missing_ok=True)
    for name in names:
      path = os.path.join(self.directory, name)
      match = re.fullmatch(r"(\d+)" + re.escape(_TMP_SUFFIX) + ".*", name)
      uncommitted = (_commit_file_mode(self.directory) and name.isdigit()
                     and fileio.isdir(path) and not fileio.exists(os.path.join(path, _COMMIT_FILE)))
      if (match and fileio.isdir(path)) or uncommitted:
        step = match.group(1) if match else name
        aside = _set_aside(self.directory, name, int(step), "interrupted-save")
        logging.warning("Checkpoint %s: %s is an interrupted save of step %s (the process stopped while writing "
                        "it); moved to %s.", self.directory, name, step, aside)

  def _delete_step(self, step: int) -> None:
    """Deletes an old step so that a kill midway never leaves something that looks like a step. Local: rename to
    `<step>.gc-deleting`, then delete. In a bucket, where a rename copies everything: an empty marker object
    `<step>.gc-deleting` first, then the commit file (orbax stops counting the step), the folder, the marker."""
    step_dir = self._step_dir(step)
    doomed = os.path.join(self.directory, f"{step}{_GC_SUFFIX}")
    if fileio.is_remote(step_dir):
      fileio.atomic_write(doomed, b"")
      if fileio.exists(os.path.join(step_dir, _COMMIT_FILE)):
        fileio.remove(os.path.join(step_dir, _COMMIT_FILE))
      fileio.rmtree(step_dir)
      fileio.remove(doomed)
      return
    fileio.rmtree(doomed, missing_ok=True)  # an earlier deletion of this step that did not finish
    fileio.rename(step_dir, doomed)
    # The step is gone once renamed; deleting its files (0.5 s for a 1 GB step) happens off the training loop's
    # thread. A kill midway leaves `<step>.gc-deleting`, which the next open finishes.
    self._join_deleter()
    self._deleter = threading.Thread(target=_delete_quietly, args=(doomed,), name=f"gptrl-checkpoint-delete-{step}",
                                     daemon=True)
    self._deleter.start()

  def _join_deleter(self) -> None:
    if self._deleter is not None:
      self._deleter.join()
      self._deleter = None

  def _verify_or_set_aside(self, step: int, *, then: str, hashes: bool = True) -> bool:
    """True if `step` is intact (or has no manifest to check, being older than manifests); otherwise sets it
    aside with one log line and returns False. Process 0 only."""
    if step in self._verified:
      return True
    step_dir = self._step_dir(step)
    problem = verify_step(step_dir, hashes=hashes)
    if problem is None:
      if not _has_manifest(step_dir):
        if step not in self._unverifiable:
          logging.warning("Checkpoint %s has no %s (written before checkpoints carried one): it cannot be "
                          "verified.", step_dir, MANIFEST)
          self._unverifiable.add(step)
      elif hashes:
        self._verified.add(step)
      return True
    aside = _set_aside(self.directory, str(step), step, problem.reason)
    self._last_problem = f"{problem}; moved to {aside}"
    logging.error("Checkpoint %s is damaged: %s; moved to %s, %s.", step_dir, problem, aside, then)
    return False

  # -- saving

  def _write_pending_manifest(self) -> None:
    """Orbax's post-finalization callback (background thread, process 0): every item of the pending step is
    final and the folder not yet renamed. Writes the manifest inside it, so the rename commits both."""
    step = self._pending
    if step is None:
      raise CheckpointError(f"{self.directory}: orbax finalised a save that this Checkpointer did not start.")
    tmp = self._step_dir(step) + _TMP_SUFFIX
    # Orbax's commit-file mode (gs://) writes in place; the rename mode uses the temporary folder.
    step_dir = tmp if not _commit_file_mode(self.directory) and fileio.isdir(tmp) else self._step_dir(step)
    if not fileio.isdir(step_dir):
      raise CheckpointError(f"{self.directory}: the save of step {step} has neither {tmp} nor its final folder; "
                            "orbax's temporary-folder naming may have changed.")
    start = time.perf_counter()
    manifest = write_manifest(step_dir, step)
    logging.info("Checkpoint %d: manifest of %d files, %.1f MB, in %.2f s.", step, len(manifest["files"]),
                 sum(f["size"] for f in manifest["files"]) / 1e6, time.perf_counter() - start)

  def save(self, step: int, state: Any, *, data: dict[str, Any], meta: dict[str, Any]) -> None:
    """Starts saving `step` (returns once the arrays are copied off the device when saving asynchronously).

    First waits for the previous save: its error, if it failed in the background, is raised here as a
    CheckpointError rather than lost; once it is committed, old steps beyond `keep` are deleted.
    """
    self._finish_pending()
    self._check_space(step, state)
    self._pending = step
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data),
        meta=ocp.args.JsonSave({**meta, MANIFEST_META_KEY: MANIFEST_FORMAT})), force=True)
    if not self._async:
      self._finish_pending()

  def _check_space(self, step: int, state: Any) -> None:
    """Before a save starts: room on a local disk for the whole step (as large as the newest step's files, or
    the state's arrays when there is none yet, plus 5%), or a one-line CheckpointError naming the folder, the
    bytes free and the bytes needed; nothing is written and every complete step stays."""
    free, need, basis = None, 0, ""
    if _is_primary():
      free = fileio.free_bytes(self.directory)
      if free is not None:
        need, basis = self._bytes_of_newest_step()
        if not need:
          need = int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state)))
          basis = "the state's arrays"
        need = int(need * 1.05)
    self._need = need
    if not _broadcast(int(free is None or free >= need)):
      raise CheckpointError(
          f"Not enough disk space to save checkpoint {step} in {self.directory}: {_gb(free)} free, the step needs "
          f"about {_gb(need)} (from {basis or 'process 0'}, plus 5%). Nothing was written for step {step}; the "
          f"newest complete checkpoint is step {self.latest_step()}. Free space (or lower "
          "train.keep_checkpoints) and relaunch: the run resumes from it.")

  def _bytes_of_newest_step(self) -> tuple[int, str]:
    """(the bytes of the newest complete step's files by its manifest, "step N"), or (0, "") without one."""
    step = self.latest_step()
    if step is None:
      return 0, ""
    path = os.path.join(self._step_dir(step), MANIFEST)
    try:
      with fileio.open(path) as f:
        return int(sum(int(e["size"]) for e in json.load(f)["files"])), f"step {step}"
    except (OSError, ValueError, KeyError, TypeError):
      return 0, ""

  def wait(self) -> None:
    """Blocks until every started save is complete on disk; raises CheckpointError if one failed."""
    self._finish_pending()

  def poll(self) -> None:
    """Never blocks: if the pending save has ended, completes it as `wait` does (raising CheckpointError if it
    failed). Cheap enough to call every step, so that a background error stops the run within a step (in a
    multi-process job it costs one scalar broadcast: every process must act on process 0's view)."""
    if self._pending is not None and _broadcast(int(not self._manager.is_saving_in_progress())):
      self._finish_pending()

  def _finish_pending(self) -> None:
    step = self._pending  # stays set while waiting: the manifest callback reads it
    error = None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      error = e
    if not _all_true(error is None):  # every process raises, or none does
      self._pending = None
      why = " ".join(f"{type(error).__name__}: {error}".split()) if error is not None else \
          "on another process; see its log"
      space = ""
      if error is not None and any(s in why for s in ("No space left", "os_error_code='28'", "Disk quota",
                                                      "File too large", "os_error_code='27'")):
        free = fileio.free_bytes(self.directory)
        space = (f" The disk holding {self.directory} has {free} bytes free" if free is not None else "") + \
            (f"; the step needs about {self._need} bytes." if self._need else ".")
      raise CheckpointError(
          f"Saving checkpoint {self._step_dir(step) if step is not None else self.directory} failed in the "
          f"background ({why}).{space} Nothing was committed for step {step}; the newest complete checkpoint is "
          f"step {self.latest_step()}. Check the disk (space, permissions, quota); relaunching resumes from that "
          "checkpoint.") from error
    self._pending = None
    if step is None:
      return
    # The step just committed must pass the cheap check (every file present at its size) before it may
    # count towards `keep`; its bytes were hashed from disk moments ago when its manifest was written.
    ok = 1
    if _is_primary():
      ok = int(self._verify_or_set_aside(step, hashes=False, then="keeping the older steps"))
    if not _broadcast(ok):
      self._manager.reload()
      raise CheckpointError(f"Checkpoint {self._step_dir(step)} was committed but fails its manifest check "
                            f"({self._last_problem or 'see the log of process 0'}); no older step was deleted.")
    self._collect_garbage()

  def _collect_garbage(self) -> None:
    """Deletes the steps older than the newest `keep` that pass the manifest check (sizes; see `verify_step`).

    Steps that fail the check never count (they are set aside instead of deleted), and steps without a manifest
    never count, so whatever turns out damaged, `keep` intact steps remain. Deletion renames first, so a kill
    mid-delete leaves `<step>.gc-deleting` (finished at the next open), never a half-deleted step.
    """
    changed = 0
    if _is_primary():
      good = []
      for step in reversed(_numbered(self.directory)):
        step_dir = self._step_dir(step)
        if len(good) < self.keep:
          if not self._verify_or_set_aside(step, hashes=False, then="it is not counted among the kept steps"):
            changed = 1
          elif _has_manifest(step_dir):
            good.append(step)
          continue
        changed = 1
        if not self._verify_or_set_aside(step, hashes=False, then="instead of deleting it as an old step"):
          continue
        self._delete_step(step)
        self._verified.discard(step)
    if _broadcast(changed):
      _barrier(f"gptrl-checkpointer-gc:{self.directory}")
      self._manager.reload()

  # -- restoring

  def read_meta(self, step: int) -> dict[str, Any]:
    """The `meta` item of `step`."""
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Restores `step` onto the shardings in `abstract_state` (a tree of ShapeDtypeStructs), after checking it
    against its manifest (sha256, once per step and process).

    Returns:
      (state, data, meta).
    Raises:
      CheckpointError: the step is damaged; it has been set aside (renamed) with a log line.
    """
    ok = 1
    if _is_primary():
      ok = int(self._verify_or_set_aside(step, then="not restoring it"))
    if not _broadcast(ok):
      self._manager.reload()
      raise CheckpointError(f"Checkpoint {self._step_dir(step)} is damaged: "
                            f"{self._last_problem or 'see the log of process 0'}.")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(
            abstract_state)), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return restored["state"], restored["data"], restored["meta"]

  def restore_latest_valid(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
    """Restores the newest step that passes its manifest and reads back; a damaged or unreadable one is set
    aside (renamed, never deleted) with a log line saying why, and the previous one is tried.

    Returns:
      (step, state, data, meta), or None when there is no checkpoint at all.
    Raises:
      CheckpointError: a step does not fit `abstract_state` (another model or optimizer): always an error, as is
        any restore failure of a step whose files match its manifest, rather than a reason to fall back.
    """
    self._finish_pending()
    while True:
      step = -1
      if _is_primary():
        for candidate in reversed(_numbered(self.directory)):
          if self._verify_or_set_aside(candidate, then="trying the previous step"):
            step = candidate
            break
      step = _broadcast(step)
      _barrier(f"gptrl-checkpointer-pick:{self.directory}")
      self._manager.reload()
      if step < 0:
        return None
      error = None
      try:
        restored = (step, *self.restore(step, abstract_state))
      except (TokenizerMismatchError, CheckpointError):
        raise
      except Exception as e:  # pylint: disable=broad-except
        error = e
      if _all_true(error is None):
        return restored
      # A step whose files are as they were written (or whose error says so) does not fit the state being
      # restored: setting it aside would silently restart the run from an older step, or from scratch.
      verified = _broadcast(int(step in self._verified))
      misfit = error is not None and (verified or (isinstance(error, (ValueError, TypeError)) and any(
          word in str(error).lower() for word in ("shape", "structure", "dtype"))))
      if not _all_true(not misfit):
        why = f"{type(error).__name__}: {error}" if error is not None else "see the other processes' logs"
        raise CheckpointError(
            f"Checkpoint {self.directory}/{step} does not fit the configured model and optimizer"
            f"{' (its files match its manifest)' if verified else ''}: {why}\n"
            "Resume with the config that wrote it, or start in a fresh workdir.") from error
      if _is_primary():
        aside = _set_aside(self.directory, str(step), step, "unreadable")
        logging.error("Checkpoint %s/%d cannot be restored (%s); moved to %s, trying the previous step.",
                      self.directory, step, f"{type(error).__name__}: {error}" if error else "on another process",
                      aside)
        self._verified.discard(step)

  def close(self) -> None:
    """Waits for pending saves (raising CheckpointError if one failed) and releases the manager's threads."""
    try:
      self._finish_pending()
    finally:
      self._join_deleter()
      self._manager.close()


def check_tokenizer(meta: dict[str, Any], tokenizer_sha256: str, *, where: str) -> None:
  """Refuses a checkpoint whose recorded tokenizer differs from the one in use."""
  recorded = meta.get("tokenizer_sha256")
  if recorded and recorded != tokenizer_sha256:
    raise TokenizerMismatchError(
        f"{where} was trained with tokenizer sha256 {recorded}, but the tokenizer in use has sha256 "
        f"{tokenizer_sha256}. Token ids would mean different things. Use the tokenizer saved with that run "
        "(config.tokenizer.path = <its workdir>/tokenizer.model) or start from a fresh workdir.")


# ----------------------------------------------------------------------------------------------
# Hand-off between stages: parameters of one stage's checkpoint as the starting point of the next.


def resolve_checkpoint(path: str, step: int = -1) -> tuple[str, int]:
  """The checkpoints folder and step that `path` names.

  Args:
    path: a run's workdir (holding checkpoints/), a checkpoints folder, or one step folder (<...>/<step>).
    step: with a workdir or checkpoints folder, the step to use; -1: the newest committed one (which must then
      pass its manifest: a damaged newest step is refused, not skipped).
  Returns:
    (checkpoints folder, step).
  Raises:
    CheckpointError: nothing usable at `path`; says what was looked for.
  """
  path = fileio.abspath(path)
  if not fileio.isdir(path):
    raise CheckpointError(f"init checkpoint {path}: no such folder. Expected a run's workdir, its "
                          "checkpoints/ folder or one checkpoints/<step> folder.")
  base = os.path.basename(path)
  if base.isdigit() and (fileio.isdir(os.path.join(path, "state")) or _has_manifest(path)):
    if step not in (-1, int(base)):
      raise CheckpointError(f"init checkpoint {path} is step {base}, but init.step={step}.")
    return os.path.dirname(path), int(base)
  folder = os.path.join(path, "checkpoints") if fileio.isdir(os.path.join(path, "checkpoints")) else path
  steps = _numbered(folder)
  if not steps:
    raise CheckpointError(f"init checkpoint {path}: no complete checkpoint in {folder} (a step folder holds "
                          "state/, meta/ and data/; interrupted saves are *.orbax-checkpoint-tmp*).")
  if step == -1:
    return folder, steps[-1]
  if step not in steps:
    raise CheckpointError(f"init checkpoint {folder}: no step {step}; available: {steps}.")
  return folder, step


# Another run's steps verified by this process: folder -> (name, size, mtime) of its files when verified.
_HANDOFF_VERIFIED: dict[str, tuple] = {}


def _stat_signature(step_dir: str) -> tuple:
  """(relative path, size, mtime) of every file of a step: what changes when any file is rewritten."""
  return tuple((rel, *fileio.stat(path)) for rel, path in sorted(_step_files(step_dir, hashed_only=False).items()))


def verify_handoff(folder: str, step: int) -> None:
  """Verifies another run's step `folder/step` against its manifest (once per process while its files are
  unchanged). A damaged step is refused and left exactly as it is: it is not this run's to set aside.

  Raises:
    CheckpointError: names the file and what is wrong with it.
  """
  step_dir = fileio.realpath(os.path.join(folder, str(step)))
  signature = _stat_signature(step_dir)
  if _HANDOFF_VERIFIED.get(step_dir) == signature:
    return
  problem = verify_step(step_dir)
  if problem is not None:
    raise CheckpointError(
        f"Checkpoint {folder}/{step} is damaged: {problem}. It belongs to another run, so it is neither repaired "
        f"nor set aside here, and no older step is used in its place. Choose another step explicitly (available "
        f"in {folder}: {_numbered(folder)}), or resume that run, which sets the damaged step aside.")
  if not _has_manifest(step_dir):
    logging.warning("Checkpoint %s/%d has no %s (written before checkpoints carried one): it cannot be "
                    "verified.", folder, step, MANIFEST)
  _HANDOFF_VERIFIED[step_dir] = signature


def read_step_meta(folder: str, step: int) -> dict[str, Any]:
  """The `meta` item of checkpoint `folder/step` (verified against its manifest first), read without opening a
  CheckpointManager."""
  verify_handoff(folder, step)
  try:
    return _read_meta_dir(os.path.join(folder, str(step)))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{folder}/{step}: cannot read its meta item ({type(e).__name__}: {e}).") from e


def _flat_names(tree: Any) -> dict[str, Any]:
  """'a/b/c' -> leaf for a nested dict-like tree."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)] = leaf
  return out


def load_params(path: str, abstract_params: Any, *, step: int = -1, tokenizer_sha256: str | None,
                unused_ok: tuple[str, ...] = (), subtree: str = "") -> tuple[Any, dict[str, Any], str]:
  """Restores only the parameters of another run's checkpoint, onto the shardings of `abstract_params`.

  Every parameter of `abstract_params` must exist in the checkpoint with the same shape; every parameter of
  the checkpoint must be wanted, except names under a prefix in `unused_ok` (e.g. the LM head of an SFT model
  that a reward model does not use). All differences are reported together, by name, in one error.

  Args:
    path: see `resolve_checkpoint`.
    abstract_params: ShapeDtypeStructs (with shardings) of the parameters to fill; dtypes are cast.
    step: see `resolve_checkpoint`.
    tokenizer_sha256: the tokenizer in use; refused if the checkpoint was trained with another. None: no check.
    unused_ok: name prefixes ("head", "block_0/mlp") of checkpoint parameters that may be left out.
    subtree: load the checkpoint's parameters under this top-level name (e.g. "transformer" of a reward
      model) instead of all of them; the rest of the checkpoint is not read.
  Returns:
    (params, the checkpoint's meta, "folder/step" for logs).
  Raises:
    CheckpointError: missing, unexpected or differently shaped parameters; a step that fails its manifest.
    TokenizerMismatchError: the checkpoint was trained with another tokenizer.
  """
  folder, step = resolve_checkpoint(path, step)
  where = f"{folder}/{step}"
  meta = read_step_meta(folder, step)
  saved = ocp.PyTreeCheckpointer().metadata(os.path.join(where, "state")).item_metadata
  if tokenizer_sha256 is not None:
    check_tokenizer(meta, tokenizer_sha256, where=f"The init checkpoint {where}")
  if saved is None or "params" not in saved:
    raise CheckpointError(f"{where}: no params in the saved state (is this a gptrl training checkpoint?).")
  saved_params = saved["params"]
  if subtree:
    if subtree not in saved_params:
      raise CheckpointError(f"{where}: no parameters under {subtree!r} (top-level names: {sorted(saved_params)}).")
    saved_params = saved_params[subtree]
  have = {k: tuple(v.shape) for k, v in _flat_names(saved_params).items()}
  want = {k: tuple(v.shape) for k, v in _flat_names(abstract_params).items()}
  missing = sorted(set(want) - set(have))
  unexpected = sorted(k for k in set(have) - set(want)
                      if not any(k == p or k.startswith(p + "/") for p in unused_ok))
  reshaped = sorted(k for k in set(want) & set(have) if want[k] != have[k])
  if missing or unexpected or reshaped:
    lines = [f"  {k}: checkpoint {have[k]}, model {want[k]}" for k in reshaped]
    lines += [f"  {k}: in the model {want[k]}, not in the checkpoint" for k in missing]
    lines += [f"  {k}: in the checkpoint {have[k]}, not in the model" for k in unexpected]
    stage = meta.get("stage", "?")
    raise CheckpointError(
        f"The parameters of {where} (stage {stage!r}, model {meta.get('model')}) do not fit the model being "
        f"initialised; {len(lines)} parameter(s) differ:\n" + "\n".join(lines) +
        "\nUse the same model shape as that run (shapes come from its checkpoint meta), or another checkpoint.")
  target = {"params": {subtree: abstract_params} if subtree else abstract_params}
  restored = ocp.PyTreeCheckpointer().restore(
      os.path.join(where, "state"),
      args=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True))
  return (restored["params"][subtree] if subtree else restored["params"]), meta, where


# ----------------------------------------------------------------------------------------------
# Hand-offs between stages: another run's meta, model shape and frozen parameters.


def read_checkpoint_meta(path: str, step: int = -1) -> tuple[dict[str, Any], str, int]:
  """(meta, checkpoints folder, step) of another run's checkpoint (see `resolve_checkpoint`)."""
  folder, step = resolve_checkpoint(path, step)
  return read_step_meta(folder, step), folder, step


# -- Lineage: the checkpoints a run started from, and whether they changed since ------------------------------

PARENT_ROLES = ("init", "reward_model", "policy_init")  # a stage config's groups that name a checkpoint it reads


def manifest_sha256(step_dir: str) -> str:
  """sha256 of checkpoint step `step_dir`'s manifest.json (every file's size and sha256): the identity of its
  contents. "" for a step written without a manifest."""
  try:
    return hashlib.sha256(fileio.read_bytes(os.path.join(step_dir, MANIFEST))).hexdigest()
  except OSError:
    return ""


def parents_of(cfg: Any) -> dict[str, dict[str, Any]]:
  """The checkpoints a stage config reads, by role (its `init`, `reward_model`, `policy_init` groups that name
  one): {role: {"checkpoint": folder/step, "manifest_sha256", "stage"}}, each resolved as the stage resolves it
  (step -1: the newest valid step now)."""
  out = {}
  for role in PARENT_ROLES:
    group = getattr(cfg, role, None)
    if group is None or not getattr(group, "checkpoint", ""):
      continue
    meta, folder, step = read_checkpoint_meta(group.checkpoint, group.step)
    where = f"{folder}/{step}"
    out[role] = {"checkpoint": where, "manifest_sha256": manifest_sha256(where), "stage": meta.get("stage")}
  return out


def allowed_parent_changes(cfg: Any) -> dict[str, bool]:
  """{role: its group's allow_changed} for the roles of `parents_of`."""
  return {role: bool(getattr(getattr(cfg, role, None), "allow_changed", False)) for role in PARENT_ROLES}


def check_parents(saved_meta: dict[str, Any], parents: dict[str, dict[str, Any]], *, where: str,
                  allowed: dict[str, bool]) -> list[dict[str, Any]]:
  """Compares the parents a resumed run's checkpoint `where` recorded (its meta's "parents") with what its
  config resolves to now; returns the changes that `allowed[role]` accepts (to be recorded in the meta's
  "parent_changes").

  Raises:
    CheckpointError: a parent changed (another step, or the same step with other contents) and its role's
      `allow_changed` is not set; the message names both and the setting.
  """
  saved = saved_meta.get("parents") or {}
  changes = []
  for role, now in parents.items():
    was = saved.get(role)
    if not was:
      continue  # recorded before lineage was kept, or a role added since
    same_step = was["checkpoint"] == now["checkpoint"]
    same_bytes = not (was["manifest_sha256"] and now["manifest_sha256"]) or (
        was["manifest_sha256"] == now["manifest_sha256"])
    if same_step and same_bytes:
      continue
    what = (f"was rewritten since (manifest sha256 now {now['manifest_sha256'][:12]})" if same_step else
            f"is now {now['checkpoint']} (sha256 {now['manifest_sha256'][:12]})")
    if not allowed.get(role, False):
      raise CheckpointError(
          f"{where} started from {role} checkpoint {was['checkpoint']} (sha256 {was['manifest_sha256'][:12]}), "
          f"which {what}. Resuming would mix two parents in one run: point config.{role}.checkpoint/step at the "
          f"original, start a new workdir, or set config.{role}.allow_changed=True to continue from the new one "
          "(recorded in the checkpoint's meta as parent_changes).")
    logging.warning("config.%s.allow_changed=True: %s started from %s, which %s; continuing from the new one.",
                    role, where, was["checkpoint"], what)
    changes.append({"role": role, "was": was, "now": now, "resumed_from": where})
  return changes


def newest_meta(folder: str) -> tuple[str, dict[str, Any]] | None:
  """(step folder, meta) of the newest step in checkpoints folder `folder` whose files have their manifest's
  names and sizes (no hashing of the arrays) and whose meta reads; None without one. For reports."""
  for step in reversed(_numbered(folder)):
    step_dir = f"{folder}/{step}"
    if verify_step(step_dir, hashes=False) is not None:
      continue
    try:
      return step_dir, _read_meta_dir(step_dir)
    except Exception:  # pylint: disable=broad-except
      continue
  return None


def lineage(folder: str) -> dict[str, Any] | None:
  """What a run's newest checkpoint in `folder` (its checkpoints/ folder) says of where it came from, for the
  report: {"checkpoint", "manifest_sha256", "stage", "parents": {role: {..., "now_sha256": the parent's manifest
  hash today ("" if it is gone), "same": unchanged since}}, "parent_changes", "init_checkpoint"}; None without a
  readable step (`newest_meta`)."""
  found = newest_meta(folder)
  if found is None:
    return None
  step_dir, meta = found
  parents = {}
  for role, parent in (meta.get("parents") or {}).items():
    now = manifest_sha256(parent["checkpoint"]) if fileio.isdir(parent["checkpoint"]) else ""
    parents[role] = {**parent, "now_sha256": now, "same": bool(now) and now == parent["manifest_sha256"]}
  return {"checkpoint": step_dir, "manifest_sha256": manifest_sha256(step_dir), "stage": meta.get("stage"),
          "parents": parents, "parent_changes": meta.get("parent_changes") or [],
          "init_checkpoint": meta.get("init_checkpoint")}


def model_config_from_meta(meta: dict[str, Any]) -> Any:
  """The model shape (a gptrl.config.ModelConfig) a checkpoint's meta records; fields unknown to this version are
  ignored."""
  from gptrl import config as config_lib  # pylint: disable=import-outside-toplevel
  fields = set(config_lib.ModelConfig.__dataclass_fields__)
  return config_lib.ModelConfig(**{k: v for k, v in meta["model"].items() if k in fields})


def param_shardings(module: Any, example_tokens: Any, mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """(abstract parameters, their shardings on `mesh` by the sharding rules) of `module`, nothing allocated."""
  from flax import linen as nn  # pylint: disable=import-outside-toplevel
  from gptrl import sharding  # pylint: disable=import-outside-toplevel
  with sharding.activate(mesh):
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), example_tokens)["params"])
    shardings = sharding.tree_shardings(abstract, mesh)
  abstract = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
                          abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return abstract, shardings


def load_frozen_params(module: Any, example_tokens: Any, mesh: jax.sharding.Mesh, init: Any, *,
                       tokenizer_sha256: str, unused_ok: tuple[str, ...] = (), subtree: str = "") -> Any:
  """The parameters of checkpoint `init` (a gptrl.config.InitConfig: checkpoint, step) for `module`, laid out on
  `mesh` by the sharding rules (no optimizer state): the way a stage loads a model it samples from or scores with
  but does not train."""
  abstract, shardings = param_shardings(module, example_tokens, mesh)
  params, _, where = load_params(init.checkpoint, abstract_like(abstract, shardings), step=init.step,
                                 tokenizer_sha256=tokenizer_sha256, unused_ok=unused_ok, subtree=subtree)
  logging.info("Loaded the parameters of %s.", where)
  return params


def open_workdir_checkpointer(workdir: str, train_cfg: Any) -> Checkpointer:
  """The Checkpointer over `<workdir>/checkpoints`, as a `train` config group (TrainConfig) configures it."""
  return Checkpointer(os.path.join(workdir, "checkpoints"), keep=train_cfg.keep_checkpoints,
                      async_save=train_cfg.async_checkpoint, compression=train_cfg.checkpoint_compression)
