"""QuEE and every baseline on fit / cal / test state tables: the results dict.

`evaluate(fit, cal, test, cfg)` trains the error predictors on the fit table
(for each seed and each QuEE variant), sweeps λ on test, picks λ on cal for
each budget, runs the baselines and oracles on the same tables, measures the
diagnostics, and returns what `results.json` holds (see `docs/method.md`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from typing import Sequence

import numpy as np

from quee_jax.core import paths

from quee_jax.gating import features, policy, predictor, targets

from quee_jax.protocol import baselines, diagnostics, metrics, synthetic
from quee_jax.protocol.metrics import REPORT_BUDGETS, budget_key
from quee_jax.core.paths import PathFamily
from quee_jax.core.table import StateTable

log = logging.getLogger(__name__)

# variant -> (family, target kind)
VARIANTS = {
    "quee": (None, "soft"),
    "quee_raw_targets": (None, "raw"),
    "quee_exit_only": ("exit_only", "soft"),
    "quee_quant_only": ("quant_only", "soft"),
}


# Saved runs hold results computed by this code: a change to what they contain (e.g. the
# operating points swept) bumps it, so that `evaluate` recomputes them rather than load them.
RESULTS_VERSION = 4  # 4: clusters weighted by relevance (targets.py)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
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
    lambdas, starts = policy.operating_grid(self.family, policy.lambda_grid(self.family, num_lambdas))
    return self.simulate(table, split, lambdas, starts)


@dataclasses.dataclass(frozen=True)
class BudgetPoint:
  """An operating point chosen on cal for a budget: a start level and a λ mix."""

  start: int             # level index
  mix: policy.BudgetMix  # the two λ and the probability of the dearer one

  def outcomes(self, fitted: Fitted, table: StateTable, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Per sample of `table`: (cost, correctness), in expectation over the per-sample coin."""
    mix, q = self.mix, self.start
    both = fitted.simulate(table, split, [mix.lam, mix.lam_rich], [q, q])
    weights = np.array([1 - mix.p_rich, mix.p_rich])
    return weights @ both.cost, weights @ both.correct.astype(np.float64)

  def expected(self, fitted: Fitted, table: StateTable, split: str) -> tuple[float, float]:
    """(mean cost, accuracy) on `table`, in expectation over the per-sample coin."""
    cost, correct = self.outcomes(fitted, table, split)
    return float(cost.mean()), float(correct.mean())


def budget_point(fitted: Fitted, cal: StateTable, budget: float) -> BudgetPoint:
  """Per start level the λ mix that spends `budget` on cal (`policy.budget_mix`); the best on cal.

  Start levels whose cheapest operating point already exceeds the budget on cal
  are passed over unless none reaches it (then the cheapest).
  """
  best = None
  for q in fitted.family.start_levels:
    mean_cost = lambda l: float(fitted.simulate(cal, "cal", [l], [q]).mean_cost()[0])
    point = BudgetPoint(q, policy.budget_mix(mean_cost, budget))
    cost, acc = point.expected(fitted, cal, "cal")
    within = cost <= budget * (1 + 1e-9)
    key = (within, acc if within else -cost)
    if best is None or key > best[0]:
      best = (key, point)
  return best[1]


def fit_clusters(fit: StateTable, seed: int, cfg: EvalConfig) -> np.ndarray:
  """[S, N] clusters of the fit samples at every state of the collected family."""
  return targets.clusters(features.build_features(fit, cluster_only=True),
                          targets.candidate_errors(fit), min_cluster=cfg.min_cluster,
                          max_clusters=cfg.max_clusters, seed=seed)


def _variant_family(base: PathFamily, family_name: str | None) -> PathFamily:
  return paths.build_family(family_name or base.name, base.ladder, base.exits, base.costs,
                            base.start_levels)


