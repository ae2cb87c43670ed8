"""GRPO (with Dr. GRPO's and DAPO's options) and RLOO: PPO's learner without a critic, on the synthetic task of
tests/stages/test_ppo.py (a reward for one token), on one device and on a mesh; and their configs' refusals."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptrl import config as config_lib
from gptrl import model as model_lib
from gptrl import reward_model
from gptrl import rewards
from gptrl import sharding
from gptrl.stages import ppo
from gptrl.config import (GRPOAlgoConfig, GRPOConfig, InitConfig, MeshConfig, OptimConfig, RLOOAlgoConfig,
                          RLOOConfig, RSFTAlgoConfig, RSFTConfig, TrainConfig)

import numeric
from test_ppo import NEW, PPO_TOL, VOCAB, _learner, _prompts

OPTIM = OptimConfig(lr=3e-3, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0)


def _cfg(stage: str, **overrides):
  # Four passes over each rollout (as the PPO test): the clipped ratio keeps the later ones near the sampler.
  algo = dict(rollout_batch_size=32, minibatch_size=16, epochs=4, max_new_tokens=NEW, num_eval_prompts=0,
              group_size=4, init_beta=0.01)
  algo.update(overrides)
  if stage == "rsft":  # the 8 winners of 32 replies, in minibatches of 4
    algo.update(minibatch_size=4, init_beta=0.0, **overrides)
    return RSFTConfig(init=InitConfig("unused"), reward_model=InitConfig("unused"), rsft=RSFTAlgoConfig(**algo),
                      optim=OPTIM, train=TrainConfig(steps=12))
  if stage == "grpo":
    return GRPOConfig(init=InitConfig("unused"), reward_model=InitConfig("unused"), grpo=GRPOAlgoConfig(**algo),
                      optim=OPTIM, train=TrainConfig(steps=12))
  return RLOOConfig(init=InitConfig("unused"), reward_model=InitConfig("unused"), rloo=RLOOAlgoConfig(**algo),
                    optim=OPTIM, train=TrainConfig(steps=12))


def _token_texts(prompts, responses):
  """Token ids as words: what the reward functions of tests/sample_rewards.py read in this synthetic task."""
  return ([[{"role": "user", "content": " ".join(map(str, p))}] for p in prompts],
          [" ".join(map(str, r)) for r in responses])


def _train(cfg, iterations, shape=None):
  if shape is None:
    mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  else:
    mesh = sharding.make_mesh(MeshConfig(*shape))
  code = rewards.CodeRewards.from_config(cfg.algo.reward_fns, cfg.algo.reward_fn_weights, cfg.algo.group)
  learner, state = _learner(cfg, mesh, code_rewards=code, texts=_token_texts)
  rows, beta = [], cfg.algo.init_beta
  prompts_per_iteration = cfg.algo.rollout_batch_size // cfg.algo.group_size
  for it in range(iterations):
    result = learner.iteration(state, _prompts(prompts_per_iteration, seed=it), it, beta)
    state, beta = result.state, result.beta
    rows.append(result.row)
  return rows, state, learner


VARIANTS = {
    # (GRPO's KL term slows this 10-iteration task down most; it is exercised in the tests below.)
    "grpo": ("grpo", dict(init_beta=0.0)),
    # Without the std division the advantages are in reward units (here shares of one token, ~0.05 apart): the
    # reward's gain sets the step size, as it does for Dr. GRPO on any reward.
    "dr_grpo": ("grpo", dict(group_std_norm=False, loss_aggregation="sequence_sum", reward_gain=10.0)),
    "dapo": ("grpo", dict(clip_eps_high=0.28, loss_aggregation="token_mean", init_beta=0.0)),
    "rloo": ("rloo", {}),
    "rsft": ("rsft", {}),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def run(request):
  stage, overrides = VARIANTS[request.param]
  cfg = _cfg(stage, **overrides)
  rows, state, learner = _train(cfg, 10)
  return request.param, cfg, rows, state, learner


def test_learns_the_preferred_token_without_a_critic(run):
  name, cfg, rows, state, _ = run
  g = cfg.algo.group
  scores = [round(r[f"{g}/raw_score"], 3) for r in rows]
  assert rows[0][f"{g}/raw_score"] < 0.1, scores  # ~1/32 at random init
  assert max(r[f"{g}/raw_score"] for r in rows[-3:]) > 0.25, (name, scores)
  assert set(state.params) == {"policy"}  # no critic in the train state
  for r in rows:
    assert abs(r[f"{g}/first_ratio"] - 1.0) < 1e-5 and r[f"{g}/first_approx_kl"] < 1e-9
    assert r[f"{g}/sampler_logp_gap"] < 1e-4 and r[f"{g}/value_loss"] == 0.0
    assert r[f"{g}/updates"] == ppo.updates_per_iteration(cfg.algo) and 0.0 <= r[f"{g}/zero_std_groups"] <= 1.0


def test_one_group_per_prompt_and_advantages_that_sum_to_zero_in_each(run):
  _, cfg, _, state, learner = run
  p = cfg.algo
  prompts = _prompts(p.rollout_batch_size // p.group_size, seed=99)
  repeated = [q for q in prompts for _ in range(p.group_size)]
  sampler_params, _ = learner.sampler_params(state.params)
  _, _, host = learner.rollout(sampler_params, repeated, jax.random.key(3), p.group_size)
  np.testing.assert_array_equal(host["group"], np.repeat(np.arange(len(prompts)), p.group_size))
  arrays, stats = learner.score(state.params, host, cfg.algo.init_beta)
  advantage = arrays["advantages"][:, 0].reshape(-1, p.group_size)  # one value per reply, on every token
  length = host["response_mask"].sum(1)
  np.testing.assert_allclose(arrays["advantages"][host["response_mask"] > 0],
                             np.repeat(arrays["advantages"][:, 0], length), rtol=0, atol=0)
  score = stats["score"].reshape(-1, p.group_size)
  if p.advantage == "best_of_n":  # one winner per group: its best reply
    np.testing.assert_array_equal(advantage.sum(1), 1.0)
    np.testing.assert_array_equal(np.argmax(advantage, 1), np.argmax(score, 1))
    return
  np.testing.assert_allclose(advantage.sum(1), 0.0, atol=1e-4)  # a baseline per group
  if p.advantage == "group" and p.group_std_norm:
    expected = (score - score.mean(1, keepdims=True)) / (score.std(1, ddof=1, keepdims=True) + 1e-4)
  elif p.advantage == "group":
    expected = score - score.mean(1, keepdims=True)
  else:  # RLOO: the return is the score minus beta * the reply's summed KL
    ret = score - cfg.algo.init_beta * stats["kl_sum"].reshape(score.shape)
    expected = p.group_size / (p.group_size - 1) * (ret - ret.mean(1, keepdims=True))
  np.testing.assert_allclose(advantage, expected, rtol=1e-4, atol=1e-5)


def test_a_reward_function_alone_teaches_the_preferred_token():
  # reward_gain 0: the synthetic "reward model" (the share of GOOD tokens) is only logged; the reward is the code's.
  cfg = _cfg("grpo", init_beta=0.0, reward_gain=0.0, reward_fns=("sample_rewards:good_share",),
             reward_fn_weights=(2.0,))
  rows, _, learner = _train(cfg, 10)
  code = [round(r["grpo/reward_fn/good_share"], 3) for r in rows]
  assert max(code[-3:]) > 0.25 and code[0] < 0.1, code
  for r in rows:  # the score is the function's, weighted
    np.testing.assert_allclose(r["grpo/reward"], 2.0 * r["grpo/reward_fn/good_share"], rtol=1e-5, atol=1e-6)
  assert max(r["grpo/raw_score"] for r in rows[-3:]) > 0.2  # the proxy rises with it
  metrics = learner.evaluate(_train(cfg, 1)[1].params, _prompts(6, seed=5), 0.0).metrics
  assert 0.0 <= metrics["eval/reward_fn/good_share"] <= 1.0


@pytest.mark.parametrize("stage", ["grpo", "rloo", "rsft"])
def test_sharded_iterations_match_single_device(stage):
  cfg = _cfg(stage)
  single, _, _ = _train(cfg, 2)
  sharded, _, _ = _train(cfg, 2, shape=(2, 2, 2))
  for a, b in zip(single, sharded):
    for k in ("raw_score", "kl", "policy_loss", "approx_kl", "kl_loss", "group_reward_std"):
      numeric.assert_close(b[f"{stage}/{k}"], a[f"{stage}/{k}"], tol=PPO_TOL, atol=1e-5, err_msg=k)



def _grouped_rollout(cfg, seed=11):
  """A GRPO learner, its state, and a scored rollout of runs of group_size replies to prompts of 2-7 tokens
  (left-padded differently), some replies cut short by the stop token."""
  mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  learner, state = _learner(cfg, mesh)
  p = cfg.algo
  repeated = [q for q in _prompts(p.rollout_batch_size // p.group_size, seed=seed) for _ in range(p.group_size)]
  _, _, host = learner.rollout(learner.sampler_params(state.params)[0], repeated, jax.random.key(seed), p.group_size)
  assert (host["response_mask"].sum(1) < NEW).any()  # a reply stopped early: masked response positions
  arrays, _ = learner.score(state.params, host, p.init_beta)
  return learner, state, {**host, **arrays}


def test_a_prompt_read_once_per_group_gives_each_rows_logits_values_and_gradients():
  cfg = _cfg("grpo")
  learner, state, roll = _grouped_rollout(cfg)
  models, g = learner.models, cfg.algo.group_size
  batch = {k: jnp.asarray(v) for k, v in roll.items()}
  per_row = ppo.response_logits(models, state.params["policy"], batch)
  grouped = ppo.response_logits(models, state.params["policy"], batch, g)
  assert grouped.shape == per_row.shape == (32, NEW, VOCAB)
  numeric.assert_close(np.asarray(grouped), np.asarray(per_row), tol=1e-5, err_msg="logits")
  # A value head on the policy's trunk reads the same hidden states.
  shared = dataclasses.replace(models, critic=reward_model.ScalarHead(0.5, name="value_head"), shared=True)
  params = {"policy": state.params["policy"],
            "value": shared.critic.init(jax.random.key(1), jnp.zeros((1, 4, 32)))["params"]}
  want, got = ppo.evaluate_actions(shared, params, batch), ppo.evaluate_actions(shared, params, batch, g)
  for k in ("logp", "values"):
    numeric.assert_close(np.asarray(got[k]), np.asarray(want[k]), tol=1e-5, err_msg=k)
  # The update's gradient through the shared prompt (a sum over its group's rows) is the per-row one's.
  minibatch = {k: batch[k][:16] for k in ppo.ROLLOUT_KEYS}
  minibatch["beta"] = jnp.full((16, 1), 0.05, jnp.float32)
  grads = [jax.grad(lambda q, n=n: ppo.make_ppo_loss(models, cfg, n)(q, minibatch, None)[0])(state.params)
           for n in (1, g)]
  jax.tree.map(lambda a, b: numeric.assert_close(np.asarray(b), np.asarray(a), tol=1e-4, atol=1e-7), *grads)


def test_minibatches_hold_whole_groups_in_every_micro_batch():
  for accum in (1, 2):
    cfg = _cfg("grpo")
    cfg = GRPOConfig(**{**cfg.__dict__, "optim": OptimConfig(**{**OPTIM.__dict__, "grad_accum_steps": accum})})
    learner, state, roll = _grouped_rollout(cfg)
    seen = []
    learner.__dict__["train_step"] = lambda s, mb: (seen.append(np.asarray(mb["tokens"])), (s, {}))[1]
    learner.learn(state, roll, 0.01, jax.random.key(0))
    assert len(seen) == ppo.updates_per_iteration(cfg.algo)
    prompt_len, g = learner.models.prompt_len, cfg.algo.group_size
    for tokens in seen:
      for micro in (tokens[j::accum] for j in range(accum)):  # the trainer's micro-batches
        runs = micro[:, :prompt_len].reshape(-1, g, prompt_len)
        assert (runs == runs[:, :1]).all()  # runs of one prompt
        assert len({r[0].tobytes() for r in runs}) == len(runs)  # whole groups: each prompt in one run
    order = np.concatenate(seen)[:, :prompt_len]
    assert not (order[:32] == roll["tokens"][:, :prompt_len]).all()  # the groups were shuffled


@pytest.mark.parametrize("overrides,shape,want", [
    ({}, None, 4), ({"group_minibatches": False}, None, 1), ({"minibatch_size": 8}, (2, 2, 2), 1),
    ({}, (2, 2, 2), 4), ({"minibatch_size": 2, "rollout_batch_size": 32}, None, 1)])
def test_learn_group_size_needs_whole_groups_per_data_parallel_shard(overrides, shape, want):
  cfg = _cfg("grpo", **overrides)
  mesh = sharding.make_mesh(MeshConfig(*shape)) if shape else sharding.make_mesh(MeshConfig(data=1),
                                                                                 devices=jax.devices()[:1])
  models = _learner(cfg, mesh)[0].models
  assert ppo.learn_group_size(cfg, models, mesh) == want
  # Scoring groups as the updates do (so the first update recomputes the old log-probs by the same code).
  assert ppo.score_group_size(cfg, models, mesh, 32, 4 if shape else 1) == want


def test_splash_plans_and_rejection_sampling_read_every_row_whole():
  mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  cfg = _cfg("grpo")
  models = _learner(cfg, mesh)[0].models
  splash = dataclasses.replace(models, policy=model_lib.GPT(dataclasses.replace(
      models.policy.config, attention="splash", max_len=128)))
  assert ppo.learn_group_size(cfg, models, mesh) == 4 and ppo.learn_group_size(cfg, splash, mesh) == 1
  rsft = _cfg("rsft")
  assert ppo.learn_group_size(rsft, models, mesh) == ppo.score_group_size(rsft, models, mesh, 32, 1) == 1

def test_micro_batching_does_not_change_a_sequence_mean_update():
  rows = []
  for accum in (1, 2):
    cfg = _cfg("grpo")
    cfg = GRPOConfig(**{**cfg.__dict__, "optim": OptimConfig(**{**OPTIM.__dict__, "grad_accum_steps": accum})})
    r, _, _ = _train(cfg, 2)
    rows.append(r)
  for a, b in zip(*rows):
    for k in ("grpo/raw_score", "grpo/policy_loss", "grpo/kl_loss", "grpo/grad_norm"):
      numeric.assert_close(b[k], a[k], tol=PPO_TOL, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("overrides,match", [
    ({"group_size": 1}, r"config.grpo.group_size: must be >= 2 with grpo.advantage='group'"),
    ({"critic": "separate"}, r"config.grpo.critic: must be 'none' with grpo.advantage='group'"),
    ({"rollout_batch_size": 60, "minibatch_size": 30},
     r"config.grpo.rollout_batch_size: must be a multiple of grpo.group_size=8"),
    ({"loss_aggregation": "tokens"}, r"config.grpo.loss_aggregation"),
])
def test_bad_grpo_settings_are_refused_naming_the_key(overrides, match):
  raw = config_lib.as_configdict(GRPOConfig)
  raw.init.checkpoint, raw.reward_model.checkpoint = "sft", "reward"
  for k, v in overrides.items():
    raw.grpo[k] = v
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.stage_config(raw)


def test_rsft_minibatches_must_divide_the_winners():
  raw = config_lib.as_configdict(RSFTConfig)
  raw.init.checkpoint, raw.reward_model.checkpoint = "sft", "reward"
  raw.rsft.rollout_batch_size, raw.rsft.group_size, raw.rsft.minibatch_size = 64, 8, 16
  with pytest.raises(config_lib.ConfigError, match=r"config.rsft.minibatch_size: must divide the 8 winners"):
    config_lib.stage_config(raw)


def test_gae_without_a_critic_is_refused_in_ppo():
  raw = config_lib.as_configdict(config_lib.PPOConfig)
  raw.init.checkpoint, raw.reward_model.checkpoint = "sft", "reward"
  raw.ppo.critic = "none"
  with pytest.raises(config_lib.ConfigError, match=r"config.ppo.critic: is 'none', but ppo.advantage='gae'"):
    config_lib.stage_config(raw)
