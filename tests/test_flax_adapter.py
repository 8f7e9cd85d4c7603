"""Your own Flax model: a big_vision-structured linen ViT wrapped by the adapter equals the
project's ViT loaded from the same checkpoint, at every level and with either backend, runs
through tables, predictors and the runtime, and its errors name what is wrong."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, images, labels
from flax import linen as nn
from flax import nnx, traverse_util

import quee_jax as q
from quee_jax.examples import big_vision_vit as example
from quee_jax import runtime, train
from quee_jax.core import backbone as backbone_lib
from quee_jax.core import cost, precision, rewrite
from quee_jax.models import flax_adapter, vit_import

SHAPE = example.ViTShape(patch=TINY.patch, dim=TINY.dim, depth=TINY.depth, heads=TINY.heads,
                         mlp_dim=TINY.mlp_dim, num_classes=TINY.num_classes,
                         image_size=TINY.image_size, channels=TINY.channels)


@pytest.fixture(scope="module")
def pair():
  """(pure params, adapter model, adapter params) loaded from one big_vision-named checkpoint,
  with the same exit heads."""
  variables = example.init_variables(jax.random.key(3), SHAPE)
  checkpoint = {"/".join(k): np.asarray(v)
                for k, v in traverse_util.flatten_dict(variables).items()}
  pure = vit_import.import_big_vision(checkpoint, TINY, jax.random.key(4))
  model = example.flax_model(SHAPE)
  loaded = traverse_util.unflatten_dict(checkpoint, sep="/")
  params = {**model.init(jax.random.key(5), loaded), "heads": pure["heads"]}
  return pure, model, params


def logits(bb, params, x, level):
  fn = jax.jit(lambda p, x: backbone_lib.exit_logits(bb, p, x, (level,) * bb.num_blocks))
  return np.asarray(fn(params, x))


@pytest.mark.parametrize("backend", ["aqt", "qwix"])
def test_adapted_linen_vit_equals_the_pure_vit(pair, backend):
  pure, model, params = pair
  x = images(1000, seed=7)
  a = logits(q.models.backbone(TINY, backend), pure, x, q.FLOAT)
  b = logits(model.backbone(backend), params, x, q.FLOAT)
  np.testing.assert_allclose(a, b, atol=1e-5)
  for level in ("w8a8", "w4a4"):
    a = logits(q.models.backbone(TINY, backend), pure, x, q.parse_level(level))
    b = logits(model.backbone(backend), params, x, q.parse_level(level))
    same = (a.argmax(-1) == b.argmax(-1)).mean()
    assert same >= 0.999, f"{backend} {level}: {same:.4f} of predictions agree"


def test_export_loads_into_the_linen_vit_and_back_with_the_same_logits(tiny):
  cfg, params, bb = tiny  # class token and learned positions, the ViTConfig defaults
  checkpoint = example.export_big_vision(params, cfg)
  model = example.flax_model(SHAPE)
  loaded = {**model.init(jax.random.key(0), traverse_util.unflatten_dict(checkpoint, sep="/")),
            "heads": params["heads"]}
  back = {**vit_import.import_big_vision(checkpoint, cfg, jax.random.key(0), load_head=False),
          "heads": params["heads"]}
  x = images(64, seed=9)
  want = logits(bb, params, x, q.FLOAT)
  np.testing.assert_allclose(logits(model.backbone(), loaded, x, q.FLOAT), want, atol=1e-5)
  np.testing.assert_allclose(logits(bb, back, x, q.FLOAT), want, atol=1e-5)


def test_rewriting_the_pure_block_is_bit_identical_and_costs_the_same(tiny):
  cfg, params, bb = tiny
  h = bb.embed(params, images(8))
  as_written = lambda p, h: q.vit.block({"blocks": [p]}, 0, h, q.FLOAT, cfg)
  for backend in ("aqt", "qwix"):
    for level in map(q.parse_level, ("float", "w2a4")):
      want = jax.jit(lambda p, h: q.vit.block({"blocks": [p]}, 0, h, level, cfg,
                                              backend=backend))(params["blocks"][0], h)
      got = jax.jit(rewrite.at_level(as_written, level, backend))(params["blocks"][0], h)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Attention products found by data flow are charged a x a bits, as the tagged einsums are.
  assert (cost.count_macs(rewrite.at_level(as_written, q.FLOAT), params["blocks"][0], h[:1])
          == cost.count_macs(lambda h: bb.block(params, 0, h, q.FLOAT), h[:1]))


def test_qwix_backend_equals_qwix_own_ptq_of_the_linen_block(pair):
  # qwix's own Flax route (quantize_model + PtqProvider + quantize_params) on the user's block,
  # with the seam's calibration: the adapter's qwix levels are qwix's PTQ, attention included.
  import qwix
  _, _, params = pair
  block = example.Encoder1DBlock(SHAPE.mlp_dim, SHAPE.heads)
  p = jax.tree.map(jnp.asarray, params["model"]["Transformer"]["encoderblock_1"])
  h = jax.random.normal(jax.random.key(2), (6, TINY.num_tokens, TINY.dim))
  for level in map(q.parse_level, ("w8a8", "w4a4")):
    ptq_model = qwix.quantize_model(block, qwix.PtqProvider([precision.qwix_rule(level)]))
    abstract = jax.eval_shape(lambda: ptq_model.init(jax.random.key(0), h))["params"]
    want = ptq_model.apply({"params": qwix.quantize_params(p, abstract)}, h)[0]
    got = rewrite.at_level(lambda p, h: block.apply({"params": p}, h)[0], level, "qwix")(p, h)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_flax_backbone_runs_through_tables_predictors_and_the_runtime(pair):
  from test_runtime import CFG, make_fitted, simulated
  pure, model, params = pair
  bb = model.backbone()
  x, tables, fitted = make_fitted((TINY, params, bb), n=(240, 120, 120))
  # The tables equal the pure ViT's on (almost) every state: same checkpoint, same levels.
  fam = fitted.family
  pure_table = q.collect_table(q.models.backbone(TINY), pure, fam, x["test"],
                               labels(len(x["test"]), seed=12), batch_size=60, progress=False)
  assert (pure_table.pred == tables["test"].pred).mean() >= 0.999
  runner = runtime.Runner(bb, params, runtime.gating_from_fitted(fitted, CFG.predictor.level),
                          input_shape=x["test"].shape[1:], max_batch=64, min_chunk=8)
  for lam in (0.0, 0.05):
    out = runner.classify(x["test"], lam)
    state, pred = simulated(fitted, tables["test"], lam)
    np.testing.assert_array_equal(out.exit_state, state, err_msg=f"lambda {lam}")
    np.testing.assert_array_equal(out.pred, pred, err_msg=f"lambda {lam}")


def test_exit_heads_train_post_hoc_on_a_flax_backbone(pair, tmp_path):
  _, model, params = pair
  n = 256
  splits = q.data.load_splits("fashion_mnist_embedded", dict(train=n, fit=1, cal=n, test=1),
                              seed=0, image_size=TINY.image_size)
  tc = train.TrainConfig(epochs=2, batch_size=64, learning_rate=3e-3, warmup_epochs=0)
  bb = model.backbone()
  before = train.evaluate_exits(bb, params, splits.cal)
  out = train.train_exit_heads(bb, params, splits.train, tc, str(tmp_path / "heads"))
  after = train.evaluate_exits(bb, out, splits.cal)
  assert after.mean() > before.mean()
  # The user's parameters are frozen.
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), out["model"],
                                   params["model"]))


def test_nnx_module_runs_at_every_level():
  class Block(nnx.Module):
    def __init__(self, dim, rngs):
      self.dense = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, h):
      return h + nnx.gelu(self.dense(h))

  module = Block(8, nnx.Rngs(0))
  state = nnx.state(module, nnx.Param)
  part = flax_adapter.nnx_part(module, "")
  h = jax.random.normal(jax.random.key(1), (4, 3, 8))
  k = state["dense"]["kernel"][...]
  b = state["dense"]["bias"][...]
  for level in ("float", "w8a8", "w4a4"):
    got = rewrite.at_level(part.apply, level)(state, h)
    want = h + jax.nn.gelu(q.core.precision.dense(h, k, b, q.parse_level(level)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_adapter_errors_name_what_is_wrong(pair):
  pure, model, params = pair
  x = images(2)
  block = example.Encoder1DBlock(SHAPE.mlp_dim, SHAPE.heads)
  stem = flax_adapter.linen_part(example.Stem(SHAPE.patch, SHAPE.dim), "")
  parts = [flax_adapter.linen_part(block, f"Transformer/encoderblock_{i}",
                                   output=lambda out: out[0]) for i in range(4)]
  # A block whose parameters are missing from the tree.
  four = flax_adapter.FlaxModel(stem, parts, (2, 4), SHAPE.num_classes, SHAPE.dim)
  with pytest.raises(ValueError, match=r"blocks\[3\]: no parameters at "
                     r"'Transformer/encoderblock_3' \(no 'encoderblock_3' under Transformer"):
    four.init(jax.random.key(0), params["model"])
  # A subtree without the module's own parameters.
  wrong = flax_adapter.FlaxModel(stem, [flax_adapter.linen_part(block, "embedding")] * 3, (3,),
                                 SHAPE.num_classes, SHAPE.dim)
  with pytest.raises(ValueError, match=r"blocks\[0\] \(Encoder1DBlock with the parameters at"
                     r" 'embedding'\):"):
    wrong.backbone().block(params, 0, wrong.backbone().embed(params, x), q.FLOAT)
  # An exit after a block that does not exist.
  with pytest.raises(ValueError, match=r"FlaxModel.exits: positions must lie in \[1, 3\]"):
    flax_adapter.FlaxModel(stem, parts[:3], (2, 5), SHAPE.num_classes, SHAPE.dim)
  # A backend that does not exist, and levels a block cannot run at.
  with pytest.raises(ValueError, match=r"backend: expected one of \('aqt', 'qwix'\), got 'int8'"):
    model.backbone("int8")

  class Scanned(nn.Module):  # blocks under nn.scan: matmuls inside a loop
    @nn.compact
    def __call__(self, h):
      body = nn.scan(lambda mdl, c, _: (nn.Dense(h.shape[-1])(c), None),
                     variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
      return body(self, h, None)[0]

  scanned = Scanned()
  p = scanned.init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
  part = flax_adapter.linen_part(scanned, "")
  with pytest.raises(ValueError, match=r"blocks\[0\]: a matmul inside `scan`"):
    rewrite.at_level(part.apply, "w4a4", where="blocks[0]")(p, jnp.ones((2, 4)))

  conv = nn.Conv(4, (3, 3))
  p = conv.init(jax.random.key(0), jnp.zeros((1, 5, 5, 2)))["params"]
  part = flax_adapter.linen_part(conv, "")
  with pytest.raises(ValueError, match=r"embed: a convolution cannot run at level 'w8a8'"):
    rewrite.at_level(part.apply, "w8a8", where="embed")(p, jnp.ones((1, 5, 5, 2)))
  with pytest.raises(ValueError, match=r"module: expected a flax.linen Module \(linen_part\)"):
    flax_adapter.linen_part(lambda p, h: h, "")
  with pytest.raises(ValueError, match=r"FlaxModel.blocks\[1\]: expected a Part"):
    flax_adapter.FlaxModel(stem, [parts[0], block], (2,), SHAPE.num_classes, SHAPE.dim)
