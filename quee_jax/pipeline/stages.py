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
message naming its key. A run holds a lock on WORKDIR (a second run on it is
refused); an output that is missing, damaged or made with other values is
recomputed, with a notice naming the file.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

import jax
import ml_collections

from quee_jax import collect, data, protocol, train
from quee_jax.core import cost, hosts, paths, precision
from quee_jax.core.progress import notice
from quee_jax.core.table import StateTable, load_table, save_table
from quee_jax.gating import features
from quee_jax.models import bert, bert_import, vit_import
from quee_jax.pipeline.plan import (STAGES, Plan, check_batches, checked, make_plan,
                                   quant_backend)
from quee_jax.pipeline.workdir import (LOCK, lock, made_with, read_json, stage_dir, stamps,
                                       write_sealed)
from quee_jax.protocol import report
from quee_jax.runtime import device_check


def trained_params(c: ml_collections.ConfigDict, plan: Plan, splits: data.Splits, workdir: str,
                   timings: dict[str, float]):
  """The backbone and exit heads: restored when their checkpoints are finished, else trained
  (or resumed from the latest checkpoint)."""
  workdir = os.path.abspath(workdir)  # orbax takes absolute paths only
  st = stamps(c)
  t0 = time.time()
  p = None
  say("backbone: start")
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
  say(f"backbone: finished in {timings['backbone']:.1f} s")
  t0 = time.time()
  say("exit_heads: start")
  p = train.train_exit_heads(plan.multi_exit, p, splits.train, plan.exit_heads,
                             stage_dir(workdir, "exit_heads", st["model"]),
                             level=plan.exit_heads_level, eval_split=splits.cal)
  timings["exit_heads"] = time.time() - t0
  say(f"exit_heads: finished in {timings['exit_heads']:.1f} s")
  return p


def say(message: str) -> None:
  """A progress line, as it happens (it reaches log files: plain print)."""
  print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


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
        # Host copies: the trained params may span every process's devices.
        print(device_check.summary(device_check.check_device(
            self.plan.multi_exit, hosts.to_host(self._params), self.plan.ladder,
            self.splits.test.images)))
    return self._params


def accuracy_stage(r: Run) -> None:
  """accuracy.json: test accuracy per exit and level (trains what is not trained yet)."""
  c, model_cfg = r.config, r.stamps["model"]
  acc_path = r.path("accuracy.json")
  old = read_json(acc_path)  # a damaged one: a notice, and None
  stamp = (old or {}).get("config")
  same_model = isinstance(stamp, dict) and stamp.get("model") == model_cfg
  backend = quant_backend(c)
  same_ladder = made_with(acc_path, "ladder", c.ladder, quiet=True)
  same_backend = same_model and stamp.get(  # files from before the choice: AQT
      "quant_backend", precision.DEFAULT_BACKEND) == backend
  accuracy = (old or {}).get("test_accuracy")
  if hosts.agree(not (same_model and same_ladder and same_backend) or not accuracy):
    if old is not None and not same_model:
      notice(f"{acc_path} was made with another model config; measuring it again")
    elif old is not None and not (same_ladder and same_backend):
      other = "ladder" if not same_ladder else "quantization backend"
      notice(f"{acc_path} was measured with another {other}; measuring it again")
    accuracy = train.accuracy_table(r.plan.multi_exit, r.params(), r.splits.test,
                                    r.plan.ladder)
    train_s = dict(r.timings)
    if same_model and "train_s" in old:  # only the ladder changed: keep the training times
      train_s = old["train_s"]
    write_sealed(acc_path, {"config": {"model": model_cfg, "ladder": c.ladder,
                                       "quant_backend": backend},
                            "test_accuracy": accuracy, "train_s": train_s,
                            "device": jax.devices()[0].device_kind}, indent=1)
    accuracy = (read_json(acc_path) or {}).get("test_accuracy")  # as later runs read it
  else:
    say("backbone: skipped (done)")
    say("exit_heads: skipped (done)")
  if not hosts.is_writer():  # (which prints; another may not have read the file)
    return
  exits = r.plan.model.exits
  print(f"\ntest accuracy (%) per exit and level ({r.splits.sizes()['test']} images):")
  print("| level | " + " | ".join(f"exit {e}" for e in exits) + " |")
  print("|---" * (len(exits) + 1) + "|")
  for level, accs in accuracy.items():
    print(f"| {level} | " + " | ".join(f"{100 * a:.2f}" for a in accs) + " |")


def tables_stage(r: Run) -> dict[str, StateTable]:
  """The fit, cal and test state tables: loaded where made with this config, else collected."""
  c, table_cfg = r.config, r.stamps["tables"]
  bb = r.plan.multi_exit
  tables, family = {}, None
  for split in ("fit", "cal", "test"):
    path = r.path("tables", split)
    t = _finished_table(path, split, table_cfg)
    if hosts.agree(t is not None):  # (only process 0, which evaluates, needs the table)
      tables[split] = t
      continue
    if family is None:
      say("tables: start")
      costs = cost.backbone_costs(bb, r.params(), r.splits.fit.images[:1], r.plan.ladder,
                                  unit=c.cost_unit)
      family = paths.build_family(c.family, r.plan.ladder, bb.exits, costs)
    t0 = time.time()
    tables[split] = collect.collect_table(
        bb, r.params(), family, r.splits[split].images, r.splits[split].labels,
        c.collect.batch_size, summary_dim=c.collect.summary_dim,
        meta={"split": split, "config": table_cfg})
    r.timings[f"tables_{split}"] = time.time() - t0
    if hosts.is_writer():  # every process has the table; one writes it
      save_table(tables[split], path)
    hosts.barrier(f"tables {split}")
    say(f"tables: {split} collected in {r.timings[f'tables_{split}']:.1f} s")
  if family is None:
    say("tables: skipped (done)")
  return tables


