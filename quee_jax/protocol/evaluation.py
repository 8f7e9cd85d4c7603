"""QuEE and every baseline on fit / cal / test state tables: the results dict.

`evaluate(fit, cal, test, cfg)` trains the error predictors on the fit table
(for each seed and each QuEE variant), sweeps λ on test, picks λ on cal for
each budget, runs the baselines and oracles on the same tables, measures the
diagnostics, and returns what `results.json` holds (see `docs/method.md`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import numpy as np

from quee_jax.core import precision
from quee_jax.core.table import StateTable
from quee_jax.gating import targets
from quee_jax.protocol import baselines, diagnostics, metrics, storage, synthetic
from quee_jax.protocol.choice import (
  BudgetEntry,
  NaiveMix,
  Outcome,
  PolicyMix,
  budget_point,
  naive_budget_mode,
)
from quee_jax.protocol.config import VARIANTS, EvalConfig
from quee_jax.protocol.fitting import Fitted, fit_clusters, fit_variant
from quee_jax.protocol.metrics import budget_key
from quee_jax.protocol.storage import RunDetails, SeedRun

log = logging.getLogger(__name__)


def evaluate(fit: StateTable, cal: StateTable, test: StateTable, cfg: EvalConfig = EvalConfig(),
             meta: dict | None = None, save_dir: str | None = None) -> dict:
  """Every method on the same tables; the content of results.json.

  save_dir: if given, each (variant, seed) run is saved as it finishes: its
    predictors (orbax) to save_dir/<variant>/seed_<k> and its results beside
    them as seed_<k>.json. A rerun on the same tables and config loads the
    saved runs instead of training again, so an interrupted evaluation resumes;
    anything saved for other tables or another config is deleted first.
  """
  fam = test.family
  for name, t in (("fit", fit), ("cal", cal)):
    if t.family.spec() != fam.spec():
      raise ValueError(f"{name}: table of another family/ladder/costs than the test table")
  if save_dir is not None:
    storage.claim(save_dir, storage.fingerprint(fit, cal, test, cfg))
  num_classes = int(test.backbone.get("num_classes", test.labels.max() + 1))
  tables = {"fit": fit, "cal": cal, "test": test}
  methods, envelope = _baselines(fit, test, cfg.budgets, num_classes)
  naive = naive_budget_mode(envelope, cal, cfg.budgets)
  methods["ee_confidence"]["budget_mode"] = {k: None if m is None else m.to_json()
                                             for k, m in naive.items()}
  details = None  # of the one run that reports them
  assigns = {}  # seed -> clusters, shared by the variants with soft targets
  for variant in cfg.variants:
    if VARIANTS[variant][0] == "quant_only" and fam.name not in ("switch_once", "quant_only"):
      continue
    runs = _variant_runs(variant, tables, naive, cfg, num_classes, save_dir, assigns)
    details = next((r.details for r in reversed(runs) if r.details is not None), details)
    methods[variant] = _variant_method(runs, cfg.seeds)
    if variant == "quee":
      methods[variant]["calibration"] = {} if details is None else details.calibration

  full = baselines.full_model(test)
  return {
      **(meta or {}),
      "split_sizes": {k: t.num_samples for k, t in tables.items()},
      "ladder": list(fam.ladder), "family": fam.name, "cost_unit": fam.costs.unit,
      "float_bits": fam.costs.float_bits, "seeds": list(cfg.seeds),
      "full_model": {"accuracy": full["accuracy"], "cost": full["cost"], "level": full["level"]},
      "overhead": {"heads_and_predictors_all_gates":
                   None if details is None else details.heads_and_predictors},
      "methods": methods, "diagnostics": {} if details is None else details.diagnostics,
  }


def _baselines(fit: StateTable, test: StateTable, budgets: Sequence[float],
               num_classes: int) -> tuple[dict[str, dict], list[dict]]:
  """(results.json's methods entry of every baseline and oracle, the confidence-exit points
  of every start level)."""
  summarize = lambda pts: metrics.summarize(pts, num_classes, budgets)
  static = baselines.static(test)
  methods = {"static": {"points": static, **summarize(static)}}
  envelope = []
  for q, level in enumerate(test.family.ladder):
    pts = baselines.confidence_exit(fit, test, q)
    envelope += pts
    methods[f"ee_confidence@{level}"] = {"points": pts, **summarize(pts)}
  methods["ee_confidence"] = {"points": metrics.pareto(envelope), **summarize(envelope)}
  for name, fn in (("oracle_path", baselines.path_oracle),
                   ("oracle_consistency", baselines.consistency_oracle)):
    pts = fn(test)
    methods[name] = {"points": metrics.pareto(pts), **summarize(pts)}
  return methods, envelope


def _variant_runs(variant: str, tables: dict[str, StateTable], naive: dict[str, NaiveMix | None],
                  cfg: EvalConfig, num_classes: int, save_dir: str | None,
                  assigns: dict[int, np.ndarray]) -> list[SeedRun]:
  """Every seed's run of a variant: loaded where save_dir holds it, else fitted (and saved).

  assigns: seed -> `fit_clusters`, filled as needed and shared between variants.
  """
  _, kind = VARIANTS[variant]
  runs = []
  for seed in cfg.seeds:
    run = storage.load_run(save_dir, variant, seed) if save_dir else None
    if run is None:
      log.info("%s: training predictors, seed %d", variant, seed)
      if kind == "soft" and seed not in assigns:
        assigns[seed] = fit_clusters(tables["fit"], seed, cfg)
      fitted = fit_variant(tables, variant, seed, cfg, assigns.get(seed))
      run = _run(fitted, tables["cal"], tables["test"], naive, cfg, num_classes,
                 details=seed == cfg.seeds[0] and variant == "quee")
      if save_dir:
        storage.save_run(save_dir, variant, seed, run, fitted.params)
    runs.append(run)
  return runs


def _run(fitted: Fitted, cal: StateTable, test: StateTable, naive: dict[str, NaiveMix | None],
         cfg: EvalConfig, num_classes: int, details: bool) -> SeedRun:
  """One seed of one variant on test: its λ sweep, summary and budget mode.

  details: also the diagnostics and calibration (reported for one run).
  """
  pts = fitted.sweep(test, "test", cfg.num_lambdas).points()
  run = SeedRun(points=pts, **metrics.summarize(pts, num_classes, cfg.budgets),
                budget_mode=_budget_mode(fitted, cal, test, cfg.budgets, naive, cfg.fallback_z),
                predictor_epochs=fitted.history["epochs"],
                predictor_cost_per_gate=float(fitted.family.gate_overhead[0]),
                details=_details(fitted, cal, test) if details else None)
  # Through JSON, so that a fresh run and one loaded from disk are the same values.
  return run.through_json()


def _details(fitted: Fitted, cal: StateTable, test: StateTable) -> RunDetails:
  """The diagnostics on test and cal, the predictors' calibration on test, the overhead."""
  fam = fitted.family
  test_t = test.restrict(fam)
  err = targets.candidate_errors(test_t)
  mask = np.broadcast_to(fam.cand_mask[:, None], err.shape)
  return RunDetails(
      diagnostics={"test": diagnostics.summary(test_t, fitted.predicted["test"]),
                   "cal": diagnostics.summary(cal.restrict(fam), fitted.predicted["cal"])},
      calibration={"ece_test": metrics.expected_calibration_error(
          fitted.predicted["test"][mask], err[mask])},
      heads_and_predictors=float(fam.costs.heads.sum() + fam.gate_overhead.sum()))


