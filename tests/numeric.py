"""One comparison for float results computed in two different summation orders.

Why the tolerance is scaled to each tensor's magnitude, not to each element:
a float32 sum of many terms (a matmul, a psum over shards, a gradient accumulated over micro-batches, attention by
blocks) rounds differently when the order of its terms changes, and the order changes with the mesh, with the
CPU's vector width (AVX2 vs AVX-512 code generation) and with the number of threads. The rounding error of one
element is about eps * sum |terms|, and that sum is of the order of the *tensor's* largest elements, not of the
element itself: an element that is small because its terms cancel carries the same absolute error as a large
one. An elementwise `rtol` therefore fails on whichever small element another CPU happens to round differently,
while passing on the machine where the test was written. The bound used here, |actual - expected| <=
tol * max |expected| per tensor (plus `atol`), holds for any order, yet still catches real bugs, which are
O(1) of the scale: a missing psum multiplies or divides by the shard count, a wrong spec computes on one shard's
data, a wrong mask moves whole rows. (tests/test_sharding.py shows both bugs caught by this comparison.)

Comparisons of the same program (kill/resume, initial parameters, a cached vs uncached pass of one compiled
function) stay exact: use `np.testing.assert_array_equal` there, not this.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

# Default `tol`: about 80 float32 epsilons of the tensor's scale. Sharded-vs-single gradients of the test models
# differ by up to ~3e-7 of their scale across the CPUs and XLA settings tried (AVX2, AVX-512, SSE4.2, one
# thread); a bug is off by O(1).
TOL = 1e-5


def scaled_error(actual: Any, expected: Any) -> float:
  """max |actual - expected| / max |expected| for one array (0 when both are exactly equal)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  diff = np.abs(actual - expected)
  diff = np.where(np.isnan(actual) & np.isnan(expected), 0.0, diff)
  worst = float(np.max(diff)) if diff.size else 0.0
  if worst == 0.0:
    return 0.0
  scale = float(np.max(np.abs(np.nan_to_num(expected)))) if expected.size else 0.0
  return worst / scale if scale > 0 else float("inf")


def tree_scaled_errors(actual: Any, expected: Any) -> dict[str, float]:
  """{leaf path: scaled_error} over two trees of the same structure."""
  a_leaves, a_def = jax.tree_util.tree_flatten_with_path(actual)
  e_leaves, e_def = jax.tree_util.tree_flatten_with_path(expected)
  assert a_def == e_def, f"tree structures differ:\n{a_def}\n{e_def}"
  return {jax.tree_util.keystr(path): scaled_error(a, e) for (path, a), (_, e) in zip(a_leaves, e_leaves)}


def assert_close(actual: Any, expected: Any, *, tol: float = TOL, atol: float = 0.0, err_msg: str = "") -> None:
  """Asserts |actual - expected| <= tol * max|expected| + atol elementwise, per leaf of two trees (or arrays).

  Shapes must match; NaN must sit at the same places in both. `atol` is for values whose scale is itself the
  result of cancellation (a loss near 0, a KL near 0), where max|expected| says nothing about the rounding.
  The message names the leaf, the worst element, its scaled error and the bound.
  """
  a_leaves, a_def = jax.tree_util.tree_flatten_with_path(actual)
  e_leaves, e_def = jax.tree_util.tree_flatten_with_path(expected)
  assert a_def == e_def, f"{err_msg}: tree structures differ:\n{a_def}\n{e_def}"
  failures = []
  for (path, a), (_, e) in zip(a_leaves, e_leaves):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    name = f"{err_msg}{jax.tree_util.keystr(path)}" or "value"
    if a.shape != e.shape:
      failures.append(f"{name}: shape {a.shape} != expected {e.shape}")
      continue
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    if not np.array_equal(nan_a, nan_e):
      failures.append(f"{name}: NaN at different places ({int(nan_a.sum())} vs {int(nan_e.sum())} expected)")
      continue
    a, e = np.where(nan_a, 0.0, a), np.where(nan_e, 0.0, e)
    scale = float(np.max(np.abs(e))) if e.size else 0.0
    bound = tol * scale + atol
    diff = np.abs(a - e)
    if diff.size and float(diff.max()) > bound:
      i = np.unravel_index(int(np.argmax(diff)), diff.shape)
      bad = int((diff > bound).sum())
      failures.append(
          f"{name}: {bad}/{diff.size} elements off by more than {bound:.3g} (= {tol:g} x max|expected| "
          f"{scale:.4g} + atol {atol:g}); worst at {tuple(int(x) for x in i)}: {a[i]!r} vs expected {e[i]!r}, "
          f"off by {diff[i]:.3g} = {diff[i] / scale if scale else float('inf'):.3g} of the scale")
  assert not failures, "\n".join(failures)





def clip_by_global_norm(grads: Any, max_norm: float) -> Any:
  """grads scaled to global norm `max_norm` if above it (as optax.clip_by_global_norm), in float64."""
  grads = jax.tree.map(lambda g: np.asarray(g, np.float64), grads)
  norm = np.sqrt(sum(float(np.sum(g * g)) for g in jax.tree.leaves(grads)))
  return jax.tree.map(lambda g: g * min(1.0, max_norm / norm), grads) if max_norm > 0 else grads


def assert_first_adam_step_close(new_params: Any, ref_new_params: Any, ref_grads: Any, *, lr: float, eps: float,
                                 tol: float = TOL) -> None:
  """Parameters after one (Adam)W step from the same start, with the gradients' tolerance carried through Adam.

  Adam's first update is u(g) = -lr * g / (|g| + eps) (bias-corrected m = g, v = g^2; weight decay is the same
  in both runs). The two runs' gradients agree to tol * max|g| per tensor (`assert_close`), so each update may
  differ by as much as u moves over [g - delta, g + delta] with delta = tol * max|g|: nothing where |g| >> delta,
  up to 2 lr where the sign of g is within rounding of 0 (u is a step function of g there, lr * sign(g)), and
  in between a steep ramp for |g| near eps. Such elements must be few (at most 0.1% near a sign flip). On top,
  `tol` of each parameter tensor's scale for the rounding of p + u.
  `ref_grads`: the reference's gradients as Adam saw them (averaged and clipped: `clip_by_global_norm`).
  """
  def u(g):
    return g / (np.abs(g) + eps)

  failures, flips, total = [], 0, 0
  new_leaves, tree_def = jax.tree_util.tree_flatten_with_path(new_params)
  for (path, new), ref, grad in zip(new_leaves, jax.tree.leaves(ref_new_params), jax.tree.leaves(ref_grads)):
    new, ref, grad = (np.asarray(x, np.float64) for x in (new, ref, grad))
    delta = tol * np.max(np.abs(grad))
    update_bound = lr * np.maximum(np.abs(u(grad + delta) - u(grad)), np.abs(u(grad - delta) - u(grad)))
    flips += int(np.sum(update_bound > lr))
    total += grad.size
    bound = update_bound + tol * np.max(np.abs(ref))
    off = np.abs(new - ref)
    if np.any(off > bound):
      i = np.unravel_index(int(np.argmax(off - bound)), off.shape)
      failures.append(f"params{jax.tree_util.keystr(path)}: {int(np.sum(off > bound))}/{off.size} elements out of "
                      f"bounds; worst at {tuple(int(x) for x in i)}: {new[i]!r} vs expected {ref[i]!r} "
                      f"(gradient {grad[i]:.3g}), off by {off[i]:.3g}, bound {bound[i]:.3g}")
  del tree_def
  assert not failures, "\n".join(failures)
  assert flips <= 1e-3 * total, f"{flips} of {total} gradients are within rounding of 0"
