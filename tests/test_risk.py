"""protocol/risk.py's p-values and fixed-sequence testing, and
experiments/analysis/risk_validity.py: on a population with planted drops, the certified rule
keeps P(drop > δ) ≤ ε where the mean-only rule and the same rule on naive p-values do not."""

import numpy as np
import pytest
from scipy import stats

from experiments.analysis import risk_validity
from quee_jax.protocol import choice, metrics, risk

EPS = 0.1


def _rejections(p: np.ndarray, eps: float = EPS) -> tuple[float, float]:
  """(fraction of p-values at most eps, its binomial standard error)."""
  r = float(np.mean(p <= eps))
  return r, np.sqrt(max(r * (1 - r), eps * (1 - eps)) / len(p))


def _drop_draws(drop: float, draws: int, n: int, seed: int, noise: float = 0.02) -> np.ndarray:
  """[draws, n] i.i.d. per-sample accuracy drops in {-1, 0, 1} with mean `drop`: the point
  loses a sample the full model gets right with probability noise + drop, wins one back with
  probability noise."""
  u = np.random.default_rng(seed).random((draws, n))
  return (u < noise + drop).astype(np.float64) - (u > 1 - noise)


def test_fixed_sequence_stops_at_the_first_p_above_eps():
  p = np.array([0.01, 0.5, 0.02, 0.03, 0.0])
  # Point 3 passes on its own but comes after point 1, which does not.
  assert risk.fixed_sequence(p, [0, 2, 1, 3], 0.05).tolist() == [True, False, True, False, False]
  assert risk.fixed_sequence(p, [1, 0, 2], 0.05).tolist() == [False] * 5
  assert risk.fixed_sequence(p, [4, 0, 2, 3], 0.05).tolist() == [True, False, True, True, True]


def test_fixed_sequence_never_certifies_points_outside_the_order():
  p = np.zeros(4)
  assert risk.fixed_sequence(p, [2], EPS).tolist() == [False, False, True, False]
  assert not risk.fixed_sequence(p, [], EPS).any()


def test_safest_first_and_cheapest_certified():
  cost = np.array([0.5, 1.0, 0.2, 0.5])
  # Losing nothing on fit (drop <= 0) first, dearest first (ties in index order); then by drop.
  assert risk.safest_first(np.zeros(4), cost).tolist() == [1, 0, 3, 2]
  assert risk.safest_first(np.array([0.0, 0.02, -0.01, 0.01]), cost).tolist() == [0, 2, 3, 1]
  losses = np.zeros((4, 3000))
  losses[2, :300] = 1.0  # a drop of 10 points: never certified at δ = 1 point
  order = risk.safest_first(np.zeros(4), cost)
  assert risk.certify(losses, 0.01, EPS, order).tolist() == [True, True, False, True]
  assert risk.cheapest_certified(losses, cost, 0.01, EPS, order) == 0
  assert risk.cheapest_certified(losses[2:3], cost[2:3], 0.01, EPS, [0]) == -1


def test_drop_losses_is_the_reference_minus_the_point():
  correct = np.array([[1, 0, 1, 0], [0.5, 1, 1, 1]])
  ref = np.array([1, 1, 0, 0])
  assert risk.drop_losses(correct, ref).tolist() == [[0, 1, -1, 0], [0.5, 0, -1, -1]]


def test_binomial_pvalue_is_the_binomial_cdf():
  losses = np.zeros((1, 20))
  losses[0, [2, 7, 11]] = 1.0
  got = risk.pvalues(losses, 0.3, EPS, bounds=(0, 1), method="binomial")
  assert got[0] == pytest.approx(stats.binom.cdf(3, 20, 0.3), rel=1e-12)
  # On the default bounds (-1, 1) the losses map to (ℓ + 1) / 2 and δ to (δ + 1) / 2.
  signed = 2 * losses - 1
  got = risk.pvalues(signed, 0.2, EPS, method="binomial")
  assert got[0] == pytest.approx(stats.binom.cdf(3, 20, 0.6), rel=1e-12)


def test_betting_certifies_a_point_identical_to_the_reference():
  p = risk.pvalues(np.zeros((1, 3000)), 0.005, EPS)
  assert p[0] <= EPS


