"""The one file-system layer: every workdir, data, tokenizer and checkpoint path gptrl is given goes through here.

Local paths take plain `os` and `open` (what gptrl always did, fsync included). A URL with a scheme, `gs://` (also
`s3://`, `az://`, `hf://`: whatever etils.epath serves), goes through etils.epath, the library orbax itself uses, so
checkpoints, workdirs and data can live in a bucket. epath reaches GCS through tf.io.gfile when TensorFlow is
installed, else through fsspec's gcsfs; orbax also asks the GCS API (google-cloud-storage) about the bucket, and
tensorstore writes the arrays with its own GCS driver. `pip install 'gptrl[gcs]'` brings what is missing.

Paths stay plain strings. `os.path.join`, `dirname` and `basename` are right for URLs too; `os.path.abspath`,
`expanduser`, `realpath` and `relpath` are not (they would turn `gs://b/x` into `<cwd>/gs:/b/x`): use `abspath` and
`realpath` here.

What object stores change, and how this module deals with it:
  - no folders: `makedirs` does nothing remotely (an object's name creates its "folder"), and a folder exists
    while it holds an object;
  - no appends, no truncation: `append` and `truncate` rewrite the whole object (fine for the small logs they are
    used on); `Appender` keeps a growing log in memory and re-uploads it now and then (metrics.jsonl);
  - no atomic rename: `rename` copies and deletes; `atomic_open` writes a temporary object and renames it (a GCS
    object only appears once its upload completes, so readers never see half of one; the temporary object is so
    that an error halfway through the writer's code leaves the old object rather than a partial new one);
  - no fsync: durability is the object store's once a write has returned;
  - listings: gcsfs's listings cache is turned off (tensorstore writes objects gcsfs would not know of).
"""
from __future__ import annotations

import builtins
import contextlib
import glob as glob_lib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import signal
import time
import uuid
from typing import IO, Any, Iterator

# A URL scheme: "gs://bucket/key" and the like. Windows drive letters ("C:\\") have no "//".
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# What etils.epath serves (etils/epath/gpath.py _URI_SCHEMES); anything else is refused with a message.
_EPATH_SCHEMES = ("gs", "s3", "az", "hf")


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL (`gs://bucket/key`, `s3://...`), False for a local path."""
  return bool(_SCHEME.match(os.fspath(path)))


class MissingDependencyError(ImportError):
  """A URL's scheme needs a package that is not installed; the message names the pip command."""


def _importable(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):  # a missing parent package
    return False


def _fsspec_has(protocol: str) -> bool:
  """Whether fsspec can serve `protocol`: its package is installed, or an implementation was registered."""
  import fsspec  # pylint: disable=import-outside-toplevel
  return protocol in fsspec.registry or _importable(_FSSPEC_MODULES[protocol])


# Scheme -> (pip package, check that it or a stand-in is there). epath serves gs:// through TensorFlow when it is
# installed, else through fsspec (gcsfs); orbax calls the GCS API (google-cloud-storage) to list a bucket's steps.
_FSSPEC_MODULES = {"gcs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}
REQUIREMENTS = {
    "gs": (("gcsfs", lambda: _importable("tensorflow") or _fsspec_has("gcs")),
           ("google-cloud-storage", lambda: _importable("google.cloud.storage"))),
    "s3": (("s3fs", lambda: _fsspec_has("s3")),),
    "az": (("adlfs", lambda: _fsspec_has("az")),),
    "hf": (("huggingface_hub", lambda: _fsspec_has("hf")),),
}
_CHECKED: set[str] = set()


def check_support(path: str) -> None:
  """Raises ValueError for a URL scheme gptrl cannot use, MissingDependencyError when its packages are missing;
  nothing for a local path."""
  match = _SCHEME.match(path)
  if not match:
    return
  scheme = match.group(1).lower()
  if scheme not in _EPATH_SCHEMES:
    raise ValueError(f"{path}: unsupported URL scheme {scheme!r}; gptrl reads and writes local paths and "
                     f"{', '.join(s + '://' for s in _EPATH_SCHEMES)} (through etils.epath).")
  if scheme in _CHECKED:
    return
  missing = [package for package, present in REQUIREMENTS.get(scheme, ()) if not present()]
  if missing:
    extra = " (pip install 'gptrl[gcs]')" if scheme == "gs" else ""
    raise MissingDependencyError(f"{path}: {scheme}:// paths need {' and '.join(missing)}, not installed: "
                                 f"pip install {' '.join(missing)}{extra}.")
  if scheme == "gs":
    # gcsfs caches folder listings, but tensorstore writes orbax's array files behind its back: a stale listing
    # would make a complete checkpoint look damaged. Listings are cheap next to checkpoint reads.
    import fsspec.config  # pylint: disable=import-outside-toplevel
    fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)
  _CHECKED.add(scheme)


