"""A big_vision-structured linen ViT, wrapped by the Flax adapter: the example to copy.

The modules are laid out and named as big_vision lays out its ViT
(`Transformer/encoderblock_{i}` = `Encoder1DBlock` with `LayerNorm_0`,
`MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`; `embedding`, `cls`,
`pos_embedding` at the root), so a big_vision `.npz` loads into them as it is and
`quee_jax.models.vit_import` reads the same file into the project's pure ViT.
`flax_model` cuts the model where QuEE needs it: the stem (patches, positions,
class token) is the embedding, each `encoderblock_{i}` a block.

  variables = load_variables("ViT-Ti_16.npz")      # {'embedding': ..., 'Transformer': ...}
  model = flax_model(ViTShape(patch=16, dim=192, depth=12, heads=3, mlp_dim=768,
                              num_classes=1000, image_size=224, pool="cls"))
  params = model.init(jax.random.key(0), variables)
  backbone = model.backbone("aqt")                   # or "qwix"
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from quee_jax.models import flax_adapter, vit, vit_import


class MlpBlock(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(nn.Dense(self.mlp_dim, kernel_init=nn.initializers.xavier_uniform())(x))
    return nn.Dense(x.shape[-1], kernel_init=nn.initializers.xavier_uniform())(y)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block; returns (x, aux) as big_vision's does."""
  mlp_dim: int
  num_heads: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads,
                                        kernel_init=nn.initializers.xavier_uniform())(y, y)
    x = x + y
    x = x + MlpBlock(self.mlp_dim)(nn.LayerNorm()(x))
    return x, {}


class Encoder(nn.Module):
  depth: int
  mlp_dim: int
  num_heads: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x, _ = Encoder1DBlock(self.mlp_dim, self.num_heads, name=f"encoderblock_{i}")(x)
    return nn.LayerNorm(name="encoder_norm")(x)


def _stem(module: nn.Module, images, patch: int, dim: int, posemb: str, pool: str):
  # Called inside a compact method: its parameters land in `module`'s scope, so the
  # whole ViT keeps them at its root, as big_vision does.
  x = nn.Conv(dim, (patch, patch), strides=(patch, patch), padding="VALID",
              name="embedding")(images)
  *lead, h, w, d = x.shape
  x = x.reshape(*lead, h * w, d)
  if posemb == "learn":
    x = x + module.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w, d))[0]
  else:
    x = x + vit.sincos_2d(h, d).astype(x.dtype)
  if pool == "cls":  # big_vision's 'tok': a class token without a position
    cls = module.param("cls", nn.initializers.zeros, (1, 1, d))
    x = jnp.concatenate([jnp.broadcast_to(cls, (*lead, 1, d)).astype(x.dtype), x], axis=-2)
  return x


class Stem(nn.Module):
  """Patches (a strided convolution named `embedding`), positions, class token."""
  patch: int
  dim: int
  posemb: str = "learn"  # or 'sincos2d'
  pool: str = "cls"  # 'cls' prepends a class token; 'gap' does not

  @nn.compact
  def __call__(self, images):
    return _stem(self, images, self.patch, self.dim, self.posemb, self.pool)


class ViT(nn.Module):
  """The whole model (stem, `Transformer` encoder, pooling, `head`), for init and reference."""
  shape: "ViTShape"

  @nn.compact
  def __call__(self, images):
    s = self.shape
    x = _stem(self, images, s.patch, s.dim, s.posemb, s.pool)
    x = Encoder(s.depth, s.mlp_dim, s.heads, name="Transformer")(x)
    x = x[..., 0, :] if s.pool == "cls" else jnp.mean(x, axis=-2)
    return nn.Dense(s.num_classes, name="head")(x)


@dataclasses.dataclass(frozen=True)
class ViTShape:
  patch: int
  dim: int
  depth: int
  heads: int
  mlp_dim: int
  num_classes: int
  image_size: int
  channels: int = 3
  pool: str = "cls"
  posemb: str = "learn"
  exits: tuple[int, ...] | None = None  # default: after every block


