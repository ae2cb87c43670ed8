"""Talk to the model in any stage's checkpoint: chat with a fine-tuned policy, continue text with a pretrained
model, or score replies with a reward model.

  python -m gptrl.sample --checkpoint runs/sft_cpu --prompt "Where does the king walk?"
  python -m gptrl.sample --checkpoint runs/sft_cpu --chat --system "Answer briefly."   # /reset, /quit, EOF
  python -m gptrl.sample --checkpoint runs/pretrain_cpu --prompt "ROMEO:" --num_samples 3 --temperature 0.8
  python -m gptrl.sample --checkpoint runs/reward_cpu --score --prompt "Hi" --response "Hello!" --response "Go."
  python -m gptrl.sample --checkpoint runs/sft_cpu/checkpoints/200 --prompt "Hi" --temperature 0 --json
  python -m gptrl.sample --checkpoint runs/sft_cpu --best-of 16 --reward-model runs/reward_cpu --prompt "Hi"

`--checkpoint` is a run's workdir (its newest checkpoint), its checkpoints/ folder or one step folder. The
model's shape comes from the checkpoint's meta and the tokenizer from `<run workdir>/tokenizer.model` (or
`--tokenizer`, whose sha256 must be the one the checkpoint was trained with). Only the parameters are
loaded, replicated over the default mesh (every device; `--single_device` for one).

A chat-stage checkpoint (every stage after pretraining) gets each `--prompt` as one user turn of the chat
template (gptrl/chat.py) and answers it; a pretraining checkpoint, or `--raw`, continues the text itself,
after an <eos> as between pretraining documents. A reward checkpoint scores (`--score`) instead:
reward = raw score - the checkpoint's `reward_offset`, the scale PPO optimises (an ensemble's members normalised
and reduced by `--ensemble_reduce`, as PPO's `reward_model.ensemble_reduce`).

Replies go to stdout, one block per prompt (`--json`: one JSON object per reply); logs go to stderr. Usage
errors (a missing checkpoint, another tokenizer, a mode the checkpoint cannot do) exit with status 2 and a
one-line message.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np

from gptrl import chat
from gptrl import chat_data
from gptrl import checkpoint as ckpt_lib
from gptrl import cli
from gptrl import config as config_lib
from gptrl import decoding
from gptrl import fileio
from gptrl import model as model_lib
from gptrl import reward_model
from gptrl import sharding
from gptrl import stages as stages_lib
from gptrl import tokenizer as tokenizer_lib

_PROG = "gptrl.sample"
PRETRAIN_STAGE, REWARD_STAGE = "pretrain", "reward"


UsageError = cli.UsageError


@dataclasses.dataclass(frozen=True)
class Source:
  """A checkpoint step, read far enough to check what it can do (its parameters are not loaded yet)."""
  folder: str  # the checkpoints/ folder
  step: int
  meta: dict[str, Any]
  model_config: config_lib.ModelConfig
  tok: tokenizer_lib.Tokenizer

  @property
  def where(self) -> str:
    return f"{self.folder}/{self.step}"

  @property
  def stage(self) -> str:
    return str(self.meta.get("stage", "?"))


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A model ready to generate (GPT) or score (ScalarHeadModel), with its parameters laid out on `mesh`."""
  source: Source
  model: Any
  params: Any
  mesh: jax.sharding.Mesh