def _epath(path: str) -> Any:
  """The etils.epath.Path of a URL; a clear error for a scheme gptrl cannot use (see `check_support`)."""
  check_support(path)
  from etils import epath  # pylint: disable=import-outside-toplevel  (imported only when a URL is used)
  return epath.Path(path)


def abspath(path: str | os.PathLike) -> str:
  """A local path made absolute (`~` expanded); a URL as it is, without a trailing slash."""
  path = os.fspath(path)
  if is_remote(path):
    return path.rstrip("/") if not path.endswith("://") else path
  return os.path.abspath(os.path.expanduser(path))


def realpath(path: str | os.PathLike) -> str:
  """`os.path.realpath` for a local path (symlinks resolved); a URL as `abspath` gives it."""
  path = os.fspath(path)
  return abspath(path) if is_remote(path) else os.path.realpath(os.path.expanduser(path))


# ----------------------------------------------------------------------------------------------
# Asking about paths.


def exists(path: str) -> bool:
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  if is_remote(path):
    p = _epath(path)
    return p.exists() and not p.is_dir()
  return os.path.isfile(path)


def stat(path: str) -> tuple[int, float]:
  """(size in bytes, modification time in seconds since the epoch) of a file; FileNotFoundError if missing."""
  if is_remote(path):
    result = _epath(path).stat()
    return int(result.length or 0), float(result.mtime or 0)
  result = os.stat(path)
  return result.st_size, result.st_mtime


def getsize(path: str) -> int:
  return stat(path)[0]


def getmtime(path: str) -> float:
  return stat(path)[1]


def listdir(path: str) -> list[str]:
  """The names in folder `path` (files and folders, unsorted, like os.listdir)."""
  if is_remote(path):
    return [child.name for child in _epath(path).iterdir()]
  return os.listdir(path)


def walk(top: str) -> Iterator[tuple[str, list[str], list[str]]]:
  """`os.walk(top)`, top-down, for local paths and URLs alike: (folder, its sub-folder names, its file names).

  Sorting or pruning the sub-folder list in place steers the walk, as with os.walk. For a URL both lists come
  sorted, and each folder costs one listing.
  """
  if not is_remote(top):
    yield from os.walk(top)
    return
  scheme, top = top.split("://", 1)[0], top.rstrip("/")
  for root, dirs, files in _epath(top).walk():
    root = str(root)
    if not is_remote(root):  # epath over fsspec gives the filesystem's own form, "bucket/key"
      root = f"{scheme}://{root.lstrip('/')}"
    dirs.sort()
    files.sort()
    yield root, dirs, files


def glob(pattern: str) -> list[str]:
  """The paths matching `pattern`, sorted. Local patterns may use `**` (recursive); in a URL only the part after
  the last folder without wildcards may hold them, and `**` is refused (it would list a whole bucket)."""
  if not is_remote(pattern):
    return sorted(glob_lib.glob(os.path.expanduser(pattern), recursive=True))
  if "**" in pattern:
    raise ValueError(f"{pattern}: '**' is not supported in a {pattern.split('://')[0]}:// pattern (it would list "
                     "every object under it); use '*' per folder level.")
  parts = pattern.split("/")  # ["gs:", "", "bucket", ...]
  fixed = next(i for i, part in enumerate(parts) if glob_lib.has_magic(part))
  if fixed < 3:
    raise ValueError(f"{pattern}: wildcards in the bucket name are not supported.")
  base = "/".join(parts[:fixed])
  return sorted(str(p) for p in _epath(base).glob("/".join(parts[fixed:])))


