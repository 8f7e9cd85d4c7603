r"""The pipeline: backbone -> exit heads -> state tables -> QuEE and baselines -> report.

  python -m experiments.run --config experiments/configs/fashion_mnist.py:demo --workdir /tmp/fm_demo
  python -m experiments.run --config experiments/configs/fashion_mnist.py --workdir /tmp/fm \
      --stages=tables,evaluate,report --config.eval.seeds=0,1,2

Stages (`--stages`, default all):
  backbone    train the ViT (or import `init_from` and fine-tune it, or use it as is);
              a BERT (model.arch 'bert') is always the pretrained `init_from`, frozen
  exit_heads  train every exit head on the frozen backbone; accuracy.json
  tables      state tables of the fit, cal and test splits
  evaluate    targets, predictors, policies, baselines and oracles -> results.json
  report      report.md (results table) and curves.png

Every stage writes into WORKDIR and is skipped when its output is there and was
made with the same config values; a changed value reruns the stages it affects
and those after them. An interrupted run resumes: training from its latest
orbax checkpoint, tables split by split, evaluation run by run (predictors/).
The whole config is checked before any work; a bad value stops the run with a
message naming its key.
"""

from __future__ import annotations

import dataclasses
import json
import logging as pylogging
import os
import shutil
import sys
import time

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

import quee_jax as q
from quee_jax import data, evaluate, models, plotting, predictor, report, train, vit_import
from quee_jax.models import bert, bert_import
from quee_jax.precision import Ladder, Level

STAGES = ("backbone", "exit_heads", "tables", "evaluate", "report")
COST_UNITS = ("bops", "macs")


@dataclasses.dataclass(frozen=True)
class Plan:
  """The config, checked and turned into the library's typed settings."""

  model: models.ModelConfig
  ladder: Ladder
  backbone: train.TrainConfig | None  # None: the init_from checkpoint as it is
  exit_heads: train.TrainConfig
  exit_heads_level: Level
  eval: evaluate.EvalConfig
  stages: tuple[str, ...]


def _checked(key: str, build, *args, **kwargs):
  """build(*args, **kwargs), its errors prefixed with the config key they came from."""
  try:
    return build(*args, **kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f"--config.{key}: {e}") from None


