"""QuEE's variants fitted on the fit table (or loaded as `evaluate` saved them), with predictions.

`Fitted` is one variant's family (with its predictors' overhead), its predictors and
their predictions on every table; it simulates the policy and sweeps its operating points.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from quee_jax.core import paths
from quee_jax.core.paths import PathFamily
from quee_jax.core.table import StateTable
from quee_jax.gating import features, policy, predictor, targets
from quee_jax.protocol.config import VARIANTS, EvalConfig


@dataclasses.dataclass
class Fitted:
  """A trained QuEE variant: its family (with predictor overhead) and predictions."""

  family: PathFamily
  params: dict
  history: dict
  population_err: np.ndarray
  predicted: dict  # split -> [S, N, C]
  tau: float       # the policy's soft floor

  def simulate(self, table: StateTable, split: str, lambdas, starts=None) -> policy.PolicyResult:
    """The policy on `table` (a table of split `split`, any family with these histories).

    starts: start level per λ (`policy.simulate`); None: the population-error rule.
    """
    return policy.simulate(table.restrict(self.family), self.predicted[split], self.population_err,
                           np.asarray(lambdas, np.float64), tau=self.tau, starts=starts)

  def sweep(self, table: StateTable, split: str, num_lambdas: int) -> policy.PolicyResult:
    """The accuracy-cost curve's operating points: every start level with every λ."""
    grid = policy.lambda_grid(self.family, num_lambdas)
    lambdas, starts = policy.operating_grid(self.family, grid)
    return self.simulate(table, split, lambdas, starts)


def predictors_path(save_dir: str, variant: str, seed: int) -> str:
  """Where `evaluate` saves a (variant, seed) run's predictors (its results: this + '.json')."""
  return os.path.join(save_dir, variant, f"seed_{seed}")


def blind_columns(table: StateTable, names) -> list[int]:
  """Indices of the named predictor inputs (`features.feature_names`); ValueError naming any
  name that is not one."""
  all_names = features.feature_names(table)
  unknown = [n for n in names if n not in all_names]
  if unknown:
    raise ValueError(f"blind_features: unknown {unknown}; expected some of {all_names}")
  return [all_names.index(n) for n in names]


def fit_clusters(fit: StateTable, seed: int, cfg: EvalConfig) -> np.ndarray:
  """[S, N] clusters of the fit samples at every state of the collected family (blind
  features held constant: they cannot shape the clusters)."""
  x = features.build_features(fit, cluster_only=True)
  blind = blind_columns(fit, cfg.blind_features)
  if blind:
    x = x.copy()
    x[..., blind] = 0.0
  return targets.clusters(x, targets.candidate_errors(fit), min_cluster=cfg.min_cluster,
                          max_clusters=cfg.max_clusters, seed=seed)


def _variant_family(base: PathFamily, family_name: str | None) -> PathFamily:
  return paths.build_family(family_name or base.name, base.ladder, base.exits, base.costs,
                            base.start_levels)


def _check_variant(variant: str) -> tuple[str | None, str]:
  """(family name or None for the collected one, target kind) of a variant name."""
  if variant not in VARIANTS:
    raise ValueError(f"variant: expected one of {list(VARIANTS)}, got {variant!r}")
  return VARIANTS[variant]


def fit_variant(tables: dict[str, StateTable], variant: str = "quee", seed: int = 0,
                cfg: EvalConfig = EvalConfig(), assign: np.ndarray | None = None) -> Fitted:
  """Trains one variant's predictors on tables['fit'] and predicts on every table.

  variant: a key of VARIANTS (its path family and kind of targets); seed: the
  predictor's and the clusters' seed. assign: `fit_clusters` of tables['fit'] for
  this seed (computed if None); a sub-family's states reuse the clusters of the
  same histories.
  """
  family_name, target_kind = _check_variant(variant)
  base = tables["fit"].family
  fam = _variant_family(base, family_name)
  fit = tables["fit"].restrict(fam)
  x_fit = features.build_features(fit)
  errors = targets.candidate_errors(fit)
  if target_kind == "soft":
    if assign is None:
      assign = fit_clusters(tables["fit"], seed, cfg)
    y = targets.soft_targets(errors, assign[base.rows_of(fam)], alpha=cfg.alpha)
  else:
    y = errors
  pcfg = dataclasses.replace(cfg.predictor, seed=seed)
  params, history = predictor.train(x_fit, y, fam, pcfg,
                                    blind=blind_columns(fit, cfg.blind_features))
  if cfg.shrink:
    val = history["val_samples"]
    raw = predictor.predict(params, x_fit[:, val], fam.gate, pcfg.level)
    params = {**params, "shrink": predictor.shrinkage(raw, errors[:, val], fam, errors)}
  return _with_predictions(fam, params, history, tables, pcfg, cfg.soft_floor)


def load_variant(tables: dict[str, StateTable], variant: str, seed: int, cfg: EvalConfig,
                 save_dir: str) -> Fitted:
  """A variant's predictors as `evaluate` saved them, with their predictions on every table."""
  family_name, _ = _check_variant(variant)
  path = predictors_path(save_dir, variant, seed)
  if not os.path.isdir(path):
    raise ValueError(f"save_dir: no saved predictors at {path!r}; run the evaluate stage first")
  fam = _variant_family(tables["fit"].family, family_name)
  pcfg = dataclasses.replace(cfg.predictor, seed=seed)
  return _with_predictions(fam, predictor.load(path), {}, tables, pcfg, cfg.soft_floor)


def _with_predictions(fam: PathFamily, params: dict, history: dict,
                      tables: dict[str, StateTable], pcfg: predictor.PredictorConfig,
                      tau: float) -> Fitted:
  num_features = params["mean"].shape[0]
  # The predictor's cost changes the states' costs, not their features.
  fam = fam.with_gate_overhead(predictor.gate_overhead(fam, num_features, pcfg))
  sub = {k: t.restrict(fam) for k, t in tables.items()}
  predicted = {k: predictor.predict(params, features.build_features(t), fam.gate, pcfg.level)
               for k, t in sub.items()}
  if "shrink" in params:
    predicted = {k: predictor.apply_shrinkage(v, params["shrink"], fam)
                 for k, v in predicted.items()}
  return Fitted(fam, params, history, policy.start_errors(sub["fit"]), predicted, tau)
