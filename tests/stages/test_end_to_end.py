"""SFT, labelling and reward-model stages end to end through the launcher, on tiny models and generated data:
outputs, resume after kill -9 (bitwise), and the checks at the hand-off between stages."""
from __future__ import annotations

import json
import pathlib
import shutil
import signal
import sys
import time

import jax
import numpy as np
import pytest

from gptrl import checkpoint as ckpt_lib
from gptrl import model as model_lib
from gptrl import report
from gptrl import tokenizer as tokenizer_lib
from gptrl.config import ModelConfig
from helpers import (REPO, check_ok, complete_steps, kill_when, params, run, start, tiny_stage_flags, train_steps,
                     write_chats, write_corpus)

def _chats(path: pathlib.Path, n: int = 120, seed: int = 0) -> pathlib.Path:
  return write_chats(path, n, seed)


def _launch(config: str, **flags) -> list[str]:
  return [sys.executable, "-m", "gptrl.launch", "--config", str(REPO / f"configs/{config}")] + [
      f"--config.{k}={v}" for k, v in flags.items()]


def _pretrain_argv(workdir, corpus, cache):
  return _launch("pretrain_cpu.py:tiny", workdir=workdir, **tiny_stage_flags("pretrain", corpus=corpus, cache=cache))


def _sft_argv(workdir, init, chats, cache, steps=12):
  return _launch("sft_cpu.py:tiny", **{"workdir": workdir, "init.checkpoint": init,
                                       **tiny_stage_flags("sft", chats=chats, cache=cache), "train.steps": steps})


def _label_argv(workdir, init, chats, cache):
  return _launch("label_cpu.py:tiny", **{"workdir": workdir, "init.checkpoint": init,
                                         **tiny_stage_flags("label", chats=chats, cache=cache)})


def _reward_argv(workdir, init, comparisons, cache, steps=10):
  return _launch("reward_cpu.py:tiny", **{"workdir": workdir, "init.checkpoint": init,
                                          "data.sources": f"('{comparisons}',)",
                                          **tiny_stage_flags("reward", cache=cache), "train.steps": steps})


def _dpo_argv(workdir, sft, comparisons, reward, chats, cache):
  return _launch("dpo_cpu.py:tiny", **{"workdir": workdir, "init.checkpoint": sft, "reward_model.checkpoint": reward,
                                       "data.sources": f"('{comparisons}',)",
                                       **tiny_stage_flags("dpo", chats=chats, cache=cache)})


def _ppo_argv(workdir, sft, reward, chats, cache, stage="ppo"):
  return _launch(f"{stage}_cpu.py:tiny", **{"workdir": workdir, "init.checkpoint": sft,
                                            "reward_model.checkpoint": reward,
                                            **tiny_stage_flags(stage, chats=chats, cache=cache)})


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  """One pretrain -> SFT -> label -> reward chain; returns its paths."""
  root = tmp_path_factory.mktemp("pipeline")
  corpus, cache = root / "corpus", root / "cache"
  write_corpus(corpus)
  chats = _chats(root / "chats.jsonl")
  paths = {"root": root, "cache": cache, "chats": chats, "pretrain": root / "pretrain", "sft": root / "sft",
           "label": root / "label", "reward": root / "reward"}
  check_ok(run(_pretrain_argv(paths["pretrain"], corpus, cache)))
  check_ok(run(_sft_argv(paths["sft"], paths["pretrain"], chats, cache)))
  check_ok(run(_label_argv(paths["label"], paths["sft"], chats, cache)))
  check_ok(run(_reward_argv(paths["reward"], paths["sft"], paths["label"] / "comparisons.jsonl", cache)))
  paths["ppo"] = root / "ppo"
  check_ok(run(_ppo_argv(paths["ppo"], paths["sft"], paths["reward"], chats, cache)))
  paths["dpo"] = root / "dpo"
  check_ok(run(_dpo_argv(paths["dpo"], paths["sft"], paths["label"] / "comparisons.jsonl", paths["reward"], chats,
                         cache)))
  paths["grpo"] = root / "grpo"
  check_ok(run(_ppo_argv(paths["grpo"], paths["sft"], paths["reward"], chats, cache, stage="grpo")))
  paths["reward_ensemble"] = root / "reward_ensemble"
  check_ok(run(_reward_ensemble_argv(paths["reward_ensemble"], paths["sft"], paths["label"] / "comparisons.jsonl",
                                     cache)))
  return paths


