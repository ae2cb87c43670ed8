"""Comparisons -> grouped pairs, the Bradley-Terry loss against NumPy, the scalar head, the judge."""
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptrl import chat
from gptrl import chat_data
from gptrl import judges
from gptrl import losses
from gptrl import reward_model
from gptrl import tokenizer as tokenizer_lib
from gptrl.config import ModelConfig
from gptrl.data import DataError

import numeric


def _write(path, records):
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
  return str(path)


def test_ranking_gives_all_pairs_in_one_group(tmp_path):
  path = _write(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["a", "b", "c", "d"], "ranking": [2, 0, 3, 1]}])
  [group] = chat_data.load_comparisons([path], max_responses=4)
  assert group.responses == ["a", "b", "c", "d"]
  # best first: c > a > d > b, all K(K-1)/2 = 6 pairs
  assert sorted((w, l) for w, l, _ in group.pairs) == sorted([(2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1)])


def test_pairwise_records_of_one_prompt_are_merged_and_split_at_k(tmp_path):
  msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
  recs = [{"messages": msgs, "chosen": "a", "rejected": "b"}, {"messages": msgs, "chosen": "c", "rejected": "a"},
          {"prompt": "other", "chosen": "x", "rejected": "y", "margin": 0.5},
          {"messages": msgs, "chosen": "d", "rejected": "e"}]
  groups = chat_data.load_comparisons([_write(tmp_path / "p.jsonl", recs)], max_responses=3)
  assert [g.responses for g in groups] == [["a", "b", "c"], ["x", "y"], ["d", "e"]]
  assert groups[0].pairs == [(0, 1, 0.0), (2, 0, 0.0)] and groups[1].pairs == [(0, 1, 0.5)]
  assert groups[0].where[1].endswith("p.jsonl:2")
  enc = chat_data.encode_comparisons(groups, _tok(tmp_path), max_len=32, max_responses=3)
  assert enc.tokens.shape == (3, 3, 32) and enc.pairs[0, 2, 0] == 1 and enc.pairs.sum() == 4
  assert enc.margins[1, 0, 1] == 0.5
  # The reward is read at the response's <|end|> token; the response starts at `first`, after the prompt.
  assert all(enc.tokens[0, r, enc.last[0, r]] == tokenizer_lib.END_OF_TURN_ID for r in range(3))
  tok = _tok(tmp_path)
  for r, response in enumerate(["a", "b", "c"]):
    reply = chat.encode_content(response, tok) + [tokenizer_lib.END_OF_TURN_ID]
    assert enc.tokens[0, r, enc.first[0, r]:enc.last[0, r] + 1].tolist() == reply


_TOK = {}


def _tok(tmp_path):
  if "t" not in _TOK:
    rng = random.Random(0)
    words = "good day to you my lord what say thou the king".split()
    docs = [" ".join(rng.choice(words) for _ in range(300)) for _ in range(3)]
    _TOK["t"] = tokenizer_lib.train_tokenizer(docs, tmp_path / "t.model", vocab_size=300)
  return _TOK["t"]


@pytest.mark.parametrize("record,message", [
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "are the same text"),
    ({"prompt": "p", "chosen": "a"}, "'rejected' is missing"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "'chosen' must be a non-empty string"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1]}, "'ranking' must list the indices 0..2"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}, "'ranking' must list"),
    ({"prompt": "p", "responses": ["a", "a"], "ranking": [0, 1]}, "same text twice"),
    ({"prompt": "p", "responses": ["a", "b", "c", "d", "e"], "ranking": [0, 1, 2, 3, 4]}, "max_responses=4"),
    ({"chosen": "a", "rejected": "b"}, "exactly one of 'prompt'"),
    ({"prompt": "p", "answer": "a"}, "expected {'prompt' or 'messages', 'chosen', 'rejected'}"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "'margin' must be a number"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}], "chosen": "a",
      "rejected": "b"}, "last turn is the assistant's"),
])
def test_bad_comparison_lines_name_file_and_line(tmp_path, record, message):
  path = _write(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "x", "rejected": "y"}, record])
  with pytest.raises(DataError) as e:
    chat_data.load_comparisons([path], max_responses=4)
  assert f"{path}:2" in str(e.value) and message in str(e.value)


