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

import jax
import jax.numpy as jnp
import numpy as np

from quee_jax.core.exit_stats import FEATURES
from quee_jax.core.paths import PathFamily
from quee_jax.core.table import StateTable

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


def num_features(family: PathFamily, summary_dim: int) -> int:
  """Length of a predictor input row (`feature_names`) with a `summary_dim` summary."""
  return (len(FEATURES) + len(_PARENT_STATS) + 2 + summary_dim + 2 * len(family.ladder)
          + family.num_gates + 1)


def state_onehots(family: PathFamily) -> np.ndarray:
  """[S, O] float32: one-hots of each state's level, start level and gate, and its switched flag."""
  Q, G = len(family.ladder), family.num_gates
  return np.concatenate([np.eye(Q)[family.level], np.eye(Q)[family.start_level],
                         np.eye(G)[family.gate], family.switched[:, None]], axis=-1
                        ).astype(np.float32)


def assemble(stats: dict, parent_stats: jax.Array, anc_pred: jax.Array, anc_max_prob: jax.Array,
             has_anc: jax.Array, pred: jax.Array, summary: jax.Array | None,
             onehot: jax.Array | None) -> jax.Array:
  """Predictor inputs [..., F] in the order of `feature_names`, from what a gate knows.

  The one place features are put together: `build_features` calls it on whole
  tables and the runtime on the samples at a gate, so both give the same bits.

  Args:
    stats: the current exit's statistics, every name in FEATURES, [...].
    parent_stats: [..., 3] the previous exit's max_prob, margin, entropy (0 at a root).
    anc_pred, anc_max_prob, has_anc: [...] prediction and max prob of the last exit
      before the path's level change, and whether it changed.
    pred: [...] the current exit's prediction.
    summary: [..., k] projected exit summary, or None.
    onehot: [..., O] `state_onehots` rows, or None (cluster features only).
  """
  cols = [jnp.asarray(stats[k], jnp.float32) for k in sorted(stats)]
  cols += [jnp.asarray(parent_stats[..., i], jnp.float32) for i in range(len(_PARENT_STATS))]
  cols.append(jnp.where(has_anc, (pred == anc_pred).astype(jnp.float32), 1.0))
  cols.append(jnp.where(has_anc, jnp.asarray(stats["max_prob"], jnp.float32) - anc_max_prob, 0.0))
  x = jnp.stack(cols, axis=-1)
  extra = [jnp.asarray(a, jnp.float32) for a in (summary, onehot) if a is not None]
  return jnp.concatenate([x, *extra], axis=-1) if extra else x


def build_features(table: StateTable, cluster_only: bool = False) -> np.ndarray:
  """[S, N, F] float32 predictor inputs, in the order of `feature_names`.

  cluster_only: only the sample-dependent columns (what targets cluster on).
  """
  fam = table.family
  S, N = table.num_states, table.num_samples
  parent = np.maximum(fam.parent, 0)
  is_root = (fam.parent < 0)[:, None, None]
  parent_stats = np.stack([table.features[k][parent] for k in _PARENT_STATS], axis=-1)
  anc = switch_ancestor(fam)
  a = np.maximum(anc, 0)
  onehot = None
  if not cluster_only:
    rows = state_onehots(fam)
    onehot = np.broadcast_to(rows[:, None], (S, N, rows.shape[-1]))
  x = assemble(table.features, np.where(is_root, 0.0, parent_stats).astype(np.float32),
               table.pred[a], table.features["max_prob"][a], (anc >= 0)[:, None], table.pred,
               table.summary, onehot)
  return np.asarray(x)