def _reward_ensemble_argv(workdir, init, comparisons, cache):
  return _reward_argv(workdir, init, comparisons, cache) + ["--config.reward.ensemble=2"]


def _rows(workdir: pathlib.Path) -> list[dict]:
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_sft_outputs(pipeline):
  rows = _rows(pipeline["sft"])
  evals = [r for r in rows if "eval/loss" in r]
  assert [r["step"] for r in evals] == [0, 6, 12]  # 0: the pretrained model, before SFT
  assert all(np.isfinite(r["eval/loss"]) and r["eval/tokens"] > 0 for r in evals)
  # Only assistant tokens are counted: at most 8 times the most assistant tokens any one chat has.
  tok = tokenizer_lib.load_tokenizer(pipeline["sft"] / "tokenizer.model")
  longest = max(sum(len(tok.encode(m["content"])) + 1 for m in json.loads(line)["messages"] if m["role"] == "assistant")
                for line in pipeline["chats"].read_text().splitlines())
  weights = [r["train/weight"] for r in rows if "train/weight" in r]
  assert weights and all(0 < w <= 8 * longest for w in weights)
  with open(pipeline["sft"] / "samples.jsonl", encoding="utf-8") as f:
    samples = [json.loads(line) for line in f]
  assert samples and "[assistant, sampled]" in samples[-1]["texts"][0]
  meta = ckpt_lib.read_step_meta(str(pipeline["sft"] / "checkpoints"), 12)
  assert meta["stage"] == "sft" and meta["init_checkpoint"].endswith("pretrain/checkpoints/8")


def test_label_outputs(pipeline):
  lines = (pipeline["label"] / "comparisons.jsonl").read_text(encoding="utf-8").splitlines()
  assert lines
  for line in lines:
    rec = json.loads(line)
    assert rec["chosen"] != rec["rejected"] and rec["messages"][-1]["role"] == "user"
    # The length judge: the chosen reply has at least min_gap = 1 more word.
    assert len(rec["chosen"].split()) - len(rec["rejected"].split()) >= 1 == rec["margin"] // rec["margin"]
  replies = (pipeline["label"] / "replies.jsonl").read_text(encoding="utf-8").splitlines()
  assert len(replies) == 40 and all(len(json.loads(r)["responses"]) == 4 for r in replies)


def test_reward_outputs(pipeline):
  rows = _rows(pipeline["reward"])
  evals = [r for r in rows if "eval/accuracy" in r]
  assert [r["step"] for r in evals] == [0, 5, 10]
  assert all(0.0 <= r["eval/accuracy"] <= 1.0 and np.isfinite(r["eval/loss"]) and r["eval/pairs"] > 0 for r in evals)
  meta = ckpt_lib.read_step_meta(str(pipeline["reward"] / "checkpoints"), 10)
  assert meta["stage"] == "reward" and np.isfinite(meta["reward_offset"]) and meta["reward_normalize_samples"] == 6
  assert any("final/reward_offset" in r for r in rows)


def _kill_after_first_checkpoint(argv, workdir: pathlib.Path, log: pathlib.Path, step: int = 4) -> None:
  kill_when(argv, workdir / "checkpoints" / str(step), log)


# reward_ensemble and grpo resume through the reward and PPO stages' code (reward and ppo here, in the default
# run): ~50-80 s each on 2 cores, with -m slow.
@pytest.mark.parametrize("stage", ["sft", "reward", pytest.param("reward_ensemble", marks=pytest.mark.slow), "ppo",
                                   pytest.param("grpo", marks=pytest.mark.slow), "dpo"])
