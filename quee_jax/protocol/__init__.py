"""The evaluation protocol: every method on the same fit / cal / test tables.

  baselines    full model, static levels, confidence exits (the naive combination), oracles
  metrics      curves chosen on cal, read on test: log-budget auc, accuracy at budgets; AUROC, ECE
  diagnostics  when QuEE can win: exit-error AUROC, hurt/helped separability, flips
  synthetic    tables with a planted per-sample precision signal
  config       EvalConfig, QuEE's variants, the results version
  fitting      a QuEE variant's predictors fitted (or loaded) with their predictions: Fitted
  risk         risk control (Learn then Test): points certified at most δ below the full model
  choice       operating points chosen on cal: budget mode's (QuEE's, the naive one's), within δ
  storage      saved (variant, seed) runs (SeedRun) and the cache of them under predictors/
  evaluation   QuEE's variants and every baseline -> the results dict (results.json)
  report       markdown tables of a results dict
  plotting     the accuracy-cost figure (imported on first use: it needs matplotlib)
"""

import importlib

from quee_jax.protocol import (
  baselines,
  choice,
  config,
  diagnostics,
  evaluation,
  fitting,
  metrics,
  report,
  risk,
  storage,
  synthetic,
)
from quee_jax.protocol.choice import (
  BudgetEntry,
  BudgetPoint,
  Candidates,
  NaiveMix,
  Outcome,
  PolicyMix,
  budget_point,
  cheapest_within,
  pick,
  risk_choices,
  test_chosen,
)
from quee_jax.protocol.config import RESULTS_VERSION, VARIANTS, EvalConfig
from quee_jax.protocol.evaluation import evaluate, signal_recovery
from quee_jax.protocol.fitting import Fitted, fit_variant, load_variant
from quee_jax.protocol.storage import RunDetails, SeedRun


def __getattr__(name: str):
  if name == "plotting":  # matplotlib only where a figure is drawn
    return importlib.import_module("quee_jax.protocol.plotting")
  raise AttributeError(f"module 'quee_jax.protocol' has no attribute {name!r}")
