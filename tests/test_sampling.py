"""Tests for gptrl/sampling.py: greedy decoding against a no-cache argmax loop, padding, top_k, stop_id."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptrl import model as model_lib
from gptrl import sampling
from gptrl.config import ModelConfig

CFG = ModelConfig(vocab_size=64, num_layers=2, num_heads=4, d_model=32, max_len=16, init_std=0.3)
PROMPT = [5, 17, 3]
LONG = [9, 1, 2, 8, 40, 33, 7]
NEW = 6


@functools.lru_cache(maxsize=None)
def _model():
  model = model_lib.GPT(CFG)
  params = jax.jit(lambda r: nn.meta.unbox(model.init(r, jnp.zeros((1, 16), jnp.int32))["params"]))(
      jax.random.key(0))
  return model, params


def _greedy(prompts, **kwargs):
  model, params = _model()
  kwargs.setdefault("temperature", 0.0)
  return sampling.generate(model, params, prompts, max_new_tokens=NEW, rng=jax.random.key(1), **kwargs)


def _reference_greedy(prompt):
  model, params = _model()
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  tokens = list(prompt)
  for _ in range(NEW):
    logits = apply(params, jnp.asarray([tokens], jnp.int32))
    tokens.append(int(np.argmax(np.asarray(logits[0, -1]))))
  return tokens[len(prompt):]


def test_greedy_is_deterministic_and_matches_full_forward_argmax_loop():
  first = _greedy([PROMPT])
  assert first == _greedy([PROMPT])
  assert first[0] == _reference_greedy(PROMPT)


def test_padding_prompt_in_batch_with_longer_prompt_keeps_greedy_tokens():
  alone = _greedy([PROMPT])[0]
  batched = _greedy([PROMPT, LONG])
  assert batched[0] == alone
  assert batched[1] == _reference_greedy(LONG)


def test_top_k_one_equals_greedy():
  assert _greedy([PROMPT, LONG], temperature=1.0, top_k=1) == _greedy([PROMPT, LONG])


def test_stop_id_ends_a_row():
  full = _greedy([PROMPT])[0]
  stop = full[2]
  out = _greedy([PROMPT, LONG], stop_id=stop)
  assert out[0] == full[:full.index(stop) + 1]
  assert out[0][-1] == stop


def test_sampled_tokens_do_not_depend_on_how_much_padding_a_prompt_gets():
  """Under a fixed key, a prompt's sampled continuation is the same alone, next to a longer prompt, and padded to a
  fixed prompt length: padding is masked out and positions restart at each prompt's first token."""
  alone = _greedy([PROMPT], temperature=1.0)[0]
  assert _greedy([PROMPT, LONG], temperature=1.0)[0] == alone
  assert _greedy([PROMPT], temperature=1.0, min_prompt_len=9)[0] == alone
  assert _greedy([PROMPT, LONG], temperature=1.0, min_prompt_len=10) == _greedy([PROMPT, LONG], temperature=1.0)
