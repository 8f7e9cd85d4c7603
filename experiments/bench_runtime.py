r"""The adaptive runtime against the full model, side by side, on one device.

  python -m experiments.bench_runtime --workdir /tmp/quee_demo

Takes a work directory finished by experiments.run (its config.json, trained
backbone and exit heads, state tables and saved predictors). On the test split
it times, after warm-up, as the median of several repetitions:
  * the full model: every block at the top level, last exit, batched, jitted, at
    its fastest batch size among the runtime's lane sizes (`--max_batch` and its
    halves down to an eighth);
  * the runtime (`quee_jax.runtime.Runner`, every gate on the device) for each
    policy the protocol compares, at operating points chosen on cal:
      - QuEE under two cost models: counted BOPs (the evaluation's) and latency
        (the runtime's own chunk bodies timed here first, `runtime.latency_costs`):
        λ = 0; the half point, the cheapest point certified on cal to lose at most
        δ = 0.5 point against the full model with probability 1 - ε = 0.9 (`--risk
        δ,ε`; risk control by Learn then Test, `protocol.choice.pick`), and the
        cheapest whose cal mean alone is within δ, which promises nothing (its test
        drop shows what certifying costs); budget mode's point for each of `--budgets`;
        with `--test_chosen`, the latency points most accurate on the TEST split
        within each given cost (`protocol.test_chosen`): an upper bound, never a result;
      - the naive combination (confidence thresholds per exit at one level, the
        baseline QuEE has to beat): its half points by the same rules over every
        configuration of every level, and its budget-mode mix for each budget;
      - every static level at full depth;
For each it prints inputs/s, the ratio to the full model, test accuracy, counted
BOPs, padding (the share of computed rows beyond the rows needed), and how many
samples' exit state or prediction differ
from the simulated policy on the test state table; more than 2% in any row
exits with an error after the report. On an accelerator it first compares
every level there with the host CPU (`quee_jax.runtime.device_check`).

Each row's ratio divides timings taken in turns with the full model's, the
order rotating rep by rep, so that load and drift on a shared machine hit both
sides alike.

The last line is a JSON object: device, full_inputs_per_s, full_batch, max_chunk
(the runtime's largest chunk: --max_chunk, by default full_batch),
speedup_at_half_point (the certified QuEE half point of the faster cost model,
named in cost_model; null where no point is certified), device_runtime_speedup (the
same), accuracy_drop (its test drop), risk ([δ, ε]),
compile_s (every program the runtime compiled), padding, every timed row, and
the block timings per level (block_us_per_sample) with their spread.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from quee_jax import pipeline, protocol, runtime
from quee_jax.collect import padded_batches
from quee_jax.core import precision
from quee_jax.protocol import baselines
from quee_jax.runtime import device_check

FLAGS = flags.FLAGS
def define_flags() -> None:
  """The command line's flags (defined only when run as a script: importers define their own)."""
  flags.DEFINE_string("workdir", None, "A work directory finished by experiments.run.")
  flags.DEFINE_string("variant", "quee", f"Which saved predictors, of {list(protocol.VARIANTS)}.")
  flags.DEFINE_integer("seed", None, "Which seed's predictors (default: the config's first).")
  flags.DEFINE_integer("max_batch", 1024, "Samples per lane (the largest full-model batch too).")
  flags.DEFINE_integer("min_chunk", 16, "The runtime's smallest chunk (its padding per level"
                       " group and gate is below it; `runtime.Runner`).")
  flags.DEFINE_integer("max_chunk", 0, "The runtime's largest chunk (a larger level group runs"
                       " as several; `runtime.Runner`); 0: the full model's fastest batch, or"
                       " --min_chunk if larger.")
  flags.DEFINE_integer("reps", 5, "Timed repetitions (median reported).")
  flags.DEFINE_list("risk", ["0.005", "0.1"], "δ,ε: the half point is the cheapest point certified"
                    " to lose at most δ (0.005 = 0.5 point) of the full model's accuracy with"
                    " probability at least 1 - ε over the cal draw; a 'mean only' half point (cal"
                    " mean within δ, no guarantee) is timed beside it.")
  flags.DEFINE_list("budgets", ["0.5", "0.25"], "Budget-mode budgets to time (fractions of BOPs).")
  flags.DEFINE_list("test_chosen", [], "Also time, under the latency cost model, the operating point"
                    " most accurate on TEST among those whose counted test cost is at most each of"
                    " these: an upper bound on what any rule choosing on cal reaches (a diagnostic,"
                    " never a result).")
  flags.DEFINE_bool("latency", True, "Also measure the latency cost model and time QuEE under it.")
  flags.DEFINE_integer("time_inputs", 0, "Time on this many inputs: the test split cut short, or"
                       " repeated to fill large batches (accuracy and mismatches are counted on the"
                       " whole test split once); 0: the test split as it is.")


