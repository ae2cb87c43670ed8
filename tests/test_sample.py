"""`python -m gptrl.sample`: replies from chat checkpoints, raw continuations from pretraining ones, reward scores,
the interactive loop, and the one-line errors (exit 2) for what a checkpoint cannot do.

One tiny pretraining run through the launcher gives the model and tokenizer; the SFT and reward checkpoints
are written from its parameters with gptrl.checkpoint.Checkpointer (what the CLI reads is the same, and training
them would take the whole time budget). The real chain is in the slow test at the end.
"""
from __future__ import annotations

import io
import json
import pathlib
import random
import shutil
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from gptrl import checkpoint as ckpt_lib
from gptrl import sample
from gptrl import tokenizer as tokenizer_lib
from helpers import REPO, check_ok, run, write_corpus

REWARD_OFFSET = 0.25


def _launch(config: str, **flags) -> list[str]:
  return [sys.executable, "-m", "gptrl.launch", "--config", str(REPO / f"configs/{config}")] + [
      f"--config.{k}={v}" for k, v in flags.items()]


def _derive(pretrain: pathlib.Path, workdir: pathlib.Path, params, **meta) -> pathlib.Path:
  """A checkpoint at step 1 of `workdir` holding `params`, with the pretraining run's meta updated by `meta`."""
  workdir.mkdir(parents=True)
  shutil.copy(pretrain / "tokenizer.model", workdir / "tokenizer.model")
  base = ckpt_lib.read_step_meta(str(pretrain / "checkpoints"), 4)
  checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  checkpointer.save(1, {"params": params, "step": np.int32(1)}, data={}, meta={**base, **meta})
  checkpointer.close()
  return workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{"pretrain", "sft", "reward"} workdirs of a tiny model, and an unrelated tokenizer file."""
  root = tmp_path_factory.mktemp("sample")
  write_corpus(root / "corpus")
  pretrain = root / "pretrain"
  check_ok(run(_launch("pretrain_cpu.py:tiny", **{
      "workdir": pretrain, "data.sources": f"('{root / 'corpus'}',)", "data.cache_dir": root / "cache",
      "train.steps": 4, "train.checkpoint_every": 4, "train.eval_every": 4, "tokenizer.vocab_size": 300,
      "model.max_len": 48, "data.batch_size": 8, "data.eval_batches": 1, "train.progress_bar": False,
      "sample.max_new_tokens": 0})))
  params = ocp.StandardCheckpointer().restore(pretrain / "checkpoints" / "4" / "state")["params"]
  d_model = params["token_embedding"].shape[1]
  head = {"kernel": np.random.default_rng(0).normal(0, 1, d_model).astype(np.float32), "bias": np.float32(0.0)}
  other = tokenizer_lib.train_tokenizer(["something else entirely, " * 200], root / "other.model", vocab_size=300)
  return {"pretrain": pretrain, "sft": _derive(pretrain, root / "sft", params, stage="sft"),
          "reward": _derive(pretrain, root / "reward", {"transformer": params, "reward_head": head}, stage="reward",
                            head="reward_head", reward_offset=REWARD_OFFSET),
          "other_tokenizer": other.path}


@pytest.fixture(autouse=True)
def _keep_pytest_logging(monkeypatch):
  # main() points the root logger at the stderr of the moment; under capsys that stream is gone after the test.
  monkeypatch.setattr(sample, "_setup_logging", lambda: None)


def _main(capsys, *argv) -> tuple[int, str, str]:
  status = sample.main([str(a) for a in argv])
  captured = capsys.readouterr()
  return status, captured.out, captured.err


def _json_lines(out: str) -> list[dict]:
  return [json.loads(line) for line in out.splitlines()]


def _one_line_error(err: str) -> str:
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("gptrl.sample: "), err
  return lines[0]


def test_prompt_on_a_chat_checkpoint_prints_the_exchange(runs, capsys):
  status, out, _ = _main(capsys, "--checkpoint", runs["sft"], "--prompt", "Hi", "--system", "Be brief.",
                         "--temperature", 0, "--max_new_tokens", 4)
  assert status == 0 and out.startswith("[system] Be brief.\n[user] Hi\n[assistant] ")


def test_greedy_replies_are_identical_across_invocations(runs, capsys):
  argv = ("--checkpoint", runs["sft"], "--prompt", "Hi", "--prompt", "Where does the fox walk?", "--temperature", 0,
          "--max_new_tokens", 4, "--json")
  first, second = _main(capsys, *argv), _main(capsys, *argv)
  assert first[0] == second[0] == 0 and first[1] == second[1]


def test_json_gives_one_object_per_reply(runs, capsys):
  status, out, _ = _main(capsys, "--checkpoint", runs["sft"] / "checkpoints", "--step", 1, "--prompt", "Hi",
                         "--prompt", "Bye", "--num_samples", 2, "--temperature", 0, "--max_new_tokens", 4, "--json")
  assert status == 0
  records = _json_lines(out)
  assert [(r["prompt"], r["sample"]) for r in records] == [("Hi", 0), ("Hi", 1), ("Bye", 0), ("Bye", 1)]
  assert all(isinstance(r["reply"], str) and isinstance(r["finished"], bool) for r in records)


def test_chat_keeps_history_until_reset(runs, capsys, monkeypatch):
  monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nhi\n"))
  status, out, _ = _main(capsys, "--checkpoint", runs["sft"], "--chat", "--temperature", 0, "--max_new_tokens", 4,
                         "--json")
  assert status == 0
  replies = _json_lines(out)
  assert [(r["turn"], r["prompt"]) for r in replies] == [(0, "hello"), (1, "hi")]
  # After /reset, "hi" is answered as the opening turn of a new conversation.
  _, fresh, _ = _main(capsys, "--checkpoint", runs["sft"], "--prompt", "hi", "--temperature", 0,
                      "--max_new_tokens", 4, "--json")
  assert replies[1]["reply"] == _json_lines(fresh)[0]["reply"]


def test_chat_ends_at_quit(runs, capsys, monkeypatch):
  monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/quit\nnever read\n"))
  status, out, _ = _main(capsys, "--checkpoint", runs["sft"], "--chat", "--temperature", 0, "--max_new_tokens", 4,
                         "--json")
  assert status == 0 and [r["prompt"] for r in _json_lines(out)] == ["hello"]


def test_pretrain_checkpoint_continues_raw_text(runs, capsys):
  status, out, _ = _main(capsys, "--checkpoint", runs["pretrain"] / "checkpoints" / "4", "--prompt", "The king",
                         "--temperature", 0, "--max_new_tokens", 4)
  assert status == 0 and out.startswith("The king")
  status, out, _ = _main(capsys, "--checkpoint", runs["sft"], "--raw", "--prompt", "The king", "--temperature", 0,
                         "--max_new_tokens", 4)
  assert status == 0 and out.startswith("The king") and "[user]" not in out


def test_score_prints_the_normalised_reward_of_each_response(runs, capsys):
  responses = ["To the sea, gladly.", "No."]
  argv = ["--checkpoint", runs["reward"], "--score", "--prompt", "Where does the king walk?", "--json"]
  status, out, _ = _main(capsys, *argv, *[a for r in responses for a in ("--response", r)])
  assert status == 0
  records = _json_lines(out)
  assert [r["reply"] for r in records] == responses
  assert all(r["reward"] == pytest.approx(r["raw_score"] - REWARD_OFFSET) for r in records)
  assert records[0]["reward"] != records[1]["reward"]
  # A response's reward does not depend on the others scored with it.
  _, alone, _ = _main(capsys, *argv, "--response", responses[1])
  assert _json_lines(alone)[0]["reward"] == pytest.approx(records[1]["reward"], abs=1e-5)


@pytest.mark.parametrize("checkpoint, argv, says", [
    ("sft", ("--tokenizer", "other_tokenizer", "--prompt", "Hi"), "sha256"),
    ("sft", ("--score", "--prompt", "Hi", "--response", "Hello"), "not a reward model"),
    ("pretrain", ("--chat",), "use --raw"),
    ("reward", ("--prompt", "Hi"), "a reward model scores replies"),
    ("sft", ("--prompt", "Hi", "--max_new_tokens", 48), "context length 48"),
], ids=["tokenizer_mismatch", "score_on_sft", "chat_on_pretrain", "generate_with_reward", "too_many_new_tokens"])
def test_refusals_exit_2_with_one_line(runs, capsys, checkpoint, argv, says):
  argv = [runs.get(a, a) for a in argv]
  status, out, err = _main(capsys, "--checkpoint", runs[checkpoint], *argv)
  assert status == 2 and out == ""
  assert says in _one_line_error(err)


def test_missing_checkpoint_exits_2(tmp_path, capsys):
  status, _, err = _main(capsys, "--checkpoint", tmp_path / "nowhere", "--prompt", "Hi")
  assert status == 2 and "no such folder" in _one_line_error(err)


def test_command_line_smoke(runs):
  result = run([sys.executable, "-m", "gptrl.sample", "--checkpoint", str(runs["sft"]), "--prompt", "Hi",
                "--num_samples", "2", "--max_new_tokens", "4", "--json"], timeout=120)
  check_ok(result)
  assert [r["sample"] for r in _json_lines(result.stdout)] == [0, 1]  # stdout holds only the replies
  assert "Loaded" in result.stderr


def _chats(path: pathlib.Path) -> pathlib.Path:
  rng = random.Random(0)
  with open(path, "w", encoding="utf-8") as f:
    for _ in range(40):
      who, where = rng.choice(["the king", "a fox"]), rng.choice(["the sea", "the gate"])
      f.write(json.dumps({"prompt": f"Where does {who} walk?", "response": f"To {where}."}) + "\n")
  return path


def _comparisons(path: pathlib.Path) -> pathlib.Path:
  with open(path, "w", encoding="utf-8") as f:
    for i in range(24):
      f.write(json.dumps({"prompt": f"Where does the king walk? ({i})", "chosen": "To the sea, gladly.",
                          "rejected": "No."}) + "\n")
  return path


@pytest.mark.slow
def test_real_sft_and_reward_runs(runs, tmp_path, capsys):
  cache = tmp_path / "cache"
  sft, reward = tmp_path / "sft", tmp_path / "reward"
  common = {"data.cache_dir": cache, "data.eval_fraction": 0.2, "data.eval_batches": 1, "train.steps": 2,
            "train.checkpoint_every": 2, "train.eval_every": 2, "train.progress_bar": False,
            "train.eval_at_start": False}
  check_ok(run(_launch("sft_cpu.py:tiny", **common, **{
      "workdir": sft, "init.checkpoint": runs["pretrain"], "data.sources": f"('{_chats(tmp_path / 'c.jsonl')}',)",
      "data.batch_size": 8, "sample.num_prompts": 0})))
  check_ok(run(_launch("reward_cpu.py:tiny", **common, **{
      "workdir": reward, "init.checkpoint": sft, "data.sources": f"('{_comparisons(tmp_path / 'p.jsonl')}',)",
      "data.batch_size": 4, "reward.normalize_samples": 2, "reward.normalize_max_new_tokens": 4})))
  status, out, _ = _main(capsys, "--checkpoint", sft, "--prompt", "Where does the king walk?", "--json",
                         "--max_new_tokens", 4)
  assert status == 0 and len(_json_lines(out)) == 1
  status, out, _ = _main(capsys, "--checkpoint", reward, "--score", "--prompt", "Where does the king walk?",
                         "--response", "To the sea, gladly.", "--json")
  offset = ckpt_lib.read_step_meta(str(reward / "checkpoints"), 2)["reward_offset"]
  record = _json_lines(out)[0]
  assert status == 0 and record["reward"] == pytest.approx(record["raw_score"] - offset)


def test_best_of_n_returns_the_candidate_the_reward_model_prefers(runs, capsys):
  common = ("--checkpoint", runs["sft"], "--prompt", "Where does the king walk?", "--temperature", 1.0, "--seed", 3,
            "--max_new_tokens", 6, "--json")
  status, out, _ = _main(capsys, *common, "--num_samples", 4)
  candidates = [r["reply"] for r in _json_lines(out)]
  assert status == 0 and len(set(candidates)) > 1
  status, out, _ = _main(capsys, "--checkpoint", runs["reward"], "--score", "--prompt", "Where does the king walk?",
                         "--json", *[a for c in candidates for a in ("--response", c or " ")])
  rewards = [r["reward"] for r in _json_lines(out)]
  status, out, _ = _main(capsys, *common, "--best-of", 4, "--reward-model", runs["reward"])
  assert status == 0
  (picked,) = _json_lines(out)
  assert picked["reply"] == candidates[int(np.argmax(rewards))]


def test_best_of_n_needs_a_reward_model_of_the_same_pipeline(runs, capsys):
  status, _, err = _main(capsys, "--checkpoint", runs["sft"], "--prompt", "Hi", "--best-of", 2)
  assert status == 2 and "--reward_model RUN" in _one_line_error(err)
  status, _, err = _main(capsys, "--checkpoint", runs["sft"], "--prompt", "Hi", "--best-of", 2, "--reward-model",
                         runs["sft"])
  assert status == 2 and "not a reward model" in _one_line_error(err)
