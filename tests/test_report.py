"""The HTML report (gptrl/report.py) on hand-written stage folders in the formats the stages write: every
section, decodable PNGs, escaped text, the SFT-vs-PPO pairing, and graceful degradation when stages are missing."""
from __future__ import annotations

import base64
import json
import math
import os
import pathlib
import re
import struct
import subprocess
import sys
import zlib

import pytest

from gptrl import fileio
from gptrl import judges
from gptrl import report
from gptrl import stages
from gptrl.metrics import MetricsWriter, truncate_jsonl_after
from gptrl.stages import ppo
from helpers import REPO, env

SECTION_IDS = ("summary", "losses", "reward-model", "ppo", "reward-vs-kl", "frontier", "goodhart", "replies", "labels")
SCRIPT = "<script>alert('x')</script>"
# The synthetic PPO run: the RM's eval reward keeps rising, the watch judge peaks at step 4 and then falls.
EVAL_STEPS = (0, 4, 8)
EVAL_RM = (0.0, 0.6, 1.2)
EVAL_JUDGE = (0.10, 0.30, 0.05)
# Gold scores on Gao et al.'s curves: PPO's d(0.4 - 0.3 log d) peaks at d = exp(1/3), KL 1.95 < its last KL 4.
EVAL_GOLD = tuple(0.1 + d * (0.4 - 0.3 * math.log(d)) if d else 0.1 for d in (math.sqrt(s / 2) for s in EVAL_STEPS))


def _metrics(folder: pathlib.Path, rows: list[tuple[int, dict]], config: dict | None) -> None:
  writer = MetricsWriter(str(folder))
  for step, row in rows:
    writer.write(step, row)
  writer.close()
  if config is not None:
    (folder / "config.json").write_text(json.dumps(config))


