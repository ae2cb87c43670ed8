"""Tests of gptrl/tokenizer.py on small generated English-ish text."""
import contextlib
import io
import json
import pathlib
import pickle
import random
import subprocess
import sys

import pytest
import sentencepiece as spm

from gptrl import tokenizer as tok

_VOCAB = 400  # 265 reserved ids + ~60 characters + some merges.
_WORDS = ("the king queen lord lady love night day sword crown speak hear good noble sweet "
          "death life heart blood fair true honour father mother son daughter friend enemy").split()


def _english_ish(num_lines: int = 300, seed: int = 0) -> list[str]:
  """Returns a few documents of random sentences over a small word list."""
  rng = random.Random(seed)
  lines = []
  for _ in range(num_lines):
    words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
    words[0] = words[0].capitalize()
    lines.append(" ".join(words) + rng.choice(".,;!?") + rng.choice(["", "  ", " 42"]))
  return ["\n".join(lines[i:i + 50]) for i in range(0, num_lines, 50)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tokenizer trained once for the module."""
  path = tmp_path_factory.mktemp("tok") / "tok.model"
  return tok.train_tokenizer(_english_ish(), path, vocab_size=_VOCAB)


@pytest.mark.parametrize("text", [
    "",
    "The king is dead.\nLong live the king!\n\n\n",
    "   leading and trailing spaces   ",
    "tabs\tand\t\ttabs, runs of     spaces",
    "Windows\r\nline ends\r\n",
    "unseen: \u00e9t\u00e9 na\u00efve \u6f22\u5b57 \u0416 \U0001f600 \u200b zero-width",
    "<|user|> hi <|end|>\n<|assistant|> hello<|end|>",
    "<s> and </s> and <pad> and <unk> are plain text",
    "digits 1234567890 and 3.14159",
])
def test_round_trip(trained, text):
  ids = trained.encode(text)
  assert trained.decode(ids) == text
  assert tok.UNK_ID not in ids  # Byte fallback covers everything.
  # Encoding is close to concatenative (no dummy prefix): pieces decode to the whole.
  half = len(text) // 2
  assert trained.decode(trained.encode(text[:half]) + trained.encode(text[half:])) == text


def test_reserved_ids(trained):
  assert (trained.pad_id, trained.unk_id, trained.bos_id, trained.eos_id) == (0, 1, 2, 3)
  assert (trained.newline_id, trained.system_id, trained.user_id, trained.assistant_id,
          trained.end_of_turn_id) == (4, 5, 6, 7, 8)
  assert [trained.id_to_piece(i) for i in range(9)] == [
      "<pad>", "<unk>", "<s>", "</s>", "\n", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
  assert trained.id_to_piece(9) == "<0x00>" and trained.id_to_piece(264) == "<0xFF>"
  assert trained.vocab_size == _VOCAB
  assert trained.encode("\n") == [trained.newline_id]
  assert trained.encode("<|system|><|user|><|assistant|><|end|>") == [5, 6, 7, 8]
  ids = trained.encode("The king.")
  assert trained.bos_id not in ids and trained.eos_id not in ids  # encode adds no BOS/EOS.
  padded = [trained.bos_id] + ids + [trained.eos_id, trained.pad_id, trained.pad_id]
  assert trained.decode(padded) == "The king."


def test_encode_batch_matches_encode(trained):
  texts = ["Good night, sweet prince.", "", "\u00e9\t\n  x"]
  assert trained.encode_batch(texts) == [trained.encode(t) for t in texts]
  with pytest.raises(TypeError, match="encode_batch"):
    trained.encode(texts)


def test_decode_rejects_ids_outside_the_vocabulary(trained):
  with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 400\)"):
    trained.decode([5, _VOCAB])


def test_training_is_deterministic(tmp_path, trained):
  texts = _english_ish()
  again = tok.train_tokenizer(texts, tmp_path / "again.model", vocab_size=_VOCAB)
  assert again.sha256 == trained.sha256
  assert (tmp_path / "again.model").read_bytes() == open(trained.path, "rb").read()
  other = tok.train_tokenizer(_english_ish(seed=1), tmp_path / "other.model", vocab_size=_VOCAB)
  assert other.sha256 != trained.sha256
  # No temp files are left beside the model.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["again.model", "other.model"]


def test_long_lines_are_cut_not_dropped():
  line = ("word " * 2000) + "\u00e9" * 3000
  chunks = list(tok._split_long_line(line, 4192))
  assert "".join(chunks) == line
  assert all(len(c.encode("utf-8")) <= 4192 for c in chunks)
  assert chunks[1].startswith(" ")  # Cut before a space, the space starts the next chunk.


def test_mismatch_names_file_both_hashes_and_who(trained):
  expected = "0" * 64
  with pytest.raises(tok.TokenizerMismatchError) as e:
    tok.load_tokenizer(trained.path, expected_sha256=expected,
                       what="the checkpoint at /x/ckpt/100 was trained with")
  message = str(e.value)
  assert isinstance(e.value, ValueError)
  assert expected in message and trained.sha256 in message and trained.path in message
  assert "the checkpoint at /x/ckpt/100 was trained with" in message
  assert tok.load_tokenizer(trained.path, expected_sha256=trained.sha256).sha256 == trained.sha256


def _train_plain_sentencepiece(path, vocab_size, **settings):
  """Trains a sentencepiece model with settings other than gptrl's; writes it to path."""
  writer = io.BytesIO()
  spm.SentencePieceTrainer.Train(
      sentence_iterator=iter("\n".join(_english_ish()).split("\n")), model_writer=writer,
      vocab_size=vocab_size, minloglevel=2, **settings)
  path.write_bytes(writer.getvalue())
  return path


def test_foreign_model_is_refused(tmp_path):
  path = _train_plain_sentencepiece(tmp_path / "foreign.model", 100)  # sentencepiece's defaults.
  with pytest.raises(ValueError) as e:
    tok.load_tokenizer(path)
  message = str(e.value)
  assert str(path) in message and "reserved" in message
  assert "'<pad>'" in message and "'<|user|>'" in message and "'\\n'" in message


def test_model_that_does_not_round_trip_is_refused(tmp_path):
  # Reserved ids in place, but default normalization (NFKC, collapsed spaces, dummy prefix).
  path = _train_plain_sentencepiece(
      tmp_path / "lossy.model", 340, byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
      user_defined_symbols=list(tok.USER_DEFINED_SYMBOLS))
  with pytest.raises(ValueError, match="does not round-trip"):
    tok.load_tokenizer(path)


def test_missing_or_garbage_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="python -m gptrl.tokenizer"):
    tok.load_tokenizer(tmp_path / "nope.model")
  (tmp_path / "garbage.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a sentencepiece model"):
    tok.load_tokenizer(tmp_path / "garbage.model")


