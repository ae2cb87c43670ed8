"""Tests of gptrl/agreement.py: Krippendorff's alpha against the published example and a brute-force count,
pairwise agreement by hand, units matched across records, files and reply orders; the command line."""
from __future__ import annotations

import itertools
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from gptrl import agreement
from gptrl import data as data_lib
from helpers import REPO, env


def _alpha_by_pairs(units) -> float:
  """Alpha from its definition over pairable values: observed disagreement within units (each pair weighted
  1/(m_u - 1)) against the disagreement of all pairs of the n pairable values."""
  pairable = [list(u) for u in units if len(u) >= 2]
  values = np.array([v for u in pairable for v in u])
  n = len(values)
  observed = sum(sum(a != b for a, b in itertools.permutations(u, 2)) / (len(u) - 1) for u in pairable) / n
  expected = (values[:, None] != values[None, :]).sum() / (n * (n - 1))
  return 1.0 - observed / expected


def test_alpha_is_the_published_value_of_krippendorffs_nominal_example():
  # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 observers, 12 units, missing values.
  rows = {"A": [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None], "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
          "C": [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None], "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None]}
  units = [[rows[c][u] for c in "ABCD" if rows[c][u] is not None] for u in range(12)]
  assert agreement.krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)
  assert agreement.krippendorff_alpha_nominal(units) == pytest.approx(_alpha_by_pairs(units), abs=1e-12)


def test_alpha_matches_the_brute_force_count_on_random_binary_data_and_its_edge_cases():
  rng = np.random.default_rng(0)
  for _ in range(20):
    units = [list(rng.integers(0, 2, size=rng.integers(1, 5))) for _ in range(30)]
    assert agreement.krippendorff_alpha_nominal(units) == pytest.approx(_alpha_by_pairs(units), abs=1e-12)
  assert agreement.krippendorff_alpha_nominal([[0, 0], [1, 1], [1, 1, 1]]) == 1.0  # perfect agreement
  assert agreement.krippendorff_alpha_nominal([[0, 1], [1, 0], [0, 1], [1, 0]]) < 0  # systematic disagreement
  assert agreement.krippendorff_alpha_nominal([[1, 1], [1, 1]]) is None  # no variation: undefined
  assert agreement.krippendorff_alpha_nominal([[0], [1]]) is None  # nothing pairable


def _write(path: pathlib.Path, records: list[dict]) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


PROMPTS = [[{"role": "user", "content": f"Question {i}?"}] for i in range(3)]


def test_agreement_matches_units_across_files_reply_orders_and_record_kinds(tmp_path):
  replies = ["red", "green", "blue"]
  alice = [  # rankings of 3 replies: 3 units each
      {"messages": PROMPTS[0], "responses": replies, "ranking": [0, 1, 2], "labeller": "alice"},
      {"messages": PROMPTS[1], "responses": replies, "ranking": [2, 1, 0], "labeller": "alice"}]
  bob = [  # the same prompts, replies in another order; and a pairwise record
      {"messages": PROMPTS[0], "responses": ["blue", "red", "green"], "ranking": [1, 2, 0], "labeller": "bob"},
      {"messages": PROMPTS[1], "chosen": "green", "rejected": "blue", "labeller": "bob"},
      {"messages": PROMPTS[2], "chosen": "red", "rejected": "blue", "labeller": "bob"}]
  judge = [{"messages": PROMPTS[0], "responses": replies, "ranking": [1, 0, 2], "judge": "length"}]
  sources = [_write(tmp_path / "a.jsonl", alice), _write(tmp_path / "b.jsonl", bob),
             _write(tmp_path / "j.jsonl", judge)]
  result = agreement.of_sources(sources)
  assert result.labellers == {"alice": 6, "bob": 5, "judge:length": 3}
  # alice ~ bob: prompt 0 red>green>blue both (3 alike); prompt 1 alice blue>green, bob green>blue (1 unlike).
  assert result.pairs[("alice", "bob")] == (4, 0.75)
  # alice ~ judge: prompt 0, green>red>blue: red~green unlike, red~blue and green~blue alike.
  assert result.pairs[("alice", "judge:length")] == (3, pytest.approx(2 / 3))
  assert result.pairs[("bob", "judge:length")] == (3, pytest.approx(2 / 3))
  assert result.per_labeller["alice"] == (7, pytest.approx(5 / 7))
  assert result.overall == (10, pytest.approx(7 / 10))
  assert result.shared_units == 4 and result.alpha is not None
  assert result.per_labeller["bob"] == (7, pytest.approx(5 / 7))
  by_labeller = agreement.judgements(data_lib.load_records(sources, expected=""))
  assert agreement.low_agreement(by_labeller, 0.7) == {"judge:length": pytest.approx(4 / 6)}  # then 0.75 is left


