import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, images

import quee_jax as q


@pytest.mark.parametrize("kw,match", [
    ({"depth": -1}, "depth"), ({"patch": 3}, "patch"), ({"heads": 3}, "heads"),
    ({"exits": (1, 2)}, "exits"), ({"exits": (2, 1, 3)}, "exits"), ({"exits": (0, 3)}, "exits"),
    ({"num_classes": 1}, "num_classes"), ({"dim": 16.0}, "dim"), ({"pool": "map"}, "pool"),
    ({"posemb": "sincos"}, "posemb"), ({"posemb": "sincos2d", "dim": 18, "heads": 2}, "dim")])
def test_bad_config_raises(kw, match):
  args = {**TINY.__dict__, **kw}
  with pytest.raises(ValueError, match=match):
    q.vit.ViTConfig(**args)


def test_forward_shapes_and_intermediates(tiny):
  cfg, params, _ = tiny
  logits, inter = q.vit.forward(params, jnp.asarray(images(3)), cfg, ["float", "w4a4", "w8a8"])
  assert logits.shape == (3, 3, cfg.num_classes)
  assert sorted(inter) == ["block_1", "block_2", "block_3", "embed"]
  assert inter["block_2"].shape == (3, cfg.num_tokens, cfg.dim)


def test_exit_subset():
  cfg = q.vit.ViTConfig(**{**TINY.__dict__, "exits": (2, 3)})
  params = q.vit.init(jax.random.key(0), cfg)
  assert len(params["heads"]) == 2
  logits, inter = q.vit.forward(params, jnp.asarray(images(2)), cfg)
  assert logits.shape == (2, 2, cfg.num_classes)
  np.testing.assert_array_equal(logits[0], q.vit.exit_head(params, 0, inter["block_2"], cfg))


def test_mean_pooling_and_sincos_positions():
  cfg = q.vit.ViTConfig(**{**TINY.__dict__, "pool": "gap", "posemb": "sincos2d"})
  params = q.vit.init(jax.random.key(0), cfg)
  assert "cls" not in params and "pos_embedding" not in params
  side = cfg.image_size // cfg.patch
  assert cfg.num_tokens == side * side
  x = jnp.asarray(images(2))
  h = q.vit.embed(params, x, cfg)
  patches = q.vit.patchify(x, cfg.patch) @ params["embedding"]["kernel"] + params["embedding"]["bias"]
  pos = q.vit.sincos_2d(side, cfg.dim)
  np.testing.assert_allclose(h, patches + pos, atol=1e-5)
  # Position (row 0, col 1) differs from (1, 0): x and y use separate quarters of the width.
  assert not np.allclose(pos[1], pos[side])
  logits, inter = q.vit.forward(params, x, cfg)
  head = params["heads"][-1]
  want = q.vit.layer_norm(inter["block_3"].mean(axis=1), head["norm"]) @ head["dense"]["kernel"]
  np.testing.assert_allclose(logits[-1], want + head["dense"]["bias"], atol=1e-5)


@pytest.mark.parametrize("shape,dtype,match", [
    ((2, 9, 8, 1), jnp.float32, "shape"), ((2, 8, 8, 3), jnp.float32, "shape"),
    ((8, 8, 1), jnp.float32, "shape"), ((2, 8, 8, 1), jnp.uint8, "dtype")])
def test_bad_images_raise(tiny, shape, dtype, match):
  cfg, params, _ = tiny
  with pytest.raises(ValueError, match=f"images.*{match}|{match}.*images"):
    q.vit.embed(params, jnp.zeros(shape, dtype), cfg)


def test_forward_bad_levels_raise(tiny):
  cfg, params, _ = tiny
  with pytest.raises(ValueError, match="levels"):
    q.vit.forward(params, jnp.asarray(images(1)), cfg, ["float", "w4a4"])
  with pytest.raises(ValueError, match="level"):
    q.vit.forward(params, jnp.asarray(images(1)), cfg, "w4")


def test_block_accepts_extra_leading_axes(tiny):
  cfg, params, _ = tiny
  h = jax.random.normal(jax.random.key(3), (2, 3, cfg.num_tokens, cfg.dim))
  level = q.parse_level("w4a4")
  stacked = q.vit.block(params, 1, h, level, cfg)
  flat = q.vit.block(params, 1, h.reshape(6, cfg.num_tokens, cfg.dim), level, cfg)
  np.testing.assert_allclose(stacked.reshape(flat.shape), flat, atol=1e-5)
