import numpy as np
import pytest

from quee_jax.protocol import metrics


def test_accuracy_at_and_envelope_by_hand():
  points = [{"cost": 1.0, "accuracy": 0.9}, {"cost": 0.25, "accuracy": 0.8},
            {"cost": 0.2, "accuracy": 0.7}]
  assert metrics.accuracy_at(points, 0.5, 10) == 0.8
  assert metrics.accuracy_at(points, 0.1, 10) == 0.1  # none: 1 / num_classes
  s = metrics.envelope(points, 10)
  # Budgets 2^(-k/4): k=0..7 (1 .. 0.297) -> 0.9 for k=0, 0.8 for k=1..8 (0.25 included),
  # 0.7 for k=9 (0.2102 > 0.2? no: 2^(-9/4)=0.21 >= 0.2 -> 0.7), 0.1 for k >= 10.
  acc = [0.9] + [0.8] * 8 + [0.7] + [0.1] * 15
  assert s["auc"] == pytest.approx(np.mean(acc))
  assert s["auc_16"] == pytest.approx(np.mean(acc[:17]))
  assert s["min_cost"] == 0.2
  assert s["acc_at_budget"] == {"0.0625": 0.1, "0.125": 0.1, "0.25": 0.8, "0.5": 0.8}
  with pytest.raises(ValueError, match="points"):
    metrics.envelope([], 10)


def test_the_curve_is_chosen_on_cal_and_read_on_test():
  # On cal, B (0.5) beats A (0.4) at budget 1/2; on test A is better. The curve reads B's test
  # accuracy there; only the test envelope would take A's.
  a = {"cost": 0.4, "accuracy": 0.85, "cal_cost": 0.4, "cal_accuracy": 0.80}
  b = {"cost": 0.5, "accuracy": 0.80, "cal_cost": 0.5, "cal_accuracy": 0.84}
  full = {"cost": 1.0, "accuracy": 0.9, "cal_cost": 1.0, "cal_accuracy": 0.9}
  s = metrics.summarize([full, a, b], 10)
  assert s["acc_at_budget"]["0.5"] == 0.80 and s["cost_at_budget"]["0.5"] == 0.5
  assert s["acc_at_budget_test_envelope"]["0.5"] == 0.85
  # Below every point on cal: chance, and no cost.
  assert s["acc_at_budget"]["0.25"] == 0.1 and s["cost_at_budget"]["0.25"] is None
  # Between B and the full model, a mix spends the budget on cal: at 0.75, half B, half full.
  mix = metrics.best_mix([1.0, 0.4, 0.5], [0.9, 0.8, 0.84], 0.75)
  assert mix == (2, 0, 0.5) and mix.of([1.0, 0.4, 0.5]) == pytest.approx(0.75)
  assert [0.75 ** 0, 1.0, 0.9] == s["curve"][0]
  assert s["auc"] <= s["auc_test_envelope"] + 1e-12
  with pytest.raises(ValueError, match=r"points: .*missing \['cal_cost', 'cal_accuracy'\]"):
    metrics.summarize([{"cost": 1.0, "accuracy": 0.9}], 10)
  with pytest.raises(ValueError, match="cal_points"):
    metrics.with_cal([full], [])
  assert metrics.best_mix([0.5], [0.9], 0.25) is None


def test_pareto():
  pts = [{"cost": 0.5, "accuracy": 0.8}, {"cost": 0.4, "accuracy": 0.85},
         {"cost": 1.0, "accuracy": 0.84}, {"cost": 1.0, "accuracy": 0.9}]
  assert metrics.pareto(pts) == [{"cost": 0.4, "accuracy": 0.85}, {"cost": 1.0, "accuracy": 0.9}]


def test_auroc_matches_pairwise_definition():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 5, 200).astype(float)  # many ties
  pos = rng.random(200) < 0.3
  pairs = [(a > b) + 0.5 * (a == b) for a in scores[pos] for b in scores[~pos]]
  assert metrics.auroc(scores, pos) == pytest.approx(np.mean(pairs))
  assert np.isnan(metrics.auroc(scores, np.zeros(200, bool)))


def test_ece():
  assert metrics.expected_calibration_error(np.full(1000, 0.3), np.arange(1000) < 300) == pytest.approx(0.0)
  assert metrics.expected_calibration_error(np.full(100, 0.9), np.zeros(100)) == pytest.approx(0.9)


def test_paired_gain():
  a = np.array([1, 1, 0, 1, 0, 1.0])
  b = np.array([1, 0, 0, 0, 1, 1.0])
  gain, se = metrics.paired_gain(a, b)
  d = a - b
  assert gain == pytest.approx(1 / 6)
  assert se == pytest.approx(np.sqrt(((d - d.mean()) ** 2).sum() / 5 / 6))
  assert metrics.paired_gain(a, a) == (0.0, 0.0)
  with pytest.raises(ValueError, match="same length"):
    metrics.paired_gain(a, b[:3])
