"""Operating points chosen on cal: QuEE's and the naive combination's for a budget, the half point.

Budget mode (`evaluate`) picks, per budget, QuEE's own point (`budget_point`: a start level and
a λ mix) and the naive combination's (`naive_budget_mode`: two confidence-exit configurations
mixed the same way), and runs QuEE's only where it beats the naive one clearly on cal
(`BudgetEntry`). The runtime bench takes the half point (`half_point`) and, as a diagnostic,
points chosen on test itself (`test_chosen`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from quee_jax.core.table import StateTable
from quee_jax.gating import policy
from quee_jax.protocol import baselines, metrics
from quee_jax.protocol.fitting import Fitted
from quee_jax.protocol.metrics import budget_key


@dataclasses.dataclass(frozen=True)
class BudgetPoint:
  """An operating point chosen on cal for a budget: a start level and a λ mix."""

  start: int             # level index
  mix: policy.BudgetMix  # the two λ and the probability of the dearer one

  def outcomes(self, fitted: Fitted, table: StateTable,
               split: str) -> tuple[np.ndarray, np.ndarray]:
    """Per sample of `table`: (cost, correctness), in expectation over the per-sample coin."""
    mix, q = self.mix, self.start
    both = fitted.simulate(table, split, [mix.lam, mix.lam_rich], [q, q])
    weights = np.array([1 - mix.p_rich, mix.p_rich])
    return weights @ both.cost, weights @ both.correct.astype(np.float64)

  def expected(self, fitted: Fitted, table: StateTable, split: str) -> tuple[float, float]:
    """(mean cost, accuracy) on `table`, in expectation over the per-sample coin."""
    cost, correct = self.outcomes(fitted, table, split)
    return float(cost.mean()), float(correct.mean())


def budget_point(fitted: Fitted, cal: StateTable, budget: float) -> BudgetPoint:
  """Per start level the λ mix that spends `budget` on cal (`policy.budget_mix`); the best on cal.

  Start levels whose cheapest operating point already exceeds the budget on cal
  are passed over unless none reaches it (then the cheapest).
  """
  best = None
  for q in fitted.family.start_levels:
    mean_cost = lambda l: float(fitted.simulate(cal, "cal", [l], [q]).mean_cost()[0])
    point = BudgetPoint(q, policy.budget_mix(mean_cost, budget))
    cost, acc = point.expected(fitted, cal, "cal")
    within = cost <= budget * (1 + 1e-9)
    key = (within, acc if within else -cost)
    if best is None or key > best[0]:
      best = (key, point)
  return best[1]


def cheapest_within(correct: np.ndarray, cost: np.ndarray, full_correct: np.ndarray,
                    max_drop: float, z: float) -> int:
  """Index of the cheapest of K operating points (per-sample correctness correct [K, N] on
  cal, mean cost [K]) whose accuracy is within max_drop of the full model's with confidence:
  mean - z * standard error of the paired per-sample difference >= -max_drop. -1 if none."""
  ok = []
  for i, c in enumerate(correct):
    gain, se = metrics.paired_gain(c, full_correct)
    if gain - z * se >= -max_drop - 1e-12:
      ok.append(i)
  return ok[int(np.argmin(np.asarray(cost)[ok]))] if ok else -1


def half_point(cal_sweep: policy.PolicyResult, full_correct: np.ndarray, max_drop: float,
               z: float) -> tuple[float, int]:
  """(λ, start level) of the cheapest operating point of the cal sweep within max_drop of the
  full model's accuracy with confidence (`cheapest_within`). The full model's own point
  (λ = 0) has a zero difference, so one always qualifies."""
  best = cheapest_within(cal_sweep.correct, cal_sweep.mean_cost(), full_correct, max_drop, z)
  return float(cal_sweep.lambdas[best]), int(cal_sweep.starts[best])


def test_chosen(test_sweep: policy.PolicyResult, cap: float) -> tuple[float, int]:
  """(λ, start level) of the operating point of the test sweep most accurate among those whose
  mean cost is at most cap (the cheapest, if none is). Chosen on test: an upper bound on what
  a rule choosing on cal reaches, never a result."""
  cost = test_sweep.mean_cost()
  ok = np.flatnonzero(cost <= cap)
  best = ok[np.argmax(test_sweep.accuracy()[ok])] if len(ok) else int(np.argmin(cost))
  return float(test_sweep.lambdas[best]), int(test_sweep.starts[best])


@dataclasses.dataclass(frozen=True)
class Outcome:
  """An operating point's expected mean cost and accuracy on cal and on test."""

  cal_cost: float
  cal_accuracy: float
  test_cost: float
  test_accuracy: float

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> Outcome:
    """From a dict with (at least) the four numbers."""
    return cls(*(d[f.name] for f in dataclasses.fields(cls)))