def _finished_table(path: str, split: str, table_cfg: dict) -> StateTable | None:
  """The table at path if it was collected with table_cfg; else None, with a notice."""
  if not os.path.exists(os.path.join(path, "meta.json")):
    return None
  try:
    t = load_table(path)  # the stamp below covers the ladder and the family
  except ValueError as e:  # damaged: named in the message
    notice(f"{str(e).removeprefix('path: ')}; collecting the {split} table again")
    return None
  stamp = t.meta.get("config")
  if stamp == table_cfg:
    return t
  changed = sorted(k for k in table_cfg if not isinstance(stamp, dict)
                   or stamp.get(k) != table_cfg[k])
  notice(f"{path} was collected with another {', '.join(changed) or 'config'};"
         f" collecting the {split} table again")
  return None


def evaluate_stage(r: Run, tables: dict[str, StateTable]) -> None:
  """results.json: QuEE's variants, every baseline and the diagnostics on the tables."""
  eval_key = r.stamps["eval"]
  results_path = r.path("results.json")
  if hosts.agree(made_with(results_path, "eval", eval_key)):
    say("evaluate: skipped (done)")
    return
  say("evaluate: start")
  # One process evaluates (cheap next to the tables, and its runs are saved under
  # predictors/); the others wait for results.json in write_sealed.
  results = _evaluate(r, tables) if hosts.is_writer() else None
  write_sealed(results_path, results, indent=1)
  say(f"evaluate: finished in {r.timings.get('evaluate', 0):.1f} s")


def _evaluate(r: Run, tables: dict[str, StateTable]) -> dict:
  """results.json's content."""
  c, plan, eval_key = r.config, r.plan, r.stamps["eval"]
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
  return results


def report_stage(r: Run) -> None:
  """report.md and curves.png from results.json, and the methods table on stdout."""
  if not hosts.is_writer():  # nothing to compute: the writer writes both files
    return
  results = read_json(r.path("results.json"))  # a damaged one: a notice, and None
  if results is None:
    say("report: skipped (no usable results.json; evaluate first)")
    return
  from quee_jax.protocol import plotting  # matplotlib, only where a figure is drawn
  with open(r.path("report.md"), "w") as f:
    f.write(report.markdown(results) + "\n")
  plotting.plot_curves(results, r.path("curves.png"))
  print("\n" + report.methods_table(results))
  print(f"\nwrote {r.path('report.md')} and {r.path('curves.png')}")


def run(c: ml_collections.ConfigDict, workdir: str, stages=STAGES) -> dict[str, float]:
  """Runs the selected stages into workdir; returns the wall time of each stage run.

  Holds workdir's lock throughout (ValueError naming the holder if another run has it).
  The config is saved as workdir/config.json once the config is checked and the data
  loaded, so tools such as experiments/bench_runtime.py need only the workdir.
  """
  plan = make_plan(c, stages)
  check_batches(plan, c, jax.device_count())  # every device of every process
  workdir = os.path.abspath(workdir)  # orbax takes absolute paths only
  fresh = not os.path.exists(workdir)
  with lock(workdir):
    t0 = time.time()
    try:
      splits = config_splits(c, plan)
    except BaseException:
      if fresh and hosts.is_writer() and os.listdir(workdir) == [LOCK]:
        # a failed first run leaves nothing behind
        shutil.rmtree(workdir, ignore_errors=True)
      raise
    write_sealed(os.path.join(workdir, "config.json"), c.to_dict(), indent=1)
    say(banner(c, plan, splits, workdir) + f" (data loaded in {time.time() - t0:.1f} s)")
    return _run_stages(Run(c, plan, workdir, splits))


def banner(c: ml_collections.ConfigDict, plan: Plan, splits: data.Splits, workdir: str) -> str:
  """What this run is, in two lines: dataset, split sizes, model, ladder, family, seeds, where."""
  m = plan.model
  arch = "bert" if isinstance(m, bert.BertConfig) else f"vit patch {m.patch}"
  sizes = ", ".join(f"{k} {v}" for k, v in splits.sizes().items())
  return (f"pipeline: {c.dataset} ({sizes}); {arch} depth {m.depth} width {m.dim};"
          f" ladder {','.join(plan.ladder)}; family {c.family};"
          f" seeds {','.join(map(str, plan.eval.seeds))}\n  work directory {workdir}")


def _run_stages(r: Run) -> dict[str, float]:
  plan = r.plan
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
  hosts.barrier("done")  # no process leaves while another still writes
  return r.timings
