"""Risk control: operating points certified to lose at most δ, by Learn then Test.

Given K operating points and each one's per-sample loss on cal — e.g. the accuracy drop
against the full model, ℓ_k = 1[full model right] − 1[point k right] ∈ [−1, 1] (`drop_losses`)
— `certify` returns the points whose population mean loss R_k is certified at most δ: a
p-value p_k for each null H_k: R_k > δ, tested in a fixed sequence (an order chosen without
looking at cal: `safest_first`, from the fit split) at level ε, stopping at the first p_k > ε
(fixed-sequence testing in Learn then Test, Angelopoulos et al. 2021).

Guarantee. If the cal samples are drawn i.i.d. from the population the model will serve
(exchangeable with the test samples), the points and the order do not depend on cal, and every
p-value is valid (P(p_k ≤ u) ≤ u under H_k), then with probability at least 1 − ε over the
draw of cal, every certified point has R_k ≤ δ. The choice among certified points may look at
cal (`cheapest_certified` takes the cheapest on cal): all of them hold at once. The promise is
about the population; a finite test set sees R_k up to its own sampling noise.

p-values (`PVALUES`):
  binomial           losses in {lo, hi} only: the exact binomial tail P(Bin(n, δ) ≤ Σℓ).
  hoeffding_bentkus  any loss in [lo, hi] (Bates et al. 2021): needs no variance, hence wide
                     when nearly every loss sits at one value, as an accuracy drop's does.
  betting            any loss in [lo, hi] (Waudby-Smith & Ramdas 2023): the wealth of
                     predictable bets against H_k, a supermartingale under it, so Ville's
                     inequality makes 1 / (its maximum) a valid p-value. It adapts to the
                     variance; the default.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats

PVALUES = ("betting", "hoeffding_bentkus", "binomial")

# The betting fraction's cap, as a share of the largest bet that keeps the wealth positive
# (Waudby-Smith & Ramdas suggest 1/2 or 3/4): the larger, the more a run of zero losses earns
# (it decides whether a few thousand cal samples can certify δ = 0.25 point at all) and the more
# one large loss costs.
BET_CAP = 0.75


def drop_losses(correct: np.ndarray, reference_correct: np.ndarray) -> np.ndarray:
  """[K, N] per-sample accuracy drop of K points against a reference (bounds (-1, 1)).

  correct: [K, N] per-sample correctness of each point (fractional: in expectation over a
    per-sample coin); reference_correct: [N], the full model's.
  """
  correct = np.asarray(correct, np.float64)
  ref = np.asarray(reference_correct, np.float64)
  if correct.ndim != 2 or ref.shape != correct.shape[1:]:
    raise ValueError(f"correct, reference_correct: expected shapes [K, N] and [N], got"
                     f" {correct.shape} and {ref.shape}")
  return ref[None] - correct


def _normalized(losses: np.ndarray, delta: float, bounds: tuple[float, float]
                ) -> tuple[np.ndarray, float]:
  """(losses mapped to [0, 1], δ mapped alike); raises ValueError naming what is wrong."""
  lo, hi = (float(b) for b in bounds)
  losses = np.asarray(losses, np.float64)
  if losses.ndim != 2 or losses.shape[1] < 1:
    raise ValueError(f"losses: expected [K, N] per-sample losses with N >= 1, got {losses.shape}")
  if not lo < hi:
    raise ValueError(f"bounds: expected lo < hi, got {bounds}")
  if not np.isfinite(losses).all() or losses.min() < lo - 1e-12 or losses.max() > hi + 1e-12:
    raise ValueError(f"losses: expected finite values in bounds [{lo}, {hi}], got"
                     f" [{np.nanmin(losses)}, {np.nanmax(losses)}]")
  if not lo < delta < hi:
    raise ValueError(f"delta: expected a level strictly inside the loss bounds ({lo}, {hi}),"
                     f" got {delta}")
  x = np.clip((losses - lo) / (hi - lo), 0.0, 1.0)
  return x, (delta - lo) / (hi - lo)


def betting_pvalues(x: np.ndarray, m: float, eps: float) -> np.ndarray:
  """[K] p-values of H_k: E x_k > m for x [K, N] in [0, 1], by betting (module docstring).

  Bets λ_t (m − x_t) on each sample in turn, λ_t from the samples before it only (predictable):
  Waudby-Smith & Ramdas' plug-in sqrt(2 log(1/ε) / (n σ̂²_{t-1})), capped at BET_CAP / (1 − m).
  The order of the cal samples is theirs, which exchangeability makes as good as any.
  """
  K, n = x.shape
  t = np.arange(1, n + 1)
  mu = (0.5 + np.cumsum(x, axis=1)) / (t + 1)               # μ̂_t, t = 1..n
  var = (0.25 + np.cumsum((x - mu) ** 2, axis=1)) / (t + 1)  # σ̂²_t
  var_before = np.concatenate([np.full((K, 1), 0.25), var[:, :-1]], axis=1)
  lam = np.minimum(np.sqrt(2 * np.log(1 / eps) / (n * var_before)), BET_CAP / (1 - m))
  log_wealth = np.cumsum(np.log1p(lam * (m - x)), axis=1)
  return np.minimum(1.0, np.exp(-np.maximum(log_wealth.max(axis=1), 0.0)))


def hoeffding_bentkus_pvalues(x: np.ndarray, m: float) -> np.ndarray:
  """[K] p-values of H_k: E x_k > m for x [K, N] in [0, 1] (Bates et al. 2021, Prop. 3.5)."""
  n = x.shape[1]
  r = np.minimum(x.mean(axis=1), m)
  with np.errstate(divide="ignore", invalid="ignore"):
    kl = (np.where(r > 0, r * np.log(r / m), 0.0)
          + np.where(r < 1, (1 - r) * np.log((1 - r) / (1 - m)), 0.0))
  hoeffding = np.exp(-n * kl)
  bentkus = np.e * stats.binom.cdf(np.ceil(n * x.mean(axis=1) - 1e-9), n, m)
  return np.minimum(1.0, np.minimum(hoeffding, bentkus))


def binomial_pvalues(x: np.ndarray, m: float) -> np.ndarray:
  """[K] exact p-values of H_k: P(x_k = 1) > m for x [K, N] in {0, 1}."""
  if not np.isin(x, (0.0, 1.0)).all():
    raise ValueError("losses: the binomial p-value needs losses at the two bounds only (0/1)")
  return stats.binom.cdf(x.sum(axis=1).round(), x.shape[1], m)


def pvalues(losses: np.ndarray, delta: float, eps: float, bounds: tuple[float, float] = (-1, 1),
            method: str = "betting") -> np.ndarray:
  """[K] a valid p-value per point for its null "mean loss > delta" (module docstring)."""
  if method not in PVALUES:
    raise ValueError(f"method: expected one of {PVALUES}, got {method!r}")
  _check_eps(eps)
  x, m = _normalized(losses, delta, bounds)
  if method == "betting":
    return betting_pvalues(x, m, eps)
  if method == "hoeffding_bentkus":
    return hoeffding_bentkus_pvalues(x, m)
  return binomial_pvalues(x, m)


def fixed_sequence(p: np.ndarray, order: Sequence[int], eps: float) -> np.ndarray:
  """[K] bool: the points rejected by fixed-sequence testing of p in `order` at level eps.

  Rejects p[order[0]], p[order[1]], ... while they are at most eps; stops at the first that is
  not. Points missing from `order` are never certified.
  """
  _check_eps(eps)
  p = np.asarray(p, np.float64)
  order = _check_order(order, len(p))
  passed = p[order] <= eps
  run = len(order) if passed.all() else int(np.argmin(passed))
  out = np.zeros(len(p), bool)
  out[order[:run]] = True
  return out


def safest_first(fit_drop: np.ndarray, fit_cost: np.ndarray) -> np.ndarray:
  """The testing order, from the fit split (never cal): the points that lose nothing there
  first, dearest first, then the others by their fit drop, smallest first (ties dearest first).

  Learn then Test wants the points most likely to pass early, since the sequence stops at the
  first that fails. Cost alone is a poor proxy where start levels are merged: a full-depth
  point at a low level is dear and loses accuracy, and would end the sequence before the
  cheap early exits that lose nothing. The fit drop alone would lead with cheap points whose
  drop on fit is optimistic (QuEE's predictors were trained there); clipping it at 0 puts the
  dear points that lose nothing first, where they nearly always pass.
  """
  drop, cost = np.asarray(fit_drop, np.float64), np.asarray(fit_cost, np.float64)
  if drop.shape != cost.shape or drop.ndim != 1:
    raise ValueError(f"fit_drop, fit_cost: expected two [K] arrays, got shapes {drop.shape}"
                     f" and {cost.shape}")
  return np.lexsort((-cost, np.maximum(drop, 0.0)))


def certify(losses: np.ndarray, delta: float, eps: float, order: Sequence[int],
            bounds: tuple[float, float] = (-1, 1), method: str = "betting") -> np.ndarray:
  """[K] bool: the points certified to have mean loss at most delta with probability 1 - eps.

  losses: [K, N] per-sample losses on cal within `bounds`; order: the fixed testing sequence,
  chosen without cal (`safest_first`). The same as `fixed_sequence` of every point's p-value,
  computed on doubling prefixes of the order: testing stops at the first failure, which on
  real tables comes long before the last of hundreds of points.
  """
  losses = np.asarray(losses, np.float64)
  order = _check_order(order, len(losses))
  out = np.zeros(len(losses), bool)
  start, size = 0, 16
  while start < len(order):
    head = order[start:start + size]
    passed = fixed_sequence(pvalues(losses[head], delta, eps, bounds, method),
                            np.arange(len(head)), eps)
    out[head[passed]] = True
    if not passed.all():
      break
    start, size = start + size, 2 * size
  return out


def cheapest_certified(losses: np.ndarray, cost: np.ndarray, delta: float, eps: float,
                       order: Sequence[int], bounds: tuple[float, float] = (-1, 1),
                       method: str = "betting") -> int:
  """Index of the cheapest certified point by `cost` (its mean cost on cal); -1 if none is."""
  ok = np.flatnonzero(certify(losses, delta, eps, order, bounds, method))
  return int(ok[np.argmin(np.asarray(cost, np.float64)[ok])]) if len(ok) else -1


def _check_order(order: Sequence[int], num_points: int) -> np.ndarray:
  order = np.asarray(order, int)
  if order.ndim != 1 or len(set(order.tolist())) != len(order) or (
      len(order) and (order.min() < 0 or order.max() >= num_points)):
    raise ValueError(f"order: expected distinct indices into the {num_points} points, got {order}")
  return order


def _check_eps(eps: float) -> None:
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
    raise ValueError(f"eps: expected a probability in (0, 1), got {eps!r}")