# The share of test samples on which the runner may differ from the simulation before the
# bench calls its run wrong.
MAX_MISMATCH = 0.02


@dataclasses.dataclass(frozen=True)
class Options:
  """What to time (the flags of the same names)."""

  variant: str = "quee"
  seed: int | None = None
  max_batch: int = 1024
  min_chunk: int = 16
  max_chunk: int = 0  # 0: the full model's fastest batch
  reps: int = 5
  risk: tuple[float, float] = (0.005, 0.1)  # δ, ε
  budgets: tuple[float, ...] = (0.5, 0.25)
  test_chosen: tuple[float, ...] = ()
  latency: bool = True
  time_inputs: int = 0  # 0: the test split

  def __post_init__(self):
    delta, eps = self.risk if len(self.risk) == 2 else (None, None)
    if not (isinstance(delta, float) and isinstance(eps, float) and 0 < delta < 1
            and 0 < eps < 1):
      raise ValueError(f"--risk: expected δ,ε with δ in (0, 1) (0.005 = 0.5 point) and ε in"
                       f" (0, 1), got {','.join(map(str, self.risk))}")
    for name, low in (("max_batch", 1), ("min_chunk", 1), ("max_chunk", 0), ("reps", 1),
                      ("time_inputs", 0)):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"--{name}: expected an integer >= {low}, got {v!r}")


def load_workdir(workdir: str):
  """(config, plan, splits, params, tables) of a finished run; ValueError if it is not finished."""
  c, plan, tables = pipeline.load_finished(workdir)
  splits = pipeline.config_splits(c, plan)
  params = pipeline.trained_params(c, plan, splits, workdir, {})  # finished: restored, not trained
  return c, plan, splits, params, tables


def risk_flag(values) -> tuple[float, ...]:
  """--risk's δ,ε as numbers (Options checks their ranges); ValueError naming the flag."""
  try:
    return tuple(float(v) for v in values)
  except ValueError:
    raise ValueError(f"--risk: expected two numbers δ,ε, got {','.join(values)}") from None


def costs_flag(flag: str, values) -> tuple[float, ...]:
  """The numbers of a list flag, each a cost in (0, 1]; ValueError naming the flag otherwise."""
  try:
    out = [float(v) for v in values]
  except ValueError:
    out = None
  if out is None or not all(0 < v <= 1 for v in out):
    raise ValueError(f"--{flag}: expected costs in (0, 1], got {list(values)}")
  return tuple(out)


def full_model_fn(backbone, params, level):
  """Jitted top-level, full-depth forward -> predicted classes."""
  def forward(params, images):
    h = backbone.embed(params, images)
    for i in range(backbone.num_blocks):
      h = backbone.block(params, i, h, level)
    return jnp.argmax(backbone.exit_head(params, len(backbone.exits) - 1, h), axis=-1)
  fn = jax.jit(forward)
  return lambda images: fn(params, images)


def classify_full(fn, images, labels, batch):
  """Every batch dispatched, one transfer back at the end (as the runtime does)."""
  out = [fn(x)[:valid] for x, _, valid in padded_batches(images, labels, batch)]  # one shape
  return np.asarray(jnp.concatenate(out))


def interleaved_seconds(fns, reps) -> list[float]:
  """Median seconds of each of fns, after a warm-up call of each, timed in turns whose order
  rotates rep by rep: drift and load from elsewhere hit every one alike, so their ratios hold
  on a busy machine better than timings taken one after the other."""
  for fn in fns:
    fn()  # compile and warm up
  times = [[] for _ in fns]
  for r in range(reps):
    for i in np.roll(np.arange(len(fns)), -r):
      t0 = time.perf_counter()
      fns[i]()
      times[i].append(time.perf_counter() - t0)
  # At least one tick of the clock: every rate and ratio below divides by it.
  tick = time.get_clock_info("perf_counter").resolution
  return [max(float(np.median(t)), tick) for t in times]


