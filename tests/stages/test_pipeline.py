"""`configs/pipeline_cpu.py`: every stage in one command, each in its own sub-folder from the previous one's
checkpoint; re-running skips finished stages and resumes the interrupted one; stages can run alone."""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

from helpers import REPO, check_ok, complete_steps, kill_when, params, run, tiny_stage_flags, write_chats
from helpers import write_corpus

STAGES = ("pretrain", "sft", "label", "reward", "bon", "ppo")


def _argv(workdir: pathlib.Path, data: dict, **extra) -> list[str]:
  flags = {"workdir": workdir}
  for stage in STAGES:
    flags.update({f"{stage}.{k}": v for k, v in tiny_stage_flags(stage, **data).items()})
  flags.update(extra)
  return [sys.executable, "-m", "gptrl.launch", "--config", str(REPO / "configs/pipeline_cpu.py:tiny")] + [
      f"--config.{k}={v}" for k, v in flags.items()]


def _state(workdir: pathlib.Path) -> dict:
  with open(workdir / "pipeline_state.json", encoding="utf-8") as f:
    return json.load(f)


def _rows(workdir: pathlib.Path) -> list[dict]:
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline_data")
  write_corpus(root / "corpus")
  return {"corpus": root / "corpus", "chats": write_chats(root / "chats.jsonl"), "cache": root / "cache"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
  """One whole tiny pipeline run; returns (workdir, its log)."""
  workdir = tmp_path_factory.mktemp("pipeline") / "run"
  result = run(_argv(workdir, data), timeout=600)
  check_ok(result)
  return workdir, result.stderr + result.stdout


def test_every_stage_runs_in_its_subfolder_from_the_previous_checkpoint(finished):
  workdir, log = finished
  assert sorted(_state(workdir)["done"]) == sorted(STAGES)
  for stage in ("pretrain", "sft", "reward", "ppo"):
    assert complete_steps(workdir / stage), f"{stage} left no checkpoint"
  assert (workdir / "label" / "comparisons.jsonl").stat().st_size > 0
  configs = {s: json.loads((workdir / s / "config.json").read_text()) for s in STAGES}
  assert configs["sft"]["init"]["checkpoint"] == str(workdir / "pretrain")
  for stage in ("label", "reward", "bon", "ppo"):
    assert configs[stage]["init"]["checkpoint"] == str(workdir / "sft")
  # Best-of-n is measured on PPO's held-out prompts, reply length and seed.
  assert configs["bon"]["reward_model"]["checkpoint"] == str(workdir / "reward")
  assert configs["bon"]["data"] == configs["ppo"]["data"] and configs["bon"]["seed"] == configs["ppo"]["seed"]
  assert configs["bon"]["bon"]["num_prompts"] == configs["ppo"]["ppo"]["num_eval_prompts"]
  assert configs["bon"]["bon"]["max_new_tokens"] == configs["ppo"]["ppo"]["max_new_tokens"]
  table = json.loads((workdir / "bon" / "bon.json").read_text())
  assert [row["n"] for row in table["rows"]] == [1, 2, 4] and table["gold_judge"] == "length"
  assert table["rows"][0]["kl"] == 0.0 and table["rows"][-1]["proxy"] >= table["rows"][0]["proxy"]
  assert configs["reward"]["data"]["sources"] == [str(workdir / "label" / "comparisons.jsonl")]
  assert configs["ppo"]["reward_model"]["checkpoint"] == str(workdir / "reward")
  report = (workdir / "report.html").read_text(encoding="utf-8")
  for section in ("Loss curves", "Reward model accuracy", "PPO per iteration", "Over-optimisation watch"):
    assert section in report, f"the report lacks its {section!r} section"
  # The stages ran in order: each stage's log line comes after the previous one's.
  positions = [log.index(f"/{len(STAGES)} {s} -> ") for s in STAGES]
  assert positions == sorted(positions)


def test_rerun_skips_finished_stages(finished, data):
  workdir, _ = finished
  before = {s: (workdir / s / "metrics.jsonl").read_bytes() for s in ("pretrain", "sft", "reward", "ppo")}
  result = run(_argv(workdir, data, report=False), timeout=300)
  check_ok(result)
  log = result.stderr + result.stdout
  for i, stage in enumerate(STAGES, start=1):
    assert f"Stage {i}/{len(STAGES)} {stage}: finished on" in log and "skipping" in log
  assert "Resumed from" not in log
  assert {s: (workdir / s / "metrics.jsonl").read_bytes() for s in before} == before


def test_interrupted_stage_resumes_and_ends_as_an_uninterrupted_run(finished, data, tmp_path):
  workdir = tmp_path / "run"
  argv = _argv(workdir, data, stages="('pretrain','sft')", report=False)
  kill_when(argv, workdir / "sft" / "checkpoints" / "4", tmp_path / "killed.log", timeout=300)
  assert sorted(_state(workdir)["done"]) == ["pretrain"]
  result = run(argv, timeout=300)
  check_ok(result)
  log = result.stderr + result.stdout
  assert "Stage 1/2 pretrain: finished on" in log and "Resumed from" in log
  assert sorted(_state(workdir)["done"]) == ["pretrain", "sft"]
  a, b = params(finished[0] / "sft", 12), params(workdir / "sft", 12)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_stage_runs_alone_from_another_runs_checkpoint(finished, data, tmp_path):
  source, _ = finished
  workdir = tmp_path / "run"
  result = run(_argv(workdir, data, stages="('label',)", report=False,
                     **{"label.init.checkpoint": source / "sft"}), timeout=300)
  check_ok(result)
  assert sorted(_state(workdir)["done"]) == ["label"]
  assert not (workdir / "sft").exists()
  # Same checkpoint, seed and settings: the same comparisons as the whole pipeline's labelling stage.
  assert (workdir / "label" / "comparisons.jsonl").read_bytes() == (source / "label" / "comparisons.jsonl").read_bytes()


@pytest.mark.parametrize("extra, message", [
    ({"stages": "('sft','label')"}, "config.sft.init.checkpoint: 'pretrain' is not in config.stages"),
    ({"stages": "('reward','ppo')"}, "config.reward.init.checkpoint: 'sft' is not in config.stages"),
    ({"stages": "('reward',)", "reward.init.checkpoint": "runs/x"}, "config.reward.data.sources: 'label' is not"),
    ({"stages": "('sft','pretrain')"}, "config.stages: must be in pipeline order"),
    ({"stages": "('pretrain','rewards')"}, "Did you mean 'reward'?"),
    ({"ppo.ppo.epochz": 2}, 'Did you mean "epochs"'),
])
def test_config_mistakes_are_refused_before_any_work(data, tmp_path, extra, message):
  result = run(_argv(tmp_path / "run", data, **extra), timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr and "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()


def test_a_second_round_learns_from_feedback_on_the_first_rounds_policy(finished, data, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  from gptrl import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  workdir, _ = finished
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)  # round 1 as the fixture left it; round 2 is added to the copy
  result = run(_argv(copy, data, rounds=2), timeout=600)
  check_ok(result)
  round2 = copy / "round2"
  assert {f"round2/{s}" for s in ("feedback", "sft", "reward", "ppo")} <= set(_state(copy)["done"])
  configs = {s: json.loads((round2 / s / "config.json").read_text()) for s in ("feedback", "sft", "reward", "ppo")}
  assert configs["feedback"]["init"]["checkpoint"] == str(copy / "ppo")  # users talk to round 1's policy
  assert configs["sft"]["init"]["checkpoint"] == str(copy / "pretrain")
  assert configs["sft"]["data"]["sources"][-1] == str(round2 / "feedback" / "demonstrations.jsonl")
  assert configs["reward"]["init"]["checkpoint"] == str(round2 / "sft")
  assert configs["reward"]["data"]["sources"] == [str(copy / "label" / "comparisons.jsonl"),
                                                  str(round2 / "feedback" / "comparisons.jsonl")]
  assert configs["ppo"]["init"]["checkpoint"] == str(round2 / "sft")  # the new reference
  assert configs["ppo"]["policy_init"]["checkpoint"] == str(copy / "ppo")
  assert configs["ppo"]["reward_model"]["checkpoint"] == str(round2 / "reward")
  summary = json.loads((round2 / "feedback" / "summary.json").read_text())
  assert summary["sent"]["rating"] == summary["conversations"] > 0 and summary["records"]["comparisons.jsonl"] > 0
  comparisons = [json.loads(line) for line in (round2 / "feedback" / "comparisons.jsonl").read_text().splitlines()]
  assert {c["labeller"] for c in comparisons} == {"user:simulated:length"}
  assert all(c["model"]["manifest_sha256"] for c in comparisons)  # which policy the users talked to
  # The simulated users are the labelling judge, so round 2's reward model keeps the gold judge.
  meta, _, _ = ckpt_lib.read_checkpoint_meta(str(round2 / "reward"))
  assert meta["gold_judge"] == "length"
  # Round 2 starts from round 1's final policy: its first held-out eval replies are round 1's last ones.
  evals = [[r for r in _rows(folder) if "eval/gold" in r] for folder in (copy / "ppo", round2 / "ppo")]
  assert evals[1][0]["eval/gold"] == evals[0][-1]["eval/gold"]
  report = (copy / "report.html").read_text(encoding="utf-8")
  rounds = report[report.index('id="rounds"'):]
  assert "<td>2</td><td>ppo</td>" in rounds and f"{summary['records']['comparisons.jsonl']} comparisons" in rounds