def fit_variant(tables: dict[str, StateTable], family_name: str | None, target_kind: str,
                seed: int, cfg: EvalConfig, assign: np.ndarray | None = None) -> Fitted:
  """Trains one variant's predictors on tables['fit'] and predicts on every table.

  assign: `fit_clusters` of tables['fit'] for this seed (computed if None); a
  sub-family's states reuse the clusters of the same histories.
  """
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
  params, history = predictor.train(x_fit, y, fam, pcfg)
  if cfg.shrink:
    val = history["val_samples"]
    raw = predictor.predict(params, x_fit[:, val], fam.gate, pcfg.level)
    params = {**params, "shrink": predictor.shrinkage(raw, errors[:, val], fam, errors)}
  return _with_predictions(fam, params, history, tables, pcfg, cfg.soft_floor)


def load_variant(tables: dict[str, StateTable], variant: str, seed: int, cfg: EvalConfig,
                 save_dir: str) -> Fitted:
  """A variant's predictors as `evaluate` saved them, with their predictions on every table."""
  if variant not in VARIANTS:
    raise ValueError(f"variant: expected one of {list(VARIANTS)}, got {variant!r}")
  path = os.path.join(save_dir, variant, f"seed_{seed}")
  if not os.path.isdir(path):
    raise ValueError(f"save_dir: no saved predictors at {path!r}; run the evaluate stage first")
  fam = _variant_family(tables["fit"].family, VARIANTS[variant][0])
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


def _budget_mode(fitted: Fitted, cal: StateTable, test: StateTable, budgets: Sequence[float],
                 naive: dict, fallback_z: float) -> dict:
  """(start level, λ mix) chosen on cal per budget; falls back to the naive combination unless
  QuEE's point beats it on cal by more than `fallback_z` standard errors of the paired difference.

  naive: the naive combination's budget mode, {budget key: `_best_mix` or None}.
  """
  out = {}
  for budget in budgets:
    key = budget_key(budget)
    naive_point = naive[key]
    point = budget_point(fitted, cal, budget)
    cal_cost, cal_correct = point.outcomes(fitted, cal, "cal")  # once: also the paired test's
    own = {"cal_cost": float(cal_cost.mean()), "cal_accuracy": float(cal_correct.mean())}
    own["test_cost"], own["test_accuracy"] = point.expected(fitted, test, "test")
    entry = {}
    fallback = naive_point is not None
    if fallback:
      gain, se = metrics.paired_gain(cal_correct, _mix_correct(cal, naive_point))
      fallback = not gain > fallback_z * se
      entry.update(cal_gain=gain, cal_gain_se=se)
    chosen = naive_point if fallback else own
    # The chosen operating point's numbers first; the policy's own mix beside them.
    entry.update({k: chosen[k] for k in own})
    mix = point.mix
    entry.update(fallback=fallback, policy={"start": fitted.family.ladder[point.start],
                                            "lambda": mix.lam, "lambda_rich": mix.lam_rich,
                                            "p_rich": mix.p_rich, **own}, naive=naive_point)
    out[key] = entry
  return out


def _mix_correct(table: StateTable, point: dict) -> np.ndarray:
  """Per sample of `table`, the expected correctness of a naive-combination mix (`_best_mix`)."""
  rows = np.arange(table.num_samples)
  correct = lambda param: table.correct[baselines.confidence_states_at(table, param), rows]
  p = point["p_rich"]
  return (1 - p) * correct(point["param"]) + p * correct(point["param_rich"])


def _run(fitted: Fitted, cal: StateTable, test: StateTable, naive: dict,
         cfg: EvalConfig, num_classes: int, details: bool) -> dict:
  """One seed of one variant on test: its λ sweep, summary and budget mode.

  details: also the diagnostics and calibration (reported for one run).
  """
  test_t = test.restrict(fitted.family)
  pts = fitted.sweep(test, "test", cfg.num_lambdas).points()
  run = {"points": pts, **metrics.summarize(pts, num_classes, cfg.budgets),
         "budget_mode": _budget_mode(fitted, cal, test, cfg.budgets, naive, cfg.fallback_z),
         "predictor_epochs": fitted.history["epochs"],
         "predictor_cost_per_gate": float(fitted.family.gate_overhead[0])}
  if details:
    err = targets.candidate_errors(test_t)
    mask = np.broadcast_to(fitted.family.cand_mask[:, None], err.shape)
    run["details"] = {
        "diagnostics": {"test": diagnostics.summary(test_t, fitted.predicted["test"]),
                        "cal": diagnostics.summary(cal.restrict(fitted.family),
                                                   fitted.predicted["cal"])},
        "calibration": {"ece_test": metrics.expected_calibration_error(
            fitted.predicted["test"][mask], err[mask])},
        "heads_and_predictors": float(fitted.family.costs.heads.sum()
                                      + fitted.family.gate_overhead.sum()),
    }
  # Through JSON, so that a fresh run and one loaded from disk are the same values.
  return json.loads(json.dumps(run))


