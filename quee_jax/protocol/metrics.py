"""Accuracy-cost curves, their log-budget summaries, AUROC and calibration.

Cost savings are multiplicative, so curves are read on a log-cost axis: `auc`
is the mean over budgets c = 2^(-k/4), k = 0..24 (1 down to 1/64), of acc(c),
and `auc_16` the same over k = 0..16 (budgets 1 to 1/16). acc(c) is the TEST
accuracy of the operating point chosen on CAL for budget c (`best_mix`: the
point, or mix of two, most accurate on cal whose expected cal cost is at most
c), or 1/num_classes where no point is within c on cal (`summarize`). The test
split chooses nothing: its best point within c (`envelope`) flatters a method
the more points it has, and is kept only as a labelled diagnostic
(`*_test_envelope`) and for the oracles, which choose on test by definition.
`min_cost` says how cheap a method goes, which the auc rewards.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from quee_jax.gating import policy

BUDGETS = tuple(2.0 ** (-k / 4) for k in range(25))
BUDGETS_16 = BUDGETS[:17]
REPORT_BUDGETS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)


def budget_key(budget: float) -> str:
  """A budget as results.json names it: 1/16 -> '0.0625'."""
  return f"{budget:g}"


def check_budgets(budgets: Sequence[float], arg: str = "budgets") -> tuple[float, ...]:
  """Budgets as a tuple; raises ValueError unless each is a fraction in (0, 1]."""
  budgets = tuple(budgets)
  if not budgets:
    raise ValueError(f"{arg}: expected at least one budget in (0, 1]")
  for b in budgets:
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1:
      raise ValueError(f"{arg}: expected budgets in (0, 1] (fractions of the full model's"
                       f" cost), got {b!r}")
  return budgets


class Mix(NamedTuple):
  """Operating point `cheap` for each sample, or `rich` with probability p_rich (a per-sample
  coin), so that the expected cal cost spends a budget."""

  cheap: int
  rich: int  # cheap itself where p_rich is 0
  p_rich: float

  def of(self, values: np.ndarray) -> float:
    """The mix's expectation of a per-point value (a cost or an accuracy)."""
    values = np.asarray(values, np.float64)
    return float((1 - self.p_rich) * values[self.cheap] + self.p_rich * values[self.rich])


def best_mix(cal_cost: np.ndarray, cal_accuracy: np.ndarray, budget: float,
             mix: bool = True) -> Mix | None:
  """The point, or pair mixed to spend `budget` in expectation, most accurate on cal.

  Pairs are a point within the budget on cal and a dearer one (mix=False: single points
  only); None if no point is within the budget. Ties go to the first point (the order given).
  """
  cost, acc = np.asarray(cal_cost, np.float64), np.asarray(cal_accuracy, np.float64)
  cheap = np.flatnonzero(cost <= budget + 1e-12)
  if not len(cheap):
    return None
  dearer = np.flatnonzero(cost > budget + 1e-12) if mix else np.zeros(0, int)
  rich = np.concatenate([dearer, cheap[:1]])  # + "no mix"
  w = policy.mix_weight(cost[cheap][:, None], cost[rich][None], budget)  # [cheap, rich]
  w[:, -1] = 0.0
  score = (1 - w) * acc[cheap][:, None] + w * acc[rich][None]
  i, j = np.unravel_index(np.argmax(score), score.shape)
  p = float(w[i, j])
  return Mix(int(cheap[i]), int(rich[j]) if p else int(cheap[i]), p)


def accuracy_at(points: Sequence[dict], budget: float, num_classes: int) -> float:
  """Best TEST accuracy among points with test cost <= budget (1/num_classes if none)."""
  eligible = [p["accuracy"] for p in points if p["cost"] <= budget + 1e-12]
  return max(eligible) if eligible else 1.0 / num_classes


def envelope(points: Sequence[dict], num_classes: int,
             budgets: Sequence[float] = REPORT_BUDGETS) -> dict:
  """auc, auc_16, min_cost and acc_at_budget of the test envelope: chosen on test (oracles,
  diagnostics)."""
  _check_points(points, ("cost", "accuracy"))
  return {
      "auc": float(np.mean([accuracy_at(points, c, num_classes) for c in BUDGETS])),
      "auc_16": float(np.mean([accuracy_at(points, c, num_classes) for c in BUDGETS_16])),
      "min_cost": float(min(p["cost"] for p in points)),
      "acc_at_budget": {budget_key(c): accuracy_at(points, c, num_classes) for c in budgets},
  }


