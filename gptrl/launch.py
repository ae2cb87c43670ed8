"""The one entry point: `python -m gptrl.launch --config configs/<file>.py[:variant] [--config.a.b=value ...]`.

Reads the config file (a Python file whose `get_config()` returns an ml_collections.ConfigDict), applies the
command-line overrides, converts it into the stage's typed config (unknown keys and wrong types are refused
with the closest valid key), joins a multi-process job when it detects one, and runs `config.stage`.
"""
from __future__ import annotations

import importlib
import logging
import sys

from absl import flags
from ml_collections import config_flags

from gptrl import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", default=None, help_string="Path to a config file.",
                                          lock_config=True)

# Stage name -> module with `run(typed_config)`; imported lazily so `--help` stays fast.
STAGES = {"pretrain": "gptrl.stages.pretrain", "sft": "gptrl.stages.sft", "label": "gptrl.stages.label",
          "reward": "gptrl.stages.reward", "ppo": "gptrl.stages.ppo"}


def _usage_error(message: str) -> None:
  print(f"gptrl.launch: {message}", file=sys.stderr)
  sys.exit(2)


def parse(argv: list[str]):
  """Parses flags and returns the typed config, exiting with a one-line message on any config error."""
  try:
    flags.FLAGS(argv)
  except flags.Error as e:
    _usage_error(str(e))
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    # config_flags raises these for `--config.a.typo=...`; their text already suggests the closest key.
    text = str(e).strip("'").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    _usage_error(f"bad config override: {text}")
  if _CONFIG.value is None:
    _usage_error("--config is required, e.g. --config configs/pretrain_cpu.py")
  try:
    return config_lib.stage_config(_CONFIG.value)
  except config_lib.ConfigError as e:
    _usage_error(str(e))


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv if argv is None else argv
  cfg = parse(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
  # Quieten libraries that log every checkpoint file at INFO.
  for name in ("absl", "orbax", "jax._src", "etils"):
    logging.getLogger(name).setLevel(logging.WARNING)
  from gptrl import distributed  # pylint: disable=import-outside-toplevel
  distributed.maybe_initialize(cfg.distributed)
  stage = importlib.import_module(STAGES[cfg.stage])
  stage.run(cfg)


if __name__ == "__main__":
  main()
