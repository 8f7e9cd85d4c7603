"""Accuracy-cost curves, their log-budget summaries, AUROC and calibration.

Cost savings are multiplicative, so curves are read on a log-cost axis: `auc`
is the mean over budgets c = 2^(-k/4), k = 0..24 (1 down to 1/64), of acc(c),
the best accuracy among a method's points whose mean cost is at most c
(1/num_classes where it has none); `auc_16` is the same over k = 0..16
(budgets 1 to 1/16). `min_cost` says how cheap a method goes, which the auc
rewards.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

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


def accuracy_at(points: Sequence[dict], budget: float, num_classes: int) -> float:
  """Best accuracy among points with cost <= budget (1/num_classes if none)."""
  eligible = [p["accuracy"] for p in points if p["cost"] <= budget + 1e-12]
  return max(eligible) if eligible else 1.0 / num_classes


def summarize(points: Sequence[dict], num_classes: int,
              budgets: Sequence[float] = REPORT_BUDGETS) -> dict:
  """auc, auc_16, min_cost and acc_at_budget of a method's test points."""
  if not points:
    raise ValueError("points: expected at least one {'cost', 'accuracy'} point, got none")
  return {
      "auc": float(np.mean([accuracy_at(points, c, num_classes) for c in BUDGETS])),
      "auc_16": float(np.mean([accuracy_at(points, c, num_classes) for c in BUDGETS_16])),
      "min_cost": float(min(p["cost"] for p in points)),
      "acc_at_budget": {budget_key(c): accuracy_at(points, c, num_classes) for c in budgets},
  }


def pareto(points: Sequence[dict]) -> list[dict]:
  """The points no other point beats on both cost and accuracy, by cost."""
  out, best = [], -np.inf
  for p in sorted(points, key=lambda p: (p["cost"], -p["accuracy"])):
    if p["accuracy"] > best:
      out.append(p)
      best = p["accuracy"]
  return out


def paired_gain(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """Mean over samples of a - b and its standard error (a, b: per-sample scores of two
  methods on the same samples, e.g. correctness)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim != 1 or a.shape != b.shape or len(a) < 2:
    raise ValueError(f"a, b: expected two 1-d arrays of the same length >= 2,"
                     f" got shapes {a.shape} and {b.shape}")
  d = a - b
  return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


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