def summarize(points: Sequence[dict], num_classes: int,
              budgets: Sequence[float] = REPORT_BUDGETS, mix: bool = True) -> dict:
  """A method's curve chosen on cal, read on test (module docstring).

  mix=False: single points only, no mixes (what the test envelope is made of).
  points: each with its cal numbers (cal_cost, cal_accuracy) and its test ones (cost,
    accuracy). Returns auc, auc_16, min_cost (the cheapest test cost), acc_at_budget and
    cost_at_budget (the test accuracy and cost of the point chosen at each budget; cost None
    where no point is within it on cal), curve (the chosen points at every budget of the auc
    that cal reaches: [budget, test cost, test accuracy]), and the test envelope's auc,
    auc_16 and acc_at_budget, each suffixed `_test_envelope`.
  """
  _check_points(points, ("cost", "accuracy", "cal_cost", "cal_accuracy"))
  get = lambda k: np.array([p[k] for p in points], np.float64)
  cal_cost, cal_acc, cost, acc = get("cal_cost"), get("cal_accuracy"), get("cost"), get("accuracy")

  def at(budget: float) -> tuple[float, float | None]:
    picked = best_mix(cal_cost, cal_acc, budget, mix)
    return (1.0 / num_classes, None) if picked is None else (picked.of(acc), picked.of(cost))

  env = envelope(points, num_classes, budgets)
  picks = {c: at(c) for c in (*BUDGETS, *budgets)}  # the report budgets are among BUDGETS
  chosen = {budget_key(c): picks[c] for c in budgets}
  curve = [(c, *picks[c]) for c in BUDGETS]
  accs = [a for _, a, _ in curve]
  return {
      "auc": float(np.mean(accs)),
      "auc_16": float(np.mean(accs[:len(BUDGETS_16)])),
      "min_cost": env["min_cost"],
      "acc_at_budget": {k: a for k, (a, _) in chosen.items()},
      "cost_at_budget": {k: c for k, (_, c) in chosen.items()},
      "curve": [[b, c, a] for b, a, c in curve if c is not None],
      **{f"{k}_test_envelope": env[k] for k in ("auc", "auc_16", "acc_at_budget")},
  }


def with_cal(test_points: Sequence[dict], cal_points: Sequence[dict]) -> list[dict]:
  """The same operating points (in the same order) measured on test and on cal, as `summarize`
  reads them: each test point with cal_cost and cal_accuracy."""
  if len(test_points) != len(cal_points):
    raise ValueError(f"cal_points: expected the {len(test_points)} test points' twins, got"
                     f" {len(cal_points)}")
  return [{**p, "cal_cost": c["cost"], "cal_accuracy": c["accuracy"]}
          for p, c in zip(test_points, cal_points)]


def _check_points(points: Sequence[dict], keys: tuple[str, ...]) -> None:
  if not points:
    raise ValueError("points: expected at least one operating point, got none")
  missing = [k for k in keys if k not in points[0]]
  if missing:
    raise ValueError(f"points: expected each point to have {list(keys)}; missing {missing}")


def pareto(points: Sequence[dict]) -> list[dict]:
  """The points no other point beats on both cost and accuracy, by cost."""
  out, best = [], -np.inf
  for p in sorted(points, key=lambda p: (p["cost"], -p["accuracy"])):
    if p["accuracy"] > best:
      out.append(p)
      best = p["accuracy"]
  return out


def paired_gain(a: np.ndarray, b: np.ndarray):
  """Mean over samples of a - b and its standard error (a, b: per-sample scores of two
  methods on the same samples, e.g. correctness): two floats for a [N]; two [K] arrays for a
  [K, N], K methods each against the same b [N]."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim not in (1, 2) or b.ndim != 1 or a.shape[-1] != len(b) or len(b) < 2:
    raise ValueError(f"a, b: expected arrays of the same length >= 2 (a may be [K, N]),"
                     f" got shapes {a.shape} and {b.shape}")
  d = a - b
  gain, se = d.mean(axis=-1), d.std(axis=-1, ddof=1) / np.sqrt(len(b))
  return (float(gain), float(se)) if a.ndim == 1 else (gain, se)


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
  """Area under the ROC curve of `scores` ranking `positives` first (ties count half).

  NaN when either class is empty.
  """
  scores, positives = np.asarray(scores, np.float64), np.asarray(positives, bool)
  n_pos, n_neg = positives.sum(), (~positives).sum()
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  ranks = np.empty(len(scores))
  sorted_scores = scores[order]
  # Average ranks over ties (1-based).
  _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
  avg = first + (counts + 1) / 2.0
  ranks[order] = np.repeat(avg, counts)
  return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_calibration_error(probs: np.ndarray, outcomes: np.ndarray, bins: int = 15) -> float:
  """ECE of predicted probabilities of an event against its 0/1 outcomes (equal-width bins)."""
  probs, outcomes = np.ravel(probs).astype(np.float64), np.ravel(outcomes).astype(np.float64)
  idx = np.minimum((probs * bins).astype(int), bins - 1)
  total = 0.0
  for b in range(bins):
    sel = idx == b
    if sel.any():
      total += sel.sum() * abs(probs[sel].mean() - outcomes[sel].mean())
  return float(total / max(len(probs), 1))
