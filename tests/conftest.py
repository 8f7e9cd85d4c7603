"""Shared tiny models: small enough that every test compiles in seconds on 2 cores."""

import os
import signal
import time

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


# The demo pipeline (fashion_mnist.py:demo) made tiny: a run takes about half a minute.
TINY_PIPELINE = {
    "model.dim": 16, "model.mlp_dim": 32, "model.depth": 2, "splits.train": 500,
    "splits.fit": 300, "splits.cal": 200, "splits.test": 200, "backbone.epochs": 1,
    "exit_heads.epochs": 1, "backbone.batch_size": 50, "exit_heads.batch_size": 50,
    "eval.seeds": "0,1", "eval.predictor.epochs": 2, "eval.predictor.batch_size": 32,
    "eval.signal_level": ""}


def pipeline_flags(overrides: dict | None = None) -> list[str]:
  """--config.KEY=VALUE flags of TINY_PIPELINE with `overrides` (keys as there)."""
  return [f"--config.{k}={v}" for k, v in {**TINY_PIPELINE, **(overrides or {})}.items()]


def kill_when(proc, path, timeout=600, poll=0.02):
  """SIGKILLs proc's session as soon as path exists; returns whether it was still running."""
  t0 = time.time()
  while not os.path.exists(path):
    if proc.poll() is not None or time.time() - t0 > timeout:
      return False
    time.sleep(poll)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  return True
