"""The loop's `feedback` stage without a model: users' feedback folders gathered and checked, simulated users
counted as their judge, the round settings refused when they cannot work, and a later round's policy start
refused when it is not a policy. (Simulated users against a served policy, and a whole second round, run in
tests/stages/test_pipeline.py.)"""
from __future__ import annotations

import json

import pytest

from gptrl import chat_data
from gptrl import config as config_lib
from gptrl import feedback as feedback_lib
from gptrl.stages import feedback as feedback_stage
from gptrl.stages import ppo
from helpers import make_tiny_checkpoint

_HELLO = [{"role": "user", "content": "Where does the king walk?"}]


def _store(folder, *bodies):
  """A feedback folder as gptrl.serve writes it."""
  store = feedback_lib.FeedbackStore(str(folder))
  for i, body in enumerate(bodies):
    store.add(*feedback_lib.records_of({"id": f"f{i}", "messages": _HELLO, **body}, {}))
  store.close()
  return folder


def test_users_feedback_folders_are_gathered_into_the_rounds_data(tmp_path):
  a = _store(tmp_path / "a", {"type": "comparison", "replies": ["To the market.", "No."], "preferred": 0},
             {"type": "edit", "reply": "No.", "edited": "At dawn, to the market."})
  b = _store(tmp_path / "b", {"type": "rating", "reply": "No.", "rating": -1})
  cfg = config_lib.FeedbackConfig(workdir=str(tmp_path / "out"), sources=(str(a), str(b)))
  (tmp_path / "out").mkdir()
  counts = feedback_stage.gather(cfg, str(tmp_path / "out"))
  assert counts == {"comparisons.jsonl": 2, "demonstrations.jsonl": 1, "ratings.jsonl": 1}
  groups = chat_data.load_comparisons([str(tmp_path / "out" / "comparisons.jsonl")], max_responses=4)
  assert sum(len(g.pairs) for g in groups) == 2 and {g.labellers[0] for g in groups} == {"user"}

  with open(b / "comparisons.jsonl", "a", encoding="utf-8") as f:
    f.write(json.dumps({"messages": _HELLO, "responses": ["a", "a"], "ranking": [0, 1]}) + "\n")
  with pytest.raises(config_lib.ConfigError, match=r"comparisons.jsonl:\d+: field 'responses' holds the same text"):
    feedback_stage.gather(cfg, str(tmp_path / "out"))
  with pytest.raises(config_lib.ConfigError, match="is not a folder"):
    feedback_stage.gather(config_lib.FeedbackConfig(workdir="x", sources=(str(tmp_path / "nope"),)), str(tmp_path))


def test_simulated_users_count_as_their_judge_and_people_as_themselves():
  assert chat_data.record_labeller({"labeller": "user:simulated:vader"}) == "judge:vader"
  assert chat_data.record_labeller({"labeller": "user:ann"}) == "user:ann"
  assert chat_data.record_labeller({"labeller": "user:simulated:"}) == "user:simulated:"
  assert chat_data.record_labeller({"judge": "length", "labeller": "user"}) == "judge:length"


@pytest.mark.parametrize("changes, field, message", [
    ({"rounds": 2, "stages": ("pretrain", "sft", "label", "reward", "bon")}, "stages", "must include"),
    ({"rounds": 2, "round_policy": "dpo"}, "round_policy", "must be one of"),
    ({"rounds": 0}, "rounds", "must be >= 1"),
    ({"stages": ("pretrain", "sft", "label", "reward", "ppo", "feedback")}, "stages", "runs in the rounds after"),
])
def test_round_settings_that_cannot_work_are_refused(changes, field, message):
  with pytest.raises(config_lib.ConfigError, match=rf"config.{field}.*{message}"):
    config_lib.PipelineConfig(**changes)


def test_a_policy_start_that_is_not_a_policy_run_is_refused(tmp_path):
  sft = make_tiny_checkpoint(tmp_path / "sft", ["the king walks to the market at dawn"] * 50)
  cfg = config_lib.PPOConfig(init=config_lib.InitConfig(checkpoint=str(sft)),
                             reward_model=config_lib.RewardModelConfig(checkpoint=str(sft)),
                             policy_init=config_lib.InitConfig(checkpoint=str(sft)))
  with pytest.raises(config_lib.ConfigError, match="stage 'sft'; it must be a policy run"):
    ppo.check_policy_init(cfg)
  with pytest.raises(config_lib.ConfigError, match="config.policy_init.checkpoint"):
    ppo.check_policy_init(config_lib.PPOConfig(
        init=cfg.init, reward_model=cfg.reward_model, policy_init=config_lib.InitConfig(str(tmp_path / "none"))))