def make_plan(c: ml_collections.ConfigDict, stages=STAGES) -> Plan:
  """Checks every config value the stages use; raises ValueError naming the key."""
  unknown = set(stages) - set(STAGES)
  if unknown or not stages:
    raise ValueError(f"--stages: expected some of {STAGES}, got {list(stages)}")
  if c.dataset not in data.DATASETS:
    raise ValueError(f"--config.dataset: unknown {c.dataset!r}; expected one of {sorted(data.DATASETS)}")
  _checked("splits", data.check_sizes, c.splits.to_dict())
  model = _checked("model", models.make_config, c.model.to_dict())
  is_bert = isinstance(model, bert.BertConfig)
  kind, classes = data.DATASETS[c.dataset].kind, data.DATASETS[c.dataset].num_classes
  if kind != ("text" if is_bert else "image"):
    article = "a text" if kind == "text" else "an image"
    raise ValueError(f"--config.dataset: {c.dataset!r} is {article} dataset, the model"
                     f" (arch {'bert' if is_bert else 'vit'}) reads "
                     + ("text" if is_bert else "images"))
  if model.num_classes != classes:  # labels beyond the heads would train and score silently wrong
    raise ValueError(f"--config.model.num_classes: {c.dataset} has {classes} classes,"
                     f" got {model.num_classes}")
  ladder = _checked("ladder", q.parse_ladder, c.ladder)
  if c.family not in q.FAMILIES:
    raise ValueError(f"--config.family: unknown {c.family!r}; expected one of {sorted(q.FAMILIES)}")
  if c.cost_unit not in COST_UNITS:
    raise ValueError(f"--config.cost_unit: expected one of {COST_UNITS}, got {c.cost_unit!r}")
  if c.init_from is None:  # common.require_checkpoint
    raise ValueError("--config.init_from: this config fine-tunes or evaluates a pretrained ViT;"
                     " give the path of its big_vision / vit_jax .npz checkpoint")
  if is_bert:  # post-training only: a pretrained encoder, frozen
    if c.init_from != bert_import.MINILM and not os.path.isdir(c.init_from or ""):
      raise ValueError(f"--config.init_from: a BERT needs its pretrained weights:"
                       f" {bert_import.MINILM!r} or a Hugging Face model directory,"
                       f" got {c.init_from!r}")
    if c.backbone.epochs != 0:
      raise ValueError("--config.backbone.epochs: a BERT encoder is used frozen; expected 0")
  elif c.init_from and not os.path.exists(c.init_from):
    raise ValueError(f"--config.init_from: no checkpoint at {c.init_from!r}")
  if c.backbone.epochs == 0:
    if not c.init_from:
      raise ValueError("--config.backbone.epochs: 0 (no training) needs --config.init_from")
    backbone = None
  else:
    backbone = _checked("backbone", train.TrainConfig, **c.backbone)
  exit_heads = _checked("exit_heads", train.TrainConfig, **c.exit_heads)
  heads_level = _checked("exit_heads_level", q.parse_level, c.exit_heads_level)
  for k in ("batch_size", "summary_dim"):
    v = c.collect[k]
    if isinstance(v, bool) or not isinstance(v, int) or v < (k == "batch_size"):
      raise ValueError(f"--config.collect.{k}: expected a {'positive' if k == 'batch_size' else 'non-negative'} int, got {v!r}")
  pred = _checked("eval.predictor", predictor.PredictorConfig, **c.eval.predictor)
  ev = c.eval
  eval_cfg = _checked("eval", evaluate.EvalConfig, seeds=tuple(ev.seeds), predictor=pred,
                      min_cluster=ev.min_cluster, max_clusters=ev.max_clusters, alpha=ev.alpha,
                      variants=tuple(ev.variants), budgets=tuple(ev.budgets),
                      soft_floor=ev.soft_floor, fallback_z=ev.fallback_z)
  if ev.signal_level and ev.signal_level not in q.precision.ladder_names(ladder):
    raise ValueError(f"--config.eval.signal_level: expected a level of the ladder"
                     f" {q.precision.ladder_names(ladder)} or '', got {ev.signal_level!r}")
  return Plan(model, ladder, backbone, exit_heads, heads_level, eval_cfg, tuple(stages))


def _plain(value):
  """value as it reads back from JSON (tuples become lists), for comparisons."""
  return json.loads(json.dumps(value))


def made_with(path: str, key: str, value) -> bool:
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


def _stage_dir(workdir: str, name: str, config: dict) -> str:
  """workdir/name for checkpoints made with config; emptied if they were made with another."""
  path = os.path.join(workdir, name)
  stamp = os.path.join(path, "config.json")
  if os.path.isdir(path) and not made_with(stamp, name, config):
    shutil.rmtree(path)
  if not os.path.exists(stamp):
    os.makedirs(path, exist_ok=True)
    _write_json(stamp, {"config": {name: config}})
  return path


def _print_accuracy(table: dict, exits, num_test: int) -> None:
  print(f"\ntest accuracy (%) per exit and level ({num_test} images):")
  print("| level | " + " | ".join(f"exit {e}" for e in exits) + " |")
  print("|---" * (len(exits) + 1) + "|")
  for level, accs in table.items():
    print(f"| {level} | " + " | ".join(f"{100 * a:.2f}" for a in accs) + " |")


def stamps(c: ml_collections.ConfigDict) -> dict:
  """The config values each stage's output depends on, as stored beside it."""
  backbone = _plain({"model": c.model.to_dict(), "backbone": c.backbone.to_dict(),
                     "init_from": c.init_from, "init_head": c.init_head, "dataset": c.dataset,
                     "seed": c.seed, "splits": c.splits.to_dict()})
  model = {**backbone, "exit_heads": c.exit_heads.to_dict(), "exit_heads_level": c.exit_heads_level}
  tables = _plain({"model": model, "ladder": c.ladder, "family": c.family,
                   "cost_unit": c.cost_unit, "summary_dim": c.collect.summary_dim})
  return {"backbone": backbone, "model": model, "tables": tables,
          "eval": _plain({"tables": tables, "eval": c.eval.to_dict(),
                          "results_version": evaluate.RESULTS_VERSION})}


