"""The optimizer: AdamW with linear warmup + cosine decay, global-norm clipping, weight-decay masks."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from gptrl.config import OptimConfig

_EMBEDDING_NAMES = ("token_embedding", "position_embedding")
_NORM_OR_BIAS_NAMES = ("scale", "bias")


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `cfg.lr` over `warmup_steps`, then cosine decay to `min_lr_ratio * lr`.

  The decay lasts `cfg.decay_steps` steps, or until `total_steps` when that is 0; the lr then stays at the floor.
  """
  decay_steps = cfg.decay_steps or max(total_steps - cfg.warmup_steps, 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.warmup_steps + decay_steps, end_value=cfg.lr * cfg.min_lr_ratio)


def weight_decay_mask(cfg: OptimConfig, params: Any) -> Any:
  """A tree of bools like `params`: True where weight decay applies.

  Matrices (kernels, the untied head) decay; embedding tables decay only with `decay_embeddings`; norm
  scales and biases only with `decay_norms_and_biases`.
  """
  def decays(path, _):
    names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
    if any(n in _EMBEDDING_NAMES for n in names):
      return cfg.decay_embeddings
    if names and names[-1] in _NORM_OR_BIAS_NAMES:
      return cfg.decay_norms_and_biases
    return True
  return jax.tree_util.tree_map_with_path(decays, params)


def clip_by_member_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm for an ensemble (every leaf [M, ...]): each member's gradient is clipped by its own
  global norm, as it would be if it were trained alone."""
  def update_fn(updates, state, params=None):
    del params
    leaves = jax.tree.leaves(updates)
    sq_M = sum(jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1) for g in leaves)
    norm_M = jnp.sqrt(sq_M)
    trigger_M = norm_M < max_norm

    def clip(g):
      shape = (-1,) + (1,) * (g.ndim - 1)
      return jnp.where(trigger_M.reshape(shape), g, (g / norm_M.astype(g.dtype).reshape(shape)) * max_norm)
    return jax.tree.map(clip, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(cfg: OptimConfig, total_steps: int, members: int = 1) -> optax.GradientTransformation:
  """The full gradient transformation: clip by global norm (if enabled), then AdamW with the schedule. For an
  ensemble of `members` models stacked on a leading axis, each member is clipped by its own norm."""
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm) if members == 1 else clip_by_member_norm(cfg.clip_norm))
  parts.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=lambda p: weight_decay_mask(cfg, p)))
  return optax.chain(*parts)
