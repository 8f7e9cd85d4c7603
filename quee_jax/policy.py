"""The gating policy: argmin over candidates of predicted error + λ · additional cost.

At a gate in state σ the sample takes the first step of
  c* = argmin_c  ê_c(x) + λ · ΔC(σ, c)
(exit, or run the next segment at c*'s level) and decides again at the next
gate; the last gate always exits. Before block 1 there are no features: the
start level comes from the fit split's population error rates of the
constant-level paths, so it depends on λ only.

Two rules make λ = 0 the full model:
  * ties break toward more computation;
  * predicted errors are taken as no lower than that of the most expensive
    candidate (continuing at the current, or for a fresh path the top, level
    to the last exit): predicting that a cheaper path beats the full model is
    no reason to prefer it at λ = 0, and at λ > 0 it still wins on cost.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from quee_jax.baselines import chain
from quee_jax.paths import EXIT, PathFamily
from quee_jax.table import StateTable


@dataclasses.dataclass(frozen=True)
class PolicyResult:
  """Per λ (rows) and sample (columns)."""

  lambdas: np.ndarray
  exit_state: np.ndarray  # [L, N] state whose exit gave the prediction
  pred: np.ndarray        # [L, N]
  correct: np.ndarray     # [L, N] bool
  cost: np.ndarray        # [L, N] counted cost

  def mean_cost(self) -> np.ndarray:
    return self.cost.mean(axis=1)

  def accuracy(self) -> np.ndarray:
    return self.correct.mean(axis=1)

  def points(self) -> list[dict]:
    return [{"param": float(l), "cost": float(c), "accuracy": float(a)}
            for l, c, a in zip(self.lambdas, self.mean_cost(), self.accuracy())]


def _choose(errors: np.ndarray, dcost: np.ndarray, mask: np.ndarray, lam: np.ndarray) -> np.ndarray:
  """Index of argmin_c errors + lam * dcost over valid c, ties to larger dcost, clipped errors.

  errors, dcost, mask: [..., C] broadcastable; lam: broadcastable to [...].
  """
  neg = np.where(mask, dcost, -np.inf)
  top = np.argmax(neg, axis=-1)
  floor = np.take_along_axis(errors, top[..., None], axis=-1)
  score = np.maximum(errors, floor) + lam[..., None] * dcost
  score = np.where(mask, score, np.inf)
  best = score.min(axis=-1, keepdims=True)
  tied = score <= best + 1e-12 * np.maximum(1.0, np.abs(best))
  return np.argmax(np.where(tied, dcost, -np.inf), axis=-1)


def start_errors(fit: StateTable) -> np.ndarray:
  """[num_start_levels, G] population error rate (fit split) of each constant-level path."""
  err = 1.0 - fit.accuracy()
  return np.stack([err[chain(fit.family, q)] for q in fit.family.start_levels])


def start_levels(family: PathFamily, population_err: np.ndarray, lambdas: np.ndarray) -> np.ndarray:
  """Root state chosen before block 1 for each λ [L]."""
  chains = np.stack([chain(family, q) for q in family.start_levels])  # [start levels, G]
  roots, cost = chains[:, 0], family.cost[chains]
  flat_err, flat_cost = population_err.reshape(-1), cost.reshape(-1)
  if not family.cand_mask[roots, EXIT].any():  # quant_only: only full depth counts
    valid = np.tile(np.arange(family.num_gates) == family.num_gates - 1, len(family.start_levels))
  else:
    valid = np.ones_like(flat_err, bool)
  lam = np.asarray(lambdas, np.float64)
  choice = _choose(flat_err[None], flat_cost[None], valid[None], lam)
  return roots[choice // family.num_gates]


def simulate(table: StateTable, predicted: np.ndarray, population_err: np.ndarray,
             lambdas: np.ndarray) -> PolicyResult:
  """Runs the policy for every λ over a state table.

  Args:
    table: the states of every sample (test, cal, ...).
    predicted: [S, N, C] predicted error probabilities for this table.
    population_err: `start_errors` of the fit table.
    lambdas: [L] non-negative trade-offs.
  """
  fam = table.family
  lambdas = np.asarray(lambdas, np.float64)
  if lambdas.ndim != 1 or (lambdas < 0).any() or not np.isfinite(lambdas).all():
    raise ValueError(f"lambdas: expected a 1-D array of finite values >= 0, got {lambdas}")
  if predicted.shape != (fam.num_states, table.num_samples, len(fam.candidates)):
    raise ValueError(f"predicted: expected shape {(fam.num_states, table.num_samples, len(fam.candidates))},"
                     f" got {predicted.shape}")
  L, N = len(lambdas), table.num_samples
  cur = np.repeat(start_levels(fam, population_err, lambdas)[:, None], N, axis=1)  # [L, N]
  done = np.zeros((L, N), bool)
  cols = np.arange(N)[None, :]
  lam = np.repeat(lambdas[:, None], N, axis=1)
  for _ in range(fam.num_gates):
    choice = _choose(predicted[cur, cols], fam.cand_cost[cur], fam.cand_mask[cur], lam)
    exiting = (choice == EXIT) | done
    done = exiting
    if done.all():
      break
    level = np.maximum(choice - 1, 0) // fam.num_gates
    nxt = fam.child[cur, level]
    cur = np.where(exiting, cur, nxt)
  if not done.all():
    raise AssertionError("policy: a sample passed the last gate without exiting")
  return PolicyResult(lambdas=lambdas, exit_state=cur, pred=table.pred[cur, cols],
                      correct=table.correct[cur, cols], cost=fam.cost[cur])


def lambda_grid(family: PathFamily, num: int = 48) -> np.ndarray:
  """0 followed by log-spaced λ from where costs barely matter to where only cost does."""
  dc = family.cand_cost[family.cand_mask & (family.cand_cost > 0)]
  lo, hi = 1e-3 / max(dc.max(), 1e-12), 10.0 / max(dc.min(), 1e-12)
  return np.concatenate([[0.0], np.geomspace(lo, hi, num - 1)])


def _bracket(mean_cost_fn, budget: float, hi: float, iters: int) -> tuple[float, float]:
  """(a, b): λ = b is the smallest λ found with mean cost <= budget, a < b one above it."""
  if not 0 < budget:
    raise ValueError(f"budget: expected > 0, got {budget}")
  if mean_cost_fn(0.0) <= budget:
    return 0.0, 0.0
  if mean_cost_fn(hi) > budget:
    return hi, hi  # the cheapest the policy can be; the caller reports the cost it reaches
  a, b = 1e-9, hi
  for _ in range(iters):
    mid = np.sqrt(a * b)
    if mean_cost_fn(mid) <= budget:
      b = mid
    else:
      a = mid
  if mean_cost_fn(a) <= budget:  # the bisection never went above budget: a is 1e-9
    a = 0.0
  return float(a), float(b)


def lambda_for_budget(mean_cost_fn, budget: float, hi: float = 1e6, iters: int = 40) -> float:
  """Smallest λ (bisection in log space) whose mean cost on cal is at most `budget`.

  mean_cost_fn: λ -> mean cost; assumed non-increasing in λ.
  """
  return _bracket(mean_cost_fn, budget, hi, iters)[1]


@dataclasses.dataclass(frozen=True)
class BudgetMix:
  """Two operating points mixed per sample to spend a budget in expectation.

  The curve of a deterministic policy jumps (e.g. from every sample at w8a8 to
  every sample at float): the λ meeting a budget can spend far less. Each
  sample takes the next more expensive λ instead with probability p_rich (a
  coin per sample), so the expected mean cost is the budget.
  """

  lam: float       # cheapest-side λ: mean cost <= budget
  lam_rich: float  # the next λ up: mean cost > budget
  p_rich: float    # probability that a sample uses lam_rich


def budget_mix(mean_cost_fn, budget: float, hi: float = 1e6, iters: int = 40) -> BudgetMix:
  """The mix of the two λ around `budget` whose expected mean cost equals it (on cal)."""
  rich, lam = _bracket(mean_cost_fn, budget, hi, iters)
  c_lam, c_rich = mean_cost_fn(lam), mean_cost_fn(rich)
  if rich == lam or c_rich <= c_lam:
    return BudgetMix(lam, lam, 0.0)
  return BudgetMix(lam, rich, float(mix_weight(c_lam, c_rich, budget)))


def mix_weight(cheap_cost, rich_cost, budget: float) -> np.ndarray:
  """p with (1 - p) * cheap_cost + p * rich_cost = budget, clipped to [0, 1]; 0 where the
  rich point is not dearer. Costs may be arrays (broadcast)."""
  cheap, rich = np.asarray(cheap_cost, np.float64), np.asarray(rich_cost, np.float64)
  gap = rich - cheap
  return np.where(gap > 0, np.clip((budget - cheap) / np.where(gap > 0, gap, 1.0), 0.0, 1.0), 0.0)
