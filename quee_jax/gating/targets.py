"""Targets for the error predictors: raw 0/1 outcomes, or discretized soft rates.

On the fit split every state of the family is computed, so for each sample n,
state σ and candidate c the outcome err[σ, n, c] (is the exit that c leads to
wrong?) is known. These 0/1 outcomes are too noisy to regress on directly: per
state, the samples are clustered by their compact features (k-means with
k-means++ initialisation, clusters of about `min_cluster` samples), and each
sample's target is its cluster's error rate of c, smoothed toward the state's
overall rate with `alpha` pseudo-samples.

The columns are weighted by what they say about the outcomes (`relevance`)
before k-means. Unweighted, the ~26 standardized columns count alike, so one
column that decides which samples a level hurts is outvoted by the others and
its signal averaged away inside clusters: on the Fashion-MNIST table with a
planted w2a4 signal (`quee_jax.protocol.synthetic`), plain k-means targets gave 85.37% at
budget 1/4, weighted ones 88.15% (raw 0/1 targets 88.41%, the naive combination
86.38%). One clustering serves every variant of a seed, so the weights count every
candidate of the collected family.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from quee_jax.core.table import StateTable


def candidate_errors(table: StateTable) -> np.ndarray:
  """[S, N, C] float32: 1 where candidate c of state s leads to a wrong exit (0 where invalid)."""
  fam = table.family
  wrong = ~table.correct  # [S, N]
  target = np.maximum(fam.cand_state, 0)  # [S, C]
  err = wrong[target]  # [S, C, N]
  err = np.where(fam.cand_mask[:, :, None], err, False)
  return np.ascontiguousarray(np.moveaxis(err, 2, 1)).astype(np.float32)


def _sq_dists(x: jax.Array, centers: jax.Array) -> jax.Array:
  """[N, k] squared distances, as a matmul (no [N, k, d] intermediate)."""
  d2 = (jnp.sum(x * x, 1)[:, None] - 2.0 * x @ centers.T + jnp.sum(centers * centers, 1)[None])
  return jnp.maximum(d2, 0.0)


def _kmeans_one(x: jax.Array, key: jax.Array, k: int, iters: int) -> tuple[jax.Array, jax.Array]:
  """(cluster index of each row of x [N, d], inertia): k-means++ init, Lloyd iterations."""
  n = x.shape[0]

  def add_center(i, carry):
    centers, key = carry
    key, sub = jax.random.split(key)
    d2 = jnp.min(_sq_dists(x, centers) + jnp.where(jnp.arange(k) < i, 0.0, jnp.inf)[None], axis=1)
    probs = d2 / jnp.maximum(d2.sum(), 1e-12)
    probs = jnp.where(d2.sum() > 0, probs, 1.0 / n)  # all points equal: any will do
    idx = jax.random.choice(sub, n, p=probs)
    return centers.at[i].set(x[idx]), key

  key, sub = jax.random.split(key)
  centers = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[jax.random.randint(sub, (), 0, n)])
  centers, _ = jax.lax.fori_loop(1, k, add_center, (centers, key))

  def lloyd(_, centers):
    assign = jnp.argmin(_sq_dists(x, centers), axis=1)
    onehot = jax.nn.one_hot(assign, k, dtype=x.dtype)
    counts = onehot.sum(0)
    means = (onehot.T @ x) / jnp.maximum(counts, 1)[:, None]
    return jnp.where(counts[:, None] > 0, means, centers)  # an empty cluster keeps its center

  centers = jax.lax.fori_loop(0, iters, lloyd, centers)
  d2 = _sq_dists(x, centers)
  return jnp.argmin(d2, axis=1), jnp.min(d2, axis=1).sum()


def _kmeans_best(x, key, k, iters, n_init):
  # A single k-means++ start can still seed two centers in one cluster and stick
  # there; keep the best of a few starts, as scikit-learn does.
  assign, inertia = jax.vmap(lambda kk: _kmeans_one(x, kk, k, iters))(jax.random.split(key, n_init))
  return assign[jnp.argmin(inertia)]


def kmeans(x: np.ndarray, k: int, iters: int = 20, seed: int = 0, n_init: int = 3) -> np.ndarray:
  """Cluster indices [S, N] for each of S independent point sets x [S, N, d]."""
  if x.ndim != 3:
    raise ValueError(f"x: expected [sets, points, dims], got shape {x.shape}")
  if not 1 <= k <= x.shape[1]:
    raise ValueError(f"k: expected 1 <= k <= {x.shape[1]} points, got {k}")
  keys = jax.random.split(jax.random.key(seed), x.shape[0])
  fn = jax.jit(jax.vmap(lambda xs, key: _kmeans_best(xs, key, k, iters, n_init)))
  # Chunk the sets so the [chunk, n_init, N, max(k, d)] intermediates stay small.
  chunk = max(1, int(2e8 // (4 * n_init * x.shape[1] * max(k, x.shape[2]) + 1)))
  out = [np.asarray(fn(jnp.asarray(x[i:i + chunk]), keys[i:i + chunk]))
         for i in range(0, x.shape[0], chunk)]
  return np.concatenate(out).astype(np.int32)


def standardize(x: np.ndarray) -> np.ndarray:
  """Zero mean, unit variance per state and column (constant columns become 0)."""
  mean = x.mean(axis=1, keepdims=True)
  std = x.std(axis=1, keepdims=True)
  return (x - mean) / np.where(std > 1e-8, std, 1.0)


def relevance(x: np.ndarray, errors: np.ndarray) -> np.ndarray:
  """[S, d] what each standardized column of x [S, N, d] says about the outcomes: the largest
  |correlation| with any candidate's 0/1 error (`candidate_errors`, [S, N, C]) at that state.
  Candidates whose error never varies at a state count for nothing."""
  if errors.ndim != 3 or x.shape[:2] != errors.shape[:2]:
    raise ValueError(f"errors: expected shape {x.shape[:2]} + [C], got {errors.shape}")
  e = errors - errors.mean(axis=1, keepdims=True)
  sd = e.std(axis=1)  # [S, C]
  cov = np.matmul(np.swapaxes(x, 1, 2), e) / x.shape[1]  # [S, d, C]; x has zero mean
  corr = np.abs(cov) / np.where(sd > 1e-8, sd, np.inf)[:, None, :]
  return corr.max(axis=-1)


def clusters(cluster_x: np.ndarray, errors: np.ndarray, *, min_cluster: int = 100,
             max_clusters: int = 32, seed: int = 0) -> np.ndarray:
  """[S, N] cluster of each sample at each state: k-means on standardized features, each
  column weighted by its `relevance` to the candidates' errors [S, N, C].

  k = N // min_cluster (samples per cluster on average), at most max_clusters.
  """
  if min_cluster < 1 or max_clusters < 1:
    raise ValueError(f"min_cluster/max_clusters: expected >= 1, got {min_cluster}, {max_clusters}")
  k = int(np.clip(cluster_x.shape[1] // min_cluster, 1, max_clusters))
  x = standardize(cluster_x)
  return kmeans(x * relevance(x, errors)[:, None, :], k, seed=seed)


def soft_targets(errors: np.ndarray, assign: np.ndarray, *, alpha: float = 10.0) -> np.ndarray:
  """Smoothed cluster error rates as targets [S, N, C] (float32).

  Args:
    errors: [S, N, C] 0/1 candidate errors (`candidate_errors`).
    assign: [S, N] cluster of each sample at each state (`clusters`).
    alpha: pseudo-samples of the state's overall rate added to each cluster.
  """
  S, N, C = errors.shape
  if assign.shape != (S, N):
    raise ValueError(f"assign: expected shape {(S, N)}, got {assign.shape}")
  if alpha < 0:
    raise ValueError(f"alpha: expected >= 0, got {alpha}")
  k = int(assign.max()) + 1
  onehot = np.eye(k, dtype=np.float32)[assign]  # [S, N, k]
  counts = onehot.sum(1)  # [S, k]
  sums = np.einsum("snk,snc->skc", onehot, errors)  # [S, k, C]
  prior = errors.mean(axis=1)  # [S, C]
  rates = (sums + alpha * prior[:, None]) / (counts[..., None] + alpha)
  return np.take_along_axis(rates, assign[..., None], axis=1).astype(np.float32)  # [S, N, C]