def trained_params(c: ml_collections.ConfigDict, plan: Plan, splits: data.Splits, workdir: str,
                   timings: dict[str, float]):
  """The backbone and exit heads: restored when their checkpoints are finished, else trained
  (or resumed from the latest checkpoint)."""
  st = stamps(c)
  t0 = time.time()
  p = None
  if isinstance(plan.model, bert.BertConfig):
    p = bert_import.load_pretrained(c.init_from, plan.model, jax.random.key(c.seed))
  elif c.init_from:
    p = vit_import.import_big_vision(c.init_from, plan.model, jax.random.key(c.seed),
                                     load_head=c.init_head)
  if plan.backbone is not None:
    p = train.train_backbone(plan.model, splits.train, plan.backbone,
                             _stage_dir(workdir, "backbone", st["backbone"]), params=p,
                             eval_split=splits.cal)  # a progress signal; test stays unseen
  timings["backbone"] = time.time() - t0
  t0 = time.time()
  p = train.train_exit_heads(plan.model, p, splits.train, plan.exit_heads,
                             _stage_dir(workdir, "exit_heads", st["model"]),
                             level=plan.exit_heads_level)
  timings["exit_heads"] = time.time() - t0
  return p


def load_splits(c: ml_collections.ConfigDict, plan: Plan) -> data.Splits:
  m = plan.model
  if isinstance(m, bert.BertConfig):  # texts, tokenized as the encoder was trained
    tokenizer = bert_import.pretrained_tokenizer(c.init_from, m.seq_len)
    return data.load_splits(c.dataset, dict(c.splits), seed=c.seed, source=c.source,
                            data_dir=c.data_dir or None, tokenizer=tokenizer.encode)
  splits = data.load_splits(c.dataset, dict(c.splits), seed=c.seed, image_size=m.image_size,
                            source=c.source, data_dir=c.data_dir or None)
  _checked("model", data.check_model_input, splits.train, m.image_size, m.channels)
  return splits