def open_checkpoint(path: str, *, step: int = -1, tokenizer_path: str = "", dtype: str = "") -> Source:
  """Resolves `path` to one checkpoint step, reads its meta and loads the tokenizer it was trained with.

  Args:
    path: a run's workdir, its checkpoints/ folder or one checkpoints/<step> folder.
    step: the step to use with a workdir or checkpoints folder; -1: the newest complete one.
    tokenizer_path: the tokenizer model file; "": `<run workdir>/tokenizer.model`.
    dtype: compute dtype to run the model in; "": the checkpoint's.
  Returns:
    The checkpoint's folder, step, meta, model config and tokenizer.
  Raises:
    UsageError: no checkpoint at `path`, no model config in its meta, or a tokenizer that is missing or is not
      the one the checkpoint was trained with.
  """
  if not fileio.exists(fileio.abspath(path)):
    raise UsageError(f"--checkpoint {path}: no such folder; give a run's workdir, its checkpoints/ folder or "
                     "one checkpoints/<step> folder.")
  try:
    folder, step = ckpt_lib.resolve_checkpoint(path, step)
    meta = ckpt_lib.read_step_meta(folder, step)
  except ckpt_lib.CheckpointError as e:
    raise UsageError(f"--checkpoint {path}: {e}") from e
  where = f"{folder}/{step}"
  if "model" not in meta:
    raise UsageError(f"--checkpoint {where}: its meta has no model config (is it a gptrl checkpoint?).")
  fields = set(config_lib.ModelConfig.__dataclass_fields__)
  try:
    model_config = config_lib.ModelConfig(**{k: v for k, v in meta["model"].items() if k in fields})
    model_config = config_lib.ModelRuntimeConfig(dropout=0.0, dtype=dtype).apply(model_config)
  except config_lib.ConfigError as e:
    raise UsageError(str(e)) from e
  tokenizer_path = tokenizer_path or os.path.join(os.path.dirname(folder), "tokenizer.model")
  try:
    tok = tokenizer_lib.load_tokenizer(tokenizer_path, expected_sha256=meta.get("tokenizer_sha256"),
                                       what=f"the checkpoint {where} was trained with")
  except (OSError, ValueError) as e:  # TokenizerMismatchError is a ValueError
    hint = "" if isinstance(e, OSError) else " (leave --tokenizer out to use the run's own tokenizer.model)"
    raise UsageError(f"--tokenizer: {e}{hint}") from e
  if model_config.vocab_size < tok.vocab_size:
    raise UsageError(f"--tokenizer {tokenizer_path} has {tok.vocab_size} ids, more than the {model_config.vocab_size} "
                     f"of the model in {where}.")
  return Source(folder, step, meta, model_config, tok)


def load(source: Source, mesh: jax.sharding.Mesh) -> Loaded:
  """Loads the parameters of `source` (no optimizer state) onto `mesh`: a GPT, or for a reward checkpoint the
  transformer with its scalar head."""
  cfg = source.model_config
  if source.stage == REWARD_STAGE:
    model = reward_model.make_reward_model(cfg, int(source.meta.get("ensemble", 1)),
                                           head_name=source.meta.get("head", "reward_head"),
                                           pooling=source.meta.get("pooling", "last"))
  else:
    model = model_lib.GPT(cfg)
  try:
    params = ckpt_lib.load_frozen_params(model, np.zeros((1, cfg.max_len), np.int32), mesh,
                                       config_lib.InitConfig(checkpoint=source.folder, step=source.step),
                                       tokenizer_sha256=source.tok.sha256,
                                       subtree="policy" if source.stage in stages_lib.POLICY_RL else "")
  except ckpt_lib.CheckpointError as e:
    raise UsageError(str(e)) from e
  return Loaded(source, model, params, mesh)


