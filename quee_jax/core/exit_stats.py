"""What an exit's output says about a sample: the statistics every gate computes.

State tables (`quee_jax.collect`) store them for every state; the predictors'
inputs (`quee_jax.gating.features`) and the runtime compute them from the same
functions, so a table and a real adaptive run see the same bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The per-state statistics a state table keeps (`softmax_features`).
FEATURES = ("max_prob", "margin", "entropy", "kl_parent", "agree_parent")


def softmax_features(logits: jax.Array, parent_logits: jax.Array | None = None
                     ) -> dict[str, jax.Array]:
  """Compact per-sample statistics of an exit's softmax (last axis = classes).

  max_prob, margin (top-1 minus top-2 probability), entropy (nats),
  kl_parent = KL(p || p_parent) to the previous exit on the path and
  agree_parent (1 if both predict the same class); 0 and 1 at a root.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  p = jnp.exp(logp)
  # The top two as a max and a max without the argmax, the same values as lax.top_k's:
  # XLA's SPMD partitioner gathers a top_k's batch axis onto every device (each then sorts
  # the whole batch), where these split by rows like the rest of the collection step.
  first = jnp.max(p, axis=-1)
  top = jnp.argmax(p, axis=-1)
  second = jnp.max(jnp.where(jnp.arange(p.shape[-1]) == top[..., None], -jnp.inf, p), axis=-1)
  out = {"max_prob": first, "margin": first - second,
         "entropy": -jnp.sum(p * logp, axis=-1)}
  if parent_logits is None:
    out["kl_parent"] = jnp.zeros_like(out["max_prob"])
    out["agree_parent"] = jnp.ones_like(out["max_prob"])
  else:
    parent_logp = jax.nn.log_softmax(parent_logits.astype(jnp.float32), axis=-1)
    out["kl_parent"] = jnp.sum(p * (logp - parent_logp), axis=-1)
    out["agree_parent"] = (jnp.argmax(logits, -1) == jnp.argmax(parent_logits, -1)
                           ).astype(jnp.float32)
  return out


def summary_projection(width: int, dim: int) -> np.ndarray:
  """A fixed random orthonormal [width, dim] projection (seed 0) for exit summaries."""
  if dim > width:
    raise ValueError(f"summary_dim: at most the summary width {width}, got {dim}")
  q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(width, dim)))
  return q.astype(np.float32)