def load_finished(workdir: str) -> tuple[ml_collections.ConfigDict, Plan, dict]:
  """(config, plan, {split: state table}) of a work directory this pipeline finished, for the
  scripts that read one; ValueError naming `workdir` if it is not finished."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"workdir: no config.json in {workdir!r}; run experiments.run into it first")
  with open(path) as f:
    c = ml_collections.ConfigDict(json.load(f))
  plan = make_plan(c)
  st = stamps(c)
  for name, key in (("accuracy.json", "model"), ("results.json", "eval")):
    if not made_with(os.path.join(workdir, name), key, st[key]):
      raise ValueError(f"workdir: {name} in {workdir!r} is missing or from another config;"
                       " finish `python -m experiments.run` with this config first")
  tables = {k: q.load_table(os.path.join(workdir, "tables", k)) for k in ("fit", "cal", "test")}
  return c, plan, tables


def run(c: ml_collections.ConfigDict, workdir: str, stages=STAGES) -> dict[str, float]:
  """Runs the selected stages into workdir; returns the wall time of each stage run.

  The config is saved as workdir/config.json, so tools such as
  experiments/bench_runtime.py need only the workdir.
  """
  plan = make_plan(c, stages)
  model, wd = plan.model, workdir
  os.makedirs(wd, exist_ok=True)
  _write_json(os.path.join(wd, "config.json"), c.to_dict())
  splits = load_splits(c, plan)
  timings: dict[str, float] = {}
  params = None
  st = stamps(c)
  model_cfg, table_cfg = st["model"], st["tables"]

  def trained():
    nonlocal params
    if params is None:
      params = trained_params(c, plan, splits, wd, timings)
      if jax.default_backend() != "cpu":  # before the accuracy table and state tables run levels
        print(q.device_check.summary(q.device_check.check_device(
            models.backbone(model), params, plan.ladder, splits.test.images)))
    return params

  if {"backbone", "exit_heads"} & set(plan.stages):
    acc_path = os.path.join(wd, "accuracy.json")
    if not made_with(acc_path, "model", model_cfg) or not made_with(acc_path, "ladder", c.ladder):
      table = train.accuracy_table(model, trained(), splits.test, plan.ladder)
      train_s = dict(timings)
      if made_with(acc_path, "model", model_cfg):  # only the ladder changed: keep the training times
        with open(acc_path) as f:
          train_s = json.load(f)["train_s"]
      _write_json(acc_path, {"config": {"model": model_cfg, "ladder": c.ladder},
                             "test_accuracy": table, "train_s": train_s,
                             "device": jax.devices()[0].device_kind})
    with open(acc_path) as f:
      _print_accuracy(json.load(f)["test_accuracy"], model.exits, splits.sizes()["test"])

  bb = models.backbone(model)
  names = q.precision.ladder_names(plan.ladder)
  tables = {}
  if {"tables", "evaluate"} & set(plan.stages):
    costs = None
    for split in ("fit", "cal", "test"):
      path = os.path.join(wd, "tables", split)
      if os.path.exists(os.path.join(path, "meta.json")):
        t = q.load_table(path, ladder=names, family=c.family)
        if t.meta.get("config") == table_cfg:
          tables[split] = t
          continue
      p = trained()
      if costs is None:
        costs = q.backbone_costs(bb, p, splits.fit.images[:1], plan.ladder, unit=c.cost_unit)
      fam = q.build_family(c.family, names, bb.exits, costs)
      t0 = time.time()
      tables[split] = q.collect_table(bb, p, fam, splits[split].images, splits[split].labels,
                                      c.collect.batch_size, summary_dim=c.collect.summary_dim,
                                      meta={"split": split, "config": table_cfg})
      timings[f"tables_{split}"] = time.time() - t0
      q.save_table(tables[split], path)

  results_path = os.path.join(wd, "results.json")
  eval_key = st["eval"]
  if "evaluate" in plan.stages and not made_with(results_path, "eval", eval_key):
    if jax.default_backend() != "cpu":  # the predictors predict at their level here
      t, pc = tables["test"], plan.eval.predictor
      summary_dim = 0 if t.summary is None else t.summary.shape[-1]
      print(q.device_check.summary([q.device_check.check_predictor(
          pc.level, t.family.num_gates, q.features.num_features(t.family, summary_dim), pc.hidden,
          len(t.family.candidates))]))
    t0 = time.time()
    # Runs already saved under predictors/ for these tables and settings are loaded.
    results = evaluate.evaluate(tables["fit"], tables["cal"], tables["test"], plan.eval,
                                meta={"dataset": c.dataset},
                                save_dir=os.path.join(wd, "predictors"))
    if c.eval.signal_level:
      results["signal_recovery"] = evaluate.signal_recovery(
          tables["fit"], tables["cal"], tables["test"], c.eval.signal_level,
          dataclasses.replace(plan.eval, seeds=tuple(c.eval.signal_seeds)),
          save_dir=os.path.join(wd, "predictors", "signal"))
    timings["evaluate"] = time.time() - t0
    results["config"] = {"eval": eval_key}
    results["device"] = jax.devices()[0].device_kind
    _write_json(results_path, results)

  if "report" in plan.stages and os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
    with open(os.path.join(wd, "report.md"), "w") as f:
      f.write(report.markdown(results) + "\n")
    plotting.plot_curves(results, os.path.join(wd, "curves.png"))
    print("\n" + report.methods_table(results))
    print(f"\nwrote {os.path.join(wd, 'report.md')} and {os.path.join(wd, 'curves.png')}")
  for stage, secs in timings.items():
    print(f"stage {stage}: {secs:.1f} s")
  return timings


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).")
  flags.DEFINE_string("workdir", None, "Where checkpoints, tables and results go.")
  flags.DEFINE_list("stages", list(STAGES), f"Stages to run, of {STAGES}.")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax chatter; our progress lines stay
    pylogging.getLogger("quee_jax").setLevel(pylogging.INFO)
    try:
      run(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.stages)
    except (ValueError, q.device_check.DeviceMismatch) as e:  # the message says what to change
      sys.exit(f"error: {e}")

  def parse_flags(argv):
    try:
      return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown key
      sys.exit(f"error: --config: no such key {str(e).strip(chr(34))} (check the override's spelling)")
    except (TypeError, ValueError, flags.Error) as e:
      sys.exit(f"error: {e}")

  app.run(main, flags_parser=parse_flags)
