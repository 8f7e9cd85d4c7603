import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quee_jax as q
from quee_jax.models import vit_import

# ViT-Ti/16 as big_vision names it (width 192, depth 12, 3 heads, mlp 768).
TI = dict(dim=192, depth=12, heads=3, mlp_dim=768, patch=16, channels=3)


def big_vision_checkpoint(num_classes=1000, grid=14, old=False, seed=0, geometry=None):
  """A synthetic checkpoint with the exact names and shapes of big_vision's ViT-Ti/16
  (or of another geometry: a dict like TI)."""
  rng = np.random.default_rng(seed)
  g = geometry or TI
  d, h, m, p = g["dim"], g["heads"], g["mlp_dim"], g["patch"]
  r = lambda *shape: (0.02 * rng.normal(size=shape)).astype(np.float32)
  ln_names = ("LayerNorm_0", "LayerNorm_2") if old else ("LayerNorm_0", "LayerNorm_1")
  attn = "MultiHeadDotProductAttention_1" if old else "MultiHeadDotProductAttention_0"
  mlp = "MlpBlock_3" if old else "MlpBlock_0"
  flat = {"embedding/kernel": r(p, p, 3, d), "embedding/bias": r(d), "cls": r(1, 1, d),
          "Transformer/encoder_norm/scale": 1 + r(d), "Transformer/encoder_norm/bias": r(d),
          "head/kernel": r(d, num_classes), "head/bias": r(num_classes)}
  if old:
    flat["Transformer/posembed_input/pos_embedding"] = r(1, grid * grid + 1, d)
  else:
    flat["pos_embedding"] = r(1, grid * grid, d)
  for i in range(g["depth"]):
    b = f"Transformer/encoderblock_{i}/"
    for ln in ln_names:
      flat[b + ln + "/scale"], flat[b + ln + "/bias"] = 1 + r(d), r(d)
    for n in ("query", "key", "value"):
      flat[f"{b}{attn}/{n}/kernel"], flat[f"{b}{attn}/{n}/bias"] = r(d, h, d // h), r(h, d // h)
    flat[f"{b}{attn}/out/kernel"], flat[f"{b}{attn}/out/bias"] = r(h, d // h, d), r(d)
    flat[f"{b}{mlp}/Dense_0/kernel"], flat[f"{b}{mlp}/Dense_0/bias"] = r(d, m), r(m)
    flat[f"{b}{mlp}/Dense_1/kernel"], flat[f"{b}{mlp}/Dense_1/bias"] = r(m, d), r(d)
  return flat


@pytest.mark.parametrize("old", [False, True])
def test_import_maps_every_key_and_runs(tmp_path, old):
  flat = big_vision_checkpoint(old=old)
  path = str(tmp_path / "ti16.npz")
  np.savez(path, **{"params/" + k: v for k, v in flat.items()})
  cfg = q.vit.ViTConfig(image_size=224, num_classes=1000, exits=(4, 8, 12), **TI)
  params = vit_import.import_big_vision(path, cfg, jax.random.key(0))
  blk = params["blocks"][3]
  attn = "MultiHeadDotProductAttention_1" if old else "MultiHeadDotProductAttention_0"
  src = f"Transformer/encoderblock_3/{attn}"
  np.testing.assert_array_equal(blk["qkv"]["kernel"][:, 192:384], flat[f"{src}/key/kernel"].reshape(192, 192))
  np.testing.assert_array_equal(blk["out"]["kernel"], flat[f"{src}/out/kernel"].reshape(192, 192))
  np.testing.assert_array_equal(params["heads"][-1]["dense"]["kernel"], flat["head/kernel"])
  np.testing.assert_array_equal(params["embedding"]["kernel"], flat["embedding/kernel"].reshape(-1, 192))
  pos = flat["Transformer/posembed_input/pos_embedding"] if old else flat["pos_embedding"]
  np.testing.assert_array_equal(params["pos_embedding"][0, -196:], pos[0, -196:])
  assert params["pos_embedding"].shape == (1, 197, 192)
  logits, _ = jax.jit(lambda p, x: q.vit.forward(p, x, cfg))(params, jnp.zeros((2, 224, 224, 3)))
  assert logits.shape == (3, 2, 1000) and np.isfinite(logits).all()


def test_import_matches_big_vision_semantics():
  """big_vision adds posemb to the patches only; the class token gets none."""
  flat = big_vision_checkpoint(grid=2, num_classes=10)
  cfg = q.vit.ViTConfig(image_size=32, num_classes=10, **TI)
  params = vit_import.import_big_vision(flat, cfg, jax.random.key(0))
  np.testing.assert_array_equal(params["pos_embedding"][0, 0], 0)
  x = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
  h = q.vit.embed(params, x, cfg)
  patches = q.vit.patchify(x, 16) @ flat["embedding/kernel"].reshape(-1, 192) + flat["embedding/bias"]
  np.testing.assert_allclose(h[0, 1:], (patches + flat["pos_embedding"])[0], atol=1e-5)
  np.testing.assert_allclose(h[0, 0], flat["cls"][0, 0], atol=1e-6)


def test_posemb_resized_to_another_image_size():
  flat = big_vision_checkpoint(grid=14, num_classes=10)
  cfg = q.vit.ViTConfig(image_size=64, num_classes=10, **TI)
  params = vit_import.import_big_vision(flat, cfg, jax.random.key(0))
  assert params["pos_embedding"].shape == (1, 17, 192)
  smooth = np.ones((196, 4), np.float32)
  np.testing.assert_allclose(vit_import.resize_posemb(smooth, 4), np.ones((16, 4)), atol=1e-6)


def test_unknown_missing_and_mismatched_keys_are_named():
  cfg = q.vit.ViTConfig(image_size=224, num_classes=1000, **TI)
  key = jax.random.key(0)
  flat = big_vision_checkpoint()
  del flat["Transformer/encoderblock_7/MlpBlock_0/Dense_1/bias"]
  with pytest.raises(ValueError, match="encoderblock_7/MlpBlock_0/Dense_1/bias"):
    vit_import.import_big_vision(flat, cfg, key)
  flat = big_vision_checkpoint()
  flat["Transformer/encoderblock_2/extra_gate/kernel"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match="unknown keys.*extra_gate"):
    vit_import.import_big_vision(flat, cfg, key)
  with pytest.raises(ValueError, match="head/kernel.*shape"):
    vit_import.import_big_vision(big_vision_checkpoint(num_classes=21843), cfg, key)
  fresh = vit_import.import_big_vision(big_vision_checkpoint(num_classes=21843), cfg, key,
                                       load_head=False)
  assert fresh["heads"][-1]["dense"]["kernel"].shape == (192, 1000)
  deeper = q.vit.ViTConfig(image_size=224, num_classes=1000, **{**TI, "depth": 10})
  with pytest.raises(ValueError, match="beyond this config's depth"):
    vit_import.import_big_vision(big_vision_checkpoint(), deeper, key)
  flat = big_vision_checkpoint()
  del flat["cls"]
  with pytest.raises(ValueError, match="'cls'"):
    vit_import.import_big_vision(flat, cfg, key)
  gap = q.vit.ViTConfig(**{**cfg.__dict__, "pool": "gap"})
  params = vit_import.import_big_vision(flat, gap, key)  # a mean-pooled checkpoint
  assert "cls" not in params and params["pos_embedding"].shape == (1, 196, 192)
  with pytest.raises(ValueError, match="pool='cls'"):
    vit_import.import_big_vision(big_vision_checkpoint(), gap, key)
  sincos = q.vit.ViTConfig(**{**cfg.__dict__, "posemb": "sincos2d"})
  with pytest.raises(ValueError, match="posemb='learn'"):
    vit_import.import_big_vision(big_vision_checkpoint(), sincos, key)
