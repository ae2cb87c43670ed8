"""Set-up steps shared by the stages: workdir, resolved config, tokenizer, mesh, resume."""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import jax

from gptrl import config as config_lib
from gptrl import fileio
from gptrl import tokenizer as tokenizer_lib
from gptrl.corpus import Document


def prepare_workdir(cfg: Any) -> str:
  """Creates the workdir and writes the resolved config as `config.json` (process 0 only).

  A config that differs from the one an earlier run left there is logged key by key (resuming with, say,
  more steps is fine; the data fingerprint and tokenizer checks refuse the changes that are not).
  """
  workdir = fileio.abspath(cfg.workdir)
  fileio.makedirs(workdir)
  resolved = config_lib.to_dict(cfg)
  path = os.path.join(workdir, "config.json")
  if jax.process_index() == 0:
    if fileio.exists(path):
      try:
        previous = json.loads(fileio.read_text(path))
      except json.JSONDecodeError:
        previous = {}
      for key, (old, new) in sorted(_diff(previous, json.loads(json.dumps(resolved))).items()):
        logging.warning("config.%s changed since the last run in this workdir: %r -> %r", key, old, new)
    fileio.atomic_write(path, json.dumps(resolved, indent=2, sort_keys=True))
  return workdir


def setup(cfg: Any) -> tuple[str, str, jax.sharding.Mesh]:
  """(workdir, data cache folder, mesh) of a training stage; checks the batch splits over the mesh."""
  from gptrl import sharding  # pylint: disable=import-outside-toplevel
  from gptrl.corpus import default_cache_dir  # pylint: disable=import-outside-toplevel
  workdir = prepare_workdir(cfg)
  cache_dir = cfg.data.cache_dir or str(default_cache_dir())
  mesh = sharding.make_mesh(cfg.mesh)
  logging.info("Mesh %s over %d devices.", dict(mesh.shape), mesh.size)
  if cfg.data.batch_size % sharding.data_parallel_size(mesh):
    raise config_lib.ConfigError(
        f"config.data.batch_size: {cfg.data.batch_size} must be divisible by the data-parallel size (mesh data x "
        f"fsdp = {sharding.data_parallel_size(mesh)}).")
  return workdir, cache_dir, mesh


def _diff(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = {}
    for k in set(old) | set(new):
      out.update(_diff(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k))
    return out
  return {} if old == new else {prefix: (old, new)}


def load_or_train_tokenizer(cfg: config_lib.TokenizerConfig, workdir: str,
                            train_docs: Sequence[Document] | None) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer, always kept as `<workdir>/tokenizer.model`.

  Order: the workdir's copy (a resumed run keeps its tokenizer); else `cfg.path`, copied into the workdir;
  else one trained on `train_docs` (deterministic, so every process trains the same model).
  """
  local = os.path.join(workdir, "tokenizer.model")
  if fileio.exists(local):
    tok = tokenizer_lib.load_tokenizer(local)
    if cfg.path:
      configured = tokenizer_lib.load_tokenizer(cfg.path)
      if configured.sha256 != tok.sha256:
        raise tokenizer_lib.TokenizerMismatchError(
            f"config.tokenizer.path={cfg.path} (sha256 {configured.sha256}) differs from the tokenizer this "
            f"workdir was started with, {local} (sha256 {tok.sha256}). Use a fresh workdir or that tokenizer.")
    return tok
  if cfg.path:
    source = tokenizer_lib.load_tokenizer(cfg.path)
    if jax.process_index() == 0:
      source.save(local)
    return source
  if not train_docs:
    raise config_lib.ConfigError("config.tokenizer.path: no tokenizer given and no training text to train one on.")
  logging.info("Training a %d-token %s sentencepiece model on %d documents.", cfg.vocab_size, cfg.model_type,
               len(train_docs))
  target = local if jax.process_index() == 0 else f"{local}.process{jax.process_index()}"
  tok = tokenizer_lib.train_tokenizer((d.text for d in train_docs), target, vocab_size=cfg.vocab_size,
                                      model_type=cfg.model_type)
  return tok


def resolve_vocab_size(model_cfg: config_lib.ModelConfig, tok: tokenizer_lib.Tokenizer) -> config_lib.ModelConfig:
  """Fills `vocab_size` from the tokenizer (0) or checks a configured one can hold every id.

  A larger configured vocabulary is allowed (padding the table to a multiple of the tensor-parallel size).
  """
  import dataclasses
  if model_cfg.vocab_size == 0:
    return dataclasses.replace(model_cfg, vocab_size=tok.vocab_size)
  if model_cfg.vocab_size < tok.vocab_size:
    raise config_lib.ConfigError(
        f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {tok.vocab_size} "
        f"({tok.path}). Set it to 0 to take the tokenizer's size.")
  return model_cfg


def read_meta(path: str, step: int = -1) -> tuple[dict[str, Any], str, int]:
  """(meta, checkpoints folder, step) of another run's checkpoint (see checkpoint.resolve_checkpoint)."""
  from gptrl import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  folder, step = ckpt_lib.resolve_checkpoint(path, step)
  meta = ckpt_lib.read_step_meta(folder, step)
  return meta, folder, step


def model_config_from_meta(meta: dict[str, Any]) -> config_lib.ModelConfig:
  """The model shape a checkpoint's meta records (fields unknown to this version are ignored)."""
  fields = set(config_lib.ModelConfig.__dataclass_fields__)
  return config_lib.ModelConfig(**{k: v for k, v in meta["model"].items() if k in fields})


def init_source(init: config_lib.InitConfig, tokenizer_path: str, workdir: str,
                runtime: config_lib.ModelRuntimeConfig, *, expect_stage: tuple[str, ...]
                ) -> tuple[config_lib.ModelConfig, tokenizer_lib.Tokenizer, dict[str, Any]]:
  """The model shape, tokenizer and meta of the run a stage starts from.

  The model's shape is the init checkpoint's (from its meta); `runtime` may change how it runs (dtype, remat,
  dropout, attention). The tokenizer is `tokenizer_path` or the init run's `tokenizer.model`, copied into this
  workdir, and must be the one the checkpoint was trained with.
  """
  meta, folder, step = read_meta(init.checkpoint, init.step)
  where = f"{folder}/{step}"
  if meta.get("stage") not in expect_stage:
    logging.warning("init checkpoint %s is from stage %r; this stage expects %s.", where, meta.get("stage"),
                    " or ".join(repr(s) for s in expect_stage))
  if "model" not in meta:
    raise config_lib.ConfigError(f"init.checkpoint: {where} has no model config in its meta.")
  model_cfg = runtime.apply(model_config_from_meta(meta))
  source_tok = tokenizer_path or os.path.join(os.path.dirname(folder), "tokenizer.model")
  if not fileio.exists(source_tok):
    raise config_lib.ConfigError(f"tokenizer_path: {source_tok} does not exist; set tokenizer_path to the "
                                 f"tokenizer the run in {os.path.dirname(folder)} was trained with.")
  tok = load_or_train_tokenizer(config_lib.TokenizerConfig(path=source_tok), workdir, None)
  from gptrl import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  ckpt_lib.check_tokenizer(meta, tok.sha256, where=f"The init checkpoint {where}")
  return model_cfg, tok, {**meta, "init_checkpoint": where}


def open_checkpointer(workdir: str, train: config_lib.TrainConfig) -> Any:
  """The stage's gptrl.checkpoint.Checkpointer over `<workdir>/checkpoints`, as `train` configures it."""
  from gptrl import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  return ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=train.keep_checkpoints,
                               async_save=train.async_checkpoint, compression=train.checkpoint_compression)


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


