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
