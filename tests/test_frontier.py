"""Tests for gptrl/frontier.py: the best-of-n estimator, its KL, and the Gao et al. curve fits."""
import itertools
import math

import numpy as np
import pytest

from gptrl import frontier


def _brute_force(proxy, values, n):
  """Mean of `values` at the proxy's pick over every n-subset; ties to the later sample, as documented."""
  picks = [max(subset, key=lambda i: (proxy[i], i)) for subset in itertools.combinations(range(len(proxy)), n)]
  return np.mean([values[i] for i in picks], axis=0)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_best_of_n_equals_enumeration_of_every_subset(n):
  rng = np.random.default_rng(n)
  proxy = rng.normal(size=7)
  values = rng.normal(size=(7, 3))  # e.g. gold, proxy, a watch judge
  np.testing.assert_allclose(frontier.best_of_n(proxy, values, n), _brute_force(proxy, values, n), rtol=1e-12)


def test_best_of_n_with_tied_proxy_scores_matches_enumeration():
  proxy = np.array([0.5, 0.1, 0.5, 0.5, -1.0, 0.1])
  values = np.arange(6, dtype=np.float64) ** 2
  for n in range(1, 7):
    np.testing.assert_allclose(frontier.best_of_n(proxy, values, n), _brute_force(proxy, values, n), rtol=1e-12)


def test_best_of_one_is_the_mean_and_best_of_all_is_the_argmax():
  proxy, gold = np.array([3.0, 1.0, 2.0]), np.array([10.0, 20.0, 30.0])
  assert frontier.best_of_n(proxy, gold, 1) == pytest.approx(20.0)
  assert frontier.best_of_n(proxy, gold, 3) == pytest.approx(10.0)


def test_best_of_n_weights_sum_to_one_for_large_n():
  for n in (1, 2, 16, 64):
    w = frontier.best_of_n_weights(64, n)
    assert w.sum() == pytest.approx(1.0, abs=1e-12) and np.all(w >= 0)


def test_best_of_n_kl_formula():
  assert frontier.best_of_n_kl(1) == 0.0
  assert frontier.best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
  np.testing.assert_allclose(frontier.best_of_n_kl(np.array([2, 64])), [math.log(2) - 0.5, math.log(64) - 63 / 64])


def test_best_of_n_kl_matches_a_monte_carlo_of_the_best_of_n_density():
  # The best of n draws of a uniform proxy has density n u^(n-1); its KL to the uniform is log n - (n-1)/n.
  u = np.random.default_rng(0).random((200_000, 8)).max(axis=1)
  assert np.mean(np.log(8 * u ** 7)) == pytest.approx(float(frontier.best_of_n_kl(8)), abs=0.01)


@pytest.mark.parametrize("bad", [(0, 3), (4, 3)])
def test_best_of_n_rejects_n_outside_one_to_N(bad):
  n, num = bad
  with pytest.raises(ValueError, match="1 <= n <= N"):
    frontier.best_of_n(np.zeros(num), np.zeros(num), n)


@pytest.mark.parametrize("form,alpha,beta", [("bon", 0.8, 0.3), ("rl", 0.5, 0.2), ("rl", 0.4, -0.05)])
def test_fits_recover_alpha_and_beta_from_synthetic_curves(form, alpha, beta):
  d = np.linspace(0.05, 3.0, 25)
  shape = d if form == "bon" else np.log(d)
  gain = d * (alpha - beta * shape) + np.random.default_rng(1).normal(scale=1e-4, size=d.size)
  fit = frontier.fit(form, d, gain)
  assert fit.alpha == pytest.approx(alpha, abs=2e-3) and fit.beta == pytest.approx(beta, abs=2e-3)
  assert fit.rmse < 1e-3


def test_peaks_are_where_the_derivative_vanishes():
  bon = frontier.Fit("bon", 0.8, 0.3, 0.0, 0)
  rl = frontier.Fit("rl", 0.5, 0.2, 0.0, 0)
  for fit in (bon, rl):
    d_star, gain = fit.peak()
    h = 1e-5
    assert (fit(d_star + h) - fit(d_star - h)) / (2 * h) == pytest.approx(0.0, abs=1e-6)
    assert gain == pytest.approx(float(fit(d_star))) and gain > float(fit(d_star * 1.5))
  assert frontier.Fit("rl", 0.5, -0.1, 0.0, 0).peak() is None


def test_peak_verdict_says_before_or_past():
  rl = frontier.Fit("rl", 0.5, 0.2, 0.0, 0)
  d_star = rl.peak()[0]
  assert "ends before the fitted gold peak" in frontier.peak_verdict(rl, d_star / 2)
  assert "ends past the fitted gold peak" in frontier.peak_verdict(rl, d_star * 2)
  assert "no peak" in frontier.peak_verdict(frontier.Fit("rl", 0.5, -0.1, 0.0, 0), 1.0)


def test_fit_needs_two_points_away_from_zero():
  with pytest.raises(ValueError, match="at least two points"):
    frontier.fit_rl([0.0, 1.0], [0.0, 0.3])


def test_bon_stage_table_rows_are_per_prompt_best_of_n_averages():
  from gptrl.stages import bon  # pylint: disable=import-outside-toplevel
  assert bon.n_values(64) == [1, 2, 4, 8, 16, 32, 64] and bon.n_values(6) == [1, 2, 4, 6] and bon.n_values(1) == [1]
  proxy = np.array([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
  gold = np.array([[1.0, 0.0, 0.0, 5.0], [2.0, 0.0, 0.0, 0.0]])
  rows = bon.frontier_table(proxy, {"proxy": proxy, "gold": gold})
  assert [r["n"] for r in rows] == [1, 2, 4]
  assert rows[0]["kl"] == 0.0 and rows[2]["kl"] == pytest.approx(math.log(4) - 0.75)
  assert rows[0]["gold"] == pytest.approx((1.5 + 0.5) / 2) and rows[2]["gold"] == pytest.approx((5 + 2) / 2)
  for row in rows:  # each row is the mean over prompts of the enumeration over subsets
    expected = np.mean([_brute_force(proxy[p], gold[p], row["n"]) for p in range(2)])
    assert row["gold"] == pytest.approx(expected)
