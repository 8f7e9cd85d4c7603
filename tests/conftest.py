"""Shared tiny models: small enough that every test compiles in seconds on 2 cores."""

import jax
import numpy as np
import pytest

import quee_jax as q

TINY = q.vit.ViTConfig(image_size=8, channels=1, patch=4, dim=16, depth=3, heads=2,
                       mlp_dim=32, num_classes=5)


@pytest.fixture(scope="session")
def tiny():
  """(config, params, backbone) of a random tiny ViT with an exit after every block."""
  params = q.vit.init(jax.random.key(0), TINY)
  return TINY, params, q.vit.backbone(TINY)


def images(n: int, cfg: q.vit.ViTConfig = TINY, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, cfg.image_size, cfg.image_size, cfg.channels)).astype(np.float32)


def labels(n: int, num_classes: int = TINY.num_classes, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, num_classes, n).astype(np.int32)


def family(backbone, params, ladder="float,w4a4", name="switch_once", **kw):
  ladder = q.parse_ladder(ladder)
  costs = q.backbone_costs(backbone, params, images(1), ladder)
  return q.build_family(name, q.precision.ladder_names(ladder), backbone.exits, costs, **kw)