def _pretrain_like(folder: pathlib.Path, stage: str) -> None:
  rows = [(s, {"train/loss": 6.0 - s / 20, "train/lr": 1e-3}) for s in range(10, 60, 10)]
  rows += [(25, {"eval/loss": 5.5}), (50, {"eval/loss": 4.9}), (55, {"train/loss": float("nan")})]
  _metrics(folder, rows, {"stage": stage, "workdir": str(folder)})
  with open(folder / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 60, "train/lo')  # a line torn by a kill mid-write


def _label(folder: pathlib.Path) -> None:
  _metrics(folder, [(c, {"label/pairs": 5, "label/finished_share": 0.75, "label/reply_words": 9.0}) for c in (1, 2)],
           {"stage": "label"})
  (folder / "summary.json").write_text(json.dumps({"prompts": 3, "replies_per_prompt": 4, "pairs": 5,
                                                   "judge": "vader", "min_gap": 0.3}))
  with open(folder / "replies.jsonl", "w", encoding="utf-8") as f:
    for i in range(3):
      f.write(json.dumps({"prompt_index": i, "messages": [], "responses": ["a", "b", "c", ""],
                          "scores": [0.5, -0.2, 0.0, 0.0]}) + "\n")
  with open(folder / "comparisons.jsonl", "w", encoding="utf-8") as f:
    for gap in (0.7, 0.5, 0.5, 0.4, 0.9):
      f.write(json.dumps({"messages": [], "chosen": "a", "rejected": "b", "margin": gap, "judge": "vader"}) + "\n")


def _reward(folder: pathlib.Path) -> None:
  rows = [(0, {"eval/loss": 0.69, "eval/accuracy": 0.5})]
  rows += [(s, {"train/loss": 0.7 - s / 100, "train/accuracy": 0.5 + s / 100}) for s in (10, 20)]
  rows += [(20, {"eval/loss": 0.6, "eval/accuracy": 0.68, "eval/pair_accuracy": 0.7, "eval/pairs": 40.0,
                 "eval/accuracy_gap/0-0.25": 0.55, "eval/pairs_gap/0-0.25": 20.0,
                 "eval/accuracy_gap/1-inf": 0.95, "eval/pairs_gap/1-inf": 20.0})]
  _metrics(folder, rows, {"stage": "reward"})


def _ppo(folder: pathlib.Path, judged: bool = True) -> None:
  rows = [(it, {"ppo/reward": it / 8, "ppo/kl": it / 2, "ppo/beta": 0.05, "ppo/length": 20.0 + it,
                "ppo/policy_loss": -0.01, "ppo/value_loss": 0.2 - it / 100}) for it in range(1, 9)]
  for step, rm, judge, gold in zip(EVAL_STEPS, EVAL_RM, EVAL_JUDGE, EVAL_GOLD):
    row = {"eval/reward": rm, "eval/reward_std": 0.5, "eval/kl": step / 2, "eval/length": 20.0 + step,
           "eval/proxy": rm, "eval/gold": gold}
    if judged:
      row.update({"eval/judge_textblob": judge, "eval/judge_textblob_std": 0.2})
    rows.append((step, row))
  _metrics(folder, sorted(rows, key=lambda r: r[0]), {"stage": "ppo", "ppo": {"target_kl": 4.0}})
  if not judged:
    return
  for step in EVAL_STEPS:
    who = "sft" if step == 0 else "ppo"
    replies = [{"prompt_index": i,
                "messages": [{"role": "system", "content": "You are Kent & co."},
                             {"role": "user", "content": f"question {i}\x1d"}],
                "reply": SCRIPT if (i == 1 and step == 8) else f"{who} says {i} at {step}",
                "reward": step / 10 + i, "kl": step / 2, "length": 5,
                # The judge agrees with the RM across prompts at step 0 and disagrees at step 8.
                "judges": {"textblob": round(0.1 * (i + 1) if step == 0 else 0.1 * (3 - i), 6)}}
               for i in range(3)]
    ppo.append_eval_replies(str(folder), step, replies)


def _bon(folder: pathlib.Path, gold: bool = True) -> None:
  rows = []
  for n in (1, 2, 4, 8, 16):
    kl = math.log(n) - (n - 1) / n
    d = math.sqrt(kl)
    rows.append({"n": n, "kl": kl, "proxy": 0.8 * d, **({"gold": 0.1 + d * (0.5 - 0.1 * d)} if gold else {})})
  (folder / "config.json").write_text(json.dumps({"stage": "bon"}))
  (folder / "bon.json").write_text(json.dumps({"gold_judge": "vader" if gold else None, "rows": rows}))
  with open(folder / "bon_replies.jsonl", "w", encoding="utf-8") as f:
    for i in range(3):  # the prompts of _ppo's eval replies
      messages = [{"role": "system", "content": "You are Kent & co."}, {"role": "user", "content": f"question {i}\x1d"}]
      f.write(json.dumps({"prompt_index": i, "messages": messages, "sft": {"reply": "x", "proxy": 0.0},
                          "best_of_16": {"reply": f"bon pick {i}", "proxy": 1.5, "gold": 0.25,
                                         "judge_textblob": 0.5}}) + "\n")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> pathlib.Path:
  """A pipeline workdir with the five stage sub-folders."""
  root = tmp_path_factory.mktemp("pipeline")
  for stage in report.STAGES:
    (root / stage).mkdir()
  _pretrain_like(root / "pretrain", "pretrain")
  _pretrain_like(root / "sft", "sft")
  _label(root / "label")
  _reward(root / "reward")
  _bon(root / "bon")
  _ppo(root / "ppo")
  (root / "pipeline_state.json").write_text(json.dumps({"done": {"pretrain": {"seconds": 120.0}}}))
  return root


@pytest.fixture(scope="module")
def full_html(pipeline_dir) -> str:
  out = report.write_report(report.find_stage_dirs(str(pipeline_dir)), str(pipeline_dir / "out" / "report.html"))
  return pathlib.Path(out).read_text(encoding="utf-8")


def _pngs(text: str) -> list[bytes]:
  return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def _png_size(data: bytes) -> tuple[int, int]:
  """Width and height from a PNG's IHDR chunk, after checking the signature, the chunk CRC and the IEND trailer."""
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  length, kind = struct.unpack(">I4s", data[8:16])
  assert kind == b"IHDR" and length == 13
  assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])
  assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"
  return struct.unpack(">II", data[16:24])


def _section(text: str, sid: str) -> str:
  match = re.search(rf'<section id="{sid}">(.*?)</section>', text, re.S)
  assert match, f"no section {sid}"
  return match.group(1)


def test_every_section_is_there_with_a_decodable_plot(full_html):
  for sid in SECTION_IDS:
    _section(full_html, sid)
  pngs = _pngs(full_html)
  assert len(pngs) == 7  # losses, RM accuracy, PPO, reward vs KL, frontier, Goodhart, label histograms
  for data in pngs:
    width, height = _png_size(data)
    assert width >= 400 and height >= 200


def test_reply_text_is_html_escaped(full_html):
  assert "<script" not in full_html.lower()
  assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in full_html
  assert "You are Kent &amp; co." in full_html
  assert "\x1d" not in full_html and "question 0\\x1d" in full_html  # a control character, shown visibly


