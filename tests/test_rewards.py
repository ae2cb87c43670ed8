"""Rewards as code (gptrl/rewards.py): loading by name, the weighted sum, and one clear error for each misuse."""
import numpy as np
import pytest

from gptrl import config as config_lib
from gptrl import rewards

PROMPTS = [[{"role": "user", "content": "a b c"}], [{"role": "system", "content": "s"},
                                                     {"role": "user", "content": "d e"}]]
REPLIES = ["7 7 x", "y"]


def test_weighted_sum_of_functions_and_each_ones_scores():
  code = rewards.CodeRewards.from_config(("sample_rewards:good_share", "sample_rewards:prompt_words"), (2.0, -0.5),
                                         "grpo")
  total, each = code(PROMPTS, REPLIES)
  np.testing.assert_allclose(each["good_share"], [2 / 3, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(each["prompt_words"], [3.0, 2.0])
  np.testing.assert_allclose(total, [2 * 2 / 3 - 1.5, -1.0], rtol=1e-6)
  assert total.dtype == np.float32


def test_no_functions_is_none_and_weights_default_to_one():
  assert rewards.CodeRewards.from_config((), (), "ppo") is None
  code = rewards.CodeRewards.from_config(("sample_rewards:good_share", "sample_rewards:good_share"), (), "ppo")
  assert code.weights == (1.0, 1.0) and code.names == ("good_share_0", "good_share_1")


@pytest.mark.parametrize("spec,match", [
    ("no_such_module_xyz:f", r"config.ppo.reward_fns\[0\]: cannot import module 'no_such_module_xyz'"),
    ("sample_rewards:missing", r"config.ppo.reward_fns\[0\]: module 'sample_rewards' .* has no 'missing'"),
    ("sample_rewards:NOT_A_FUNCTION", r"'sample_rewards:NOT_A_FUNCTION' is a int, not a function"),
    ("sample_rewards.good_share", r"is not 'package.module:function'"),
])
def test_a_function_that_cannot_be_loaded_is_named(spec, match):
  with pytest.raises(rewards.RewardFnError, match=match):
    rewards.CodeRewards.from_config((spec,), (), "ppo")


@pytest.mark.parametrize("name,match", [
    ("one_short", r"'sample_rewards:one_short' returned shape \(1,\) for 2 replies"),
    ("not_finite", r"'sample_rewards:not_finite' returned nan for reply 0 \(2 non-finite"),
    ("raises", r"'sample_rewards:raises' raised KeyError"),
])
def test_a_bad_result_is_refused_naming_the_function(name, match):
  code = rewards.CodeRewards.from_config((f"sample_rewards:{name}",), (), "ppo")
  with pytest.raises(rewards.RewardFnError, match=match):
    code(PROMPTS, REPLIES)


def test_config_checks_the_names_and_the_weights():
  raw = config_lib.as_configdict(config_lib.GRPOConfig)
  raw.init.checkpoint, raw.reward_model.checkpoint = "sft", "reward"
  raw.grpo.reward_fns = ("pkg.mod:fn", "bad name")
  with pytest.raises(config_lib.ConfigError, match=r"config.grpo.reward_fns\[1\]: must name a function"):
    config_lib.stage_config(raw)
  raw.grpo.reward_fns = ("pkg.mod:fn",)
  raw.grpo.reward_fn_weights = (1.0, 2.0)
  with pytest.raises(config_lib.ConfigError, match=r"config.grpo.reward_fn_weights: must give one weight per"):
    config_lib.stage_config(raw)