def median_seconds(fn, reps):
  """Median seconds of fn after a warm-up call (`interleaved_seconds` of fn alone)."""
  return interleaved_seconds([fn], reps)[0]


def time_full_model(bb, params, level: str, test_x, test_y, time_x, opts: Options
                    ) -> tuple[float, float, int, object]:
  """(test accuracy, median seconds per input of time_x, batch, a call timing it again) of the
  full model at its fastest batch among max_batch and its halves down to an eighth; prints
  them."""
  full = full_model_fn(bb, params, level)
  time_y = np.zeros(len(time_x), np.int32)
  per_input = lambda b, reps: median_seconds(
      lambda: classify_full(full, time_x, time_y, b), reps) / len(time_x)
  quick = {b: per_input(b, 1) for b in sorted({max(1, opts.max_batch >> k) for k in range(4)})}
  batch = min(quick, key=quick.get)
  acc = float((classify_full(full, test_x, test_y, batch) == test_y).mean())
  secs = per_input(batch, opts.reps)
  print(f"full model ({level}, {bb.num_blocks} blocks): {1 / secs:.0f} inputs/s at batch"
        f" {batch} (fastest of " + ", ".join(f"{b}: {1 / s:.0f}" for b, s in quick.items())
        + f"), test accuracy {100 * acc:.2f}%")
  return acc, secs, batch, lambda: classify_full(full, time_x, time_y, batch)


def build_runners(bb, params, fitted, plan, test_x, max_chunk: int, opts: Options
                  ) -> tuple[dict, dict, dict[str, dict]]:
  """Per cost model ("bops", and "latency" if asked): the runtime and the fitted policy
  deciding with its costs; and the block time per sample of each level and its spread (us).
  On an accelerator, first checks that every level and the predictors compute there what
  they do on the host."""
  fam = fitted.family
  gating = runtime.gating_from_fitted(fitted, plan.eval.predictor.level)
  if jax.default_backend() != "cpu":  # timing programs that compute wrong numbers is pointless
    print(device_check.summary(device_check.check_device(bb, params, plan.ladder, test_x) + [
        device_check.check_predictor(gating.predictor_level, fam.num_gates, gating.num_features,
                                     np.shape(gating.predictor["w1"])[-1], len(fam.candidates))]))
  runner = runtime.Runner(bb, params, gating, input_shape=test_x.shape[1:],
                          input_dtype=test_x.dtype, max_batch=opts.max_batch,
                          min_chunk=opts.min_chunk, max_chunk=max_chunk)
  runners, timings = {"bops": runner}, {}
  if opts.latency:
    t0 = time.time()
    model = runtime.latency_model(runner, reps=opts.reps)
    print(f"latency cost model measured in {time.time() - t0:.0f} s ({model.pairs} interleaved"
          " pairs per chunk body, median)")
    timings = block_timings(fam, model)
    runners["latency"] = runner.with_costs(model.costs)
  fits = {k: dataclasses.replace(fitted, family=r.family) for k, r in runners.items()}
  return runners, fits, timings


def block_timings(fam, model: runtime.LatencyModel) -> dict[str, dict]:
  """Each level's block time per sample and its spread (us), printed and returned."""
  lat = model.costs
  names, top = list(fam.ladder), fam.ladder[fam.top]
  us = lambda a: 1e6 * lat.full_model * a  # normalized costs back to microseconds per sample
  block_us = {n: float(us(lat.blocks[:, q].mean())) for q, n in enumerate(names)}
  spread_us = {n: float(us(model.spread[:, q].mean())) for q, n in enumerate(names)}
  ratio = lambda v: f"{v / block_us[top]:.2f}x" if block_us[top] > 0 else "n/a"
  print("block time per sample (us, ± half the interquartile range of the pairs): "
        + ", ".join(f"{n} {v:.3g} ± {spread_us[n]:.2g}" for n, v in block_us.items())
        + "; relative to " + top + ": " + ", ".join(f"{n} {ratio(v)}" for n, v in block_us.items()))
  if model.floored.any():
    print(f"  {int(model.floored.sum())} of {model.floored.size} (block, level) times measured"
          f" below the floor ({100 * runtime.latency.MIN_BLOCK_FRACTION:g}% of their gate's"
          " chunk without blocks) and were charged it: too noisy to resolve here")
  return {"block_us_per_sample": block_us, "block_us_spread": spread_us}