def test_the_command_line_prints_the_table_or_json_and_names_a_bad_line(tmp_path):
  good = _write(tmp_path / "c.jsonl", [
      {"messages": PROMPTS[0], "chosen": "yes", "rejected": "no", "labeller": "alice"},
      {"messages": PROMPTS[0], "chosen": "no", "rejected": "yes", "labeller": "bob"}])
  out = subprocess.run([sys.executable, "-m", "gptrl.agreement", good, "--json"], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout)["pairs"] == [{"labellers": ["alice", "bob"], "units": 1, "agreement": 0.0}]
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"messages": PROMPTS[0], "chosen": "yes"}) + "\n")
  out = subprocess.run([sys.executable, "-m", "gptrl.agreement", str(bad)], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and f"{bad}:1" in out.stderr and "Traceback" not in out.stderr
  with pytest.raises(data_lib.DataError, match="bad.jsonl:1"):
    agreement.of_sources([str(bad)])


def test_min_agreement_leaves_out_the_labeller_who_disagrees_and_the_fingerprint_names_who_is_used(tmp_path, caplog):
  from gptrl import chat_data  # pylint: disable=import-outside-toplevel
  from gptrl import config as config_lib  # pylint: disable=import-outside-toplevel
  records = []
  for i, prompt in enumerate(PROMPTS):
    for name in ("alice", "bob"):
      records.append({"messages": prompt, "chosen": f"good {i}", "rejected": f"bad {i}", "labeller": name})
    records.append({"messages": prompt, "chosen": f"bad {i}", "rejected": f"good {i}", "labeller": "carol"})
  records.append({"messages": PROMPTS[0], "chosen": "x", "rejected": "y", "labeller": "dave"})  # shares nothing
  source = _write(tmp_path / "team.jsonl", records)
  data = config_lib.PreferenceDataConfig(sources=(source,), min_agreement=0.6)
  with caplog.at_level("INFO"):
    dropped = agreement.labellers_below(data)
  assert dropped == {"carol": 0.0}
  assert any("['dave'] compared no prompt" in r.getMessage() for r in caplog.records)
  groups = chat_data.load_comparisons(data.sources, max_responses=4, drop_labellers=dropped)
  assert sorted({n for g in groups for n in g.labellers}) == ["alice", "bob", "dave"]
  assert agreement.fingerprint_parts(data, dropped, groups) == {
      "min_agreement": 0.6, "labellers_dropped": ["carol"], "labellers_used": ["alice", "bob", "dave"]}
  off = config_lib.PreferenceDataConfig(sources=(source,))
  assert agreement.labellers_below(off) == {} and agreement.fingerprint_parts(off, {}, groups) == {}
  with pytest.raises(config_lib.ConfigError, match="data.min_agreement"):
    config_lib.PreferenceDataConfig(min_agreement=1.5)
  with pytest.raises(data_lib.DataError, match=r"once the records of \['alice', 'bob', 'carol', 'dave'\]"):
    chat_data.load_comparisons(data.sources, max_responses=4, drop_labellers={"alice", "bob", "carol", "dave"})


def test_the_report_shows_the_agreement_of_the_reward_models_comparisons(tmp_path):
  from gptrl import report  # pylint: disable=import-outside-toplevel
  source = _write(tmp_path / "team.jsonl", [
      {"messages": PROMPTS[0], "chosen": "yes", "rejected": "no", "labeller": "alice"},
      {"messages": PROMPTS[0], "chosen": "yes", "rejected": "no", "labeller": "bob"},
      {"messages": PROMPTS[1], "chosen": "a", "rejected": "b", "labeller": "alice"}])
  (tmp_path / "reward").mkdir()
  (tmp_path / "reward" / "config.json").write_text(json.dumps({"data": {"sources": [source]}}))
  html = report.section_label(report.Run({"reward": str(tmp_path / "reward")}))
  assert "Labeller agreement" in html and "<td>alice</td><td>2</td><td>1</td><td>1.000</td>" in html
  assert "1 reply pairs judged by two or more labellers" in html
