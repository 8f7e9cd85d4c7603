"""quee_jax: QuEE, per-sample adaptive early exiting and quantization in JAX.

Public API (see README.md):
  precision   Level, parse_level, parse_ladder
  models      vit (ViTConfig, init, forward, backbone)
  backbone    Backbone, the interface the core sees
  cost        count_macs, backbone_costs, CostTable
  paths       build_family, PathFamily, FAMILIES
  collect     collect_table, make_collect_fn, state_logits
  table       StateTable, save_table, load_table
"""

from quee_jax.backbone import Backbone
from quee_jax.collect import collect_table, make_collect_fn, softmax_features, state_logits
from quee_jax.cost import CostTable, MacCount, backbone_costs, bops, count_macs
from quee_jax.models import vit
from quee_jax.paths import EXIT, FAMILIES, PathFamily, build_family
from quee_jax.precision import FLOAT, Ladder, Level, parse_ladder, parse_level
from quee_jax.table import FEATURES, StateTable, load_table, save_table

__version__ = "0.1.0"
