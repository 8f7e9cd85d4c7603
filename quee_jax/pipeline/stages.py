r"""The pipeline: backbone -> exit heads -> state tables -> QuEE and baselines -> report.

  python -m experiments.run --config experiments/configs/fashion_mnist.py:demo --workdir /tmp/quee_demo
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
import os
import time

import jax
import ml_collections

from quee_jax import collect, data, models, protocol, train
from quee_jax.core import cost, paths
from quee_jax.core.table import StateTable, load_table, save_table
from quee_jax.gating import features
from quee_jax.models import bert, bert_import, vit_import
from quee_jax.pipeline.plan import STAGES, Plan, checked, make_plan
from quee_jax.pipeline.workdir import made_with, stage_dir, stamps
from quee_jax.protocol import report
from quee_jax.protocol.storage import write_json
from quee_jax.runtime import device_check


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
                             stage_dir(workdir, "backbone", st["backbone"]), params=p,
                             eval_split=splits.cal)  # a progress signal; test stays unseen
  timings["backbone"] = time.time() - t0
  t0 = time.time()
  p = train.train_exit_heads(plan.model, p, splits.train, plan.exit_heads,
                             stage_dir(workdir, "exit_heads", st["model"]),
                             level=plan.exit_heads_level)
  timings["exit_heads"] = time.time() - t0
  return p


def config_splits(c: ml_collections.ConfigDict, plan: Plan) -> data.Splits:
  """The config's dataset as four splits, read as the model reads them."""
  m = plan.model
  if isinstance(m, bert.BertConfig):  # texts, tokenized as the encoder was trained
    tokenizer = bert_import.pretrained_tokenizer(c.init_from, m.seq_len)
    return data.load_splits(c.dataset, dict(c.splits), seed=c.seed, source=c.source,
                            data_dir=c.data_dir or None, tokenizer=tokenizer.encode)
  splits = data.load_splits(c.dataset, dict(c.splits), seed=c.seed, image_size=m.image_size,
                            source=c.source, data_dir=c.data_dir or None)
  checked("model", data.check_model_input, splits.train, m.image_size, m.channels)
  return splits


@dataclasses.dataclass
class Run:
  """What the stages of one pipeline run share."""

  config: ml_collections.ConfigDict
  plan: Plan
  workdir: str
  splits: data.Splits
  timings: dict[str, float] = dataclasses.field(default_factory=dict)
  _params: object = dataclasses.field(default=None, init=False, repr=False)

  @property
  def stamps(self) -> dict:
    return stamps(self.config)

  def path(self, *names: str) -> str:
    return os.path.join(self.workdir, *names)

  def params(self):
    """The trained backbone and exit heads (trained or restored on first use)."""
    if self._params is None:
      self._params = trained_params(self.config, self.plan, self.splits, self.workdir,
                                    self.timings)
      if jax.default_backend() != "cpu":  # before the accuracy table and state tables run levels
        print(device_check.summary(device_check.check_device(
            models.backbone(self.plan.model), self._params, self.plan.ladder,
            self.splits.test.images)))
    return self._params


def accuracy_stage(r: Run) -> None:
  """accuracy.json: test accuracy per exit and level (trains what is not trained yet)."""
  c, model_cfg = r.config, r.stamps["model"]
  acc_path = r.path("accuracy.json")
  if not made_with(acc_path, "model", model_cfg) or not made_with(acc_path, "ladder", c.ladder):
    accuracy = train.accuracy_table(r.plan.model, r.params(), r.splits.test, r.plan.ladder)
    train_s = dict(r.timings)
    if made_with(acc_path, "model", model_cfg):  # only the ladder changed: keep the training times
      with open(acc_path) as f:
        train_s = json.load(f)["train_s"]
    write_json(acc_path, {"config": {"model": model_cfg, "ladder": c.ladder},
                          "test_accuracy": accuracy, "train_s": train_s,
                          "device": jax.devices()[0].device_kind}, indent=1)
  with open(acc_path) as f:
    accuracy = json.load(f)["test_accuracy"]
  exits = r.plan.model.exits
  print(f"\ntest accuracy (%) per exit and level ({r.splits.sizes()['test']} images):")
  print("| level | " + " | ".join(f"exit {e}" for e in exits) + " |")
  print("|---" * (len(exits) + 1) + "|")
  for level, accs in accuracy.items():
    print(f"| {level} | " + " | ".join(f"{100 * a:.2f}" for a in accs) + " |")