def has_magic(pattern: str) -> bool:
  """Whether `pattern` holds glob wildcards (*, ?, [...])."""
  return glob_lib.has_magic(pattern)


# ----------------------------------------------------------------------------------------------
# Reading and writing.


def open(path: str, mode: str = "r", *, errors: str = "strict") -> IO[Any]:  # pylint: disable=redefined-builtin
  """Opens a file: modes r, rb, w, wb, a, ab (a, ab: local files only; see `append`). Text is UTF-8."""
  if mode not in ("r", "rb", "w", "wb", "a", "ab"):
    raise ValueError(f"fileio.open({path!r}): mode {mode!r} is not one of r, rb, w, wb, a, ab.")
  if not is_remote(path):
    if "b" in mode:
      return io.open(path, mode)
    return io.open(path, mode, encoding="utf-8", errors=errors)
  if "a" in mode:
    raise ValueError(f"{path}: an object in a bucket cannot be appended to; use fileio.append or fileio.Appender.")
  binary = _epath(path).open(mode if "b" in mode else mode + "b")
  return binary if "b" in mode else io.TextIOWrapper(binary, encoding="utf-8", errors=errors)


def read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def read_text(path: str, *, errors: str = "strict") -> str:
  with open(path, "r", errors=errors) as f:
    return f.read()


def makedirs(path: str) -> None:
  """Creates folder `path` and its parents (exist_ok); nothing to do in an object store, which has no folders."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def free_bytes(path: str) -> int | None:
  """Bytes free for a non-root user on the local file system holding `path`; None for a bucket (no such limit)."""
  if is_remote(path):
    return None
  return int(shutil.disk_usage(path).free)


def fsync_dir(path: str) -> None:
  """Makes the entries of local folder `path` (files just created or renamed) survive a power cut; nothing to do
  for a URL."""
  if is_remote(path):
    return
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO[Any]]:
  """Opens a temporary file beside `path` for writing ("w" text, "wb" binary); on leaving the block without an
  error it becomes `path`, replacing any old one, so a reader (or a kill) sees the old file or the new one, never
  half of one. An error in the block removes the temporary file and leaves `path` as it was.

  Local: the temporary file is fsynced, renamed over `path` and the folder fsynced. URL: a temporary object is
  written and renamed (a copy and a delete in a bucket; see the module docstring).
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"fileio.atomic_open({path!r}): mode must be 'w' or 'wb', got {mode!r}.")
  folder, name = os.path.split(path)
  if is_remote(path):
    tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
      with open(tmp, mode) as f:
        yield f
      _epath(tmp).replace(path)
    except BaseException:
      with contextlib.suppress(Exception):
        _epath(tmp).unlink(missing_ok=True)
      raise
    return
  folder = folder or "."
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to any new file
  try:
    with (io.open(fd, "wb") if mode == "wb" else io.open(fd, "w", encoding="utf-8")) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  fsync_dir(folder)


def atomic_write(path: str, data: bytes | str) -> None:
  """Writes `data` (str: as UTF-8) to `path` atomically: see `atomic_open`."""
  with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)


def append(path: str, data: bytes | str, *, fsync: bool = False) -> None:
  """Appends `data` (str: as UTF-8) to `path`, creating it. Local: one write, flushed (and fsynced with `fsync`).
  URL: the object is read and rewritten whole, so keep this to small files written now and then."""
  data = data.encode("utf-8") if isinstance(data, str) else data
  if is_remote(path):
    old = read_bytes(path) if exists(path) else b""
    atomic_write(path, old + data)
    return
  with io.open(path, "ab") as f:
    f.write(data)
    f.flush()
    if fsync:
      os.fsync(f.fileno())


def truncate(path: str, size: int) -> None:
  """Cuts file `path` to its first `size` bytes (a URL's object is rewritten)."""
  if is_remote(path):
    data = read_bytes(path)
    if len(data) > size:
      atomic_write(path, data[:size])
    return
  with io.open(path, "r+b") as f:
    f.truncate(size)


def remove(path: str) -> None:
  """Deletes file `path`."""
  if is_remote(path):
    _epath(path).unlink()
  else:
    os.remove(path)