def _budget_mode(fitted: Fitted, cal: StateTable, test: StateTable, budgets: Sequence[float],
                 naive: dict[str, NaiveMix | None], fallback_z: float) -> dict[str, BudgetEntry]:
  """(start level, λ mix) chosen on cal per budget; falls back to the naive combination unless
  QuEE's point beats it on cal by more than `fallback_z` standard errors of the paired difference.

  naive: the naive combination's budget mode (`choice.naive_budget_mode`).
  """
  out = {}
  for budget in budgets:
    key = budget_key(budget)
    point = budget_point(fitted, cal, budget)
    cal_cost, cal_correct = point.outcomes(fitted, cal, "cal")  # once: also the paired test's
    outcome = Outcome(float(cal_cost.mean()), float(cal_correct.mean()),
                      *point.expected(fitted, test, "test"))
    own = PolicyMix(fitted.family.ladder[point.start], point.mix, outcome)
    naive_point = naive[key]
    if naive_point is None:
      out[key] = BudgetEntry(own, None, fallback=False)
      continue
    gain, se = metrics.paired_gain(cal_correct, naive_point.correct(cal))
    out[key] = BudgetEntry(own, naive_point, fallback=not gain > fallback_z * se, cal_gain=gain,
                           cal_gain_se=se)
  return out