def flax_model(s: ViTShape) -> flax_adapter.FlaxModel:
  """The linen ViT of shape `s`, cut into stem and blocks for the adapter."""
  # The stem's parameters sit at the root (embedding, pos_embedding, cls), as in big_vision.
  stem = flax_adapter.linen_part(Stem(s.patch, s.dim, s.posemb, s.pool), "")
  block = Encoder1DBlock(s.mlp_dim, s.heads)  # one module, each block's own parameters
  blocks = [flax_adapter.linen_part(block, f"Transformer/encoderblock_{i}",
                                    output=lambda out: out[0]) for i in range(s.depth)]
  return flax_adapter.FlaxModel(
      embed=stem, blocks=blocks, exits=s.exits or tuple(range(1, s.depth + 1)),
      num_classes=s.num_classes, dim=s.dim, pool=s.pool, name="big_vision_vit")


def load_variables(path: str) -> dict[str, Any]:
  """A big_vision / vit_jax .npz as the nested parameter tree the linen modules read."""
  return traverse_util.unflatten_dict(vit_import.load_npz(path), sep="/")


def init_variables(key: jax.Array, s: ViTShape) -> dict[str, Any]:
  """Random parameters of the whole linen model (its `params` collection)."""
  images = jnp.zeros((1, s.image_size, s.image_size, s.channels), jnp.float32)
  return ViT(s).init(key, images)["params"]


def export_big_vision(params: vit.Params, cfg: vit.ViTConfig) -> dict[str, np.ndarray]:
  """The project's pure ViT params as a flat big_vision-named dict (`np.savez(path, **it)`),
  the inverse of `vit_import.import_big_vision` for the backbone (exit heads are not kept)."""
  d, h, p, c = cfg.dim, cfg.heads, cfg.patch, cfg.channels
  flat = {"embedding/kernel": np.asarray(params["embedding"]["kernel"]).reshape(p, p, c, d),
          "embedding/bias": np.asarray(params["embedding"]["bias"])}
  if cfg.pool == "cls":
    flat["cls"] = np.asarray(params["cls"])
  if cfg.posemb == "learn":
    pos = np.asarray(params["pos_embedding"])
    if cfg.pool == "cls":
      # Ours carry the class token's position first, big_vision's do not: the class token
      # is the same for every input, so its position folds into it exactly.
      flat["cls"] = flat["cls"] + pos[:, :1]
      pos = pos[:, 1:]
    flat["pos_embedding"] = pos
  for i, b in enumerate(params["blocks"]):
    pre = f"Transformer/encoderblock_{i}"
    qkv_k = np.split(np.asarray(b["qkv"]["kernel"]), 3, axis=1)
    qkv_b = np.split(np.asarray(b["qkv"]["bias"]), 3)
    for name, k, bias in zip(("query", "key", "value"), qkv_k, qkv_b):
      flat[f"{pre}/MultiHeadDotProductAttention_0/{name}/kernel"] = k.reshape(d, h, d // h)
      flat[f"{pre}/MultiHeadDotProductAttention_0/{name}/bias"] = bias.reshape(h, d // h)
    flat[f"{pre}/MultiHeadDotProductAttention_0/out/kernel"] = np.asarray(
        b["out"]["kernel"]).reshape(h, d // h, d)
    flat[f"{pre}/MultiHeadDotProductAttention_0/out/bias"] = np.asarray(b["out"]["bias"])
    for ours, theirs in (("ln1", "LayerNorm_0"), ("ln2", "LayerNorm_1"),
                         ("mlp1", "MlpBlock_0/Dense_0"), ("mlp2", "MlpBlock_0/Dense_1")):
      for k, v in b[ours].items():
        flat[f"{pre}/{theirs}/{k}"] = np.asarray(v)
  return flat