def test_vocab_too_small_is_explained(tmp_path):
  with pytest.raises(ValueError, match="reserved"):
    tok.train_tokenizer(_english_ish(), tmp_path / "t.model", vocab_size=200)
  with pytest.raises(ValueError, match="Vocabulary size too high"):
    tok.train_tokenizer(["tiny text"], tmp_path / "t.model", vocab_size=4096)
  with pytest.raises(TypeError, match="single str"):
    tok.train_tokenizer("a string, not a list", tmp_path / "t.model")


def test_pickle_round_trip(trained):
  clone = pickle.loads(pickle.dumps(trained))
  assert (clone.path, clone.sha256) == (trained.path, trained.sha256)
  assert clone.vocab_size == trained.vocab_size
  text = "The queen, my lord, is dead.\n\u00e9"
  assert clone.encode(text) == trained.encode(text)


def test_cli_on_folder_and_jsonl(tmp_path):
  folder = tmp_path / "texts"
  (folder / "sub").mkdir(parents=True)
  docs = _english_ish()
  for i, doc in enumerate(docs[:3]):
    (folder / f"{i}.txt").write_text(doc)
  (folder / "sub" / "notes.md").write_text(docs[3])
  jsonl = tmp_path / "more.jsonl"
  jsonl.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[4:]))
  output = tmp_path / "out" / "cli.model"
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    tok.main(["--input", str(folder), "--input", str(jsonl), "--text_field", "body",
              "--output", str(output), "--vocab_size", str(_VOCAB)])
  loaded = tok.load_tokenizer(output)
  assert f"sha256 {loaded.sha256}" in stdout.getvalue()
  assert f"vocab_size {_VOCAB}" in stdout.getvalue()
  assert "6 documents" in stdout.getvalue()


def test_cli_runs_as_module(tmp_path):
  (tmp_path / "a.txt").write_text("\n".join(_english_ish()))
  output = tmp_path / "m.model"
  proc = subprocess.run([sys.executable, "-m", "gptrl.tokenizer",
                         "--input", str(tmp_path / "a.txt"),
                         "--output", str(output), "--vocab_size", str(_VOCAB)],
                        capture_output=True, text=True, check=False,
                        cwd=pathlib.Path(__file__).resolve().parents[1])
  assert proc.returncode == 0, proc.stderr
  assert tok.load_tokenizer(output).sha256 in proc.stdout
