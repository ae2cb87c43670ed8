"""gs:// works wherever a path is accepted: workdirs, data, tokenizers, checkpoints and their hand-off, reports.

The bucket is fake (tests/fake_gcs.py): `gs://bkt/key` is the local file `<root>/bkt/key`, reached through the
same layers as a real bucket (etils.epath over fsspec, orbax's commit-file mode, tensorstore's kvstore), so the
tests see what landed "in the bucket" by looking at that folder. No network.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import fake_gcs
from gptrl import chat_data
from gptrl import checkpoint as ckpt_lib
from gptrl import config as config_lib
from gptrl import data as data_lib
from gptrl import fileio
from gptrl import hf
from gptrl import label
from gptrl import report
from gptrl import tokenizer as tokenizer_lib
from gptrl.metrics import MetricsWriter
from gptrl.stages import recipe
from helpers import REPO, env, params, train_steps, write_chats, write_corpus


@pytest.fixture(scope="module")
def bucket(tmp_path_factory) -> pathlib.Path:
  """The folder behind gs:// for this module's process; each test uses its own key prefix in bucket `bkt`."""
  root = tmp_path_factory.mktemp("gcs")
  uninstall = fake_gcs.install(str(root))
  yield root
  uninstall()


@pytest.fixture(params=["local", "gs"])
def where(request, bucket, tmp_path) -> tuple[str, pathlib.Path]:
  """(path as gptrl is given it, the local folder holding its files): a temp folder, or a key prefix in the bucket."""
  if request.param == "local":
    return str(tmp_path), tmp_path
  prefix = f"bkt/{request.node.name.replace('[', '_').replace(']', '')}"
  return f"gs://{prefix}", bucket / prefix


# ----------------------------------------------------------------------------------------------
# gptrl/fileio.py on local paths and on the bucket.


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(where):
  path, folder = where
  fileio.atomic_write(f"{path}/a.json", '{"v": 1}')
  fileio.atomic_write(f"{path}/a.json", b'{"v": 2}')
  assert json.loads((folder / "a.json").read_text()) == {"v": 2}
  assert sorted(os.listdir(folder)) == ["a.json"]


def test_atomic_open_that_fails_keeps_the_old_file(where):
  path, folder = where
  fileio.atomic_write(f"{path}/a.txt", "old")
  with pytest.raises(RuntimeError):
    with fileio.atomic_open(f"{path}/a.txt", "w") as f:
      f.write("half of the new")
      raise RuntimeError("writer failed")
  assert (folder / "a.txt").read_text() == "old"
  assert sorted(os.listdir(folder)) == ["a.txt"]


def test_listing_walking_and_globbing(where):
  path, _ = where
  for name in ("x/1.jsonl", "x/2.jsonl", "x/sub/3.jsonl", "y.txt"):
    fileio.atomic_write(f"{path}/{name}", "{}\n")
  assert sorted(fileio.listdir(path)) == ["x", "y.txt"]
  assert fileio.isdir(f"{path}/x") and not fileio.isdir(f"{path}/y.txt")
  assert fileio.isfile(f"{path}/y.txt") and not fileio.isfile(f"{path}/x")
  assert fileio.exists(f"{path}/x/sub/3.jsonl") and not fileio.exists(f"{path}/nothing")
  walked = [(root[len(path):], dirs, files) for root, dirs, files in fileio.walk(f"{path}/x")]
  assert sorted(walked) == [("/x", ["sub"], ["1.jsonl", "2.jsonl"]), ("/x/sub", [], ["3.jsonl"])]
  assert fileio.glob(f"{path}/x/*.jsonl") == [f"{path}/x/1.jsonl", f"{path}/x/2.jsonl"]
  assert fileio.getsize(f"{path}/y.txt") == 3


