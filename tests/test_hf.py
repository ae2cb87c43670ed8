"""Tests of gptrl/hf.py: Hugging Face GPT-2 and Llama checkpoints imported into gptrl and exported back.

The reference is `transformers` itself (torch, float32, eager attention): tiny randomly initialised models are
saved with save_pretrained, imported with our code, and must give the same logits; exported tensors must equal
the originals bit for bit and load back into transformers. Skipped when transformers is not installed.
"""
import io
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

from gptrl import checkpoint as ckpt_lib
from gptrl import hf
from gptrl import model as model_lib
from gptrl import tokenizer as tokenizer_lib
from gptrl.config import ModelConfig

import numeric

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

GPT2_VARIANTS = {
    "gelu_new_tied": dict(activation_function="gelu_new", tie_word_embeddings=True),
    "gelu_untied": dict(activation_function="gelu", tie_word_embeddings=False, n_inner=48),
}
TEXT = ("The quick brown fox jumps over the lazy dog. A wizard's job is to vex chumps quickly in fog.\n"
        "Pack my box with five dozen liquor jugs; how vexingly quick daft zebras jump!\n")


def _randomise(model, seed):
  """Weights far from the default init (norm scales near 1, the rest N(0, 0.2)), so every tensor matters."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.1 * noise if ("norm" in name or ".ln_" in name) else 0.2 * noise)
  return model.eval()


def _llama_tokenizer(path, text=TEXT):
  """A small sentencepiece model laid out as Llama's (<unk> <s> </s>, 256 bytes, dummy prefix, byte fallback)."""
  writer = io.BytesIO()
  spm.SentencePieceTrainer.Train(
      sentence_iterator=iter(text.split("\n") * 20), model_writer=writer, vocab_size=320, model_type="bpe",
      byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
      remove_extra_whitespaces=False, character_coverage=1.0, minloglevel=2)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(writer.getvalue())
  return spm.SentencePieceProcessor(model_proto=writer.getvalue())


@pytest.fixture(scope="module")
def gpt2_dirs(tmp_path_factory):
  dirs = {}
  for i, (name, extra) in enumerate(GPT2_VARIANTS.items()):
    config = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=24,
                                     bos_token_id=0, eos_token_id=0, **extra)
    folder = tmp_path_factory.mktemp(f"gpt2_{name}")
    _randomise(transformers.GPT2LMHeadModel(config), seed=i).save_pretrained(folder)
    dirs[name] = str(folder)
  return dirs


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("llama")
  sp = _llama_tokenizer(folder / "tokenizer.model")
  config = transformers.LlamaConfig(vocab_size=sp.GetPieceSize(), hidden_size=32, intermediate_size=72,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=32, rope_theta=500.0, rms_norm_eps=1e-5,
                                    tie_word_embeddings=False)
  _randomise(transformers.LlamaForCausalLM(config), seed=7).save_pretrained(folder)
  return str(folder)


def _reference(folder):
  return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def _reference_logits(model, ids, mask=None, positions=None):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
                position_ids=None if positions is None else torch.tensor(positions))
  return out.logits.numpy()


def _left_padded(vocab, seed=0):
  """Tokens, mask and positions [3, 12]: rows start 0, 3 and 7 tokens late (left padding), positions from 0."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (3, 12))
  mask = np.ones_like(ids)
  for row, pad in enumerate((0, 3, 7)):
    mask[row, :pad] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  return ids, mask, positions


def _ours(cfg, params, ids, mask=None, positions=None):
  model = model_lib.GPT(cfg)
  return np.asarray(model.apply({"params": params}, jnp.asarray(ids, jnp.int32),
                                attention_mask_BxT=None if mask is None else jnp.asarray(mask),
                                positions_BxT=None if positions is None else jnp.asarray(positions, jnp.int32)))


def _assert_close_where(mask, ours, reference):
  """float32 agreement at the valid positions, to 1e-5 of the logits' scale (exact vs tanh GELU is off by 5e-4)."""
  valid = mask.astype(bool)
  assert np.abs(reference[valid]).max() > 1.0  # the randomised weights give logits that are not all near zero
  numeric.assert_close(ours[valid], reference[valid])