def rmtree(path: str, *, missing_ok: bool = False) -> None:
  """Deletes folder `path` and everything under it; `missing_ok`: no error when it is not there (locally, as
  shutil.rmtree(ignore_errors=True): whatever can be deleted is)."""
  if is_remote(path):
    _epath(path).rmtree(missing_ok=missing_ok)
  else:
    shutil.rmtree(path, ignore_errors=missing_ok)


def rename(src: str, dst: str) -> None:
  """Renames file or folder `src` to `dst`, which must not exist. Atomic locally; in a bucket a copy of every
  object, then their deletion."""
  if is_remote(src) != is_remote(dst):
    raise ValueError(f"cannot rename {src} to {dst}: one is local, the other a URL.")
  if is_remote(src):
    _epath(src).rename(dst)
  else:
    os.rename(src, dst)


# ----------------------------------------------------------------------------------------------
# A log that grows: metrics.jsonl.


class Appender:
  """Appends text to one file for as long as it is open.

  Local: each `write` is appended and flushed at once (a kill loses at most the line being written). URL: objects
  cannot be appended to, so the file's whole text stays in memory and is uploaded again by `sync` (and by `write`
  when `upload_every_s` seconds have passed since the last upload); `sync` before anything that must not get ahead
  of the log (a checkpoint), and `close`, upload what is new. A kill loses the rows written since the last upload.
  """

  def __init__(self, path: str, *, upload_every_s: float = 30.0, create: bool = True):
    """`create`: a local file is created (empty) at once; False: at the first `write`."""
    self.path = path
    self._remote = is_remote(path)
    self._upload_every_s = upload_every_s
    self._closed = False
    self._file = None
    if self._remote:
      self._chunks = [read_text(path)] if exists(path) else []
      self._dirty = False
      self._last_upload = time.monotonic()
    elif create:
      self._file = io.open(path, "a", encoding="utf-8")

  def write(self, text: str) -> None:
    if self._remote:
      self._chunks.append(text)
      self._dirty = True
      if time.monotonic() - self._last_upload >= self._upload_every_s:
        self.sync()
      return
    if self._file is None:
      self._file = io.open(self.path, "a", encoding="utf-8")
    self._file.write(text)
    self._file.flush()

  def sync(self) -> None:
    """Makes everything written so far visible at `path` (uploads it, for a URL)."""
    if self._closed:
      return
    if not self._remote:
      if self._file is not None:
        self._file.flush()
      return
    if self._dirty:
      text = "".join(self._chunks)
      self._chunks = [text]
      atomic_write(self.path, text)
      self._dirty = False
    self._last_upload = time.monotonic()

  def close(self) -> None:
    if self._closed:
      return
    self.sync()
    self._closed = True
    if self._file is not None:
      self._file.close()


# ----------------------------------------------------------------------------------------------
# JSONL: the one reader of records (strict) and of logs (lenient).