def test_open_reads_and_writes_text_and_bytes(where):
  path, folder = where
  with fileio.open(f"{path}/t.txt", "w") as f:
    f.write("héllo\nwörld\n")
  with fileio.open(f"{path}/b.bin", "wb") as f:
    f.write(b"\x00\xff")
  assert (folder / "t.txt").read_bytes() == "héllo\nwörld\n".encode()
  with fileio.open(f"{path}/t.txt") as f:
    assert list(f) == ["héllo\n", "wörld\n"]
  assert fileio.read_bytes(f"{path}/b.bin") == b"\x00\xff"


def test_append_and_truncate(where):
  path, folder = where
  fileio.append(f"{path}/log.jsonl", "a\n")
  fileio.append(f"{path}/log.jsonl", b"b\n", fsync=True)
  fileio.truncate(f"{path}/log.jsonl", 2)
  assert (folder / "log.jsonl").read_text() == "a\n"


def test_a_bucket_object_cannot_be_opened_for_appending(bucket):
  with pytest.raises(ValueError, match="cannot be appended to"):
    fileio.open("gs://bkt/appending/log.jsonl", "a")


def test_appender_uploads_to_a_bucket_on_sync(bucket):
  log = fileio.Appender("gs://bkt/appender/metrics.jsonl", upload_every_s=3600)
  log.write("1\n")
  assert not (bucket / "bkt/appender/metrics.jsonl").exists()  # kept in memory until a sync
  log.sync()
  log.write("2\n")
  assert (bucket / "bkt/appender/metrics.jsonl").read_text() == "1\n"
  log.close()
  assert (bucket / "bkt/appender/metrics.jsonl").read_text() == "1\n2\n"
  reopened = fileio.Appender("gs://bkt/appender/metrics.jsonl")  # a resumed run appends after the old rows
  reopened.write("3\n")
  reopened.close()
  assert (bucket / "bkt/appender/metrics.jsonl").read_text() == "1\n2\n3\n"


