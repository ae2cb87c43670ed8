"""Causal self-attention through the TPU splash-attention kernel (Pallas), for `model.attention = "splash"`.

The einsum path materialises every causal block of the float32 scores [B, H, T, S] (and their exp, their cast,
their gradient) in HBM; the kernel keeps each [bq, bkv] tile in on-chip memory and writes only the output and
one float32 log-sum-exp per query and head (the residual its backward pass reads). Blocks wholly above the
diagonal are skipped, as the einsum path's query chunks do.

Sharding: a Pallas kernel is one device's program, so it runs under `jax.shard_map` over the mesh of the
surrounding `sharding.activate` context: rows split as the logical "batch" axis is, heads as "act_heads"
(query heads, and key/value heads where their count divides the same mesh axis; otherwise each shard takes the
key/value heads its query heads read). Without a mesh it runs on the one device.

The kernel exists for TPUs only: where the program's devices are not TPUs (a CPU host, a GPU box serving a
checkpoint trained on TPUs) the model takes the einsum path, the same function (`runs_here`). Tests set
`INTERPRET_OFF_TPU` to run the kernel in Pallas' interpreter on CPU and compare it with that path.

Padding is expressed as segment ids (1 real, 0 padding), so real queries attend to real keys only, as with the
einsum path's mask; padded positions attend to padded ones (their outputs are never read).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from gptrl import sharding

# The kernel tiles queries and keys by these many tokens: sequences must be a multiple of the smallest.
BLOCKS = (512, 256, 128)
# The checkpoint name of the kernel's output and log-sum-exp (what its backward pass reads): remat "dots" keeps
# them (gptrl/model.py).
RESIDUALS = "splash_attention"
# Off TPU, run the kernel in Pallas' interpreter (slow; for tests) instead of leaving attention to the einsum path.
INTERPRET_OFF_TPU = False


def supports(length: int) -> bool:
  """Whether a sequence of `length` tokens can go through the kernel (a multiple of its smallest tile)."""
  return length % BLOCKS[-1] == 0


def _platform() -> str:
  """The platform of the devices the program being traced runs on: the mesh context's, else the default."""
  mesh = jax.sharding.get_abstract_mesh()
  return getattr(mesh.abstract_device, "platform", None) or jax.default_backend()


def runs_here() -> bool:
  """Whether the program being traced can run the kernel: on TPUs, or interpreted (`INTERPRET_OFF_TPU`)."""
  return _platform() == "tpu" or INTERPRET_OFF_TPU


def _block(length: int) -> int:
  return next(b for b in BLOCKS if length % b == 0)


def _lib():
  """Pallas' splash-attention modules (imported on first use: `import gptrl.model` stays light)."""
  # pylint: disable-next=import-outside-toplevel
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel, splash_attention_mask
  return splash_attention_kernel, splash_attention_mask


def _kernel(heads: int, length: int, interpret: bool):
  """The causal splash kernel for `heads` query heads over `length` tokens, made inside the trace that calls it
  (its tile tables become constants of that program; the numpy work behind them is cached by Pallas)."""
  kernel_lib, mask_lib = _lib()
  b = _block(length)
  blocks = kernel_lib.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                                 block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((length, length))] * heads)
  return kernel_lib.make_splash_mha(mask=mask, head_shards=1, q_seq_shards=1, block_sizes=blocks,
                                    residual_checkpoint_name=RESIDUALS, interpret=interpret)


def _mesh_axes(mesh, name: str, size: int):
  """The mesh axes the logical axis `name` maps to (by gptrl.sharding.RULES), or None where `size` is not
  divisible by them (that dimension is then replicated, as sharding.logical_to_named_sharding does)."""
  axes = nn.logical_to_mesh_axes((name,), sharding.RULES)[0]
  if axes is None:
    return None
  names = (axes,) if isinstance(axes, str) else tuple(axes)
  ways = math.prod(mesh.shape[a] for a in names)
  return axes if ways > 1 and size % ways == 0 else None


