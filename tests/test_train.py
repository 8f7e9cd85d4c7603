import logging
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import quee_jax as q
from quee_jax import data, train
from quee_jax.core import progress
from quee_jax.core.progress import Progress

SMALL = q.vit.ViTConfig(image_size=28, channels=1, patch=7, dim=16, depth=2, heads=2,
                        mlp_dim=32, num_classes=10)

RUN = textwrap.dedent("""
    import os, sys, numpy as np, jax
    import quee_jax as q
    from quee_jax import data, train
    workdir, out, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = q.vit.ViTConfig(image_size=28, channels=1, patch=7, dim=16, depth=2, heads=2,
                          mlp_dim=32, num_classes=10)
    split = data.load_splits("fashion_mnist_embedded").cal
    # 23 steps; stochastic depth and mixup draw from keys that resuming must replay
    tc = train.TrainConfig(epochs=0.5, batch_size=32, checkpoint_every=5, drop_path=0.1, mixup=0.2)

    def on_step(step, metrics):
      if step == kill_at:
        os._exit(17)  # as abrupt as a kill: no cleanup, no final save

    params = train.train_backbone(cfg, split, tc, workdir, on_step=on_step)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    np.savez(out, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})
""")


def _run(tmp_path, workdir, out, kill_at):
  return subprocess.run([sys.executable, "-c", RUN, str(tmp_path / workdir), str(tmp_path / out),
                         str(kill_at)], capture_output=True, text=True, timeout=600)


def test_killed_training_resumes_to_the_same_params(tmp_path):
  killed = _run(tmp_path, "resumed", "unused.npz", kill_at=13)
  assert killed.returncode == 17, killed.stderr[-2000:]
  saved = sorted(int(s) for s in os.listdir(tmp_path / "resumed") if s.isdigit())
  assert saved and max(saved) <= 13, saved  # it really stopped midway
  resumed = _run(tmp_path, "resumed", "resumed.npz", kill_at=-1)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  straight = _run(tmp_path, "straight", "straight.npz", kill_at=-1)
  assert straight.returncode == 0, straight.stderr[-2000:]
  a, b = np.load(tmp_path / "resumed.npz"), np.load(tmp_path / "straight.npz")
  assert sorted(a.files) == sorted(b.files) and len(a.files) > 10
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  init = q.vit.init(jax.random.key(0), SMALL)
  assert not np.array_equal(a["['blocks'][0]['qkv']['kernel']"], init["blocks"][0]["qkv"]["kernel"])


@pytest.fixture(scope="module")
def splits():
  return data.load_splits("fashion_mnist_embedded", {"train": 2000, "fit": 500, "cal": 500, "test": 500})


@pytest.fixture(scope="module")
def trained(splits, tmp_path_factory):
  """(initial params, params after 2 epochs of backbone training)."""
  params = q.vit.init(jax.random.key(0), SMALL)
  tc = train.TrainConfig(epochs=2, batch_size=50, learning_rate=3e-3, checkpoint_every=1000)
  return params, train.train_backbone(SMALL, splits.train, tc, str(tmp_path_factory.mktemp("bb")),
                                      params=params)


def test_backbone_training_leaves_intermediate_heads_alone(trained, splits):
  params, out = trained
  jax.tree.map(np.testing.assert_array_equal, out["heads"][0], params["heads"][0])
  assert not np.array_equal(out["heads"][1]["dense"]["kernel"], params["heads"][1]["dense"]["kernel"])
  assert train.evaluate_exits(q.models.backbone(SMALL), out, splits.test)[-1] > 0.4  # chance: 0.1


def test_exit_heads_train_on_a_frozen_backbone(tmp_path, trained, splits, caplog):
  _, params = trained
  before = train.evaluate_exits(q.models.backbone(SMALL), params, splits.test, "w4a4")
  tc = train.TrainConfig(epochs=3, batch_size=50, learning_rate=1e-2, checkpoint_every=1000)
  with caplog.at_level("INFO", logger="quee_jax.train"):
    out = train.train_exit_heads(q.models.backbone(SMALL), params, splits.train, tc, str(tmp_path / "heads"),
                                 level="w4a4", eval_split=splits.fit)
  # Each epoch line reports every exit, on train and on the eval split, not the last alone.
  epochs = [r.getMessage() for r in caplog.records if " epoch " in r.getMessage()]
  assert len(epochs) == 3, epochs
  for key in ("train_exit1", "train_exit2", "fit_exit1", "fit_exit2"):
    assert key in epochs[-1], epochs[-1]
  assert "accuracy" not in epochs[-1]
  for k in ("embedding", "cls", "pos_embedding", "blocks"):
    jax.tree.map(np.testing.assert_array_equal, out[k], params[k])
  after = train.evaluate_exits(q.models.backbone(SMALL), out, splits.test, "w4a4")
  assert after[0] > before[0] + 0.15 and after[1] > before[1] - 0.03, (before, after)
  # Rerunning finds the finished checkpoint and returns the same heads without training.
  again = train.train_exit_heads(q.models.backbone(SMALL), params, splits.train, tc, str(tmp_path / "heads"),
                                 level="w4a4")
  jax.tree.map(np.testing.assert_array_equal, again["heads"], out["heads"])


def test_progress_without_a_terminal_logs_plain_lines(caplog, monkeypatch):
  """A log file gets a line every ~10% of the steps (or minute) and one at the end."""
  log = logging.getLogger("quee_jax.train")
  with caplog.at_level("INFO", logger="quee_jax.train"):
    with Progress(40, "demo", logger=log, terminal=False) as bar:
      for _ in range(40):
        bar.update(1, loss="0.5")
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 10 and lines[0].startswith("demo: step 4/40 (10%)"), lines
  assert lines[-1].startswith("demo: step 40/40 (100%)") and "loss 0.5" in lines[-1]
  caplog.clear()
  with caplog.at_level("INFO", logger="quee_jax.train"):
    for kw in ({"terminal": True}, {"terminal": False, "enabled": False}):
      with Progress(5, "quiet", logger=log, **kw) as bar:  # a bar, or nothing: no lines
        bar.update(5)
    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0.0)  # time's up at every step
    with Progress(1000, "slow", logger=log, initial=10, terminal=False) as bar:
      bar.update(1)
  assert [r.getMessage()[:19] for r in caplog.records] == ["slow: step 11/1000 "]


def test_restore_with_other_shapes_names_the_key(tmp_path, splits):
  tc = train.TrainConfig(epochs=0.1, batch_size=50, checkpoint_every=1)
  train.train_backbone(SMALL, splits.train, tc, str(tmp_path / "bb"))
  wider = q.vit.ViTConfig(**{**SMALL.__dict__, "mlp_dim": 48})
  with pytest.raises(ValueError, match=r"'blocks/0/mlp1/bias' has shape \(32,\).*expects \(48,\)"):
    train.train_backbone(wider, splits.train, tc, str(tmp_path / "bb"))


def test_mixup_mixes_images_and_labels_with_one_weight():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 28, 28, 1)).astype(np.float32)
  y = np.array([0, 1, 2, 3, 4, 5])
  mixed, targets = train.mixup(jax.random.key(3), x, y, 10, alpha=0.4)
  lam = float(targets[0, 0])
  assert 0 < lam < 1 and float(targets[0, 5]) == pytest.approx(1 - lam)
  np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[::-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [{"epochs": 0}, {"batch_size": -1}, {"label_smoothing": 1.0},
                                {"weight_decay": -0.1}, {"mixup": -0.2}])
def test_bad_train_config_raises(kw):
  with pytest.raises(ValueError, match=list(kw)[0]):
    train.TrainConfig(**kw)
