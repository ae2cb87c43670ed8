"""PPO episodes/s of gptrl against Hugging Face trl's PPOTrainer, same tiny models, same lengths, one run.

  python benchmarks/ppo_vs_trl.py --out ppo_vs_trl.json              # ~4-5 minutes on 2 busy CPU cores
  python benchmarks/ppo_vs_trl.py --iterations 4 --out ppo_vs_trl.json  # tighter numbers
  python benchmarks/ppo_vs_trl.py --side gptrl --iterations 3         # one side only

Needs the benchmark-only extra (`pip install -e ".[bench]"`: trl with its accelerate and datasets); the library
(gptrl/) never imports torch, transformers or trl.

The setup, the same on both sides:
  * four GPT-2-architecture models with random weights built from a config (no downloads): the policy, a frozen
    reference (a copy of the policy), a separate value model and a frozen reward model, each its own transformer
    (learned positions, LayerNorm, tanh-GELU, biases, tied LM head). gptrl runs `ppo.critic="separate"`, the
    setting that matches trl's separate value model;
  * the same random prompts (fixed length, no padding), sampled at temperature 1 with no top-k/top-p and no stop
    token, so every response has exactly `--new_tokens` tokens;
  * rollout_batch_size responses per iteration, then `--epochs` passes of rollout_batch/minibatch optimizer steps
    (AdamW, no weight decay, no gradient clipping: trl's PPO loop does not clip), fixed KL coefficient, k1 KL in
    the reward, GAE(gamma=1, lambda=0.95), whitened advantages, vf_coef 0.1, clip 0.2 / value clip 0.2;
  * fp32 on CPU.

Each side runs in a subprocess of its own (no shared thread pools or allocator state between JAX and torch), one
after the other. Threads: `--threads` (default `os.cpu_count()`) on both sides: torch is pinned to that many
intra-op threads (`torch.set_num_threads`); XLA's CPU client sizes its pool to the process's CPU affinity, so
with fewer threads than CPUs each side's process is bound (`os.sched_setaffinity`) to the first `--threads` CPUs.
On a shared machine other processes slow both sides down (and multi-threaded ops suffer most: a thread that is
descheduled stalls the others at each barrier); the report records the load average and, where the kernel has
it, the CPU pressure (/proc/pressure/cpu, the share of time runnable tasks waited for a CPU) around each side.

Timing: `--warmup` untimed iterations first (gptrl compiles its sampler, scorer and train step there; trl and
torch make their lazy allocations), then `--iterations` timed ones. episodes/s = rollout_batch_size * iterations /
seconds. The split per iteration:
  * gptrl: `Learner.iteration`'s own timers, `time/rollout_s` (sampling + the jitted scoring: policy, reference,
    critic and reward-model forwards, KL, GAE) and `time/learn_s` (the epochs of minibatch train steps);
  * trl: no monkeypatching: a forward pre-hook on the trainer's PolicyAndValueWrapper (called only by the learning
    loop; the rollout calls the policy, value and reward models directly) marks the start of learning, and a
    TrainerCallback's on_step_end marks the end of its updates; after it, trl cleans up with an explicit
    gc.collect(), whose end (seen through `gc.callbacks`) is where the next iteration starts. rollout = iteration
    start -> first learning forward (data loader, generate, reference/value/reward forwards, GAE); learn = first
    learning forward -> on_step_end (the minibatch updates and the metrics logging); other = the clean-up.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import hashlib
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # pylint: disable=wrong-import-position

import gptrl  # pylint: disable=wrong-import-position  (its __init__ imports nothing: jax loads in the gptrl child)

SIDES = ("gptrl", "trl")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """The shared setup of both sides."""
  vocab_size: int = 4096
  num_layers: int = 4
  num_heads: int = 4
  d_model: int = 256
  prompt_len: int = 64  # P: tokens per prompt (no padding)
  new_tokens: int = 32  # N: tokens generated per response (no stop token)
  rollout_batch_size: int = 32  # responses per PPO iteration
  minibatch_size: int = 16  # responses per optimizer step
  epochs: int = 4  # PPO passes over each rollout
  iterations: int = 1  # timed PPO iterations (more for tighter numbers: each trl one takes minutes here)
  warmup: int = 1  # untimed PPO iterations before them (the first compiles)
  lr: float = 1e-5
  kl_coef: float = 0.05
  seed: int = 0
  threads: int = 0  # intra-op threads (and CPUs) of each side; 0: os.cpu_count()

  @property
  def updates_per_iteration(self) -> int:
    return self.epochs * (self.rollout_batch_size // self.minibatch_size)


def resolved_threads(cfg: BenchConfig) -> int:
  return cfg.threads or os.cpu_count() or 1


def bind_to_cpus(threads: int) -> None:
  """Binds this process to its first `threads` allowed CPUs (XLA sizes its thread pool to the affinity)."""
  if hasattr(os, "sched_setaffinity"):
    allowed = sorted(os.sched_getaffinity(0))
    if threads < len(allowed):
      os.sched_setaffinity(0, allowed[:threads])


def cpu_pressure() -> dict[str, float] | None:
  """The kernel's CPU pressure ("some" line: avg10/avg60 in %), or None where /proc/pressure is missing."""
  try:
    with open("/proc/pressure/cpu", encoding="utf-8") as f:
      some = f.readline().split()
  except OSError:
    return None
  fields = dict(kv.split("=") for kv in some[1:])
  return {"avg10": float(fields["avg10"]), "avg60": float(fields["avg60"])}