def _bt_numpy(r, pairs, margins, scale):
  """float64 reference: per prompt, the mean over its pairs of -log sigmoid(r_w - r_l - scale * m)."""
  r = r.astype(np.float64)
  loss = acc = 0.0
  n_prompts = 0
  for b in range(r.shape[0]):
    items = [(i, j, pairs[b, i, j]) for i in range(r.shape[1]) for j in range(r.shape[1]) if pairs[b, i, j]]
    if not items:
      continue
    n_prompts += 1
    total = sum(c for _, _, c in items)
    for i, j, c in items:
      d = r[b, i] - r[b, j] - scale * margins[b, i, j]
      loss += c / total * np.log1p(np.exp(-d))
      acc += c / total * float(r[b, i] > r[b, j])
  return loss, acc, n_prompts


@pytest.mark.parametrize("scale", [0.0, 0.7])
def test_bradley_terry_against_numpy(scale):
  rng = np.random.default_rng(0)
  r = rng.normal(size=(5, 4)).astype(np.float32) * 3
  pairs = np.zeros((5, 4, 4), np.float32)
  pairs[0, 0, 1] = pairs[0, 2, 1] = pairs[0, 0, 3] = 1
  pairs[1, 3, 0] = 1
  pairs[2] = np.triu(np.ones((4, 4)), 1)  # a full ranking 0 > 1 > 2 > 3
  pairs[4, 1, 2] = 2  # the same pair seen twice counts twice within its prompt; row 3 has no pairs
  margins = rng.uniform(size=(5, 4, 4)).astype(np.float32)
  loss_sum, sums = losses.bradley_terry(jnp.asarray(r), jnp.asarray(pairs), jnp.asarray(margins), margin_scale=scale)
  ref_loss, ref_acc, n = _bt_numpy(r, pairs, margins, scale)
  np.testing.assert_allclose(float(loss_sum), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(float(sums["accuracy"]), ref_acc, rtol=1e-6)
  assert float(sums["weight"]) == n == 4
  # Gradient against central differences of the float64 reference.
  grad = np.asarray(jax.grad(lambda x: losses.bradley_terry(x, jnp.asarray(pairs), jnp.asarray(margins),
                                                            margin_scale=scale)[0])(jnp.asarray(r)))
  eps = 1e-4
  central = np.zeros_like(r, np.float64)
  for idx in np.ndindex(r.shape):
    hi, lo = r.astype(np.float64).copy(), r.astype(np.float64).copy()
    hi[idx] += eps
    lo[idx] -= eps
    central[idx] = (_bt_numpy(hi, pairs, margins, scale)[0] - _bt_numpy(lo, pairs, margins, scale)[0]) / (2 * eps)
  np.testing.assert_allclose(grad, central, atol=1e-5)
  assert np.all(grad[3] == 0)


def test_scalar_head_reads_last_token_and_ignores_padding():
  cfg = ModelConfig(vocab_size=50, num_layers=1, num_heads=2, d_model=16, max_len=12)
  model = reward_model.ScalarHeadModel(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 12), jnp.int32))["params"]
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                        is_leaf=lambda x: hasattr(x, "unbox"))
  assert set(params) == {"transformer", "reward_head"} and "head" not in params["transformer"]
  seq = np.array([5, 6, 7, 8, 9], np.int32)
  padded = np.zeros((1, 2, 12), np.int32)
  padded[0, 0, :5] = seq
  padded[0, 1, :5] = seq
  padded[0, 1, 5:] = 33  # different trailing junk must not change the score at the last real token
  scores = reward_model.sequence_scores(model, params, jnp.asarray(padded), jnp.array([[4, 4]]))
  alone = model.apply({"params": params}, jnp.asarray(seq[None]))[0, -1]
  numeric.assert_close(np.asarray(scores)[0], np.array([alone, alone]))


def test_judge_pairs_drop_close_scores():
  assert judges.preference_pairs([0.9, 0.1, 0.75, 0.1], min_gap=0.3) == [
      (0, 1, pytest.approx(0.8)), (0, 3, pytest.approx(0.8)), (2, 1, pytest.approx(0.65)),
      (2, 3, pytest.approx(0.65))]
  vader = judges.make_judge("vader")
  kind, cruel = vader(["I love thee dearly, good friend.", "Thou art a villain and a wretched knave!"])
  assert kind > 0.5 > -0.5 > cruel
  assert vader([""]) == [0.0]