def test_metrics_writer_in_a_bucket_keeps_rows_tensorboard_and_resumes(bucket):
  writer = MetricsWriter("gs://bkt/metrics")
  for step in (1, 2, 3):
    writer.write(step, {"train/loss": 1.0 / step})
  writer.write_texts(3, "samples", ["hello"])
  writer.close()
  writer = MetricsWriter("gs://bkt/metrics", resume_step=2)
  writer.write(3, {"train/loss": 0.25})
  writer.close()
  rows = [json.loads(line) for line in (bucket / "bkt/metrics/metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.25)]
  assert json.loads((bucket / "bkt/metrics/samples.jsonl").read_text())["texts"] == ["hello"]
  assert list((bucket / "bkt/metrics/tensorboard").glob("events.out.tfevents.*"))  # copied from a local folder


def test_urls_are_kept_whole_where_os_path_would_break_them():
  assert fileio.abspath("gs://bkt/run/") == "gs://bkt/run"
  assert fileio.abspath("runs/x") == os.path.abspath("runs/x")
  assert os.path.join(fileio.abspath("gs://bkt/run"), "checkpoints") == "gs://bkt/run/checkpoints"


def test_config_refuses_an_unusable_url_naming_the_key():
  with pytest.raises(config_lib.ConfigError, match=r"config.workdir: ftp://host/run: unsupported URL scheme"):
    config_lib.PretrainConfig(workdir="ftp://host/run")
  with pytest.raises(config_lib.ConfigError, match=r"config.workdir: s3://b/run: s3:// paths need s3fs"):
    config_lib.PretrainConfig(workdir="s3://b/run")
  with pytest.raises(config_lib.ConfigError, match=r"config.data.cache_dir: must be a local folder"):
    config_lib.DataConfig(cache_dir="gs://bkt/cache")


def test_local_only_tools_refuse_a_bucket_in_one_line(bucket, capsys):
  assert label.main(["--replies", "replies.jsonl", "--out", "gs://bkt/labels"]) == 2
  assert "--out gs://bkt/labels: must be a local folder" in capsys.readouterr().err
  with pytest.raises(hf.HFError, match="--out gs://bkt/hf: must be a local folder"):
    hf.export_checkpoint("gs://bkt/run", "gs://bkt/hf")


def test_chat_data_is_read_from_a_file_folder_or_glob_in_the_bucket(bucket):
  (bucket / "bkt/chats").mkdir(parents=True)
  write_chats(bucket / "bkt/chats/a.jsonl", n=10)
  for source in ("gs://bkt/chats/a.jsonl", "gs://bkt/chats", "gs://bkt/chats/*.jsonl"):
    conversations = chat_data.load_conversations([source])
    assert len(conversations) == 10, source
  with pytest.raises(data_lib.DataError, match=r"'\*\*' is not supported"):
    chat_data.load_conversations(["gs://bkt/**/a.jsonl"])
  with pytest.raises(data_lib.DataError, match="no such file or folder"):
    chat_data.load_conversations(["gs://bkt/chats/missing.jsonl"])


def test_tokenizer_trains_into_and_loads_from_a_bucket(bucket):
  texts = [f"line {i} of some text about the sea and the hills" for i in range(50)]
  tok = tokenizer_lib.train_tokenizer(texts, "gs://bkt/tok/tokenizer.model", vocab_size=300)
  assert (bucket / "bkt/tok/tokenizer.model").read_bytes() == tok._model_proto  # pylint: disable=protected-access
  assert tokenizer_lib.load_tokenizer("gs://bkt/tok/tokenizer.model").sha256 == tok.sha256


# ----------------------------------------------------------------------------------------------
# Checkpoints in a bucket: orbax's commit-file mode, and this module's set-aside and deletion logic.


def _tiny_state(value: float) -> dict:
  return {"params": {"w": jax.numpy.full((4,), value)}}


def test_checkpointer_in_a_bucket_keeps_the_newest_and_sets_aside_an_interrupted_save(bucket):
  folder, local = "gs://bkt/ckpt/checkpoints", bucket / "bkt/ckpt/checkpoints"
  saver = ckpt_lib.Checkpointer(folder, keep=2, async_save=False)
  for step in (1, 2, 3):
    saver.save(step, _tiny_state(step), data={"i": step}, meta={"stage": "test"})
  saver.close()
  assert sorted(os.listdir(local)) == ["2", "3"]  # step 1 deleted, no deletion marker left
  assert (local / "3" / ckpt_lib.MANIFEST).is_file() and (local / "3" / "commit_success.txt").is_file()
  # A kill mid-save in commit-file mode leaves a step folder without commit_success.txt.
  (local / "4" / "state").mkdir(parents=True)
  (local / "4" / "state" / "half").write_bytes(b"x")
  # A kill mid-deletion leaves the marker and the uncommitted folder.
  (local / "2.gc-deleting").write_bytes(b"")
  (local / "2" / "commit_success.txt").unlink()
  reopened = ckpt_lib.Checkpointer(folder, keep=2, async_save=False)
  try:
    assert reopened.latest_step() == 3
    abstract = ckpt_lib.abstract_like(_tiny_state(0.0), jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(
        jax.devices()[0]), _tiny_state(0.0)))
    step, state, data, _ = reopened.restore_latest_valid(abstract)
  finally:
    reopened.close()
  assert step == 3 and data == {"i": 3} and float(state["params"]["w"][0]) == 3.0
  names = sorted(os.listdir(local))
  assert names[0] == "3" and len(names) == 2 and names[1].startswith("4.corrupt-interrupted-save-"), names


# ----------------------------------------------------------------------------------------------
# A pretraining run with its workdir and data in the bucket, resumed, then handed to the next stage.


def _launch(bucket: pathlib.Path, cache: pathlib.Path, steps: int) -> subprocess.CompletedProcess:
  flags = {"workdir": "gs://bkt/run", "data.sources": "('gs://bkt/corpus/*.txt',)", "data.cache_dir": str(cache),
           "train.steps": steps, "train.checkpoint_every": 2, "train.keep_checkpoints": 2, "train.log_every": 2,
           "train.eval_every": 4, "tokenizer.vocab_size": 300, "model.max_len": 48, "data.batch_size": 8,
           "train.progress_bar": False, "sample.max_new_tokens": 0}
  argv = [sys.executable, str(REPO / "tests/fake_gcs.py"), str(bucket), "-m", "gptrl.launch", "--config",
          str(REPO / "configs/pretrain_cpu.py:tiny")] + [f"--config.{k}={v}" for k, v in flags.items()]
  # The resumed run reuses the first one's compiled programs.
  run_env = {**env(), "JAX_COMPILATION_CACHE_DIR": str(cache / "jax"),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  result = subprocess.run(argv, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-4000:]}"
  return result


@pytest.fixture(scope="module")
def run_in_bucket(bucket, tmp_path_factory) -> tuple[pathlib.Path, str]:
  """(the run's folder in the bucket, the resumed launch's log): 4 steps, then resumed to 6."""
  write_corpus(bucket / "bkt/corpus")
  cache = tmp_path_factory.mktemp("cache")
  _launch(bucket, cache, steps=4)
  resumed = _launch(bucket, cache, steps=6)
  return bucket / "bkt/run", resumed.stderr


def test_pretraining_writes_its_workdir_into_the_bucket(run_in_bucket):
  run, _ = run_in_bucket
  for name in ("config.json", "tokenizer.model", "metrics.jsonl"):
    assert (run / name).is_file(), name
  assert list((run / "tensorboard").glob("events.out.tfevents.*"))
  assert json.loads((run / "config.json").read_text())["workdir"] == "gs://bkt/run"
  for step in ("4", "6"):
    assert (run / "checkpoints" / step / ckpt_lib.MANIFEST).is_file()
    assert ckpt_lib.verify_step(str(run / "checkpoints" / step)) is None  # the manifest matches what landed


def test_resume_from_the_bucket_continues_at_the_saved_step(run_in_bucket):
  run, log = run_in_bucket
  assert "Resumed from gs://bkt/run/checkpoints/4." in log
  assert train_steps(run) == [2, 4, 6]
  assert sorted(os.listdir(run / "checkpoints")) == ["4", "6"]  # keep=2: step 2 deleted from the bucket


def test_next_stage_starts_from_the_checkpoint_in_the_bucket(run_in_bucket):
  run, _ = run_in_bucket
  model_cfg, tok, meta = recipe.init_source(config_lib.InitConfig(checkpoint="gs://bkt/run"), "", "gs://bkt/sft",
                                            config_lib.ModelRuntimeConfig(), expect_stage=("pretrain",))
  assert meta["init_checkpoint"] == "gs://bkt/run/checkpoints/6" and model_cfg.vocab_size == tok.vocab_size
  assert (run.parent / "sft" / "tokenizer.model").read_bytes() == (run / "tokenizer.model").read_bytes()
  expected = params(run, 6)  # read from the local folder behind the bucket
  saved = ckpt_lib.ocp.PyTreeCheckpointer().metadata("gs://bkt/run/checkpoints/6/state").item_metadata["params"]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
  loaded, _, loaded_from = ckpt_lib.load_params("gs://bkt/run", target, tokenizer_sha256=tok.sha256)
  assert loaded_from == "gs://bkt/run/checkpoints/6"
  got = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(loaded)}
  assert got.keys() == expected.keys()
  for name, value in expected.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_report_reads_a_run_in_the_bucket_and_writes_into_it(run_in_bucket):
  run, _ = run_in_bucket
  out = report.write_report(report.find_stage_dirs("gs://bkt/run"), "gs://bkt/run/report.html")
  assert out == "gs://bkt/run/report.html"
  assert "<html" in (run / "report.html").read_text(encoding="utf-8").lower()
