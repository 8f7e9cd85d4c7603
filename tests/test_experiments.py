import json
import os
import subprocess
import sys

import pytest

from experiments.configs import fashion_mnist

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.parametrize("variant", ["", "demo"])
def test_fashion_mnist_config_builds(variant):
  import quee_jax as q
  from quee_jax import train
  c = fashion_mnist.get_config(variant)
  q.vit.ViTConfig(**c.model)
  train.TrainConfig(**c.backbone)
  train.TrainConfig(**c.exit_heads)
  assert len(q.parse_ladder(c.ladder)) == 4 and c.family in q.FAMILIES


def test_bad_variant_raises():
  with pytest.raises(ValueError, match="variant"):
    fashion_mnist.get_config("full")


TINY = ["--config.model.dim=16", "--config.model.mlp_dim=32", "--config.model.depth=2",
        "--config.splits.train=500", "--config.splits.fit=300", "--config.splits.cal=200",
        "--config.splits.test=200", "--config.backbone.epochs=1", "--config.exit_heads.epochs=1",
        "--config.backbone.batch_size=50", "--config.exit_heads.batch_size=50",
        "--config.eval.seeds=0", "--config.eval.predictor.epochs=2",
        "--config.eval.predictor.batch_size=32", "--config.eval.signal_level="]


def test_pipeline_runs_end_to_end_and_skips_finished_stages(tmp_path):
  cmd = [sys.executable, "-m", "experiments.run",
         "--config", "experiments/configs/fashion_mnist.py:demo", "--workdir", str(tmp_path), *TINY]
  first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "| w2a4 |" in first.stdout and "| quee |" in first.stdout
  acc = json.load(open(tmp_path / "accuracy.json"))["test_accuracy"]
  assert set(acc) == {"float", "w8a8", "w4a4", "w2a4"} and all(len(v) == 2 for v in acc.values())
  results = json.load(open(tmp_path / "results.json"))
  for key in ("dataset", "split_sizes", "ladder", "family", "cost_unit", "seeds", "full_model",
              "methods", "diagnostics"):
    assert key in results, key
  for name in ("quee", "quee_raw_targets", "quee_exit_only", "quee_quant_only", "static",
               "ee_confidence", "ee_confidence@float", "oracle_path", "oracle_consistency"):
    m = results["methods"][name]
    assert {"points", "auc", "auc_16", "min_cost", "acc_at_budget"} <= set(m), name
  assert set(results["methods"]["quee"]["budget_mode"]) == {"0.0625", "0.125", "0.25", "0.5"}
  assert (tmp_path / "curves.png").stat().st_size > 10_000
  assert "| quee |" in (tmp_path / "report.md").read_text()
  # A rerun finds every stage done: nothing is trained, collected or evaluated again.
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "stage tables" not in again.stdout and "stage evaluate" not in again.stdout
  assert json.load(open(tmp_path / "results.json")) == results
