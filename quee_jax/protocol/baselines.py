"""Baselines as policies over the same state tables and cost model.

  full model          top level, full depth.
  static              one level, full depth, for every level.
  confidence EE       max-softmax thresholds per exit at one level, fitted on the
                      fit split with the MSDNet protocol (a geometric share r^k of
                      the samples leaves at exit k), for many r; and the envelope
                      over levels, the "naive combination".
  path oracle         per sample any path that is right: the most accuracy any
                      per-sample choice of path can reach at each mean cost (loose:
                      some path is right on hard samples by chance).
  consistency oracle  the same with "agrees with the full model" as the goal.

Costs come from the family the table was collected with (exit heads of the
gates passed included; no predictor overhead: these policies need none).
"""

from __future__ import annotations

import numpy as np

from quee_jax.core.paths import PathFamily
from quee_jax.core.table import StateTable


def full_depth_cost(family: PathFamily, level: int) -> float:
  """Embedding + every block at `level` + the last exit head: no intermediate heads run."""
  c = family.costs
  return float(c.embed + c.blocks[:, level].sum() + c.heads[-1])


def full_model(table: StateTable) -> dict:
  fam = table.family
  top = fam.top
  s = fam.chain(top)[-1]
  return {"level": fam.ladder[top], "accuracy": float(table.correct[s].mean()),
          "cost": full_depth_cost(fam, top), "pred": table.pred[s], "correct": table.correct[s]}


def static(table: StateTable) -> list[dict]:
  """One point per level: full depth at that level."""
  fam = table.family
  return [{"param": fam.ladder[q], "cost": full_depth_cost(fam, q),
           "accuracy": float(table.correct[fam.chain(q)[-1]].mean())}
          for q in range(len(fam.ladder))]


def msdnet_shares(num_exits: int, ratio: float) -> np.ndarray:
  """Share of samples leaving at each exit, proportional to ratio^k (MSDNet protocol)."""
  w = ratio ** np.arange(num_exits, dtype=np.float64)
  return w / w.sum()


DEFAULT_RATIOS = tuple(np.geomspace(0.02, 50.0, 33))


def fit_thresholds(max_prob: np.ndarray, shares: np.ndarray) -> np.ndarray:
  """Thresholds [G-1] so that shares[k] of the samples leave at exit k.

  max_prob: [G, N] max softmax at every exit of one level's chain (fit split).
  """
  G, N = max_prob.shape
  remaining = np.ones(N, bool)
  thresholds = np.full(G - 1, np.inf)
  for k in range(G - 1):
    n_exit = int(round(shares[k] * N))
    alive = np.flatnonzero(remaining)
    if n_exit <= 0 or not len(alive):
      continue
    scores = np.sort(max_prob[k, alive])[::-1]
    thresholds[k] = scores[min(n_exit, len(scores)) - 1]
    remaining &= ~(max_prob[k] >= thresholds[k])
  return thresholds


def apply_thresholds(max_prob: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """Exit index [N] of every sample: the first exit whose max prob reaches its threshold."""
  G = max_prob.shape[0]
  hit = np.concatenate([max_prob[:-1] >= thresholds[:, None], np.ones((1, max_prob.shape[1]), bool)])
  return np.argmax(hit, axis=0) if G > 1 else np.zeros(max_prob.shape[1], int)


def confidence_exit(fit: StateTable, table: StateTable, level: int,
                    ratios=DEFAULT_RATIOS) -> list[dict]:
  """Confidence early exit at one level: thresholds fitted on `fit`, applied to `table`."""
  states = fit.family.chain(level)
  points = []
  for r in ratios:
    thr = fit_thresholds(fit.features["max_prob"][states], msdnet_shares(len(states), r))
    param = {"level": fit.family.ladder[level], "ratio": float(r),
             "thresholds": [float(t) for t in thr]}
    points.append({"param": param, **confidence_points_at(table, param)})
  return points


def confidence_states_at(table: StateTable, param: dict) -> np.ndarray:
  """[N] the state each sample of `table` exits at under a confidence-exit point's thresholds."""
  fam = table.family
  states = fam.chain(fam.ladder.index(param["level"]))
  return states[apply_thresholds(table.features["max_prob"][states], np.asarray(param["thresholds"]))]


def confidence_points_at(table: StateTable, param: dict) -> dict:
  """Cost and accuracy on `table` of a confidence-exit point's fitted thresholds."""
  chosen = confidence_states_at(table, param)
  return {"cost": float(table.family.cost[chosen].mean()),
          "accuracy": float(table.correct[chosen, np.arange(table.num_samples)].mean())}


def _oracle_curve(goal: np.ndarray, correct: np.ndarray, cost: np.ndarray, num: int) -> list[dict]:
  """Best accuracy at every mean cost when each sample may take any state.

  goal: [S, N] which states meet the oracle's goal for each sample. A sample
  either meets it at its cheapest such state, or takes its cheapest state of
  all; meeting it costs the difference. Filling the budget with the smallest
  differences first maximises how many samples meet the goal (each counts one).
  """
  S, N = goal.shape
  cheapest = np.argmin(np.broadcast_to(cost[:, None], (S, N)), axis=0)
  goal_cost = np.where(goal, cost[:, None], np.inf)
  best = np.argmin(goal_cost, axis=0)
  reachable = np.isfinite(goal_cost.min(axis=0))
  extra = np.where(reachable, cost[best] - cost[cheapest], np.inf)
  order = np.argsort(extra, kind="stable")
  cols = np.arange(N)
  base_cost, base_ok = cost[cheapest], correct[cheapest, cols]
  chosen_ok = correct[best, cols]
  points = []
  counts = np.unique(np.linspace(0, reachable.sum(), num).round().astype(int))
  for k in counts:
    take = np.zeros(N, bool)
    take[order[:k]] = True
    points.append({"param": int(k),
                   "cost": float(np.where(take, cost[best], base_cost).mean()),
                   "accuracy": float(np.where(take, chosen_ok, base_ok).mean())})
  return points


def path_oracle(table: StateTable, num: int = 200) -> list[dict]:
  return _oracle_curve(table.correct, table.correct, table.family.cost, num)


def consistency_oracle(table: StateTable, num: int = 200) -> list[dict]:
  agree = table.pred == full_model(table)["pred"][None, :]
  return _oracle_curve(agree, table.correct, table.family.cost, num)
