"""A decoder-only transformer (GPT) in flax.linen, with logical axis names on parameters and activations.

Shape letters used in names (the legend is also in README.md):
  B batch, T sequence length (queries), S key/value length, D model width (d_model),
  H attention heads, K head dimension, F MLP hidden width, V vocabulary size,
  G key/value heads (grouped-query attention; G = H without it), R query heads per key/value head (H / G),
  N new tokens per sequence (sampling), L a token buffer's length (prompt + N).

Logical axis names (mapped to mesh axes only in gptrl/sharding.py):
  parameters:  vocab, embed, mlp, heads, kv, positions, norm
  activations: batch, length, act_embed, act_mlp, act_heads, act_kv, act_vocab
  (the decode cache uses the activation names: keys/values [batch, act_heads, length, act_kv].)
  Key/value projections and caches have G heads, also named heads / act_heads.

Incremental decoding: `GPT.apply(..., decode=True, mutable=["cache"])` with a cache from `init_cache` runs
only the new tokens through the model; each attention layer keeps their keys and values in the flax "cache"
collection (see `Attention`).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptrl import splash
from gptrl.config import ModelConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: a fully masked row gives uniform, not NaN


def _init(std: float) -> nn.initializers.Initializer:
  return nn.initializers.normal(stddev=std)


def _constrain(x: jax.Array, *names: str) -> jax.Array:
  return nn.with_logical_constraint(x, names)


def _in_use(kernel: jax.Array, *names: str) -> jax.Array:
  """A weight as its matmul reads it: laid out by the activations' rules (`act_*` names), i.e. whole along
  `embed`, which only fsdp's storage splits, and split over tensor where the computation is. This is FSDP's
  all-gather of each weight before its use (and, transposed, a reduce-scatter of its gradient). Left to itself,
  XLA computed a product with a fsdp-sharded contracting axis as a loop over the fsdp shards (a windowed
  einsum: 16 collective permutes of a [48, N] slice on v6e:4x4, each step adding a [tokens, N] partial product
  into the whole output), which reread and rewrote the output 8-16 times and multiplied 48-wide slices."""
  return _constrain(kernel, *names)


def matmul(x: jax.Array, kernel: jax.Array, contract: int = 1, *, transpose_kernel: bool = False,
           preferred_element_type: Any = None) -> jax.Array:
  """x [..., I_1..I_c] @ kernel [I_1..I_c, O_1..O_m] -> [..., O_1..O_m] (the last `contract` axes of x against the
  first of the kernel; `transpose_kernel`: the kernel is [O, I], as a tied embedding is), computed as one 2-D
  matmul of [prod(...), prod(I)] by [prod(I), prod(O)].

  Same numbers as the einsum, but XLA:CPU lowers the weight gradient of a 2-D matmul (contracting the leading
  axis of both operands) straight to a GEMM, where the einsum's gradient, contracting batch and length, first
  copies the activations into a transposed layout (forward+backward of GPT-2's MLP: 1.2x faster on CPU). The
  merged leading axes keep the batch axis major, so a batch-sharded x stays sharded the same way.
  """
  if transpose_kernel:
    outs, ins = kernel.shape[:kernel.ndim - contract], kernel.shape[kernel.ndim - contract:]
    kernel_2d = kernel.reshape(int(np.prod(outs)), int(np.prod(ins)))
    dims = (((1,), (1,)), ((), ()))
  else:
    ins, outs = kernel.shape[:contract], kernel.shape[contract:]
    kernel_2d = kernel.reshape(int(np.prod(ins)), int(np.prod(outs)))
    dims = (((1,), (0,)), ((), ()))
  lead = x.shape[:x.ndim - contract]
  if tuple(x.shape[x.ndim - contract:]) != tuple(ins):
    raise ValueError(f"matmul: x {x.shape} does not end in the kernel's input axes {tuple(ins)}")
  y = jax.lax.dot_general(x.reshape(int(np.prod(lead)), int(np.prod(ins))), kernel_2d, dims,
                          preferred_element_type=preferred_element_type)
  return y.reshape(*lead, *outs)


class Dense(nn.Module):
  """nn.Dense's parameters (`kernel` [I, O], `bias` [O]) and numbers, through `matmul` (a 2-D GEMM)."""
  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros
  in_use: tuple[str, ...] | None = None  # the kernel's logical axes as the matmul reads it (`_in_use`)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
    kernel = kernel.astype(self.dtype)
    if self.in_use is not None:
      kernel = _in_use(kernel, *self.in_use)
    y = matmul(x.astype(self.dtype), kernel)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(self.dtype)
    return y


class Norm(nn.Module):
  """LayerNorm or RMSNorm over the last axis, computed in float32."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg = self.config
    param_dtype = DTYPES[cfg.param_dtype]
    d = x_BxTxD.shape[-1]
    x = x_BxTxD.astype(jnp.float32)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,), param_dtype)
    if cfg.norm == "rmsnorm":
      bias = jnp.zeros((d,), jnp.float32)
    else:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (d,), param_dtype)
    y = _normalize(x, scale.astype(jnp.float32), bias.astype(jnp.float32), cfg.epsilon, cfg.norm == "layernorm")
    return y.astype(DTYPES[cfg.dtype])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, center: bool) -> jax.Array:
  """(x - mean) / std * scale + bias over the last axis (center=False: RMSNorm, x / rms * scale + bias).

  A hand-written backward whose per-row means are computed once (an optimization barrier): left to autodiff,
  XLA's CPU fusion recomputes those row reductions inside each element's gradient, a cost that grows with
  d_model times the tokens (a third of a 12-layer, d_model 768 train step; benchmarks/train_throughput.py).
  """
  return _normalize_fwd(x, scale, bias, eps, center)[0]


def _normalize_fwd(x, scale, bias, eps, center):
  if center:
    x = x - jnp.mean(x, axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  xhat = x * rstd
  return xhat * scale + bias, (xhat, rstd, scale)


def _normalize_bwd(eps, center, residuals, g):
  del eps
  xhat, rstd, scale = residuals
  reduce_rows = tuple(range(g.ndim - 1))
  dscale, dbias = jnp.sum(g * xhat, axis=reduce_rows), jnp.sum(g, axis=reduce_rows)
  gx = g * scale
  proj = jnp.mean(gx * xhat, axis=-1, keepdims=True)
  mean = jnp.mean(gx, axis=-1, keepdims=True) if center else jnp.zeros_like(proj)
  proj, mean = jax.lax.optimization_barrier((proj, mean))
  return rstd * (gx - mean - xhat * proj), dscale, dbias


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def rotary_embedding(x_BxTxHxK: jax.Array, positions_BxT: jax.Array, theta: float, scale: float = 1.0) -> jax.Array:
  """Rotary position embedding (RoFormer), rotating pairs (i, i + K/2) of each head's features; times `scale`
  before the one rounding to x's dtype."""
  k = x_BxTxHxK.shape[-1]
  inv_freq_K2 = 1.0 / (theta ** (jnp.arange(0, k // 2, dtype=jnp.float32) * 2.0 / k))
  angles_BxTxK2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq_K2
  sin, cos = jnp.sin(angles_BxTxK2)[:, :, None, :], jnp.cos(angles_BxTxK2)[:, :, None, :]
  x = x_BxTxHxK.astype(jnp.float32)
  x1, x2 = x[..., : k // 2], x[..., k // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return (out * scale if scale != 1.0 else out).astype(x_BxTxHxK.dtype)


def _causal_mask(valid_BxT: jax.Array | None, t: int, b: int) -> jax.Array:
  """[B, 1, T, T]: query t may attend to key s <= t, and only to valid keys (all valid when None)."""
  mask_Bx1xTxS = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), dtype=jnp.bool_)), (b, 1, t, t))
  if valid_BxT is not None:
    mask_Bx1xTxS = mask_Bx1xTxS & valid_BxT.astype(jnp.bool_)[:, None, None, :]
  return mask_Bx1xTxS


def _masked_softmax_parts(scores_BxHxTxS: jax.Array, mask_Bx1xTxS: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Softmax over keys of the float32 scores, masked keys excluded, as (exp(scores - max), its sum over keys
  [B, H, T, 1]): attention divides the value-weighted sum by the sum afterwards, one pass over the [T, S]
  weights fewer than normalising them (15% of attention's forward+backward on CPU)."""
  scores_BxHxTxS = jnp.where(mask_Bx1xTxS, scores_BxHxTxS, _MASK_VALUE)
  max_BxHxTx1 = jax.lax.stop_gradient(jnp.max(scores_BxHxTxS, axis=-1, keepdims=True))
  weights_BxHxTxS = jnp.exp(scores_BxHxTxS - max_BxHxTx1)
  return weights_BxHxTxS, jnp.sum(weights_BxHxTxS, axis=-1, keepdims=True)


def uses_splash(cfg: ModelConfig, t: int, decode: bool = False) -> bool:
  """Whether attention over `t` tokens goes through the splash kernel (gptrl/splash.py): model.attention =
  "splash", a whole-sequence pass (decoding steps read the cache by the einsum path) and t a multiple of 128;
  on TPUs (elsewhere the einsum path computes the same: splash.runs_here)."""
  return cfg.attention == "splash" and not decode and splash.supports(t)


def causal_chunk_length(cfg: ModelConfig, t: int) -> int:
  """Query block length of causal attention over `t` tokens (see ModelConfig.causal_chunk); >= t: one block."""
  if cfg.causal_chunk:
    return cfg.causal_chunk
  return max(64, t // 8) if t >= 128 else t


class Attention(nn.Module):
  """Multi-head causal self-attention, over the current tokens or (decode=True) over a key/value cache.

  With `num_kv_heads` set (grouped-query attention, Llama 2/3), G < H key/value heads each serve R = H / G
  consecutive query heads (query head h reads key/value head h // R, as in Hugging Face's `repeat_kv`).

  With `decode=True` the layer keeps, in the "cache" collection:
    cached_key, cached_value: [B, G, S, K] in the compute dtype (keys already rotated when rope is used; heads
      before slots, the layout attention reads, so a decoding step never transposes the cache);
    cached_valid: [B, S] bool, which slots hold real tokens that queries may attend to;
    index: int32 scalar, the next slot to write; or [B], one per row (`init_cache(per_row=True)`: rows that
      started at different times, as a server's batch slots do).
  A call with T tokens writes them at slots [index, index + T), lets the query at slot index + t attend to the
  valid slots s <= index + t, and advances index by T, so one code path serves prefill and per-token steps.
  S (the cache length) is the length of the tokens `init` saw; during init the cache is only created.
  Writing past S is not checked (dynamic_update_slice would clamp the index): callers size the cache.
  """
  config: ModelConfig
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, valid_BxT: jax.Array | None) -> jax.Array:
    """x [B, T, D], positions [B, T], valid [B, T] (1 for real tokens; None: all) -> [B, T, D]."""
    cfg = self.config
    dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    b, t = x_BxTxD.shape[:2]
    # Explicit [D, H, K] params + matmul (not nn.DenseGeneral, which reshapes a boxed flat kernel and so breaks
    # logical sharding under an active mesh).
    qkv_init = nn.with_logical_partitioning(_init(cfg.init_std), ("embed", "heads", "kv"))
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv"))
    x = x_BxTxD.astype(dtype)

    def project(name: str, heads: int) -> jax.Array:
      """x [B, T, D] -> [B, T, heads, K] through the parameter `name` (and `name`_bias with attention_bias)."""
      kernel_DxHxK = self.param(name, qkv_init, (cfg.d_model, heads, cfg.head_dim), param_dtype)
      y_BxTxHxK = matmul(x, _in_use(kernel_DxHxK.astype(dtype), "act_embed", "act_heads", "act_kv"))
      if cfg.attention_bias:
        y_BxTxHxK = y_BxTxHxK + self.param(f"{name}_bias", bias_init, (heads, cfg.head_dim),
                                           param_dtype).astype(dtype)
      return _constrain(y_BxTxHxK, "batch", "length", "act_heads", "act_kv")

    q_BxTxHxK = project("query", cfg.num_heads)
    k_BxSxGxK = project("key", cfg.kv_heads)
    v_BxSxGxK = project("value", cfg.kv_heads)
    kernel = uses_splash(cfg, t, self.decode) and splash.runs_here()
    # The splash kernel does not scale its scores: its queries come scaled by 1 / sqrt(K), rounded once (with the
    # rotation, where there is one).
    q_scale = 1.0 / np.sqrt(cfg.head_dim) if kernel else 1.0
    if cfg.pos_embedding == "rope":
      q_BxTxHxK = rotary_embedding(q_BxTxHxK, positions_BxT, cfg.rope_theta, q_scale)
      k_BxSxGxK = rotary_embedding(k_BxSxGxK, positions_BxT, cfg.rope_theta)
    elif kernel:
      q_BxTxHxK = (q_BxTxHxK.astype(jnp.float32) * q_scale).astype(dtype)
    k_BxGxSxK, v_BxGxSxK = jnp.swapaxes(k_BxSxGxK, 1, 2), jnp.swapaxes(v_BxSxGxK, 1, 2)
    if self.decode:
      k_BxGxSxK, v_BxGxSxK, mask_Bx1xTxS = self._update_cache(k_BxGxSxK, v_BxGxSxK, valid_BxT)
    else:
      mask_Bx1xTxS = _causal_mask(valid_BxT, t, b)

    attention_dropout = nn.Dropout(cfg.dropout)
    dropout = lambda p: attention_dropout(p, deterministic=self.deterministic)
    chunk = causal_chunk_length(cfg, t)
    if kernel:
      out_BxTxHxK = splash.causal_attention(q_BxTxHxK, k_BxGxSxK, v_BxGxSxK, valid_BxT)
    elif self.decode or chunk >= t:
      out_BxTxHxK = self._attend(q_BxTxHxK, k_BxGxSxK, v_BxGxSxK, mask_Bx1xTxS, dropout)
    else:
      # Causal attention by blocks of queries: block [c0, c1) only reads keys [0, c1), so the score blocks
      # wholly above the diagonal are never computed (about half the attention work for many blocks).
      out_BxTxHxK = jnp.concatenate(
          [self._attend(q_BxTxHxK[:, c0:c0 + chunk], k_BxGxSxK[:, :, :c0 + chunk], v_BxGxSxK[:, :, :c0 + chunk],
                        mask_Bx1xTxS[:, :, c0:c0 + chunk, :c0 + chunk], dropout) for c0 in range(0, t, chunk)],
          axis=1)
    out_BxTxHxK = _constrain(out_BxTxHxK, "batch", "length", "act_heads", "act_kv")
    out_init = nn.with_logical_partitioning(_init(cfg.init_std / np.sqrt(2 * cfg.num_layers)),
                                            ("heads", "kv", "embed"))
    out_HxKxD = self.param("out", out_init, (cfg.num_heads, cfg.head_dim, cfg.d_model), param_dtype)
    out_BxTxD = matmul(out_BxTxHxK, _in_use(out_HxKxD.astype(dtype), "act_heads", "act_kv", "act_embed"), contract=2)
    if cfg.attention_bias:
      out_BxTxD = out_BxTxD + self.param("out_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                                         (cfg.d_model,), param_dtype).astype(dtype)
    return out_BxTxD

  def _attend(self, q_BxTxHxK: jax.Array, k_BxGxSxK: jax.Array, v_BxGxSxK: jax.Array,
              mask_Bx1xTxS: jax.Array, dropout: Any) -> jax.Array:
    """Softmax attention of queries [B, T, H, K] over keys/values [B, G, S, K] under mask [B, 1, T, S];
    `dropout` applies attention dropout to the probabilities."""
    cfg = self.config
    dtype = DTYPES[cfg.dtype]
    b, t = q_BxTxHxK.shape[:2]
    # jax.nn.dot_product_attention takes a [B, 1, T, S] mask with T != S, so decode steps use it as well; it
    # groups query heads over key/value heads in the same order (h = g * R + r).
    if cfg.attention == "dot_product" and (self.deterministic or cfg.dropout == 0.0):
      out_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, jnp.swapaxes(k_BxGxSxK, 1, 2),
                                                 jnp.swapaxes(v_BxGxSxK, 1, 2), mask=mask_Bx1xTxS)
    elif cfg.kv_heads == cfg.num_heads:
      # Scores and softmax in float32: bf16 logits of nearby tokens are too coarse to rank.
      scores_BxHxTxS = jnp.einsum("bthk,bhsk->bhts", q_BxTxHxK, k_BxGxSxK,
                                  preferred_element_type=jnp.float32) / np.sqrt(cfg.head_dim)
      # (Dropout of the unnormalised weights, divided by the undropped sum, is dropout of the probabilities.)
      weights_BxHxTxS, sum_BxHxTx1 = _masked_softmax_parts(scores_BxHxTxS, mask_Bx1xTxS)
      out_BxHxTxK = jnp.einsum("bhts,bhsk->bhtk", dropout(weights_BxHxTxS).astype(dtype), v_BxGxSxK,
                               preferred_element_type=jnp.float32) / sum_BxHxTx1
      out_BxTxHxK = jnp.swapaxes(out_BxHxTxK, 1, 2).astype(dtype)
    else:
      # Grouped: the R query heads of a group share its keys/values without copying them R times.
      g, r = cfg.kv_heads, cfg.num_heads // cfg.kv_heads
      q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, g, r, cfg.head_dim)
      scores_BxGxRxTxS = jnp.einsum("btgrk,bgsk->bgrts", q_BxTxGxRxK, k_BxGxSxK,
                                    preferred_element_type=jnp.float32) / np.sqrt(cfg.head_dim)
      s = scores_BxGxRxTxS.shape[-1]
      weights_BxHxTxS, sum_BxHxTx1 = _masked_softmax_parts(scores_BxGxRxTxS.reshape(b, cfg.num_heads, t, s),
                                                           mask_Bx1xTxS)
      out_BxGxRxTxK = jnp.einsum("bgrts,bgsk->bgrtk", dropout(weights_BxHxTxS).reshape(b, g, r, t, s).astype(dtype),
                                 v_BxGxSxK, preferred_element_type=jnp.float32)
      out_BxHxTxK = out_BxGxRxTxK.reshape(b, cfg.num_heads, t, cfg.head_dim) / sum_BxHxTx1
      out_BxTxHxK = jnp.swapaxes(out_BxHxTxK, 1, 2).astype(dtype)
    return out_BxTxHxK

  def _update_cache(self, k_BxGxTxK: jax.Array, v_BxGxTxK: jax.Array,
                    valid_BxT: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Writes the new keys/values [B, G, T, K] into the cache; returns all cached keys [B, G, S, K], values and
    the mask [B, 1, T, S]."""
    b, t = k_BxGxTxK.shape[0], k_BxGxTxK.shape[2]
    initializing = self.is_initializing()
    if not initializing and not self.has_variable("cache", "cached_key"):
      raise ValueError("GPT(decode=True) needs a cache: pass variables={'params': ..., 'cache': "
                       "gptrl.model.init_cache(model, batch_size, length)} and mutable=['cache'].")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, k_BxGxTxK.shape, k_BxGxTxK.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, v_BxGxTxK.shape, v_BxGxTxK.dtype)
    cached_valid = self.variable("cache", "cached_valid", jnp.zeros, (b, t), jnp.bool_)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if initializing:  # The cache takes its shapes from the init input; nothing is written yet.
      return k_BxGxTxK, v_BxGxTxK, _causal_mask(valid_BxT, t, b)

    if valid_BxT is None:
      valid_BxT = jnp.ones((b, t), jnp.bool_)
    start = index.value
    if start.ndim == 1:  # one index per row (init_cache(per_row=True)): each row writes at its own
      kv_write = jax.vmap(lambda c_GxSxK, n_GxTxK, i: jax.lax.dynamic_update_slice(c_GxSxK, n_GxTxK, (0, i, 0)))
      key_BxGxSxK = kv_write(cached_key.value, k_BxGxTxK.astype(cached_key.value.dtype), start)
      value_BxGxSxK = kv_write(cached_value.value, v_BxGxTxK.astype(cached_value.value.dtype), start)
      valid_BxS = jax.vmap(lambda c_S, n_T, i: jax.lax.dynamic_update_slice(c_S, n_T, (i,)))(
          cached_valid.value, valid_BxT.astype(jnp.bool_), start)
    else:
      key_BxGxSxK = jax.lax.dynamic_update_slice(cached_key.value, k_BxGxTxK.astype(cached_key.value.dtype),
                                                 (0, 0, start, 0))
      value_BxGxSxK = jax.lax.dynamic_update_slice(cached_value.value,
                                                   v_BxGxTxK.astype(cached_value.value.dtype), (0, 0, start, 0))
      valid_BxS = jax.lax.dynamic_update_slice(cached_valid.value, valid_BxT.astype(jnp.bool_), (0, start))
    key_BxGxSxK = _constrain(key_BxGxSxK, "batch", "act_heads", "length", "act_kv")
    value_BxGxSxK = _constrain(value_BxGxSxK, "batch", "act_heads", "length", "act_kv")
    valid_BxS = _constrain(valid_BxS, "batch", "length")
    cached_key.value, cached_value.value, cached_valid.value = key_BxGxSxK, value_BxGxSxK, valid_BxS
    index.value = start + t

    s = key_BxGxSxK.shape[2]
    query_slot_BxT = jnp.reshape(start, (-1, 1)) + jnp.arange(t, dtype=jnp.int32)[None, :]  # [1 or B, T]
    causal_BxTxS = jnp.arange(s, dtype=jnp.int32)[None, None, :] <= query_slot_BxT[:, :, None]
    mask_Bx1xTxS = causal_BxTxS[:, None] & valid_BxS[:, None, None, :]
    return key_BxGxSxK, value_BxGxSxK, mask_Bx1xTxS


_ACTIVATIONS = {
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # GPT-2's "gelu_new"
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


class Mlp(nn.Module):
  """Position-wise feed-forward block: D -> F -> activation -> D; gated (SwiGLU with silu):
  fc_out(act(fc_gate(x)) * fc_in(x))."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg = self.config
    dense = functools.partial(Dense, dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype],
                              use_bias=cfg.mlp_bias)
    in_init = nn.with_logical_partitioning(_init(cfg.init_std), ("embed", "mlp"))
    in_bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",))
    in_use = ("act_embed", "act_mlp")
    h_BxTxF = dense(cfg.mlp_dim, name="fc_in", kernel_init=in_init, bias_init=in_bias_init, in_use=in_use)(x_BxTxD)
    activation = _ACTIVATIONS[cfg.mlp_activation]
    if cfg.gated_mlp:
      gate_BxTxF = dense(cfg.mlp_dim, name="fc_gate", kernel_init=in_init, bias_init=in_bias_init,
                         in_use=in_use)(x_BxTxD)
      h_BxTxF = activation(gate_BxTxF) * h_BxTxF
    else:
      h_BxTxF = activation(h_BxTxF)
    h_BxTxF = _constrain(h_BxTxF, "batch", "length", "act_mlp")
    out_init = nn.with_logical_partitioning(_init(cfg.init_std / np.sqrt(2 * cfg.num_layers)), ("mlp", "embed"))
    return dense(cfg.d_model, name="fc_out", kernel_init=out_init, in_use=in_use[::-1],
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(h_BxTxF)


class Block(nn.Module):
  """Pre-norm transformer block: x + Attn(Norm(x)), then + Mlp(Norm(x))."""
  config: ModelConfig
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, valid_BxT: jax.Array | None) -> jax.Array:
    cfg = self.config
    drop = functools.partial(nn.Dropout(cfg.dropout), deterministic=self.deterministic)
    h = Attention(cfg, self.deterministic, self.decode, name="attn")(Norm(cfg, name="ln_attn")(x_BxTxD),
                                                                     positions_BxT, valid_BxT)
    x_BxTxD = _constrain(x_BxTxD + drop(h), "batch", "length", "act_embed")
    h = Mlp(cfg, name="mlp")(Norm(cfg, name="ln_mlp")(x_BxTxD))
    return _constrain(x_BxTxD + drop(h), "batch", "length", "act_embed")


_REMAT_POLICIES = {
    "block": jax.checkpoint_policies.nothing_saveable,
    # Matmuls without batch dims (projections, MLP); through the splash kernel also its output and log-sum-exp
    # (named by gptrl/splash.py), so the backward pass does not run the attention's forward again.
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        jax.checkpoint_policies.save_only_these_names(splash.RESIDUALS)),
}


class GPT(nn.Module):
  """The decoder-only transformer.

  Call: `logits_BxTxV = GPT(cfg).apply(variables, tokens_BxT, ...)`; with `return_hidden=True` it returns
  `(logits_BxTxV, hidden_BxTxD)` where `hidden` is the final-norm output that scalar heads (reward, value) read;
  with `compute_logits=False` it returns only `hidden_BxTxD` and skips the [D, V] output projection.

  Incremental decoding (see `Attention` and `init_cache`):
    cache = init_cache(model, batch_size, length)
    logits_BxTxV, updated = model.apply({"params": params, "cache": cache}, tokens_BxT, positions_BxT=...,
                                        attention_mask_BxT=..., decode=True, mutable=["cache"])
  then pass `updated["cache"]` to the next call.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, *, positions_BxT: jax.Array | None = None,
               attention_mask_BxT: jax.Array | None = None, deterministic: bool = True,
               return_hidden: bool = False, compute_logits: bool = True, decode: bool = False,
               logits_at_B: jax.Array | None = None, logits_slice: tuple[int, int] | None = None) -> Any:
    """Args:
      tokens_BxT: int token ids, all < vocab_size (checked on the host by the data pipeline).
      positions_BxT: position of each token (default 0..T-1); lets left-padded rows start at 0. Required with
        `decode=True` (outside init): the positions of the new tokens.
      attention_mask_BxT: 1 for real tokens, 0 for padding that no query may attend to (default all 1). With
        `decode=True` it marks which of the new tokens later queries may attend to.
      deterministic: disables dropout (needs the 'dropout' rng when False).
      return_hidden: also return the final hidden states.
      compute_logits: False skips the vocabulary projection and returns only the hidden states (for scalar
        heads). With untied embeddings the "head" parameter is then not created by `init`, so initialise with
        the default True when the logits will be needed later.
      decode: attend over (and append to) the key/value cache in the "cache" collection instead of only over
        `tokens_BxT`; needs `mutable=["cache"]` and a cache from `init_cache`. Tokens are written at the
        cache's current index, so calls go prefill, then one step per new token.
      logits_at_B: int [B]: the vocabulary projection only at position logits_at_B[b] of row b (a prefill
        needs the logits of each prompt's last token alone: the projection of every position was a quarter of
        a prefill's work for the default CPU model); the logits are then [B, 1, V] (the hidden states that
        `return_hidden` adds stay [B, T, D]).
      logits_slice: (start, size), static: the projection only at positions start .. start + size - 1 of every
        row (PPO scores and learns from the response positions alone; the prompt's projection was a third of
        the small model's forward there); logits [B, size, V].
    Returns:
      logits [B, T, V] in model.logits_dtype (float32 unless configured; their readers compute in float32);
      `(logits, hidden)` with `return_hidden`; hidden [B, T, D] (compute dtype)
      alone when `compute_logits=False`.
    """
    cfg = self.config
    if cfg.vocab_size <= 0:
      raise ValueError("ModelConfig.vocab_size must be set (> 0) before building the model.")
    dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    b, t = tokens_BxT.shape
    if positions_BxT is None:
      if decode and not self.is_initializing():
        raise ValueError("GPT(decode=True): pass positions_BxT, the positions of the new tokens (the model "
                         "does not know where in the sequence the cache ends).")
      positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    embedding_VxD = self.param("token_embedding",
                               nn.with_logical_partitioning(_init(cfg.init_std), ("vocab", "embed")),
                               (cfg.vocab_size, cfg.d_model), param_dtype)
    x_BxTxD = jnp.take(embedding_VxD, tokens_BxT, axis=0).astype(dtype)
    if cfg.pos_embedding == "learned":
      pos_TxD = self.param("position_embedding",
                           nn.with_logical_partitioning(_init(cfg.init_std), ("positions", "embed")),
                           (cfg.max_len, cfg.d_model), param_dtype)
      x_BxTxD = x_BxTxD + jnp.take(pos_TxD, positions_BxT, axis=0).astype(dtype)
    x_BxTxD = nn.Dropout(cfg.dropout)(x_BxTxD, deterministic=deterministic)
    x_BxTxD = _constrain(x_BxTxD, "batch", "length", "act_embed")

    block_cls = Block
    if cfg.remat != "none":
      block_cls = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=True)
    for i in range(cfg.num_layers):
      x_BxTxD = block_cls(cfg, deterministic, decode, name=f"block_{i}")(x_BxTxD, positions_BxT,
                                                                        attention_mask_BxT)
    hidden_BxTxD = Norm(cfg, name="ln_final")(x_BxTxD)
    if not compute_logits:
      return hidden_BxTxD

    projected_BxTxD = hidden_BxTxD
    if logits_at_B is not None and logits_slice is not None:
      raise ValueError("GPT: pass logits_at_B or logits_slice, not both.")
    if logits_at_B is not None:
      projected_BxTxD = jnp.take_along_axis(hidden_BxTxD, jnp.reshape(logits_at_B, (b, 1, 1)), axis=1)
    if logits_slice is not None:
      start, size = logits_slice
      if not (0 <= start and 0 < size and start + size <= t):
        raise ValueError(f"GPT: logits_slice={logits_slice} must lie within the {t} positions.")
      projected_BxTxD = hidden_BxTxD[:, start:start + size]
    if cfg.tie_embeddings:
      logits_BxTxV = matmul(projected_BxTxD, _in_use(embedding_VxD.astype(dtype), "act_vocab", "act_embed"),
                            transpose_kernel=True,
                            preferred_element_type=jnp.dtype(cfg.logits_dtype))
    else:
      head_DxV = self.param("head", nn.with_logical_partitioning(_init(cfg.init_std), ("embed", "vocab")),
                            (cfg.d_model, cfg.vocab_size), param_dtype)
      logits_BxTxV = matmul(projected_BxTxD, _in_use(head_DxV.astype(dtype), "act_embed", "act_vocab"),
                            preferred_element_type=jnp.dtype(cfg.logits_dtype))
    logits_BxTxV = _constrain(logits_BxTxV, "batch", "length", "act_vocab")  # in model.logits_dtype
    if return_hidden:
      return logits_BxTxV, hidden_BxTxD
    return logits_BxTxV


def init_cache(model: GPT, batch_size: int, length: int, *, per_row: bool = False) -> Any:
  """An empty decode cache for `batch_size` sequences of up to `length` tokens, without running the model.

  The pytree (one entry per attention layer: cached_key/cached_value [B, H, S, K] in the compute dtype,
  cached_valid [B, S] bool, index int32) is what `GPT.apply(..., decode=True)` expects as
  `variables["cache"]`. Shapes come from `jax.eval_shape` of `init`, so no parameters are computed. With
  `per_row`, index is [B]: each row writes at its own slot (see `Attention`).
  """
  tokens = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
  shapes = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, decode=True, compute_logits=False)["cache"], tokens)
  shape_of = lambda path, a: (batch_size,) if per_row and path[-1].key == "index" else a.shape
  return jax.tree_util.tree_map_with_path(lambda path, a: jnp.zeros(shape_of(path, a), a.dtype), shapes)


def count_params(params: Any) -> int:
  """Total number of parameters in a (possibly boxed) parameter tree."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(params))))


def flops_per_token(cfg: ModelConfig, seq_len: int, *, causal_halved: bool = False, lm_head: bool = True) -> float:
  """Training FLOPs per token (forward + backward): 6N + 12*L*H*K*T (PaLM appendix B).

  N counts the matmul parameters: every block's weights (query/output D x D each, key/value D x G*K each,
  two or, gated, three D x F MLP matrices) plus the output head (vocab x D; not with `lm_head=False`, for a
  scalar-head model that never computes logits), not the position table, norms or biases. With
  `causal_halved`, the attention term counts only the unmasked half (6*L*H*K*T).
  """
  d, f, layers = cfg.d_model, cfg.mlp_dim, cfg.num_layers
  kv_dim = cfg.kv_heads * cfg.head_dim
  n_matmul = layers * (2 * d * d + 2 * d * kv_dim + (3 if cfg.gated_mlp else 2) * d * f)
  n_matmul += cfg.vocab_size * d if lm_head else 0
  attention = (6 if causal_halved else 12) * layers * cfg.num_heads * cfg.head_dim * seq_len
  return 6.0 * n_matmul + attention