def generate(loaded: Loaded, prompts: Sequence[Sequence[int]], *, num_samples: int, max_new_tokens: int,
             rng: jax.Array, temperature: float, top_k: int, top_p: float, stop_id: int) -> list[list[list[int]]]:
  """`num_samples` continuations of each token-id prompt: result[prompt][sample] = new tokens (up to stop_id).

  `decoding.generate` compiles once per prompt length, which in a chat grows every turn: prompts are padded to
  the next power of two (at least 32), so every prompt up to that length shares one compiled program; padding
  does not change the replies. A prompt's samples share one prefill (`decoding.generate`'s group_size).
  """
  batch = [list(p) for p in prompts for _ in range(num_samples)]
  longest = max(len(p) for p in batch)
  bucket = min(max(32, 1 << (longest - 1).bit_length()), loaded.source.model_config.max_len - max_new_tokens)
  with sharding.activate(loaded.mesh):
    outs = decoding.generate(loaded.model, loaded.params, batch, max_new_tokens=max_new_tokens, rng=rng,
                             temperature=temperature, top_k=top_k, top_p=top_p, stop_id=stop_id,
                             pad_id=loaded.source.tok.pad_id, batch_multiple=sharding.data_parallel_size(loaded.mesh),
                             min_prompt_len=bucket, group_size=num_samples)
  return [outs[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]


_sequence_scores = jax.jit(reward_model.sequence_scores, static_argnums=0)


def score(loaded: Loaded, prompt: Sequence[chat.Message], responses: Sequence[str], *, ensemble_reduce: str = "mean",
          ensemble_penalty: float = 1.0) -> list[tuple[float, float]]:
  """(normalised reward, raw score) of each response to `prompt`; normalised = raw - meta["reward_offset"], or
  for an ensemble its members' normalised scores reduced by `ensemble_reduce` (reward_model.Readout), with the
  members' mean raw score."""
  tok = loaded.source.tok
  max_len = int(loaded.source.meta.get("context", 0)) or loaded.source.model_config.max_len  # as the RM was trained
  dp = sharding.data_parallel_size(loaded.mesh)
  rows = -(-len(responses) // dp) * dp  # padded with copies of the first to split over the mesh
  tokens = np.full((rows, 1, max_len), tok.pad_id, np.int32)
  last = np.zeros((rows, 1), np.int32)
  first = np.zeros((rows, 1), np.int32)
  for i in range(rows):
    seq, start = chat_data.response_sequence(prompt, responses[i if i < len(responses) else 0], tok, max_len=max_len,
                                             return_start=True)
    tokens[i, 0, :len(seq)] = seq
    last[i, 0], first[i, 0] = len(seq) - 1, start
  with sharding.activate(loaded.mesh):
    batch = sharding.host_to_global({"tokens": tokens, "last": last, "first": first}, loaded.mesh)
    scores = _sequence_scores(loaded.model, loaded.params, batch["tokens"], batch["last"], batch["first"])
  scores = np.asarray(jax.device_get(scores), np.float64)
  raw_NxM = (scores[:, :, 0].T if scores.ndim == 3 else scores[:, :1])[:len(responses)]  # an ensemble's: [M, B, 1]
  readout = reward_model.Readout.from_meta(loaded.source.meta, ensemble_reduce, ensemble_penalty)
  reward = reward_model.reduce_members(np.asarray(readout.centred(jax.numpy.asarray(raw_NxM)), np.float64),
                                       readout.reduce, readout.penalty)
  return [(float(r), float(m)) for r, m in zip(reward, raw_NxM.mean(axis=1))]


# ----------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=f"python -m {_PROG}", description=__doc__.split("\n\n", 1)[0],
                              epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="a run's workdir, its checkpoints/ folder, or a step folder")
  p.add_argument("--step", type=int, default=-1, help="checkpoint step (default: the newest)")
  p.add_argument("--tokenizer", default="", help="tokenizer model (default: <run workdir>/tokenizer.model)")
  mode = p.add_argument_group("what to do")
  mode.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  mode.add_argument("--chat", action="store_true", help="interactive: one user turn per stdin line; /reset, /quit")
  mode.add_argument("--raw", action="store_true", help="continue the text itself, without the chat template")
  mode.add_argument("--system", default="", help="a system message opening each conversation")
  mode.add_argument("--score", action="store_true", help="reward checkpoints: score each --response to --prompt")
  mode.add_argument("--response", action="append", default=[], help="a reply to score (repeatable)")
  mode.add_argument("--ensemble_reduce", default="mean", choices=config_lib.ENSEMBLE_REDUCTIONS,
                    help="a reward-model ensemble's reward: the members' mean, mean - penalty * std, or min "
                         "(default %(default)s)")
  mode.add_argument("--ensemble_penalty", type=float, default=1.0, help="the penalty of mean_minus_std "
                    "(default %(default)s)")
  gen = p.add_argument_group("sampling")
  gen.add_argument("--num_samples", type=int, default=1, help="replies per prompt (default %(default)s)")
  gen.add_argument("--max_new_tokens", type=int, default=0, help="tokens per reply (default: min(128, context/2))")
  gen.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default %(default)s)")
  gen.add_argument("--top_k", type=int, default=40, help="0 disables (default %(default)s)")
  gen.add_argument("--top_p", type=float, default=1.0, help="1.0 disables (default %(default)s)")
  gen.add_argument("--seed", type=int, default=0, help="PRNG seed (default %(default)s)")
  gen.add_argument("--best_of", "--best-of", type=int, default=1, metavar="N",
                   help="sample N candidates per reply and return the one --reward_model scores highest "
                        "(best-of-n: the aligned answer without RL; default %(default)s)")
  gen.add_argument("--reward_model", "--reward-model", default="", metavar="RUN",
                   help="the reward-model run (or checkpoint folder) that picks with --best_of")
  device = p.add_argument_group("running")
  device.add_argument("--dtype", default="", choices=("",) + config_lib.DTYPES,
                      help="compute dtype (default: the checkpoint's)")
  device.add_argument("--single_device", action="store_true", help="use one device instead of all of them")
  device.add_argument("--json", action="store_true", help="one JSON object per reply (or score) on stdout")
  return p