@pytest.mark.parametrize("variant", sorted(GPT2_VARIANTS))
def test_gpt2_logits_match_transformers_with_left_padding(gpt2_dirs, variant):
  cfg, params, _ = hf.load_hf(gpt2_dirs[variant])
  assert cfg.tie_embeddings == GPT2_VARIANTS[variant]["tie_word_embeddings"]
  ids, mask, positions = _left_padded(cfg.vocab_size)
  reference = _reference_logits(_reference(gpt2_dirs[variant]), ids, mask, positions)
  _assert_close_where(mask, _ours(cfg, params, ids, mask, positions), reference)


@pytest.mark.parametrize("attention", ["xla", "dot_product"])
def test_llama_gqa_logits_match_transformers_with_left_padding(llama_dir, attention):
  cfg, params, _ = hf.load_hf(llama_dir)
  assert (cfg.num_heads, cfg.kv_heads, cfg.gated_mlp, cfg.rope_theta) == (4, 2, True, 500.0)
  cfg = ModelConfig(**{**cfg.__dict__, "attention": attention})
  ids, mask, positions = _left_padded(cfg.vocab_size, seed=1)
  reference = _reference_logits(_reference(llama_dir), ids, mask, positions)
  _assert_close_where(mask, _ours(cfg, params, ids, mask, positions), reference)


def test_imported_llama_kv_cache_decode_matches_the_full_forward_pass(llama_dir):
  cfg, params, _ = hf.load_hf(llama_dir)
  model = model_lib.GPT(cfg)
  ids, mask, positions = _left_padded(cfg.vocab_size, seed=2)
  full = _ours(cfg, params, ids, mask, positions)
  prompt = 8  # prefill the first 8 slots (left padding included), then one token at a time
  cache = model_lib.init_cache(model, ids.shape[0], ids.shape[1])
  step = jax.jit(lambda c, x, m, p: model.apply({"params": params, "cache": c}, x, attention_mask_BxT=m,
                                                positions_BxT=p, decode=True, mutable=["cache"]))
  logits, updated = step(cache, ids[:, :prompt], mask[:, :prompt], positions[:, :prompt])
  pieces = [np.asarray(logits)]
  for t in range(prompt, ids.shape[1]):
    logits, updated = step(updated["cache"], ids[:, t:t + 1], mask[:, t:t + 1], positions[:, t:t + 1])
    pieces.append(np.asarray(logits))
  assert updated["cache"]["block_0"]["attn"]["cached_key"].shape == (3, 2, 12, 8)  # G = 2 key/value heads
  _assert_close_where(mask, np.concatenate(pieces, axis=1), full)


def test_sharded_bfloat16_checkpoint_reads_as_the_same_weights(llama_dir, tmp_path):
  reference = _reference(llama_dir).to(torch.bfloat16)
  reference.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  cfg, params, _ = hf.load_hf(str(tmp_path), param_dtype="bfloat16")
  assert params["block_1"]["mlp"]["fc_gate"]["kernel"].dtype == jnp.bfloat16
  weights = {k: v.float().numpy() for k, v in reference.state_dict().items()}
  np.testing.assert_array_equal(params["block_1"]["mlp"]["fc_gate"]["kernel"].astype(np.float32),
                                weights["model.layers.1.mlp.gate_proj.weight"].T)
  exported = hf.hf_tensors_from_params(params, cfg)
  assert sorted(exported) == sorted(weights)
  for name, tensor in weights.items():
    np.testing.assert_array_equal(exported[name], tensor, err_msg=name)


@pytest.mark.parametrize("variant", sorted(GPT2_VARIANTS))
def test_gpt2_export_gives_back_the_original_tensors_and_transformers_loads_it(gpt2_dirs, variant, tmp_path):
  cfg, params, _ = hf.load_hf(gpt2_dirs[variant])
  exported = hf.hf_tensors_from_params(params, cfg)
  original = safetensors_numpy.load_file(os.path.join(gpt2_dirs[variant], "model.safetensors"))
  assert sorted(exported) == sorted(original)
  for name, tensor in original.items():
    np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
  hf.write_safetensors(str(tmp_path / "model.safetensors"), exported)
  config = hf.hf_config_from_model_config(cfg, special_ids={"bos_token_id": 0, "eos_token_id": 0}, dtype="float32")
  (tmp_path / "config.json").write_text(json.dumps(config))
  ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 10))
  np.testing.assert_array_equal(_reference_logits(_reference(str(tmp_path)), ids),
                                _reference_logits(_reference(gpt2_dirs[variant]), ids))


