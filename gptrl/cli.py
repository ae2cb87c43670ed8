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


def http_server(host: str, port: int, app: Any, *, on_error: Callable[[], None] = lambda: None) -> Any:
  """werkzeug's threaded HTTP server for the WSGI `app` on host:port (port 0: any free one); UsageError, after
  `on_error()` (release what was opened), when it cannot listen there."""
  from werkzeug import serving  # pylint: disable=import-outside-toplevel
  try:
    return serving.make_server(host, port, app, threaded=True)
  except OSError as e:
    on_error()
    raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port.") from None


def serve_until_interrupted(http: Any, *cleanups: Callable[[], None]) -> None:
  """Serves until Ctrl-C, then closes the server and runs `cleanups` in order."""
  try:
    http.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    http.server_close()
    for cleanup in cleanups:
      cleanup()
