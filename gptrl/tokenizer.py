"""SentencePiece tokenizer shared by every stage (pretrain, SFT, reward model, PPO).

Reserved ids, fixed for every model this module trains or accepts:

  id        piece             kind          use
  0         <pad>             control       padding; `decode` drops it
  1         <unk>             unknown       not produced for text: byte fallback covers everything
  2         <s>               control       beginning of sequence (`encode` never adds it)
  3         </s>              control       end of sequence / document (`encode` never adds it)
  4         "\\n"              user-defined  newline: always a token of its own
  5         <|system|>        user-defined  chat role marker: system prompt follows
  6         <|user|>          user-defined  chat role marker: user turn follows
  7         <|assistant|>     user-defined  chat role marker: assistant turn follows
  8         <|end|>           user-defined  end of a chat turn
  9..264    <0x00>..<0xFF>    byte          byte fallback for characters unseen in training
  265..     learned pieces

Training settings and why (see `train_tokenizer`): identity normalization, no removal of extra
whitespace, whitespace-only pieces and byte fallback make `decode(encode(s)) == s` hold for any
string (newlines, runs of spaces, tabs, any unicode). No dummy prefix: encoding is then close to
concatenative, `decode(encode(a) + encode(b)) == a + b`, which chat templates built piece by piece
rely on, and a word at the start of a line is tokenized the same way in training and in use.

Caution: user-defined symbols are matched anywhere in the text, so text that literally contains
"<|user|>" encodes to the role marker. Code that puts untrusted text into a chat template must
strip or escape the markers first.

Command line:
  python -m gptrl.tokenizer --input shakespeare --output tok.model --vocab_size 4096
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm

from gptrl import fileio

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
PAD_PIECE, UNK_PIECE, BOS_PIECE, EOS_PIECE = "<pad>", "<unk>", "<s>", "</s>"
NEWLINE = "\n"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TURN = "<|end|>"
# Order matters: user-defined symbols get ids 4, 5, ... in this order.
USER_DEFINED_SYMBOLS = (NEWLINE, SYSTEM, USER, ASSISTANT, END_OF_TURN)
NEWLINE_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID, END_OF_TURN_ID = range(
    4, 4 + len(USER_DEFINED_SYMBOLS))
NUM_RESERVED = 4 + len(USER_DEFINED_SYMBOLS) + 256  # control/unk, user-defined, byte pieces.

# sentencepiece skips training "sentences" longer than this many bytes; longer lines are cut.
_MAX_SENTENCE_BYTES = 4192
# A tokenizer must give back exactly what it was given, also when pieces are encoded separately.
_ROUND_TRIP_PROBE = (
    "Hello,  world!\n\n\tx = 12345;  \u00e9t\u00e9 \u6f22\u5b57 \U0001f600\r\n  end ")


class TokenizerMismatchError(ValueError):
  """A tokenizer file differs from the one a checkpoint or dataset was made with."""


class Tokenizer:
  """A loaded sentencepiece model with gptrl's reserved ids.

  Attributes:
    path: the model file it was loaded from or written to (None if built from bytes).
    sha256: hex sha256 of the model file's bytes: identifies the tokenizer.
    vocab_size: number of ids.
    pad_id, unk_id, bos_id, eos_id, newline_id, system_id, user_id, assistant_id, end_of_turn_id:
      the reserved ids of the table in the module docstring.
  """

  pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
  newline_id, system_id, user_id = NEWLINE_ID, SYSTEM_ID, USER_ID
  assistant_id, end_of_turn_id = ASSISTANT_ID, END_OF_TURN_ID

  def __init__(self, model_proto: bytes, *, path: str | os.PathLike | None = None):
    """Loads a serialized sentencepiece model (the bytes of a .model file) and checks it.

    Raises:
      ValueError: the bytes are not a sentencepiece model, the reserved pieces are not at their
        ids, or the model does not round-trip text exactly.
    """
    self._model_proto = bytes(model_proto)
    self.path = str(path) if path is not None else None
    self.sha256 = hashlib.sha256(self._model_proto).hexdigest()
    where = self.path or "the given model bytes"
    processor = spm.SentencePieceProcessor()
    try:
      processor.LoadFromSerializedProto(self._model_proto)
    except (RuntimeError, OSError) as e:
      raise ValueError(f"{where} is not a sentencepiece model ({e}).") from e
    self._sp = processor
    self.vocab_size = processor.GetPieceSize()
    _check_reserved(processor, where)
    if not self._round_trips(_ROUND_TRIP_PROBE):
      raise ValueError(
          f"{where} does not round-trip text exactly (decode(encode(s)) != s). gptrl needs a model "
          f"trained with byte_fallback=True, normalization_rule_name='identity', "
          f"remove_extra_whitespaces=False and add_dummy_prefix=False: train one with "
          f"`python -m gptrl.tokenizer`.")

  def _round_trips(self, text: str) -> bool:
    """Whether text survives encode/decode, whole and split in two at every 7th character."""
    if self.decode(self.encode(text)) != text:
      return False
    return all(self.decode(self.encode(text[:i]) + self.encode(text[i:])) == text
               for i in range(1, len(text), 7))

  def encode(self, text: str) -> list[int]:
    """Returns the token ids of `text` (no BOS/EOS added)."""
    if not isinstance(text, str):
      raise TypeError(f"Tokenizer.encode takes one str, got {type(text).__name__}; use "
                      f"encode_batch for a list of texts.")
    return self._sp.EncodeAsIds(text)

  def encode_batch(self, texts: Iterable[str], *, num_threads: int = -1) -> list[list[int]]:
    """Returns the token ids of each text (no BOS/EOS), encoded by sentencepiece's thread pool.

    num_threads: -1 lets sentencepiece use all cores.
    """
    texts = list(texts)
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f"Tokenizer.encode_batch: item {i} is a {type(text).__name__}, not a str.")
    return self._sp.Encode(texts, num_threads=num_threads)

  def decode(self, ids: Iterable[int]) -> str:
    """Returns the text of a sequence of ids (a list or a 1-D array); pad ids are dropped.

    BOS/EOS decode to nothing, so decoding a full training sequence gives its text back.
    """
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"Tokenizer.decode: ids {bad[:5]} are outside the vocabulary "
                       f"[0, {self.vocab_size}) of {self.path or 'this tokenizer'}.")
    return self._sp.DecodeIds([i for i in ids if i != PAD_ID])

  def id_to_piece(self, token_id: int) -> str:
    """Returns the piece string of one id (e.g. '▁the', '<0x09>', '<|user|>'), for debugging."""
    return self._sp.IdToPiece(int(token_id))

  def save(self, path: str | os.PathLike) -> None:
    """Writes the model file to `path` (local or gs://) atomically (e.g. next to a checkpoint)."""
    fileio.atomic_write(os.fspath(path), self._model_proto)

  def __getstate__(self) -> dict:
    # Only the model bytes: the processor is rebuilt (and re-checked) from them on unpickling,
    # so the pickle does not depend on sentencepiece's own pickle support.
    return {"model_proto": self._model_proto, "path": self.path}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["model_proto"], path=state["path"])

  def __repr__(self) -> str:
    return (f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, "
            f"sha256={self.sha256[:12]}...)")