def make_prompts(cfg: BenchConfig) -> np.ndarray:
  """[(warmup + iterations) * rollout_batch_size, P] random token ids, the same on both sides."""
  rng = np.random.default_rng(cfg.seed)
  rows = (cfg.warmup + cfg.iterations) * cfg.rollout_batch_size
  return rng.integers(0, cfg.vocab_size, (rows, cfg.prompt_len), dtype=np.int64)


def prompts_digest(prompts_RxP: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(prompts_RxP, np.int64).tobytes()).hexdigest()[:16]


def summarize(cfg: BenchConfig, wall_s: list[float], rollout_s: list[float], learn_s: list[float]) -> dict[str, Any]:
  """Per-iteration means of the timed iterations and the throughput."""
  total = float(sum(wall_s))
  return {"iterations": len(wall_s), "seconds": total, "seconds_per_iteration": total / len(wall_s),
          "episodes_per_s": cfg.rollout_batch_size * len(wall_s) / total,
          "rollout_s": float(np.mean(rollout_s)), "learn_s": float(np.mean(learn_s)),
          "other_s": float(np.mean(np.asarray(wall_s) - np.asarray(rollout_s) - np.asarray(learn_s))),
          "rollout_share": float(np.sum(rollout_s) / max(np.sum(rollout_s) + np.sum(learn_s), 1e-9)),
          "per_iteration": {"wall_s": wall_s, "rollout_s": rollout_s, "learn_s": learn_s}}


# ----------------------------------------------------------------------------------------------------------------
# gptrl


