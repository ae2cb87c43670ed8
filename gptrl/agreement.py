"""How much labellers agree: on the prompts two or more of them compared, the share of reply pairs they order
alike (pairwise agreement, per pair of labellers, per labeller and overall) and Krippendorff's alpha.

  python -m gptrl.agreement runs/labels_alice/comparisons.jsonl runs/labels_bob/comparisons.jsonl [--json]

The unit is one pair of distinct replies to one prompt (matched by text, in whichever records and order they
came): a ranking of K replies judges K(K-1)/2 units, a pairwise record one. A labeller's value for a unit is which
reply it prefers (its first record on the unit counts). Agreement between two labellers: over the units both
judged, the share where they prefer the same reply (InstructGPT reports 73% between its labellers). Alpha is
Krippendorff's for nominal data over every unit judged by at least two labellers: 1 - observed / expected
disagreement, 1 for perfect agreement, 0 for agreement no better than chance, below 0 for systematic
disagreement. Who labelled a record: `chat_data.record_labeller` (a person's name, "user:<name>", "judge:<name>").
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import logging
import sys
from typing import Any, Iterable, Sequence

from gptrl import chat
from gptrl import chat_data
from gptrl import cli
from gptrl import data as data_lib

_PROG = "gptrl.agreement"

Unit = tuple[str, str, str]  # (the prompt as JSON, reply a, reply b) with a < b


def judgements(records: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, dict[Unit, int]]:
  """{labeller: {unit: 0 if it prefers reply a else 1}} of comparison records ((where, record) pairs, as
  gptrl.data.load_records yields them; malformed ones raise DataError naming the line)."""
  out: dict[str, dict[Unit, int]] = collections.defaultdict(dict)
  for where, record in records:
    try:
      prompt = json.dumps([dataclasses.astuple(m) for m in chat.prompt_messages(record, where)])
    except chat.ChatFormatError as e:
      raise data_lib.DataError(str(e)) from None
    responses, pairs = chat_data.pairs_of_record(record, where)
    mine = out[chat_data.record_labeller(record)]
    for winner, loser, _ in pairs:
      a, b = sorted((responses[winner], responses[loser]))
      if a != b:
        mine.setdefault((prompt, a, b), 0 if responses[winner] == a else 1)
  return dict(out)


@dataclasses.dataclass
class Agreement:
  """Pairwise agreement and alpha; `pairs[(x, y)]` = (units both judged, share alike) for x < y."""
  labellers: dict[str, int]  # units each judged
  pairs: dict[tuple[str, str], tuple[int, float]]
  per_labeller: dict[str, tuple[int, float]]  # (judgements compared with another labeller's, share alike)
  overall: tuple[int, float]  # (pairs of judgements by two labellers on one unit, share alike)
  alpha: float | None  # None: no unit judged twice, or no variation at all
  shared_units: int

  def as_json(self) -> dict[str, Any]:
    return {"labellers": self.labellers, "shared_units": self.shared_units, "alpha": self.alpha,
            "overall": {"compared": self.overall[0], "agreement": self.overall[1]},
            "per_labeller": {k: {"compared": n, "agreement": a} for k, (n, a) in self.per_labeller.items()},
            "pairs": [{"labellers": list(k), "units": n, "agreement": a} for k, (n, a) in self.pairs.items()]}


def krippendorff_alpha_nominal(units: Sequence[Sequence[int]]) -> float | None:
  """Krippendorff's alpha for nominal values: `units` holds each unit's values (one per coder that judged it);
  units with fewer than 2 are not pairable and are left out. None when nothing is pairable or every value is
  the same (expected disagreement 0)."""
  coincidence: dict[tuple[int, int], float] = collections.Counter()
  for values in units:
    m = len(values)
    if m < 2:
      continue
    for i, j in itertools.permutations(range(m), 2):
      coincidence[(values[i], values[j])] += 1.0 / (m - 1)
  n_c: dict[int, float] = collections.Counter()
  for (c, _), o in coincidence.items():
    n_c[c] += o
  n = sum(n_c.values())
  if n <= 1:
    return None
  observed = sum(o for (c, k), o in coincidence.items() if c != k) / n
  expected = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k) / (n * (n - 1))
  return None if expected == 0 else 1.0 - observed / expected


def measure(by_labeller: dict[str, dict[Unit, int]]) -> Agreement:
  """The agreement of `judgements`' labellers."""
  names = sorted(by_labeller)
  pairs, per = {}, {name: [0, 0] for name in names}
  total = [0, 0]
  for x, y in itertools.combinations(names, 2):
    shared = by_labeller[x].keys() & by_labeller[y].keys()
    if not shared:
      continue
    alike = sum(by_labeller[x][u] == by_labeller[y][u] for u in shared)
    pairs[(x, y)] = (len(shared), alike / len(shared))
    for name in (x, y):
      per[name][0] += len(shared)
      per[name][1] += alike
    total[0] += len(shared)
    total[1] += alike
  values: dict[Unit, list[int]] = collections.defaultdict(list)
  for name in names:
    for unit, value in by_labeller[name].items():
      values[unit].append(value)
  multi = [v for v in values.values() if len(v) >= 2]
  return Agreement(
      labellers={name: len(by_labeller[name]) for name in names}, pairs=pairs,
      per_labeller={name: (n, alike / n) for name, (n, alike) in per.items() if n},
      overall=(total[0], total[1] / total[0] if total[0] else float("nan")),
      alpha=krippendorff_alpha_nominal(multi), shared_units=len(multi))


