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
RESULTS_VERSION = 5  # 5: decisions in float32 as the runtime takes them, budget λ off the jumps


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
  # Budget mode keeps QuEE's own point only if it beats the naive combination's on cal by more
  # than this many standard errors of the paired difference (1.645: one-sided 95%).
  fallback_z: float = 1.645

  def __post_init__(self):
    object.__setattr__(self, "budgets", metrics.check_budgets(self.budgets, "EvalConfig.budgets"))
    if not self.seeds:
      raise ValueError("seeds: expected at least one seed")
    if not (isinstance(self.soft_floor, (int, float)) and np.isfinite(self.soft_floor)
            and self.soft_floor >= 0):
      raise ValueError(f"soft_floor: expected a finite number >= 0, got {self.soft_floor!r}")
    if not (isinstance(self.fallback_z, (int, float)) and np.isfinite(self.fallback_z)
            and self.fallback_z >= 0):
      raise ValueError(f"fallback_z: expected a finite number >= 0, got {self.fallback_z!r}")
    unknown = set(self.variants) - set(VARIANTS)
    if unknown:
      raise ValueError(f"variants: unknown {sorted(unknown)}; expected some of {list(VARIANTS)}")