def test_kill_and_resume_is_bitwise_identical(pipeline, tmp_path, stage):
  workdir = tmp_path / stage
  first = 4
  if stage == "sft":
    argv, steps = _sft_argv(workdir, pipeline["pretrain"], pipeline["chats"], pipeline["cache"]), 12
  elif stage == "dpo":
    argv, steps = _dpo_argv(workdir, pipeline["sft"], pipeline["label"] / "comparisons.jsonl", pipeline["reward"],
                            pipeline["chats"], pipeline["cache"]), 8
  elif stage in ("reward", "reward_ensemble"):
    argv_of = _reward_argv if stage == "reward" else _reward_ensemble_argv
    argv, steps = argv_of(workdir, pipeline["sft"], pipeline["label"] / "comparisons.jsonl", pipeline["cache"]), 10
  else:
    argv, steps, first = _ppo_argv(workdir, pipeline["sft"], pipeline["reward"], pipeline["chats"],
                                   pipeline["cache"], stage=stage), 4, 2
  _kill_after_first_checkpoint(argv, workdir, tmp_path / "killed.log", first)
  assert max(complete_steps(workdir)) < steps
  check_ok(run(argv))
  a, b = params(pipeline[stage], steps), params(workdir, steps)
  assert a.keys() == b.keys()
  for name in a:
    assert np.array_equal(a[name], b[name]), f"{name} differs after kill + resume"
  if stage in ("ppo", "grpo"):
    keys = ("step",) + tuple(f"{stage}/{k}" for k in ("reward", "kl", "beta", "policy_loss", "value_loss"))
    resumed, straight = ([{k: r[k] for k in keys} for r in _rows(w) if f"{stage}/reward" in r]
                         for w in (workdir, pipeline[stage]))
    assert resumed == straight and len(resumed) == 4
  else:
    assert train_steps(workdir) == train_steps(pipeline[stage])
  if stage == "dpo":  # the held-out replies written after the last checkpoint were dropped, then written again
    assert ((workdir / "eval_replies.jsonl").read_text() == (pipeline["dpo"] / "eval_replies.jsonl").read_text())


def test_reward_ensemble_and_its_consumers(pipeline, tmp_path):
  """An ensemble of 2 RMs: its meta normalises each member; PPO reads it conservatively (mean - std) and logs the
  members' disagreement; best-of-n tabulates every reduction on the same samples."""
  ens = pipeline["reward_ensemble"]
  meta = ckpt_lib.read_step_meta(str(ens / "checkpoints"), 10)
  assert meta["ensemble"] == 2 and len(meta["reward_offsets"]) == len(meta["reward_stds"]) == 2
  assert meta["reward_offsets"][0] != meta["reward_offsets"][1]  # two different models
  evals = [r for r in _rows(ens) if "eval/pair_accuracy" in r]
  assert [r["step"] for r in evals] == [0, 5, 10]
  for r in evals:
    assert r["eval/member_pair_accuracy_min"] <= r["eval/member_pair_accuracy_mean"] <= r["eval/member_pair_accuracy_max"]
    assert r["eval/pairs"] == _rows_at(pipeline["reward"], r["step"])["eval/pairs"]  # each pair once, not per member
  ppo_dir = tmp_path / "ppo"
  check_ok(run(_ppo_argv(ppo_dir, pipeline["sft"], ens, pipeline["chats"], pipeline["cache"])
               + ["--config.reward_model.ensemble_reduce=mean_minus_std", "--config.reward_model.ensemble_penalty=2",
                  "--config.train.steps=2"]))
  rows = _rows(ppo_dir)
  assert all(r["ppo/ensemble_std"] > 0 for r in rows if "ppo/reward" in r)
  last_eval = [r for r in rows if "eval/proxy_mean" in r][-1]
  # The conservative reward is the members' mean less twice their spread, reply by reply, so on average too.
  assert last_eval["eval/proxy"] == pytest.approx(last_eval["eval/proxy_mean"] - 2 * last_eval["eval/ensemble_std"],
                                                  abs=1e-5)
  assert ckpt_lib.read_step_meta(str(ppo_dir / "checkpoints"), 2)["reward_readout"]["reduce"] == "mean_minus_std"
  bon_dir = tmp_path / "bon"
  check_ok(run(_launch("bon_cpu.py:tiny", **{"workdir": bon_dir, "init.checkpoint": pipeline["sft"],
                                             "reward_model.checkpoint": ens, "data.sources": f"('{pipeline['chats']}',)",
                                             "data.cache_dir": pipeline["cache"], "data.eval_fraction": 0.2,
                                             "bon.num_prompts": 4, "bon.max_new_tokens": 6,
                                             **tiny_stage_flags("bon")})))
  table = json.loads((bon_dir / "bon.json").read_text())
  assert sorted(table["by_reduce"]) == ["mean", "mean_minus_std", "min"]
  assert table["by_reduce"]["mean"] == table["rows"]  # PPO's default reduction picks the main table
  for rows_of in table["by_reduce"].values():  # n = 1 picks nothing: every reduction has the same sample
    assert rows_of[0]["proxy_mean"] == pytest.approx(table["rows"][0]["proxy_mean"])