def tables_stage(r: Run) -> dict[str, StateTable]:
  """The fit, cal and test state tables: loaded where made with this config, else collected."""
  c, table_cfg = r.config, r.stamps["tables"]
  bb = models.backbone(r.plan.model)
  tables, family = {}, None
  for split in ("fit", "cal", "test"):
    path = r.path("tables", split)
    if os.path.exists(os.path.join(path, "meta.json")):
      t = load_table(path, ladder=r.plan.ladder, family=c.family)
      if t.meta.get("config") == table_cfg:
        tables[split] = t
        continue
    if family is None:
      costs = cost.backbone_costs(bb, r.params(), r.splits.fit.images[:1], r.plan.ladder,
                                  unit=c.cost_unit)
      family = paths.build_family(c.family, r.plan.ladder, bb.exits, costs)
    t0 = time.time()
    tables[split] = collect.collect_table(
        bb, r.params(), family, r.splits[split].images, r.splits[split].labels,
        c.collect.batch_size, summary_dim=c.collect.summary_dim,
        meta={"split": split, "config": table_cfg})
    r.timings[f"tables_{split}"] = time.time() - t0
    save_table(tables[split], path)
  return tables


def evaluate_stage(r: Run, tables: dict[str, StateTable]) -> None:
  """results.json: QuEE's variants, every baseline and the diagnostics on the tables."""
  c, plan, eval_key = r.config, r.plan, r.stamps["eval"]
  results_path = r.path("results.json")
  if made_with(results_path, "eval", eval_key):
    return
  if jax.default_backend() != "cpu":  # the predictors predict at their level here
    t, pc = tables["test"], plan.eval.predictor
    summary_dim = 0 if t.summary is None else t.summary.shape[-1]
    print(device_check.summary([device_check.check_predictor(
        pc.level, t.family.num_gates, features.num_features(t.family, summary_dim), pc.hidden,
        len(t.family.candidates))]))
  t0 = time.time()
  # Runs already saved under predictors/ for these tables and settings are loaded.
  results = protocol.evaluate(tables["fit"], tables["cal"], tables["test"], plan.eval,
                              meta={"dataset": c.dataset}, save_dir=r.path("predictors"))
  if c.eval.signal_level:
    results["signal_recovery"] = protocol.signal_recovery(
        tables["fit"], tables["cal"], tables["test"], c.eval.signal_level,
        dataclasses.replace(plan.eval, seeds=tuple(c.eval.signal_seeds)),
        save_dir=r.path("predictors", "signal"))
  r.timings["evaluate"] = time.time() - t0
  results["config"] = {"eval": eval_key}
  results["device"] = jax.devices()[0].device_kind
  write_json(results_path, results, indent=1)


def report_stage(r: Run) -> None:
  """report.md and curves.png from results.json, and the methods table on stdout."""
  if not os.path.exists(r.path("results.json")):
    return
  from quee_jax.protocol import plotting  # matplotlib, only where a figure is drawn
  with open(r.path("results.json")) as f:
    results = json.load(f)
  with open(r.path("report.md"), "w") as f:
    f.write(report.markdown(results) + "\n")
  plotting.plot_curves(results, r.path("curves.png"))
  print("\n" + report.methods_table(results))
  print(f"\nwrote {r.path('report.md')} and {r.path('curves.png')}")


def run(c: ml_collections.ConfigDict, workdir: str, stages=STAGES) -> dict[str, float]:
  """Runs the selected stages into workdir; returns the wall time of each stage run.

  The config is saved as workdir/config.json, so tools such as
  experiments/bench_runtime.py need only the workdir.
  """
  plan = make_plan(c, stages)
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, "config.json"), c.to_dict(), indent=1)
  r = Run(c, plan, workdir, config_splits(c, plan))
  if {"backbone", "exit_heads"} & set(plan.stages):
    accuracy_stage(r)
  if {"tables", "evaluate"} & set(plan.stages):
    tables = tables_stage(r)
    if "evaluate" in plan.stages:
      evaluate_stage(r, tables)
  if "report" in plan.stages:
    report_stage(r)
  for stage, secs in r.timings.items():
    print(f"stage {stage}: {secs:.1f} s")
  return r.timings