def _check_reserved(processor: spm.SentencePieceProcessor, where: str) -> None:
  """Raises ValueError listing the reserved pieces that are missing or not at their fixed id."""
  size = processor.GetPieceSize()
  expected = [(PAD_ID, PAD_PIECE, "control"), (UNK_ID, UNK_PIECE, "unknown"),
              (BOS_ID, BOS_PIECE, "control"), (EOS_ID, EOS_PIECE, "control")]
  # The python API cannot tell user-defined from learned pieces: both are "piece" here.
  expected += [(i, s, "piece") for i, s in enumerate(USER_DEFINED_SYMBOLS, start=4)]
  first_byte = 4 + len(USER_DEFINED_SYMBOLS)
  expected += [(first_byte + b, f"<0x{b:02X}>", "byte") for b in range(256)]
  misplaced, absent = [], []
  for token_id, piece, kind in expected:
    found = None
    if token_id < size:
      if processor.IsControl(token_id):
        found_kind = "control"
      elif processor.IsUnknown(token_id):
        found_kind = "unknown"
      elif processor.IsByte(token_id):
        found_kind = "byte"
      else:
        found_kind = "unused" if processor.IsUnused(token_id) else "piece"
      found = (processor.IdToPiece(token_id), found_kind)
    if found != (piece, kind):
      found_text = f"{found[1]} {found[0]!r}" if found else "nothing (vocabulary too small)"
      misplaced.append(f"id {token_id}: expected {kind} {piece!r}, found {found_text}")
      # PieceToId gives the unk id for a piece that is not in the vocabulary.
      if piece != UNK_PIECE and processor.PieceToId(piece) == processor.unk_id():
        absent.append(piece)
  if not misplaced:
    return
  absent_bytes = [p for p in absent if p.startswith("<0x")]
  absent = [repr(p) for p in absent if not p.startswith("<0x")]
  if absent_bytes:
    absent.append(
        f"{len(absent_bytes)} byte-fallback pieces <0x..> (train with byte_fallback=True)")
  shown = misplaced[:10] + ([f"... and {len(misplaced) - 10} more"] if len(misplaced) > 10 else [])
  raise ValueError(
      f"{where} is not a gptrl tokenizer: its reserved tokens are not where gptrl needs them (see "
      f"the table in gptrl/tokenizer.py).\n"
      + (f"Missing from its vocabulary: {', '.join(absent)}.\n" if absent else "")
      + "  " + "\n  ".join(shown)
      + "\nTrain a tokenizer with `python -m gptrl.tokenizer --input ... --output ...`.")