def iter_jsonl(path: str, *, expected: str,
               error: type[Exception] = ValueError) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields (\"path:line\", record) for each non-blank line of a .jsonl file that people or other programs wrote
  (training data, labels): anything else is an `error` naming the file and line. (Logs this project writes are
  read with `read_jsonl_lenient`.)

  A byte-order mark at the start of a line (files made by concatenating BOM files have them mid-file) is not
  part of the record. Extra fields in a record are the caller's to ignore or refuse.

  Args:
    path: the file.
    expected: what a record should hold, for error messages (e.g. "a string field 'text'").
    error: the exception class raised (e.g. gptrl.data.DataError).
  Raises:
    error: invalid UTF-8 or JSON (including numbers too long to convert and nesting too deep to parse), a
      line that is not a JSON object, or a string with an unpaired UTF-16 surrogate escape ("\\ud800", which no
      tokenizer can encode); names path:line, and the field where there is one.
  """
  try:
    f = open(path, "rb")  # pylint: disable=consider-using-with
  except OSError as e:
    raise error(f"{path}: cannot open the file ({e.strerror or e}).") from None
  with f:
    for lineno, raw in enumerate(f, start=1):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8-sig")
      except UnicodeDecodeError as e:
        raise error(f"{where}: invalid UTF-8 at byte {e.start} of the line ({e.reason}); "
                        f"expected a UTF-8 JSON object with {expected}.") from None
      if not line.strip():  # Blank lines (often a trailing one) carry no record.
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise error(f"{where}: invalid JSON ({e.msg} at column {e.colno}); expected one JSON "
                        f"object per line with {expected}.") from None
      except (ValueError, RecursionError) as e:  # a number of > 4300 digits; nesting deeper than the stack
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(":")[0]
        raise error(f"{where}: unreadable JSON ({reason}); expected one JSON object per line with "
                        f"{expected}.") from None
      if not isinstance(record, dict):
        raise error(f"{where}: expected a JSON object with {expected}, got a "
                        f"{type(record).__name__}.")
      if _SURROGATE_ESCAPE.search(line):
        field = _unpaired_surrogate(record)
        if field is not None:
          raise error(f"{where}: field {field} holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff "
                          f"without its pair), which is not text; fix the encoder that wrote the file.")
      yield where, record


# JSON can spell half of a UTF-16 surrogate pair ("\ud83d" alone); json.loads accepts it and gives a str that
# cannot be encoded as UTF-8, so the tokenizer would fail far from the line. Only lines with such an escape
# are walked.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _unpaired_surrogate(value: Any, name: str = "") -> str | None:
  """The field path (e.g. 'messages[1].content') of the first string holding an unpaired surrogate, or None."""
  if isinstance(value, str):
    try:
      value.encode("utf-8")
    except UnicodeEncodeError:
      return repr(name or "<key>")
    return None
  if isinstance(value, dict):
    for key, item in value.items():
      child = f"{name}.{key}" if name else str(key)
      found = _unpaired_surrogate(key, child) or _unpaired_surrogate(item, child)
      if found:
        return found
  if isinstance(value, list):
    for i, item in enumerate(value):
      found = _unpaired_surrogate(item, f"{name}[{i}]")
      if found:
        return found
  return None


def read_jsonl_lenient(path: str) -> list[dict[str, Any]]:
  """The JSON objects of a JSONL log this project writes (metrics, replies, eval records), skipping blank lines and
  lines torn by a kill mid-write; [] when the file does not exist."""
  rows = []
  if not exists(path):
    return rows
  with open(path, errors="replace") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict):
        rows.append(row)
  return rows


def repair_torn_tail(path: str) -> bool:
  """Cuts off a last line without its newline (a write cut short by a kill); False when `path` does not exist."""
  if not os.path.exists(path):
    return False
  with builtins.open(path, "r+b") as f:
    size = f.seek(0, os.SEEK_END)
    tail = b""
    while size > len(tail) and b"\n" not in tail:  # read backwards to the last newline
      step = min(size, len(tail) + 4096)
      f.seek(size - step)
      tail = f.read(step)
    keep = size - len(tail) + tail.rfind(b"\n") + 1  # rfind -1 (no newline at all): keep nothing
    if keep < size:
      f.truncate(keep)
      f.flush()
      os.fsync(f.fileno())
      logging.warning("%s: dropped a partial last line (%d bytes: a write cut short when its writer was "
                      "stopped; it was never reported saved).", path, size - keep)
  return True


class DurableLines:
  """Appends JSON lines to open local files, each written, flushed and fsynced before `append` returns; a write
that fails (a full disk) is cut off again before the error goes on, so the file never holds part of a line.

  Test hook: with the environment variable `crash_env` set to N, the N-th line appended (1-based, over every file
  of this writer) is written only in part, then the process kills itself with SIGKILL, as a power cut or kill -9
  in the middle of a write would.
  """

  def __init__(self, crash_env: str):
    self._appended = 0
    self._crash_at = int(os.environ.get(crash_env, "0") or 0)

  def append(self, f: IO[bytes], record: Any) -> None:
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    self._appended += 1
    if self._appended == self._crash_at:
      f.write(line[:len(line) // 2])
      f.flush()
      os.fsync(f.fileno())
      os.kill(os.getpid(), signal.SIGKILL)
    start = f.tell()
    try:
      f.write(line)
      f.flush()
      os.fsync(f.fileno())
    except OSError:  # e.g. a full disk: no part of the line stays for later lines to follow
      f.truncate(start)
      raise