def causal_attention(q_BxTxHxK: jax.Array, k_BxGxTxK: jax.Array, v_BxGxTxK: jax.Array,
                     valid_BxT: jax.Array | None) -> jax.Array:
  """softmax(q k^T + causal mask) v over T tokens, query head h reading key/value head h // (H / G): [B, T, H, K]
  queries, already scaled by 1 / sqrt(K) (gptrl/model.py rounds them once, with the rotation), [B, G, T, K] keys
  and values (compute dtype) -> [B, T, H, K] in the compute dtype. `valid_BxT`: nonzero for real tokens (None:
  all). T must be a multiple of 128 (`supports`)."""
  b, t, h, _ = q_BxTxHxK.shape
  g = k_BxGxTxK.shape[1]
  if not supports(t):
    raise ValueError(f"splash attention needs a sequence length that is a multiple of {BLOCKS[-1]}, got {t}")
  mesh = jax.sharding.get_abstract_mesh()
  interpret = _platform() != "tpu"
  q_BxHxTxK = jnp.swapaxes(q_BxTxHxK, 1, 2)
  # Without padding, no segments: the kernel skips their compare per tile.
  segments_BxT = None if valid_BxT is None else (valid_BxT != 0).astype(jnp.int32)

  def attend(q, keys, values, segments, first_kv_head=None):
    """One shard: q [b, h', T, K] over keys/values [b, G or g', T, K]; `first_kv_head` (traced): the first of
    this shard's query heads' key/value heads, where every shard holds all G of them."""
    kernel_lib, _ = _lib()
    heads = q.shape[1]
    if first_kv_head is not None:  # take the key/value heads this shard's query heads read
      needed = max(1, heads * g // h)
      keys = jax.lax.dynamic_slice_in_dim(keys, first_kv_head, needed, axis=1)
      values = jax.lax.dynamic_slice_in_dim(values, first_kv_head, needed, axis=1)
    kernel = _kernel(heads, t, interpret)
    if segments is None:
      return jax.vmap(kernel)(q, keys, values).astype(q.dtype)
    one_row = lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=kernel_lib.SegmentIds(q=s1, kv=s1))
    return jax.vmap(one_row)(q, keys, values, segments).astype(q.dtype)

  if mesh.empty:
    out_BxHxTxK = attend(q_BxHxTxK, k_BxGxTxK, v_BxGxTxK, segments_BxT)
  else:
    rows = _mesh_axes(mesh, "batch", b)
    heads = _mesh_axes(mesh, "act_heads", h)
    kv_heads = heads if heads is not None and _mesh_axes(mesh, "act_heads", g) == heads else None
    if heads is not None and kv_heads is None:
      # The key/value heads cannot be split as the query heads are: every shard holds all of them and slices
      # out the ones its query heads read (query heads [i h', (i + 1) h') read key/value heads from i h' / R).
      per_shard = h // math.prod(mesh.shape[a] for a in ((heads,) if isinstance(heads, str) else heads))
      r = h // g
      if per_shard % r and r % per_shard:
        raise ValueError(f"splash attention: {h} query heads over {g} key/value heads cannot be split "
                         f"{h // per_shard} ways (each shard's {per_shard} query heads must read whole key/value "
                         "heads): change mesh.tensor or use model.attention='xla'")

      def attend_sliced(q, keys, values, segments):
        shard = jax.lax.axis_index(heads)
        return attend(q, keys, values, segments, first_kv_head=shard * per_shard // r)
      body = attend_sliced
    else:
      body = attend
    qo = PartitionSpec(rows, heads, None, None)
    kv = PartitionSpec(rows, kv_heads, None, None)
    segment_spec = None if segments_BxT is None else PartitionSpec(rows, None)
    out_BxHxTxK = jax.shard_map(body, in_specs=(qo, kv, kv, segment_spec), out_specs=qo,
                                check_vma=False)(q_BxHxTxK, k_BxGxTxK, v_BxGxTxK, segments_BxT)
  return jnp.swapaxes(out_BxHxTxK, 1, 2)
