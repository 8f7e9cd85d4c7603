"""Imports big_vision / vit_jax ViT checkpoints (.npz) into `quee_jax.models.vit` params.

Both namings are read:
  big_vision   pos_embedding [1, N, D] without the class token, LayerNorm_0/1,
               MultiHeadDotProductAttention_0, MlpBlock_0
  vit_jax      Transformer/posembed_input/pos_embedding [1, 1+N, D], LayerNorm_0/2,
               MultiHeadDotProductAttention_1, MlpBlock_3
with an optional 'params/' or 'opt/target/' prefix. The checkpoint's
`Transformer/encoder_norm` + `head` become the last exit head (class-token
pooling); the other exit heads keep the initialisation passed in. The position
embedding is resized bilinearly when the image size differs.

Get the real files (e.g. gs://vit_models/augreg/Ti_16-i21k-300ep-...npz, or
the big_vision zoo) with `gsutil cp` on a machine with the internet.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from quee_jax.models import vit

_PREFIXES = ("params/", "opt/target/")
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")
# Our block sub-tree -> the checkpoint's module names (big_vision first, then vit_jax).
_BLOCK_MODULES = {
    "ln1": ("LayerNorm_0",),
    "ln2": ("LayerNorm_1", "LayerNorm_2"),
    "attn": ("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1"),
    "mlp": ("MlpBlock_0", "MlpBlock_3"),
}


def load_npz(path: str) -> dict[str, np.ndarray]:
  """The flat {name: array} of a checkpoint, prefixes removed."""
  with np.load(path, allow_pickle=False) as z:
    flat = {k: z[k] for k in z.files}
  return strip_prefix(flat)


def strip_prefix(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  for prefix in _PREFIXES:
    if flat and all(k.startswith(prefix) for k in flat):
      return {k[len(prefix):]: v for k, v in flat.items()}
  return dict(flat)


def resize_posemb(grid: np.ndarray, side: int) -> np.ndarray:
  """[n*n, D] position embeddings of an n x n patch grid -> [side*side, D], bilinear."""
  n = int(round(np.sqrt(grid.shape[0])))
  if n * n != grid.shape[0]:
    raise ValueError(f"pos_embedding: {grid.shape[0]} positions do not form a square grid")
  if n == side:
    return grid
  out = jax.image.resize(jnp.asarray(grid.reshape(n, n, -1)), (side, side, grid.shape[-1]),
                         "bilinear")
  return np.asarray(out).reshape(side * side, -1)


@dataclasses.dataclass
class _Reader:
  """Reads a checkpoint's arrays by name, checking each one's shape against the config and
  recording it as used, so that whatever is left can be reported as unknown."""
  flat: dict[str, np.ndarray]
  cfg: vit.ViTConfig
  used: set[str] = dataclasses.field(default_factory=set)

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in self.flat:
      raise ValueError(f"checkpoint: missing key {name!r} (expected shape {shape})")
    value = np.asarray(self.flat[name], np.float32)
    if value.shape != tuple(shape):
      cfg = self.cfg
      raise ValueError(f"checkpoint: {name!r} has shape {value.shape}, this config"
                       f" (dim {cfg.dim}, heads {cfg.heads}, mlp {cfg.mlp_dim}, patch"
                       f" {cfg.patch}, {cfg.num_classes} classes) needs {tuple(shape)}")
    self.used.add(name)
    return value

  def layer_norm(self, prefix: str) -> dict[str, np.ndarray]:
    d = self.cfg.dim
    return {"scale": self.take(f"{prefix}/scale", (d,)), "bias": self.take(f"{prefix}/bias", (d,))}

  def dense(self, prefix: str, n_in: int, n_out: int) -> dict[str, np.ndarray]:
    return {"kernel": self.take(f"{prefix}/kernel", (n_in, n_out)),
            "bias": self.take(f"{prefix}/bias", (n_out,))}

  def module(self, i: int, ours: str) -> str:
    """Block i's module for our sub-tree `ours`, under whichever naming the checkpoint uses
    (big_vision's when it has neither, so that the missing key is named in that one)."""
    for name in _BLOCK_MODULES[ours]:
      prefix = f"Transformer/encoderblock_{i}/{name}"
      if any(k.startswith(prefix + "/") for k in self.flat):
        return prefix
    return f"Transformer/encoderblock_{i}/{_BLOCK_MODULES[ours][0]}"


def _block(r: _Reader, i: int) -> dict:
  """Block i's params; the checkpoint's per-head q/k/v/out kernels become our fused ones."""
  d, h, m = r.cfg.dim, r.cfg.heads, r.cfg.mlp_dim
  attn = r.module(i, "attn")
  qkv = [(r.take(f"{attn}/{n}/kernel", (d, h, d // h)).reshape(d, d),
          r.take(f"{attn}/{n}/bias", (h, d // h)).reshape(d)) for n in ("query", "key", "value")]
  mlp = r.module(i, "mlp")
  return {
      "ln1": r.layer_norm(r.module(i, "ln1")),
      "qkv": {"kernel": np.concatenate([k for k, _ in qkv], 1),
              "bias": np.concatenate([b for _, b in qkv])},
      "out": {"kernel": r.take(f"{attn}/out/kernel", (h, d // h, d)).reshape(d, d),
              "bias": r.take(f"{attn}/out/bias", (d,))},
      "ln2": r.layer_norm(r.module(i, "ln2")),
      "mlp1": r.dense(f"{mlp}/Dense_0", d, m),
      "mlp2": r.dense(f"{mlp}/Dense_1", m, d),
  }


def _check_depth(flat: Mapping[str, np.ndarray], depth: int) -> None:
  extra = sorted({int(g.group(1)) for k in flat if (g := _BLOCK.match(k))} - set(range(depth)))
  if extra:
    raise ValueError(f"checkpoint: has blocks {extra} beyond this config's depth {depth}"
                     f" (e.g. 'Transformer/encoderblock_{extra[0]}/...')")


def _pos_embedding(r: _Reader) -> np.ndarray | None:
  """[tokens, D] our learned position embeddings (None for sincos2d), resized to the image.

  Ours cover [cls, patch grid]; big_vision's the grid only (the class token gets zeros)."""
  cfg, d = r.cfg, r.cfg.dim
  pos_name = next((n for n in ("pos_embedding", "Transformer/posembed_input/pos_embedding",
                               "Transformer/pos_embedding") if n in r.flat), None)
  if cfg.posemb == "sincos2d" and pos_name is not None:
    raise ValueError(f"checkpoint: has a learned {pos_name!r}; set ViTConfig.posemb='learn'")
  if cfg.posemb != "learn":
    return None
  if pos_name is None:
    raise ValueError("checkpoint: missing key 'pos_embedding' (a fixed sin-cos model? set"
                     " ViTConfig.posemb='sincos2d')")
  pe = np.asarray(r.flat[pos_name], np.float32)
  r.used.add(pos_name)
  if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[2] != d:
    raise ValueError(f"checkpoint: {pos_name!r} has shape {pe.shape}, expected [1, N, {d}]")
  n = pe.shape[1]
  has_cls_pos = int(round(np.sqrt(n - 1))) ** 2 == n - 1 and n > 1
  cls_pos, grid = (pe[0, :1], pe[0, 1:]) if has_cls_pos else (np.zeros((1, d), np.float32), pe[0])
  pos = resize_posemb(grid, cfg.image_size // cfg.patch)
  return np.concatenate([cls_pos, pos]) if cfg.pool == "cls" else pos


def _check_pooling(flat: Mapping[str, np.ndarray], pool: str) -> None:
  if pool == "cls" and "cls" not in flat:
    raise ValueError("checkpoint: missing key 'cls' (a mean-pooled model?"
                     " set ViTConfig.pool='gap')")
  if pool == "gap" and "cls" in flat:
    raise ValueError("checkpoint: has a class token 'cls'; set ViTConfig.pool='cls'")


def _heads(r: _Reader, init_heads: list, load_head: bool) -> list:
  """The exit heads: `init_heads` with the last one the checkpoint's (when `load_head`)."""
  heads = list(init_heads)
  if load_head:
    if "pre_logits/kernel" in r.flat:
      raise ValueError("checkpoint: has 'pre_logits/kernel' (a representation layer our heads"
                       " lack); pass load_head=False and train the exit heads")
    heads[-1] = {"norm": r.layer_norm("Transformer/encoder_norm"),
                 "dense": r.dense("head", r.cfg.dim, r.cfg.num_classes)}
  else:  # the checkpoint's head is left out on purpose, not unknown
    r.used.update(k for k in r.flat
                  if k.startswith(("head/", "pre_logits/", "Transformer/encoder_norm/")))
  return heads


def _check_all_used(flat: Mapping[str, np.ndarray], used: set[str]) -> None:
  unknown = sorted(set(flat) - used)
  if unknown:
    raise ValueError(f"checkpoint: unknown keys {unknown[:8]}{' ...' if len(unknown) > 8 else ''}"
                     " (not a plain ViT with 'tok' or 'gap' pooling?)")


def import_big_vision(checkpoint: str | Mapping[str, np.ndarray], cfg: vit.ViTConfig,
                      key: jax.Array, *, load_head: bool = True) -> vit.Params:
  """Params for `cfg` from a big_vision / vit_jax checkpoint.

  Args:
    checkpoint: path of the .npz, or its flat {name: array} dict.
    cfg: our model config; width, depth, heads, mlp_dim, patch, pool ('cls' for
      big_vision's 'tok', 'gap') and posemb must match the checkpoint;
      image_size may differ (learned position embeddings are resized).
    key: initialises what the checkpoint lacks (intermediate exit heads, and
      the last head when load_head is False).
    load_head: take the checkpoint's head as the last exit head (its class
      count must equal cfg.num_classes); False keeps a fresh head, e.g. to
      fine-tune on another label set. pre_logits layers need False.

  Raises:
    ValueError naming the key that is missing, unknown, or of the wrong shape.
  """
  flat = load_npz(checkpoint) if isinstance(checkpoint, str) else strip_prefix(checkpoint)
  init = vit.init(key, cfg)
  r = _Reader(flat, cfg)
  blocks = [_block(r, i) for i in range(cfg.depth)]
  _check_depth(flat, cfg.depth)
  pos = _pos_embedding(r)
  _check_pooling(flat, cfg.pool)
  heads = _heads(r, init["heads"], load_head)
  d, p, c = cfg.dim, cfg.patch, cfg.channels
  params = {
      "embedding": {"kernel": r.take("embedding/kernel", (p, p, c, d)).reshape(p * p * c, d),
                    "bias": r.take("embedding/bias", (d,))},
      "blocks": blocks,
      "heads": heads,
  }
  if cfg.pool == "cls":
    params["cls"] = r.take("cls", (1, 1, d))
  if pos is not None:
    params["pos_embedding"] = pos[None]
  _check_all_used(flat, r.used)
  return jax.tree.map(jnp.asarray, params)