def test_gptrl_default_model_exports_as_gpt2_with_the_same_logits(tmp_path):
  cfg = ModelConfig(vocab_size=80, num_layers=2, num_heads=4, d_model=32, max_len=16)  # no attention biases
  model = model_lib.GPT(cfg)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), int))))
  rng = np.random.default_rng(5)
  params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes["params"])
  hf.write_safetensors(str(tmp_path / "model.safetensors"), hf.hf_tensors_from_params(params, cfg))
  config = hf.hf_config_from_model_config(cfg, special_ids={}, dtype="float32")
  (tmp_path / "config.json").write_text(json.dumps(config))
  ids = rng.integers(0, 80, (2, 16))
  _assert_close_where(np.ones_like(ids), _ours(cfg, params, ids), _reference_logits(_reference(str(tmp_path)), ids))


def test_a_model_of_neither_architecture_is_not_exported():
  cfg = ModelConfig(vocab_size=80, pos_embedding="rope", norm="layernorm")
  with pytest.raises(hf.HFError, match=r"Llama.*norm='layernorm' \(needs 'rmsnorm'\).*gated_mlp=False"):
    hf.hf_config_from_model_config(cfg, special_ids={}, dtype="float32")


def _original_ids(ours, tok, sp):
  """The original tokenizer's id of each gptrl id, through the pieces' text ("\\n" was Llama's byte <0x0A>)."""
  pieces = [tok.id_to_piece(i) for i in ours]
  return [sp.PieceToId("<0x0A>" if p == "\n" else p) for p in pieces]


def test_llama_import_makes_a_workdir_that_a_later_stage_loads_and_export_restores(llama_dir, tmp_path, capsys):
  workdir, out, out_gptrl_ids = tmp_path / "run", tmp_path / "exported", tmp_path / "exported_gptrl_ids"
  assert hf.main(["import", "--hf-dir", llama_dir, "--out", str(workdir)]) == 0
  assert f"--config.init.checkpoint={workdir}" in capsys.readouterr().out

  # What SFT does with --config.init.checkpoint=WORKDIR: meta, tokenizer (sha256 checked), parameters.
  meta, folder, step = ckpt_lib.read_checkpoint_meta(str(workdir))
  assert meta["stage"] == "pretrain" and step == 0
  tok = tokenizer_lib.load_tokenizer(workdir / "tokenizer.model", expected_sha256=meta["tokenizer_sha256"])
  cfg = ckpt_lib.model_config_from_meta(meta)
  assert cfg.vocab_size == tok.vocab_size == 320 - 3 + 265 - 256  # <pad> and the 4 chat markers are new
  model = model_lib.GPT(cfg)
  abstract = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), int)))
                            ["params"])
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params, _, _ = ckpt_lib.load_params(str(workdir), ckpt_lib.abstract_like(abstract, jax.tree.map(lambda _: device,
                                                                                                 abstract)),
                                      tokenizer_sha256=tok.sha256)

  # The same text through both tokenizers: the ids differ, the pieces and the logits over them do not.
  sp = spm.SentencePieceProcessor(model_file=os.path.join(llama_dir, "tokenizer.model"))
  ours_ids = tok.encode(TEXT[:60])
  original_ids = _original_ids(ours_ids, tok, sp)
  assert sp.DecodeIds(original_ids) == tok.decode(ours_ids) == TEXT[:60]
  ours = _ours(cfg, params, [ours_ids])
  reference = _reference_logits(_reference(llama_dir), [original_ids])
  shared = [i for i in range(tok.vocab_size) if i not in (tok.pad_id, *range(tok.system_id, tok.end_of_turn_id + 1))]
  _assert_close_where(np.ones((1, len(ours_ids))), ours[..., shared],
                      reference[..., _original_ids(shared, tok, sp)])

  # Export with the original ids: bit-identical tensors, and transformers loads it.
  assert hf.main(["export", "--checkpoint", str(workdir), "--out", str(out), "--vocab-from", llama_dir]) == 0
  exported = safetensors_numpy.load_file(out / "model.safetensors")
  original = safetensors_numpy.load_file(os.path.join(llama_dir, "model.safetensors"))
  assert sorted(exported) == sorted(original)
  for name, tensor in original.items():
    np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
  with open(os.path.join(llama_dir, "tokenizer.model"), "rb") as f:
    assert (out / "tokenizer.model").read_bytes() == f.read()
  ids = np.random.default_rng(4).integers(0, 320, (2, 10))
  np.testing.assert_array_equal(_reference_logits(_reference(str(out)), ids),
                                _reference_logits(_reference(llama_dir), ids))

  # --vocab-from must be the folder the run came from.
  other = tmp_path / "other"
  _llama_tokenizer(other / "tokenizer.model", text=TEXT.upper())
  argv = ["export", "--checkpoint", str(workdir), "--out", str(tmp_path / "x"), "--vocab-from", str(other)]
  assert hf.main(argv) == 2
  assert "not the checkpoint the run was imported from" in capsys.readouterr().err

  # Export with gptrl's ids: transformers computes our logits on our ids.
  assert hf.main(["export", "--checkpoint", str(workdir), "--out", str(out_gptrl_ids)]) == 0
  assert tokenizer_lib.load_tokenizer(out_gptrl_ids / "tokenizer.model").sha256 == tok.sha256
  _assert_close_where(np.ones((1, len(ours_ids))), ours, _reference_logits(_reference(str(out_gptrl_ids)),
                                                                            [ours_ids]))