def run_gptrl(cfg: BenchConfig) -> dict[str, Any]:
  """The library's PPO Learner on random-init models; one Learner.iteration per PPO iteration."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from gptrl import config as config_lib  # pylint: disable=import-outside-toplevel
  from gptrl import model as model_lib  # pylint: disable=import-outside-toplevel
  from gptrl import optim  # pylint: disable=import-outside-toplevel
  from gptrl import sharding  # pylint: disable=import-outside-toplevel
  from gptrl import trainer  # pylint: disable=import-outside-toplevel
  from gptrl.stages import ppo  # pylint: disable=import-outside-toplevel
  from gptrl.stages import recipe  # pylint: disable=import-outside-toplevel

  total_iterations = cfg.warmup + cfg.iterations
  max_len = cfg.prompt_len + cfg.new_tokens
  # GPT-2's architecture as gptrl/hf.py maps it.
  model_cfg = config_lib.ModelConfig(
      vocab_size=cfg.vocab_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads, d_model=cfg.d_model,
      max_len=max_len, pos_embedding="learned", norm="layernorm", norm_eps=1e-5, mlp_activation="gelu_tanh",
      mlp_bias=True, attention_bias=True, tie_embeddings=True, dropout=0.0)
  ppo_cfg = config_lib.PPOConfig(
      init=config_lib.InitConfig("unused"), reward_model=config_lib.InitConfig("unused"),
      ppo=config_lib.PPOAlgoConfig(
          rollout_batch_size=cfg.rollout_batch_size, minibatch_size=cfg.minibatch_size, epochs=cfg.epochs,
          max_new_tokens=cfg.new_tokens, temperature=1.0, top_k=0, top_p=1.0, kl_estimator="k1",
          kl_in_reward=True, init_beta=cfg.kl_coef, target_kl=0.0, whiten_rewards=False, gamma=1.0, lam=0.95,
          whiten_advantages=True, clip_eps=0.2, clip_eps_value=0.2, vf_coef=0.1, entropy_coef=0.0,
          critic="separate", critic_init="sft", num_eval_prompts=0),
      optim=config_lib.OptimConfig(lr=cfg.lr, warmup_steps=0, min_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8,
                                   weight_decay=0.0, clip_norm=0.0),
      train=config_lib.TrainConfig(steps=total_iterations, progress_bar=False),
      seed=cfg.seed)
  models = ppo.make_models(model_cfg, model_cfg, ppo_cfg.ppo)
  mesh = sharding.make_mesh(config_lib.MeshConfig())
  init_params = functools.partial(ppo.init_params, models)

  optimizer = optim.make_optimizer(ppo_cfg.optim, total_iterations * cfg.updates_per_iteration)
  state, state_shardings = trainer.create_train_state(init_params, optimizer, cfg.seed, mesh)
  # The frozen reference starts equal to the policy (as in ppo.run), in buffers of its own (the step donates).
  ref_params = jax.tree.map(lambda x: jnp.array(x, copy=True), state.params["policy"])
  with sharding.activate(mesh):
    rm_init = recipe.init_params(models.reward, max_len)
    rm_shardings = sharding.tree_shardings(jax.eval_shape(rm_init, jax.random.key(cfg.seed + 1)), mesh)
    rm_params = jax.jit(lambda r: nn.meta.unbox(rm_init(r)), out_shardings=rm_shardings)(
        jax.random.key(cfg.seed + 1))
  learner = ppo.Learner(ppo_cfg, models, mesh, optimizer, state_shardings, ref_params, rm_params,
                        ppo.make_score_fn(models, ppo_cfg, 0.0), pad_id=0, stop_id=-1)

  prompts_RxP = make_prompts(cfg)
  beta, wall_s, rollout_s, learn_s, rows = cfg.kl_coef, [], [], [], []
  warmup_s = 0.0
  for it in range(total_iterations):
    batch = prompts_RxP[it * cfg.rollout_batch_size:(it + 1) * cfg.rollout_batch_size].tolist()
    t0 = time.perf_counter()
    result = learner.iteration(state, batch, it, beta)
    state, row, beta, responses = result.state, result.row, result.beta, result.responses
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - t0
    if it < cfg.warmup:
      warmup_s += elapsed
      continue
    wall_s.append(elapsed)
    rollout_s.append(row["time/rollout_s"])
    learn_s.append(row["time/learn_s"])
    rows.append(row)
    assert all(len(r) == cfg.new_tokens for r in responses), "a gptrl response stopped early"
    assert row["ppo/updates"] == cfg.updates_per_iteration and row["ppo/skipped"] == 0, row
  for row in rows:
    for k in ("ppo/policy_loss", "ppo/value_loss"):
      assert math.isfinite(row[k]), f"gptrl {k} is not finite: {row[k]}"
  device = jax.devices()[0]
  out = summarize(cfg, wall_s, rollout_s, learn_s)
  out.update({
      "warmup_s": warmup_s, "prompts_sha256": prompts_digest(prompts_RxP),
      "threads": (f"XLA CPU default pool over the process's CPU affinity: "
                  f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} CPUs"),
      "device": f"{jax.device_count()} x {device.platform} ({device.device_kind})",
      "num_params": {k: model_lib.count_params(v) for k, v in
                     (("policy", state.params["policy"]), ("value", state.params["value"]), ("reward", rm_params))},
      "final": {"policy_loss": rows[-1]["ppo/policy_loss"], "value_loss": rows[-1]["ppo/value_loss"],
                "kl": rows[-1]["ppo/kl"], "first_ratio": rows[-1]["ppo/first_ratio"]},
      "versions": {"jax": jax.__version__, "jaxlib": _version("jaxlib"),
                   "flax": _version("flax"), "optax": _version("optax")},
  })
  return out


# ----------------------------------------------------------------------------------------------------------------
# trl


def make_hf_tokenizer(vocab_size: int):
  """A word-level tokenizer built in-process (no hub): tokens t0..t{V-1} are ids 0..V-1 of the model's vocabulary;
  <pad>, <eos> and <unk> sit at ids V, V+1, V+2, outside it, so the policy can never sample them: trl derives its
  masks from `token == pad_token_id`, and a sampled pad or eos would end a response early."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  vocab = {f"t{i}": i for i in range(vocab_size)}
  vocab.update({"<pad>": vocab_size, "<eos>": vocab_size + 1, "<unk>": vocab_size + 2})
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                              unk_token="<unk>", padding_side="left")


