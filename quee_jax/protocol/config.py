"""What an evaluation runs: its settings (`EvalConfig`), QuEE's variants, the results version."""

from __future__ import annotations

import dataclasses

import numpy as np

from quee_jax.gating import policy, predictor
from quee_jax.protocol import metrics
from quee_jax.protocol.metrics import REPORT_BUDGETS

# variant -> (family, target kind)
VARIANTS = {
    "quee": (None, "soft"),
    "quee_raw_targets": (None, "raw"),
    "quee_exit_only": ("exit_only", "soft"),
    "quee_quant_only": ("quant_only", "soft"),
}


# Saved runs hold results computed by this code: a change to what they contain (e.g. the
# operating points swept) bumps it, so that `evaluate` recomputes them rather than load them.
# 5: decisions in float32 as the runtime takes them, budget λ off the jumps.
# 6: curves chosen on cal, risk control, budget mode's fallback by a valid paired test.
RESULTS_VERSION = 6


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """How `evaluate` fits, sweeps and chooses: predictors, targets, policy and budget mode."""

  seeds: tuple[int, ...] = (0, 1, 2)
  predictor: predictor.PredictorConfig = predictor.PredictorConfig()
  min_cluster: int = 100
  max_clusters: int = 32
  alpha: float = 10.0
  num_lambdas: int = 96
  shrink: bool = True  # calibrate per-sample differences between candidates (predictor.shrinkage)
  soft_floor: float = policy.SOFT_FLOOR  # the policy's τ (policy module docstring)
  variants: tuple[str, ...] = tuple(VARIANTS)
  budgets: tuple[float, ...] = REPORT_BUDGETS  # budget mode's targets, fractions of the full cost
  # Risk control's level: each certified promise fails with probability at most risk_eps over
  # the draw of cal; budget mode keeps QuEE's own point only where a paired test at this level
  # certifies it more accurate than the naive combination's.
  risk_eps: float = 0.1
  # The accuracy drops (fractions) the results' risk section certifies points for.
  risk_deltas: tuple[float, ...] = (0.0025, 0.005, 0.01)
  # Predictor inputs (`features.feature_names`) the predictors and clusters may not see: the
  # planted-signal check's blind control hides the post-switch features this way.
  blind_features: tuple[str, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "budgets", metrics.check_budgets(self.budgets, "EvalConfig.budgets"))
    if not self.seeds:
      raise ValueError("seeds: expected at least one seed")
    if not (isinstance(self.soft_floor, (int, float)) and np.isfinite(self.soft_floor)
            and self.soft_floor >= 0):
      raise ValueError(f"soft_floor: expected a finite number >= 0, got {self.soft_floor!r}")
    if isinstance(self.risk_eps, bool) or not (isinstance(self.risk_eps, (int, float))
                                                and 0 < self.risk_eps < 1):
      raise ValueError(f"risk_eps: expected a probability in (0, 1), got {self.risk_eps!r}")
    object.__setattr__(self, "risk_deltas", tuple(self.risk_deltas))
    if not self.risk_deltas or not all(
        isinstance(d, (int, float)) and not isinstance(d, bool) and 0 < d < 1
        for d in self.risk_deltas):
      raise ValueError(f"risk_deltas: expected accuracy drops in (0, 1) (0.005 = 0.5 point),"
                       f" got {self.risk_deltas!r}")
    object.__setattr__(self, "blind_features", tuple(self.blind_features))
    if not all(isinstance(f, str) for f in self.blind_features):
      raise ValueError(f"blind_features: expected feature names, got {self.blind_features!r}")
    unknown = set(self.variants) - set(VARIANTS)
    if unknown:
      raise ValueError(f"variants: unknown {sorted(unknown)}; expected some of {list(VARIANTS)}")