def test_table_pairs_the_sft_and_ppo_reply_to_each_prompt(full_html):
  rows = re.findall(r"<tr>(.*?)</tr>", _section(full_html, "replies"), re.S)
  body = [r for r in rows if "question" in r]
  assert len(body) == 3
  for i, row in enumerate(body):
    assert f"question {i}" in row and f"sft says {i} at 0" in row
    assert (f"ppo says {i} at 8" in row) if i != 1 else ("&lt;script&gt;" in row)
  # Scores: the RM reward written for prompt 2 at step 8 is 0.8 + 2, and the judge's 0.1 * (3 - 2).
  assert "RM +2.800" in body[2] and "textblob +0.100" in body[2]
  assert "step 0" in _section(full_html, "replies") and "step 8" in _section(full_html, "replies")


def test_goodhart_section_shows_the_judge_peaking_while_the_rm_rises(full_html):
  text = _section(full_html, "goodhart")
  cells = lambda key: re.search(rf"<td>{re.escape(key)}</td>((?:<td>[^<]*</td>)+)", text).group(1)
  assert "<td>+0.000</td><td>+1.200</td><td>+1.200 at step 8</td>" == cells("eval/reward")
  assert "<td>+0.100</td><td>+0.050</td><td>+0.300 at step 4</td>" == cells("eval/judge_textblob")
  assert "not an independent watch" not in text  # labelled by vader, watched by textblob
  assert "<td>+1.00 (step 0, 3 replies)</td><td>-1.00 (step 8, 3 replies)</td>" in text  # Pearson r of exact lines


def test_summary_reads_steps_times_and_key_numbers(full_html):
  text = _section(full_html, "summary")
  assert "2.0 min" in text  # pretrain: 120 s from pipeline_state.json
  assert "eval/loss 5.500 → 4.900" in text and "eval/accuracy 0.500 → 0.680" in text
  assert "eval/judge_textblob 0.100 → 0.050" in text
  label = _section(full_html, "labels")
  assert "5 / 18 (28%)" in label  # 3 prompts x C(4, 2) = 18 possible pairs
  assert "empty replies</td><td>3" in label


def test_missing_stages_and_metrics_degrade_to_notes(tmp_path):
  (tmp_path / "ppo").mkdir()
  _ppo(tmp_path / "ppo", judged=False)
  text = pathlib.Path(report.write_report({"ppo": str(tmp_path / "ppo"), "sft": str(tmp_path / "absent")},
                                          str(tmp_path / "r.html"))).read_text(encoding="utf-8")
  for sid in SECTION_IDS:
    _section(text, sid)
  assert "No labelling stage" in _section(text, "labels")
  assert "No reward-model stage" in _section(text, "reward-model")
  assert "config.ppo.watch_judges" in _section(text, "goodhart")
  assert "fewer than two evals" in _section(text, "replies")
  assert len(_pngs(text)) == 4  # PPO losses, PPO per iteration, reward vs KL, PPO's points on the frontier


def test_a_ppo_run_without_eval_replies_says_so(tmp_path):
  _ppo(tmp_path, judged=False)
  (tmp_path / ppo.EVAL_REPLIES_FILE).unlink(missing_ok=True)
  text = _section(pathlib.Path(report.write_report({"ppo": str(tmp_path)}, str(tmp_path / "r.html"))).read_text(
      encoding="utf-8"), "replies")
  assert "fewer than two evals of held-out replies logged" in text


def test_stage_folders_are_found_in_every_layout(pipeline_dir, tmp_path):
  assert report.find_stage_dirs(str(pipeline_dir)) == {s: str(pipeline_dir / s) for s in stages.DEFAULT_PIPELINE}
  assert report.find_stage_dirs(str(pipeline_dir / "reward")) == {"reward": str(pipeline_dir / "reward")}
  # A folder of runs with any names (like runs/): found by config.json; the newest of two PPO runs wins.
  for name, stage in (("sft_cpu", "sft"), ("ppo_old", "ppo"), ("ppo_new", "ppo")):
    (tmp_path / name).mkdir()
    _metrics(tmp_path / name, [(1, {"x": 1.0})], {"stage": stage})
  os.utime(tmp_path / "ppo_old" / "metrics.jsonl", (1, 1))
  assert report.find_stage_dirs(str(tmp_path)) == {"sft": str(tmp_path / "sft_cpu"), "ppo": str(tmp_path / "ppo_new")}
  assert report.find_stage_dirs(str(tmp_path), {"ppo": str(tmp_path / "ppo_old")})["ppo"] == str(tmp_path / "ppo_old")
  with pytest.raises(report.ReportError, match="--label .*nope: no such folder"):
    report.find_stage_dirs(str(tmp_path), {"label": str(tmp_path / "nope")})


