r"""The adaptive runtime against the full model, side by side, on one device.

  python -m experiments.bench_runtime --workdir /tmp/quee_demo

Takes a work directory finished by experiments.run (its config.json, trained
backbone and exit heads, state tables and saved predictors). On the test split
it times, after warm-up, as the median of several repetitions:
  * the full model: every block at the top level, last exit, batched, jitted;
  * the runtime (`quee_jax.runtime.runner.Runner`) at several λ, under two cost
    models: counted BOPs (the evaluation's) and latency (the runner's own
    programs timed here first, `runtime.latency_costs`). The operating points
    (λ and start level) are: λ = 0; the half point, the cheapest whose cal
    accuracy is within 0.5 point of the full model's (`--max_drop`) with
    confidence: the paired per-sample cal difference's mean minus z standard
    errors (`--half_point_z`, default the config's `eval.fallback_z`, as budget
    mode's fallback) is at least -0.5 point, and beside it the same rule on the
    mean alone (z = 0), which a small cal split fools (`protocol.half_point`);
    budget mode's for `--budgets` (BOPs; `protocol.budget_point`); with
    `--test_chosen`, also the latency operating points most accurate on the test
    split within each given cost (`protocol.test_chosen`): what a perfect choice
    would reach (an upper bound, not a result).
For each it prints images/s, the ratio to the full model, test accuracy,
counted cost, and how many samples' exit, level history and prediction differ
from the simulated policy on the test state table (`policy.simulate`); more
than 2% in any row exits with an error after the report. On an accelerator it
first compares every level there with the host CPU (`quee_jax.runtime.device_check`).

The last line is a JSON object: device, full_img_per_s, speedup_at_half_point
(the confident half point of the better cost model, named in cost_model),
accuracy_drop (test accuracy lost there), half_point_z, plus every timed row
and the block timings per level (block_us_per_sample) with their spread
(block_us_spread: half the interquartile range of the interleaved pairs,
`runtime.latency_model`).
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

from quee_jax import models, pipeline, protocol, runtime
from quee_jax.collect import padded_batches
from quee_jax.core import precision
from quee_jax.runtime import device_check

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A work directory finished by experiments.run.")
flags.DEFINE_string("variant", "quee", f"Which saved predictors, of {list(protocol.VARIANTS)}.")
flags.DEFINE_integer("seed", None, "Which seed's predictors (default: the config's first).")
flags.DEFINE_integer("max_batch", 1024, "Samples per lane (the full model's batch too).")
flags.DEFINE_integer("lanes_per_device", None, "The runner's lanes in flight per device"
                     " (default: 2 on accelerators, 1 on CPUs).")
flags.DEFINE_integer("reps", 5, "Timed repetitions (median reported).")
flags.DEFINE_float("max_drop", 0.005, "Accuracy the half point may lose on cal (0.005 = 0.5 point).")
flags.DEFINE_float("half_point_z", None, "Standard errors of the paired cal difference the half"
                   " point's accuracy must clear the drop by (default: the config's"
                   " eval.fallback_z); a 'mean only' half point (z = 0) is timed beside it.")
flags.DEFINE_list("budgets", ["0.5", "0.25"], "Budget-mode budgets to time (fractions of BOPs).")
flags.DEFINE_list("test_chosen", [], "Also time, under the latency cost model, the operating point"
                  " most accurate on TEST among those whose counted test cost is at most each of"
                  " these: an upper bound on what any rule choosing on cal reaches (a diagnostic,"
                  " never a result).")


# The share of test samples on which the runner may differ from the simulation before the
# bench calls its run wrong.
MAX_MISMATCH = 0.02


def load_workdir(workdir: str):
  """(config, plan, splits, params, tables) of a finished run; ValueError if it is not finished."""
  c, plan, tables = pipeline.load_finished(workdir)
  splits = pipeline.config_splits(c, plan)
  params = pipeline.trained_params(c, plan, splits, workdir, {})  # finished: restored, not trained
  return c, plan, splits, params, tables


def _costs(flag: str, values) -> list[float]:
  """The numbers of a list flag, each a cost in (0, 1]; ValueError naming the flag otherwise."""
  try:
    out = [float(v) for v in values]
  except ValueError:
    out = None
  if out is None or not all(0 < v <= 1 for v in out):
    raise ValueError(f"--{flag}: expected costs in (0, 1], got {list(values)}")
  return out


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
  out = [fn(x)[:valid] for x, _, valid in padded_batches(images, labels, batch)]  # one shape
  return np.asarray(jnp.concatenate(out))


def median_seconds(fn, reps):
  fn()  # compile and warm up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  # At least one tick of the clock: every rate and ratio below divides by it.
  return max(float(np.median(times)), time.get_clock_info("perf_counter").resolution)


def simulated(fitted, test, lam: np.ndarray, start: np.ndarray):
  """Exit states and predictions of the simulated policy on test for per-sample λ and start."""
  pairs, row = np.unique(np.stack([lam, start.astype(np.float64)], axis=1), axis=0,
                         return_inverse=True)
  res = fitted.simulate(test, "test", pairs[:, 0], pairs[:, 1].astype(np.int64))
  cols = np.arange(test.num_samples)
  row = row.reshape(-1)
  return res.exit_state[row, cols], res.pred[row, cols]


def _options(plan) -> tuple[list[float], list[float], float]:
  """(budgets, test-chosen caps, half point z) from the flags; ValueError naming the flag."""
  budgets, caps = _costs("budgets", FLAGS.budgets), _costs("test_chosen", FLAGS.test_chosen)
  z = plan.eval.fallback_z if FLAGS.half_point_z is None else FLAGS.half_point_z
  if not (np.isfinite(z) and z >= 0):
    raise ValueError(f"--half_point_z: expected a finite number >= 0, got {z}")
  return budgets, caps, z


def time_full_model(bb, params, level: str, test_x, test_y) -> tuple[float, float]:
  """(test accuracy, median seconds over the test split) of the full model; prints them."""
  full = full_model_fn(bb, params, level)
  full_acc = float((classify_full(full, test_x, test_y, FLAGS.max_batch) == test_y).mean())
  full_s = median_seconds(lambda: classify_full(full, test_x, test_y, FLAGS.max_batch), FLAGS.reps)
  print(f"full model ({level}, {bb.num_blocks} blocks): {len(test_y) / full_s:.0f} img/s,"
        f" test accuracy {100 * full_acc:.2f}%")
  return full_acc, full_s


def build_runners(bb, params, fitted, plan, test_x) -> tuple[dict, dict, dict[str, dict]]:
  """Per cost model ("bops", "latency"): the runner and the fitted policy deciding with its
  costs; and the block time per sample of each level and its spread (us). On an accelerator, first checks
  that every level and the predictors compute there what they do on the host."""
  fam = fitted.family
  gating = runtime.gating_from_fitted(fitted, plan.eval.predictor.level)
  if jax.default_backend() != "cpu":  # timing programs that compute wrong numbers is pointless
    try:
      print(device_check.summary(device_check.check_device(bb, params, plan.ladder, test_x) + [
          device_check.check_predictor(gating.predictor_level, fam.num_gates, gating.num_features,
                                       np.shape(gating.predictor["w1"])[-1], len(fam.candidates))]))
    except device_check.DeviceMismatch as e:
      sys.exit(f"error: {e}")
  runner = runtime.Runner(bb, params, gating, input_shape=test_x.shape[1:],
                          input_dtype=test_x.dtype, max_batch=FLAGS.max_batch,
                          lanes_per_device=FLAGS.lanes_per_device)
  t0 = time.time()
  model = runtime.latency_model(runner, reps=FLAGS.reps)
  lat = model.costs
  print(f"latency cost model measured in {time.time() - t0:.0f} s ({model.pairs} interleaved"
        " pairs per program, median)")
  names, top = list(fam.ladder), fam.ladder[fam.top]
  us = lambda a: 1e6 * lat.full_model * a  # normalized costs back to microseconds per sample
  block_us = {n: float(us(lat.blocks[:, q].mean())) for q, n in enumerate(names)}
  spread_us = {n: float(us(model.spread[:, q].mean())) for q, n in enumerate(names)}
  # Block times are floored above 0 by the model (runtime.latency.MIN_BLOCK_FRACTION), so the
  # ratio is defined; the guard stays for a model that ever says otherwise.
  ratio = lambda v: f"{v / block_us[top]:.2f}x" if block_us[top] > 0 else "n/a"
  print("block time per sample (us, ± half the interquartile range of the pairs): "
        + ", ".join(f"{n} {v:.3g} ± {spread_us[n]:.2g}" for n, v in block_us.items())
        + "; relative to " + top + ": " + ", ".join(f"{n} {ratio(v)}" for n, v in block_us.items()))
  if model.floored.any():
    print(f"  {int(model.floored.sum())} of {model.floored.size} (block, level) times measured"
          f" below the floor ({100 * runtime.latency.MIN_BLOCK_FRACTION:g}% of their gate's"
          " program without blocks) and were charged it: too noisy to resolve here")
  runners = {"bops": runner, "latency": runner.with_costs(lat)}
  fits = {"bops": fitted, "latency": dataclasses.replace(fitted, family=runners["latency"].family)}
  return runners, fits, {"block_us_per_sample": block_us, "block_us_spread": spread_us}


class Case(NamedTuple):
  """One operating point to time: its cost model, label and per-sample λ and start level."""

  cost_model: str
  label: str
  lam: np.ndarray
  start: np.ndarray


def operating_points(fits: dict, tables: dict, cfg: protocol.EvalConfig, z: float,
                     budgets: list[float], caps: list[float]) -> list[Case]:
  """λ = 0 (BOPs); per cost model the half point (confidence z) and the mean-only one (z = 0);
  budget mode's points (BOPs); the test-chosen points under each cap (latency)."""
  fam = fits["bops"].family
  top, n = fam.top, tables["test"].num_samples
  rng = np.random.default_rng(0)  # budget mode's per-sample coin
  cases = []
  cal_full = tables["cal"].restrict(fam).correct[fam.chain(top)[-1]]
  for name, f in fits.items():
    cal_sweep = f.sweep(tables["cal"], "cal", cfg.num_lambdas)
    if name == "bops":
      cases.append(Case(name, "λ=0", np.zeros(n), np.full(n, top)))
    for label, zz in (("half point", z), ("mean-only half point", 0.0)):
      lam, start = protocol.half_point(cal_sweep, cal_full, FLAGS.max_drop, zz)
      cases.append(Case(name, f"{label} λ={lam:.3g}", np.full(n, lam), np.full(n, start)))
    if name == "bops":
      for b in budgets:
        point = protocol.budget_point(f, tables["cal"], b)
        coin = rng.random(n) < point.mix.p_rich
        cases.append(Case(name, f"budget {b:g}", np.where(coin, point.mix.lam_rich, point.mix.lam),
                          np.full(n, point.start)))
    if name == "latency" and caps:
      test_sweep = f.sweep(tables["test"], "test", cfg.num_lambdas)  # one for every cap
      for cap in caps:
        lam, start = protocol.test_chosen(test_sweep, cap)
        cases.append(Case(name, f"test-chosen cost<={cap:g} λ={lam:.3g}", np.full(n, lam),
                          np.full(n, start)))
  return cases