def load_frozen_params(module: Any, example_tokens: Any, mesh: jax.sharding.Mesh, init: config_lib.InitConfig, *,
                       tokenizer_sha256: str, unused_ok: tuple[str, ...] = (), subtree: str = "") -> Any:
  """The parameters of `init.checkpoint` for `module`, laid out on `mesh` by the sharding rules (no optimizer
  state): the way a stage loads a model it samples from or scores with but does not train."""
  from gptrl import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  abstract, shardings = param_shardings(module, example_tokens, mesh)
  params, _, where = ckpt_lib.load_params(init.checkpoint, ckpt_lib.abstract_like(abstract, shardings),
                                          step=init.step, tokenizer_sha256=tokenizer_sha256, unused_ok=unused_ok,
                                          subtree=subtree)
  logging.info("Loaded the parameters of %s.", where)
  return params


def resume(checkpointer: Any, state: Any, state_shardings: Any, *, tokenizer_sha256: str, fingerprint: str,
           fingerprint_parts: dict[str, Any], train_iter: Any,
           reset_data_position: bool = False) -> tuple[int, Any, dict[str, Any]] | None:
  """Restores this workdir's newest valid checkpoint into (state, train_iter), checking that it belongs to the
  same tokenizer and data pipeline; returns (step, state, the checkpoint's data item), or None when there is
  none (a fresh start).

  A data pipeline whose fingerprint differs from the saved one is refused (naming what differs), unless
  `reset_data_position` (config data.reset_position): then the state is restored and `train_iter` keeps its
  fresh position; the returned data item then has "position_reset": True and no saved iterator positions.
  """
  from gptrl import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from gptrl import data as data_lib  # pylint: disable=import-outside-toplevel
  from gptrl import trainer  # pylint: disable=import-outside-toplevel
  abstract = ckpt_lib.abstract_like(state, state_shardings)
  latest = checkpointer.latest_step()
  if latest is not None:  # a checkpoint written before TrainState had the numerics counters
    abstract = trainer.restore_target(checkpointer.directory, latest, abstract)
  restored = checkpointer.restore_latest_valid(abstract)
  if restored is None:
    return None
  step, restored_state, data_state, meta = restored
  state = trainer.as_train_state(restored_state, state.numerics)
  where = f"{checkpointer.directory}/{step}"
  ckpt_lib.check_tokenizer(meta, tokenizer_sha256, where=f"The checkpoint {where}")
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