def run_trl(cfg: BenchConfig) -> dict[str, Any]:
  """trl's PPOTrainer.train() for warmup + iterations PPO iterations, timed from its callbacks and a forward hook."""
  os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
  warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5's renames (gradient_checkpointing)
  import datasets  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  import trl  # pylint: disable=import-outside-toplevel
  try:
    from trl.experimental.ppo import PPOConfig, PPOTrainer  # pylint: disable=import-outside-toplevel
  except ImportError:  # trl 0.20-0.24
    from trl import PPOConfig, PPOTrainer  # pylint: disable=import-outside-toplevel

  threads = resolved_threads(cfg)
  torch.set_num_threads(threads)
  torch.manual_seed(cfg.seed)
  total_iterations = cfg.warmup + cfg.iterations
  max_len = cfg.prompt_len + cfg.new_tokens
  tokenizer = make_hf_tokenizer(cfg.vocab_size)
  hf_cfg = transformers.GPT2Config(
      vocab_size=cfg.vocab_size, n_positions=max_len, n_embd=cfg.d_model, n_layer=cfg.num_layers,
      n_head=cfg.num_heads, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      layer_norm_epsilon=1e-5, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
      num_labels=1)  # trl takes the pad id from the tokenizer and zeroes pad positions before the embedding
  policy = transformers.GPT2LMHeadModel(hf_cfg)
  ref_policy = copy.deepcopy(policy)  # starts equal to the policy, as gptrl's
  value_model = transformers.GPT2ForSequenceClassification(hf_cfg)
  reward_model = transformers.GPT2ForSequenceClassification(hf_cfg)
  for m in (policy, ref_policy, value_model, reward_model):
    m.float()

  prompts_RxP = make_prompts(cfg)
  dataset = datasets.Dataset.from_dict({"input_ids": prompts_RxP.tolist()})
  workdir = tempfile.mkdtemp(prefix="ppo_vs_trl_")
  args = PPOConfig(
      output_dir=workdir, report_to="none", use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
      seed=cfg.seed, learning_rate=cfg.lr, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
      lr_scheduler_type="linear", warmup_steps=0,
      # One rollout of rollout_batch_size; rollout_batch/minibatch minibatches of one micro-batch each, so the
      # optimizer steps once per minibatch as gptrl's does (gradient_accumulation_steps=1).
      per_device_train_batch_size=cfg.rollout_batch_size, gradient_accumulation_steps=1,
      num_mini_batches=cfg.rollout_batch_size // cfg.minibatch_size, num_ppo_epochs=cfg.epochs,
      local_rollout_forward_batch_size=cfg.rollout_batch_size,
      total_episodes=cfg.rollout_batch_size * total_iterations, response_length=cfg.new_tokens,
      stop_token=None, stop_token_id=None, missing_eos_penalty=None, temperature=1.0,
      kl_coef=cfg.kl_coef, kl_estimator="k1", whiten_rewards=False, gamma=1.0, lam=0.95, cliprange=0.2,
      cliprange_value=0.2, vf_coef=0.1,
      # No eval, sample generations, checkpoints or progress printing.
      num_sample_generations=0, eval_strategy="no", save_strategy="no", disable_tqdm=True,
      dataloader_num_workers=0, logging_steps=1)
  ppo_trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                           reward_model=reward_model, value_model=value_model, train_dataset=dataset)
  ppo_trainer.remove_callback(transformers.PrinterCallback)  # the per-iteration metrics dict on stdout

  marks: dict[str, Any] = {"train_begin": None, "step_end": [], "learn_begin": [], "logs": [], "train_end": None}
  response_widths = set()

  class Timer(transformers.TrainerCallback):
    """Iteration boundaries (on_step_end) and the trainer's logged metrics."""

    def on_train_begin(self, args, state, control, **kwargs):  # pylint: disable=redefined-outer-name
      marks["train_begin"] = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # pylint: disable=redefined-outer-name
      marks["step_end"].append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):  # pylint: disable=redefined-outer-name
      if logs and "loss/policy_avg" in logs:
        marks["logs"].append(dict(logs))

    def on_train_end(self, args, state, control, **kwargs):  # pylint: disable=redefined-outer-name
      marks["train_end"] = time.perf_counter()

  def learning_forward(module, args_, kwargs):  # pylint: disable=unused-argument
    """The first PolicyAndValueWrapper call after an iteration boundary: learning has begun."""
    if len(marks["learn_begin"]) == len(marks["step_end"]):
      marks["learn_begin"].append(time.perf_counter())
    response_widths.add(int(kwargs["input_ids"].shape[1]))

  def on_gc(phase, info):
    """End times of full collections: trl ends each iteration with an explicit gc.collect() after on_step_end."""
    if phase == "stop" and info["generation"] == 2:
      gc_ends.append(time.perf_counter())

  gc_ends: list[float] = []
  ppo_trainer.add_callback(Timer())
  hook = ppo_trainer.model.register_forward_pre_hook(learning_forward, with_kwargs=True)
  gc.callbacks.append(on_gc)
  try:
    ppo_trainer.train()
  finally:
    hook.remove()
    gc.callbacks.remove(on_gc)

  step_end, learn_begin = marks["step_end"], marks["learn_begin"]
  assert len(step_end) == total_iterations and len(learn_begin) == total_iterations, (len(step_end), len(learn_begin))
  assert response_widths == {max_len}, f"trl responses are not all {cfg.new_tokens} tokens: widths {response_widths}"
  # Iteration i ends with its clean-up, the first full collection after its on_step_end (before the next
  # iteration's learning begins; the next one starts there).
  ends = []
  for i in range(total_iterations):
    limit = learn_begin[i + 1] if i + 1 < total_iterations else marks["train_end"]
    ends.append(next((t for t in gc_ends if step_end[i] < t < limit), step_end[i]))
  starts = [marks["train_begin"]] + ends[:-1]
  rollout_s = [learn_begin[i] - starts[i] for i in range(total_iterations)]
  learn_s = [step_end[i] - learn_begin[i] for i in range(total_iterations)]
  wall_s = [ends[i] - starts[i] for i in range(total_iterations)]
  logs = marks["logs"][cfg.warmup:]
  assert len(logs) == cfg.iterations, len(logs)
  for row in logs:
    for k in ("loss/policy_avg", "loss/value_avg"):
      assert math.isfinite(row[k]), f"trl {k} is not finite: {row[k]}"
  out = summarize(cfg, wall_s[cfg.warmup:], rollout_s[cfg.warmup:], learn_s[cfg.warmup:])
  out.update({
      "warmup_s": float(sum(wall_s[:cfg.warmup])), "prompts_sha256": prompts_digest(prompts_RxP),
      "threads": f"torch.set_num_threads({threads}); torch.get_num_threads()={torch.get_num_threads()}",
      "device": f"cpu ({ppo_trainer.accelerator.device})",
      "gradient_checkpointing": any(getattr(m, "is_activation_checkpointing", None) or
                                    getattr(m, "is_gradient_checkpointing", False) for m in (policy, value_model)),
      "num_params": {"policy": sum(p.numel() for p in policy.parameters()),
                     "value": sum(p.numel() for p in value_model.parameters()),
                     "reward": sum(p.numel() for p in reward_model.parameters())},
      "final": {"policy_loss": logs[-1]["loss/policy_avg"], "value_loss": logs[-1]["loss/value_avg"],
                "kl": logs[-1]["objective/kl"], "ratio": logs[-1]["val/ratio"]},
      "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                   "accelerate": _version("accelerate"), "datasets": datasets.__version__,
                   "tokenizers": _version("tokenizers")},
  })
  return out


