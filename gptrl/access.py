"""Who may use gptrl's web servers (`gptrl.serve`, `gptrl.label`): an access token once a server listens beyond
loopback, and, in every mode, a Host header that must name the server (a page on another site that rebinds its
own name to this address, DNS rebinding, sends its own name and is refused).

The token is what Jupyter does: given (--token or an environment variable) or, beyond loopback, made at random
and printed once with the server's address (`?token=...`, which the pages keep for the tab and drop from the
address bar). Clients send it as `Authorization: Bearer TOKEN`; it is compared in constant time. A team has a
token per member instead (`team_tokens`: "name token" lines in a file), which also says who sends a request.
"""
from __future__ import annotations

import hmac
import secrets
import socket
import sys
from typing import Mapping, Sequence

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MIN_TEAM_TOKEN = 16  # characters: secrets.token_urlsafe(12) or longer


class TeamFileError(ValueError):
  """A team file that cannot be used; the message names the file and line."""


def team_tokens(path: str, text: str) -> dict[str, str]:
  """{name: token} of a team file's `text` (read from `path`, named in errors): one member per line, the name
  (it may hold spaces) then whitespace then the token; blank lines and lines starting with # are skipped. Names
  and tokens are unique, tokens at least MIN_TEAM_TOKEN characters, e.g. made with
  `python -c "import secrets; print('alice', secrets.token_urlsafe(16))" >> team.txt`."""
  team: dict[str, str] = {}
  owners: dict[str, str] = {}
  for number, line in enumerate(text.splitlines(), 1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    *names, token = line.split()
    name = " ".join(names)
    where = f"{path}:{number}"
    if not name:
      raise TeamFileError(f"{where}: expected 'NAME TOKEN' (a labeller's name, a space, their access token).")
    if len(token) < MIN_TEAM_TOKEN or not token.isprintable():
      raise TeamFileError(f"{where}: {name}'s token must be at least {MIN_TEAM_TOKEN} printable characters, got "
                          f"{len(token)}; make one with python -c \"import secrets; print(secrets.token_urlsafe(16))\".")
    if name in team:
      raise TeamFileError(f"{where}: {name!r} is named twice.")
    if token in owners:
      raise TeamFileError(f"{where}: {name!r} has the same token as {owners[token]!r}; each member needs their own.")
    team[name], owners[token] = token, name
  if not team:
    raise TeamFileError(f"{path}: no member found; expected 'NAME TOKEN' lines.")
  return team


def allowed_hosts(host: str, extra: Sequence[str] = ()) -> list[str]:
  """The names a server listening on `host` answers to: the loopback names, `host` itself (or this machine's
  names when it listens on every address) and `extra` ("*" allows any)."""
  names = list(LOOPBACK) + list(extra)
  if host not in ("0.0.0.0", "::", ""):
    names.append(host)
  else:
    try:
      names += [socket.gethostname(), socket.getfqdn()]
    except OSError:
      pass
  return names


def resolve_token(given: str, host: str) -> tuple[str, bool]:
  """(token, made here): `given`, else a random one when `host` is beyond loopback, else none ("")."""
  if given:
    return given, False
  if host in LOOPBACK:
    return "", False
  return secrets.token_urlsafe(24), True


def shown_host(host: str) -> str:
  """The name a browser on this machine reaches a server listening on `host` by."""
  return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def page_address(host: str, port: int, made_token: str = "") -> str:
  """http://<host>:<port>/ as `shown_host` gives it, with ?token=... for a token made here, which is also printed
  once on stderr (the pages keep it for their tab and drop it from the address bar)."""
  address = f"http://{shown_host(host)}:{port}/"
  if made_token:
    print(f"Access token (shown once): {made_token}", file=sys.stderr)
    address += f"?token={made_token}"
  return address


class Access:
  """The checks of one server: `host_error` and `token_error` return what is wrong (None when allowed)."""

  def __init__(self, token: str, hosts: Sequence[str], *, flag: str = "--allowed_host",
               team: Mapping[str, str] | None = None):
    """`team`: {name: token}, in place of `token`: every request needs one of them, and `member` says whose."""
    self.token = token
    self.hosts = {h.lower().strip("[]") for h in hosts}
    self.flag = flag
    self.team = dict(team or {})

  def host_error(self, host: str) -> str | None:
    if host.startswith("["):  # [IPv6] or [IPv6]:port
      name = host[1:host.find("]")] if "]" in host else host
    else:
      name = host.split(":", 1)[0] if host.count(":") == 1 else host
    if "*" in self.hosts or name.lower() in self.hosts:
      return None
    return (f"Host header {host!r} is not one this server answers to (a guard against DNS rebinding); start it "
            f"with {self.flag} NAME to add a name")

  def token_error(self, authorization: str) -> str | None:
    if self.team:
      if self.member(authorization) is not None:
        return None
      return ("missing or wrong access token: open the page from the address with your own ?token=... (the token "
              "next to your name in the team file)")
    if not self.token:
      return None
    if hmac.compare_digest(_bearer(authorization).encode(), self.token.encode()):
      return None
    return ("missing or wrong access token: send 'Authorization: Bearer TOKEN' (the token the server printed at "
            "start)")

  def member(self, authorization: str) -> str | None:
    """The team member whose token `authorization` carries (None: nobody's). Every token is compared, in
    constant time, so the time taken does not tell which one came close."""
    given, found = _bearer(authorization).encode(), None
    for name, token in self.team.items():
      if hmac.compare_digest(given, token.encode()):
        found = name
    return found


def _bearer(authorization: str) -> str:
  return authorization[len("Bearer "):].strip() if authorization.startswith("Bearer ") else ""