class Case(NamedTuple):
  """One operating point to time: its policy, cost model and label; per test sample, its
  inputs (QuEE: λ and start level; naive and static: level and thresholds) and the exit
  state the simulation on the test table gives it."""

  policy: str      # "quee", "naive" or "static"
  cost_model: str  # "bops" or "latency" (the cost model QuEE decides with)
  point: str       # which operating point: "λ=0", "half point", "budget 0.5", a level, ...
  label: str       # the point with its parameters
  lam: np.ndarray | None
  level: np.ndarray              # [N] start level (QuEE) or the level (naive, static)
  thresholds: np.ndarray | None  # [N, G - 1] (naive); None: QuEE, or no early exit (static)
  sim_state: np.ndarray          # [N] the simulated exit state on the test table


def simulated(fitted, test, lam: np.ndarray, start: np.ndarray) -> np.ndarray:
  """Exit states of the simulated QuEE policy on test for per-sample λ and start."""
  pairs, row = np.unique(np.stack([lam, start.astype(np.float64)], axis=1), axis=0,
                         return_inverse=True)
  res = fitted.simulate(test, "test", pairs[:, 0], pairs[:, 1].astype(np.int64))
  return res.exit_state[row.reshape(-1), np.arange(test.num_samples)]


def quee_cases(fits: dict, tables: dict, cfg: protocol.EvalConfig, opts: Options,
               rng: np.random.Generator) -> list[Case]:
  """λ = 0 (BOPs); per cost model the certified half point and the mean-only one; budget mode's
  points (BOPs); the test-chosen points under each cap (latency)."""
  fam = fits["bops"].family
  top, n = fam.top, tables["test"].num_samples
  cases = []
  cal_full = baselines.full_model(tables["cal"])["correct"]

  def case(name, point, detail, lam, start):
    lam, start = np.broadcast_to(lam, n).astype(np.float64), np.broadcast_to(start, n)
    sim = simulated(fits[name], tables["test"], lam, start)
    return Case("quee", name, point, f"{point} {detail}".strip(), lam, start, None, sim)

  for name, f in fits.items():
    sweeps = {k: f.sweep(tables[k], k, cfg.num_lambdas) for k in ("fit", "cal", "test")}
    if name == "bops":
      cases.append(case(name, "λ=0", "", 0.0, top))
    fit_full = baselines.full_model(tables["fit"])["accuracy"]
    candidates = protocol.choice.Candidates.of_sweeps(sweeps["fit"], sweeps["cal"],
                                                      sweeps["test"], fit_full)
    for label, rule in HALF_POINTS:
      i = protocol.choice.pick(candidates, cal_full, rule, *opts.risk)
      if i >= 0:
        lam, start = float(sweeps["cal"].lambdas[i]), int(sweeps["cal"].starts[i])
        cases.append(case(name, label, f"λ={lam:.3g}", lam, start))
    if name == "bops":
      for b in opts.budgets:
        point = protocol.budget_point(f, tables["cal"], b)
        coin = rng.random(n) < point.mix.p_rich
        cases.append(case(name, f"budget {b:g}", "",
                          np.where(coin, point.mix.lam_rich, point.mix.lam), point.start))
    if name == "latency" and opts.test_chosen:
      for cap in opts.test_chosen:
        lam, start = protocol.test_chosen(sweeps["test"], cap)
        cases.append(case(name, f"test-chosen cost<={cap:g}", f"λ={lam:.3g}", lam, start))
  return cases


# (label, rule of `protocol.choice.pick`): the certified half point and the uncertified one.
HALF_POINTS = (("half point", "certified"), ("mean-only half point", "mean_only"))


