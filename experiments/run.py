r"""The pipeline: backbone -> exit heads -> state tables -> QuEE and baselines -> report.

  python -m experiments.run --config experiments/configs/fashion_mnist.py:demo --workdir /tmp/fm_demo
  python -m experiments.run --config experiments/configs/fashion_mnist.py --workdir /tmp/fm \
      --stages=tables,evaluate,report --config.eval.seeds=0,1,2

Every stage writes into WORKDIR and is skipped when its output is there and was
made with the same config values: backbone/ and exit_heads/ (orbax checkpoints,
resumed mid-run), accuracy.json, tables/{fit,cal,test}/, predictors/ (orbax),
results.json, report.md and curves.png.
"""

import dataclasses
import json
import logging as pylogging
import os
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import quee_jax as q
from quee_jax import data, evaluate, plotting, predictor, report, train

STAGES = ("backbone", "exit_heads", "tables", "evaluate", "report")
config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).")
flags.DEFINE_string("workdir", None, "Where checkpoints, tables and results go.")
flags.DEFINE_list("stages", list(STAGES), f"Stages to run, of {STAGES}.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _plain(value):
  """value as it reads back from JSON (tuples become lists), for comparisons."""
  return json.loads(json.dumps(value))


def _same(path: str, key: str, value) -> bool:
  """Whether the JSON at path was written with config part `key` equal to value."""
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f).get("config", {}).get(key) == _plain(value)


def _write_json(path: str, obj: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax chatter; our progress lines stay
  pylogging.getLogger("quee_jax").setLevel(pylogging.INFO)
  c, wd = FLAGS.config, FLAGS.workdir
  unknown = set(FLAGS.stages) - set(STAGES)
  if unknown:
    raise ValueError(f"--stages: unknown {sorted(unknown)}; expected some of {STAGES}")
  model = q.vit.ViTConfig(**c.model)
  ladder = q.parse_ladder(c.ladder)
  backbone_tc, heads_tc = train.TrainConfig(**c.backbone), train.TrainConfig(**c.exit_heads)
  eval_cfg = evaluate.EvalConfig(seeds=tuple(c.eval.seeds),
                                 predictor=predictor.PredictorConfig(**c.eval.predictor),
                                 min_cluster=c.eval.min_cluster, max_clusters=c.eval.max_clusters,
                                 alpha=c.eval.alpha)
  os.makedirs(wd, exist_ok=True)
  splits = data.load_splits(c.dataset, dict(c.splits), seed=c.seed, image_size=model.image_size,
                            source=c.source, data_dir=c.data_dir or None)
  data.check_model_input(splits.train, model.image_size, model.channels)
  timings = {}
  params = None

  def trained_params():
    # Finished checkpoints restore at once; unfinished ones resume training.
    nonlocal params
    if params is None:
      t0 = time.time()
      p = train.train_backbone(model, splits.train, backbone_tc, os.path.join(wd, "backbone"),
                               eval_split=splits.test)
      timings["backbone"] = time.time() - t0
      t0 = time.time()
      params = train.train_exit_heads(model, p, splits.train, heads_tc,
                                      os.path.join(wd, "exit_heads"), level=c.exit_heads_level)
      timings["exit_heads"] = time.time() - t0
    return params

  model_cfg = {"model": c.model.to_dict(), "backbone": c.backbone.to_dict(),
               "exit_heads": c.exit_heads.to_dict(), "dataset": c.dataset, "seed": c.seed,
               "splits": c.splits.to_dict()}
  if {"backbone", "exit_heads"} & set(FLAGS.stages):
    acc_path = os.path.join(wd, "accuracy.json")
    trained_params()
    if not _same(acc_path, "model", model_cfg) or not _same(acc_path, "ladder", c.ladder):
      table = train.accuracy_table(model, params, splits.test, ladder)
      _write_json(acc_path, {"config": {"model": model_cfg, "ladder": c.ladder},
                             "test_accuracy": table, "train_s": timings,
                             "device": jax.devices()[0].device_kind})
    with open(acc_path) as f:
      table = json.load(f)["test_accuracy"]
    print(f"\ntest accuracy (%) per exit and level ({splits.sizes()['test']} images):")
    print("| level | " + " | ".join(f"exit {e}" for e in model.exits) + " |")
    print("|---" * (len(model.exits) + 1) + "|")
    for level, accs in table.items():
      print(f"| {level} | " + " | ".join(f"{100 * a:.2f}" for a in accs) + " |")

  bb = q.vit.backbone(model)
  table_cfg = _plain({"model": model_cfg, "ladder": c.ladder, "family": c.family, "cost_unit": c.cost_unit,
               "summary_dim": c.collect.summary_dim})
  tables = {}
  if "tables" in FLAGS.stages or "evaluate" in FLAGS.stages:
    costs = None
    for split in ("fit", "cal", "test"):
      path = os.path.join(wd, "tables", split)
      if os.path.exists(os.path.join(path, "meta.json")):
        t = q.load_table(path, ladder=q.precision.ladder_names(ladder), family=c.family)
        if t.meta.get("config") == table_cfg:
          tables[split] = t
          continue
      p = trained_params()
      if costs is None:
        costs = q.backbone_costs(bb, p, splits.fit.images[:1], ladder, unit=c.cost_unit)
      fam = q.build_family(c.family, q.precision.ladder_names(ladder), bb.exits, costs)
      t0 = time.time()
      tables[split] = q.collect_table(bb, p, fam, splits[split].images, splits[split].labels,
                                      c.collect.batch_size, summary_dim=c.collect.summary_dim,
                                      meta={"split": split, "config": table_cfg})
      timings[f"tables_{split}"] = time.time() - t0
      q.save_table(tables[split], path)

  results_path = os.path.join(wd, "results.json")
  eval_key = _plain({"tables": table_cfg, "eval": c.eval.to_dict()})
  if "evaluate" in FLAGS.stages and not _same(results_path, "eval", eval_key):
    t0 = time.time()
    results = evaluate.evaluate(tables["fit"], tables["cal"], tables["test"], eval_cfg,
                                meta={"dataset": c.dataset},
                                save_dir=os.path.join(wd, "predictors"))
    if c.eval.signal_level:
      results["signal_recovery"] = evaluate.signal_recovery(
          tables["fit"], tables["cal"], tables["test"], c.eval.signal_level,
          dataclasses.replace(eval_cfg, seeds=tuple(c.eval.signal_seeds)))
    timings["evaluate"] = time.time() - t0
    results["config"] = {"eval": eval_key}
    results["device"] = jax.devices()[0].device_kind
    _write_json(results_path, results)

  if "report" in FLAGS.stages and os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
    text = (f"# {c.dataset}: QuEE results\n\nladder {', '.join(results['ladder'])}; family "
            f"{results['family']}; cost in {results['cost_unit']} (full model = 1); seeds "
            f"{results['seeds']}; full model test accuracy {100 * results['full_model']['accuracy']:.2f}%.\n\n"
            + report.methods_table(results) + "\n\n## Budget mode (λ chosen on cal)\n\n"
            + report.budget_table(results) + "\n\n## Diagnostics (test)\n\n"
            + report.diagnostics_tables(results) + "\n")
    with open(os.path.join(wd, "report.md"), "w") as f:
      f.write(text)
    plotting.plot_curves(results, os.path.join(wd, "curves.png"))
    print("\n" + report.methods_table(results))
    print(f"\nwrote {os.path.join(wd, 'report.md')} and {os.path.join(wd, 'curves.png')}")
  for stage, secs in timings.items():
    print(f"stage {stage}: {secs:.1f} s")


if __name__ == "__main__":
  app.run(main)
