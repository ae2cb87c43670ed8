"""The gold-versus-KL frontier of reward-model over-optimisation (Gao, Schulman & Hilton 2022): pure math.

A policy optimised against a proxy reward (the reward model) is judged by the *gold* reward (the labeller the
proxy was trained to imitate) as a function of how far it moved from its start, d = sqrt(KL(policy || init)).

- Best-of-n (BoN): sample N replies per prompt once, and for each n <= N estimate the gold and proxy score of
  the reply the proxy prefers among n, without bias, over all C(N, n) subsets (`best_of_n`). Its KL to the
  sampling policy is analytic: KL(n) = log n - (n - 1) / n (`best_of_n_kl`).
- Fitted forms of the gold gain R(d) = gold(d) - gold(0): BoN R(d) = d (alpha - beta d), RL R(d) =
  d (alpha - beta log d) (`fit_bon`, `fit_rl`). With beta > 0 each has one peak, past which further
  optimisation of the proxy lowers the gold score (Goodhart); `peak` gives it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np


def best_of_n_kl(n: int | np.ndarray) -> np.ndarray:
  """KL(best-of-n || sampler) in nats = log n - (n - 1) / n (exact for a continuous proxy without ties)."""
  n = np.asarray(n, np.float64)
  if np.any(n < 1):
    raise ValueError(f"best-of-n needs n >= 1, got {n}")
  return np.log(n) - (n - 1) / n


def best_of_n_weights(num_samples: int, n: int) -> np.ndarray:
  """w[i] = P(the i-th smallest of N samples is the largest of a uniformly random n-subset) = C(i, n-1) / C(N, n)
  for i = 0..N-1 (0-based ranks); the weights sum to 1."""
  if not 1 <= n <= num_samples:
    raise ValueError(f"best-of-n needs 1 <= n <= N = {num_samples}, got n = {n}")
  ranks = np.arange(num_samples)
  log_w = np.full(num_samples, -np.inf)
  ok = ranks >= n - 1
  log_comb = lambda a, b: math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)
  log_w[ok] = [log_comb(int(i), n - 1) - log_comb(num_samples, n) for i in ranks[ok]]
  return np.exp(log_w)


def best_of_n(proxy: Sequence[float], values: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
  """The expected `values` (e.g. gold, proxy, judge scores; shape [N] or [N, M]) of the reply with the highest
  `proxy` among n drawn without replacement from the N samples of one prompt, averaged over all C(N, n) subsets.

  Ties in `proxy` go to the later sample (the order of a stable sort), so the estimate is a plain function of
  the inputs and matches brute-force enumeration.
  """
  proxy = np.asarray(proxy, np.float64)
  values = np.asarray(values, np.float64)
  if proxy.ndim != 1 or values.shape[0] != proxy.shape[0]:
    raise ValueError(f"proxy must be [N] and values [N, ...], got {proxy.shape} and {values.shape}")
  order = np.argsort(proxy, kind="stable")
  weights = best_of_n_weights(len(proxy), n)
  return np.tensordot(weights, values[order], axes=1)


@dataclasses.dataclass(frozen=True)
class Fit:
  """R(d) = d (alpha - beta f(d)) fitted by least squares; `form` is "bon" (f(d) = d) or "rl" (f(d) = log d)."""
  form: str
  alpha: float
  beta: float
  rmse: float
  points: int
  d_max: float = math.inf  # the largest d fitted: a peak far beyond the data is not one the data shows

  def __call__(self, d: np.ndarray | float) -> np.ndarray:
    d = np.asarray(d, np.float64)
    return d * (self.alpha - self.beta * _shape(self.form, d))

  def peak(self) -> tuple[float, float] | None:
    """(d*, R(d*)) at the fitted maximum, or None when there is none within ten times the fitted range of d
    (beta <= 0, or beta so small that the peak is an extrapolation): the gain still rises."""
    if self.beta <= 0:
      return None
    if self.form == "bon":
      d = self.alpha / (2 * self.beta)  # R'(d) = alpha - 2 beta d
    else:
      d = math.exp(min(self.alpha / self.beta - 1, 700.0))  # R'(d) = alpha - beta log d - beta (no overflow)
    if d > 10 * self.d_max or d <= 0:
      return None
    return d, float(self(d))

  def as_dict(self) -> dict[str, float | int | str | None]:
    peak = self.peak()
    return {"form": self.form, "alpha": self.alpha, "beta": self.beta, "rmse": self.rmse, "points": self.points,
            "peak_d": peak[0] if peak else None, "peak_kl": peak[0] ** 2 if peak else None,
            "peak_gain": peak[1] if peak else None}


def _shape(form: str, d: np.ndarray) -> np.ndarray:
  if form == "bon":
    return d
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(d > 0, np.log(np.where(d > 0, d, 1.0)), 0.0)  # d log d -> 0 as d -> 0


def fit(form: str, d: Sequence[float], gain: Sequence[float]) -> Fit:
  """Least-squares alpha, beta of R(d) = d (alpha - beta f(d)) through the points (d, gain); R(0) = 0 by form.

  `gain` is the gold (or proxy) score minus that of the starting policy; `d` = sqrt(KL) >= 0. Needs two points
  with d > 0.
  """
  if form not in ("bon", "rl"):
    raise ValueError(f"form must be 'bon' or 'rl', got {form!r}")
  d, gain = np.asarray(d, np.float64), np.asarray(gain, np.float64)
  if d.shape != gain.shape or d.ndim != 1:
    raise ValueError(f"d and gain must be 1-D of one length, got {d.shape} and {gain.shape}")
  if np.any(d < 0) or not np.all(np.isfinite(d)) or not np.all(np.isfinite(gain)):
    raise ValueError("d must be finite and >= 0, and gain finite")
  if int(np.sum(d > 0)) < 2:
    raise ValueError(f"a fit needs at least two points with d > 0, got {int(np.sum(d > 0))}")
  design = np.stack([d, -d * _shape(form, d)], axis=1)
  (alpha, beta), *_ = np.linalg.lstsq(design, gain, rcond=None)
  result = Fit(form, float(alpha), float(beta), 0.0, int(d.size), float(d.max()))
  return dataclasses.replace(result, rmse=float(np.sqrt(np.mean((result(d) - gain) ** 2))))


def fit_bon(d: Sequence[float], gain: Sequence[float]) -> Fit:
  return fit("bon", d, gain)


def fit_rl(d: Sequence[float], gain: Sequence[float]) -> Fit:
  return fit("rl", d, gain)


def peak_verdict(rl_fit: Fit, last_d: float) -> str:
  """One sentence, from the numbers, on where a run ends relative to the fitted gold peak."""
  peak = rl_fit.peak()
  if peak is None:
    return (f"The fitted gold curve has no peak (beta = {rl_fit.beta:.3g} <= 0): the gold score was still rising "
            f"at the last checkpoint (KL {last_d ** 2:.2f} nats).")
  d_star, gain = peak
  where = "before" if last_d < d_star else "past"
  return (f"The run ends {where} the fitted gold peak: last KL {last_d ** 2:.2f} nats, peak at KL "
          f"{d_star ** 2:.2f} nats (sqrt {d_star:.2f}) with a gold gain of {gain:+.3f}.")
