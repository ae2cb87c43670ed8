"""Set-up steps shared by the stages: workdir, resolved config, tokenizer, mesh, resume."""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import jax

from gptrl import config as config_lib
from gptrl import tokenizer as tokenizer_lib
from gptrl.corpus import Document


def prepare_workdir(cfg: Any) -> str:
  """Creates the workdir and writes the resolved config as `config.json` (process 0 only).

  A config that differs from the one an earlier run left there is logged key by key (resuming with, say,
  more steps is fine; the data fingerprint and tokenizer checks refuse the changes that are not).
  """
  workdir = os.path.abspath(cfg.workdir)
  os.makedirs(workdir, exist_ok=True)
  resolved = config_lib.to_dict(cfg)
  path = os.path.join(workdir, "config.json")
  if jax.process_index() == 0:
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        try:
          previous = json.load(f)
        except json.JSONDecodeError:
          previous = {}
      for key, (old, new) in sorted(_diff(previous, json.loads(json.dumps(resolved))).items()):
        logging.warning("config.%s changed since the last run in this workdir: %r -> %r", key, old, new)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(resolved, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  return workdir


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
  if os.path.exists(local):
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
      with open(cfg.path, "rb") as f:
        _atomic_write(local, f.read())
    return source
  if not train_docs:
    raise config_lib.ConfigError("config.tokenizer.path: no tokenizer given and no training text to train one on.")
  logging.info("Training a %d-token %s sentencepiece model on %d documents.", cfg.vocab_size, cfg.model_type,
               len(train_docs))
  target = local if jax.process_index() == 0 else f"{local}.process{jax.process_index()}"
  tok = tokenizer_lib.train_tokenizer((d.text for d in train_docs), target, vocab_size=cfg.vocab_size,
                                      model_type=cfg.model_type)
  return tok


def _atomic_write(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


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
