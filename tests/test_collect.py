import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, family, images, labels

import quee_jax as q

LADDER = "float,w8a8,w4a4,w2a4"


def collect(bb, params, fam, x, y, batch_size, **kw):
  return q.collect_table(bb, params, fam, x, y, batch_size, keep_logits=True, progress=False, **kw)


@pytest.mark.parametrize("name", q.FAMILIES)
def test_state_logits_equal_a_forward_along_the_path(tiny, name):
  cfg, params, bb = tiny
  fam = family(bb, params, "float,w4a4,w2a4", name)
  x, y = images(6), labels(6)
  table = collect(bb, params, fam, x, y, batch_size=4)
  rng = np.random.default_rng(0)
  for s in rng.choice(fam.num_states, size=min(8, fam.num_states), replace=False):
    levels = fam.block_levels(s)
    levels += [levels[-1]] * (cfg.depth - len(levels))  # blocks past the state don't matter
    want, inter = q.vit.forward(params, jnp.asarray(x), cfg, levels)
    np.testing.assert_allclose(table.logits[s], want[fam.gate[s]], atol=1e-5, rtol=1e-5)
    h = inter[f"block_{cfg.exits[fam.gate[s]]}"]
    summary = q.vit.exit_summary(params, fam.gate[s], h, cfg) @ q.core.exit_stats.summary_projection(cfg.dim, 8)
    np.testing.assert_allclose(table.summary[s], summary, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(table.pred[s], np.argmax(want[fam.gate[s]], -1))
    np.testing.assert_array_equal(table.correct[s], table.pred[s] == y)


def test_trie_with_exit_subset():
  cfg = q.vit.ViTConfig(**{**TINY.__dict__, "depth": 4, "exits": (2, 4)})
  params = q.vit.init(jax.random.key(5), cfg)
  bb = q.vit.backbone(cfg)
  fam = family(bb, params, "float,w4a4", "switch_once")
  x = images(5)
  table = collect(bb, params, fam, x, labels(5), batch_size=8)
  s = fam.find(["float", "float", "w4a4", "w4a4"])
  want, _ = q.vit.forward(params, jnp.asarray(x), cfg, ["float", "float", "w4a4", "w4a4"])
  np.testing.assert_allclose(table.logits[s], want[1], atol=1e-5, rtol=1e-5)


def test_batch_independence_every_level_every_state(tiny):
  _, params, bb = tiny
  fam = family(bb, params, LADDER, "switch_once")
  x, y = images(7, seed=3), labels(7)
  batched = collect(bb, params, fam, x, y, batch_size=7)
  padded = collect(bb, params, fam, x, y, batch_size=4)  # 4 + 3 padded
  for i in (0, 4, 6):
    alone = collect(bb, params, fam, x[i:i + 1], y[i:i + 1], batch_size=1)
    for other in (batched, padded):
      np.testing.assert_array_equal(alone.pred[:, 0], other.pred[:, i])
      np.testing.assert_allclose(alone.logits[:, 0], other.logits[:, i], atol=1e-5, rtol=0)
      np.testing.assert_allclose(alone.summary[:, 0], other.summary[:, i], atol=1e-5, rtol=0)
      for k, v in alone.features.items():
        np.testing.assert_allclose(v[:, 0], other.features[k][:, i], atol=1e-5, err_msg=k)
  assert {fam.ladder[lvl] for lvl in fam.level} == set(LADDER.split(","))


def test_exit_only_one_level_is_plain_multi_exit_inference(tiny):
  cfg, params, bb = tiny
  fam = family(bb, params, "w4a4", "exit_only")
  assert fam.num_states == len(cfg.exits)
  x, y = images(9), labels(9)
  table = collect(bb, params, fam, x, y, batch_size=9)
  want, _ = q.vit.forward(params, jnp.asarray(x), cfg, "w4a4")
  np.testing.assert_allclose(table.logits, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(table.accuracy(), (np.argmax(want, -1) == y).mean(1))


def test_softmax_features():
  logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]], np.float32)
  parent = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
  f = q.softmax_features(jnp.asarray(logits), jnp.asarray(parent))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  pp = np.exp(parent) / np.exp(parent).sum(-1, keepdims=True)
  srt = np.sort(p, -1)
  np.testing.assert_allclose(f["max_prob"], srt[:, -1], rtol=1e-6)
  np.testing.assert_allclose(f["margin"], srt[:, -1] - srt[:, -2], rtol=1e-6)
  np.testing.assert_allclose(f["entropy"], -(p * np.log(p)).sum(-1), rtol=1e-5)
  np.testing.assert_allclose(f["kl_parent"], (p * np.log(p / pp)).sum(-1), rtol=1e-5)
  np.testing.assert_array_equal(f["agree_parent"], [0.0, 1.0])


def test_roots_have_neutral_parent_features(tiny):
  _, params, bb = tiny
  fam = family(bb, params, "float,w4a4")
  table = collect(bb, params, fam, images(3), labels(3), batch_size=3)
  roots = fam.parent < 0
  assert (table.features["kl_parent"][roots] == 0).all()
  assert (table.features["agree_parent"][roots] == 1).all()
  child = np.flatnonzero(~roots)[0]
  np.testing.assert_array_equal(table.features["agree_parent"][child],
                                table.pred[child] == table.pred[fam.parent[child]])