def _fingerprint(fit: StateTable, cal: StateTable, test: StateTable, cfg: EvalConfig) -> str:
  """What saved runs depend on: the config, the family and each table's content."""
  h = hashlib.sha256(json.dumps([RESULTS_VERSION, dataclasses.asdict(cfg), test.family.spec()],
                                sort_keys=True, default=str).encode())
  for t in (fit, cal, test):
    for a in (t.labels, t.correct, t.logits, t.summary, *(t.features[k] for k in sorted(t.features))):
      if a is not None:
        h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def _claim(save_dir: str, fingerprint: str) -> None:
  """Empties save_dir unless it holds runs made with this fingerprint."""
  path = os.path.join(save_dir, "fingerprint.txt")
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == fingerprint:
        return
  if os.path.isdir(save_dir):
    shutil.rmtree(save_dir)
  os.makedirs(save_dir)
  with open(path, "w") as f:
    f.write(fingerprint)


def _write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f)
  os.replace(path + ".tmp", path)


def _best_mix(cal_points: list[dict], budget: float) -> dict | None:
  """The naive combination's budget mode, mixed as QuEE's is (`policy.BudgetMix`).

  Among pairs (a point within the budget on cal, a dearer one) mixed to spend
  the budget in expectation, or a point alone, the best on cal; its expected
  cal and test cost and accuracy. None if no point is within the budget.
  """
  get = lambda k: np.array([p[k] for p in cal_points], np.float64)
  cost, acc = get("cal_cost"), get("cal_accuracy")
  cheap = np.flatnonzero(cost <= budget + 1e-12)
  if not len(cheap):
    return None
  rich = np.concatenate([np.flatnonzero(cost > budget + 1e-12), cheap[:1]])  # + "no mix"
  w = policy.mix_weight(cost[cheap][:, None], cost[rich][None], budget)  # [cheap, rich]
  w[:, -1] = 0.0
  score = (1 - w) * acc[cheap][:, None] + w * acc[rich][None]
  i, j = np.unravel_index(np.argmax(score), score.shape)
  a, b, p = cal_points[cheap[i]], cal_points[rich[j]], float(w[i, j])
  return {"param": a["param"], "param_rich": b["param"] if p else a["param"], "p_rich": p,
          **{k: float((1 - p) * a[k] + p * b[k]) for k in ("cal_cost", "cal_accuracy",
                                                          "test_cost", "test_accuracy")}}


def _naive_on_cal(test_points: list[dict], cal: StateTable) -> list[dict]:
  """Every confidence-exit configuration (test points of all levels), also measured on cal."""
  out = []
  for p in test_points:
    on_cal = baselines.confidence_points_at(cal, p["param"])
    out.append({"param": p["param"], "cal_cost": on_cal["cost"], "cal_accuracy": on_cal["accuracy"],
                "test_cost": p["cost"], "test_accuracy": p["accuracy"]})
  return out