def judgements_of(sources: Sequence[str]) -> dict[str, dict[Unit, int]]:
  """`judgements` of the comparison records in `sources` (files, folders, globs; as the reward stage reads)."""
  return judgements(data_lib.load_records(sources, expected=chat_data.PREF_EXPECTED))


def of_sources(sources: Sequence[str]) -> Agreement:
  """The agreement of the comparison records in `sources`."""
  return measure(judgements_of(sources))


def low_agreement(by_labeller: dict[str, dict[Unit, int]], minimum: float) -> dict[str, float]:
  """{labeller: agreement when left out} of the labellers whose agreement with the others is below `minimum`,
  left out one at a time, the lowest first, the rest measured again each time (one labeller who disagrees with
  everyone lowers everyone's agreement with the others). Labellers never compared with another stay: nothing
  measures them."""
  kept, dropped = dict(by_labeller), {}
  while True:
    below = {name: a for name, (_, a) in measure(kept).per_labeller.items() if a < minimum}
    if not below:
      return dropped
    worst = min(sorted(below), key=below.get)
    dropped[worst] = below[worst]
    del kept[worst]


def labellers_below(data: Any) -> dict[str, float]:
  """{labeller: agreement} of those whose records `data.min_agreement` (a PreferenceDataConfig's) leaves out of
  the reward or DPO stage ({} when it is 0), logged with the measurement."""
  if data.min_agreement <= 0:
    return {}
  by_labeller = judgements_of(data.sources)
  measured = measure(by_labeller)
  dropped = low_agreement(by_labeller, data.min_agreement)
  logging.info("Labeller agreement (gptrl.agreement) over %d prompts' reply pairs judged twice or more: overall "
               "%.3f, Krippendorff's alpha %s; per labeller %s; below data.min_agreement=%g, left out: %s.",
               measured.shared_units, measured.overall[1], "-" if measured.alpha is None else f"{measured.alpha:.3f}",
               {k: round(a, 3) for k, (_, a) in measured.per_labeller.items()}, data.min_agreement, dropped or "none")
  unmeasured = sorted(set(measured.labellers) - set(measured.per_labeller))
  if unmeasured:
    logging.warning("data.min_agreement: %s compared no prompt with another labeller; their records are kept.",
                    unmeasured)
  return dropped


def fingerprint_parts(data: Any, dropped: dict[str, float], groups: Sequence[Any]) -> dict[str, Any]:
  """What a stage's data fingerprint adds under `data.min_agreement`: which labellers' records it used."""
  if data.min_agreement <= 0:
    return {}
  return {"min_agreement": data.min_agreement, "labellers_dropped": sorted(dropped),
          "labellers_used": sorted({name for g in groups for name in g.labellers})}


def format_table(result: Agreement) -> str:
  lines = [f"{'labeller':<28} {'units':>7} {'compared':>9} {'agreement':>10}"]
  for name, units in result.labellers.items():
    n, a = result.per_labeller.get(name, (0, float("nan")))
    lines.append(f"{name:<28} {units:>7} {n:>9} {a:>10.3f}" if n else f"{name:<28} {units:>7} {0:>9} {'-':>10}")
  alpha = "-" if result.alpha is None else f"{result.alpha:.3f}"
  overall = "-" if not result.overall[0] else f"{result.overall[1]:.3f}"
  lines.append(f"\n{result.shared_units} units judged by two or more labellers; pairwise agreement {overall} over "
               f"{result.overall[0]} comparisons; Krippendorff's alpha (nominal) {alpha}")
  for (x, y), (n, a) in result.pairs.items():
    lines.append(f"  {x} ~ {y}: {a:.3f} over {n} units")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog=f"python -m {_PROG}", description=__doc__.split("\n\n", 1)[0],
                              epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("sources", nargs="+", help="comparison JSONL files, folders or globs")
  p.add_argument("--json", action="store_true", help="print JSON instead of a table")

  def run(args: argparse.Namespace) -> None:
    try:
      result = of_sources(args.sources)
    except data_lib.DataError as e:
      raise cli.UsageError(str(e)) from None
    print(json.dumps(result.as_json(), indent=1) if args.json else format_table(result))
  return cli.main(_PROG, p, run, lambda: None, argv)


if __name__ == "__main__":
  sys.exit(main())