# Hoeffding-Bentkus ignores the variance: on 2,000 samples it tells no drop from one of 2 points.
@pytest.mark.parametrize("method, delta", [("betting", 0.02), ("hoeffding_bentkus", 0.1)])
def test_pvalues_are_valid_at_the_boundary_and_have_power_below_it(method, delta):
  n = 2000
  at_delta = risk.pvalues(_drop_draws(delta, 300, n, seed=1), delta, EPS, method=method)
  rate, se = _rejections(at_delta)
  assert rate <= EPS + 3 * se
  # Not valid by never rejecting: a point with no drop is certified nearly always.
  below = risk.pvalues(_drop_draws(0.0, 300, n, seed=2), delta, EPS, method=method)
  assert _rejections(below)[0] >= 0.9


def test_binomial_pvalues_are_valid_at_the_boundary():
  delta = 0.05
  losses = (np.random.default_rng(3).random((300, 1000)) < delta).astype(np.float64)
  rate, se = _rejections(risk.pvalues(losses, delta, EPS, bounds=(0, 1), method="binomial"))
  assert rate <= EPS + 3 * se


@pytest.mark.parametrize("call, name", [
    (lambda: risk.pvalues(np.zeros((2, 10)), 1.0, EPS), "delta"),
    (lambda: risk.pvalues(np.zeros((2, 10)), 0.01, 0.0), "eps"),
    (lambda: risk.pvalues(np.zeros((2, 10)), 0.01, 1.5), "eps"),
    (lambda: risk.pvalues(np.full((2, 10), 2.0), 0.01, EPS), "losses"),
    (lambda: risk.pvalues(np.zeros(10), 0.01, EPS), "losses"),
    (lambda: risk.pvalues(np.full((1, 10), 0.5), 0.1, EPS, (0, 1), "binomial"), "losses"),
    (lambda: risk.pvalues(np.zeros((2, 10)), 0.01, EPS, method="bonferroni"), "method"),
    (lambda: risk.fixed_sequence(np.zeros(3), [0, 0], EPS), "order"),
    (lambda: risk.fixed_sequence(np.zeros(3), [3], EPS), "order"),
    (lambda: risk.certify(np.zeros((2, 10)), 0.01, EPS, [-1]), "order"),
])
def test_errors_name_the_argument(call, name):
  with pytest.raises(ValueError, match=name):
    call()


# The planted population: points dearest first, drops rising to just past δ and beyond.
DELTA = 0.02
DROPS = (0.0, 0.005, 0.01, 0.015, 0.02, 0.0205, 0.022, 0.025, 0.03, 0.05)
POPULATION = 6000


def planted() -> dict:
  """validity's arguments for points whose population drops are exactly DROPS.

  Point k loses the first (1% + DROPS[k]) x POPULATION of a fixed shuffle of the samples the
  full model gets right and wins back the first 1% x POPULATION of those it gets wrong: nested
  harm sets, so a point's cal drop rises with its true one and the mean-only rule picks the
  last point its cal drop lets through. Costs fall as drops rise.
  """
  rng = np.random.default_rng(0)
  full = rng.random(POPULATION) < 0.85
  right, wrong = rng.permutation(np.flatnonzero(full)), rng.permutation(np.flatnonzero(~full))
  win = int(0.01 * POPULATION)
  correct = np.tile(full, (len(DROPS), 1))
  for k, d in enumerate(DROPS):
    correct[k, right[:win + round(d * POPULATION)]] = False
    correct[k, wrong[:win]] = True
  cost = np.linspace(1.0, 0.1, len(DROPS))
  assert np.allclose(full.mean() - correct.mean(axis=1), DROPS)
  return {"population_correct": correct, "population_cost": np.tile(cost[:, None], POPULATION),
          "full_correct": full, "fit_drop": np.array(DROPS), "fit_cost": cost, "full_cost": 1.0}


def _validity(draws: int = 500, **kw) -> dict:
  return risk_validity.validity(**planted(), cal_size=2000, deltas=[DELTA], eps=EPS, draws=draws,
                                rng=np.random.default_rng(0), **kw)["deltas"][f"{DELTA:g}"]


def test_the_certified_rule_keeps_its_promise_where_the_mean_only_rule_does_not():
  rules = _validity()["rules"]
  risk_rule, mean_only = rules["certified"], rules["mean_only"]
  assert risk_rule["violation"] <= EPS + 3 * np.sqrt(EPS * (1 - EPS) / 500)
  assert mean_only["violation"] >= 0.3
  # It pays for the promise, but it is not the full model: it certifies points that drop.
  assert mean_only["mean_cost"] < risk_rule["mean_cost"] < 0.9
  assert risk_rule["mean_drop"] > 0.005 and risk_rule["none"] == 0.0


