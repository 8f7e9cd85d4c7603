"""Operating points chosen on cal: for a budget, and within δ of the full model.

Budget mode (`evaluate`) picks, per budget, QuEE's own point (`budget_point`: a start level and
a λ mix) and the naive combination's (`naive_budget_mode`: two confidence-exit configurations
mixed the same way), and runs QuEE's only where a valid paired test on cal certifies it more
accurate (`better_pvalue`, `BudgetEntry`). "At most δ below the full model" is chosen by risk
control (`pick` with rule "certified": Learn then Test, `quee_jax.protocol.risk`); the z-rule
and the mean alone, which promise nothing, are kept beside it to show its price
(`risk_choices`). The runtime bench also times, as a diagnostic, points chosen on test itself
(`test_chosen`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from quee_jax.core.table import StateTable
from quee_jax.gating import policy
from quee_jax.protocol import baselines, metrics, risk
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
  cal, mean cost [K]) whose accuracy is within max_drop of the full model's by the z-rule:
  mean - z * standard error of the paired per-sample difference (`metrics.paired_gain`) >=
  -max_drop. -1 if none.

  A test per point, no guarantee: among hundreds of points the cheapest that passes is the
  one most favoured by cal's noise (`pick`'s "certified" rule holds its promise)."""
  gain, se = metrics.paired_gain(correct, full_correct)
  ok = np.flatnonzero(gain - z * se >= -max_drop - 1e-12)
  return int(ok[np.argmin(np.asarray(cost)[ok])]) if len(ok) else -1


RULES = ("certified", "z_rule", "mean_only")
Z_RULE = 1.645  # the z-rule's one-sided 95% (the rule before risk control)


@dataclasses.dataclass(frozen=True)
class Candidates:
  """A method's K operating points as a rule choosing on cal sees them."""

  params: list            # [K] what identifies each point (JSON-able)
  fit_drop: np.ndarray    # [K] accuracy drop on fit and mean cost on fit: risk control's
  fit_cost: np.ndarray    #   testing order (`risk.safest_first`)
  cal_cost: np.ndarray    # [K]
  cal_correct: np.ndarray  # [K, N] per cal sample (in expectation over any coin)
  test_cost: np.ndarray   # [K]
  test_accuracy: np.ndarray  # [K]

  @classmethod
  def of_sweeps(cls, fit: policy.PolicyResult, cal: policy.PolicyResult,
                test: policy.PolicyResult, fit_full_accuracy: float) -> Candidates:
    """QuEE's λ × start-level grid swept on the three splits."""
    params = [p["param"] for p in test.points()]
    return cls(params, fit_full_accuracy - fit.accuracy(), fit.mean_cost(), cal.mean_cost(),
               cal.correct, test.mean_cost(), test.accuracy())

  @classmethod
  def of_confidence(cls, points: Sequence[dict], fit: StateTable, cal: StateTable) -> Candidates:
    """Confidence-exit configurations (`baselines.confidence_exit`'s points, measured on test)."""
    rows = np.arange(cal.num_samples)
    params = [p["param"] for p in points]
    on_fit = [baselines.confidence_points_at(fit, q) for q in params]
    fit_full = baselines.full_model(fit)["accuracy"]
    return cls(params, np.array([fit_full - p["accuracy"] for p in on_fit]),
               np.array([p["cost"] for p in on_fit]),
               np.array([p["cal_cost"] for p in points]),
               np.stack([cal.correct[baselines.confidence_states_at(cal, q), rows]
                         for q in params]),
               np.array([p["cost"] for p in points]), np.array([p["accuracy"] for p in points]))


def pick(c: Candidates, cal_full: np.ndarray, rule: str, delta: float, eps: float,
         pvalues: str = "betting") -> int:
  """Index of the cheapest point on cal that `rule` accepts as at most `delta` below the full
  model (per-sample correctness cal_full on cal); -1 if none.

  certified: Learn then Test at level eps in `risk.safest_first` order of the fit split, with
    `pvalues` (`risk.PVALUES`); with probability 1 - eps over the cal draw the population
    drop is at most delta.
  z_rule, mean_only: `cheapest_within` with z = Z_RULE, or the cal mean alone (z = 0).
  """
  if rule == "certified":
    return risk.cheapest_certified(risk.drop_losses(c.cal_correct, cal_full), c.cal_cost, delta,
                                   eps, risk.safest_first(c.fit_drop, c.fit_cost), method=pvalues)
  if rule not in RULES:
    raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
  return cheapest_within(c.cal_correct, c.cal_cost, cal_full, delta,
                         Z_RULE if rule == "z_rule" else 0.0)


def risk_key(delta: float) -> str:
  """A drop as results.json names it: 0.005 -> '0.5' (points of accuracy)."""
  return f"{100 * delta:g}"


