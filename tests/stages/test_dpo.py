"""DPO (gptrl/stages/dpo.py) on a tiny synthetic preference task: chosen replies say one token, rejected ones do
not. The policy must learn to prefer it; the reference's cached log-probs must equal an unbatched recomputation;
a sharded run must equal one device; and bad settings are refused."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptrl import chat_data
from gptrl import config as config_lib
from gptrl import model as model_lib
from gptrl import optim
from gptrl import sharding
from gptrl import trainer
from gptrl.config import DPOAlgoConfig, MeshConfig, ModelConfig, OptimConfig
from gptrl.stages import dpo

import numeric

VOCAB, GOOD, STOP, PAD, L = 32, 7, 5, 0, 16
MODEL = ModelConfig(vocab_size=VOCAB, num_layers=1, num_heads=2, d_model=32, max_len=L)


def _comparisons(n: int, seed: int) -> chat_data.EncodedComparisons:
  """n prompts of 3-6 tokens, each with a chosen reply holding GOOD and a rejected one without it (K = 2)."""
  rng = np.random.default_rng(seed)
  tokens = np.full((n, 2, L), PAD, np.int32)
  first, last = np.zeros((n, 2), np.int32), np.zeros((n, 2), np.int32)
  for i in range(n):
    prompt = list(rng.integers(8, VOCAB, rng.integers(3, 7)))
    filler = list(rng.integers(8, VOCAB, 3))
    for k, reply in enumerate(([GOOD] + filler[:2] + [STOP], filler + [STOP])):
      seq = prompt + reply
      tokens[i, k, :len(seq)] = seq
      first[i, k], last[i, k] = len(prompt), len(seq) - 1
  pairs = np.zeros((n, 2, 2), np.float32)
  pairs[:, 0, 1] = 1.0
  return chat_data.EncodedComparisons(tokens, last, pairs, np.zeros_like(pairs), 0, first)


def _setup(mesh, p: DPOAlgoConfig, steps: int):
  model = model_lib.GPT(MODEL)
  optimizer = optim.make_optimizer(OptimConfig(lr=3e-3, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0), steps)
  state, shardings = trainer.create_train_state(lambda rng: model.init(rng, np.zeros((1, L), np.int32))["params"],
                                                optimizer, 0, mesh)
  reference = jax.tree.map(lambda x: jnp.array(x, copy=True), state.params)
  step = trainer.jit_train_step(trainer.make_train_step(dpo.dpo_loss_fn(model, p), optimizer, lambda s: 3e-3),
                                shardings, mesh)
  return model, state, reference, step


def _train(mesh, p: DPOAlgoConfig, steps: int, batch: int = 8):
  model, state, reference, step = _setup(mesh, p, steps)
  train, held_out = _comparisons(64, 0), _comparisons(32, 1)
  for enc in (train, held_out):
    enc.ref_logp = dpo.reference_log_probs(model, reference, enc, mesh, batch)
  it = iter(chat_data.reward_dataset(train, seed=0, global_batch_size=batch))
  eval_fn = dpo.make_eval_fn(model, mesh, chat_data.reward_eval_batches(held_out, batch_size=batch), p, None)
  evals, rows = [eval_fn(state)], []
  for _ in range(steps):
    state, metrics = step(state, sharding.host_to_global(next(it), mesh))
    rows.append(jax.device_get(metrics))
  evals.append(eval_fn(state))
  return evals, rows, state


def _one_device():
  return sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


@pytest.fixture(scope="module", params=[("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)],
                ids=["dpo", "cdpo", "ipo"])
def trained(request):
  loss_type, eps = request.param
  p = DPOAlgoConfig(beta=0.5, loss_type=loss_type, label_smoothing=eps)
  return p, _train(_one_device(), p, 30)


def test_learns_to_prefer_the_chosen_replies(trained):
  p, (evals, rows, _) = trained
  before, after = evals
  # At the start the policy is the reference: every implicit reward is 0, so no pair is ordered yet.
  assert before["eval/accuracy"] == 0.0 and abs(before["eval/reward_margin"]) < 1e-6
  assert before["eval/pairs"] == 32
  assert after["eval/accuracy"] > 0.9 and after["eval/reward_margin"] > 0.1, after
  assert after["eval/chosen_reward"] > 0 > after["eval/rejected_reward"] or p.loss_type == "ipo"
  assert after["eval/loss"] < before["eval/loss"]
  assert all(r["train/skipped"] == 0 for r in rows)


def test_reference_log_probs_equal_an_unbatched_recomputation():
  model, state, _, _ = _setup(_one_device(), DPOAlgoConfig(), 1)
  enc = _comparisons(5, 2)
  cached = dpo.reference_log_probs(model, state.params, enc, _one_device(), batch_size=4)  # 5 rows: padded batch
  for i in range(5):
    for k in range(2):
      seq = enc.tokens[i, k, :enc.last[i, k] + 1]  # no padding at all
      logits = np.asarray(model.apply({"params": state.params}, seq[None]), np.float64)[0]
      logp = logits - logits.max(-1, keepdims=True)
      logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
      expected = sum(logp[t - 1, seq[t]] for t in range(enc.first[i, k], enc.last[i, k] + 1))
      np.testing.assert_allclose(cached[i, k], expected, rtol=1e-5, atol=1e-4)


def test_sharded_training_matches_one_device():
  p = DPOAlgoConfig(beta=0.5)
  single = _train(_one_device(), p, 3)
  sharded = _train(sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), p, 3)
  for a, b in zip(single[1], sharded[1]):
    numeric.assert_close(b["train/loss"], a["train/loss"], err_msg="train/loss")
  numeric.assert_close(sharded[0][1]["eval/reward_margin"], single[0][1]["eval/reward_margin"], atol=1e-6)
  # Adam divides each gradient by its own running scale, so an element whose gradient is tiny carries its summation
  # order's rounding into the update at full size: a looser bound than the losses', still far below a bug's O(1).
  numeric.assert_close(jax.device_get(sharded[2].params), jax.device_get(single[2].params), tol=1e-4)


@pytest.mark.parametrize("overrides,match", [
    ({"label_smoothing": 0.1, "loss_type": "ipo"}, r"config.dpo.label_smoothing: applies to loss_type='sigmoid'"),
    ({"beta": 0.0}, r"config.dpo.beta: must be > 0"),
    ({"loss_type": "hinge"}, r"config.dpo.loss_type"),
])
def test_bad_dpo_settings_are_refused_naming_the_key(overrides, match):
  raw = config_lib.as_configdict(config_lib.DPOConfig)
  raw.init.checkpoint = "sft"
  for k, v in overrides.items():
    raw.dpo[k] = v
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.stage_config(raw)