def _check_args(args: argparse.Namespace) -> None:
  """Combinations of flags that cannot work whatever the checkpoint."""
  if args.chat and args.prompt:
    raise UsageError("--chat reads the user's turns from stdin; leave out --prompt (or drop --chat).")
  if not args.chat and not args.prompt:
    raise UsageError("nothing to do: give --prompt TEXT (repeatable) or --chat.")
  if args.score and (args.chat or args.raw or not args.response):
    raise UsageError("--score takes --prompt TEXT and one or more --response TEXT (no --chat or --raw).")
  if args.response and not args.score:
    raise UsageError("--response is only used with --score (a reward checkpoint).")
  if args.raw and args.system:
    raise UsageError("--system needs the chat template; leave out --raw.")
  if args.num_samples < 1 or args.max_new_tokens < 0 or args.top_k < 0 or args.temperature < 0:
    raise UsageError("--num_samples must be >= 1; --max_new_tokens, --top_k and --temperature >= 0.")
  if not 0.0 < args.top_p <= 1.0:
    raise UsageError(f"--top_p must be in (0, 1], got {args.top_p}.")
  if args.best_of < 1:
    raise UsageError(f"--best_of must be >= 1, got {args.best_of}.")
  if args.best_of > 1 and not args.reward_model:
    raise UsageError("--best_of N picks with a reward model: give --reward_model RUN (a reward stage's workdir).")
  if args.best_of > 1 and (args.score or args.raw):
    raise UsageError("--best_of picks among chat replies; it does not combine with --score or --raw.")


def _check_stage(args: argparse.Namespace, source: Source) -> None:
  """The modes the checkpoint's stage can serve."""
  what = f"{source.where} is a checkpoint of stage {source.stage!r}"
  if source.stage == REWARD_STAGE and not args.score:
    raise UsageError(f"{what}: a reward model scores replies, it does not write them; use --score --prompt TEXT "
                     "--response TEXT.")
  if args.score and source.stage != REWARD_STAGE:
    raise UsageError(f"{what}, not a reward model ('reward'); --score needs a reward-model checkpoint.")
  if source.stage == PRETRAIN_STAGE and not args.raw:
    if args.chat:
      raise UsageError(f"{what}: it continues text but was never taught to chat; use --raw (with --chat, each "
                       "line you type is continued on its own).")
    if args.system:
      raise UsageError(f"{what}: it continues text, so --system has no meaning; leave it out.")


def _emit(args: argparse.Namespace, record: dict[str, Any], text: str) -> None:
  print(json.dumps(record, ensure_ascii=False) if args.json else text, flush=True)


def _prompt_ids(source: Source, raw: bool, messages: Sequence[chat.Message], text: str,
                max_new_tokens: int) -> list[int]:
  """Token ids of one prompt: the text after an <eos> (raw), or the conversation with the chat template."""
  tok = source.tok
  if raw:
    return [tok.eos_id] + tok.encode(text)
  return chat.prompt_tokens(messages, tok, max_tokens=source.model_config.max_len - max_new_tokens)


def _decode(source: Source, raw: bool, out: Sequence[int]) -> tuple[str, bool]:
  """(text of a sampled continuation, whether it ended with its stop token)."""
  tok = source.tok
  if raw:
    return tok.decode([t for t in out if t != tok.eos_id]), tok.eos_id in out
  return chat.decode_reply(out, tok), chat.reply_tokens(out, tok)[1]


