"""The PPO learner on a tiny synthetic task (a reward that prefers one token), on one device and on a mesh, and
the rollout layout it relies on."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptrl import model as model_lib
from gptrl import optim
from gptrl import reward_model
from gptrl import sharding
from gptrl import trainer
from gptrl.config import MeshConfig, ModelConfig, OptimConfig, PPOAlgoConfig, PPOConfig, InitConfig, TrainConfig
from gptrl import checkpoint as ckpt_lib
from gptrl import config as config_lib
from gptrl.stages import ppo

import numeric

VOCAB, GOOD, STOP, PAD = 32, 7, 5, 0
NEW = 6
# Sharded or split PPO against one device: two whole iterations (the second samples from the updated policy, so
# a token drawn near a tie can differ), compared on their scalar metrics.
PPO_TOL = 2e-3


def _cfg(**ppo_overrides) -> PPOConfig:
  algo = dict(rollout_batch_size=32, minibatch_size=16, epochs=4, max_new_tokens=NEW, init_beta=0.02, target_kl=0.0,
              critic="shared", critic_init="sft", value_head_init_std=0.01, vf_coef=0.5, num_eval_prompts=0)
  algo.update(ppo_overrides)
  return PPOConfig(init=InitConfig("unused"), reward_model=InitConfig("unused"), ppo=PPOAlgoConfig(**algo),
                   optim=OptimConfig(lr=3e-3, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0),
                   train=TrainConfig(steps=12))


def good_token_share(rm_params, batch):
  """Synthetic reward: the share of response tokens equal to GOOD."""
  del rm_params
  mask = batch["response_mask"].astype(jnp.float32)
  hits = (batch["tokens"][:, -NEW:] == GOOD).astype(jnp.float32) * mask
  return jnp.sum(hits, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def _learner(cfg: PPOConfig, mesh, placement=None, ptx_iter=None, code_rewards=None, texts=None):
  model_cfg = ModelConfig(vocab_size=VOCAB, num_layers=1, num_heads=2, d_model=32, max_len=16)
  prompt_len = model_cfg.max_len - NEW
  critic = None if cfg.algo.critic == "none" else reward_model.ScalarHead(0.01, name="value_head")
  models = ppo.Models(policy=model_lib.GPT(model_cfg), critic=critic, reward=reward_model.ScalarHeadModel(model_cfg),
                      shared=critic is not None, prompt_len=prompt_len, new_tokens=NEW,
                      temperature=cfg.algo.temperature)
  optimizer = optim.make_optimizer(cfg.optim, 100)
  state, shardings = trainer.create_train_state(lambda rng: ppo.init_params(models, rng), optimizer, 0, mesh)
  ref = jax.tree.map(lambda x: jnp.array(x, copy=True), state.params["policy"])
  if placement is not None:  # the reference lives on the frozen models' mesh
    _, scorer_shardings = ckpt_lib.param_shardings(models.policy, jnp.zeros((1, 16), jnp.int32), placement.scorer)
    ref = jax.device_put(ref, scorer_shardings)
  learner = ppo.Learner(cfg, models, mesh, optimizer, shardings, ref, None,
                        ppo.make_score_fn(models, cfg, 0.0, raw_score_fn=good_token_share), pad_id=PAD, stop_id=STOP,
                        placement=placement, ptx_iter=ptx_iter, code_rewards=code_rewards, texts=texts)
  return learner, state


def _prompts(n=32, seed=0):
  rng = np.random.default_rng(seed)
  return [list(rng.integers(8, VOCAB, rng.integers(2, 8))) for _ in range(n)]


def _train(shape, iterations, **placement):
  cfg = _cfg(**placement)
  plan = None
  if placement:
    plan = ppo.make_placement(MeshConfig(*shape), cfg.ppo)
    mesh = plan.learner
  elif shape is None:
    mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  else:
    mesh = sharding.make_mesh(MeshConfig(*shape))
  learner, state = _learner(cfg, mesh, plan)
  rows, beta = [], cfg.ppo.init_beta
  for it in range(iterations):
    result = learner.iteration(state, _prompts(seed=it), it, beta)
    state, beta = result.state, result.beta
    rows.append(result.row)
  return rows, state


@pytest.fixture(scope="module")
def single_device_run():
  return _train(None, 10)


def test_learns_the_preferred_token(single_device_run):
  rows, _ = single_device_run
  first, last = rows[0]["ppo/raw_score"], max(r["ppo/raw_score"] for r in rows[-3:])
  assert first < 0.1, first  # ~1/32 at random init
  assert last > 0.25, [round(r["ppo/raw_score"], 3) for r in rows]
  assert rows[-1]["ppo/kl"] > 0.05  # it moved away from the reference to get there


def test_invariants_hold_every_iteration(single_device_run):
  rows, _ = single_device_run
  for r in rows:
    assert abs(r["ppo/first_ratio"] - 1.0) < 1e-5 and r["ppo/first_approx_kl"] < 1e-9
    assert r["ppo/sampler_logp_gap"] < 1e-4
    assert r["ppo/skipped"] == 0 and r["ppo/updates"] == 8


def test_sharded_iterations_match_single_device(single_device_run):
  rows, _ = single_device_run
  mesh_rows, _ = _train((2, 2, 2), 2)
  for a, b in zip(rows[:2], mesh_rows):
    for k in ("ppo/raw_score", "ppo/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/approx_kl"):
      numeric.assert_close(b[k], a[k], tol=PPO_TOL, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("sampler_devices,scorer_devices", [(4, 0), (2, 2)])
def test_split_placement_matches_single_device(single_device_run, sampler_devices, scorer_devices):
  # 8 devices: the learner on 4 (data 2, fsdp 2), the sampler on the next ones and, with scorer_devices, the
  # frozen models on the last 2 (else on the learner's mesh).
  rows, _ = single_device_run
  split_rows, _ = _train((2, 2, 1), 2, placement="split", sampler_devices=sampler_devices,
                         scorer_devices=scorer_devices)
  for a, b in zip(rows[:2], split_rows):
    for k in ("ppo/raw_score", "ppo/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/approx_kl"):
      numeric.assert_close(b[k], a[k], tol=PPO_TOL, atol=1e-5, err_msg=k)
    assert b["time/weight_sync_s"] > 0 and b["ppo/sampler_logp_gap"] < 1e-4


def test_split_placement_puts_each_model_on_its_own_devices():
  cfg = _cfg(placement="split", sampler_devices=2, scorer_devices=2)
  plan = ppo.make_placement(MeshConfig(data=2, fsdp=2), cfg.ppo)
  groups = [set(m.devices.flat) for m in (plan.learner, plan.sampler, plan.scorer)]
  assert [len(g) for g in groups] == [4, 2, 2] and len(set.union(*groups)) == 8
  learner, state = _learner(cfg, plan.learner, plan)
  devices_of = lambda tree: set().union(*(x.sharding.device_set for x in jax.tree.leaves(tree)))
  assert devices_of(state.params) == groups[0]
  assert devices_of(learner.sampler_params(state.params)[0]) == groups[1]
  assert devices_of(learner.ref_params) == groups[2]
  with pytest.raises(config_lib.ConfigError, match="ppo.sampler_devices"):
    ppo.make_placement(MeshConfig(), _cfg(placement="split", sampler_devices=6, scorer_devices=2).ppo)
  with pytest.raises(config_lib.ConfigError, match="ppo.placement"):
    _cfg(sampler_devices=2)  # colocated with sampler devices: a config mistake


def test_rollout_layout_matches_the_sampler():
  prompts = [[9, 10, 11], [12]]
  responses = [[20, 21, STOP], [22, 23, 24, 25, 26, 27]]
  batch = ppo.build_rollout_batch(prompts, responses, prompt_len=4, new_tokens=NEW, pad_id=PAD, stop_id=STOP)
  assert batch["tokens"].tolist() == [[0, 9, 10, 11, 20, 21, STOP, 0, 0, 0], [0, 0, 0, 12, 22, 23, 24, 25, 26, 27]]
  assert batch["attention"].tolist() == [[0, 1, 1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]]
  assert batch["positions"][0, 1:7].tolist() == list(range(6)) and batch["positions"][1, 3:].tolist() == list(range(7))
  assert batch["response_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
  assert batch["truncated"].tolist() == [0, 1]


def test_a_tempered_sampler_is_scored_at_its_temperature():
  # At temperature 0.6 the sampler's log-probs are the scorer's (no gap) and the KL starts at 0: the ratio, KL
  # and sampler all use softmax(logits / T) for the policy and the reference.
  cfg = _cfg(temperature=0.6)
  learner, state = _learner(cfg, sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))
  row = learner.iteration(state, _prompts(), 0, cfg.ppo.init_beta).row
  assert row["ppo/sampler_logp_gap"] < 1e-4 and abs(row["ppo/mismatch_kl"]) < 1e-5
  assert abs(row["ppo/kl"]) < 1e-4 and abs(row["ppo/first_ratio"] - 1.0) < 1e-5


# A reply's weight is the product of its tokens' (each about the nucleus's mass, 0.7 here): masking it needs a
# threshold that 6 tokens' product stays within.
@pytest.mark.parametrize("mode,threshold", [("token_truncate", 1.5), ("sequence_mask", 20.0)])
def test_a_truncated_sampler_is_corrected_by_importance_weights(mode, threshold):
  cfg = _cfg(top_p=0.7, is_correction=mode, is_threshold=threshold)
  learner, state = _learner(cfg, sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))
  rows = []
  for it in range(2):
    result = learner.iteration(state, _prompts(seed=it), it, cfg.ppo.init_beta)
    state = result.state
    rows.append(result.row)
  for row in rows:
    # The sampler draws from the nucleus: each token is likelier under it than under the whole softmax.
    assert row["ppo/mismatch_kl"] > 0.01 and row["ppo/sampler_logp_gap"] > 0.01
    assert 0.0 < row["ppo/is_weight"] <= threshold and 0.0 <= row["ppo/is_corrected"] <= 1.0
    assert np.isfinite(row["ppo/policy_loss"]) and row["ppo/skipped"] == 0


def test_truncated_sampling_without_a_correction_is_refused():
  raw = config_lib.as_configdict(PPOConfig)
  raw.init.checkpoint, raw.reward_model.checkpoint = "sft", "reward"
  raw.ppo.top_k = 40
  with pytest.raises(config_lib.ConfigError, match=r"config.ppo.is_correction: is 'none', but ppo.top_k=40"):
    config_lib.stage_config(raw)


def test_kl_in_loss_and_full_kl_options_run():
  mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  for overrides in (dict(kl_in_reward=False, kl_estimator="k3"), dict(kl_estimator="full", whiten_rewards=True)):
    cfg = dataclasses.replace(_cfg(**overrides), train=TrainConfig(steps=1))
    learner, state = _learner(cfg, mesh)
    row = learner.iteration(state, _prompts(), 0, 0.1).row
    assert np.isfinite(row["ppo/policy_loss"]) and abs(row["ppo/first_ratio"] - 1) < 1e-5


def test_saved_rollouts_read_back_through_grain(tmp_path):
  import grain  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  iters = {it: {"tokens": rng.integers(0, 9, (n, 10)).astype(np.int32),
                "logp": rng.normal(size=(n, 6)).astype(np.float32)} for it, n in ((3, 2), (4, 3))}
  for it, arrays in iters.items():
    ppo.save_rollout(str(tmp_path), it, arrays)
  source = ppo.RolloutSource(str(tmp_path))
  records = list(grain.MapDataset.source(source))
  assert len(records) == 5 and [int(r["iteration"]) for r in records] == [3, 3, 4, 4, 4]
  np.testing.assert_array_equal(records[3]["tokens"], iters[4]["tokens"][1])
  np.testing.assert_array_equal(records[1]["logp"], iters[3]["logp"][1])


def test_ptx_mixes_a_pretraining_loss_into_each_update():
  mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  cfg = dataclasses.replace(_cfg(ptx_coef=0.5), train=TrainConfig(steps=1))
  rng = np.random.default_rng(0)

  def batches():
    while True:
      tokens = rng.integers(1, VOCAB, (16, 17)).astype(np.int32)
      yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((16, 16), np.float32)}
  learner, state = _learner(cfg, mesh, ptx_iter=batches())
  row = learner.iteration(state, _prompts(), 0, 0.1).row
  # A random-init model's next-token loss on uniform tokens is about log(VOCAB).
  assert abs(row["ppo/ptx_loss"] - np.log(VOCAB)) < 0.5 and abs(row["ppo/first_ratio"] - 1) < 1e-5


def test_eval_replies_get_gold_and_watch_judge_scores_from_fake_judges():
  replies = [{"reply": "a"}, {"reply": "bbb"}, {"reply": "cc"}]
  gold = lambda texts: [float(len(t)) for t in texts]  # a fake labeller with known scores
  watch = {"first": lambda texts: [1.0 if t.startswith("b") else -1.0 for t in texts]}
  metrics = ppo.judge_replies(replies, gold, watch)
  assert metrics["eval/gold"] == pytest.approx(2.0) and metrics["eval/gold_std"] == pytest.approx(np.std([1, 3, 2]))
  assert metrics["eval/judge_first"] == pytest.approx(-1 / 3)
  assert [r["gold"] for r in replies] == [1.0, 3.0, 2.0]
  assert [r["judges"]["first"] for r in replies] == [-1.0, 1.0, -1.0]


def test_without_a_gold_judge_only_watch_judges_are_scored():
  replies = [{"reply": "a"}]
  metrics = ppo.judge_replies(replies, None, {"n": lambda texts: [5.0] * len(texts)})
  assert "eval/gold" not in metrics and "gold" not in replies[0] and metrics["eval/judge_n"] == 5.0


@pytest.mark.parametrize("context", [0, 9])
def test_rm_scores_a_rollout_as_it_scored_its_training_sequences(context):
  """PPO's rollout layout (left-padded prompt, right-padded reply) against the RM's own training layout (prompt +
  reply + <|end|>, right-padded; cut to the RM's `context` as chat_data does): the same scores. A reply cut at
  max_new_tokens gets the <|end|> every training reply ends with; a finished one already has it."""
  model_cfg = ModelConfig(vocab_size=VOCAB, num_layers=1, num_heads=2, d_model=32, max_len=16)
  rm = reward_model.ScalarHeadModel(model_cfg, head_init_std=0.5)
  rm_params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x,
                           rm.init(jax.random.key(1), jnp.zeros((1, 16), jnp.int32))["params"],
                           is_leaf=lambda x: hasattr(x, "unbox"))
  prompt_len = model_cfg.max_len - NEW
  models = ppo.Models(policy=None, critic=None, reward=rm, shared=False, prompt_len=prompt_len, new_tokens=NEW,
                      reward_context=context, end_id=STOP)
  prompts = [[9, 10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
  replies = [[22, 23, STOP], [24, 25, 26, 27, 28, 29]]  # finished; cut at NEW tokens
  batch = ppo.build_rollout_batch(prompts, replies, prompt_len=prompt_len, new_tokens=NEW, pad_id=PAD, stop_id=STOP)
  got = np.asarray(ppo.reward_model_score(models, rm_params, {k: jnp.asarray(v) for k, v in batch.items()}))[:, 0]
  expected = []
  for prompt, reply in zip(prompts, replies):
    seq = prompt + (reply if reply[-1] == STOP else reply + [STOP])
    seq = seq[-(context or 16):]  # a full row loses the prompt's earliest token to the <|end|>
    tokens = np.full((1, 1, 16), PAD, np.int32)
    tokens[0, 0, :len(seq)] = seq
    expected.append(float(reward_model.sequence_scores(rm, rm_params, jnp.asarray(tokens),
                                                       jnp.array([[len(seq) - 1]]))[0, 0]))
  numeric.assert_close(got, np.asarray(expected))


def test_a_rollback_restores_the_policy_and_beta_of_the_checkpoint(tmp_path):
  # train.max_bad_steps (8) skipped minibatch updates in a row, all in the iteration just run (4 epochs x 2
  # minibatches): params, optimizer state and the KL coefficient go back to the checkpoint from before it.
  from gptrl import loop  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  cfg = _cfg()
  learner, state = _learner(cfg, mesh)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  task = ppo.PPOTask(cfg, learner, prompts=ppo.Prompts(_prompts(), seed=0, batch=32), eval_prompts=[], beta=0.5,
                     tok=None, checkpointer=checkpointer, meta={"stage": "ppo"}, fingerprint="f",
                     fingerprint_parts={}, workdir=str(tmp_path))
  saved = jax.device_get(state.params)
  task.save(state, 1)
  task.beta = 0.9
  bad = state.replace(params=jax.tree.map(lambda x: x + 1.0, state.params),
                      numerics=state.numerics.replace(bad_streak=jnp.int32(8), skipped_total=jnp.int32(8)))
  restored, _, rolled_back = task.check(bad, 3, loop.Outcome(bad, {"ppo/reward": 0.0}))
  assert rolled_back and task.beta == 0.5
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), saved)
  counts = jax.device_get(restored.numerics)
  assert int(counts.rollbacks) == 1 and int(counts.bad_streak) == 0 and int(counts.skipped_total) == 8
  # One update short of the limit: nothing happens.
  almost = bad.replace(numerics=bad.numerics.replace(bad_streak=jnp.int32(7)))
  same, _, rolled_back = task.check(almost, 4, loop.Outcome(almost, {}))
  assert not rolled_back and same is almost
  checkpointer.close()


@pytest.mark.parametrize("threshold, updates", [(1e-9, 2), (1e9, 16)])
def test_max_approx_kl_stops_the_updates_after_the_minibatch_that_exceeds_it(threshold, updates):
  # 4 minibatches per epoch, 4 epochs. The first minibatch sees approximate KL 0 (the rollout's own parameters);
  # the second, after one update, more than 1e-9: the iteration stops there, mid-epoch, after 2 updates.
  mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  cfg = dataclasses.replace(_cfg(minibatch_size=8, max_approx_kl=threshold), train=TrainConfig(steps=1))
  learner, state = _learner(cfg, mesh)
  row = learner.iteration(state, _prompts(), 0, 0.1).row
  assert row["ppo/updates"] == updates and row["ppo/early_stopped"] == float(updates < 16)


def test_the_ptx_stream_resumes_where_its_checkpointed_position_says(tmp_path):
  # PPO-ptx's pretraining batches: a stream rebuilt from a saved position continues exactly where the first one
  # was, as a resumed PPO run's must (the position is in the checkpoint's data item).
  from gptrl import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  from helpers import write_corpus  # pylint: disable=import-outside-toplevel
  write_corpus(tmp_path / "corpus")
  texts = [p.read_text(encoding="utf-8") for p in sorted((tmp_path / "corpus").iterdir())]
  tok = tokenizer_lib.train_tokenizer(texts, tmp_path / "t.model", vocab_size=300)
  cfg = _cfg(ptx_coef=0.5, ptx_sources=(str(tmp_path / "corpus"),), minibatch_size=8)
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_dir=str(tmp_path / "cache")))
  stream = ppo.ptx_stream(cfg, tok, 16, str(tmp_path / "cache"), None)
  for _ in range(3):
    next(stream)
  position = stream.get_state()
  expected = [next(stream) for _ in range(2)]
  resumed = ppo.ptx_stream(cfg, tok, 16, str(tmp_path / "cache"), position)
  for want in expected:
    got = next(resumed)
    assert sorted(got) == ["inputs", "targets", "weights"] and got["inputs"].shape == (8, 16)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert ppo.ptx_stream(dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, ptx_coef=0.0)), tok, 16,
                        str(tmp_path / "cache"), None) is None


def test_minibatch_shapes_are_what_learn_feeds_the_update():
  """ppo.minibatch_shapes (what gptrl/compile.py compiles the PPO update for) against the minibatches of a real
  iteration, with and without PPO-ptx."""
  mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  cfg = _cfg()
  learner, state = _learner(cfg, mesh)
  seen = []
  step = learner.train_step
  learner.train_step = lambda s, mb: (seen.append({k: (v.shape, v.dtype) for k, v in mb.items()}), step(s, mb))[1]
  learner.iteration(state, _prompts(), 0, cfg.ppo.init_beta)
  assert seen and all(mb == ppo.minibatch_shapes(cfg, learner.models, 16) for mb in seen)
  ptx = _cfg(ptx_coef=0.1)
  assert set(ppo.minibatch_shapes(ptx, learner.models, 16)) - set(seen[0]) == {"ptx_inputs", "ptx_targets",
                                                                               "ptx_weights"}