def risk_choices(c: Candidates, cal_full: np.ndarray, test_full_accuracy: float,
                 deltas: Sequence[float], eps: float) -> dict:
  """Per δ (`risk_key`) and rule, the point chosen on cal: its param, cal and test cost, test
  accuracy and test drop (None where no point passes)."""
  out = {}
  for delta in deltas:
    row = {}
    for rule in RULES:
      i = pick(c, cal_full, rule, delta, eps)
      row[rule] = None if i < 0 else {
          "param": c.params[i], "cal_cost": float(c.cal_cost[i]),
          "test_cost": float(c.test_cost[i]), "test_accuracy": float(c.test_accuracy[i]),
          "test_drop": float(test_full_accuracy - c.test_accuracy[i])}
    out[risk_key(delta)] = row
  return out


def better_pvalue(a_correct: np.ndarray, b_correct: np.ndarray, eps: float) -> float:
  """p-value of "a is not more accurate than b" from paired per-sample correctness on cal
  (in [0, 1], in expectation over coins): the betting test of `risk` on b - a at δ = 0."""
  losses = np.asarray(b_correct, np.float64) - np.asarray(a_correct, np.float64)
  return float(risk.pvalues(losses[None], 0.0, eps)[0])


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


def naive_budget_mode(points: Sequence[dict],
                      budgets: Sequence[float]) -> dict[str, NaiveMix | None]:
  """The naive combination's budget mode: per budget (`budget_key`), its best mix on cal.

  points: confidence-exit configurations of every level (`baselines.confidence_exit`), with
    their cal (cal_cost, cal_accuracy) and test (cost, accuracy) numbers.
  """
  return {budget_key(b): _best_mix(points, b) for b in budgets}


def _best_mix(points: Sequence[dict], budget: float) -> NaiveMix | None:
  """The naive combination's budget mode at one budget (`metrics.best_mix`) with its expected
  cal and test cost and accuracy; None if no point is within the budget on cal."""
  get = lambda k: np.array([p[k] for p in points], np.float64)
  mix = metrics.best_mix(get("cal_cost"), get("cal_accuracy"), budget)
  if mix is None:
    return None
  outcome = Outcome(*(mix.of(get(k)) for k in ("cal_cost", "cal_accuracy", "cost", "accuracy")))
  return NaiveMix(points[mix.cheap]["param"], points[mix.rich]["param"], mix.p_rich, outcome)


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

  QuEE's own point runs only where the paired test on cal certifies it more accurate than
  the naive one (`better_pvalue` at most the evaluation's ε); otherwise the naive one does.
  In JSON (a run's budget_mode[budget]): where there is a naive point, the paired cal gain,
  its standard error, the p-value and what the z-rule of earlier versions decided; then the
  chosen point's outcome, fallback, "policy" (QuEE's own) and "naive".
  """

  own: PolicyMix
  naive: NaiveMix | None          # None: no naive point within the budget on cal
  fallback: bool                  # the naive point runs: QuEE's is not certified better on cal
  cal_gain: float | None = None   # QuEE's own minus naive, paired per cal sample
  cal_gain_se: float | None = None
  p_value: float | None = None    # of "QuEE's own is not more accurate than the naive one"
  z_rule_fallback: bool | None = None  # the earlier rule: fall back unless gain > Z_RULE se

  def __post_init__(self):
    if self.fallback and self.naive is None:
      raise ValueError("fallback: expected False when there is no naive point to fall back to")

  @property
  def chosen(self) -> Outcome:
    """The outcome of the point budget mode runs."""
    return self.naive.outcome if self.fallback else self.own.outcome

  @property
  def z_rule_chosen(self) -> Outcome:
    """The outcome of the point the z-rule would run (the chosen one where there is no naive)."""
    return self.naive.outcome if self.z_rule_fallback else self.own.outcome

  def to_json(self) -> dict:
    test = ({} if self.cal_gain is None else
            {"cal_gain": self.cal_gain, "cal_gain_se": self.cal_gain_se,
             "p_value": self.p_value, "z_rule_fallback": self.z_rule_fallback})
    return {**test, **self.chosen.to_json(), "fallback": self.fallback,
            "policy": self.own.to_json(),
            "naive": None if self.naive is None else self.naive.to_json()}

  @classmethod
  def from_json(cls, d: dict) -> BudgetEntry:
    """The chosen point's numbers are not read: they are `chosen`'s, by construction."""
    naive = None if d["naive"] is None else NaiveMix.from_json(d["naive"])
    return cls(PolicyMix.from_json(d["policy"]), naive, d["fallback"], d.get("cal_gain"),
               d.get("cal_gain_se"), d.get("p_value"), d.get("z_rule_fallback"))