def test_gpt2_byte_level_bpe_tokenizer_is_refused_with_the_reason(gpt2_dirs, tmp_path):
  folder = tmp_path / "gpt2"
  shutil.copytree(gpt2_dirs["gelu_new_tied"], folder)
  (folder / "vocab.json").write_text("{}")
  (folder / "merges.txt").write_text("#version: 0.2\n")
  with pytest.raises(hf.HFError, match=r"tokenizer\.model does not exist.*vocab\.json, merges\.txt.*byte-level BPE"):
    hf.import_checkpoint(str(folder), str(tmp_path / "run"))
  assert hf.main(["import", "--hf-dir", str(folder), "--out", str(tmp_path / "run")]) == 2
  assert not (tmp_path / "run" / "checkpoints").exists()


def _broken_copy(source, folder, edit):
  shutil.copytree(source, folder)
  tensors = safetensors_numpy.load_file(folder / "model.safetensors")
  edit(tensors)
  safetensors_numpy.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
  return folder


def test_import_errors_name_the_file_and_the_tensor(gpt2_dirs, tmp_path):
  source = gpt2_dirs["gelu_new_tied"]
  with pytest.raises(hf.HFError, match=f"{tmp_path}/empty/config.json does not exist"):
    (tmp_path / "empty").mkdir()
    hf.load_hf(str(tmp_path / "empty"))

  bert = tmp_path / "bert"
  shutil.copytree(source, bert)
  (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
  with pytest.raises(hf.HFError, match=f"{bert}/config.json: model_type 'bert' is not supported"):
    hf.load_hf(str(bert))

  missing = _broken_copy(source, tmp_path / "missing", lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
  with pytest.raises(hf.HFError, match=f"{missing}: tensor 'transformer.h.1.mlp.c_fc.bias' is missing"):
    hf.load_hf(str(missing))

  def reshape(tensors):
    tensors["transformer.h.0.attn.c_proj.weight"] = np.zeros((32, 31), np.float32)
  reshaped = _broken_copy(source, tmp_path / "reshaped", reshape)
  with pytest.raises(hf.HFError, match=(f"{reshaped}/model.safetensors: tensor 'transformer.h.0.attn.c_proj.weight'"
                                        r" has shape \(32, 31\), but config.json implies \(32, 32\)")):
    hf.load_hf(str(reshaped))

  extra = _broken_copy(source, tmp_path / "extra", lambda t: t.update({"score.weight": np.zeros(3, np.float32)}))
  with pytest.raises(hf.HFError, match="1 tensor.* no place for: score.weight"):
    hf.load_hf(str(extra))
