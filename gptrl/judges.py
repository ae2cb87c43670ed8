"""Automatic raters that stand in for people when labelling comparisons (gptrl/stages/label.py).

A judge maps reply texts to scores, higher is better; the labelling stage turns score gaps into preferences
and drops pairs whose gap is below `judge.min_gap`, where an automatic judge is least reliable.

- "vader": the compound sentiment score of VADER (Hutto & Gilbert, 2014; `vaderSentiment` on PyPI), in
  [-1, 1]: "kinder replies are better". Against human sentiment labels of movie-review sentences it agrees on
  about 69% of pairs, and on about 76% of the pairs whose score gap is >= 0.3.
- "length": the number of words, for tests and as a deliberately gameable judge.

Replace the judge with people through the label web UI (see the pipeline issue), or skip this stage and give
the reward model your own comparisons JSONL.
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


def length() -> Judge:
  def judge(texts: Sequence[str]) -> list[float]:
    return [float(len(t.split())) for t in texts]
  return judge


JUDGES: dict[str, Callable[[], Judge]] = {"vader": vader, "length": length}


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
