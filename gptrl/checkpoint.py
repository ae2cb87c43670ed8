"""Orbax checkpoints: the one place that saves and restores training state and hands it between stages.

A checkpoint directory `<workdir>/checkpoints/<step>/` holds three items:
  state: the TrainState pytree (params, optimizer state, step, RNG), sharded arrays written by every process;
  data:  the data iterator's state and the fingerprint of the pipeline it belongs to (JSON);
  meta:  what a later stage or a resume must check: stage, tokenizer hash, model config (JSON).
Orbax writes each step into a temporary directory and renames it when complete, so a kill mid-save leaves
the previous step as the latest complete one.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from gptrl.tokenizer import TokenizerMismatchError


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable, or belongs to another model/tokenizer."""


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying `shardings`, the restore target for `tree` (arrays or ShapeDtypeStructs)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
  """Saves and restores (state, data-iterator state, metadata) under `directory`, keeping the newest `keep`."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    """The newest complete step, or None (temporary directories of interrupted saves are ignored)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, *, data: dict[str, Any], meta: dict[str, Any]) -> None:
    """Starts saving `step` (returns once the arrays are copied off the device when saving asynchronously).

    Any error of an earlier asynchronous save surfaces here rather than being lost.
    """
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data), meta=ocp.args.JsonSave(meta)),
        force=True)

  def wait(self) -> None:
    """Blocks until every started save is complete on disk."""
    self._manager.wait_until_finished()

  def read_meta(self, step: int) -> dict[str, Any]:
    """The `meta` item of `step`."""
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Restores `step` onto the shardings in `abstract_state` (a tree of ShapeDtypeStructs).

    Returns:
      (state, data, meta).
    """
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return restored["state"], restored["data"], restored["meta"]

  def restore_latest_valid(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
    """Restores the newest step that reads back; an unreadable one is set aside (renamed, never deleted).

    Returns:
      (step, state, data, meta), or None when there is no checkpoint at all.
    """
    for step in reversed(self.all_steps()):
      try:
        return (step, *self.restore(step, abstract_state))
      except (TokenizerMismatchError, CheckpointError):
        raise
      except Exception as e:  # pylint: disable=broad-except
        if isinstance(e, (ValueError, TypeError)) and "shape" in str(e).lower():
          raise CheckpointError(
              f"Checkpoint {self.directory}/{step} does not fit the configured model: {e}") from e
        aside = os.path.join(self.directory, f"{step}.unreadable-{int(time.time())}")
        logging.error("Checkpoint %s/%d cannot be restored (%s: %s); moving it to %s and trying the previous one.",
                      self.directory, step, type(e).__name__, e, aside)
        if jax.process_index() == 0:
          os.rename(os.path.join(self.directory, str(step)), aside)
        self._manager.reload()
    return None

  def close(self) -> None:
    """Waits for pending saves and releases the manager's threads."""
    self._manager.wait_until_finished()
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
    step: with a workdir or checkpoints folder, the step to use; -1: the newest complete one.
  Returns:
    (checkpoints folder, step).
  Raises:
    CheckpointError: nothing usable at `path`; says what was looked for.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise CheckpointError(f"init checkpoint {path}: no such folder. Expected a run's workdir, its "
                          "checkpoints/ folder or one checkpoints/<step> folder.")
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
    if step not in (-1, int(base)):
      raise CheckpointError(f"init checkpoint {path} is step {base}, but init.step={step}.")
    return os.path.dirname(path), int(base)
  folder = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
  steps = sorted(int(n) for n in os.listdir(folder)
                 if n.isdigit() and os.path.isdir(os.path.join(folder, n, "state")))
  if not steps:
    raise CheckpointError(f"init checkpoint {path}: no complete checkpoint in {folder} (a step folder holds "
                          "state/, meta/ and data/; interrupted saves are *.orbax-checkpoint-tmp-*).")
  if step == -1:
    return folder, steps[-1]
  if step not in steps:
    raise CheckpointError(f"init checkpoint {folder}: no step {step}; available: {steps}.")
  return folder, step


def read_step_meta(folder: str, step: int) -> dict[str, Any]:
  """The `meta` item of checkpoint `folder/step`, read without opening a CheckpointManager."""
  try:
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(folder, str(step), "meta"),
                                                                 args=ocp.args.JsonRestore())
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
    CheckpointError: missing, unexpected or differently shaped parameters.
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
