"""The one entry point: `python -m gptrl.launch --config configs/<file>.py[:variant] [--config.a.b=value ...]`.

Reads the config file (a Python file whose `get_config()` returns an ml_collections.ConfigDict), applies the
command-line overrides, converts it into the stage's typed config (unknown keys and wrong types are refused
with the closest valid key), joins a multi-process job when it detects one, and runs `config.stage`.
"""
from __future__ import annotations

import logging
import re
import sys
import traceback

from absl import flags
from ml_collections import config_flags

from gptrl import config as config_lib
from gptrl import stages

_CONFIG = config_flags.DEFINE_config_file("config", default=None, help_string="Path to a config file.",
                                          lock_config=True)



def _usage_error(message: str) -> None:
  print(f"gptrl.launch: {message}", file=sys.stderr)
  sys.exit(2)


def _one_line(text: str) -> str:
  """A message on one line; config_flags embeds whole tracebacks in some, which shrink to the innermost
  file:line and the exception."""
  head, sep, trace = text.partition("Traceback (most recent call last):")
  parts = [" ".join(head.split())]
  if sep:
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    lines = [line.strip() for line in trace.splitlines() if line.strip()]
    parts += [f"{frames[-1][0]}:{frames[-1][1]}:" if frames else "", lines[-1] if lines else ""]
  return " ".join(p for p in parts if p)


def _load_error(e: BaseException) -> str:
  """One line for a config file that could not be loaded: where in the file, and the exception."""
  cause = e.__cause__ or e
  where = ""
  if isinstance(cause, SyntaxError) and cause.filename:
    where = f"{cause.filename}:{cause.lineno}: "
  elif cause.__traceback__ is not None:
    frame = traceback.extract_tb(cause.__traceback__)[-1]
    if "ml_collections" not in frame.filename:  # the user's file, not the loader's
      where = f"{frame.filename}:{frame.lineno}: "
  return f"cannot load the config file: {where}{type(cause).__name__}: {_one_line(str(cause))}"


def parse(argv: list[str]):
  """Parses flags and returns the typed config, exiting with a one-line message on any config error."""
  try:
    flags.FLAGS(argv)
  except flags.Error as e:
    _usage_error(_one_line(str(e)))
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    # config_flags raises these for `--config.a.typo=...`; their text already suggests the closest key.
    text = str(e).strip("'").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    _usage_error(f"bad config override: {text}")
  except Exception as e:  # pylint: disable=broad-except  (the config file itself raised: syntax error, bug, ...)
    _usage_error(_load_error(e))
  try:
    # A config file that failed to load (missing, a syntax error, get_config raising) surfaces here: config_flags
    # defers its error to the first use of the value.
    config = _CONFIG.value
    if config is None:
      _usage_error("--config is required, e.g. --config configs/pretrain_cpu.py")
    return config_lib.stage_config(config)
  except config_lib.ConfigError as e:
    _usage_error(str(e))
  except Exception as e:  # pylint: disable=broad-except  (any error of the user's config file)
    _usage_error(_load_error(e))


def main(argv: list[str] | None = None, *, expect_stage: str = "", prog: str = "gptrl.launch") -> None:
  """Runs the config's stage; `expect_stage` (for commands that front one stage, e.g. gptrl.bon) refuses others."""
  argv = sys.argv if argv is None else argv
  cfg = parse(argv)
  if expect_stage and cfg.stage != expect_stage:
    print(f"{prog}: the config's stage is {cfg.stage!r}, not {expect_stage!r}; run it with python -m gptrl.launch.",
          file=sys.stderr)
    sys.exit(2)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
  # Quieten libraries that log every checkpoint file at INFO.
  for name in ("absl", "orbax", "jax._src", "etils"):
    logging.getLogger(name).setLevel(logging.WARNING)
  from gptrl import distributed, hostmem  # pylint: disable=import-outside-toplevel
  hostmem.configure(cfg.distributed.host_malloc)  # before JAX starts its threads
  distributed.maybe_initialize(cfg.distributed)
  stage = stages.module(cfg.stage)  # imported now, so that `--help` stays fast
  # Errors in what the user gave (config values, data files, checkpoints, tokenizers) end the run with their
  # message, which names the file:line/field or the key, instead of a traceback from deep inside the stage.
  from gptrl import checkpoint, data, fileio, tokenizer, trainer  # pylint: disable=import-outside-toplevel
  try:
    from gptrl import memory  # pylint: disable=import-outside-toplevel
    memory.check_at_launch(cfg)  # logs the per-device memory estimate; refuses a run that cannot fit
    stage.run(cfg)
  except (config_lib.ConfigError, data.DataError, checkpoint.CheckpointError, tokenizer.TokenizerMismatchError,
          trainer.TrainingDivergedError, fileio.MissingDependencyError) as e:
    print(f"gptrl.launch: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
