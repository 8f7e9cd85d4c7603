"""A pure-function Vision Transformer with an exit head after chosen blocks.

Pre-LN encoder as in big_vision's ViT (GELU MLP, LayerNorm eps 1e-6), with
its two pooling choices (a class token, or the mean of the patch tokens: 'gap')
and two position embeddings (learned, or fixed 2-D sin-cos: 'sincos2d'). Every matmul of a block, the attention
QK^T and AV included, runs at the block's precision level through
`quee_jax.core.precision`; the patch embedding (reshape + dense, no convolution) and
the exit heads (LayerNorm + Dense on the pooled tokens) stay float.

Params are a plain pytree:
  embedding: {kernel [p*p*c, D], bias [D]}
  cls [1, 1, D]                   pool 'cls' only
  pos_embedding [1, T, D]         posemb 'learn' only (T counts the class token)
  blocks: list of {ln1, qkv {kernel [D, 3D]}, out, ln2, mlp1, mlp2}
  heads: list (one per exit) of {norm {scale, bias}, dense {kernel [D, C], bias}}
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from quee_jax.core import precision
from quee_jax.core.backbone import Backbone
from quee_jax.core.precision import FLOAT, Level
from quee_jax.models.layers import (
  attention,
  check_transformer_config,
  head_logits,
  head_summary,
  init_blocks,
  init_heads,
  layer_norm,
  multi_exit_backbone,
  xavier_dense,
)

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """ViT geometry. `exits` are block counts after which a head sits (default: all)."""

  image_size: int = 28
  channels: int = 1
  patch: int = 7
  dim: int = 96
  depth: int = 6
  heads: int = 4
  mlp_dim: int = 384
  num_classes: int = 10
  exits: tuple[int, ...] | None = None
  pool: str = "cls"  # 'cls' (class token) or 'gap' (mean of the patch tokens)
  posemb: str = "learn"  # 'learn' or 'sincos2d' (fixed)

  def __post_init__(self):
    check_transformer_config(self, ("image_size", "channels", "patch", "dim", "depth", "heads",
                                    "mlp_dim", "num_classes"))
    if self.image_size % self.patch:
      raise ValueError(
          f"ViTConfig.patch: must divide image_size {self.image_size}, got {self.patch}")
    for name, allowed in (("pool", ("cls", "gap")), ("posemb", ("learn", "sincos2d"))):
      if getattr(self, name) not in allowed:
        raise ValueError(f"ViTConfig.{name}: expected one of {allowed}, got {getattr(self, name)!r}")
    if self.posemb == "sincos2d" and self.dim % 4:
      raise ValueError(f"ViTConfig.dim: 'sincos2d' needs a multiple of 4, got {self.dim}")

  @property
  def num_tokens(self) -> int:
    """Tokens per image, the class token included."""
    return (self.image_size // self.patch) ** 2 + (self.pool == "cls")

  def to_dict(self) -> dict:
    return {"model": "vit", **dataclasses.asdict(self), "exits": list(self.exits)}


def init(key: jax.Array, cfg: ViTConfig) -> Params:
  """Random parameters for `cfg`."""
  k_embed, k_pos, k_blocks, k_heads = jax.random.split(key, 4)
  d = cfg.dim
  params = {
      "embedding": xavier_dense(k_embed, cfg.patch * cfg.patch * cfg.channels, d),
      "blocks": init_blocks(k_blocks, cfg.depth, d, cfg.mlp_dim, xavier_dense),
      "heads": init_heads(k_heads, len(cfg.exits), d, cfg.num_classes, xavier_dense),
  }
  if cfg.pool == "cls":
    params["cls"] = jnp.zeros((1, 1, d), jnp.float32)
  if cfg.posemb == "learn":
    params["pos_embedding"] = 0.02 * jax.random.normal(k_pos, (1, cfg.num_tokens, d), jnp.float32)
  return params


def sincos_2d(side: int, dim: int, temperature: float = 10_000.0) -> jax.Array:
  """Fixed [side*side, dim] embedding: sin and cos of x then y at dim/4 frequencies each."""
  y, x = jnp.meshgrid(jnp.arange(side), jnp.arange(side), indexing="ij")
  freqs = 1.0 / temperature ** (jnp.arange(dim // 4) / max(dim // 4 - 1, 1))
  x = x.reshape(-1, 1) * freqs
  y = y.reshape(-1, 1) * freqs
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[..., H, W, C] -> [..., (H/p)*(W/p), p*p*C], patch vectors in (row, col, channel) order."""
  *lead, h, w, c = images.shape
  x = images.reshape(*lead, h // patch, patch, w // patch, patch, c)
  x = jnp.moveaxis(x, -4, -3)  # [..., H/p, W/p, p, p, C]
  return x.reshape(*lead, (h // patch) * (w // patch), patch * patch * c)


def check_images(images: jax.Array, cfg: ViTConfig, arg: str = "images") -> None:
  """Raises ValueError unless images are float [..., H, W, C] matching cfg."""
  want = (cfg.image_size, cfg.image_size, cfg.channels)
  shape = tuple(images.shape)
  if len(shape) < 4 or shape[-3:] != want:
    raise ValueError(f"{arg}: expected shape [batch, {want[0]}, {want[1]}, {want[2]}]"
                     f" for this ViT, got {list(shape)}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"{arg}: expected a float dtype (normalized images), got {images.dtype}")


def embed(params: Params, images: jax.Array, cfg: ViTConfig) -> jax.Array:
  """Images [..., H, W, C] -> tokens [..., T+1, D] (class token first)."""
  check_images(images, cfg)
  x = precision.dense(patchify(images, cfg.patch), params["embedding"]["kernel"],
                      params["embedding"]["bias"], FLOAT)
  if cfg.pool == "cls":
    cls = jnp.broadcast_to(params["cls"], (*x.shape[:-2], 1, cfg.dim)).astype(x.dtype)
    x = jnp.concatenate([cls, x], axis=-2)
  if cfg.posemb == "learn":
    return x + params["pos_embedding"][0]
  pos = sincos_2d(cfg.image_size // cfg.patch, cfg.dim).astype(x.dtype)
  if cfg.pool == "cls":  # the class token carries no position
    pos = jnp.concatenate([jnp.zeros_like(pos[:1]), pos])
  return x + pos


def _drop_path(y: jax.Array, key: jax.Array, rate: float) -> jax.Array:
  """Stochastic depth: zero a residual branch per sample with probability rate."""
  keep = jax.random.bernoulli(key, 1.0 - rate, y.shape[:-2] + (1, 1))
  return jnp.where(keep, y / (1.0 - rate), 0.0)


def block(params: Params, i: int, h: jax.Array, level: Level, cfg: ViTConfig,
          drop_path: tuple[jax.Array, float] | None = None,
          backend: str = precision.DEFAULT_BACKEND) -> jax.Array:
  """Block i (0-based) at `level`, quantized with `backend`; every leading axis of h is a
  batch axis.

  drop_path: (key, rate) for stochastic depth while training; None at inference.
  """
  p = params["blocks"][i]
  y = attention(p, layer_norm(h, p["ln1"]), cfg.heads, level, backend=backend)
  if drop_path is not None:
    y = _drop_path(y, jax.random.fold_in(drop_path[0], 0), drop_path[1])
  h = h + y
  y = precision.dense(layer_norm(h, p["ln2"]), p["mlp1"]["kernel"], p["mlp1"]["bias"], level,
                      backend)
  y = precision.dense(jax.nn.gelu(y), p["mlp2"]["kernel"], p["mlp2"]["bias"], level, backend)
  if drop_path is not None:
    y = _drop_path(y, jax.random.fold_in(drop_path[0], 1), drop_path[1])
  return h + y


def pool(h: jax.Array, cfg: ViTConfig) -> jax.Array:
  """Tokens [..., T, D] -> [..., D]: the class token, or the mean of all tokens."""
  return h[..., 0, :] if cfg.pool == "cls" else jnp.mean(h, axis=-2)


def exit_summary(params: Params, e: int, h: jax.Array, cfg: ViTConfig) -> jax.Array:
  """The pooled tokens as exit e's head sees them (after its LayerNorm)."""
  return head_summary(params, e, pool(h, cfg))


def exit_head(params: Params, e: int, h: jax.Array, cfg: ViTConfig) -> jax.Array:
  """Exit e (index into cfg.exits): LayerNorm + Dense on the pooled tokens, float."""
  return head_logits(params, e, pool(h, cfg))


def _block_levels(levels: Level | str | Sequence[Level | str], depth: int) -> list[Level]:
  if isinstance(levels, str):  # one level (a Level is a str) for every block
    return [precision.parse_level(levels)] * depth
  levels = [precision.parse_level(level) for level in levels]
  if len(levels) != depth:
    raise ValueError(f"levels: expected one level per block ({depth}), got {len(levels)}")
  return levels


def forward(params: Params, images: jax.Array, cfg: ViTConfig,
            levels: Level | str | Sequence[Level | str] = FLOAT
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Runs every block and every exit head.

  Args:
    params: from `init` (or an importer).
    images: float [batch, H, W, C].
    cfg: the model geometry.
    levels: one level for all blocks, or one per block (a path).

  Returns:
    logits [num_exits, batch, classes] and intermediates {'embed': h0,
    'block_<i>': hidden state after block i (1-based)}.
  """
  levels = _block_levels(levels, cfg.depth)
  h = embed(params, images, cfg)
  intermediates = {"embed": h}
  logits = []
  for i, level in enumerate(levels):
    h = block(params, i, h, level, cfg)
    intermediates[f"block_{i + 1}"] = h
    if i + 1 in cfg.exits:
      logits.append(exit_head(params, cfg.exits.index(i + 1), h, cfg))
  return jnp.stack(logits), intermediates


def backbone(cfg: ViTConfig, backend: str = precision.DEFAULT_BACKEND) -> Backbone:
  """The ViT behind the backbone interface the QuEE core uses, quantized with `backend`."""
  return multi_exit_backbone(cfg, embed=embed, block=block, pool=pool, check_inputs=check_images,
                             backend=backend)
