"""The evaluation protocol: every method on the same fit / cal / test tables.

  baselines    full model, static levels, confidence exits (the naive combination), oracles
  metrics      log-budget auc, accuracy at budgets, AUROC, ECE
  diagnostics  when QuEE can win: exit-error AUROC, hurt/helped separability, flips
  synthetic    tables with a planted per-sample precision signal
  evaluation   QuEE's variants and every baseline -> the results dict (results.json)
  report       markdown tables of a results dict
  plotting     the accuracy-cost figure (imported on first use: it needs matplotlib)
"""

import importlib

from quee_jax.protocol import baselines, diagnostics, evaluation, metrics, report, synthetic
from quee_jax.protocol.evaluation import (RESULTS_VERSION, VARIANTS, BudgetPoint, EvalConfig,
                                          Fitted, budget_point, evaluate, fit_variant,
                                          load_variant, signal_recovery)


def __getattr__(name: str):
  if name == "plotting":  # matplotlib only where a figure is drawn
    return importlib.import_module("quee_jax.protocol.plotting")
  raise AttributeError(f"module 'quee_jax.protocol' has no attribute {name!r}")
