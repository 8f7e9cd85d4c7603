r"""One command for a GPU or TPU: the device check and the runtime bench on finished work dirs.

  python -m experiments.accelerator_check --workdirs /tmp/quee_fm,/tmp/quee_minilm

Collects and trains nothing: it loads work directories finished by
experiments.run on any machine (copy them over as files), checks on the
device that every precision level and the predictors compute what the host
CPU computes (`quee_jax.runtime.device_check`; it stops at the first level
that differs), then runs experiments.bench_runtime's timings for each (device
runtime against the full model at its fastest batch, QuEE, the naive
combination and the static levels; counted BOPs only, no latency model: to
fit in a few minutes). It times on
`--time_inputs` inputs (default 16,384: the test split repeated) so that
batches of `--max_batch` (default 4096) fill up.

Prints, for each work directory, the rows of the bench, and last one JSON
line: per work directory the full model's inputs/s and batch, the runtime's
ratio to it at λ = 0, the certified half point (`--risk δ,ε`) and each budget, test accuracy there,
compile seconds, padding and the largest share of samples deciding unlike
the simulation. Exits with an error if the device check fails or the
runtime differs from the simulation on more than 2% of the samples of a row.
It runs on a CPU too (the tests run it on a tiny work directory).
"""

from __future__ import annotations

import json
import sys
import time

import jax
from absl import app, flags, logging

from experiments import bench_runtime
from quee_jax.core import precision
from quee_jax.runtime import device_check

FLAGS = flags.FLAGS
flags.DEFINE_list("workdirs", None, "Work directories finished by experiments.run.")
flags.DEFINE_integer("max_batch", 4096, "Samples per lane; the full model's largest batch.")
flags.DEFINE_integer("min_chunk", 128, "The runtime's smallest chunk: fewer, larger chunks"
                     " suit an accelerator (each chunk size is one skippable loop per level and gate).")
flags.DEFINE_integer("reps", 3, "Timed repetitions (median reported).")
flags.DEFINE_integer("time_inputs", 16384, "Time on this many inputs (the test split repeated).")
flags.DEFINE_list("budgets", ["0.5", "0.25"], "Budget-mode budgets to time.")
flags.DEFINE_list("risk", ["0.005", "0.1"], "δ,ε of the certified half point (bench_runtime's --risk).")


def summary(report: dict) -> dict:
  """What one work directory's bench says about the runtime against the full model."""
  by = lambda policy: {r["point"]: r for r in report["rows"]
                       if r["policy"] == policy and r["cost_model"] == "bops"}
  pick = lambda r: {k: r[k] for k in (
      "speedup", "accuracy", "accuracy_drop", "bops_cost", "padding")}
  n = report["num_test"]
  return {"full_inputs_per_s": report["full_inputs_per_s"], "full_batch": report["full_batch"],
          "full_accuracy": report["full_accuracy"], "compile_s": report["compile_s"],
          "padding": report["padding"],
          "max_mismatch_share": max(r["mismatches"] for r in report["rows"]) / n,
          **{policy: {k: pick(r) for k, r in by(policy).items()}
             for policy in ("quee", "naive", "static")}}


def main(argv):
  del argv
  precision.avoid_triton_gemm()  # before jax starts: exact int8 dots on NVIDIA GPUs
  logging.set_verbosity(logging.WARNING)
  t0 = time.time()
  out, errors = {}, []
  try:
    opts = bench_runtime.Options(max_batch=FLAGS.max_batch, min_chunk=FLAGS.min_chunk,
                                 reps=FLAGS.reps,
                                 budgets=bench_runtime.costs_flag("budgets", FLAGS.budgets),
                                 risk=bench_runtime.risk_flag(FLAGS.risk),
                                 latency=False, time_inputs=FLAGS.time_inputs)
    for workdir in FLAGS.workdirs:
      print(f"\n== {workdir}")
      report = bench_runtime.bench(workdir, opts)
      out[report["workdir"]] = summary(report)
      error = bench_runtime.mismatch_error(report)
      if error:
        errors.append(f"{workdir}: {error}")
  except (ValueError, device_check.DeviceMismatch) as e:
    sys.exit(f"error: {e}")
  print(json.dumps({"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                    "max_batch": FLAGS.max_batch, "seconds": time.time() - t0, "results": out}))
  if errors:
    sys.exit("error: " + "; ".join(errors))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdirs"])
  app.run(main)
