"""What the models share: config checks, LayerNorm, quantized multi-head attention, and
exit heads on pooled tokens behind the backbone interface.

Every model here ends each exit in the same head: LayerNorm + Dense (float) on a
pooled vector; the pooled, normalized vector is also the exit's summary the
predictors see. `multi_exit_backbone` wires a model's embed / block / pool into
`quee_jax.core.backbone.Backbone` that way.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from quee_jax.core import precision
from quee_jax.core.backbone import Backbone, validate_exits
from quee_jax.core.precision import FLOAT, Level

Params = dict[str, Any]
HEAD_LN_EPS = 1e-6
MASK_LOGIT = -1e9  # added to the attention logits of padding keys


def check_transformer_config(cfg, positive_ints: tuple[str, ...]) -> None:
  """The checks every transformer config shares; fills in cfg.exits (default: every block).

  Raises ValueError naming the field: one of `positive_ints` not a positive int,
  heads not dividing dim, fewer than 2 classes, or bad exits.
  """
  name = type(cfg).__name__
  for field in positive_ints:
    value = getattr(cfg, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}.{field}: expected a positive int, got {value!r}")
  if cfg.dim % cfg.heads:
    raise ValueError(f"{name}.heads: must divide dim {cfg.dim}, got {cfg.heads}")
  if cfg.num_classes < 2:
    raise ValueError(f"{name}.num_classes: expected >= 2, got {cfg.num_classes}")
  exits = tuple(range(1, cfg.depth + 1)) if cfg.exits is None else tuple(cfg.exits)
  object.__setattr__(cfg, "exits", validate_exits(exits, cfg.depth, f"{name}.exits"))


def ln_init(dim: int) -> Params:
  return {"scale": jnp.ones((dim,), jnp.float32), "bias": jnp.zeros((dim,), jnp.float32)}


def xavier_dense(key: jax.Array, fan_in: int, fan_out: int) -> Params:
  """A fresh Dense layer: Xavier-uniform kernel (as big_vision's ViT), zero bias. Heads too:
  a zero head would make every exit of an untrained model predict class 0."""
  limit = np.sqrt(6.0 / (fan_in + fan_out))
  return {"kernel": jax.random.uniform(key, (fan_in, fan_out), jnp.float32, -limit, limit),
          "bias": jnp.zeros((fan_out,), jnp.float32)}


def init_blocks(key: jax.Array, depth: int, dim: int, mlp_dim: int,
                dense_init: Callable[[jax.Array, int, int], Params]) -> list[Params]:
  """Fresh transformer blocks {qkv, out, ln1, mlp1, mlp2, ln2}, dense layers from dense_init."""
  blocks = []
  for k in jax.random.split(key, depth):
    kq, ko, k1, k2 = jax.random.split(k, 4)
    blocks.append({"ln1": ln_init(dim), "qkv": dense_init(kq, dim, 3 * dim),
                   "out": dense_init(ko, dim, dim), "ln2": ln_init(dim),
                   "mlp1": dense_init(k1, dim, mlp_dim), "mlp2": dense_init(k2, mlp_dim, dim)})
  return blocks


def init_heads(key: jax.Array, num_exits: int, dim: int, num_classes: int,
               dense_init: Callable[[jax.Array, int, int], Params]) -> list[Params]:
  """Fresh exit heads (LayerNorm + Dense), one per exit."""
  return [{"norm": ln_init(dim), "dense": dense_init(k, dim, num_classes)}
          for k in jax.random.split(key, num_exits)]


def layer_norm(x: jax.Array, p: Params, eps: float = HEAD_LN_EPS) -> jax.Array:
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def attention(p: Params, x: jax.Array, heads: int, level: Level,
              mask: jax.Array | None = None,
              backend: str = precision.DEFAULT_BACKEND) -> jax.Array:
  """Multi-head self-attention, every matmul at `level` (QK^T and AV quantize both sides)
  with the quantization `backend`.

  p: {qkv {kernel [D, 3D], bias}, out {kernel [D, D], bias}}; x [..., T, D];
  mask [..., T]: 1 on real tokens, 0 on padding (None: every token is real).
  """
  dim = x.shape[-1]
  qkv = precision.dense(x, p["qkv"]["kernel"], p["qkv"]["bias"], level, backend)
  head_dim = dim // heads
  q, k, v = (t.reshape(*t.shape[:-1], heads, head_dim) for t in jnp.split(qkv, 3, axis=-1))
  q = q * (head_dim ** -0.5)
  if mask is not None:
    # Zero values at padding: the AV product's activation scale is taken along the keys,
    # so padding would otherwise set part of a real token's quantization scale.
    v = v * mask[..., :, None, None]
  scores = precision.einsum("...qhd,...khd->...hqk", q, k, level, both_activations=True,
                            backend=backend)
  if mask is not None:
    scores = scores + ((1.0 - mask) * MASK_LOGIT)[..., None, None, :]
  probs = jax.nn.softmax(scores, axis=-1)
  out = precision.einsum("...hqk,...khd->...qhd", probs, v, level, both_activations=True,
                         backend=backend)
  out = out.reshape(*out.shape[:-2], dim)
  return precision.dense(out, p["out"]["kernel"], p["out"]["bias"], level, backend)


def head_summary(params: Params, e: int, pooled: jax.Array) -> jax.Array:
  """Exit e's pooled vector after its head's LayerNorm."""
  return layer_norm(pooled, params["heads"][e]["norm"])


def head_logits(params: Params, e: int, pooled: jax.Array) -> jax.Array:
  """Exit e's logits: LayerNorm + Dense on the pooled vector, float."""
  p = params["heads"][e]["dense"]
  return precision.dense(head_summary(params, e, pooled), p["kernel"], p["bias"], FLOAT)


def multi_exit_backbone(cfg, *, embed: Callable, block: Callable, pool: Callable,
                        check_inputs: Callable, backend: str) -> Backbone:
  """The Backbone of a model whose functions take `cfg` last; heads on `pool(h, cfg)`;
  blocks quantized with `backend` (`block(..., cfg, backend=backend)`).

  cfg needs depth, exits, num_classes and to_dict(). One (cfg, functions, backend) gives one
  Backbone object, so functions jitted with it as a static argument (keyed by identity, as
  `train.evaluate_exits` does) compile once per config.
  """
  return _multi_exit_backbone(cfg, embed, block, pool, check_inputs,
                              precision.check_backend(backend))


@functools.cache
def _multi_exit_backbone(cfg, embed, block, pool, check_inputs, backend) -> Backbone:
  return Backbone(
      num_blocks=cfg.depth,
      exits=cfg.exits,
      num_classes=cfg.num_classes,
      embed=lambda params, x: embed(params, x, cfg),
      block=lambda params, i, h, level: block(params, i, h, level, cfg, backend=backend),
      exit_head=lambda params, e, h: head_logits(params, e, pool(h, cfg)),
      config={**cfg.to_dict(), "quant_backend": backend},
      summary=lambda params, e, h: head_summary(params, e, pool(h, cfg)),
      check_inputs=lambda x: check_inputs(x, cfg),
  )
