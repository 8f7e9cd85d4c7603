r"""Do the cal rules keep their promise? How often a point chosen on cal loses more than δ.

  python -m experiments.analysis.risk_validity --workdir /tmp/quee_fm
  python -m experiments.analysis.risk_validity --workdir /tmp/quee_minilm --draws 2000
  python -m experiments.analysis.risk_validity --workdir /tmp/quee_fm --pvalues hoeffding_bentkus

A rule picks, on cal, the cheapest operating point whose accuracy drop against the full model
it deems at most δ. Which rule keeps that promise is a question about cal's sampling noise, so
this measures it: the cal and test splits of a finished work directory, pooled, stand for the
population; `--draws` times a cal set of the configured cal size is drawn from the pool
without replacement, each rule picks a point on it, and the picked point's drop on the whole
pool (its population drop) is compared with δ. The rules:

  certified  risk control, as `protocol.choice.pick` applies it: Learn then Test on the
             per-sample drops (`--pvalues`, betting by default; fixed-sequence testing in
             `risk.safest_first` order of the fit split, level `--eps`). Promises
             P(population drop > δ) ≤ ε.
  z_rule     `protocol.choice.cheapest_within` with z = 1.645: the paired cal difference's
             mean minus z standard errors within -δ, for each point on its own.
  mean_only  the same with z = 0: the cal mean alone.

A rule that picks nothing falls back to the full model (drop 0, its cost). For each method —
QuEE (the `quee` variant's saved predictors of the first eval seed, its sweep of operating
points) and the naive combination (the confidence-exit configurations of every level, thresholds
fitted on fit, costs without predictors) — and each δ of `--deltas` it prints the fraction of
draws whose picked point's population drop exceeds δ (± its binomial standard error), the mean
population cost and drop of the picked point (the price of the promise), the fraction of
draws that picked nothing, and the cheapest point whose population drop is at most δ (what a
rule that knew the population would pick). Drawing without replacement from a pool three
times the cal set's size varies less than i.i.d. sampling, so the violation rates are if anything
below those of a fresh cal set. The last line printed is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np

from quee_jax.protocol import choice


def validity(population_correct: np.ndarray, population_cost: np.ndarray,
             full_correct: np.ndarray, fit_drop: np.ndarray, fit_cost: np.ndarray,
             cal_size: int, deltas: Sequence[float], eps: float, draws: int,
             rng: np.random.Generator, full_cost: float, pvalues: str = "betting") -> dict:
  """Each rule's violation rate and price over `draws` cal sets drawn from a population.

  population_correct, population_cost: [K, P] per-sample correctness (fractional allowed) and
  cost of K operating points on the P samples of the population; full_correct: [P] the full
  model's; fit_drop, fit_cost: [K] each point's accuracy drop and mean cost measured without
  the population (the certified rule's testing order); full_cost: the full model's cost, which
  a rule that picks nothing runs. Per δ (key f"{δ:g}"): "oracle_cost" (the cheapest point whose
  population drop is at most δ; the full model's cost if none is) and per rule
  (`choice.RULES`) "violation" (fraction of draws whose picked point's population drop exceeds
  δ), "violation_se", "mean_cost", "mean_drop" and "none" (fraction of draws that picked
  nothing).
  """
  correct = np.asarray(population_correct, np.float64)
  cost = np.asarray(population_cost, np.float64)
  full = np.asarray(full_correct, np.float64)
  if correct.ndim != 2 or cost.shape != correct.shape or full.shape != correct.shape[1:]:
    raise ValueError(f"population_correct, population_cost, full_correct: expected shapes"
                     f" [K, P], [K, P] and [P], got {correct.shape}, {cost.shape}, {full.shape}")
  K, P = correct.shape
  for name, a in (("fit_drop", fit_drop), ("fit_cost", fit_cost)):
    if np.shape(a) != (K,):
      raise ValueError(f"{name}: expected shape ({K},), got {np.shape(a)}")
  if not 2 <= cal_size <= P:
    raise ValueError(f"cal_size: expected 2..{P} (the population's size), got {cal_size}")
  if draws < 1:
    raise ValueError(f"draws: expected at least 1, got {draws}")
  if not deltas or not all(0 < d < 1 for d in deltas):
    raise ValueError(f"deltas: expected accuracy drops in (0, 1), got {list(deltas)}")
  # A picked index of -1 (nothing picked) reads the appended entry: the full model.
  pop_drop = np.append(full.mean() - correct.mean(axis=1), 0.0)
  pop_cost = np.append(cost.mean(axis=1), full_cost)
  pop_accuracy = correct.mean(axis=1)  # Candidates' "test" numbers: here the population's
  picked = np.empty((len(choice.RULES), len(deltas), draws), int)
  for i in range(draws):
    cols = rng.choice(P, cal_size, replace=False)
    cal = choice.Candidates(list(range(K)), np.asarray(fit_drop), np.asarray(fit_cost),
                            cost[:, cols].mean(axis=1), correct[:, cols], pop_cost[:-1],
                            pop_accuracy)
    for j, d in enumerate(deltas):
      for r, rule in enumerate(choice.RULES):
        picked[r, j, i] = choice.pick(cal, full[cols], rule, d, eps, pvalues)
  out = {"num_points": K, "population": P, "cal_size": cal_size, "draws": draws, "eps": eps,
         "pvalues": pvalues, "full_accuracy": float(full.mean()), "full_cost": float(full_cost),
         "deltas": {}}
  for j, d in enumerate(deltas):
    # The exact drop of a point at δ may land a rounding error above it: that is no violation.
    within = np.flatnonzero(pop_drop[:-1] <= d + 1e-12)
    rules = {}
    for r, name in enumerate(choice.RULES):
      k = picked[r, j]
      v = float(np.mean(pop_drop[k] > d + 1e-12))
      rules[name] = {"violation": v, "violation_se": float(np.sqrt(v * (1 - v) / draws)),
                     "mean_cost": float(pop_cost[k].mean()), "mean_drop": float(pop_drop[k].mean()),
                     "none": float(np.mean(k < 0))}
    oracle = float(pop_cost[within].min()) if len(within) else float(full_cost)
    out["deltas"][f"{d:g}"] = {"oracle_cost": oracle, "rules": rules}
  return out


def quee_population(tables: dict, plan, workdir: str) -> dict:
  """validity's arrays for QuEE: the `quee` variant's sweep (first eval seed) on cal and test."""
  from quee_jax import protocol
  from quee_jax.protocol import baselines

  cfg = plan.eval
  fitted = protocol.load_variant(tables, "quee", cfg.seeds[0], cfg,
                                 os.path.join(workdir, "predictors"))
  sweeps = [fitted.sweep(tables[k], k, cfg.num_lambdas) for k in ("cal", "test")]
  full = [baselines.full_model(tables[k])["correct"] for k in ("cal", "test")]
  on_fit = fitted.sweep(tables["fit"], "fit", cfg.num_lambdas)
  return {"population_correct": np.concatenate([s.correct for s in sweeps], axis=1),
          "population_cost": np.concatenate([s.cost for s in sweeps], axis=1),
          "full_correct": np.concatenate(full),
          "fit_drop": baselines.full_model(tables["fit"])["accuracy"] - on_fit.accuracy(),
          "fit_cost": on_fit.mean_cost(),
          "full_cost": baselines.full_model(tables["cal"])["cost"]}


def naive_population(tables: dict) -> dict:
  """validity's arrays for the naive combination: every level's confidence-exit configurations,
  thresholds fitted on fit, on cal and test, with the tables' own family (no predictors)."""
  from quee_jax.protocol import baselines

  fit = tables["fit"]
  params = [p["param"] for q in range(len(fit.family.ladder))
            for p in baselines.confidence_exit(fit, fit, q)]

  def per_sample(table):
    states = np.stack([baselines.confidence_states_at(table, p) for p in params])
    return table.correct[states, np.arange(table.num_samples)], table.family.cost[states]

  (cal_correct, cal_cost), (test_correct, test_cost) = (per_sample(tables[k])
                                                        for k in ("cal", "test"))
  on_fit = [baselines.confidence_points_at(fit, p) for p in params]
  return {"population_correct": np.concatenate([cal_correct, test_correct], axis=1),
          "population_cost": np.concatenate([cal_cost, test_cost], axis=1),
          "full_correct": np.concatenate([baselines.full_model(tables[k])["correct"]
                                          for k in ("cal", "test")]),
          "fit_drop": np.array([baselines.full_model(fit)["accuracy"] - p["accuracy"]
                                for p in on_fit]),
          "fit_cost": np.array([p["cost"] for p in on_fit]),
          "full_cost": baselines.full_model(tables["cal"])["cost"]}


def report(result: dict) -> str:
  lines = [f"{result['draws']} cal sets of {result['cal_size']} drawn from a pool of"
           f" {result['population']} (cal + test), ε = {result['eps']:g},"
           f" {result['pvalues']} p-values, z-rule z = {choice.Z_RULE}",
           "| method | points | δ | rule | P(pop. drop > δ) ± SE | mean pop. cost |"
           " mean pop. drop | picked nothing |",
           "|---|---|---|---|---|---|---|---|"]
  for name, m in result["methods"].items():
    lead = f"{name} | {m['num_points']}"
    lines.append(f"| {lead} | — | full model | — | {m['full_cost']:.4f} | 0 | — |")
    for d, entry in m["deltas"].items():
      for rule, r in entry["rules"].items():
        lines.append(f"| {lead} | {d} | {rule} | {r['violation']:.3f} ± {r['violation_se']:.3f}"
                     f" | {r['mean_cost']:.4f} | {100 * r['mean_drop']:.3f} pt"
                     f" | {r['none']:.3f} |")
      lines.append(f"| {lead} | {d} | pool's cheapest within δ | 0 | {entry['oracle_cost']:.4f}"
                   " | — | — |")
  return "\n".join(lines)


def parse_deltas(spec: str) -> list[float]:
  try:
    deltas = [float(d) for d in spec.split(",") if d.strip()]
  except ValueError:
    deltas = []
  if not deltas or not all(0 < d < 1 for d in deltas):
    raise ValueError(f"--deltas: expected comma-separated accuracy drops in (0, 1), got {spec!r}")
  return deltas


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a finished work directory (read only)")
  parser.add_argument("--draws", type=int, default=1000, help="cal sets drawn (default 1000)")
  parser.add_argument("--deltas", default="0.0025,0.005,0.01",
                      help="comma-separated accuracy drops δ (default: %(default)s)")
  parser.add_argument("--eps", type=float, default=0.1, help="the risk rule's level ε")
  parser.add_argument("--seed", type=int, default=0, help="seed of the draws")
  # The binomial p-value needs losses at the bounds only; an accuracy drop is often 0.
  parser.add_argument("--pvalues", choices=("betting", "hoeffding_bentkus"), default="betting",
                      help="the risk rule's p-values (default: %(default)s)")
  args = parser.parse_args(argv)
  # Bad input stops before the work directory loads.
  if args.draws < 1:
    raise ValueError(f"--draws: expected at least 1, got {args.draws}")
  if not 0 < args.eps < 1:
    raise ValueError(f"--eps: expected a probability in (0, 1), got {args.eps}")
  deltas = parse_deltas(args.deltas)
  from quee_jax import pipeline

  _, plan, tables = pipeline.load_finished(args.workdir)
  cal_size = tables["cal"].num_samples
  result = {"workdir": os.path.basename(os.path.normpath(args.workdir)), "draws": args.draws,
            "cal_size": cal_size, "eps": args.eps, "seed": args.seed, "pvalues": args.pvalues,
            "population": cal_size + tables["test"].num_samples, "methods": {}}
  for name, pop in (("quee", quee_population(tables, plan, args.workdir)),
                    ("naive", naive_population(tables))):
    result["methods"][name] = validity(**pop, cal_size=cal_size, deltas=deltas, eps=args.eps,
                                       draws=args.draws, rng=np.random.default_rng(args.seed),
                                       pvalues=args.pvalues)
  print(report(result))
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  try:
    main()
  except ValueError as e:
    sys.exit(f"error: {e}")