def time_cases(cases: list[Case], runners: dict, fits: dict, test, test_x, test_y,
               full_acc: float, full_s: float) -> list[dict]:
  """Times each case on its cost model's runner against the simulated policy; prints the table."""
  fam = fits["bops"].family
  names = list(fam.ladder)
  rows = []
  print("\n| cost model | λ | start | img/s | vs full | test acc | acc drop | counted cost |"
        " mismatches |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name, label, lam, start in cases:
    r = runners[name]
    out = r.classify(test_x, lam, start)
    secs = median_seconds(lambda: r.classify(test_x, lam, start), FLAGS.reps)
    state, pred = simulated(fits[name], test, lam, start)
    mism = int(((state != out.exit_state) | (pred != out.pred)).sum())
    acc = float((out.pred == test_y).mean())
    bops_cost = float(fam.cost[out.exit_state].mean())  # counted BOPs, whatever decided
    row = {"cost_model": name, "lambda": label, "start": names[start[0]],
           "img_per_s": len(test_y) / secs,
           "speedup": full_s / secs, "accuracy": acc, "accuracy_drop": full_acc - acc,
           "bops_cost": bops_cost, "mismatches": mism,
           "mean_exit_gate": float(out.exit_gate.mean())}
    rows.append(row)
    print(f"| {name} | {label} | {row['start']} | {row['img_per_s']:.0f} | {row['speedup']:.2f}x"
          f" | {100 * acc:.2f} | {100 * row['accuracy_drop']:.2f} | {bops_cost:.3f}"
          f" | {mism}/{len(test_y)} |")
  return rows


def report(device: str, full_accuracy: float, full_img_per_s: float, z: float,
           timings: dict[str, dict], rows: list[dict], n: int) -> None:
  """Prints the JSON line (the half point of the faster cost model, every row); exits with an
  error if the runner differs from the simulation on too many of the n samples in any row."""
  halves = [r for r in rows if r["lambda"].startswith("half point")]
  best = max(halves, key=lambda r: r["speedup"])
  print(json.dumps({"device": device, "backend": jax.default_backend(),
                    "full_img_per_s": full_img_per_s, "full_accuracy": full_accuracy,
                    "speedup_at_half_point": best["speedup"], "cost_model": best["cost_model"],
                    "accuracy_drop": best["accuracy_drop"], "half_point_z": z,
                    **timings, "rows": rows}))
  # Float rounding that depends on the batch shape moves ~0.1% of samples (docs/results/runtime.md); far more
  # means the runner computed something else than the tables: its timings are not the policy's.
  off = [r for r in rows if r["mismatches"] > MAX_MISMATCH * n]
  if off:
    sys.exit("error: the runner differs from the simulated policy on "
             + ", ".join(f"{100 * r['mismatches'] / n:.1f}% of samples at {r['cost_model']} "
                         f"{r['lambda']}" for r in off)
             + f" (more than {100 * MAX_MISMATCH:g}%): it computed some level unlike the state"
             " tables (collected on another kind of device, or a kernel that is wrong here)")


def main(argv):
  del argv
  precision.avoid_triton_gemm()  # before jax starts: exact int8 dots on NVIDIA GPUs
  logging.set_verbosity(logging.WARNING)  # orbax's restore chatter
  try:
    _, plan, splits, params, tables = load_workdir(FLAGS.workdir)
    seed = plan.eval.seeds[0] if FLAGS.seed is None else FLAGS.seed
    fitted = protocol.load_variant(tables, FLAGS.variant, seed, plan.eval,
                                   os.path.join(FLAGS.workdir, "predictors"))
    budgets, caps, z = _options(plan)
  except ValueError as e:
    sys.exit(f"error: {e}")
  bb = models.backbone(plan.model)
  test_x, test_y = splits.test.images[:], np.asarray(splits.test.labels)
  device = jax.devices()[0].device_kind
  print(f"device: {device} ({jax.default_backend()}, {len(jax.local_devices())} device(s));"
        f" {len(test_y)} test images; predictors {FLAGS.variant} seed {seed}")
  full_level = plan.ladder[fitted.family.top]
  full_acc, full_s = time_full_model(bb, params, full_level, test_x, test_y)
  runners, fits, timings = build_runners(bb, params, fitted, plan, test_x)
  cases = operating_points(fits, tables, plan.eval, z, budgets, caps)
  rows = time_cases(cases, runners, fits, tables["test"], test_x, test_y, full_acc, full_s)
  report(device, full_acc, len(test_y) / full_s, z, timings, rows, len(test_y))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
