"""The gating policy: argmin over candidates of predicted error + λ · additional cost.

At a gate in state σ the sample takes the first step of
  c* = argmin_c  ê_c(x) + λ · ΔC(σ, c)
(exit, or run the next segment at c*'s level) and decides again at the next
gate; the last gate always exits. Before block 1 there are no features, so the
start level is a parameter of the operating point beside λ, the same for every
sample: `simulate` takes one per λ row. Given λ alone it defaults to the level
the fit split's population error rates of the constant-level paths pick
(`start_levels`). The accuracy-cost curve sweeps both (`operating_grid`): a λ
sweep alone reaches only the convex hull of the (cost, error) points of each
start level, and the start level jumps between levels where the curve of one
of them is not convex (docs/method.md).

Predicted errors enter through a soft floor at the reference candidate, the
most expensive one (continuing at the current, or for a fresh path the top,
level to the last exit): with d_c = ê_c - ê_ref,
  ê_c  ->  ê_ref + τ · softplus(d_c / τ).
So λ = 0 is the full model (every cheaper candidate pays a positive amount;
ties break toward more computation), and a cheaper path predicted to be no
worse is not free: it pays about τ · exp(d_c / τ), less the more clearly it is
predicted better. Samples then leave in the order of their predicted advantage
as λ grows. With a hard floor (τ = 0) every sample with some cheaper candidate
predicted at or below the reference - half of them by noise alone when
the paths truly tie - would take it at any λ > 0, and the policy would jump
from the full model to its cheapest corner (docs/method.md).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from quee_jax.core import precision
from quee_jax.core.paths import EXIT, PathFamily
from quee_jax.core.table import StateTable

SOFT_FLOOR = 0.01  # default τ: one point of error rate


@dataclasses.dataclass(frozen=True)
class PolicyResult:
  """Per λ (rows) and sample (columns)."""

  ladder: tuple[str, ...]
  lambdas: np.ndarray
  starts: np.ndarray      # [L] level index each row started at
  exit_state: np.ndarray  # [L, N] state whose exit gave the prediction
  pred: np.ndarray        # [L, N]
  correct: np.ndarray     # [L, N] bool
  cost: np.ndarray        # [L, N] counted cost

  def mean_cost(self) -> np.ndarray:
    return self.cost.mean(axis=1)

  def accuracy(self) -> np.ndarray:
    return self.correct.mean(axis=1)

  def points(self) -> list[dict]:
    """One point per row: param {"lambda", "start" (a level name)}, cost, accuracy."""
    return [{"param": {"lambda": float(l), "start": self.ladder[q]}, "cost": float(c),
             "accuracy": float(a)}
            for l, q, c, a in zip(self.lambdas, self.starts, self.mean_cost(), self.accuracy())]


class Decision(NamedTuple):
  """The family's arrays a gate's decision reads: a `PathFamily`'s, as a pytree.

  `step` takes a `PathFamily` or this; the runtime passes this to its compiled
  program as an argument (as `jax.numpy` arrays), so another cost model changes
  the program's inputs, not the program.
  """

  cand_cost: np.ndarray  # [S, C] ΔC of each candidate
  cand_mask: np.ndarray  # [S, C] candidates a state may take
  reference: np.ndarray  # [S] the reference slot (`PathFamily.reference`)
  child: np.ndarray      # [S, Q] the state one segment on at level q

  @classmethod
  def of(cls, family: PathFamily, xp=np) -> "Decision":
    return cls(*(xp.asarray(getattr(family, f)) for f in cls._fields))

  @property
  def num_gates(self) -> int:
    """From the shapes (static under jit): C = 1 + Q * G candidate slots."""
    return (self.cand_cost.shape[-1] - 1) // self.child.shape[-1]


def choose(errors, dcost, mask, lam, tau: float = SOFT_FLOOR, ref=None, xp=np):
  """Index of argmin_c floored errors + lam * dcost over valid c, ties to larger dcost.

  errors, dcost, mask: [..., C] broadcastable; lam: broadcastable to [...];
  tau: the soft floor's temperature (0: a hard floor, max(ê_c, ê_ref));
  ref: [...] the reference slot (`PathFamily.reference`; default: the dearest).
  xp: the array namespace, numpy (the simulation) or jax.numpy (the runtime's program):
    written once against the operations both provide, so both decide alike. numpy
    computes in float64 (ΔC is float64), jax.numpy in float32 unless x64 is enabled.
  """
  if ref is None:
    ref = xp.argmax(xp.where(mask, dcost, -xp.inf), axis=-1)
  ref = xp.broadcast_to(ref, errors.shape[:-1])
  floor = xp.take_along_axis(errors, ref[..., None], axis=-1)
  is_ref = xp.arange(errors.shape[-1]) == ref[..., None]
  d = errors - floor
  d = tau * xp.logaddexp(0.0, d / tau) if tau > 0 else xp.maximum(d, 0.0)
  score = floor + xp.where(is_ref, 0.0, d) + xp.asarray(lam)[..., None] * dcost
  score = xp.where(mask, score, xp.inf)
  best = score.min(axis=-1, keepdims=True)
  tied = score <= best + 1e-12 * xp.maximum(1.0, xp.abs(best))
  return xp.argmax(xp.where(tied, dcost, -xp.inf), axis=-1)


def step(family: PathFamily | Decision, cur, errors, lam, tau: float = SOFT_FLOOR, xp=np):
  """One gate's decision for samples in states `cur` (any shape) with predicted errors
  [..., C] and trade-offs `lam` (same shape as cur): (exiting, next state; cur where exiting).

  The simulation (through `decide`) and the runtime's compiled program both decide
  through this function, in jax.numpy and float32 (`start_levels` runs `choose` in numpy).
  """
  d = family if isinstance(family, Decision) else Decision.of(family)
  choice = choose(errors, d.cand_cost[cur], d.cand_mask[cur], lam, tau, d.reference[cur], xp)
  exiting = choice == EXIT
  level = xp.maximum(choice - 1, 0) // d.num_gates
  return exiting, xp.where(exiting, cur, d.child[cur, level])


@functools.partial(jax.jit, static_argnames="tau")
def _jitted_step(decision: Decision, cur, errors, lam, tau: float):
  return step(decision, cur, errors, lam, tau, xp=jnp)


def decide(family: PathFamily, cur: np.ndarray, errors: np.ndarray, lam: np.ndarray,
           tau: float = SOFT_FLOOR) -> tuple[np.ndarray, np.ndarray]:
  """`step` as the runtime's compiled program computes it: jax.numpy, float32, jitted.

  The simulation decides through this, so that it and the runtime break near-ties alike:
  budget mode's λ sit where tied samples (the same predicted errors) switch together, and
  there a float64 decision and a float32 one can part for the whole group.
  """
  exiting, nxt = _jitted_step(Decision.of(family), np.asarray(cur, np.int32),
                              np.asarray(errors, np.float32), np.asarray(lam, np.float32),
                              tau=float(tau))
  return np.asarray(exiting), np.asarray(nxt).astype(np.int64)


def start_errors(fit: StateTable) -> np.ndarray:
  """[num_start_levels, G] population error rate (fit split) of each constant-level path."""
  err = 1.0 - fit.accuracy()
  return np.stack([err[fit.family.chain(q)] for q in fit.family.start_levels])


def start_levels(family: PathFamily, population_err: np.ndarray, lambdas: np.ndarray,
                 tau: float = SOFT_FLOOR) -> np.ndarray:
  """Root state chosen before block 1 for each λ [L]."""
  chains = np.stack([family.chain(q) for q in family.start_levels])  # [start levels, G]
  roots, cost = chains[:, 0], family.cost[chains]
  flat_err, flat_cost = population_err.reshape(-1), cost.reshape(-1)
  if not family.cand_mask[roots, EXIT].any():  # quant_only: only full depth counts
    valid = np.tile(np.arange(family.num_gates) == family.num_gates - 1, len(family.start_levels))
  else:
    valid = np.ones_like(flat_err, bool)
  ref = None  # without the full model's own path among them: the dearest (`choose`)
  if family.top in family.start_levels:
    ref = np.array([family.start_levels.index(family.top) * family.num_gates + family.num_gates - 1])
  lam = np.asarray(lambdas, np.float64)
  choice = choose(flat_err[None], flat_cost[None], valid[None], lam, tau, ref)
  return roots[choice // family.num_gates]


def check_starts(family: PathFamily, starts, num: int, arg: str = "starts") -> np.ndarray:
  """[num] level indices from None, a level (name or index) or one per row; each must be a
  start level of `family`. None gives -1 (the λ rule of `start_levels`)."""
  if starts is None:
    return np.full(num, -1, np.int64)
  raw = np.asarray(starts)
  if raw.ndim == 0:
    raw = np.full(num, raw.item(), dtype=object)
  if raw.shape != (num,):
    raise ValueError(f"{arg}: expected a level or one per row ({num}), got shape {raw.shape}")
  if raw.dtype.kind not in "iu":  # names, or names and indices mixed
    # A list keeps its items' types (numpy turns mixed names and indices into names).
    values = list(starts) if isinstance(starts, (list, tuple)) else raw.tolist()
    values = [precision.canonical_name(v) if isinstance(v, str) else v for v in values]
    unknown = sorted({v for v in values if isinstance(v, str)} - set(family.ladder))
    if unknown:
      raise ValueError(f"{arg}: unknown level(s) {unknown}; the ladder is {list(family.ladder)}")
    if not all(isinstance(v, (str, int, np.integer)) and not isinstance(v, bool) for v in values):
      raise ValueError(f"{arg}: expected level names or indices, got {raw.dtype} values")
    raw = np.array([family.ladder.index(v) if isinstance(v, str) else int(v) for v in values],
                   np.int64)
  bad = sorted(set(raw.tolist()) - set(family.start_levels))
  if bad:
    raise ValueError(f"{arg}: {bad} are not start levels of this family"
                     f" ({[family.ladder[q] for q in family.start_levels]})")
  return raw.astype(np.int64)


def simulate(table: StateTable, predicted: np.ndarray, population_err: np.ndarray,
             lambdas: np.ndarray, *, tau: float = SOFT_FLOOR, starts=None) -> PolicyResult:
  """Runs the policy for every λ over a state table.

  Args:
    table: the states of every sample (test, cal, ...).
    predicted: [S, N, C] predicted error probabilities for this table.
    population_err: `start_errors` of the fit table (the start level where
      `starts` leaves it open).
    lambdas: [L] non-negative trade-offs.
    tau: the soft floor's temperature (see the module docstring).
    starts: the start level of each row: None (`start_levels` picks it from λ),
      a level name or index for every row, or one per row [L].
  """
  fam = table.family
  lambdas = np.asarray(lambdas, np.float64)
  if lambdas.ndim != 1 or (lambdas < 0).any() or not np.isfinite(lambdas).all():
    raise ValueError(f"lambdas: expected a 1-D array of finite values >= 0, got {lambdas}")
  if predicted.shape != (fam.num_states, table.num_samples, len(fam.candidates)):
    raise ValueError(f"predicted: expected shape {(fam.num_states, table.num_samples, len(fam.candidates))},"
                     f" got {predicted.shape}")
  L, N = len(lambdas), table.num_samples
  if not (np.isfinite(tau) and tau >= 0):
    raise ValueError(f"tau: expected a finite value >= 0, got {tau}")
  roots = start_states(fam, population_err, lambdas, check_starts(fam, starts, L), tau)
  cur = np.repeat(roots[:, None], N, axis=1)  # [L, N]
  done = np.zeros((L, N), bool)
  cols = np.arange(N)[None, :]
  lam = np.repeat(lambdas[:, None], N, axis=1)
  for _ in range(fam.num_gates):
    exiting, nxt = decide(fam, cur, predicted[cur, cols], lam, tau)
    done = exiting | done
    if done.all():
      break
    cur = np.where(done, cur, nxt)
  if not done.all():
    raise AssertionError("policy: a sample passed the last gate without exiting")
  return PolicyResult(ladder=tuple(fam.ladder), lambdas=lambdas, starts=fam.level[roots],
                      exit_state=cur, pred=table.pred[cur, cols],
                      correct=table.correct[cur, cols], cost=fam.cost[cur])


def start_states(family: PathFamily, population_err: np.ndarray, lambdas: np.ndarray,
                 starts: np.ndarray, tau: float = SOFT_FLOOR) -> np.ndarray:
  """[L] root state of each row: block 1 at its start level (`check_starts` indices), or
  where that is -1 at the level `start_levels` picks for the row's λ.

  `simulate` and the runtime both start samples through this function.
  """
  roots = np.full(len(starts), -1, np.int64)
  for q in np.unique(starts[starts >= 0]):
    roots[starts == q] = family.chain(int(q))[0]
  rule = starts < 0
  if rule.any():
    roots[rule] = start_levels(family, population_err, np.asarray(lambdas)[rule], tau)
  return roots


def operating_grid(family: PathFamily, lambdas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(lambdas, starts) [len(start_levels) * L]: every start level with every λ."""
  lambdas = np.asarray(lambdas, np.float64)
  starts = np.repeat(np.asarray(family.start_levels, np.int64), len(lambdas))
  return np.tile(lambdas, len(family.start_levels)), starts


def lambda_grid(family: PathFamily, num: int = 96) -> np.ndarray:
  """0 followed by log-spaced λ from where costs barely matter to where only cost does.

  The low end reaches the soft floor's small penalties (τ e^(d/τ) for paths
  predicted clearly better than the reference).
  """
  dc = family.cand_cost[family.cand_mask & (family.cand_cost > 0)]
  lo, hi = 1e-6 / max(dc.max(), 1e-12), 10.0 / max(dc.min(), 1e-12)
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


def _inside(mean_cost_fn, lam: float, up: bool, width: float = 1e-2, iters: int = 20) -> float:
  """λ moved off the jump the bisection stopped at, into its flat piece of the curve (going
  up, or down): by `width` (relative) if the mean cost stays the same there, else to the
  middle (in log space) of the piece, whose other end is found by bisection.

  The bisection leaves λ within ~1e-12 of a point where tied samples (the same predicted
  errors) change their decision together: closer than float32 resolves, so a runtime
  deciding in float32 (`runtime.program`) would take the other side for all of them.
  """
  if lam <= 0:
    return lam
  cost = mean_cost_fn(lam)
  far = lam * (1 + width) if up else lam / (1 + width)
  if mean_cost_fn(far) == cost:
    return float(far)
  near = lam  # same cost at near, another at far: the piece ends between them
  for _ in range(iters):
    mid = np.sqrt(near * far)
    if mean_cost_fn(mid) == cost:
      near = mid
    else:
      far = mid
  return float(np.sqrt(lam * near))


def budget_mix(mean_cost_fn, budget: float, hi: float = 1e6, iters: int = 40) -> BudgetMix:
  """The mix of the two λ around `budget` whose expected mean cost equals it (on cal)."""
  rich, lam = _bracket(mean_cost_fn, budget, hi, iters)
  lam, rich = _inside(mean_cost_fn, lam, up=True), _inside(mean_cost_fn, rich, up=False)
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