def _aggregate(per_seed: list[dict]) -> dict:
  """Mean and spread (max - min over seeds) of the summary numbers."""
  keys = ("auc", "auc_16", "min_cost")
  out = {k: float(np.mean([s[k] for s in per_seed])) for k in keys}
  out.update({f"{k}_spread": float(np.ptp([s[k] for s in per_seed])) for k in keys})
  out["acc_at_budget"] = {b: float(np.mean([s["acc_at_budget"][b] for s in per_seed]))
                          for b in per_seed[0]["acc_at_budget"]}
  return out


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
    _claim(save_dir, _fingerprint(fit, cal, test, cfg))
  num_classes = int(test.backbone.get("num_classes", test.labels.max() + 1))
  tables = {"fit": fit, "cal": cal, "test": test}
  full = baselines.full_model(test)
  methods: dict[str, dict] = {}

  static = baselines.static(test)
  methods["static"] = {"points": static, **metrics.summarize(static, num_classes, cfg.budgets)}
  envelope = []
  for q, level in enumerate(fam.ladder):
    pts = baselines.confidence_exit(fit, test, q)
    envelope += pts
    methods[f"ee_confidence@{level}"] = {"points": pts, **metrics.summarize(pts, num_classes, cfg.budgets)}
  methods["ee_confidence"] = {"points": metrics.pareto(envelope),
                              **metrics.summarize(envelope, num_classes, cfg.budgets)}
  for name, fn in (("oracle_path", baselines.path_oracle),
                   ("oracle_consistency", baselines.consistency_oracle)):
    pts = fn(test)
    methods[name] = {"points": metrics.pareto(pts), **metrics.summarize(pts, num_classes, cfg.budgets)}

  naive_cal = _naive_on_cal(envelope, cal)
  naive = {budget_key(b): _best_mix(naive_cal, b) for b in cfg.budgets}
  methods["ee_confidence"]["budget_mode"] = naive
  diag, calibration, heads_and_predictors = {}, {}, None
  assigns = {}  # seed -> clusters, shared by the variants with soft targets
  for variant in cfg.variants:
    family_name, kind = VARIANTS[variant]
    if family_name == "quant_only" and fam.name not in ("switch_once", "quant_only"):
      continue
    runs = []
    for seed in cfg.seeds:
      saved = save_dir and os.path.join(save_dir, variant, f"seed_{seed}.json")
      if saved and os.path.exists(saved):
        with open(saved) as f:
          run = json.load(f)
      else:
        log.info("%s: training predictors, seed %d", variant, seed)
        if kind == "soft" and seed not in assigns:
          assigns[seed] = fit_clusters(fit, seed, cfg)
        fitted = fit_variant(tables, family_name, kind, seed, cfg, assigns.get(seed))
        run = _run(fitted, cal, test, naive, cfg, num_classes,
                   details=seed == cfg.seeds[0] and variant == "quee")
        if saved:
          predictor.save(fitted.params, saved[:-len(".json")])
          _write_json(saved, run)
      details = run.pop("details", None)
      if details:
        diag, calibration = details["diagnostics"], details["calibration"]
        heads_and_predictors = details["heads_and_predictors"]
      runs.append({"seed": seed, **run})
    methods[variant] = {"points": runs[0]["points"], "seeds": runs, **_aggregate(runs),
                        "budget_mode": _mean_budget_mode([r["budget_mode"] for r in runs])}
    if variant == "quee":
      methods[variant]["calibration"] = calibration

  return {
      **(meta or {}),
      "split_sizes": {k: t.num_samples for k, t in tables.items()},
      "ladder": list(fam.ladder), "family": fam.name, "cost_unit": fam.costs.unit,
      "float_bits": fam.costs.float_bits, "seeds": list(cfg.seeds),
      "full_model": {"accuracy": full["accuracy"], "cost": full["cost"], "level": full["level"]},
      "overhead": {"heads_and_predictors_all_gates": heads_and_predictors},
      "methods": methods, "diagnostics": diag,
  }


def _mean_budget_mode(per_seed: Sequence[dict]) -> dict:
  out = {}
  for key in per_seed[0]:
    entries = [s[key] for s in per_seed]
    out[key] = {
        "test_cost": float(np.mean([e["test_cost"] for e in entries])),
        "test_accuracy": float(np.mean([e["test_accuracy"] for e in entries])),
        "test_accuracy_spread": float(np.ptp([e["test_accuracy"] for e in entries])),
        "cal_cost": float(np.mean([e["cal_cost"] for e in entries])),
        "fallbacks": int(sum(e["fallback"] for e in entries)),
        # QuEE's own cal-chosen mix, kept or not, and how much it won by on cal.
        "policy": {k: float(np.mean([e["policy"][k] for e in entries]))
                   for k in ("cal_cost", "test_cost", "test_accuracy")},
        "cal_gain": [e.get("cal_gain") for e in entries],
        "cal_gain_se": [e.get("cal_gain_se") for e in entries],
        "naive": entries[0]["naive"],
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
