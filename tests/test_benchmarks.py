"""The benchmarks' shared tools (fast), and each benchmark script end to end on a toy model (slow)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import benchlib  # noqa: E402  pylint: disable=wrong-import-position


def test_interleaved_runs_round_robin_and_ratio_uses_rounds():
  calls = []
  times = benchlib.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3)
  assert calls == ["a", "b"] * 3
  assert [len(v) for v in times.values()] == [3, 3]
  r = benchlib.ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0])
  assert r["best"] == 2.0  # min(2, 4, 9) / min(1, 1, 3)
  assert r["median_per_round"] == 3.0  # median of 2, 4, 3


def test_format_table_aligns_and_marks_missing_values():
  text = benchlib.format_table([{"name": "gptrl", "x": 1234.5}, {"name": "torch"}],
                               [("name", "side", ""), ("x", "tokens/s", ",.0f")])
  lines = text.splitlines()
  assert lines[0].split() == ["side", "tokens/s"]
  assert set(lines[1].replace(" ", "")) == {"-"}
  assert lines[2].split() == ["gptrl", "1,234"] and lines[3].split() == ["torch", "-"]
  assert len({len(line) for line in lines}) == 1


def test_memory_bandwidth_and_peak_are_positive_and_finite():
  bw = benchlib.memory_bandwidth(megabytes=8, repeats=2)
  peak = benchlib.matmul_peak(sizes=(128,), repeats=2)
  assert 1e8 < bw["bytes_per_s"] < 1e13
  assert 1e7 < peak["flops"] < 1e16


def test_compile_plans_table_row_from_a_report():
  import compile_plans  # pylint: disable=import-outside-toplevel
  gib = 2 ** 30
  train = {"name": "train step", "total": 19 * gib, "estimate": 38 * gib, "projected_mfu": 0.25,
           "model_flops": 9.0, "matmul_flops": 10.0, "projected_seconds": 0.5,
           "collectives": {"all-gather": {"count": 3, "bytes": 1.5 * gib},
                           "all-reduce": {"count": 1, "bytes": gib / 2}},
           "compile_s": 30.0}
  report = {"topology": "v5p:2x2x2", "programs": [train, {**train, "name": "eval step", "total": 47.5 * gib,
                                                          "compile_s": 10.0}]}
  cells = [c.strip() for c in compile_plans.row("pretrain", "125m", "v5p", report).split("|")[1:-1]]
  assert cells == ["pretrain", "125m", "v5p", "v5p:2x2x2", "eval step: 47.5 of 95 GiB (50% free)", "-", "2.00",
                   "25-90%", "500", "2.0", "40"]
  report["programs"][0]["least_total"] = 40 * gib  # compiled for the least memory too: the estimate's reference
  cells = [c.strip() for c in compile_plans.row("pretrain", "125m", "v5p", report).split("|")[1:-1]]
  assert cells[5:7] == ["0.95", "2.00"]
  assert "not compiled yet" in compile_plans.row("ppo", "7b", "v5p", None)


def test_compile_plans_before_after_row_from_two_reports(tmp_path):
  """`--before NAME`: the train program of `<plan>_NAME.json` beside that of `<plan>.json`."""
  import compile_plans  # pylint: disable=import-outside-toplevel
  gib = 2 ** 30

  def report(total, least, moved, seconds, mfu):
    return {"topology": "v6e:4x4", "programs": [{"name": "train step", "total": total * gib, "least_total": least,
                                                  "model_flops": 9.0, "matmul_flops": 10.0, "bytes_accessed": moved,
                                                  "projected_seconds": seconds, "projected_mfu": mfu,
                                                  "compile_s": 60.0}]}
  (tmp_path / "pretrain_125m_v6e_old.json").write_text(json.dumps(report(9, None, 167e9, 0.102, 0.31)))
  assert compile_plans.compare("pretrain", "125m", "v6e", str(tmp_path), "old") is None  # no report after
  (tmp_path / "pretrain_125m_v6e.json").write_text(json.dumps(report(9, 8.7 * gib, 121e9, 0.074, 0.425)))
  cells = [c.strip() for c in compile_plans.compare("pretrain", "125m", "v6e", str(tmp_path), "old").split("|")[1:-1]]
  assert cells == ["pretrain", "125m", "v6e:4x4", "train step", "9.0* → 8.7", "1.11 → 1.11", "167 → 121",
                   "102 → 74", "31% → 42%", "60 → 60"]


def _run(script: str, *args: str, tmp_path: pathlib.Path) -> dict:
  out = tmp_path / f"{script}.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the machine's devices, not the 8 fake ones
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args, "--out", str(out)],
                        capture_output=True, text=True, timeout=900, cwd=ROOT, env=env, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(out.read_text())


@pytest.mark.slow
def test_train_throughput_runs_every_stage_with_the_torch_peer(tmp_path):
  pytest.importorskip("transformers")
  report = _run("train_throughput", "--model", "tiny", "--rounds", "1", "--warmup", "1", "--peak_sizes", "256",
                tmp_path=tmp_path)
  assert [r["stage"] for r in report["results"]] == ["pretrain", "sft", "reward"]
  for r in report["results"]:
    assert r["params"]["gptrl"] == r["params"]["torch"]  # the identical model on both sides
    assert 0 < r["gptrl"]["mfu_causal"] <= r["gptrl"]["mfu_full"]
    assert r["speedup_over_torch"]["best"] > 0


@pytest.mark.slow
def test_decode_speed_runs_with_the_transformers_peer(tmp_path):
  pytest.importorskip("transformers")
  report = _run("decode_speed", "--batch", "2", "--new_tokens", "4", "--prompt_len", "4", "--rounds", "1",
                "--recompute", tmp_path=tmp_path)
  row = report["results"][0]
  assert {"gptrl", "gptrl no cache", "transformers"} <= set(row)
  assert row["bytes_per_step"] > 4 * 4_000_000  # at least the ~4.3M fp32 parameters


# The script runs once in the default suite (dpo); grpo, ~45 s on 2 cores, with -m slow.
@pytest.mark.parametrize("algo,key", [pytest.param("grpo", "episodes_per_s", marks=pytest.mark.slow),
                                      ("dpo", "tokens_per_s")])
def test_grpo_and_dpo_benchmarks_run_their_gptrl_side(tmp_path, algo, key):
  # The trl side needs the bench extra (trl, torch); the gptrl side is the library's learner / train step.
  report = _run("grpo_dpo_vs_trl", "--algo", algo, "--side", "gptrl", "--num_layers", "1", "--d_model", "32",
                "--vocab_size", "64", "--prompt_len", "8", "--new_tokens", "4", "--prompts", "2", "--group", "4",
                "--pairs", "4", "--iterations", "1", tmp_path=tmp_path)
  assert report["results"]["gptrl"][key] > 0 and "ratio_gptrl_over_trl" not in report


@pytest.mark.slow  # ~60-80 s on 2 cores; the server itself is tests/test_serve.py's, in the default run
def test_serve_load_runs_clients_against_a_real_server(tmp_path):
  report = _run("serve_load", "--small", "--clients", "1", "--clients", "3", "--max_tokens", "6",
                "--requests_per_client", "1", "--peer", "none", tmp_path=tmp_path)
  one, three = report["runs"]
  assert (one["clients"], three["clients"]) == (1, 3) and one["x_one_at_a_time"] == 1.0
  assert one["requests"] == 32 and 0 < one["tokens"] <= 32 * 6 and one["ttft_p50_s"] <= one["latency_p50_s"]
  assert report["offline"]["batch_16_over_1"] > 0 and report["peer"] is None