@dataclasses.dataclass(frozen=True)
class NaiveMix:
  """The naive combination's point for a budget, mixed as QuEE's is (`policy.BudgetMix`):
  each sample takes the confidence-exit configuration `param_rich` with probability p_rich."""

  param: dict       # a confidence-exit configuration (`baselines.confidence_exit`'s param)
  param_rich: dict  # the dearer one (param itself when p_rich is 0)
  p_rich: float
  outcome: Outcome  # in expectation over the per-sample coin

  def correct(self, table: StateTable) -> np.ndarray:
    """Per sample of `table`, the expected correctness (over the coin)."""
    rows = np.arange(table.num_samples)
    correct = lambda param: table.correct[baselines.confidence_states_at(table, param), rows]
    p = self.p_rich
    return (1 - p) * correct(self.param) + p * correct(self.param_rich)

  def to_json(self) -> dict:
    return {"param": self.param, "param_rich": self.param_rich, "p_rich": self.p_rich,
            **self.outcome.to_json()}

  @classmethod
  def from_json(cls, d: dict) -> NaiveMix:
    return cls(d["param"], d["param_rich"], d["p_rich"], Outcome.from_json(d))


def naive_budget_mode(points: Sequence[dict], cal: StateTable,
                      budgets: Sequence[float]) -> dict[str, NaiveMix | None]:
  """The naive combination's budget mode: per budget (`budget_key`), its best mix on cal.

  points: confidence-exit configurations of every level (`baselines.confidence_exit`), with
    their test cost and accuracy.
  """
  on_cal = _naive_on_cal(points, cal)
  return {budget_key(b): _best_mix(on_cal, b) for b in budgets}


def _naive_on_cal(test_points: Sequence[dict], cal: StateTable) -> list[dict]:
  """Every confidence-exit configuration (test points of all levels), also measured on cal."""
  out = []
  for p in test_points:
    on_cal = baselines.confidence_points_at(cal, p["param"])
    out.append({"param": p["param"], "cal_cost": on_cal["cost"], "cal_accuracy": on_cal["accuracy"],
                "test_cost": p["cost"], "test_accuracy": p["accuracy"]})
  return out


def _best_mix(cal_points: list[dict], budget: float) -> NaiveMix | None:
  """The naive combination's budget mode at one budget.

  Among pairs (a point within the budget on cal, a dearer one) mixed to spend
  the budget in expectation, or a point alone, the best on cal; its expected
  cal and test cost and accuracy. None if no point is within the budget.
  """
  get = lambda k: np.array([p[k] for p in cal_points], np.float64)
  cost, acc = get("cal_cost"), get("cal_accuracy")
  cheap = np.flatnonzero(cost <= budget + 1e-12)
  if not len(cheap):
    return None
  rich = np.concatenate([np.flatnonzero(cost > budget + 1e-12), cheap[:1]])  # + "no mix"
  w = policy.mix_weight(cost[cheap][:, None], cost[rich][None], budget)  # [cheap, rich]
  w[:, -1] = 0.0
  score = (1 - w) * acc[cheap][:, None] + w * acc[rich][None]
  i, j = np.unravel_index(np.argmax(score), score.shape)
  a, b, p = cal_points[cheap[i]], cal_points[rich[j]], float(w[i, j])
  mixed = Outcome(**{f.name: float((1 - p) * a[f.name] + p * b[f.name])
                     for f in dataclasses.fields(Outcome)})
  return NaiveMix(a["param"], b["param"] if p else a["param"], p, mixed)


@dataclasses.dataclass(frozen=True)
class PolicyMix:
  """QuEE's own point for a budget (`budget_point`), its start level named, with its outcome."""

  start: str  # the start level's name
  mix: policy.BudgetMix
  outcome: Outcome

  def to_json(self) -> dict:
    mix = self.mix
    return {"start": self.start, "lambda": mix.lam, "lambda_rich": mix.lam_rich,
            "p_rich": mix.p_rich, **self.outcome.to_json()}

  @classmethod
  def from_json(cls, d: dict) -> PolicyMix:
    return cls(d["start"], policy.BudgetMix(d["lambda"], d["lambda_rich"], d["p_rich"]),
               Outcome.from_json(d))


@dataclasses.dataclass(frozen=True)
class BudgetEntry:
  """Budget mode at one budget for one run: QuEE's own point, the naive one, which runs.

  In JSON (a run's budget_mode[budget]): the paired cal gain where there is a naive point,
  the chosen point's outcome, fallback, then "policy" (QuEE's own) and "naive".
  """

  own: PolicyMix
  naive: NaiveMix | None          # None: no naive point within the budget on cal
  fallback: bool                  # the naive point runs: QuEE's did not beat it clearly on cal
  cal_gain: float | None = None   # QuEE's own minus naive, paired per cal sample
  cal_gain_se: float | None = None

  def __post_init__(self):
    if self.fallback and self.naive is None:
      raise ValueError("fallback: expected False when there is no naive point to fall back to")

  @property
  def chosen(self) -> Outcome:
    """The outcome of the point budget mode runs."""
    return self.naive.outcome if self.fallback else self.own.outcome

  def to_json(self) -> dict:
    gain = ({} if self.cal_gain is None else
            {"cal_gain": self.cal_gain, "cal_gain_se": self.cal_gain_se})
    return {**gain, **self.chosen.to_json(), "fallback": self.fallback,
            "policy": self.own.to_json(),
            "naive": None if self.naive is None else self.naive.to_json()}

  @classmethod
  def from_json(cls, d: dict) -> BudgetEntry:
    """The chosen point's numbers are not read: they are `chosen`'s, by construction."""
    naive = None if d["naive"] is None else NaiveMix.from_json(d["naive"])
    return cls(PolicyMix.from_json(d["policy"]), naive, d["fallback"], d.get("cal_gain"),
               d.get("cal_gain_se"))
