"""Semi-synthetic tables with a known per-sample precision signal.

On the models measured here (docs/results/fashion_mnist.md,
docs/results/sentiment_minilm.md) the samples a lower level hurts cannot be
told from those it helps, so no policy can route samples by precision. To check that the
machinery captures such a signal where it exists, `plant_signal` rewrites a
real table: a per-sample variable z ~ U(0, 1) decides what a chosen low level
does to every state that ran a block at it. Where z <= 0.5 the state takes the
outcome of the same path run at the top level (the low level is harmless);
where z > 0.5 it is wrong (the low level hurts). With `visible`, z is a
feature of every state, as an informative activation statistic would be;
without it the signal is there but unobservable (the low level is merely worse
on average), and QuEE should fall back to the naive combination.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from quee_jax.core.table import StateTable


def plant_signal(table: StateTable, level: str, seed: int, visible: bool = True) -> StateTable:
  fam = table.family
  if level not in fam.ladder:
    raise ValueError(f"level: {level!r} is not in the ladder {fam.ladder}")
  low, top = fam.ladder.index(level), fam.top
  if low == top:
    raise ValueError(f"level: {level!r} is the top level; plant the signal in a lower one")
  z = np.random.default_rng(seed).random(table.num_samples)
  pred, correct = table.pred.copy(), table.correct.copy()
  num_classes = int(table.backbone.get("num_classes", table.labels.max() + 1))
  wrong_class = (table.labels + 1) % num_classes
  harmless = z <= 0.5
  for s in range(fam.num_states):
    hist = fam.history[s][fam.history[s] >= 0]
    if low not in hist:
      continue
    twin = fam.index.get(tuple(int(q) for q in np.where(hist == low, top, hist)), s)
    pred[s] = np.where(harmless, table.pred[twin], wrong_class)
    correct[s] = np.where(harmless, table.correct[twin], False)
  feats = dict(table.features)
  if visible:
    feats["signal"] = np.broadcast_to(z.astype(np.float32), pred.shape).copy()
  return dataclasses.replace(table, pred=pred, correct=correct, features=feats)
