"""Predictor inputs for every (state, sample) of a state table.

Everything here is known at a gate when the sample has reached that state,
so the runtime can compute it too:
  * every per-state feature of the table (max prob, margin, entropy, KL and
    agreement with the previous exit, and any extra column such as a
    semi-synthetic signal);
  * the previous exit's max prob, margin and entropy on the same path;
  * after a switch, agreement and confidence change between the current exit
    and the last exit before the switch (exits run at different levels);
  * the low-dimensional projection of the exit summary (class token), if kept;
  * one-hots of the current level, the start level and the gate, and a
    switched flag.
"""

from __future__ import annotations

import numpy as np

from quee_jax.paths import PathFamily
from quee_jax.table import StateTable

_PARENT_STATS = ("max_prob", "margin", "entropy")


def switch_ancestor(family: PathFamily) -> np.ndarray:
  """[S] the last state before the path's level change (-1 if it never changed)."""
  out = np.full(family.num_states, -1, np.int32)
  for s in range(family.num_states):
    p = family.parent[s]
    if p >= 0:
      out[s] = p if family.level[p] != family.level[s] else out[p]
  return out


def feature_names(table: StateTable) -> list[str]:
  fam = table.family
  names = sorted(table.features)
  names += [f"parent_{k}" for k in _PARENT_STATS]
  names += ["agree_switch", "dconf_switch"]
  if table.summary is not None:
    names += [f"summary_{i}" for i in range(table.summary.shape[-1])]
  names += [f"level={q}" for q in fam.ladder] + [f"start={q}" for q in fam.ladder]
  names += [f"gate={g}" for g in range(fam.num_gates)] + ["switched"]
  return names


def build_features(table: StateTable, cluster_only: bool = False) -> np.ndarray:
  """[S, N, F] float32 predictor inputs, in the order of `feature_names`.

  cluster_only: only the sample-dependent columns (what targets cluster on).
  """
  fam = table.family
  S, N = table.num_states, table.num_samples
  cols = [table.features[k] for k in sorted(table.features)]
  parent = np.maximum(fam.parent, 0)
  is_root = (fam.parent < 0)[:, None]
  for k in _PARENT_STATS:
    cols.append(np.where(is_root, 0.0, table.features[k][parent]))
  anc = switch_ancestor(fam)
  has = (anc >= 0)[:, None]
  a = np.maximum(anc, 0)
  cols.append(np.where(has, (table.pred == table.pred[a]).astype(np.float32), 1.0))
  cols.append(np.where(has, table.features["max_prob"] - table.features["max_prob"][a], 0.0))
  x = np.stack(cols, axis=-1).astype(np.float32)
  if table.summary is not None:
    x = np.concatenate([x, table.summary.astype(np.float32)], axis=-1)
  if cluster_only:
    return x
  Q, G = len(fam.ladder), fam.num_gates
  onehot = np.concatenate([np.eye(Q)[fam.level], np.eye(Q)[fam.start_level], np.eye(G)[fam.gate],
                           fam.switched[:, None].astype(np.float64)], axis=-1).astype(np.float32)
  return np.concatenate([x, np.broadcast_to(onehot[:, None], (S, N, onehot.shape[-1]))], axis=-1)
