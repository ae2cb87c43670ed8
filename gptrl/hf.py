"""Start from existing weights: import a local Hugging Face GPT-2 or Llama checkpoint, and export back.

  python -m gptrl.hf import --hf-dir DIR --out WORKDIR [--param-dtype float32] [--max-len N]
  python -m gptrl.hf export --checkpoint RUN --out DIR [--step N] [--vocab-from HF_DIR] [--dtype float32]

`import` reads DIR/config.json and DIR/model.safetensors (or the shards of model.safetensors.index.json; no
network, no torch) and writes a gptrl workdir: `checkpoints/0` (an Orbax checkpoint whose meta has stage
"pretrain", the model config and the tokenizer's sha256) and `tokenizer.model`, so a later stage starts from it
with `--config.init.checkpoint=WORKDIR` as from a pretraining run. The Hugging Face folders (--hf-dir, export's
--out and --vocab-from) are local; the gptrl side (import's --out, export's --checkpoint) may be a gs:// URL.

Architectures (ModelConfig options in brackets):
  gpt2:  learned positions, LayerNorm, GELU MLP (gelu_new = "gelu_tanh"), biases everywhere [attention_bias].
  llama: rotary positions, RMSNorm, SwiGLU MLP [gated_mlp, mlp_activation="silu", mlp_bias=False],
         grouped-query attention [num_kv_heads], untied head. Rope scaling (Llama 3.1+) is refused.

Tokenizers. gptrl encodes text with a sentencepiece model whose reserved ids are fixed (gptrl/tokenizer.py:
<pad> 0, <unk> 1, <s> 2, </s> 3, "\\n" 4, chat markers 5-8, bytes 9-264) and which round-trips text exactly.
  * DIR/tokenizer.model already in that layout (e.g. written by `export`): used as it is; ids unchanged.
  * Another sentencepiece model with byte fallback (Llama 1/2's tokenizer.model): rewritten into gptrl's layout
    (`adapt_sentencepiece`). Every piece keeps its text and its score, so text still splits the same way,
    except that no "▁" is prepended to the start of a text (add_dummy_prefix off: gptrl encodes chat turns
    piece by piece and needs encode(a) + encode(b) == encode(a + b)). The embedding rows (and head columns)
    move with their pieces; "\\n" takes the row of the byte <0x0A> that Llama used for newlines; <pad> and the
    four chat markers are new rows, set to the mean row (SFT learns them). Ids change, the text they mean
    does not. `export --vocab-from DIR` moves the rows back to the original ids.
  * No sentencepiece model (GPT-2's byte-level BPE vocab.json/merges.txt, or Llama 3's tokenizer.json): refused.
    Those tokenizers cannot be reproduced id for id by sentencepiece, and a model whose ids meant other text
    would silently produce garbage. `load_hf` still converts the weights (Python API) for other uses.

`export` writes config.json, model.safetensors and the tokenizer of a gptrl checkpoint (any stage with a
language model; PPO: the policy) as a Hugging Face checkpoint: learned positions + LayerNorm as GPT-2,
rotary + RMSNorm + gated MLP as Llama. A model that fits neither is refused, naming the fields that differ.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import struct
import sys
from typing import Any, Mapping, Sequence

import ml_dtypes
import numpy as np

from gptrl import config as config_lib
from gptrl import fileio
from gptrl import stages as stages_lib
from gptrl import tokenizer as tokenizer_lib

SUPPORTED = ("gpt2", "llama")
_PROG = "gptrl.hf"


class HFError(ValueError):
  """A Hugging Face checkpoint cannot be imported or a gptrl checkpoint exported; the message says where."""


def _require_local(path: str, what: str) -> None:
  if fileio.is_remote(path):
    raise HFError(f"{what} {path}: must be a local folder (safetensors files are memory-mapped); copy it first, "
                  "e.g. with gcloud storage cp -r.")


# ----------------------------------------------------------------------------------------------
# safetensors: 8-byte little-endian header size, a JSON header {name: {dtype, shape, data_offsets}}, the bytes.
# Read and written here with NumPy (ml_dtypes for bfloat16), so importing needs neither torch nor safetensors.

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """The tensors of one .safetensors file as read-only NumPy arrays mapped from disk (nothing copied yet)."""
  try:
    with open(path, "rb") as f:
      (header_size,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(header_size))
  except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise HFError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}).") from e
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info.get("dtype") not in _ST_DTYPES:
      raise HFError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}; supported: {sorted(_ST_DTYPES)}.")
    begin, end = info["data_offsets"]
    dtype = np.dtype(_ST_DTYPES[info["dtype"]])
    shape = tuple(info["shape"])
    if end - begin != int(np.prod(shape)) * dtype.itemsize:
      raise HFError(f"{path}: tensor {name!r} has {end - begin} bytes, not what shape {shape} {info['dtype']} needs.")
    out[name] = data[begin:end].view(dtype).reshape(shape)
  return out


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` (name -> array) to `path` as safetensors, atomically (a temporary file, then a rename)."""
  header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  arrays = []
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    if array.dtype not in _ST_NAMES:
      raise HFError(f"{path}: cannot write tensor {name!r} of dtype {array.dtype}.")
    header[name] = {"dtype": _ST_NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
    arrays.append(array)
  encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
  encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
  with fileio.atomic_open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for array in arrays:
      f.write(array.tobytes())


class _Tensors:
  """The tensors of a Hugging Face checkpoint folder by name, each taken once with its shape checked."""

  def __init__(self, hf_dir: str):
    self.hf_dir = hf_dir
    single = os.path.join(hf_dir, "model.safetensors")
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    self.files: dict[str, str] = {}  # tensor name -> file
    self._opened: dict[str, dict[str, np.ndarray]] = {}  # file -> its tensors, mapped from disk
    if os.path.exists(single):
      self._opened = {single: read_safetensors(single)}
      self.files = {n: single for n in self._opened[single]}
    elif os.path.exists(index):
      with open(index, encoding="utf-8") as f:
        try:
          weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
          raise HFError(f"{index}: expected JSON with a 'weight_map' {{tensor: file}} ({e}).") from e
      self.files = {n: os.path.join(hf_dir, fname) for n, fname in weight_map.items()}
      for fname in sorted(set(self.files.values())):
        if not os.path.exists(fname):
          raise HFError(f"{index} names the shard {fname}, which does not exist.")
    else:
      found = sorted(n for n in os.listdir(hf_dir) if n.endswith((".bin", ".pt", ".pth", ".h5", ".msgpack")))
      hint = (f" It has {', '.join(found)}: convert them with transformers' save_pretrained(safe_serialization="
              "True) (gptrl reads only safetensors, without torch).") if found else ""
      raise HFError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json.{hint}")
    self.taken: set[str] = set()

  def __contains__(self, name: str) -> bool:
    return name in self.files

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor `name` as a float32 array of `shape`; refuses a missing or differently shaped one."""
    if name not in self.files:
      raise HFError(f"{self.hf_dir}: tensor {name!r} is missing (expected shape {shape}); the checkpoint's "
                    f"config.json promises it. Tensors present: {_summary(self.files)}.")
    path = self.files[name]
    if path not in self._opened:
      self._opened[path] = read_safetensors(path)
    if name not in self._opened[path]:
      raise HFError(f"{path}: tensor {name!r} is missing, although the index names this file for it.")
    array = self._opened[path][name]
    if tuple(array.shape) != tuple(shape):
      raise HFError(f"{path}: tensor {name!r} has shape {tuple(array.shape)}, but config.json implies {shape}.")
    self.taken.add(name)
    return np.asarray(array, dtype=np.float32)

  def check_all_taken(self, ignorable: Sequence[str]) -> None:
    """Refuses tensors that were not converted (except buffers named by a suffix in `ignorable`)."""
    left = sorted(n for n in set(self.files) - self.taken if not n.endswith(tuple(ignorable)))
    if left:
      raise HFError(f"{self.hf_dir}: {len(left)} tensor(s) that gptrl's model has no place for: {_summary(left)}. "
                    "The checkpoint is not a plain GPT-2/Llama causal LM of the config.json given.")


def _summary(names: Any, n: int = 8) -> str:
  names = sorted(names)
  return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig.

_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                     "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}
_HF_ACTIVATION = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu", "silu": "silu"}


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  """DIR/config.json as a dict; refuses a missing file or one of an unsupported model_type."""
  _require_local(hf_dir, "Hugging Face folder")
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isdir(hf_dir):
    raise HFError(f"{hf_dir}: no such folder (expected a Hugging Face checkpoint folder with config.json).")
  if not os.path.exists(path):
    raise HFError(f"{path} does not exist: a Hugging Face checkpoint folder holds config.json and "
                  "model.safetensors (transformers' save_pretrained writes both).")
  with open(path, encoding="utf-8") as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise HFError(f"{path}: not valid JSON ({e}).") from e
  if config.get("model_type") not in SUPPORTED:
    raise HFError(f"{path}: model_type {config.get('model_type')!r} is not supported; gptrl imports "
                  f"{' and '.join(SUPPORTED)} (architectures {config.get('architectures')}).")
  return config


def model_config_from_hf(config: Mapping[str, Any], *, where: str = "config.json", param_dtype: str = "float32",
                         max_len: int = 0) -> config_lib.ModelConfig:
  """The ModelConfig of a Hugging Face GPT-2 or Llama config.json (a dict); refuses what the model cannot run.

  Args:
    config: the parsed config.json.
    where: its path, for messages.
    param_dtype: the storage dtype of the imported parameters.
    max_len: the context length to use; 0: the checkpoint's (n_positions / max_position_embeddings). With
      learned positions it may only be lower (the position table is cut).
  """
  def fail(key: str, message: str) -> HFError:
    return HFError(f"{where}: {key}: {message}")

  kind = config.get("model_type")
  if kind == "gpt2":
    d, heads = config["n_embd"], config["n_head"]
    for key, bad in (("scale_attn_by_inverse_layer_idx", True), ("add_cross_attention", True),
                     ("scale_attn_weights", False)):
      if config.get(key, not bad) == bad:
        raise fail(key, f"{bad} is not supported (gptrl scales attention by 1/sqrt(head_dim) only).")
    activation = config.get("activation_function", "gelu_new")
    if activation not in _GPT2_ACTIVATIONS:
      raise fail("activation_function", f"{activation!r} is not supported; supported: {sorted(_GPT2_ACTIVATIONS)}.")
    positions, mlp_dim = config["n_positions"], config.get("n_inner") or 4 * d
    if max_len > positions:
      raise fail("n_positions", f"the learned position table has {positions} rows; --max-len {max_len} needs more.")
    fields = dict(
        num_layers=config["n_layer"], num_heads=heads, d_model=d,
        mlp_ratio=mlp_dim / d, max_len=max_len or positions, pos_embedding="learned",
        norm="layernorm", norm_eps=config.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=config.get("tie_word_embeddings", True), mlp_activation=_GPT2_ACTIVATIONS[activation],
        gated_mlp=False, mlp_bias=True, attention_bias=True)
  else:
    d, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, d // heads) or d % heads:
      raise fail("head_dim", f"{config.get('head_dim')} differs from hidden_size / num_attention_heads = "
                 f"{d}/{heads}; gptrl's head dim is d_model / num_heads.")
    rope = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if scaling or rope_type != "default":
      raise fail("rope_parameters", f"rope scaling {scaling or rope} is not supported (only the default rope).")
    if rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
      raise fail("partial_rotary_factor", "only full rotary embeddings are supported.")
    activation, mlp_dim = config.get("hidden_act", "silu"), config["intermediate_size"]
    if activation not in ("silu", "gelu", "relu", "gelu_pytorch_tanh"):
      raise fail("hidden_act", f"{activation!r} is not supported; supported: silu, gelu, gelu_pytorch_tanh, relu.")
    fields = dict(
        num_layers=config["num_hidden_layers"], num_heads=heads, d_model=d,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        mlp_ratio=mlp_dim / d, max_len=max_len or config.get("max_position_embeddings", 2048),
        pos_embedding="rope", rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        norm="rmsnorm", norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_embeddings=config.get("tie_word_embeddings", False),
        mlp_activation="gelu_tanh" if activation == "gelu_pytorch_tanh" else activation, gated_mlp=True,
        mlp_bias=config.get("mlp_bias", False), attention_bias=config.get("attention_bias", False))
  try:
    cfg = config_lib.ModelConfig(vocab_size=config["vocab_size"], dropout=0.0, param_dtype=param_dtype, **fields)
  except config_lib.ConfigError as e:
    raise HFError(f"{where}: the model it describes does not fit gptrl's ModelConfig: {e}") from e
  if cfg.mlp_dim != mlp_dim:
    raise fail("intermediate_size", f"{mlp_dim} is not representable as round(mlp_ratio * d_model).")
  return cfg


def hf_config_from_model_config(cfg: config_lib.ModelConfig, *, special_ids: Mapping[str, int | None],
                                dtype: str) -> dict[str, Any]:
  """The config.json of the Hugging Face architecture that `cfg` is (GPT-2 or Llama), or HFError naming the
  fields that keep it from being either."""
  gpt2_needs = dict(pos_embedding="learned", norm="layernorm", gated_mlp=False, kv_heads=cfg.num_heads)
  llama_needs = dict(pos_embedding="rope", norm="rmsnorm", gated_mlp=True)
  target = gpt2_needs if cfg.pos_embedding == "learned" else llama_needs
  differ = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in target.items() if getattr(cfg, k) != v]
  if differ:
    name = "GPT-2" if cfg.pos_embedding == "learned" else "Llama"
    raise HFError(f"this model (pos_embedding={cfg.pos_embedding!r}) is exported as {name}, which it does not "
                  f"fit: {'; '.join(differ)}. Only models of one of those two architectures can be exported.")
  common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, dtype=dtype,
                **{k: v for k, v in special_ids.items()})
  if cfg.pos_embedding == "learned":
    return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_embd=cfg.d_model, n_layer=cfg.num_layers,
                n_head=cfg.num_heads, n_inner=cfg.mlp_dim, n_positions=cfg.max_len,
                activation_function="gelu_new" if cfg.mlp_activation == "gelu_tanh" else cfg.mlp_activation,
                layer_norm_epsilon=cfg.epsilon, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                attn_pdrop=cfg.dropout, scale_attn_weights=True, **common)
  return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=cfg.d_model,
              intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, hidden_act=_HF_ACTIVATION[cfg.mlp_activation],
              max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.epsilon, rope_theta=cfg.rope_theta,
              attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias, attention_dropout=cfg.dropout, **common)


# ----------------------------------------------------------------------------------------------
# Tensors <-> gptrl parameters. gptrl: attention query/key/value [D, heads, K], out [H, K, D], dense kernels
# [in, out], head [D, V]. GPT-2 (Conv1D) stores [in, out]; Llama (nn.Linear) stores [out, in].


def _gpt2_prefix(tensors: Any) -> str:
  return "transformer." if "transformer.wte.weight" in tensors else ""


def params_from_hf_tensors(tensors: _Tensors, cfg: config_lib.ModelConfig, hf_config: Mapping[str, Any]
                           ) -> dict[str, Any]:
  """gptrl's parameter tree (float32 NumPy) from the checkpoint's tensors; every tensor is used exactly once."""
  d, h, g, k, f, v = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  params: dict[str, Any] = {}
  if hf_config["model_type"] == "gpt2":
    p = _gpt2_prefix(tensors)
    params["token_embedding"] = tensors.take(f"{p}wte.weight", (v, d))
    # --max-len may cut the learned position table.
    params["position_embedding"] = tensors.take(f"{p}wpe.weight", (hf_config["n_positions"], d))[:cfg.max_len]
    for i in range(cfg.num_layers):
      b = f"{p}h.{i}."
      qkv = tensors.take(b + "attn.c_attn.weight", (d, 3 * d))
      qkv_bias = tensors.take(b + "attn.c_attn.bias", (3 * d,))
      attn = {}
      for j, name in enumerate(("query", "key", "value")):
        attn[name] = qkv[:, j * d:(j + 1) * d].reshape(d, h, k)
        attn[f"{name}_bias"] = qkv_bias[j * d:(j + 1) * d].reshape(h, k)
      attn["out"] = tensors.take(b + "attn.c_proj.weight", (d, d)).reshape(h, k, d)
      attn["out_bias"] = tensors.take(b + "attn.c_proj.bias", (d,))
      params[f"block_{i}"] = {
          "ln_attn": {"scale": tensors.take(b + "ln_1.weight", (d,)), "bias": tensors.take(b + "ln_1.bias", (d,))},
          "attn": attn,
          "ln_mlp": {"scale": tensors.take(b + "ln_2.weight", (d,)), "bias": tensors.take(b + "ln_2.bias", (d,))},
          "mlp": {"fc_in": {"kernel": tensors.take(b + "mlp.c_fc.weight", (d, f)),
                            "bias": tensors.take(b + "mlp.c_fc.bias", (f,))},
                  "fc_out": {"kernel": tensors.take(b + "mlp.c_proj.weight", (f, d)),
                             "bias": tensors.take(b + "mlp.c_proj.bias", (d,))}}}
    params["ln_final"] = {"scale": tensors.take(f"{p}ln_f.weight", (d,)), "bias": tensors.take(f"{p}ln_f.bias", (d,))}
    ignorable = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old checkpoints
  else:
    params["token_embedding"] = tensors.take("model.embed_tokens.weight", (v, d))
    for i in range(cfg.num_layers):
      b = f"model.layers.{i}."
      attn = {"query": tensors.take(b + "self_attn.q_proj.weight", (h * k, d)).T.reshape(d, h, k),
              "key": tensors.take(b + "self_attn.k_proj.weight", (g * k, d)).T.reshape(d, g, k),
              "value": tensors.take(b + "self_attn.v_proj.weight", (g * k, d)).T.reshape(d, g, k),
              "out": tensors.take(b + "self_attn.o_proj.weight", (d, h * k)).T.reshape(h, k, d)}
      if cfg.attention_bias:
        attn["query_bias"] = tensors.take(b + "self_attn.q_proj.bias", (h * k,)).reshape(h, k)
        attn["key_bias"] = tensors.take(b + "self_attn.k_proj.bias", (g * k,)).reshape(g, k)
        attn["value_bias"] = tensors.take(b + "self_attn.v_proj.bias", (g * k,)).reshape(g, k)
        attn["out_bias"] = tensors.take(b + "self_attn.o_proj.bias", (d,))
      mlp = {"fc_gate": {"kernel": tensors.take(b + "mlp.gate_proj.weight", (f, d)).T},
             "fc_in": {"kernel": tensors.take(b + "mlp.up_proj.weight", (f, d)).T},
             "fc_out": {"kernel": tensors.take(b + "mlp.down_proj.weight", (d, f)).T}}
      if cfg.mlp_bias:
        mlp["fc_gate"]["bias"] = tensors.take(b + "mlp.gate_proj.bias", (f,))
        mlp["fc_in"]["bias"] = tensors.take(b + "mlp.up_proj.bias", (f,))
        mlp["fc_out"]["bias"] = tensors.take(b + "mlp.down_proj.bias", (d,))
      params[f"block_{i}"] = {"ln_attn": {"scale": tensors.take(b + "input_layernorm.weight", (d,))}, "attn": attn,
                              "ln_mlp": {"scale": tensors.take(b + "post_attention_layernorm.weight", (d,))},
                              "mlp": mlp}
    params["ln_final"] = {"scale": tensors.take("model.norm.weight", (d,))}
    ignorable = ("rotary_emb.inv_freq",)  # a buffer of old checkpoints
  if cfg.tie_embeddings:
    ignorable += ("lm_head.weight",)  # some checkpoints store the tied head anyway
  else:
    params["head"] = tensors.take("lm_head.weight", (v, d)).T
  tensors.check_all_taken(ignorable)
  return params


def hf_tensors_from_params(params: Mapping[str, Any], cfg: config_lib.ModelConfig) -> dict[str, np.ndarray]:
  """The Hugging Face tensors (float32 NumPy, names of GPT2LMHeadModel / LlamaForCausalLM) of gptrl `params`.

  A GPT-2 without attention biases (gptrl's default model) gets zero biases, which compute the same function.
  """
  d, h, g, k, f = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_dim
  p = {name: np.asarray(x, np.float32) for name, x in _flatten(params).items()}
  out: dict[str, np.ndarray] = {}

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    return p[name] if name in p else np.zeros(shape, np.float32)

  if cfg.pos_embedding == "learned":
    out["transformer.wte.weight"] = p["token_embedding"]
    out["transformer.wpe.weight"] = p["position_embedding"]
    for i in range(cfg.num_layers):
      b, o = f"block_{i}/", f"transformer.h.{i}."
      out[o + "attn.c_attn.weight"] = np.concatenate([p[b + f"attn/{n}"].reshape(d, d)
                                                      for n in ("query", "key", "value")], axis=1)
      out[o + "attn.c_attn.bias"] = np.concatenate([get(b + f"attn/{n}_bias", (h, k)).reshape(d)
                                                    for n in ("query", "key", "value")])
      out[o + "attn.c_proj.weight"] = p[b + "attn/out"].reshape(d, d)
      out[o + "attn.c_proj.bias"] = get(b + "attn/out_bias", (d,))
      for ours, theirs in (("ln_attn", "ln_1"), ("ln_mlp", "ln_2")):
        out[o + f"{theirs}.weight"], out[o + f"{theirs}.bias"] = p[b + f"{ours}/scale"], p[b + f"{ours}/bias"]
      out[o + "mlp.c_fc.weight"] = p[b + "mlp/fc_in/kernel"]
      out[o + "mlp.c_fc.bias"] = get(b + "mlp/fc_in/bias", (f,))
      out[o + "mlp.c_proj.weight"] = p[b + "mlp/fc_out/kernel"]
      out[o + "mlp.c_proj.bias"] = get(b + "mlp/fc_out/bias", (d,))
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = p["ln_final/scale"], p["ln_final/bias"]
  else:
    out["model.embed_tokens.weight"] = p["token_embedding"]
    for i in range(cfg.num_layers):
      b, o = f"block_{i}/", f"model.layers.{i}."
      out[o + "self_attn.q_proj.weight"] = p[b + "attn/query"].reshape(d, h * k).T
      out[o + "self_attn.k_proj.weight"] = p[b + "attn/key"].reshape(d, g * k).T
      out[o + "self_attn.v_proj.weight"] = p[b + "attn/value"].reshape(d, g * k).T
      out[o + "self_attn.o_proj.weight"] = p[b + "attn/out"].reshape(h * k, d).T
      if cfg.attention_bias:
        for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
          out[o + f"self_attn.{theirs}_proj.bias"] = p[b + f"attn/{ours}_bias"].reshape(-1)
        out[o + "self_attn.o_proj.bias"] = p[b + "attn/out_bias"]
      for ours, theirs in (("fc_gate", "gate_proj"), ("fc_in", "up_proj"), ("fc_out", "down_proj")):
        out[o + f"mlp.{theirs}.weight"] = p[b + f"mlp/{ours}/kernel"].T
        if cfg.mlp_bias:
          out[o + f"mlp.{theirs}.bias"] = p[b + f"mlp/{ours}/bias"]
      out[o + "input_layernorm.weight"] = p[b + "ln_attn/scale"]
      out[o + "post_attention_layernorm.weight"] = p[b + "ln_mlp/scale"]
    out["model.norm.weight"] = p["ln_final/scale"]
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = p["head"].T
  return {name: np.ascontiguousarray(x) for name, x in out.items()}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = value
  return out


def load_hf(hf_dir: str, *, param_dtype: str = "float32", max_len: int = 0
            ) -> tuple[config_lib.ModelConfig, dict[str, Any], dict[str, Any]]:
  """Converts a local Hugging Face GPT-2 / Llama checkpoint folder into gptrl's model, with its own vocabulary.

  Args:
    hf_dir: holds config.json and model.safetensors (or model.safetensors.index.json and its shards).
    param_dtype: the dtype of the returned parameters ("float32", "bfloat16", "float16").
    max_len: see `model_config_from_hf`.
  Returns:
    (ModelConfig, parameter tree of NumPy arrays for `gptrl.model.GPT(cfg)`, config.json as a dict). Token ids
    are the checkpoint's own; see the module docstring for what `import_checkpoint` does about the tokenizer.
  Raises:
    HFError: naming the file and the tensor or key that is missing, mis-shaped or unsupported.
  """
  hf_config = read_hf_config(hf_dir)
  cfg = model_config_from_hf(hf_config, where=os.path.join(hf_dir, "config.json"), param_dtype=param_dtype,
                             max_len=max_len)
  tensors = _Tensors(hf_dir)
  params = params_from_hf_tensors(tensors, cfg, hf_config)
  dtype = np.dtype(ml_dtypes.bfloat16) if param_dtype == "bfloat16" else np.dtype(param_dtype)
  params = _map(lambda x: x.astype(dtype), params)
  return cfg, params, hf_config


def _map(fn: Any, tree: Mapping[str, Any]) -> dict[str, Any]:
  return {k: _map(fn, v) if isinstance(v, Mapping) else fn(v) for k, v in tree.items()}


# ----------------------------------------------------------------------------------------------
# Tokenizer: a sentencepiece model rewritten into gptrl's reserved layout, and the rows that move with it.


@dataclasses.dataclass(frozen=True)
class VocabMap:
  """How an adapted tokenizer's ids relate to the original's.

  source[i]: the original id whose embedding row gptrl id i starts from (-1: a new row, set to the mean).
  back[j]: the gptrl id whose row becomes original id j on export.
  """
  source: np.ndarray
  back: np.ndarray


def adapt_sentencepiece(model_bytes: bytes, *, where: str) -> tuple[bytes, VocabMap]:
  """Rewrites a sentencepiece model (e.g. Llama's tokenizer.model) into gptrl's reserved layout.

  The result has <pad> <unk> <s> </s> at ids 0-3, "\\n" and the chat markers at 4-8 (user-defined), the 256
  byte pieces at 9-264, then every other piece of the original in its original order, with its score; the
  normalizer becomes the identity with no dummy prefix (see the module docstring).
  Returns:
    (the new model's bytes, the VocabMap between the two).
  Raises:
    HFError: the model is not sentencepiece, lacks byte fallback, or cannot be made to round-trip text.
  """
  from sentencepiece import sentencepiece_model_pb2 as pb  # pylint: disable=import-outside-toplevel
  proto = pb.ModelProto()
  try:
    proto.ParseFromString(model_bytes)
  except Exception as e:  # pylint: disable=broad-except
    raise HFError(f"{where}: not a sentencepiece model ({type(e).__name__}: {e}).") from e
  kinds = pb.ModelProto.SentencePiece
  pieces = list(proto.pieces)
  index = {p.piece: i for i, p in enumerate(pieces)}
  if not pieces:
    raise HFError(f"{where}: not a sentencepiece model (no pieces).")
  bytes_missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in index
                   or pieces[index[f"<0x{b:02X}>"]].type != kinds.BYTE]
  if bytes_missing or not proto.trainer_spec.byte_fallback:
    raise HFError(f"{where}: this sentencepiece model has no byte fallback ({len(bytes_missing)} of the 256 byte "
                  "pieces missing), so some text would have no token; gptrl needs one that can encode any text.")
  if proto.trainer_spec.treat_whitespace_as_suffix:
    raise HFError(f"{where}: treat_whitespace_as_suffix is set; gptrl's chat template needs '▁' as a prefix.")

  def role(spec_id: int, kind: int) -> int:
    return spec_id if 0 <= spec_id < len(pieces) and pieces[spec_id].type == kind else -1

  unk = next((i for i, p in enumerate(pieces) if p.type == kinds.UNKNOWN), -1)
  spec = proto.trainer_spec
  newline = index.get("\n", index["<0x0A>"])
  reserved = [(tokenizer_lib.PAD_PIECE, kinds.CONTROL, role(spec.pad_id, kinds.CONTROL)),
              (tokenizer_lib.UNK_PIECE, kinds.UNKNOWN, unk),
              (tokenizer_lib.BOS_PIECE, kinds.CONTROL, role(spec.bos_id, kinds.CONTROL)),
              (tokenizer_lib.EOS_PIECE, kinds.CONTROL, role(spec.eos_id, kinds.CONTROL)),
              (tokenizer_lib.NEWLINE, kinds.USER_DEFINED, newline)]
  reserved += [(m, kinds.USER_DEFINED, index.get(m, -1)) for m in tokenizer_lib.USER_DEFINED_SYMBOLS[1:]]
  reserved += [(f"<0x{b:02X}>", kinds.BYTE, index[f"<0x{b:02X}>"]) for b in range(256)]
  taken = {src for _, _, src in reserved if src >= 0}
  names = {piece for piece, _, _ in reserved}
  rest = [i for i, p in enumerate(pieces) if i not in taken and p.piece not in names]

  new = pb.ModelProto()
  new.CopyFrom(proto)
  del new.pieces[:]
  source = []
  for piece, kind, src in reserved:
    new.pieces.add(piece=piece, score=0.0, type=kind)
    source.append(src)
  for i in rest:
    new.pieces.add().CopyFrom(pieces[i])
    source.append(i)
  new.normalizer_spec.name = "identity"
  new.normalizer_spec.precompiled_charsmap = b""
  new.normalizer_spec.add_dummy_prefix = False
  new.normalizer_spec.remove_extra_whitespaces = False
  new.trainer_spec.vocab_size = len(new.pieces)
  new.trainer_spec.pad_id, new.trainer_spec.unk_id = tokenizer_lib.PAD_ID, tokenizer_lib.UNK_ID
  new.trainer_spec.bos_id, new.trainer_spec.eos_id = tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID
  new.trainer_spec.pad_piece, new.trainer_spec.unk_piece = tokenizer_lib.PAD_PIECE, tokenizer_lib.UNK_PIECE
  new.trainer_spec.bos_piece, new.trainer_spec.eos_piece = tokenizer_lib.BOS_PIECE, tokenizer_lib.EOS_PIECE
  new_bytes = new.SerializeToString()
  try:
    tokenizer_lib.Tokenizer(new_bytes)
  except ValueError as e:
    raise HFError(f"{where}: rewritten into gptrl's layout, the tokenizer is still refused: {e}") from e

  source_ids = np.asarray(source, np.int64)
  back = np.full(len(pieces), -1, np.int64)
  for new_id, src in enumerate(source):  # the lowest gptrl id claims a row: "\n" (4) before the byte <0x0A>
    if src >= 0 and back[src] < 0:
      back[src] = new_id
  lost = [pieces[j].piece for j in np.flatnonzero(back < 0)]
  if lost:
    raise HFError(f"{where}: pieces {lost[:5]} collide with gptrl's reserved pieces and would lose their rows.")
  return new_bytes, VocabMap(source=source_ids, back=back)


def _extend_map(vocab: VocabMap, model_vocab: int) -> VocabMap:
  """Rows past the tokenizer's pieces (a vocabulary padded for speed) keep their order after the new pieces."""
  extra = model_vocab - len(vocab.back)
  if extra < 0:
    raise HFError(f"the model's vocab_size {model_vocab} is smaller than its tokenizer's {len(vocab.back)} pieces.")
  first_new = len(vocab.source)
  return VocabMap(source=np.concatenate([vocab.source, len(vocab.back) + np.arange(extra)]),
                  back=np.concatenate([vocab.back, first_new + np.arange(extra)]))


def remap_vocab(params: Mapping[str, Any], cfg: config_lib.ModelConfig, vocab: VocabMap
                ) -> tuple[dict[str, Any], config_lib.ModelConfig]:
  """Moves the embedding rows (and untied head columns) to the adapted tokenizer's ids; new ids get the mean."""
  vocab = _extend_map(vocab, cfg.vocab_size)

  def rows(table_VxD: np.ndarray) -> np.ndarray:
    mean = table_VxD.astype(np.float32).mean(axis=0).astype(table_VxD.dtype)
    out = table_VxD[np.maximum(vocab.source, 0)]
    out[vocab.source < 0] = mean
    return out

  params = dict(params)
  params["token_embedding"] = rows(np.asarray(params["token_embedding"]))
  if "head" in params:
    params["head"] = np.ascontiguousarray(rows(np.asarray(params["head"]).T).T)
  return params, dataclasses.replace(cfg, vocab_size=len(vocab.source))


def unmap_vocab(params: Mapping[str, Any], cfg: config_lib.ModelConfig, vocab: VocabMap
                ) -> tuple[dict[str, Any], config_lib.ModelConfig]:
  """The inverse of `remap_vocab`: rows back at the original ids; gptrl's new rows (pad, markers) dropped."""
  original = len(vocab.back) + (cfg.vocab_size - len(vocab.source))
  vocab = _extend_map(vocab, original)
  if len(vocab.source) != cfg.vocab_size:
    raise HFError(f"the checkpoint's vocab_size {cfg.vocab_size} does not match the adapted tokenizer's "
                  f"{len(vocab.source)}.")
  params = dict(params)
  params["token_embedding"] = np.asarray(params["token_embedding"])[vocab.back]
  if "head" in params:
    params["head"] = np.asarray(params["head"])[:, vocab.back]
  return params, dataclasses.replace(cfg, vocab_size=len(vocab.back))


def tokenizer_for_import(hf_dir: str) -> tuple[bytes, VocabMap | None, str]:
  """(gptrl tokenizer bytes, the VocabMap or None when ids are unchanged, a note) for the checkpoint in hf_dir."""
  path = os.path.join(hf_dir, "tokenizer.model")
  if not os.path.exists(path):
    present = [n for n in ("vocab.json", "merges.txt", "tokenizer.json") if os.path.exists(os.path.join(hf_dir, n))]
    raise HFError(
        f"{path} does not exist: gptrl needs a sentencepiece tokenizer.model to give the imported model's token "
        f"ids their meaning{' (this folder has ' + ', '.join(present) + ')' if present else ''}. GPT-2's "
        "byte-level BPE (vocab.json + merges.txt) and tokenizer.json-only tokenizers (Llama 3) cannot be "
        "reproduced id for id by sentencepiece, and a model whose ids meant other text would only produce "
        "garbage, so they are not imported. The weights alone convert with gptrl.hf.load_hf (Python).")
  with open(path, "rb") as f:
    data = f.read()
  try:
    tokenizer_lib.Tokenizer(data, path=path)
    return data, None, "the checkpoint's tokenizer.model, already in gptrl's layout; ids unchanged"
  except ValueError:
    pass
  new_bytes, vocab = adapt_sentencepiece(data, where=path)
  return new_bytes, vocab, (f"{path} rewritten into gptrl's reserved layout ({len(vocab.back)} -> "
                            f"{len(vocab.source)} pieces; {int((vocab.source < 0).sum())} new rows)")


# ----------------------------------------------------------------------------------------------
# Workdir import and checkpoint export.


def import_checkpoint(hf_dir: str, workdir: str, *, param_dtype: str = "float32", max_len: int = 0
                      ) -> dict[str, Any]:
  """Imports the Hugging Face checkpoint in `hf_dir` as a gptrl workdir that later stages start from.

  Writes `<workdir>/tokenizer.model` and the Orbax checkpoint `<workdir>/checkpoints/0` (state: the params;
  meta: stage "pretrain", the model config, the tokenizer's sha256 and where it came from).
  Returns:
    the checkpoint's meta.
  Raises:
    HFError: see `load_hf` and `tokenizer_for_import`; also when the workdir already has checkpoints.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from gptrl import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel

  _require_local(hf_dir, "--hf-dir")
  workdir = fileio.abspath(workdir)
  if fileio.isdir(os.path.join(workdir, "checkpoints")) and fileio.listdir(os.path.join(workdir, "checkpoints")):
    raise HFError(f"{workdir}/checkpoints already has checkpoints; import into a new workdir.")
  # The tokenizer first: refusing GPT-2's is cheaper before the weights are read.
  tok_bytes, vocab, tok_note = tokenizer_for_import(hf_dir)
  cfg, params, hf_config = load_hf(hf_dir, param_dtype=param_dtype, max_len=max_len)
  tok = tokenizer_lib.Tokenizer(tok_bytes)
  if vocab is not None:
    params, cfg = remap_vocab(params, cfg, vocab)
  elif cfg.vocab_size < tok.vocab_size:
    raise HFError(f"{hf_dir}: config.json vocab_size {cfg.vocab_size} is smaller than tokenizer.model's "
                  f"{tok.vocab_size} pieces.")
  fileio.makedirs(workdir)
  tok.save(os.path.join(workdir, "tokenizer.model"))
  meta = {"stage": "pretrain", "tokenizer_sha256": tok.sha256, "model": config_lib.to_dict(cfg),
          "num_params": int(sum(x.size for x in _flatten(params).values())),
          "imported_from": {"path": os.path.abspath(hf_dir), "model_type": hf_config["model_type"],
                            "architectures": hf_config.get("architectures"), "tokenizer": tok_note}}
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False)
  try:
    state = {"params": _map(jax.numpy.asarray, params)}
    checkpointer.save(0, state, data={"imported_from": os.path.abspath(hf_dir)}, meta=meta)
  finally:
    checkpointer.close()
  logging.info("Imported %s (%s, %s parameters) into %s; tokenizer: %s.", hf_dir, hf_config["model_type"],
               f"{meta['num_params']:,}", workdir, tok_note)
  return meta


def _restore_params(checkpoint: str, step: int) -> tuple[config_lib.ModelConfig, dict[str, Any], dict, str, str]:
  """(model config, params as NumPy, meta, the checkpoint's 'folder/step', its run's tokenizer.model path)."""
  import jax  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from gptrl import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from gptrl import model as model_lib  # pylint: disable=import-outside-toplevel

  meta, folder, step = ckpt_lib.read_checkpoint_meta(checkpoint, step)
  where = f"{folder}/{step}"
  if "model" not in meta:
    raise HFError(f"{where}: its meta has no model config (is it a gptrl checkpoint?).")
  stage = meta.get("stage")
  if stage == "reward":
    raise HFError(f"{where} is a reward model (a scalar head, no language-model head): nothing to export as a "
                  "causal LM. Export the SFT or PPO checkpoint instead.")
  cfg = ckpt_lib.model_config_from_meta(meta)
  model = model_lib.GPT(cfg)
  abstract = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), jax.numpy.zeros((1, 1), "int32"))
                                                  ["params"]))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = ckpt_lib.abstract_like(abstract, jax.tree.map(lambda _: device, abstract))
  tok_path = os.path.join(os.path.dirname(folder), "tokenizer.model")
  sha = tokenizer_lib.load_tokenizer(tok_path).sha256 if fileio.exists(tok_path) else None
  params, _, _ = ckpt_lib.load_params(checkpoint, target, step=step, tokenizer_sha256=sha,
                                      subtree="policy" if stage in stages_lib.POLICY_RL else "")
  return cfg, jax.device_get(params), meta, where, tok_path


def export_checkpoint(checkpoint: str, out_dir: str, *, step: int = -1, vocab_from: str = "",
                      dtype: str = "float32") -> dict[str, Any]:
  """Writes a gptrl checkpoint as a Hugging Face checkpoint folder (config.json, model.safetensors, tokenizer).

  Args:
    checkpoint: a run's workdir, its checkpoints/ folder or one step folder (see checkpoint.resolve_checkpoint).
    out_dir: the folder to write (created; files of the same names are replaced).
    step: with a workdir, the step; -1: the newest.
    vocab_from: the Hugging Face folder the run was imported from: its tokenizer.model is rewritten again, must
      be the run's tokenizer, and the rows go back to its ids (the exported model then uses the original
      tokenizer files, which are copied, and its special token ids). "": keep gptrl's ids and tokenizer.model.
    dtype: of the written tensors, "float32" | "bfloat16" | "float16".
  Returns:
    the config.json written.
  """
  _require_local(out_dir, "--out")
  if vocab_from:
    _require_local(vocab_from, "--vocab-from")
  cfg, params, meta, where, tok_path = _restore_params(checkpoint, step)
  os.makedirs(out_dir, exist_ok=True)
  if vocab_from:
    original_tok = os.path.join(vocab_from, "tokenizer.model")
    if not os.path.exists(original_tok):
      raise HFError(f"--vocab-from {vocab_from}: {original_tok} does not exist; name the Hugging Face folder the "
                    "run was imported from (its tokenizer.model gives the original ids).")
    with open(original_tok, "rb") as f:
      adapted, vocab = adapt_sentencepiece(f.read(), where=original_tok)
    sha = tokenizer_lib.Tokenizer(adapted).sha256
    if sha != meta.get("tokenizer_sha256"):
      raise HFError(f"--vocab-from {vocab_from}: its tokenizer.model, adapted, has sha256 {sha}, but {where} was "
                    f"trained with {meta.get('tokenizer_sha256')}: it is not the checkpoint the run was imported from.")
    params, cfg = unmap_vocab(params, cfg, vocab)
    original = read_hf_config(vocab_from)
    special = {k: original.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
      if os.path.exists(os.path.join(vocab_from, name)):
        fileio.atomic_write(os.path.join(out_dir, name), fileio.read_bytes(os.path.join(vocab_from, name)))
  else:
    special = {"bos_token_id": tokenizer_lib.BOS_ID, "eos_token_id": tokenizer_lib.EOS_ID,
               "pad_token_id": tokenizer_lib.PAD_ID}
    if fileio.exists(tok_path):  # the run's tokenizer, perhaps in a bucket
      fileio.atomic_write(os.path.join(out_dir, "tokenizer.model"), fileio.read_bytes(tok_path))
  hf_config = hf_config_from_model_config(cfg, special_ids=special, dtype=dtype)
  np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
  tensors = {k: v.astype(np_dtype) for k, v in hf_tensors_from_params(params, cfg).items()}
  write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors)
  fileio.atomic_write(os.path.join(out_dir, "config.json"), json.dumps(hf_config, indent=2, sort_keys=True))
  logging.info("Exported %s (stage %r) as %s to %s.", where, meta.get("stage"), hf_config["architectures"][0],
               out_dir)
  return hf_config


# ----------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=f"python -m {_PROG}", description=__doc__.split("\n\n", 1)[0],
                                   epilog=__doc__.split("\n\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="a Hugging Face checkpoint folder -> a gptrl workdir")
  imp.add_argument("--hf-dir", required=True, help="folder with config.json, model.safetensors, tokenizer.model")
  imp.add_argument("--out", required=True, help="the gptrl workdir to create")
  imp.add_argument("--param-dtype", default="float32", choices=config_lib.DTYPES)
  imp.add_argument("--max-len", type=int, default=0,
                   help="context length of the imported model (0: the checkpoint's; learned positions: at most that)")
  exp = sub.add_parser("export", help="a gptrl checkpoint -> a Hugging Face checkpoint folder")
  exp.add_argument("--checkpoint", required=True, help="a run's workdir, checkpoints/ folder or one step folder")
  exp.add_argument("--out", required=True, help="the folder to write")
  exp.add_argument("--step", type=int, default=-1)
  exp.add_argument("--vocab-from", default="", help="the Hugging Face folder the run was imported from: "
                                                     "export with its token ids and tokenizer files")
  exp.add_argument("--dtype", default="float32", choices=config_lib.DTYPES)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status (2 with a one-line message for a refused input)."""
  args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")  # orbax logs much at INFO
  try:
    if args.command == "import":
      meta = import_checkpoint(args.hf_dir, args.out, param_dtype=args.param_dtype, max_len=args.max_len)
      print(f"imported {args.hf_dir} -> {fileio.abspath(args.out)} ({meta['num_params']:,} parameters; "
            f"{meta['imported_from']['tokenizer']}).\nStart a stage from it with "
            f"--config.init.checkpoint={fileio.abspath(args.out)}")
    else:
      hf_config = export_checkpoint(args.checkpoint, args.out, step=args.step, vocab_from=args.vocab_from,
                                    dtype=args.dtype)
      print(f"exported {args.checkpoint} -> {os.path.abspath(args.out)} ({hf_config['architectures'][0]})")
  except (HFError, config_lib.ConfigError, tokenizer_lib.TokenizerMismatchError) as e:
    print(f"{_PROG}: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
