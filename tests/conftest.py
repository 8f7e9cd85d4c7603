"""Shared tiny models: small enough that every test compiles in seconds on 2 cores."""

import jax
import numpy as np
import pytest

import quee_jax as q

TINY = q.vit.ViTConfig(image_size=8, channels=1, patch=4, dim=16, depth=3, heads=2,
                       mlp_dim=32, num_classes=5)
TINY_BERT = q.bert.BertConfig(vocab_size=50, seq_len=8, dim=16, depth=3, heads=2, mlp_dim=32,
                              max_positions=16, num_classes=5)


@pytest.fixture(scope="session")
def tiny():
  """(config, params, backbone) of a random tiny ViT with an exit after every block."""
  params = q.vit.init(jax.random.key(0), TINY)
  return TINY, params, q.vit.backbone(TINY)


@pytest.fixture(scope="session")
def tiny_bert():
  """(config, params, backbone) of a random tiny BERT with an exit after every block."""
  params = q.bert.init(jax.random.key(0), TINY_BERT)
  return TINY_BERT, params, q.bert.backbone(TINY_BERT)


def token_ids(n: int, cfg: q.bert.BertConfig = TINY_BERT, seed: int = 0) -> np.ndarray:
  """Random sequences of 2..seq_len tokens ([CLS]-like 1 first), padded with 0."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, cfg.vocab_size, (n, cfg.seq_len)).astype(np.int32)
  ids[:, 0] = 1
  lengths = rng.integers(2, cfg.seq_len + 1, n)
  ids[np.arange(cfg.seq_len)[None] >= lengths[:, None]] = 0
  return ids


def images(n: int, cfg: q.vit.ViTConfig = TINY, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, cfg.image_size, cfg.image_size, cfg.channels)).astype(np.float32)


def labels(n: int, num_classes: int = TINY.num_classes, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, num_classes, n).astype(np.int32)


def family(backbone, params, ladder="float,w4a4", name="switch_once", inputs=None, **kw):
  ladder = q.parse_ladder(ladder)
  costs = q.backbone_costs(backbone, params, images(1) if inputs is None else inputs, ladder)
  return q.build_family(name, ladder, backbone.exits, costs, **kw)