def _reward_step(shape):
  """(metrics of one reward-model train step, gradients) on mesh `shape` (None: one device)."""
  from gptrl import optim, sharding, trainer  # pylint: disable=import-outside-toplevel
  from gptrl.config import MeshConfig, OptimConfig  # pylint: disable=import-outside-toplevel
  from gptrl.stages.reward import reward_loss_fn  # pylint: disable=import-outside-toplevel
  mesh = (sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]) if shape is None
          else sharding.make_mesh(MeshConfig(*shape)))
  cfg = ModelConfig(vocab_size=64, num_layers=2, num_heads=4, d_model=32, max_len=16)
  model = reward_model.ScalarHeadModel(cfg, head_init_std=0.1)
  opt_cfg = OptimConfig(lr=1e-2, warmup_steps=0)
  optimizer = optim.make_optimizer(opt_cfg, 10)
  state, shardings = trainer.create_train_state(
      lambda r: model.init(r, jnp.zeros((1, 16), jnp.int32))["params"], optimizer, 0, mesh)
  rng = np.random.default_rng(1)
  pairs = np.zeros((8, 3, 3), np.float32)
  pairs[:, 0, 1] = 1
  pairs[::2, 2, 0] = 1
  batch = {"tokens": rng.integers(1, 64, (8, 3, 16)).astype(np.int32),
           "last": rng.integers(4, 16, (8, 3)).astype(np.int32), "pairs": pairs,
           "margins": np.zeros((8, 3, 3), np.float32)}
  loss_fn = reward_loss_fn(model, 0.0)
  batch = sharding.host_to_global(batch, mesh)
  with sharding.activate(mesh):
    (_, sums), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params, batch, None)
  step = trainer.jit_train_step(trainer.make_train_step(loss_fn, optimizer, optim.learning_rate_schedule(opt_cfg, 10)),
                                shardings, mesh)
  _, metrics = step(state, batch)
  return jax.device_get(metrics), jax.device_get(grads)


def test_reward_train_step_sharded_matches_single_device():
  """data x fsdp x tensor = 2 x 2 x 2: the K responses of a prompt stay on its data shard."""
  metrics, grads = _reward_step((2, 2, 2))
  ref_metrics, ref_grads = _reward_step(None)
  for k in ("train/loss", "train/accuracy", "train/reward_margin", "train/grad_norm"):
    numeric.assert_close(metrics[k], ref_metrics[k], err_msg=k)
  # (Not the Adam-updated params: the loss is invariant to a shift of every reward, so the gradient of the final
  # norm's bias and the head's bias is 0 up to rounding, which Adam's first step scales up to +-lr.) Those
  # gradients are rounding left over from cancelling terms the size of the other gradients: hence the atol.
  largest = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads))
  numeric.assert_close(grads, ref_grads, atol=numeric.TOL * largest)


def test_pair_accuracy_by_gap_counts_each_pair_once_in_its_bucket():
  from gptrl.stages.reward import pair_accuracy_by_gap  # pylint: disable=import-outside-toplevel
  # A fake RM with known rewards for 2 prompts x 3 replies; the labeller's gaps decide the buckets.
  rewards = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
  pairs, margins = np.zeros((2, 3, 3)), np.zeros((2, 3, 3))
  for b, w, l, gap in [(0, 0, 1, 0.1), (0, 2, 1, 0.3), (0, 0, 2, 1.5), (1, 1, 0, 0.6), (1, 2, 1, 0.7)]:
    pairs[b, w, l], margins[b, w, l] = 1, gap
  m = pair_accuracy_by_gap(rewards, pairs, margins)
  # Right: (0,0>1), (0,0>2), (1,1>0); wrong: (0,2>1) and (1,2>1), a tie.
  assert m["eval/pair_accuracy"] == pytest.approx(3 / 5)
  assert m["eval/accuracy_gap/0-0.25"] == 1.0 and m["eval/pairs_gap/0-0.25"] == 1
  assert m["eval/accuracy_gap/0.25-0.5"] == 0.0
  assert m["eval/accuracy_gap/0.5-1"] == 0.5 and m["eval/pairs_gap/0.5-1"] == 2
  assert m["eval/accuracy_gap/1-inf"] == 1.0