def test_streaming_compiles_once(tiny):
  _, params, bb = tiny
  traces = []

  def counting_embed(p, x):
    traces.append(x.shape)
    return bb.embed(p, x)

  counted = bb._replace(embed=counting_embed)
  fam = family(bb, params, "float,w4a4")
  table = q.collect_table(counted, params, fam, images(23), labels(23), 4, progress=False)
  assert table.num_samples == 23
  assert len(traces) == 1, traces  # 6 batches, the last padded


def test_save_load_round_trip(tiny, tmp_path):
  _, params, bb = tiny
  fam = family(bb, params, "float,w4a4", "constant")
  table = collect(bb, params, fam, images(5), labels(5), batch_size=4, meta={"split": "fit"})
  q.save_table(table, str(tmp_path / "t"))
  back = q.load_table(str(tmp_path / "t"), ladder=["float", "w4a4"], family="constant")
  assert table.summary.shape == (fam.num_states, 5, 8)
  for k in ("labels", "pred", "correct", "logits", "summary"):
    np.testing.assert_array_equal(getattr(back, k), getattr(table, k))
    assert getattr(back, k).dtype == getattr(table, k).dtype
  for k in q.FEATURES:
    np.testing.assert_array_equal(back.features[k], table.features[k])
  assert back.family.spec() == fam.spec() and back.meta == {"split": "fit"}
  assert back.backbone == table.backbone
  with pytest.raises(ValueError, match="ladder"):
    q.load_table(str(tmp_path / "t"), ladder=["float", "w2a4"])
  with pytest.raises(ValueError, match="family"):
    q.load_table(str(tmp_path / "t"), family="switch_once")
  with pytest.raises(ValueError, match="no state table"):
    q.load_table(str(tmp_path / "missing"))


def test_bad_collect_arguments_raise(tiny):
  _, params, bb = tiny
  fam = family(bb, params, "float")
  x, y = images(4), labels(4)
  cases = [((x, y + 10, 4), "labels"), ((x, y.astype(np.float32), 4), "labels"),
           ((x[:3], y, 4), "inputs"), ((x, y, 0), "batch_size"), ((x[:0], y[:0], 4), "inputs")]
  for args, match in cases:
    with pytest.raises(ValueError, match=match):
      q.collect_table(bb, params, fam, *args, progress=False)
  other = q.vit.ViTConfig(**{**TINY.__dict__, "exits": (2, 3)})
  with pytest.raises(ValueError, match="exits"):
    q.collect_table(q.vit.backbone(other), params, fam, x, y, 4, progress=False)
  with pytest.raises(ValueError, match="images"):
    q.collect_table(bb, params, fam, x[:, :4], y, 4, progress=False)


SHARDED = textwrap.dedent("""
    import jax, numpy as np, quee_jax as q
    from conftest import TINY, family, images, labels
    assert len(jax.local_devices()) == 8, jax.local_devices()
    params = q.vit.init(jax.random.key(0), TINY)
    bb = q.vit.backbone(TINY)
    fam = family(bb, params, "float,w4a4,w2a4")
    x, y = images(21), labels(21)
    run = lambda devices: q.collect_table(bb, params, fam, x, y, 16, keep_logits=True,
                                          devices=devices, progress=False)
    eight, one = run(None), run(jax.local_devices()[:1])
    np.testing.assert_array_equal(eight.pred, one.pred)
    np.testing.assert_array_equal(eight.correct, one.correct)
    np.testing.assert_allclose(eight.logits, one.logits, atol=1e-5, rtol=0)
    for k in q.FEATURES:
      np.testing.assert_allclose(eight.features[k], one.features[k], atol=1e-5, err_msg=k)
    try:
      q.collect_table(bb, params, fam, x, y, 12, progress=False)
      raise SystemExit("batch 12 on 8 devices should fail")
    except ValueError as e:
      assert "batch_size" in str(e)
    print("SHARDED_OK")
""")


def test_sharded_collection_over_8_devices_matches_one():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  here = os.path.dirname(__file__)
  out = subprocess.run([sys.executable, "-c", SHARDED], cwd=here, env=env,
                       capture_output=True, text=True, timeout=600)
  assert "SHARDED_OK" in out.stdout, out.stdout + out.stderr[-3000:]


def test_progress_reaches_a_log_file(tiny, caplog):
  """Not a terminal (as under pytest): plain lines, the last one at every batch done."""
  _, params, bb = tiny
  fam = family(bb, params, "float,w4a4")
  with caplog.at_level("INFO", logger="quee_jax.collect"):
    q.collect_table(bb, params, fam, images(23), labels(23), 4)
  lines = [r.getMessage() for r in caplog.records if r.name == "quee_jax.collect"]
  assert lines and lines[-1].startswith(f"collect {fam.name}: batch 6/6 (100%)"), lines