def _variant_method(runs: Sequence[SeedRun], seeds: Sequence[int]) -> dict:
  """A variant's methods entry in results.json: its runs (without details) and their means."""
  per_seed = [{"seed": seed, **dataclasses.replace(run, details=None).to_json()}
              for seed, run in zip(seeds, runs)]
  return {"points": per_seed[0]["points"], "seeds": per_seed, **_aggregate(runs),
          "budget_mode": _mean_budget_mode([r.budget_mode for r in runs])}


def _aggregate(per_seed: Sequence[SeedRun]) -> dict:
  """Mean and spread (max - min over seeds) of the summary numbers."""
  keys = ("auc", "auc_16", "min_cost")
  out = {k: float(np.mean([getattr(s, k) for s in per_seed])) for k in keys}
  out.update({f"{k}_spread": float(np.ptp([getattr(s, k) for s in per_seed])) for k in keys})
  out["acc_at_budget"] = {b: float(np.mean([s.acc_at_budget[b] for s in per_seed]))
                          for b in per_seed[0].acc_at_budget}
  return out


def _mean_budget_mode(per_seed: Sequence[dict[str, BudgetEntry]]) -> dict:
  """Budget mode over seeds: means of the chosen points, fallbacks, QuEE's own points."""
  out = {}
  for key in per_seed[0]:
    entries = [s[key] for s in per_seed]
    chosen, own = [e.chosen for e in entries], [e.own.outcome for e in entries]
    naive = entries[0].naive
    out[key] = {
        "test_cost": float(np.mean([c.test_cost for c in chosen])),
        "test_accuracy": float(np.mean([c.test_accuracy for c in chosen])),
        "test_accuracy_spread": float(np.ptp([c.test_accuracy for c in chosen])),
        "cal_cost": float(np.mean([c.cal_cost for c in chosen])),
        "fallbacks": int(sum(e.fallback for e in entries)),
        # QuEE's own cal-chosen mix, kept or not, and how much it won by on cal.
        "policy": {k: float(np.mean([getattr(o, k) for o in own]))
                   for k in ("cal_cost", "test_cost", "test_accuracy")},
        "cal_gain": [e.cal_gain for e in entries],
        "cal_gain_se": [e.cal_gain_se for e in entries],
        "naive": None if naive is None else naive.to_json(),
    }
  return out


def signal_recovery(fit: StateTable, cal: StateTable, test: StateTable, level: str,
                    cfg: EvalConfig = EvalConfig(), save_dir: str | None = None) -> dict:
  """QuEE vs the naive combination on tables with a planted precision signal.

  See `quee_jax.protocol.synthetic`. The tables are restricted to two levels, the full
  model's and the planted one: with more, other levels may own the budgets where
  the planted one would pay (on the Fashion-MNIST ViT, w8a8 and w4a4 do for
  w2a4), and the check would test the ladder instead of the machinery. With the
  signal visible QuEE should beat the naive combination clearly and the switch
  diagnostics should show it; hidden, both should fall back to the envelope.
  """
  top = fit.family.ladder[fit.family.top]
  level = precision.canonical_name(level)
  if level not in fit.family.ladder or level == top:
    raise ValueError(f"level: expected a level of {list(fit.family.ladder)} other than the full"
                     f" model's {top!r}, got {level!r}")
  pair = fit.family.on_levels((top, level))
  fit, cal, test = (t.restrict(pair) for t in (fit, cal, test))
  out = {"level": level, "ladder": list(pair.ladder)}
  # Both kinds of target: a sharp per-sample signal that k-means clusters do not resolve is
  # averaged away by the discretized targets and kept by the raw ones.
  learned = ("quee", "quee_raw_targets")
  small = dataclasses.replace(cfg, variants=learned)
  for visible in (True, False):
    planted = [synthetic.plant_signal(t, level, seed=i, visible=visible)
               for i, t in enumerate((fit, cal, test))]
    res = evaluate(*planted, small, save_dir=save_dir and os.path.join(
        save_dir, "visible" if visible else "hidden"))
    naive = res["methods"]["ee_confidence"]
    switches = [e for e in res["diagnostics"]["test"]["switch_signal"]
                if e["gate"] == 0 and e["from"] == top and e["to"] == level]
    out["visible" if visible else "hidden"] = {
        **{v: {k: res["methods"][v][k] for k in ("auc", "auc_16", "auc_spread", "auc_16_spread",
                                                 "min_cost", "acc_at_budget", "budget_mode")}
           for v in learned},
        "naive": {k: naive[k] for k in ("auc", "auc_16", "min_cost", "acc_at_budget")},
        "switch_after_first_block": switches[0] if switches else None,
    }
  return out