def _rows_at(workdir: pathlib.Path, step: int) -> dict:
  return [r for r in _rows(workdir) if r.get("step") == step and "eval/pairs" in r][0]


def test_ppo_outputs(pipeline):
  rows = _rows(pipeline["ppo"])
  iters = [r for r in rows if "ppo/reward" in r]
  assert [r["step"] for r in iters] == [1, 2, 3, 4]
  for r in iters:
    assert abs(r["ppo/first_ratio"] - 1) < 1e-5 and r["ppo/first_approx_kl"] < 1e-8
    assert np.isfinite(r["ppo/policy_loss"]) and np.isfinite(r["ppo/value_loss"]) and r["ppo/beta"] > 0
  assert [r["step"] for r in rows if "eval/reward" in r] == [0, 2, 4]
  meta = ckpt_lib.read_step_meta(str(pipeline["ppo"] / "checkpoints"), 4)
  assert meta["stage"] == "ppo" and meta["reward_model"].endswith("reward/checkpoints/10")


def test_grpo_outputs(pipeline):
  rows = _rows(pipeline["grpo"])
  iters = [r for r in rows if "grpo/reward" in r]
  assert [r["step"] for r in iters] == [1, 2, 3, 4]
  for r in iters:
    assert abs(r["grpo/first_ratio"] - 1) < 1e-5 and r["grpo/first_approx_kl"] < 1e-8
    assert np.isfinite(r["grpo/policy_loss"]) and np.isfinite(r["grpo/kl_loss"]) and r["grpo/value_loss"] == 0.0
  assert any("eval/kl" in r for r in rows)
  meta = ckpt_lib.read_step_meta(str(pipeline["grpo"] / "checkpoints"), 4)
  assert meta["stage"] == "grpo" and meta["critic"] == "none"
  # The train state holds the policy alone: PPO's policy parameters, no critic.
  assert set(params(pipeline["grpo"], 4)) == {k for k in params(pipeline["ppo"], 4) if k.startswith("['policy']")}


def test_dpo_outputs(pipeline):
  rows = _rows(pipeline["dpo"])
  evals = [r for r in rows if "eval/accuracy" in r]
  assert [r["step"] for r in evals] == [0, 4, 8]
  assert evals[0]["eval/accuracy"] == 0.0 and evals[0]["eval/pairs"] > 0  # the policy is the reference at step 0
  # It learns its training pairs; 8 steps move the ~20 held-out pairs' loss by a few 1e-4 either way.
  train = [r["train/loss"] for r in rows if "train/loss" in r]
  assert train[-1] < train[0] - 1e-3 and evals[-1]["eval/accuracy"] > 0.0
  # The generation eval, as PPO's: the RM's reward and the KL to the reference of replies to held-out prompts.
  assert evals[0]["eval/kl"] == pytest.approx(0.0, abs=1e-4) and "eval/reward" in evals[-1]
  replies = [json.loads(line) for line in (pipeline["dpo"] / "eval_replies.jsonl").read_text().splitlines()]
  assert [r["step"] for r in replies] == [0, 4, 8] and len(replies[0]["replies"]) == 4
  meta = ckpt_lib.read_step_meta(str(pipeline["dpo"] / "checkpoints"), 8)
  assert meta["stage"] == "dpo" and meta["beta"] == 0.1 and meta["init_checkpoint"].endswith("sft/checkpoints/12")