def test_gold_judge_is_the_one_automatic_labeller_of_every_record():
  def groups(*names):
    return [chat_data.PromptComparisons((), [], [], [], labellers=[n]) for n in names]
  assert chat_data.gold_judge(groups("judge:vader", "judge:vader")) == "vader"
  assert chat_data.gold_judge(groups("judge:vader", "human")) is None
  assert chat_data.gold_judge(groups("judge:vader", "judge:length")) is None
  assert chat_data.gold_judge(groups("unknown")) is None
  assert chat_data.record_labeller({"judge": "vader"}) == "judge:vader"
  assert chat_data.record_labeller({"labeller": "human"}) == "human"


def test_pooling_reads_the_last_score_or_the_mean_up_to_it():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(3, 6)).astype(np.float32)
  last = np.array([5, 2, 4])
  valid = np.ones((3, 6), np.float32)
  valid[2, :2] = 0  # a left-padded row
  np.testing.assert_array_equal(np.asarray(reward_model.pool_scores(jnp.asarray(scores), jnp.asarray(last), "last")),
                                scores[np.arange(3), last])
  mean = np.asarray(reward_model.pool_scores(jnp.asarray(scores), jnp.asarray(last), "mean", jnp.asarray(valid)))
  expected = [scores[0].mean(), scores[1, :3].mean(), scores[2, 2:5].mean()]
  np.testing.assert_allclose(mean, expected, rtol=1e-6)
  first = np.array([3, 0, 4])  # where each reply starts
  reply = np.asarray(reward_model.pool_scores(jnp.asarray(scores), jnp.asarray(last), "reply_mean", jnp.asarray(valid),
                                              first_N=jnp.asarray(first)))
  np.testing.assert_allclose(reply, [scores[0, 3:].mean(), scores[1, :3].mean(), scores[2, 4]], rtol=1e-6)
  with pytest.raises(ValueError, match="needs where each reply starts"):
    reward_model.pool_scores(jnp.asarray(scores), jnp.asarray(last), "reply_mean")


def test_mean_pooled_scores_of_replies_to_one_prompt_differ_only_by_their_own_tokens():
  # Causal attention: the prompt's positions score alike whatever reply follows, so a reply's reward under
  # "mean" pooling is (prompt sum + reply sum) / length with the same prompt sum for every reply.
  cfg = ModelConfig(vocab_size=50, num_layers=1, num_heads=2, d_model=16, max_len=12)
  model = reward_model.ScalarHeadModel(cfg, head_init_std=0.5, pooling="mean")
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x,
                        model.init(jax.random.key(0), jnp.zeros((1, 12), jnp.int32))["params"],
                        is_leaf=lambda x: hasattr(x, "unbox"))
  tokens = np.zeros((1, 2, 12), np.int32)
  tokens[0, :, :4] = [5, 6, 7, 8]  # the prompt
  tokens[0, 0, 4:7], tokens[0, 1, 4:9] = [9, 10, 11], [12, 13, 14, 15, 16]
  last = np.array([[6, 8]])
  per_position = np.asarray(model.apply({"params": params}, jnp.asarray(tokens[0])))
  np.testing.assert_allclose(per_position[0, :4], per_position[1, :4], rtol=1e-6)
  pooled = np.asarray(reward_model.sequence_scores(model, params, jnp.asarray(tokens), jnp.asarray(last)))[0]
  np.testing.assert_allclose(pooled, [per_position[0, :7].mean(), per_position[1, :9].mean()], rtol=1e-5)


@pytest.mark.parametrize("members", [1, 2])
def test_reward_batch_shapes_are_what_the_datasets_yield(tmp_path, members):
  """chat_data.reward_batch_shapes (what gptrl/compile.py compiles the train step for) against real batches."""
  msgs = [{"role": "user", "content": "q"}]
  recs = [{"messages": msgs + [{"role": "user", "content": f"q{i}"}], "chosen": "a", "rejected": "b"}
          for i in range(6)]
  groups = chat_data.load_comparisons([_write(tmp_path / "p.jsonl", recs)], max_responses=3)
  enc = chat_data.encode_comparisons(groups, _tok(tmp_path), max_len=32, max_responses=3)
  if members == 1:
    batch = next(iter(chat_data.reward_dataset(enc, seed=0, global_batch_size=4)))
  else:
    batch = next(chat_data.reward_member_batches(enc, seed=0, members=members, global_batch_size=4))
  shapes = chat_data.reward_batch_shapes(4, 3, 32, members)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == shapes