def _run_prompts(args: argparse.Namespace, loaded: Loaded, raw: bool, sample: Callable[..., Any]) -> None:
  source = loaded.source
  system = [chat.Message("system", args.system)] if args.system else []
  conversations = [system + [chat.Message("user", p)] for p in args.prompt]
  prompts = [_prompt_ids(source, raw, m, p, args.max_new_tokens) for m, p in zip(conversations, args.prompt)]
  outs = sample(prompts, jax.random.key(args.seed))
  for index, (text, samples) in enumerate(zip(args.prompt, outs)):
    lines = [] if raw else [f"[{m.role}] {m.content}" for m in conversations[index]]
    for i, out in enumerate(samples):
      reply, finished = _decode(source, raw, out)
      record = {"prompt": text, "reply": reply, "sample": i, "finished": finished}
      if args.system:
        record["system"] = args.system
      if args.json:
        _emit(args, record, "")
      else:
        lines.append(text + reply if raw else f"[assistant] {reply}")
    if not args.json:
      separator = "\n---\n" if raw else "\n"
      _emit(args, {}, separator.join(lines) + ("\n" if index + 1 < len(args.prompt) else ""))


def _chat_loop(args: argparse.Namespace, loaded: Loaded, raw: bool, sample: Callable[..., Any],
               lines: Iterable[str]) -> None:
  """One user turn per line; the conversation so far (cut to fit by chat.prompt_tokens) is the prompt, and the
  first sampled reply joins it. /reset starts a new conversation; /quit or end of input ends."""
  source = loaded.source
  system = [chat.Message("system", args.system)] if args.system else []
  history: list[chat.Message] = []
  rng, turn = jax.random.key(args.seed), 0
  for line in lines:
    text = line.rstrip("\r\n")
    command = text.strip()
    if command in ("/quit", "/exit"):
      break
    if command == "/reset":
      history = []
      logging.info("Conversation reset.")
      continue
    if not command:
      continue
    messages = system + history + [chat.Message("user", text)]
    prompt = _prompt_ids(source, raw, messages, text, args.max_new_tokens)
    samples = sample([prompt], jax.random.fold_in(rng, turn))[0]
    replies = [_decode(source, raw, out) for out in samples]
    for i, (reply, finished) in enumerate(replies):
      shown = reply if len(replies) == 1 else f"[{i + 1}] {reply}"
      _emit(args, {"turn": turn, "prompt": text, "reply": reply, "sample": i, "finished": finished}, shown)
    if not raw:
      history = history + [chat.Message("user", text), chat.Message("assistant", replies[0][0])]
    turn += 1


def open_reward_model(path: str, source: Source, *, tokenizer_path: str = "", dtype: str = "") -> Source:
  """The `--reward_model` checkpoint for best-of-n, checked against the policy `source` before anything loads."""
  if source.stage == PRETRAIN_STAGE:
    raise UsageError(f"{source.where} is a pretraining checkpoint: best-of-n picks among chat replies.")
  rm_source = open_checkpoint(path, tokenizer_path=tokenizer_path, dtype=dtype)
  if rm_source.stage != REWARD_STAGE:
    raise UsageError(f"--reward_model {rm_source.where} is a checkpoint of stage {rm_source.stage!r}, not a reward "
                     "model ('reward').")
  if rm_source.tok.sha256 != source.tok.sha256:
    raise UsageError(f"--reward_model {rm_source.where} was trained with another tokenizer than {source.where} "
                     f"(sha256 {rm_source.tok.sha256[:12]} vs {source.tok.sha256[:12]}); pair runs of one pipeline.")
  return rm_source


def _best_of_n_sampler(args: argparse.Namespace, loaded: Loaded, rm_source: Source,
                       stop_id: int) -> Callable[..., Any]:
  """A `sample` that draws `--best_of` candidates for each of `--num_samples` replies and keeps, for each, the one
  the reward model `rm_source` scores highest (its reward and the candidates' range are logged)."""
  source = loaded.source
  rm = load(rm_source, loaded.mesh)
  n, k = args.best_of, args.num_samples

  def sample(prompts: Sequence[Sequence[int]], rng: jax.Array) -> list[list[list[int]]]:
    outs = generate(loaded, prompts, num_samples=n * k, max_new_tokens=args.max_new_tokens, rng=rng,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_id=stop_id)
    picked = []
    for prompt, candidates in zip(prompts, outs):
      messages = [m for m in chat.parse(list(prompt), source.tok) if m.content or m.role == "user"]
      rewards = [r for r, _ in score(rm, messages, [chat.decode_reply(c, source.tok) or " " for c in candidates],
                                     ensemble_reduce=args.ensemble_reduce, ensemble_penalty=args.ensemble_penalty)]
      best = [int(np.argmax(rewards[j * n:(j + 1) * n])) + j * n for j in range(k)]
      for j in best:
        logging.info("best of %d: reward %+.4f (candidates %+.4f .. %+.4f)", n, rewards[j], min(rewards),
                     max(rewards))
      picked.append([candidates[j] for j in best])
    return picked
  return sample


