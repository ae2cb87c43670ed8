"""What the small command-line tools (`python -m gptrl.sample`, `python -m gptrl.label`) share: the one-line usage
error and the main() that turns it into exit status 2."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable, Sequence

from gptrl import hostmem


class UsageError(Exception):
  """What the user asked for cannot be done; the message is one line saying why and what to do instead."""


def setup_logging(quiet: Sequence[str], quiet_level: int) -> None:
  """INFO lines on stderr, the libraries named in `quiet` only from `quiet_level` up."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr,
                      force=True)
  for name in quiet:
    logging.getLogger(name).setLevel(quiet_level)


def main(prog: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Any],
         setup: Callable[[], None], argv: Sequence[str] | None) -> int:
  """Parses `argv`, sets up logging and runs; returns the exit status: 0, or 2 after a UsageError, printed as one
  line `prog: message` on stderr."""
  args = parser.parse_args(argv)
  setup()
  hostmem.configure("auto")  # before JAX starts its threads
  try:
    run(args)
  except UsageError as e:
    print(f"{prog}: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  return 0
