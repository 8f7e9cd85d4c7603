r"""In-sample ceiling: QuEE with its predictors fitted on the test split itself.

  python -m experiments.ceiling --workdir /tmp/quee_demo

No deployable predictor knows the test outcomes. One fitted to them (its
clusters, targets and early stopping all on the test table) bounds what the
predictor's features can give a QuEE policy on this model: if even it does not
beat the naive combination on test, the features carry no per-sample signal that
the confidence thresholds do not already use, and no better-trained predictor
over them will. It is a diagnostic of the model, never a result to report as
QuEE's accuracy.

Takes a work directory finished by experiments.run. Prints, on the test split,
the naive combination, QuEE as evaluated (fitted on fit, from results.json) and
QuEE fitted on test, for the same variant and seed, each as its test envelope
(every budget's most accurate point on test: what a bound compares, not what a
rule choosing on cal reaches); the last line is a JSON object with those three
summaries.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

from quee_jax import pipeline, protocol
from quee_jax.core import precision
from quee_jax.protocol import metrics

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A work directory finished by experiments.run.")
flags.DEFINE_string("variant", "quee", f"Which QuEE variant, of {list(protocol.VARIANTS)}.")
flags.DEFINE_integer("seed", None, "Predictor seed (default: the config's first).")

KEYS = ("auc", "auc_16", "acc_at_budget")
ENVELOPE = {k: f"{k}_test_envelope" for k in KEYS}  # the same numbers in results.json


def main(argv):
  del argv
  precision.avoid_triton_gemm()  # before jax starts: exact int8 dots on NVIDIA GPUs
  logging.set_verbosity(logging.WARNING)
  try:
    _, plan, tables = pipeline.load_finished(FLAGS.workdir)
    seed = plan.eval.seeds[0] if FLAGS.seed is None else FLAGS.seed
    if FLAGS.variant not in plan.eval.variants:
      raise ValueError(f"variant: expected one this run evaluated, {list(plan.eval.variants)},"
                       f" got {FLAGS.variant!r}")
    if seed not in plan.eval.seeds:
      raise ValueError(f"seed: expected one this run evaluated, {list(plan.eval.seeds)}, got {seed}")
  except ValueError as e:
    sys.exit(f"error: {e}")
  with open(os.path.join(FLAGS.workdir, "results.json")) as f:
    results = json.load(f)
  test = tables["test"]
  num_classes = int(test.backbone.get("num_classes", test.labels.max() + 1))
  in_sample = protocol.fit_variant({**tables, "fit": test}, FLAGS.variant, seed, plan.eval)
  points = in_sample.sweep(test, "test", plan.eval.num_lambdas).points()
  as_evaluated = results["methods"][FLAGS.variant]["seeds"][plan.eval.seeds.index(seed)]
  envelope = lambda m: {k: m[ENVELOPE[k]] for k in KEYS}
  ceiling = metrics.envelope(points, num_classes, plan.eval.budgets)
  rows = {
      "naive": envelope(results["methods"]["ee_confidence"]),
      "fitted_on_fit": envelope(as_evaluated),
      "fitted_on_test": {k: ceiling[k] for k in KEYS},
  }
  budgets = list(rows["naive"]["acc_at_budget"])
  print(f"{FLAGS.variant}, seed {seed}, test envelopes ({test.num_samples} samples):")
  print("| | auc | auc_16 | " + " | ".join(f"acc@{b}" for b in budgets) + " |")
  print("|---|---|---|" + "---|" * len(budgets))
  for name, r in rows.items():
    print(f"| {name} | {100 * r['auc']:.2f} | {100 * r['auc_16']:.2f} | "
          + " | ".join(f"{100 * r['acc_at_budget'][b]:.2f}" for b in budgets) + " |")
  print(json.dumps({"variant": FLAGS.variant, "seed": seed, **rows}))


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
