"""Rewards as code: Python functions named in the config that score replies next to (or instead of) the reward
model, for verifiable rewards and rule checks.

A reward function is named `package.module:function` (imported like any module: from the working directory,
PYTHONPATH or an installed package) and called once per rollout batch as

    function(prompts, replies) -> one finite number per reply

with `prompts` each reply's conversation so far as a list of {"role", "content"} dicts and `replies` the decoded
reply texts (no `<|end|>`). A policy stage's score of a reply is then

    reward_gain * (RM score - offset) + sum_i reward_fn_weights[i] * function_i(prompts, replies) + reward_bias

so `reward_gain = 0` optimises the functions alone (the RM, if given, is still logged as the proxy). Anything
wrong (a module or name that does not import, a result of the wrong length or type, NaN) stops the run with one
error that names the function.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Callable, Sequence

import numpy as np

# `package.module:function`
SPEC = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
Messages = list[dict[str, str]]
RewardFn = Callable[[list[Messages], list[str]], Sequence[float]]


class RewardFnError(ValueError):
  """A reward function could not be loaded, or returned something that is not one finite number per reply."""


def load(spec: str, key: str) -> RewardFn:
  """The callable `spec` ("package.module:function") names; RewardFnError naming `key` (its config key) and the
  cause otherwise."""
  if not SPEC.match(spec):
    raise RewardFnError(f"config.{key}: {spec!r} is not 'package.module:function'.")
  module_name, name = spec.split(":")
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # pylint: disable=broad-except  # any import-time failure of user code
    raise RewardFnError(f"config.{key}: cannot import module {module_name!r} of {spec!r}: "
                        f"{type(e).__name__}: {e}") from e
  fn = getattr(module, name, None)
  if fn is None:
    raise RewardFnError(f"config.{key}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                        f"{name!r}.")
  if not callable(fn):
    raise RewardFnError(f"config.{key}: {spec!r} is a {type(fn).__name__}, not a function.")
  return fn


@dataclasses.dataclass(frozen=True)
class CodeRewards:
  """The configured reward functions with their weights."""
  specs: tuple[str, ...]
  fns: tuple[RewardFn, ...]
  weights: tuple[float, ...]

  @classmethod
  def from_config(cls, specs: Sequence[str], weights: Sequence[float], group: str) -> "CodeRewards | None":
    """The functions of `config.<group>.reward_fns` (None when there are none)."""
    if not specs:
      return None
    fns = tuple(load(spec, f"{group}.reward_fns[{i}]") for i, spec in enumerate(specs))
    return cls(tuple(specs), fns, tuple(weights) if weights else (1.0,) * len(specs))

  @property
  def names(self) -> tuple[str, ...]:
    """Each function's metric name: its `function` part (with the index when two share one)."""
    short = [spec.split(":")[1] for spec in self.specs]
    return tuple(n if short.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(short))

  def __call__(self, prompts: list[Messages], replies: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(the weighted sum per reply, float32 [B]; each function's own scores by `names`)."""
    total = np.zeros(len(replies), np.float64)
    each = {}
    for spec, fn, weight, name in zip(self.specs, self.fns, self.weights, self.names):
      try:
        out = fn(prompts, replies)
      except Exception as e:  # pylint: disable=broad-except  # user code: say whose
        raise RewardFnError(f"reward function {spec!r} raised {type(e).__name__}: {e}") from e
      values = _checked(out, spec, len(replies))
      each[name] = values.astype(np.float32)
      total += weight * values
    return total.astype(np.float32), each


def _checked(out: Any, spec: str, n: int) -> np.ndarray:
  try:
    values = np.asarray(out, np.float64)
  except (TypeError, ValueError) as e:
    raise RewardFnError(f"reward function {spec!r} returned {type(out).__name__} {out!r:.80}, not numbers "
                        f"({e}).") from e
  if values.shape != (n,):
    raise RewardFnError(f"reward function {spec!r} returned shape {values.shape} for {n} replies; it must return "
                        "one number per reply.")
  bad = np.nonzero(~np.isfinite(values))[0]
  if bad.size:
    raise RewardFnError(f"reward function {spec!r} returned {values[bad[0]]} for reply {int(bad[0])} "
                        f"({bad.size} non-finite in all); rewards must be finite.")
  return values
