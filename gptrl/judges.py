"""Automatic raters that stand in for people when labelling comparisons (gptrl/stages/autolabel.py).

A judge maps reply texts to scores, higher is better; the labelling stage turns score gaps into preferences
and drops pairs whose gap is below `judge.min_gap`, where an automatic judge is least reliable.

- "vader": the compound sentiment score of VADER (Hutto & Gilbert, 2014; `vaderSentiment` on PyPI), in
  [-1, 1]: "kinder replies are better". Against human sentiment labels of movie-review sentences it agrees on
  about 69% of pairs, and on about 76% of the pairs whose score gap is >= 0.3.
- "length": the number of words, for tests and as a deliberately gameable judge.
- "textblob": the polarity of TextBlob's pattern sentiment lexicon (`textblob` on PyPI; its lexicon ships in the
  package, no corpus download), in [-1, 1]. A second opinion on "kindness", built differently from VADER and
  never used for labelling: PPO's over-optimisation watch (`ppo.watch_judges`) scores held-out replies with it.
  When the reward model's reward keeps rising while this judge flattens or falls, the policy games the RM.

Replace the judge with people through the labelling web page (`python -m gptrl.label`; both are labellers,
gptrl/labellers.py), or skip this stage and give the reward model your own comparisons JSONL.
"""
from __future__ import annotations

from typing import Callable, Sequence

Judge = Callable[[Sequence[str]], list[float]]


def vader() -> Judge:
  from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # pylint: disable=import-outside-toplevel
  analyzer = SentimentIntensityAnalyzer()

  def judge(texts: Sequence[str]) -> list[float]:
    return [float(analyzer.polarity_scores(t)["compound"]) if t.strip() else 0.0 for t in texts]
  return judge


def textblob() -> Judge:
  """TextBlob's pattern-lexicon polarity in [-1, 1] per text (0 for an empty one); works offline."""
  from textblob.en.sentiments import PatternAnalyzer  # pylint: disable=import-outside-toplevel
  analyzer = PatternAnalyzer()

  def judge(texts: Sequence[str]) -> list[float]:
    return [float(analyzer.analyze(t).polarity) if t.strip() else 0.0 for t in texts]
  return judge


def length() -> Judge:
  def judge(texts: Sequence[str]) -> list[float]:
    return [float(len(t.split())) for t in texts]
  return judge


JUDGES: dict[str, Callable[[], Judge]] = {"vader": vader, "length": length}
JUDGES["textblob"] = textblob  # the default over-optimisation watch of PPO (config.ppo.watch_judges)


def make_judge(name: str) -> Judge:
  if name not in JUDGES:
    raise ValueError(f"config.judge.name: unknown judge {name!r}; known: {sorted(JUDGES)}.")
  return JUDGES[name]()


def preference_pairs(scores: Sequence[float], min_gap: float) -> list[tuple[int, int, float]]:
  """(better, worse, gap) for every pair of replies whose scores differ by at least `min_gap` (and by > 0)."""
  out = []
  for i in range(len(scores)):
    for j in range(i + 1, len(scores)):
      gap = scores[i] - scores[j]
      if abs(gap) >= min_gap and gap != 0:
        out.append((i, j, gap) if gap > 0 else (j, i, -gap))
  return out