def baseline_cases(fam, tables: dict, opts: Options, rng: np.random.Generator) -> list[Case]:
  """The naive combination's half points (every confidence configuration of every level, the
  same rules as QuEE's) and budget-mode mixes; every static level. Costs without predictors."""
  plain = fam.with_gate_overhead(np.zeros(fam.num_gates))
  t = {k: v.restrict(plain) for k, v in tables.items()}
  n = t["test"].num_samples
  on_test = [p for q in range(len(fam.ladder))
             for p in baselines.confidence_exit(t["fit"], t["test"], q)]
  points = protocol.metrics.with_cal(
      on_test, [baselines.confidence_points_at(t["cal"], p["param"]) for p in on_test])
  level_of = lambda param: fam.ladder.index(param["level"])

  def case(point, detail, params, coin):
    """Per sample the configuration params[coin]."""
    level = np.array([level_of(p) for p in params])[coin]
    thr = np.array([p["thresholds"] for p in params], np.float64)[coin]
    sim = np.choose(coin, [baselines.confidence_states_at(t["test"], p) for p in params])
    return Case("naive", "bops", point, f"{point} {detail}".strip(), None, level, thr, sim)

  candidates = protocol.choice.Candidates.of_confidence(points, t["fit"], t["cal"])
  cal_full = baselines.full_model(t["cal"])["correct"]
  cases = []
  for label, rule in HALF_POINTS:
    i = protocol.choice.pick(candidates, cal_full, rule, *opts.risk)
    if i >= 0:
      p = points[i]["param"]
      cases.append(case(label, f"{p['level']} r={p['ratio']:.3g}", [p], np.zeros(n, int)))
  mixes = protocol.choice.naive_budget_mode(points, opts.budgets)
  for b in opts.budgets:
    mix = mixes[protocol.metrics.budget_key(b)]
    if mix is not None:
      coin = (rng.random(n) < mix.p_rich).astype(int)
      cases.append(case(f"budget {b:g}", "", [mix.param, mix.param_rich], coin))
  for q, name in enumerate(fam.ladder):
    cases.append(Case("static", "bops", name, name, None, np.full(n, q), None,
                      np.full(n, fam.chain(q)[-1])))
  return cases


