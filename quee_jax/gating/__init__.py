"""QuEE's decision at a gate, learned from state tables.

  features   predictor inputs of every (state, sample), computable online at a gate
  targets    candidate errors; k-means discretization into smoothed soft targets
  predictor  per-gate MLPs over the shared padded candidate layout
  policy     argmin of predicted error + λ · additional cost: the one decision rule
"""

from quee_jax.gating import features, policy, predictor, targets
from quee_jax.gating.predictor import PredictorConfig
