"""A trained QuEE policy as the runtime takes it: predictors, their level, family, τ."""

from __future__ import annotations

import dataclasses

import numpy as np

from quee_jax.core import precision
from quee_jax.core.backbone import Backbone, Params
from quee_jax.core.cost import CostTable
from quee_jax.core.paths import PathFamily
from quee_jax.gating import features, policy


@dataclasses.dataclass(frozen=True)
class Gating:
  """What a trained QuEE policy is made of (everything but the backbone and λ).

  Attributes:
    family: the path family: states, candidates, and the costs ΔC is taken from.
    predictor: the per-gate MLPs (`predictor.train`), with their "shrink"
      calibration if the evaluation used one.
    predictor_level: the level the predictors run at (a name is parsed when the
      Gating is made).
    population_err: `policy.start_errors` of the fit table (the start level).
    tau: the decision rule's soft floor (`policy`).
  """

  family: PathFamily
  predictor: Params
  predictor_level: precision.Level
  population_err: np.ndarray
  tau: float = policy.SOFT_FLOOR

  def __post_init__(self):
    level = self.predictor_level
    try:
      object.__setattr__(self, "predictor_level", precision.parse_level(level))
    except ValueError:
      raise ValueError(f"predictor_level: expected a level name such as 'w8a8', got {level!r}"
                       ) from None

  @property
  def num_features(self) -> int:
    return int(np.shape(self.predictor["mean"])[0])

  @property
  def summary_dim(self) -> int:
    """Dimensions of the projected exit summary among the predictor's inputs."""
    return self.num_features - features.num_features(self.family, 0)

  def with_costs(self, costs: CostTable) -> "Gating":
    """The same predictors deciding with another cost model (e.g. `latency_costs`)."""
    return dataclasses.replace(self, family=self.family.with_costs(costs))


def gating_from_fitted(fitted, predictor_level: str | precision.Level) -> Gating:
  """A `Gating` from a `protocol.Fitted` (its family already counts the predictors)."""
  return Gating(fitted.family, fitted.params, predictor_level, fitted.population_err, fitted.tau)


def check_gating(backbone: Backbone, gating: Gating) -> None:
  """ValueError unless the gating's family and predictors fit the backbone."""
  fam, p = gating.family, gating.predictor
  if tuple(fam.exits) != tuple(backbone.exits):
    raise ValueError(f"gating: family built for exits {fam.exits},"
                     f" the backbone has {backbone.exits}")
  G, C, F = fam.num_gates, len(fam.candidates), gating.num_features
  for key, shape in (("w1", (G, F, None)), ("w2", (G, None, C))):
    got = np.shape(p[key])
    if len(got) != 3 or any(s is not None and s != g for s, g in zip(shape, got)):
      raise ValueError(f"gating: predictor {key} has shape {got}; the family needs {G} gates and"
                       f" {C} candidates (trained for another ladder or exits?)")
  if gating.summary_dim < 0 or (gating.summary_dim > 0 and backbone.summary is None):
    raise ValueError(f"gating: the predictor takes {F} features, which does not fit this"
                     f" backbone and family (trained for another ladder or exits?)")
  if np.shape(gating.population_err) != (len(fam.start_levels), G):
    raise ValueError(f"gating: population_err has shape {np.shape(gating.population_err)},"
                     f" expected {(len(fam.start_levels), G)}")