def test_label_resumes_after_a_cut_chunk(pipeline, tmp_path):
  """A kill between writing a chunk's lines and its progress record: the partial lines are dropped on resume."""
  workdir = tmp_path / "label"
  shutil.copytree(pipeline["label"], workdir)
  full = (workdir / "comparisons.jsonl").read_bytes()
  state = json.loads((workdir / "label_state.json").read_text())
  # Pretend only the first chunk finished, and the second was cut mid-line.
  first = json.loads((workdir / "replies.jsonl").read_text().splitlines()[0])
  del first
  with open(workdir / "comparisons.jsonl", "rb") as f:
    lines = f.read().splitlines(keepends=True)
  first_chunk = [l for l in lines if json.loads(l)["prompt_index"] < 8]
  state.update(chunks_done=1, comparisons_bytes=sum(len(l) for l in first_chunk),
               replies_bytes=sum(len(l) for l in (workdir / "replies.jsonl").read_bytes().splitlines(True)[:8]))
  (workdir / "label_state.json").write_text(json.dumps(state))
  with open(workdir / "comparisons.jsonl", "ab") as f:
    f.write(b'{"messages": [{"role": "us')
  (workdir / "metrics.jsonl").unlink()
  check_ok(run(_label_argv(workdir, pipeline["sft"], pipeline["chats"], pipeline["cache"])))
  assert (workdir / "comparisons.jsonl").read_bytes() == full
  assert (workdir / "replies.jsonl").read_bytes() == (pipeline["label"] / "replies.jsonl").read_bytes()


def test_label_killed_mid_run_resumes_to_the_same_files(pipeline, tmp_path):
  """A real kill -9 of the labelling stage between (or during) chunks: the resumed run's comparisons and replies are
  byte for byte those of an uninterrupted run."""
  more = {"num_prompts": 48}  # 6 chunks of 8 prompts x 4 replies
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  check_ok(run(_label_argv(whole, pipeline["sft"], pipeline["chats"], pipeline["cache"]) +
               [f"--config.{k}={v}" for k, v in more.items()]))
  argv = _label_argv(killed, pipeline["sft"], pipeline["chats"], pipeline["cache"]) + [
      f"--config.{k}={v}" for k, v in more.items()]
  proc, log = start(argv, tmp_path / "killed.log")
  try:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
      try:
        if json.loads((killed / "label_state.json").read_text())["chunks_done"] >= 2:
          break
      except (OSError, ValueError, KeyError):
        pass
      time.sleep(0.01)
    assert proc.poll() is None, "the labelling run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
  finally:
    if proc.poll() is None:
      proc.kill()
    log.close()
  done = json.loads((killed / "label_state.json").read_text())["chunks_done"]
  assert 2 <= done < 6, done
  check_ok(run(argv))
  for name in ("comparisons.jsonl", "replies.jsonl"):
    assert (killed / name).read_bytes() == (whole / name).read_bytes(), name


