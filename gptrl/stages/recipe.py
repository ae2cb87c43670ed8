"""A gradient-trained stage is a recipe: its data, model, parameter init (incl. from which previous stage), loss,
eval, samples and meta (`Recipe`). One function, `train`, trains any recipe: set-up, fingerprint, train state,
resume-or-init, jit, the run loop (gptrl/loop.py) and close. Also the set-up steps every stage shares: workdir and
resolved config, mesh, tokenizer, and the model and tokenizer of the run a stage starts from."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from gptrl import checkpoint as ckpt_lib
from gptrl import config as config_lib
from gptrl import fileio
from gptrl import loop as loop_lib
from gptrl import losses
from gptrl import model as model_lib
from gptrl import optim
from gptrl import sharding
from gptrl import tokenizer as tokenizer_lib
from gptrl import trainer
from gptrl.corpus import Document, default_cache_dir


def prepare_workdir(cfg: Any) -> str:
  """Creates the workdir and writes the resolved config as `config.json` (process 0 only).

  A config that differs from the one an earlier run left there is logged key by key (resuming with, say,
  more steps is fine; the data fingerprint and tokenizer checks refuse the changes that are not).
  """
  loop_lib.start_stage_clock()
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
  if model_cfg.vocab_size == 0:
    return dataclasses.replace(model_cfg, vocab_size=tok.vocab_size)
  if model_cfg.vocab_size < tok.vocab_size:
    raise config_lib.ConfigError(
        f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {tok.vocab_size} "
        f"({tok.path}). Set it to 0 to take the tokenizer's size.")
  return model_cfg


def init_source(init: config_lib.InitConfig, tokenizer_path: str, workdir: str,
                runtime: config_lib.ModelRuntimeConfig, *, expect_stage: tuple[str, ...]
                ) -> tuple[config_lib.ModelConfig, tokenizer_lib.Tokenizer, dict[str, Any]]:
  """The model shape, tokenizer and meta of the run a stage starts from.

  The model's shape is the init checkpoint's (from its meta); `runtime` may change how it runs (dtype, remat,
  dropout, attention). The tokenizer is `tokenizer_path` or the init run's `tokenizer.model`, copied into this
  workdir, and must be the one the checkpoint was trained with.
  """
  meta, folder, step = ckpt_lib.read_checkpoint_meta(init.checkpoint, init.step)
  where = f"{folder}/{step}"
  if meta.get("stage") not in expect_stage:
    logging.warning("init checkpoint %s is from stage %r; this stage expects %s.", where, meta.get("stage"),
                    " or ".join(repr(s) for s in expect_stage))
  if "model" not in meta:
    raise config_lib.ConfigError(f"init.checkpoint: {where} has no model config in its meta.")
  model_cfg = runtime.apply(ckpt_lib.model_config_from_meta(meta))
  source_tok = tokenizer_path or os.path.join(os.path.dirname(folder), "tokenizer.model")
  if not fileio.exists(source_tok):
    raise config_lib.ConfigError(f"tokenizer_path: {source_tok} does not exist; set tokenizer_path to the "
                                 f"tokenizer the run in {os.path.dirname(folder)} was trained with.")
  tok = load_or_train_tokenizer(config_lib.TokenizerConfig(path=source_tok), workdir, None)
  ckpt_lib.check_tokenizer(meta, tok.sha256, where=f"The init checkpoint {where}")
  return model_cfg, tok, {**meta, "init_checkpoint": where}



def lm_eval_step(model: model_lib.GPT) -> Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]:
  """(params, {"inputs", "targets", "weights"}) -> (loss sum, weight): one eval batch of a language model."""
  def eval_step(params, batch):
    logits = model.apply({"params": params}, batch["inputs"])
    return losses.weighted_cross_entropy(logits, batch["targets"], batch["weights"])
  return eval_step


def lm_eval_fn(model: model_lib.GPT, mesh: jax.sharding.Mesh, batches: Callable[[], Any], prefix: str = "eval"):
  """eval_fn of a language model: token-weighted loss and perplexity over `batches()` (the same fixed batches of
  {"inputs", "targets", "weights"} each time): `<prefix>/loss`, `<prefix>/perplexity`, `<prefix>/tokens`."""
  eval_step = jax.jit(lm_eval_step(model))

  def eval_fn(state: trainer.TrainState) -> dict[str, float]:
    loss_sum, weight = 0.0, 0.0
    with sharding.activate(mesh):
      for batch in batches():
        s, w = eval_step(state.params, sharding.host_to_global(batch, mesh))
        loss_sum, weight = loss_sum + float(s), weight + float(w)
    loss = loss_sum / max(weight, 1.0)
    return {f"{prefix}/loss": loss, f"{prefix}/perplexity": float(np.exp(min(loss, 50.0))),
            f"{prefix}/tokens": weight}
  return eval_fn


def init_params(model: Any, seq_len: int) -> Callable[[jax.Array], Any]:
  """rng -> boxed parameters of `model` (a flax module taking [B, T] tokens): how every recipe's model is
  initialised (gptrl/memory.py sizes it the same way)."""
  example = np.zeros((1, seq_len), np.int32)
  return lambda rng: model.init(rng, example)["params"]


@dataclasses.dataclass
class Context:
  """What `train` sets up before a recipe is built: the workdir, data cache, mesh and checkpointer."""
  cfg: Any
  workdir: str
  cache_dir: str
  mesh: jax.sharding.Mesh
  checkpointer: ckpt_lib.Checkpointer


@dataclasses.dataclass
class Recipe:
  """A gradient-trained stage: everything `train` needs that differs between stages."""
  stage: str  # the meta's "stage"
  tokenizer: tokenizer_lib.Tokenizer
  model_config: config_lib.ModelConfig  # the transformer's shape (the meta's "model")
  model: Any  # the flax module trained; its params are the train state's
  seq_len: int  # the token length its parameters are initialised with
  loss_fn: trainer.LossFn
  train_iter: Iterator[dict[str, np.ndarray]]  # this process's batches; get_state()/set_state()
  fingerprint: str  # data.pipeline_fingerprint of the data pipeline: a resume must match it
  fingerprint_parts: dict[str, Any]  # what it hashes, so that a refused resume names what differs
  tokens_per_step: int  # global tokens per optimizer step, for tokens/s
  flops_per_step: float  # model FLOPs per optimizer step, for achieved FLOP/s
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # saved with each checkpoint (with stage etc.)
  members: int = 1  # independent models trained together (a reward-model ensemble)
  # A fresh (not resumed) run's parameters from a previous stage: (fresh params, their shardings) -> params.
  init_from: Callable[[Any, Any], Any] | None = None
  eval_fn: Callable[[trainer.TrainState], dict[str, float]] | None = None
  sample_fn: Callable[[trainer.TrainState], list[str]] | None = None
  # After the last step, entries added to the final checkpoint's meta (e.g. the reward model's offset).
  final_meta_fn: Callable[[trainer.TrainState], dict[str, Any]] | None = None


def make_train_step(cfg: Any, loss_fn: trainer.LossFn, optimizer: Any, state_shardings: Any,
                    mesh: jax.sharding.Mesh, *, members: int = 1) -> trainer.JittedStep:
  """The jitted train step of a gradient stage as `cfg` (optim, train) configures it: what `train` runs and
  gptrl/compile.py compiles."""
  return trainer.jit_train_step(
      trainer.make_train_step(loss_fn, optimizer, optim.learning_rate_schedule(cfg.optim, cfg.train.steps),
                              cfg.optim.grad_accum_steps, **trainer.spike_options(cfg.train), members=members),
      state_shardings, mesh)


def train(cfg: Any, build: Callable[[Context], Recipe]) -> trainer.TrainState:
  """Trains (or resumes training) the recipe `build(context)` as `cfg` (a stage config with workdir, seed,
  mesh, data, optim and train groups) says; returns the final state.

  Order: set-up (workdir, mesh), the recipe (its data first, so a bad record is reported before any checkpoint is
  read), the train state in its sharded layout, then this workdir's own newest checkpoint if there is one, else
  the recipe's `init_from` (a previous stage's parameters), else the fresh init; then the run loop.
  """
  workdir, cache_dir, mesh = setup(cfg)
  checkpointer = ckpt_lib.open_workdir_checkpointer(workdir, cfg.train)
  try:
    recipe = build(Context(cfg, workdir, cache_dir, mesh, checkpointer))
    optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps, members=recipe.members)
    state, state_shardings = trainer.create_train_state(init_params(recipe.model, recipe.seq_len), optimizer,
                                                        cfg.seed, mesh)
    num_params = model_lib.count_params(state.params)
    logging.info("Model: %s parameters, %s.", f"{num_params:,}", recipe.model_config)
    start, parent_changes = 0, []
    parents = ckpt_lib.parents_of(cfg)
    resumed = trainer.resume(checkpointer, state, state_shardings, tokenizer_sha256=recipe.tokenizer.sha256,
                             fingerprint=recipe.fingerprint, fingerprint_parts=recipe.fingerprint_parts,
                             train_iter=recipe.train_iter, reset_data_position=cfg.data.reset_position,
                             parents=parents, allow_changed=ckpt_lib.allowed_parent_changes(cfg))
    if resumed is not None:
      start, state, data_state = resumed
      parent_changes = data_state["parent_changes"]
    elif recipe.init_from is not None:
      state = state.replace(params=recipe.init_from(state.params, state_shardings.params))
    train_step = make_train_step(cfg, recipe.loss_fn, optimizer, state_shardings, mesh, members=recipe.members)
    meta = {"stage": recipe.stage, "tokenizer_sha256": recipe.tokenizer.sha256,
            "model": config_lib.to_dict(recipe.model_config), "num_params": num_params, **recipe.meta,
            "parents": parents, "parent_changes": parent_changes}
    task = trainer.GradientTask(
        train_step=train_step, train_iter=recipe.train_iter, mesh=mesh, checkpointer=checkpointer,
        train_cfg=cfg.train, meta=meta, data_fingerprint=recipe.fingerprint,
        data_fingerprint_parts=recipe.fingerprint_parts, tokens_per_step=recipe.tokens_per_step,
        flops_per_step=recipe.flops_per_step, eval_fn=recipe.eval_fn, sample_fn=recipe.sample_fn,
        final_meta_fn=recipe.final_meta_fn)
    return loop_lib.run(task, state, start=start, cadence=loop_lib.Cadence.of(cfg.train), workdir=workdir,
                        desc="train")
  finally:
    checkpointer.close()