def load_tokenizer(path: str | os.PathLike, *, expected_sha256: str | None = None,
                   what: str = "") -> Tokenizer:
  """Loads and checks a tokenizer model file.

  Args:
    path: a .model file written by `train_tokenizer` (or `Tokenizer.save`), local or gs://.
    expected_sha256: if given, the file's sha256 must equal it.
    what: who expects that hash, for the error message, e.g. "the checkpoint at /x/ckpt/100 was
      trained with".

  Returns:
    The Tokenizer.

  Raises:
    FileNotFoundError: no file at `path`.
    TokenizerMismatchError: the file's sha256 differs from `expected_sha256`.
    ValueError: the file is not a sentencepiece model with gptrl's reserved tokens.
  """
  path = os.fspath(path)
  if not fileio.isfile(path):
    raise FileNotFoundError(f"tokenizer model {path} does not exist; train one with "
                            f"`python -m gptrl.tokenizer --input ... --output {path}`.")
  data = fileio.read_bytes(path)
  actual = hashlib.sha256(data).hexdigest()
  if expected_sha256 is not None and actual != expected_sha256.lower():
    raise TokenizerMismatchError(
        f"tokenizer mismatch: {what or 'expected'} a tokenizer with sha256 {expected_sha256}, but "
        f"{path} has sha256 {actual}. The same ids would mean different text: use the tokenizer "
        f"file that matches, or retrain from scratch with this one.")
  return Tokenizer(data, path=path)


def _split_long_line(line: str, max_bytes: int) -> Iterator[str]:
  """Cuts a line into chunks of at most max_bytes UTF-8 bytes, before a space where possible."""
  data = line.encode("utf-8")
  while len(data) > max_bytes:
    cut = max_bytes
    while data[cut] & 0xC0 == 0x80:  # Do not cut inside a multi-byte character.
      cut -= 1
    space = data.rfind(b" ", 1, cut + 1)
    if space > 0:
      cut = space  # The space starts the next chunk, as a word-initial "▁" would.
    yield data[:cut].decode("utf-8")
    data = data[cut:]
  if data:
    yield data.decode("utf-8")


def _training_sentences(texts: Iterable[str]) -> list[str]:
  """Splits texts into the non-empty lines sentencepiece trains on.

  Newlines are a reserved symbol, so no learned piece needs to span one; lines longer than
  sentencepiece's limit would be silently skipped, so they are cut into chunks.
  """
  if isinstance(texts, str):
    raise TypeError(
        "train_tokenizer takes an iterable of texts, got a single str; wrap it in a list.")
  sentences = []
  for text in texts:
    for line in text.split("\n"):
      if line:
        sentences.extend(_split_long_line(line, _MAX_SENTENCE_BYTES))
  return sentences