def test_handoff_names_every_mismatched_parameter(pipeline):
  meta = ckpt_lib.read_step_meta(str(pipeline["pretrain"] / "checkpoints"), 8)
  saved_cfg = ModelConfig(**meta["model"])
  wrong = ModelConfig(**{**meta["model"], "num_layers": saved_cfg.num_layers + 1, "max_len": 64})
  model = model_lib.GPT(wrong)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"])
  abstract = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, abstract,
                          is_leaf=lambda x: hasattr(x, "unbox"))
  tok = tokenizer_lib.load_tokenizer(pipeline["pretrain"] / "tokenizer.model")
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ckpt_lib.load_params(str(pipeline["pretrain"]), abstract, tokenizer_sha256=tok.sha256)
  text = str(e.value)
  assert f"position_embedding: checkpoint (48, {saved_cfg.d_model}), model (64, {saved_cfg.d_model})" in text
  extra = f"block_{saved_cfg.num_layers}"
  assert f"{extra}/attn/query" in text and f"{extra}/mlp/fc_in/kernel" in text and "not in the checkpoint" in text
  # The matching model loads, and bitwise equals what was saved.
  good = model_lib.GPT(saved_cfg)
  abstract = jax.eval_shape(lambda: good.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"])
  abstract = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, abstract,
                          is_leaf=lambda x: hasattr(x, "unbox"))
  loaded, _, where = ckpt_lib.load_params(str(pipeline["pretrain"] / "checkpoints" / "8"), abstract,
                                          tokenizer_sha256=tok.sha256)
  saved = params(pipeline["pretrain"], 8)
  flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(loaded)}
  assert flat.keys() == saved.keys() and all(np.array_equal(flat[k], saved[k]) for k in flat)
  assert where.endswith("checkpoints/8")


def test_handoff_refuses_another_tokenizer(pipeline, tmp_path):
  other = tokenizer_lib.train_tokenizer(["something else entirely, " * 200], tmp_path / "other.model", vocab_size=300)
  result = run(_sft_argv(tmp_path / "sft", pipeline["pretrain"], pipeline["chats"], pipeline["cache"]) +
               [f"--config.tokenizer_path={other.path}"])
  assert result.returncode != 0
  assert "TokenizerMismatchError" in result.stderr and other.sha256 in result.stderr


def test_a_resumed_stage_refuses_a_parent_that_changed_unless_allowed_and_records_the_change(pipeline, tmp_path):
  workdir = tmp_path / "reward"
  comparisons = pipeline["label"] / "comparisons.jsonl"
  check_ok(run(_reward_argv(workdir, pipeline["sft"], comparisons, pipeline["cache"], steps=4)))
  meta = ckpt_lib.read_step_meta(str(workdir / "checkpoints"), 4)
  sft12 = f"{pipeline['sft'] / 'checkpoints'}/12"
  assert meta["parents"]["init"] == {"checkpoint": sft12, "manifest_sha256": ckpt_lib.manifest_sha256(sft12),
                                     "stage": "sft"} and meta["parent_changes"] == []
  # Resumed (more steps) from another step of the SFT run than the one it started from: refused, one line.
  argv = _reward_argv(workdir, pipeline["sft"], comparisons, pipeline["cache"], steps=8) + ["--config.init.step=8"]
  result = run(argv)
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert (f"started from init checkpoint {sft12} (sha256 {meta['parents']['init']['manifest_sha256'][:12]}), "
          f"which is now {pipeline['sft'] / 'checkpoints'}/8") in result.stderr
  assert "config.init.allow_changed=True" in result.stderr and complete_steps(workdir) == [4]
  # Allowed: it goes on from the new parent, and every later checkpoint says so.
  check_ok(run(argv + ["--config.init.allow_changed=True"]))
  meta = ckpt_lib.read_step_meta(str(workdir / "checkpoints"), 8)
  assert meta["parents"]["init"]["checkpoint"].endswith("sft/checkpoints/8")
  [change] = meta["parent_changes"]
  assert change["role"] == "init" and change["was"]["checkpoint"] == sft12 and change["now"] == meta["parents"]["init"]
  assert change["resumed_from"].endswith("reward/checkpoints/4")
  # The report's lineage section shows the chain and the change.
  run_ = report.Run({"sft": str(pipeline["sft"]), "reward": str(workdir)})
  rows = {r["stage"]: r for r in report.lineage_rows(run_)}
  assert rows["reward"]["parents"]["init"]["same"] and rows["reward"]["manifest_sha256"] == ckpt_lib.manifest_sha256(
      f"{workdir / 'checkpoints'}/8")
  assert rows["sft"]["parents"]["init"]["stage"] == "pretrain"
  html_ = report.section_lineage(run_)
  assert "changed at resume from" in html_ and change["was"]["manifest_sha256"][:12] in html_