def _run_score(args: argparse.Namespace, loaded: Loaded) -> None:
  system = [chat.Message("system", args.system)] if args.system else []
  for index, text in enumerate(args.prompt):
    messages = system + [chat.Message("user", text)]
    rewards = score(loaded, messages, args.response, ensemble_reduce=args.ensemble_reduce,
                    ensemble_penalty=args.ensemble_penalty)
    lines = [f"[{m.role}] {m.content}" for m in messages]
    for response, (reward, raw_score) in zip(args.response, rewards):
      if args.json:
        _emit(args, {"prompt": text, "reply": response, "reward": reward, "raw_score": raw_score}, "")
      lines.append(f"{reward:+.4f}  {response}")
    if not args.json:
      _emit(args, {}, "\n".join(lines) + ("\n" if index + 1 < len(args.prompt) else ""))


def _stdin_lines() -> Iterable[str]:
  """Lines of stdin as they are typed (with a "> " prompt on a terminal), not after stdin is closed."""
  interactive = sys.stdin.isatty() and sys.stderr.isatty()
  if interactive:
    print("Type a message (/reset: new conversation, /quit or Ctrl-D: end).", file=sys.stderr)
  while True:
    if interactive:
      print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line:
      return
    yield line


def _setup_logging() -> None:
  cli.setup_logging(("absl", "orbax", "jax._src", "etils"), logging.ERROR)


def run(args: argparse.Namespace, lines: Iterable[str] | None = None) -> None:
  """Does what the parsed flags ask; `lines` are the user's turns for --chat (default: stdin).

  Raises:
    UsageError: the checkpoint cannot do what was asked, or cannot be read.
  """
  _check_args(args)
  source = open_checkpoint(args.checkpoint, step=args.step, tokenizer_path=args.tokenizer, dtype=args.dtype)
  _check_stage(args, source)
  raw = args.raw or source.stage == PRETRAIN_STAGE
  max_len = source.model_config.max_len
  args = argparse.Namespace(**{**vars(args), "max_new_tokens": args.max_new_tokens or min(128, max_len // 2)})
  if args.max_new_tokens >= max_len:
    raise UsageError(f"--max_new_tokens={args.max_new_tokens} must be less than the context length {max_len} of "
                     f"{source.where}.")
  rm_source = (open_reward_model(args.reward_model, source, tokenizer_path=args.tokenizer, dtype=args.dtype)
               if args.best_of > 1 else None)
  if args.num_samples > 1 and args.temperature == 0:
    logging.warning("--temperature 0 is greedy: the %d samples per prompt will be identical.", args.num_samples)
  devices = jax.devices()[:1] if args.single_device else None
  loaded = load(source, sharding.make_mesh(config_lib.MeshConfig(), devices))
  logging.info("Model of stage %r: %s parameters, %s.", source.stage, f"{model_lib.count_params(loaded.params):,}",
               source.model_config)
  if args.score:
    _run_score(args, loaded)
    return
  stop_id = source.tok.eos_id if raw else source.tok.end_of_turn_id

  def sample(prompts: Sequence[Sequence[int]], rng: jax.Array) -> list[list[list[int]]]:
    return generate(loaded, prompts, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens, rng=rng,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_id=stop_id)

  if args.best_of > 1:
    sample = _best_of_n_sampler(args, loaded, rm_source, stop_id)

  if args.chat:
    _chat_loop(args, loaded, raw, sample, _stdin_lines() if lines is None else lines)
  else:
    _run_prompts(args, loaded, raw, sample)


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status (0, or 2 after a one-line usage error on stderr)."""
  return cli.main(_PROG, _parser(), run, _setup_logging, argv)


if __name__ == "__main__":
  sys.exit(main())