# ----------------------------------------------------------------------------------------------------------------
# The driver


def _version(package: str) -> str:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return "not installed"


def _git_commit() -> str:
  """HEAD of the checkout this script is in, with "+dirty" when it has uncommitted changes; "" outside git."""
  root = pathlib.Path(__file__).resolve().parents[1]
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
  except (OSError, subprocess.CalledProcessError):
    return ""
  return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_side_in_subprocess(side: str, argv: list[str]) -> dict[str, Any]:
  """Runs one side in a fresh interpreter (its own thread pools and allocator) and returns its result dict."""
  with tempfile.TemporaryDirectory() as tmp:
    result_path = os.path.join(tmp, "result.json")
    env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false",
               TRL_EXPERIMENTAL_SILENCE="1")
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_child", side, "--_result", result_path]
    proc = subprocess.run(cmd, env=env, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"the {side} side failed (exit code {proc.returncode}); its output is above.")
    with open(result_path, encoding="utf-8") as f:
      return json.load(f)


def _pressure_text(pressure: dict[str, float] | None) -> str:
  return "n/a" if pressure is None else f"{pressure['avg60']:.0f}% (60 s)"


def print_table(cfg: BenchConfig, results: dict[str, dict[str, Any]]) -> None:
  print(f"\nPPO, {cfg.num_layers} layers x d_model {cfg.d_model} x {cfg.num_heads} heads, vocab {cfg.vocab_size}; "
        f"prompt {cfg.prompt_len} + {cfg.new_tokens} new tokens; rollout batch {cfg.rollout_batch_size}, minibatch "
        f"{cfg.minibatch_size}, {cfg.epochs} epochs ({cfg.updates_per_iteration} updates/iteration); "
        f"{cfg.iterations} timed iterations after {cfg.warmup} warm-up; fp32 CPU, {resolved_threads(cfg)} threads\n")
  header = (f"{'side':<7}{'s/iter':>9}{'episodes/s':>12}{'rollout s':>11}{'learn s':>9}{'other s':>9}"
            f"{'rollout %':>11}{'warm-up s':>11}{'policy loss':>13}{'value loss':>12}{'load avg':>10}"
            f"{'CPU pressure':>14}")
  print(header)
  print("-" * len(header))
  for side, r in results.items():
    print(f"{side:<7}{r['seconds_per_iteration']:>9.2f}{r['episodes_per_s']:>12.2f}{r['rollout_s']:>11.2f}"
          f"{r['learn_s']:>9.2f}{r['other_s']:>9.3f}{r['rollout_share']:>11.0%}{r['warmup_s']:>11.1f}"
          f"{r['final']['policy_loss']:>13.4f}{r['final']['value_loss']:>12.4f}"
          f"{r['load_average_1min']['after']:>10.1f}{_pressure_text(r['cpu_pressure_some']['after']):>14}")
  if set(results) == set(SIDES):
    g, t = results["gptrl"], results["trl"]
    print(f"\ngptrl / trl: episodes/s x{g['episodes_per_s'] / t['episodes_per_s']:.2f}, "
          f"rollout time x{g['rollout_s'] / t['rollout_s']:.2f}, learn time x{g['learn_s'] / t['learn_s']:.2f}")


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  defaults = BenchConfig()
  for field in dataclasses.fields(BenchConfig):
    p.add_argument(f"--{field.name}", type={"int": int, "float": float}[str(field.type)],
                   default=getattr(defaults, field.name), help=f"default {getattr(defaults, field.name)}")
  p.add_argument("--side", choices=("both",) + SIDES, default="both", help="run one side only")
  p.add_argument("--out", default="", help="write the results as JSON here")
  p.add_argument("--_child", choices=SIDES, help=argparse.SUPPRESS)
  p.add_argument("--_result", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  cfg = BenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)})
  if cfg.rollout_batch_size % cfg.minibatch_size:
    p.error(f"--minibatch_size {cfg.minibatch_size} must divide --rollout_batch_size {cfg.rollout_batch_size}")
  if not 0 <= cfg.threads <= (os.cpu_count() or 1):
    p.error(f"--threads {cfg.threads} must be in [0, {os.cpu_count()}] (0: all)")
  if cfg.iterations < 1 or cfg.warmup < 1:
    p.error("--iterations and --warmup must be >= 1 (the first iteration compiles)")

  if args._child:  # pylint: disable=protected-access
    bind_to_cpus(resolved_threads(cfg))  # before jax or torch is imported
    load_before, pressure_before = os.getloadavg(), cpu_pressure()
    result = run_gptrl(cfg) if args._child == "gptrl" else run_trl(cfg)  # pylint: disable=protected-access
    # Other processes on the machine slow both sides down: the load and CPU pressure around each side's run.
    result["load_average_1min"] = {"before": load_before[0], "after": os.getloadavg()[0]}
    result["cpu_pressure_some"] = {"before": pressure_before, "after": cpu_pressure()}
    with open(args._result, "w", encoding="utf-8") as f:  # pylint: disable=protected-access
      json.dump(result, f)
    return 0

  child_argv = [a for f in dataclasses.fields(BenchConfig) for a in (f"--{f.name}", str(getattr(cfg, f.name)))]
  results = {}
  for side in (SIDES if args.side == "both" else (args.side,)):
    print(f"== {side} ==", flush=True)
    results[side] = run_side_in_subprocess(side, child_argv)
  if len(results) == 2:
    assert results["gptrl"]["prompts_sha256"] == results["trl"]["prompts_sha256"], "the sides saw different prompts"
  print_table(cfg, results)

  report = {
      "device": {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                 "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                 "python": platform.python_version(), "platform": platform.platform(),
                 "per_side": {side: r["device"] for side, r in results.items()},
                 "threads": {side: r["threads"] for side, r in results.items()}},
      "versions": {"gptrl": gptrl.__version__, "gptrl_commit": _git_commit(),
                   **{k: v for r in results.values() for k, v in r["versions"].items()}},
      "config": {**dataclasses.asdict(cfg), "threads_used": resolved_threads(cfg),
                 "updates_per_iteration": cfg.updates_per_iteration},
      "results": results,
  }
  if len(results) == 2:
    report["ratio_gptrl_over_trl"] = {
        "episodes_per_s": results["gptrl"]["episodes_per_s"] / results["trl"]["episodes_per_s"],
        "rollout_s": results["gptrl"]["rollout_s"] / results["trl"]["rollout_s"],
        "learn_s": results["gptrl"]["learn_s"] / results["trl"]["learn_s"]}
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
    print(f"\nWrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