def test_the_measure_catches_a_rule_on_invalid_pvalues(monkeypatch):
  # The same fixed sequence on "p-values" that only say whether cal's mean is within δ.
  naive = lambda losses, delta, eps, bounds=(-1, 1), method="betting": (
      (np.asarray(losses).mean(axis=1) > delta).astype(np.float64))
  monkeypatch.setattr(risk, "pvalues", naive)
  violation = _validity()["rules"]["certified"]["violation"]
  assert violation > EPS + 3 * np.sqrt(EPS * (1 - EPS) / 500)


def test_validity_reports_every_rule_and_the_oracle():
  out = _validity(draws=20)
  assert out["oracle_cost"] == pytest.approx(0.6)  # the point at exactly δ is within it
  assert set(out["rules"]) == set(choice.RULES)
  for r in out["rules"].values():
    assert set(r) == {"violation", "violation_se", "mean_cost", "mean_drop", "none"}
    assert r["violation_se"] == pytest.approx(np.sqrt(r["violation"] * (1 - r["violation"]) / 20))


def test_nothing_certified_falls_back_to_the_full_model():
  pop = planted()
  pop["population_correct"], pop["full_cost"] = pop["population_correct"][-1:], 2.0
  for k in ("population_cost", "fit_cost", "fit_drop"):
    pop[k] = pop[k][-1:]
  out = risk_validity.validity(**pop, cal_size=2000, deltas=[DELTA], eps=EPS, draws=5,
                               rng=np.random.default_rng(0))["deltas"][f"{DELTA:g}"]
  r = out["rules"]["certified"]
  assert (r["none"], r["violation"], r["mean_cost"], r["mean_drop"]) == (1.0, 0.0, 2.0, 0.0)
  assert out["oracle_cost"] == 2.0


@pytest.mark.parametrize("bad", [(), (3,), (45,)])
def test_certify_on_prefixes_is_the_fixed_sequence_of_every_pvalue(bad):
  # 50 points, the sequence failing nowhere, early, or past the first doubling of the prefix.
  losses = _drop_draws(0.0, 50, 3000, seed=6)
  losses[list(bad)] = _drop_draws(0.1, len(bad), 3000, seed=7)
  order = np.random.default_rng(5).permutation(50)
  for delta in (0.005, 0.03):
    whole = risk.fixed_sequence(risk.pvalues(losses, delta, EPS), order, EPS)
    np.testing.assert_array_equal(risk.certify(losses, delta, EPS, order), whole)


def test_z_rule_is_the_paired_gain_test_per_point():
  rng = np.random.default_rng(4)
  full = rng.random(400) < 0.8
  correct = np.where(rng.random((30, 400)) < rng.uniform(0, 0.1, (30, 1)), ~full, full)
  cost = rng.random(30)
  for max_drop in (0.0, 0.01, 0.03):
    for z in (0.0, choice.Z_RULE):
      ok = [i for i, c in enumerate(correct)
            if (lambda g, se: g - z * se >= -max_drop - 1e-12)(*metrics.paired_gain(c, full))]
      expected = ok[int(np.argmin(cost[ok]))] if ok else -1
      assert choice.cheapest_within(correct, cost, full, max_drop, z) == expected


@pytest.mark.parametrize("argv, flag", [
    (["--draws", "0"], "--draws"),
    (["--eps", "1.5"], "--eps"),
    (["--eps", "0"], "--eps"),
    (["--deltas", "0.005,1.2"], "--deltas"),
    (["--deltas", "0,0.01"], "--deltas"),
    (["--deltas", "a"], "--deltas"),
])
def test_bad_flags_are_named_before_the_workdir_loads(argv, flag, tmp_path):
  with pytest.raises(ValueError, match=flag):
    risk_validity.main(["--workdir", str(tmp_path / "none"), *argv])


@pytest.mark.parametrize("kw, name", [
    ({"cal_size": 1}, "cal_size"), ({"draws": 0}, "draws"), ({"deltas": [0.0]}, "deltas"),
    ({"fit_cost": np.zeros(3)}, "fit_cost"),
])
def test_validity_names_a_bad_argument(kw, name):
  args = {**planted(), "cal_size": 50, "deltas": [DELTA], "eps": EPS, "draws": 2,
          "rng": np.random.default_rng(0), **kw}
  with pytest.raises(ValueError, match=name):
    risk_validity.validity(**args)
