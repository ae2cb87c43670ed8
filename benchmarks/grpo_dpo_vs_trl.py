"""GRPO episodes/s and DPO tokens/s of gptrl against Hugging Face trl's GRPOTrainer and DPOTrainer: the same tiny
random-weight GPT-2-architecture models, lengths and batches, one run, each side in a subprocess of its own.

  python benchmarks/grpo_dpo_vs_trl.py --algo grpo --out grpo_vs_trl.json
  python benchmarks/grpo_dpo_vs_trl.py --algo dpo --out dpo_vs_trl.json
  python benchmarks/grpo_dpo_vs_trl.py --algo grpo --side gptrl        # one side only

Needs the benchmark-only extra (`pip install -e ".[bench]"`). Shared helpers (the in-process word-level tokenizer,
thread pinning, CPU pressure) are benchmarks/ppo_vs_trl.py's, whose notes on threads and noise apply here too.

GRPO, the same on both sides: `--prompts` prompts of `--prompt_len` random tokens per iteration, `--group` replies
to each (`--new_tokens` tokens, temperature 1, no stop token, so every reply has that length), rewards from a
frozen random scalar-head GPT-2 reading prompt + reply, advantages (r - group mean) / (group std + eps), the
clipped ratio (one pass: ratio 1), the k3 KL to the frozen reference as a loss term at beta `--beta`, each reply's
token mean averaged over replies (gptrl `loss_aggregation="sequence_mean"`, trl `loss_type="grpo"`), two optimizer
steps per iteration (AdamW, clip 1.0). episodes/s = replies / seconds over the timed iterations; trl's iteration
boundaries are its optimizer steps (on_step_end), one generation per two steps.

DPO: `--pairs` comparisons per step, prompt `--prompt_len` + reply `--new_tokens` tokens (no padding), the sigmoid
loss at beta 0.1, the reference's log-probs computed once before training on both sides (gptrl always;
trl `precompute_ref_log_probs=True`) and excluded from the timing. trl ends every reply with <eos> (its model has
3 more vocabulary rows for the tokenizer's special ids), so its replies are new_tokens - 1 words and <eos>. tokens/s = 2 * pairs * (prompt + reply) per
second over the timed steps (the chosen and the rejected sequence of every pair).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np  # pylint: disable=wrong-import-position

import ppo_vs_trl as common  # pylint: disable=wrong-import-position

SIDES = ("gptrl", "trl")


@dataclasses.dataclass(frozen=True)
class Bench:
  algo: str = "grpo"
  vocab_size: int = 4096
  num_layers: int = 4
  num_heads: int = 4
  d_model: int = 256
  prompt_len: int = 64
  new_tokens: int = 32
  prompts: int = 8  # GRPO: prompts per iteration
  group: int = 8  # GRPO: replies per prompt
  beta: float = 0.04  # GRPO's KL coefficient
  pairs: int = 8  # DPO: comparisons per optimizer step
  iterations: int = 2  # timed GRPO iterations / DPO steps
  warmup: int = 1
  lr: float = 1e-5
  seed: int = 0
  threads: int = 0

  @property
  def replies(self) -> int:
    return self.prompts * self.group

  @property
  def units(self) -> int:
    """Optimizer steps each side runs: GRPO two per iteration, DPO one per step."""
    return (self.warmup + self.iterations) * (2 if self.algo == "grpo" else 1)


def _model_cfg(b: Bench):
  from gptrl import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.ModelConfig(
      vocab_size=b.vocab_size, num_layers=b.num_layers, num_heads=b.num_heads, d_model=b.d_model,
      max_len=b.prompt_len + b.new_tokens, pos_embedding="learned", norm="layernorm", norm_eps=1e-5,
      mlp_activation="gelu_tanh", mlp_bias=True, attention_bias=True, tie_embeddings=True, dropout=0.0)


def _tokens(b: Bench, rows: int, length: int, salt: int) -> np.ndarray:
  return np.random.default_rng(b.seed + salt).integers(0, b.vocab_size, (rows, length), dtype=np.int64)


def gptrl_grpo(b: Bench) -> dict[str, Any]:
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from gptrl import config as config_lib, optim, sharding, trainer  # pylint: disable=import-outside-toplevel
  from gptrl.stages import ppo, recipe  # pylint: disable=import-outside-toplevel
  model_cfg = _model_cfg(b)
  iterations = b.warmup + b.iterations
  cfg = config_lib.GRPOConfig(
      init=config_lib.InitConfig("unused"), reward_model=config_lib.InitConfig("unused"), seed=b.seed,
      grpo=config_lib.GRPOAlgoConfig(rollout_batch_size=b.replies, minibatch_size=b.replies // 2, group_size=b.group,
                                     max_new_tokens=b.new_tokens, init_beta=b.beta, num_eval_prompts=0),
      optim=config_lib.OptimConfig(lr=b.lr, warmup_steps=0, min_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8,
                                   weight_decay=0.0, clip_norm=1.0),
      train=config_lib.TrainConfig(steps=iterations, progress_bar=False))
  models = ppo.make_models(model_cfg, model_cfg, cfg.grpo)
  mesh = sharding.make_mesh(config_lib.MeshConfig())
  optimizer = optim.make_optimizer(cfg.optim, ppo.num_updates(cfg))
  state, shardings = trainer.create_train_state(lambda r: ppo.init_params(models, r), optimizer, b.seed, mesh)
  ref = jax.tree.map(lambda x: jnp.array(x, copy=True), state.params["policy"])
  rm_init = recipe.init_params(models.reward, model_cfg.max_len)
  with sharding.activate(mesh):
    rm_shardings = sharding.tree_shardings(jax.eval_shape(rm_init, jax.random.key(b.seed + 1)), mesh)
    rm = jax.jit(lambda r: nn.meta.unbox(rm_init(r)), out_shardings=rm_shardings)(jax.random.key(b.seed + 1))
  learner = ppo.Learner(cfg, models, mesh, optimizer, shardings, ref, rm, ppo.make_score_fn(models, cfg, 0.0),
                        pad_id=0, stop_id=-1)
  prompts = _tokens(b, iterations * b.prompts, b.prompt_len, 0)
  wall, rows = [], []
  for it in range(iterations):
    t0 = time.perf_counter()
    result = learner.iteration(state, prompts[it * b.prompts:(it + 1) * b.prompts].tolist(), it, b.beta)
    state = jax.block_until_ready(result.state)
    if it >= b.warmup:
      wall.append(time.perf_counter() - t0)
      rows.append(result.row)
  assert all(r["grpo/updates"] == 2 and r["grpo/skipped"] == 0 for r in rows), rows
  seconds = float(sum(wall))
  return {"seconds": seconds, "per_iteration_s": wall, "episodes_per_s": b.replies * len(wall) / seconds,
          "rollout_s": float(np.mean([r["time/rollout_s"] for r in rows])),
          "learn_s": float(np.mean([r["time/learn_s"] for r in rows])),
          "final": {"kl_loss": rows[-1]["grpo/kl_loss"], "policy_loss": rows[-1]["grpo/policy_loss"]},
          "versions": {"jax": jax.__version__}}


def gptrl_dpo(b: Bench) -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  from gptrl import chat_data, optim, sharding, trainer  # pylint: disable=import-outside-toplevel
  from gptrl import config as config_lib, model as model_lib  # pylint: disable=import-outside-toplevel
  from gptrl.stages import dpo  # pylint: disable=import-outside-toplevel
  model_cfg = _model_cfg(b)
  length = b.prompt_len + b.new_tokens
  model = model_lib.GPT(model_cfg)
  mesh = sharding.make_mesh(config_lib.MeshConfig())
  optimizer = optim.make_optimizer(config_lib.OptimConfig(lr=b.lr, warmup_steps=0, min_lr_ratio=0.0, b2=0.999,
                                                          weight_decay=0.0, clip_norm=1.0), b.units)
  state, shardings = trainer.create_train_state(
      lambda r: model.init(r, np.zeros((1, length), np.int32))["params"], optimizer, b.seed, mesh)
  n = b.units * b.pairs
  prompts = _tokens(b, n, b.prompt_len, 0)
  tokens = np.stack([np.concatenate([prompts, _tokens(b, n, b.new_tokens, salt)], axis=1) for salt in (1, 2)], 1)
  pairs = np.zeros((n, 2, 2), np.float32)
  pairs[:, 0, 1] = 1.0
  enc = chat_data.EncodedComparisons(tokens.astype(np.int32), np.full((n, 2), length - 1, np.int32), pairs,
                                     np.zeros_like(pairs), 0, np.full((n, 2), b.prompt_len, np.int32))
  enc.ref_logp = dpo.reference_log_probs(model, state.params, enc, mesh, b.pairs)  # once, untimed
  step = trainer.jit_train_step(trainer.make_train_step(dpo.dpo_loss_fn(model, config_lib.DPOAlgoConfig()),
                                                        optimizer, lambda s: b.lr), shardings, mesh)
  wall = []
  for i in range(b.units):
    batch = {k: v[i * b.pairs:(i + 1) * b.pairs] for k, v in
             dict(tokens=enc.tokens, last=enc.last, first=enc.first, pairs=enc.pairs, margins=enc.margins,
                  ref_logp=enc.ref_logp).items()}
    t0 = time.perf_counter()
    state, metrics = step(state, sharding.host_to_global(batch, mesh))
    jax.block_until_ready(metrics)
    if i >= b.warmup:
      wall.append(time.perf_counter() - t0)
  seconds = float(sum(wall))
  return {"seconds": seconds, "per_step_s": wall, "tokens_per_s": 2 * b.pairs * length * len(wall) / seconds,
          "final": {"loss": float(metrics["train/loss"])}, "versions": {"jax": jax.__version__}}


def _trl_models(b: Bench, workdir: str, extra_vocab: int = 0):
  """The policy saved to `workdir` (trl builds its reference from the same path) and a random reward model;
  `extra_vocab` rows embed the tokenizer's special ids (DPO's trl appends <eos> to every reply)."""
  import transformers  # pylint: disable=import-outside-toplevel
  hf_cfg = transformers.GPT2Config(
      vocab_size=b.vocab_size + extra_vocab, n_positions=b.prompt_len + b.new_tokens, n_embd=b.d_model, n_layer=b.num_layers,
      n_head=b.num_heads, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      layer_norm_epsilon=1e-5, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
      num_labels=1)
  transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(workdir)
  reward = transformers.GPT2ForSequenceClassification(hf_cfg)
  return hf_cfg, reward


class _StepTimer:
  def __init__(self):
    import transformers  # pylint: disable=import-outside-toplevel
    marks = self.marks = []

    class Callback(transformers.TrainerCallback):
      def on_train_begin(self, args, state, control, **kwargs):  # pylint: disable=unused-argument
        marks.append(time.perf_counter())

      def on_step_end(self, args, state, control, **kwargs):  # pylint: disable=unused-argument
        marks.append(time.perf_counter())
    self.callback = Callback()


def _words(rows: np.ndarray, trailing: str = "") -> list[str]:
  """Token ids as the word-level tokenizer's words; `trailing` " " keeps a prompt's last word apart from the reply
  trl appends to it as text (for the reward model)."""
  return [" ".join(f"t{int(t)}" for t in row) + trailing for row in rows]


def trl_grpo(b: Bench) -> dict[str, Any]:
  import datasets  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import trl  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(common.resolved_threads(b))
  torch.manual_seed(b.seed)
  workdir = tempfile.mkdtemp(prefix="grpo_vs_trl_")
  _, reward = _trl_models(b, workdir)
  tokenizer = common.make_hf_tokenizer(b.vocab_size)
  iterations = b.warmup + b.iterations
  prompts = _tokens(b, iterations * b.prompts, b.prompt_len, 0)
  args = trl.GRPOConfig(
      output_dir=workdir, report_to="none", use_cpu=True, bf16=False, fp16=False, seed=b.seed, learning_rate=b.lr,
      weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, lr_scheduler_type="linear",
      warmup_steps=0, max_grad_norm=1.0, per_device_train_batch_size=b.replies // 2, gradient_accumulation_steps=1,
      steps_per_generation=2, num_generations=b.group, num_iterations=1, max_completion_length=b.new_tokens,
      temperature=1.0, beta=b.beta, epsilon=0.2, loss_type="grpo", scale_rewards="group", max_steps=b.units,
      shuffle_dataset=False, save_strategy="no", eval_strategy="no", disable_tqdm=True, logging_steps=1,
      dataloader_num_workers=0, log_completions=False)
  trainer = trl.GRPOTrainer(model=workdir, reward_funcs=reward, args=args,
                            train_dataset=datasets.Dataset.from_dict({"prompt": _words(prompts, " ")}),
                            processing_class=tokenizer, reward_processing_classes=tokenizer)
  timer = _StepTimer()
  trainer.add_callback(timer.callback)
  trainer.train()
  ends = timer.marks[1:]
  assert len(ends) == b.units, len(ends)
  # An iteration is two optimizer steps (one generation feeds both).
  starts = [timer.marks[0]] + ends[:-1]
  per_iteration = [ends[2 * i + 1] - starts[2 * i] for i in range(iterations)][b.warmup:]
  seconds = float(sum(per_iteration))
  return {"seconds": seconds, "per_iteration_s": per_iteration,
          "episodes_per_s": b.replies * len(per_iteration) / seconds,
          "versions": {"trl": trl.__version__, "torch": torch.__version__}}


def trl_dpo(b: Bench) -> dict[str, Any]:
  import datasets  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import trl  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(common.resolved_threads(b))
  torch.manual_seed(b.seed)
  workdir = tempfile.mkdtemp(prefix="dpo_vs_trl_")
  _trl_models(b, workdir, extra_vocab=3)
  tokenizer = common.make_hf_tokenizer(b.vocab_size)
  n = b.units * b.pairs
  # trl ends every reply with <eos>: new_tokens - 1 random words and it, as long as gptrl's replies.
  data = {"prompt": _words(_tokens(b, n, b.prompt_len, 0)),
          "chosen": _words(_tokens(b, n, b.new_tokens - 1, 1), " <eos>"),
          "rejected": _words(_tokens(b, n, b.new_tokens - 1, 2), " <eos>")}
  args = trl.DPOConfig(
      output_dir=workdir, report_to="none", use_cpu=True, bf16=False, fp16=False, seed=b.seed, learning_rate=b.lr,
      weight_decay=0.0, adam_beta2=0.999, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0,
      per_device_train_batch_size=b.pairs, gradient_accumulation_steps=1, beta=0.1, loss_type="sigmoid",
      max_length=b.prompt_len + b.new_tokens, precompute_ref_log_probs=True, max_steps=b.units,
      save_strategy="no", eval_strategy="no", disable_tqdm=True, logging_steps=1, dataloader_num_workers=0)
  trainer = trl.DPOTrainer(model=workdir, args=args, train_dataset=datasets.Dataset.from_dict(data),
                           processing_class=tokenizer)
  timer = _StepTimer()
  trainer.add_callback(timer.callback)
  trainer.train()
  ends = timer.marks[1:]
  assert len(ends) == b.units, len(ends)
  per_step = list(np.diff(ends))[b.warmup - 1:] if b.warmup >= 1 else None
  seconds = float(sum(per_step))
  return {"seconds": seconds, "per_step_s": per_step,
          "tokens_per_s": 2 * b.pairs * (b.prompt_len + b.new_tokens) * len(per_step) / seconds,
          "versions": {"trl": trl.__version__, "torch": torch.__version__}}


def _child(b: Bench, side: str, result_path: str) -> None:
  common.bind_to_cpus(common.resolved_threads(b))
  load_before = os.getloadavg()[0]
  warnings.filterwarnings("ignore")
  run = {("gptrl", "grpo"): gptrl_grpo, ("gptrl", "dpo"): gptrl_dpo, ("trl", "grpo"): trl_grpo,
         ("trl", "dpo"): trl_dpo}[(side, b.algo)]
  result = run(b)
  result["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
  with open(result_path, "w", encoding="utf-8") as f:
    json.dump(result, f)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  defaults = Bench()
  for field in dataclasses.fields(Bench):
    kind = {"int": int, "float": float, "str": str}[str(field.type)]
    p.add_argument(f"--{field.name}", type=kind, default=getattr(defaults, field.name))
  p.add_argument("--side", choices=("both",) + SIDES, default="both")
  p.add_argument("--out", default="")
  p.add_argument("--_child", choices=SIDES, help=argparse.SUPPRESS)
  p.add_argument("--_result", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  b = Bench(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Bench)})
  if b.algo not in ("grpo", "dpo"):
    p.error(f"--algo must be grpo or dpo, got {b.algo!r}")
  if args._child:  # pylint: disable=protected-access
    _child(b, args._child, args._result)  # pylint: disable=protected-access
    return 0
  results = {}
  for side in (SIDES if args.side == "both" else (args.side,)):
    print(f"== {side} {b.algo} ==", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "result.json")
      env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1")
      argv_child = [a for f in dataclasses.fields(Bench) for a in (f"--{f.name}", str(getattr(b, f.name)))]
      proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv_child, "--_child", side, "--_result",
                             path], env=env, check=False)
      if proc.returncode:
        raise RuntimeError(f"the {side} side failed (exit code {proc.returncode}); its output is above.")
      with open(path, encoding="utf-8") as f:
        results[side] = json.load(f)
  key = "episodes_per_s" if b.algo == "grpo" else "tokens_per_s"
  for side, r in results.items():
    print(f"{side:<6} {key} {r[key]:.1f}  seconds {r['seconds']:.2f}")
  commit = common._git_commit()  # pylint: disable=protected-access
  report = {"bench": dataclasses.asdict(b), "results": results, "git_commit": commit}
  if len(results) == 2:
    report["ratio_gptrl_over_trl"] = results["gptrl"][key] / results["trl"][key]
    print(f"gptrl / trl: {key} x{report['ratio_gptrl_over_trl']:.2f}")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