def test_an_empty_workdir_is_a_clear_error(tmp_path):
  with pytest.raises(report.ReportError, match=f"{re.escape(str(tmp_path))}: no stage outputs found"):
    report.find_stage_dirs(str(tmp_path))
  with pytest.raises(report.ReportError, match="nothing to report"):
    report.write_report({"ppo": str(tmp_path)}, str(tmp_path / "r.html"))
  assert report.main(["--workdir", str(tmp_path)]) == 2
  assert not (tmp_path / "r.html").exists() and not (tmp_path / "report.html").exists()


def test_cli_writes_the_report_into_the_workdir(pipeline_dir):
  out = pipeline_dir / "report.html"
  result = subprocess.run([sys.executable, "-m", "gptrl.report", "--workdir", str(pipeline_dir)], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == str(out)
  assert len(_pngs(out.read_text(encoding="utf-8"))) == 7


def test_textblob_watch_judge_scores_sentiment_offline():
  judge = judges.make_judge("textblob")
  good, bad, empty = judge(["What a good and lovely day.", "This is a terrible, awful day.", "  "])
  assert good > 0.3 and bad < -0.3 and empty == 0.0


def test_resumed_ppo_drops_eval_replies_written_after_the_checkpoint(tmp_path):
  for step in (0, 4, 8):
    ppo.append_eval_replies(str(tmp_path), step, [{"prompt_index": 0, "reply": f"at {step}"}])
  with open(tmp_path / ppo.EVAL_REPLIES_FILE, "a", encoding="utf-8") as f:
    f.write('{"step": 12, "repl')  # torn
  truncate_jsonl_after(str(tmp_path / ppo.EVAL_REPLIES_FILE), 4)  # what the PPO stage does on resume
  assert [r["step"] for r in fileio.read_jsonl_lenient(str(tmp_path / ppo.EVAL_REPLIES_FILE))] == [0, 4]


def test_a_damaged_file_costs_only_its_section(tmp_path):
  _label(tmp_path)
  (tmp_path / "summary.json").write_text(json.dumps({"prompts": 3, "replies_per_prompt": "four", "judge": "vader"}))
  text = pathlib.Path(report.write_report({"label": str(tmp_path)}, str(tmp_path / "r.html"))).read_text(
      encoding="utf-8")
  assert "could not be drawn: TypeError" in _section(text, "labels")
  assert "label/pairs" not in _section(text, "summary") and "prompts 3" in _section(text, "summary")


def test_frontier_fits_both_methods_and_places_the_run_past_the_gold_peak(full_html, pipeline_dir):
  section = _section(full_html, "frontier")
  assert "best-of-n" in section and "PPO" in section
  assert "The run ends past the fitted gold peak: last KL 4.00 nats, peak at KL 1.95 nats" in section
  points = report.frontier_points(report.Run(report.find_stage_dirs(str(pipeline_dir))))
  fits = points.fits()
  bon_gold = fits[("best-of-n", "gold")]
  assert bon_gold.alpha == pytest.approx(0.5) and bon_gold.beta == pytest.approx(0.1)
  assert fits[("PPO", "gold")].alpha == pytest.approx(0.4) and fits[("PPO", "gold")].beta == pytest.approx(0.3)


def test_without_a_gold_judge_the_frontier_shows_the_proxy_and_says_why(tmp_path):
  for stage in ("bon", "ppo"):
    (tmp_path / stage).mkdir()
  _bon(tmp_path / "bon", gold=False)
  _ppo(tmp_path / "ppo", judged=False)
  rows = fileio.read_jsonl_lenient(str(tmp_path / "ppo" / "metrics.jsonl"))
  with open(tmp_path / "ppo" / "metrics.jsonl", "w", encoding="utf-8") as f:
    for row in rows:
      row.pop("eval/gold", None)
      f.write(json.dumps(row) + "\n")
  html = pathlib.Path(report.write_report(report.find_stage_dirs(str(tmp_path)), str(tmp_path / "r.html"))).read_text()
  section = _section(html, "frontier")
  assert "No gold judge" in section and len(_pngs(section)) == 1


def test_reward_model_section_tables_agreement_by_the_labellers_gap(full_html):
  section = re.sub(r"\s+", " ", _section(full_html, "reward-model"))
  assert "<td>all held-out pairs</td><td>0.700</td><td>40</td>" in section
  assert section.index("gap 0-0.25</td><td>0.550") < section.index("gap 1-inf</td><td>0.950")


def test_reply_table_puts_the_best_of_n_pick_next_to_sft_and_ppo(full_html):
  section = _section(full_html, "replies")
  assert "best-of-16 by the RM" in section
  row = next(r for r in section.split("<tr>") if "question 2" in r)
  assert "bon pick 2" in row and "RM +1.500<br>gold +0.250<br>textblob +0.500" in row