def time_cases(cases: list[Case], runners: dict, fam, test, test_x, test_y, time_x,
               full_acc: float, full_run, opts: Options) -> list[dict]:
  """Runs each case on the test split (accuracy, padding, and mismatches: exit state or
  prediction unlike the test table's) and times it on time_x in turns with the full model
  (`full_run`: one pass over time_x at its fastest batch), whose time of the same turns the
  ratio divides; prints the table."""
  names = list(fam.ladder)
  test = test.restrict(fam)
  cols = np.arange(test.num_samples)
  rows = []
  print("\n| policy | cost model | operating point | start/level | inputs/s | vs full |"
        " test acc | acc drop | counted BOPs | padding | mismatches |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for c in cases:
    r = runners[c.cost_model]
    tile = lambda a: None if a is None else np.resize(a, (len(time_x), *np.shape(a)[1:]))
    if c.policy == "quee":
      run = lambda r, x, t: r.classify(x, t(c.lam), t(c.level))
    else:
      run = lambda r, x, t: r.classify_confidence(x, t(c.level), t(c.thresholds))
    out = run(r, test_x, lambda a: a)
    fns = [full_run, lambda: run(r, time_x, tile)]
    full_s, secs = [t / len(time_x) for t in interleaved_seconds(fns, opts.reps)]
    mism = int(((c.sim_state != out.exit_state) | (test.pred[c.sim_state, cols] != out.pred)).sum())
    acc = float((out.pred == test_y).mean())
    # Counted BOPs: QuEE's family costs (latency runners count time); a confidence run's own
    # cost, which the runner counts without the predictors it does not run.
    bops = fam.cost[out.exit_state] if c.policy == "quee" else out.cost
    row = {"policy": c.policy, "cost_model": c.cost_model, "point": c.point, "lambda": c.label,
           "start": names[int(c.level[0])], "inputs_per_s": 1 / secs, "speedup": full_s / secs,
           "accuracy": acc, "accuracy_drop": full_acc - acc,
           "bops_cost": float(bops.mean()), "mismatches": mism,
           "padding": out.padding, "rows_computed": out.rows_computed,
           "rows_needed": out.rows_needed, "mean_exit_gate": float(out.exit_gate.mean())}
    rows.append(row)
    print(f"| {c.policy} | {c.cost_model} | {c.label} | {row['start']} | {1 / secs:.0f}"
          f" | {row['speedup']:.2f}x | {100 * acc:.2f} | {100 * row['accuracy_drop']:.2f}"
          f" | {row['bops_cost']:.3f} | {100 * out.padding:.1f}% | {mism}/{len(test_y)} |")
  return rows


def bench(workdir: str, opts: Options) -> dict:
  """Every timing of the module docstring for one finished work directory: the report (the
  JSON line's object). Raises ValueError for a work directory or option that does not fit,
  device_check.DeviceMismatch if the device computes a level unlike the host."""
  _, plan, splits, params, tables = load_workdir(workdir)
  seed = plan.eval.seeds[0] if opts.seed is None else opts.seed
  fitted = protocol.load_variant(tables, opts.variant, seed, plan.eval,
                                 os.path.join(workdir, "predictors"))
  bb = plan.multi_exit
  test_x, test_y = splits.test.images[:], np.asarray(splits.test.labels)
  time_x = np.resize(test_x, (opts.time_inputs or len(test_x), *test_x.shape[1:]))
  device = jax.devices()[0].device_kind
  print(f"device: {device} ({jax.default_backend()}, {len(jax.local_devices())} device(s));"
        f" {len(test_y)} test inputs (timed on {len(time_x)}); predictors {opts.variant} seed"
        f" {seed}")
  full_level = plan.ladder[fitted.family.top]
  full_acc, full_s, full_batch, full_run = time_full_model(bb, params, full_level, test_x,
                                                           test_y, time_x, opts)
  # Chunks as large as the full model's fastest batch: on CPUs the time per row can grow with
  # the batch (MiniLM runs about 2x faster in batches of 32 than of 256 on 2 cores).
  max_chunk = opts.max_chunk or max(full_batch, opts.min_chunk)
  print(f"runtime: lanes of {opts.max_batch}, chunks of {opts.min_chunk} to {max_chunk} rows")
  runners, fits, timings = build_runners(bb, params, fitted, plan, test_x, max_chunk, opts)
  rng = np.random.default_rng(0)  # budget modes' per-sample coins
  cases = (quee_cases(fits, tables, plan.eval, opts, rng)
           + baseline_cases(fitted.family, tables, opts, rng))
  rows = time_cases(cases, runners, fitted.family, tables["test"], test_x, test_y, time_x,
                    full_acc, full_run, opts)
  halves = [r for r in rows if r["policy"] == "quee" and r["point"] == "half point"]
  best = max(halves, key=lambda r: r["speedup"]) if halves else dict.fromkeys(
      ("speedup", "cost_model", "accuracy_drop"))  # nothing certified: no half point
  computed = sum(r["rows_computed"] for r in rows)
  return {"device": device, "backend": jax.default_backend(), "workdir": os.path.basename(
              os.path.normpath(workdir)), "full_inputs_per_s": 1 / full_s,
          "full_batch": full_batch, "max_chunk": max_chunk, "full_accuracy": full_acc,
          "speedup_at_half_point": best["speedup"], "device_runtime_speedup": best["speedup"],
          "cost_model": best["cost_model"], "accuracy_drop": best["accuracy_drop"],
          "risk": list(opts.risk), "compile_s": sum(runners["bops"].compile_s.values()),
          "padding": 1 - sum(r["rows_needed"] for r in rows) / max(computed, 1),
          **timings, "rows": rows, "num_test": len(test_y)}


def mismatch_error(report: dict) -> str | None:
  """The error if the runtime differs from the simulation on too many samples in any row."""
  # Float rounding that depends on the batch shape moves ~0.1% of samples
  # (docs/results/runtime.md); far more means the runtime computed something else than the
  # tables: its timings are not the policy's.
  n = report["num_test"]
  off = [r for r in report["rows"] if r["mismatches"] > MAX_MISMATCH * n]
  if not off:
    return None
  return ("the runner differs from the simulated policy on "
          + ", ".join(f"{100 * r['mismatches'] / n:.1f}% of samples at {r['policy']}"
                      f" {r['cost_model']} {r['lambda']}" for r in off)
          + f" (more than {100 * MAX_MISMATCH:g}%): it computed some level unlike the state"
          " tables (collected on another kind of device, or a kernel that is wrong here)")


def main(argv):
  del argv
  precision.avoid_triton_gemm()  # before jax starts: exact int8 dots on NVIDIA GPUs
  logging.set_verbosity(logging.WARNING)  # orbax's restore chatter
  try:
    opts = Options(FLAGS.variant, FLAGS.seed, FLAGS.max_batch, FLAGS.min_chunk, FLAGS.max_chunk,
                   FLAGS.reps, risk_flag(FLAGS.risk), costs_flag("budgets", FLAGS.budgets),
                   costs_flag("test_chosen", FLAGS.test_chosen), FLAGS.latency,
                   FLAGS.time_inputs)
    report = bench(FLAGS.workdir, opts)
  except (ValueError, device_check.DeviceMismatch) as e:
    sys.exit(f"error: {e}")
  print(json.dumps(report))
  error = mismatch_error(report)
  if error:
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