def train_tokenizer(texts: Iterable[str], output_path: str | os.PathLike, *,
                    vocab_size: int = 4096, model_type: str = "bpe",
                    character_coverage: float = 1.0, input_sentence_size: int = 5_000_000,
                    seed_sentencepiece_size: int = 1_000_000, num_threads: int = 4,
                    verbose: bool = False) -> Tokenizer:
  """Trains a sentencepiece model on texts, writes it to output_path atomically, and loads it.

  Training is deterministic: the same texts and arguments give a byte-identical file.

  Args:
    texts: documents (any length; they are split into lines).
    output_path: where the .model file goes, local (parent folders are created) or gs://.
    vocab_size: number of ids, including the 265 reserved ones of the module docstring.
    model_type: "bpe" or "unigram".
    character_coverage: share of characters that get their own piece; rarer ones fall back to
      bytes. 1.0 keeps every character seen.
    input_sentence_size: at most this many lines are trained on; above it an evenly spaced subset
      is taken (deterministically, unlike sentencepiece's own random sampling).
    seed_sentencepiece_size: number of seed pieces of the unigram trainer.
    num_threads: trainer threads. Fixed rather than the core count because the thread count is
      stored in the model file (and changes unigram results): any machine gives the same file.
    verbose: show sentencepiece's training log.

  Returns:
    The trained Tokenizer, with `path` = output_path.
  """
  output_path = os.fspath(output_path)
  if vocab_size <= NUM_RESERVED:
    raise ValueError(f"vocab_size={vocab_size} leaves no room for learned pieces: "
                     f"{NUM_RESERVED} ids are reserved (see gptrl/tokenizer.py); use e.g. 4096.")
  sentences = _training_sentences(texts)
  if not sentences:
    raise ValueError(f"no text to train the tokenizer {output_path} on: every text was empty.")
  if 0 < input_sentence_size < len(sentences):
    n = len(sentences)
    sentences = [sentences[i * n // input_sentence_size] for i in range(input_sentence_size)]
  writer = io.BytesIO()
  try:
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(sentences),
        model_writer=writer,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        # Exact round trip: keep text as it is, spaces included; unseen characters become bytes.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        byte_fallback=True,
        split_digits=True,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        pad_piece=PAD_PIECE, unk_piece=UNK_PIECE, bos_piece=BOS_PIECE, eos_piece=EOS_PIECE,
        user_defined_symbols=list(USER_DEFINED_SYMBOLS),
        # Determinism: we already chose the lines, so sentencepiece must neither sample nor shuffle.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        seed_sentencepiece_size=seed_sentencepiece_size,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        num_threads=num_threads,
        minloglevel=0 if verbose else 2,
    )
  except RuntimeError as e:
    raise ValueError(f"training the tokenizer {output_path} failed: {e}\n(vocab_size={vocab_size}, "
                     f"model_type={model_type!r}, {len(sentences)} lines of text.)") from e
  fileio.atomic_write(output_path, writer.getvalue())
  return Tokenizer(writer.getvalue(), path=output_path)


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  from gptrl.config import TOKENIZER_TYPES  # pylint: disable=import-outside-toplevel  (config imports no tokenizer)
  parser = argparse.ArgumentParser(
      prog="python -m gptrl.tokenizer",
      description="Train gptrl's sentencepiece tokenizer and print its sha256.")
  parser.add_argument("--input", action="append", required=True,
                      help="a .txt/.md file, a folder (all .txt/.md files under it), a .jsonl "
                           "file, or the word 'shakespeare'; repeat for several inputs")
  parser.add_argument("--output", required=True, help="path of the .model file to write")
  parser.add_argument("--vocab_size", type=int, default=4096)
  parser.add_argument("--model_type", choices=TOKENIZER_TYPES, default="bpe")
  parser.add_argument("--character_coverage", type=float, default=1.0)
  parser.add_argument("--text_field", default="text",
                      help="JSON field holding the text of .jsonl records")
  parser.add_argument("--include_folio", action="store_true",
                      help="with 'shakespeare': also the First Folio editions")
  parser.add_argument("--cache_dir", default=None,
                      help="corpus cache (default $GPTRL_CACHE or ~/.cache/gptrl)")
  parser.add_argument("--num_threads", type=int, default=4)
  parser.add_argument("--verbose", action="store_true", help="show sentencepiece's log")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point: trains a tokenizer on the inputs and prints its hash and stats."""
  from gptrl import corpus, data  # Only the command line reads corpora.

  args = _parse_args(sys.argv[1:] if argv is None else argv)
  texts = []
  for source in args.input:
    if source == "shakespeare" and args.include_folio:
      documents = corpus.shakespeare_documents(args.cache_dir, include_folio=True)
    else:
      documents = data.load_documents([source], text_field=args.text_field, cache_dir=args.cache_dir)
    texts.extend(d.text for d in documents)
  start = time.perf_counter()
  tokenizer = train_tokenizer(texts, args.output, vocab_size=args.vocab_size,
                              model_type=args.model_type,
                              character_coverage=args.character_coverage,
                              num_threads=args.num_threads, verbose=args.verbose)
  seconds = time.perf_counter() - start
  num_chars = sum(len(t) for t in texts)
  num_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
  print(f"wrote {tokenizer.path}\n"
        f"  vocab_size {tokenizer.vocab_size}\n"
        f"  sha256 {tokenizer.sha256}\n"
        f"  trained in {seconds:.1f} s on {len(texts)} documents, {num_chars} characters: "
        f"{num_chars / max(num_tokens, 1):.3f} characters per token")
  return 0


if __name__ == "__main__":
  sys.exit(main())
