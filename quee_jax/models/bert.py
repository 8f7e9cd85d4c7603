"""A pure-function BERT encoder with an exit head after chosen blocks.

Post-LN encoder as in BERT (token + position + type embeddings, LayerNorm eps
1e-12, exact-erf GELU), so pretrained weights such as all-MiniLM-L6-v2 load as
they are (`quee_jax.models.bert_import`). Every dense layer of a block and both
attention einsums run at the block's precision level through
`quee_jax.core.precision`; embeddings and exit heads stay float.

Inputs are token ids [..., T] (int), 0 being padding. The backbone interface
hands one array from block to block, so the attention mask travels with the
hidden state as its last channel: h is [..., T, D + 1], h[..., D] = 1 on real
tokens and 0 on padding. Padding never reaches a real token at any level: its
attention logits get -1e9, its values are zeroed (so it sets no quantization
scale either), and pooling skips it.

Params are a plain pytree:
  embeddings: {word [V, D], position [P, D], type [2, D], norm {scale, bias}}
  blocks: list of {qkv {kernel [D, 3D], bias}, out, ln1, mlp1, mlp2, ln2}
  heads: list (one per exit) of {norm {scale, bias}, dense {kernel [D, C], bias}}
The query, key and value projections are stored as one [D, 3D] kernel: with
per-output-channel weight scales and per-token activation scales this is the
same quantized computation as three separate ones, in one matmul.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from quee_jax.core import precision
from quee_jax.core.backbone import Backbone
from quee_jax.core.precision import FLOAT, Level
from quee_jax.models import layers
from quee_jax.models.layers import (
  attention,
  check_transformer_config,
  layer_norm,
  ln_init,
  multi_exit_backbone,
)

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """BERT geometry (defaults: all-MiniLM-L6-v2) and the exits' pooling.

  seq_len: tokens per input, [CLS] and [SEP] included (inputs are padded or
    truncated to it by the tokenizer).
  pool: 'mean' (the mean of the real tokens, as sentence-transformers pools)
    or 'cls' (the first token).
  """

  vocab_size: int = 30522
  seq_len: int = 64
  dim: int = 384
  depth: int = 6
  heads: int = 12
  mlp_dim: int = 1536
  max_positions: int = 512
  type_vocab_size: int = 2
  num_classes: int = 2
  exits: tuple[int, ...] | None = None
  pool: str = "mean"
  ln_eps: float = 1e-12

  def __post_init__(self):
    check_transformer_config(self, ("vocab_size", "seq_len", "dim", "depth", "heads", "mlp_dim",
                                    "max_positions", "type_vocab_size", "num_classes"))
    if not 2 <= self.seq_len <= self.max_positions:
      raise ValueError(f"BertConfig.seq_len: expected 2..{self.max_positions} ([CLS] and [SEP]"
                       f" included), got {self.seq_len}")
    if self.pool not in ("mean", "cls"):
      raise ValueError(f"BertConfig.pool: expected 'mean' or 'cls', got {self.pool!r}")

  def to_dict(self) -> dict:
    return {"model": "bert", **dataclasses.asdict(self), "exits": list(self.exits)}


def _dense_init(key, fan_in, fan_out, std=0.02):
  # BERT's initializer: truncated-free normal(0.02), zero bias.
  return {"kernel": std * jax.random.normal(key, (fan_in, fan_out), jnp.float32),
          "bias": jnp.zeros((fan_out,), jnp.float32)}


def init_heads(key: jax.Array, cfg: BertConfig) -> list[Params]:
  """Fresh exit heads (LayerNorm + Dense) for every exit of cfg."""
  return layers.init_heads(key, len(cfg.exits), cfg.dim, cfg.num_classes, _dense_init)


def init(key: jax.Array, cfg: BertConfig) -> Params:
  """Random parameters for `cfg` (tests, or training from scratch)."""
  k_emb, k_blocks, k_heads = jax.random.split(key, 3)
  kw, kp, kt = jax.random.split(k_emb, 3)
  d = cfg.dim
  return {
      "embeddings": {"word": 0.02 * jax.random.normal(kw, (cfg.vocab_size, d), jnp.float32),
                     "position": 0.02 * jax.random.normal(kp, (cfg.max_positions, d), jnp.float32),
                     "type": 0.02 * jax.random.normal(kt, (cfg.type_vocab_size, d), jnp.float32),
                     "norm": ln_init(d)},
      "blocks": layers.init_blocks(k_blocks, cfg.depth, d, cfg.mlp_dim, _dense_init),
      "heads": init_heads(k_heads, cfg),
  }


def check_ids(ids, cfg: BertConfig, arg: str = "ids") -> None:
  """Raises ValueError unless ids are ints [..., seq_len] (values checked when concrete)."""
  shape = tuple(np.shape(ids))
  if len(shape) < 2 or shape[-1] != cfg.seq_len:
    raise ValueError(f"{arg}: expected token ids of shape [batch, {cfg.seq_len}], got {list(shape)}")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"{arg}: expected integer token ids, got {ids.dtype}")
  if not isinstance(ids, jax.core.Tracer) and np.size(ids):
    lo, hi = int(np.min(ids)), int(np.max(ids))
    if lo < 0 or hi >= cfg.vocab_size:  # a gather would clamp them silently
      raise ValueError(f"{arg}: token ids must lie in [0, {cfg.vocab_size}), got [{lo}, {hi}]")


def embed(params: Params, ids: jax.Array, cfg: BertConfig) -> jax.Array:
  """Token ids [..., T] -> hidden states [..., T, D + 1] (the last channel: the mask)."""
  check_ids(ids, cfg)
  e = params["embeddings"]
  x = e["word"][ids] + e["position"][:cfg.seq_len] + e["type"][0]
  x = layer_norm(x, e["norm"], cfg.ln_eps)
  mask = (ids != 0).astype(x.dtype)[..., None]
  return jnp.concatenate([x, mask], axis=-1)


def _split(h: jax.Array) -> tuple[jax.Array, jax.Array]:
  return h[..., :-1], h[..., -1]


def block(params: Params, i: int, h: jax.Array, level: Level, cfg: BertConfig,
          backend: str = precision.DEFAULT_BACKEND) -> jax.Array:
  """Block i (0-based) at `level` (post-LN), quantized with `backend`; every leading axis of
  h is a batch axis."""
  p = params["blocks"][i]
  x, mask = _split(h)
  x = layer_norm(x + attention(p, x, cfg.heads, level, mask, backend), p["ln1"], cfg.ln_eps)
  y = precision.dense(x, p["mlp1"]["kernel"], p["mlp1"]["bias"], level, backend)
  y = precision.dense(jax.nn.gelu(y, approximate=False), p["mlp2"]["kernel"], p["mlp2"]["bias"],
                      level, backend)
  x = layer_norm(x + y, p["ln2"], cfg.ln_eps)
  return jnp.concatenate([x, mask[..., None]], axis=-1)


def _mean_of_real_tokens(h: jax.Array) -> jax.Array:
  x, mask = _split(h)
  total = jnp.sum(x * mask[..., None], axis=-2)
  return total / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)


def pool(h: jax.Array, cfg: BertConfig) -> jax.Array:
  """Hidden states [..., T, D + 1] -> [..., D]: mean of the real tokens, or [CLS]."""
  return h[..., 0, :-1] if cfg.pool == "cls" else _mean_of_real_tokens(h)


def sentence_embedding(params: Params, ids: jax.Array, cfg: BertConfig,
                       level: Level | str = FLOAT) -> jax.Array:
  """sentence-transformers' embedding: all blocks, mean of the real tokens, L2-normalized."""
  level = precision.parse_level(level)
  h = embed(params, ids, cfg)
  for i in range(cfg.depth):
    h = block(params, i, h, level, cfg)
  pooled = _mean_of_real_tokens(h)
  return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)


def _check_inputs(ids, cfg: BertConfig) -> None:
  check_ids(ids, cfg, "images")  # the runtime's argument name for any model's inputs


def backbone(cfg: BertConfig, backend: str = precision.DEFAULT_BACKEND) -> Backbone:
  """The encoder behind the backbone interface the QuEE core uses, quantized with `backend`."""
  return multi_exit_backbone(cfg, embed=embed, block=block, pool=pool,
                             check_inputs=_check_inputs, backend=backend)
