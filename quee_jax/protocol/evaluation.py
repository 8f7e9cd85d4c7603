"""QuEE and every baseline on fit / cal / test state tables: the results dict.

`evaluate(fit, cal, test, cfg)` trains the error predictors on the fit table
(for each seed and each QuEE variant), sweeps their operating points on cal and
test, chooses on cal (each budget's point on the curves, budget mode, the points
risk control certifies) and reports on test, runs the baselines and oracles on
the same tables, measures the diagnostics, and returns what `results.json`
holds (see `docs/method.md`).
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
  Z_RULE,
  BudgetEntry,
  Candidates,
  NaiveMix,
  Outcome,
  PolicyMix,
  better_pvalue,
  budget_point,
  naive_budget_mode,
  risk_choices,
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
  methods, confidence = _baselines(fit, cal, test, cfg.budgets, num_classes)
  naive = naive_budget_mode(confidence, cfg.budgets)
  methods["ee_confidence"]["budget_mode"] = {k: None if m is None else m.to_json()
                                             for k, m in naive.items()}
  methods["ee_confidence"]["risk"] = risk_choices(
      Candidates.of_confidence(confidence, fit, cal), baselines.full_model(cal)["correct"],
      baselines.full_model(test)["accuracy"], cfg.risk_deltas, cfg.risk_eps)
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
      "split_sizes": {k: t.num_samples for k, t in tables.items()}, "num_classes": num_classes,
      "ladder": list(fam.ladder), "family": fam.name, "cost_unit": fam.costs.unit,
      "float_bits": fam.costs.float_bits, "seeds": list(cfg.seeds),
      "full_model": {"accuracy": full["accuracy"], "cost": full["cost"], "level": full["level"]},
      "overhead": {"heads_and_predictors_all_gates":
                   None if details is None else details.heads_and_predictors},
      "methods": methods, "diagnostics": {} if details is None else details.diagnostics,
      # Per δ and rule, the point each method's rule picks on cal (`choice.risk_choices`).
      "risk": {"eps": cfg.risk_eps, "methods": {k: m["risk"] for k, m in methods.items()
                                                if "risk" in m}},
  }


def _baselines(fit: StateTable, cal: StateTable, test: StateTable, budgets: Sequence[float],
               num_classes: int) -> tuple[dict[str, dict], list[dict]]:
  """(results.json's methods entry of every baseline and oracle, the confidence-exit points
  of every level with their cal and test numbers: the naive combination's)."""
  summarize = lambda pts: metrics.summarize(pts, num_classes, budgets)
  static = metrics.with_cal(baselines.static(test), baselines.static(cal))
  methods = {"static": {"points": static, **summarize(static)}}
  confidence = []
  for q, level in enumerate(test.family.ladder):
    # Thresholds fitted on fit once, applied to test and to cal.
    pts = baselines.confidence_exit(fit, test, q)
    pts = metrics.with_cal(pts, [baselines.confidence_points_at(cal, p["param"]) for p in pts])
    confidence += pts
    methods[f"ee_confidence@{level}"] = {"points": pts, **summarize(pts)}
  methods["ee_confidence"] = {"points": confidence, **summarize(confidence)}
  # The oracles know the test outcomes: they choose on test by definition.
  for name, fn in (("oracle_path", baselines.path_oracle),
                   ("oracle_consistency", baselines.consistency_oracle)):
    pts = fn(test)
    methods[name] = {"points": metrics.pareto(pts),
                     **metrics.envelope(pts, num_classes, budgets)}
  return methods, confidence


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
      run = _run(fitted, tables, naive, cfg, num_classes,
                 details=seed == cfg.seeds[0] and variant == "quee")
      if save_dir:
        storage.save_run(save_dir, variant, seed, run, fitted.params)
    runs.append(run)
  return runs


def _run(fitted: Fitted, tables: dict[str, StateTable], naive: dict[str, NaiveMix | None],
         cfg: EvalConfig, num_classes: int, details: bool) -> SeedRun:
  """One seed of one variant: its operating points on cal and test, the curve, budget mode and
  risk control chosen on cal.

  details: also the diagnostics and calibration (reported for one run).
  """
  cal, test = tables["cal"], tables["test"]
  sweeps = {k: fitted.sweep(t, k, cfg.num_lambdas) for k, t in tables.items()}
  pts = metrics.with_cal(sweeps["test"].points(), sweeps["cal"].points())
  fit_full = baselines.full_model(tables["fit"])["accuracy"]
  risk = risk_choices(Candidates.of_sweeps(sweeps["fit"], sweeps["cal"], sweeps["test"], fit_full),
                      baselines.full_model(cal)["correct"], baselines.full_model(test)["accuracy"],
                      cfg.risk_deltas, cfg.risk_eps)
  run = SeedRun(points=pts, summary=metrics.summarize(pts, num_classes, cfg.budgets),
                budget_mode=_budget_mode(fitted, cal, test, cfg.budgets, naive, cfg.risk_eps),
                risk=risk, predictor_epochs=fitted.history["epochs"],
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
                 naive: dict[str, NaiveMix | None], eps: float) -> dict[str, BudgetEntry]:
  """(start level, λ mix) chosen on cal per budget; falls back to the naive combination unless
  a paired test on cal certifies QuEE's point more accurate at level eps (`better_pvalue`).

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
    naive_correct = naive_point.correct(cal)
    gain, se = metrics.paired_gain(cal_correct, naive_correct)
    p = better_pvalue(cal_correct, naive_correct, eps)
    out[key] = BudgetEntry(own, naive_point, fallback=p > eps, cal_gain=gain, cal_gain_se=se,
                           p_value=p, z_rule_fallback=not gain > Z_RULE * se)
  return out


def _variant_method(runs: Sequence[SeedRun], seeds: Sequence[int]) -> dict:
  """A variant's methods entry in results.json: its runs (without details) and their means."""
  per_seed = [{"seed": seed, **dataclasses.replace(run, details=None).to_json()}
              for seed, run in zip(seeds, runs)]
  return {"points": per_seed[0]["points"], "seeds": per_seed, **_aggregate(runs),
          "budget_mode": _mean_budget_mode([r.budget_mode for r in runs])}


def _aggregate(per_seed: Sequence[SeedRun]) -> dict:
  """Means over seeds of the summary numbers, spreads (max - min) of the aucs and min cost, and
  risk control's choices."""
  summaries = [s.summary for s in per_seed]
  keys = ("auc", "auc_16", "min_cost", "auc_test_envelope", "auc_16_test_envelope")
  out = {k: float(np.mean([s[k] for s in summaries])) for k in keys}
  out.update({f"{k}_spread": float(np.ptp([s[k] for s in summaries]))
              for k in ("auc", "auc_16", "min_cost")})
  for k in ("acc_at_budget", "acc_at_budget_test_envelope"):
    out[k] = {b: float(np.mean([s[k][b] for s in summaries])) for b in summaries[0][k]}
  # A budget no seed's cal reaches has no cost; otherwise the mean over the seeds that do.
  out["cost_at_budget"] = {b: _mean_or_none([s["cost_at_budget"][b] for s in summaries])
                           for b in summaries[0]["cost_at_budget"]}
  out["curve"] = _mean_curve([s["curve"] for s in summaries])
  out["risk"] = _mean_risk([s.risk for s in per_seed])
  return out


def _mean_curve(per_seed: Sequence[list]) -> list[list[float]]:
  """The curves' mean test cost and accuracy per budget, over the seeds whose cal reaches it."""
  by_budget = {}
  for curve in per_seed:
    for b, c, a in curve:
      by_budget.setdefault(b, []).append((c, a))
  return [[b, float(np.mean([c for c, _ in v])), float(np.mean([a for _, a in v]))]
          for b, v in sorted(by_budget.items(), reverse=True)]


def _mean_or_none(values: Sequence[float | None]) -> float | None:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def _mean_risk(per_seed: Sequence[dict]) -> dict:
  """Risk control over seeds: per δ and rule, the mean test cost and drop of the chosen points,
  the worst seed's drop, and how many seeds have one."""
  out = {}
  for delta, rules in per_seed[0].items():
    out[delta] = {}
    for rule in rules:
      picked = [s[delta][rule] for s in per_seed if s[delta][rule] is not None]
      out[delta][rule] = None if not picked else {
          "test_cost": float(np.mean([p["test_cost"] for p in picked])),
          "cal_cost": float(np.mean([p["cal_cost"] for p in picked])),
          "test_drop": float(np.mean([p["test_drop"] for p in picked])),
          "test_drop_max": float(max(p["test_drop"] for p in picked)),
          "seeds": len(picked)}
  return out


def _mean_budget_mode(per_seed: Sequence[dict[str, BudgetEntry]]) -> dict:
  """Budget mode over seeds: means of the chosen points, fallbacks, QuEE's own points, and what
  the z-rule of earlier versions would have run."""
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
        # QuEE's own cal-chosen mix, kept or not, and the paired test on cal.
        "policy": {k: float(np.mean([getattr(o, k) for o in own]))
                   for k in ("cal_cost", "test_cost", "test_accuracy")},
        "cal_gain": [e.cal_gain for e in entries],
        "cal_gain_se": [e.cal_gain_se for e in entries],
        "p_value": [e.p_value for e in entries],
        "z_rule": {"fallbacks": int(sum(bool(e.z_rule_fallback) for e in entries)),
                   "test_accuracy": float(np.mean([e.z_rule_chosen.test_accuracy
                                                   for e in entries]))},
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

  Three cases: "visible" (the planted variable is a feature), "hidden" (it is not, but the
  post-switch features, recomputed from the planted outcome, still tell a switch that hurt:
  real information at run time, read after the switch) and "hidden_blind" (hidden, and the
  predictors blind to the post-switch features, `POST_SWITCH`): the "no signal" control.
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
  for case, visible, blind in (("visible", True, ()), ("hidden", False, ()),
                               ("hidden_blind", False, POST_SWITCH)):
    small = dataclasses.replace(cfg, variants=learned, blind_features=blind)
    planted = [synthetic.plant_signal(t, level, seed=i, visible=visible)
               for i, t in enumerate((fit, cal, test))]
    res = evaluate(*planted, small, save_dir=save_dir and os.path.join(save_dir, case))
    naive = res["methods"]["ee_confidence"]
    test_diag = res["diagnostics"]["test"]
    switches = [e for e in test_diag["switch_signal"]
                if e["gate"] == 0 and e["from"] == top and e["to"] == level]
    out[case] = {
        **{v: {k: res["methods"][v][k] for k in ("auc", "auc_16", "auc_spread", "auc_16_spread",
                                                 "min_cost", "acc_at_budget", "budget_mode")}
           for v in learned},
        "naive": {k: naive[k] for k in ("auc", "auc_16", "min_cost", "acc_at_budget")},
        "switch_after_first_block": switches[0] if switches else None,
        # How well QuEE's predictions rank exit errors per gate: after a switch, the
        # post-switch features are what can reveal a planted harm.
        "exit_auroc": test_diag["exit_auroc"],
    }
  return out


# The features computed after a level change from the exits before and after it
# (`features.assemble`): what the planted-signal check's blind control hides.
POST_SWITCH = ("agree_switch", "dconf_switch")
