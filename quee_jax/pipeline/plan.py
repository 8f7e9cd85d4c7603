"""The experiment config, checked before any work and turned into the library's typed settings.

A config is an `ml_collections.ConfigDict` (`experiments/configs/`); `make_plan`
checks every value the stages use and raises ValueError naming its key.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from quee_jax import data, models, protocol, train
from quee_jax.core import paths, precision
from quee_jax.core.backbone import Backbone
from quee_jax.core.precision import Ladder, Level
from quee_jax.gating import predictor
from quee_jax.models import bert, bert_import

STAGES = ("backbone", "exit_heads", "tables", "evaluate", "report")
COST_UNITS = ("bops", "macs")


@dataclasses.dataclass(frozen=True)
class Plan:
  """The config, checked and turned into the library's typed settings."""

  model: models.ModelConfig
  ladder: Ladder
  backbone: train.TrainConfig | None  # None: the init_from checkpoint as it is
  exit_heads: train.TrainConfig
  exit_heads_level: Level
  eval: protocol.EvalConfig
  stages: tuple[str, ...]
  quant_backend: str = precision.DEFAULT_BACKEND

  @property
  def multi_exit(self) -> Backbone:
    """The model behind the backbone interface, quantized with the config's backend."""
    return models.backbone(self.model, self.quant_backend)


def quant_backend(c: ml_collections.ConfigDict) -> str:
  """The config's quantization backend (configs written before there was a choice, such as
  an older work directory's config.json: AQT)."""
  return c.get("quant_backend", precision.DEFAULT_BACKEND)


def checked(key: str, build, *args, **kwargs):
  """build(*args, **kwargs), its errors prefixed with the config key they came from."""
  try:
    return build(*args, **kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f"--config.{key}: {e}") from None


def make_plan(c: ml_collections.ConfigDict, stages=STAGES) -> Plan:
  """Checks every config value the stages use; raises ValueError naming the key."""
  unknown = set(stages) - set(STAGES)
  if unknown or not stages:
    raise ValueError(f"--stages: expected some of {STAGES}, got {list(stages)}")
  if c.dataset not in data.DATASETS:
    raise ValueError(f"--config.dataset: unknown {c.dataset!r}; expected one of {sorted(data.DATASETS)}")
  sizes = checked("splits", data.check_sizes, c.splits.to_dict())
  for k, v in sizes.items():  # an empty split trains, collects or scores nothing (NaN)
    if v == 0:
      raise ValueError(f"--config.splits.{k}: expected a positive size (or None for the"
                       " dataset's default), got 0")
  model = checked("model", models.make_config, c.model.to_dict())
  is_bert = isinstance(model, bert.BertConfig)
  kind, classes = data.DATASETS[c.dataset].kind, data.DATASETS[c.dataset].num_classes
  if kind != ("text" if is_bert else "image"):
    article = "a text" if kind == "text" else "an image"
    raise ValueError(f"--config.dataset: {c.dataset!r} is {article} dataset, the model"
                     f" (arch {'bert' if is_bert else 'vit'}) reads "
                     + ("text" if is_bert else "images"))
  if model.num_classes != classes:  # labels beyond the heads would train and score silently wrong
    raise ValueError(f"--config.model.num_classes: {c.dataset} has {classes} classes,"
                     f" got {model.num_classes}")
  ladder = checked("ladder", precision.parse_ladder, c.ladder)
  backend = precision.check_backend(quant_backend(c), "--config.quant_backend")
  if c.family not in paths.FAMILIES:
    raise ValueError(f"--config.family: unknown {c.family!r}; expected one of {sorted(paths.FAMILIES)}")
  if c.cost_unit not in COST_UNITS:
    raise ValueError(f"--config.cost_unit: expected one of {COST_UNITS}, got {c.cost_unit!r}")
  if c.init_from is None:  # common.require_checkpoint
    raise ValueError("--config.init_from: this config fine-tunes or evaluates a pretrained ViT;"
                     " give the path of its big_vision / vit_jax .npz checkpoint")
  if is_bert:  # post-training only: a pretrained encoder, frozen
    if c.init_from != bert_import.MINILM and not os.path.isdir(c.init_from or ""):
      raise ValueError(f"--config.init_from: a BERT needs its pretrained weights:"
                       f" {bert_import.MINILM!r} or a Hugging Face model directory,"
                       f" got {c.init_from!r}")
    if c.backbone.epochs != 0:
      raise ValueError("--config.backbone.epochs: a BERT encoder is used frozen; expected 0")
  elif c.init_from and not os.path.exists(c.init_from):
    raise ValueError(f"--config.init_from: no checkpoint at {c.init_from!r}")
  if c.backbone.epochs == 0:
    if not c.init_from:
      raise ValueError("--config.backbone.epochs: 0 (no training) needs --config.init_from")
    backbone = None
  else:
    backbone = checked("backbone", train.TrainConfig, **c.backbone)
  exit_heads = checked("exit_heads", train.TrainConfig, **c.exit_heads)
  heads_level = checked("exit_heads_level", precision.parse_level, c.exit_heads_level)
  for k in ("batch_size", "summary_dim"):
    v = c.collect[k]
    if isinstance(v, bool) or not isinstance(v, int) or v < (k == "batch_size"):
      raise ValueError(f"--config.collect.{k}: expected a {'positive' if k == 'batch_size' else 'non-negative'} int, got {v!r}")
  pred = checked("eval.predictor", predictor.PredictorConfig, **c.eval.predictor)
  ev = c.eval
  eval_cfg = checked("eval", protocol.EvalConfig, seeds=tuple(ev.seeds), predictor=pred,
                     min_cluster=ev.min_cluster, max_clusters=ev.max_clusters, alpha=ev.alpha,
                     variants=tuple(ev.variants), budgets=tuple(ev.budgets),
                     soft_floor=ev.soft_floor, risk_eps=ev.risk_eps,
                     risk_deltas=tuple(ev.risk_deltas))
  if ev.signal_level and precision.canonical_name(ev.signal_level) not in ladder:
    raise ValueError(f"--config.eval.signal_level: expected a level of the ladder"
                     f" {list(ladder)} or '', got {ev.signal_level!r}")
  return Plan(model, ladder, backbone, exit_heads, heads_level, eval_cfg, tuple(stages),
              backend)


def check_batches(plan: Plan, c: ml_collections.ConfigDict, num_devices: int) -> None:
  """ValueError naming the key unless every batch the selected stages split over their
  `num_devices` devices (training, collection) splits evenly; checked where the devices are
  known. (The tables stage trains what is not trained yet.)"""
  parts = []
  if {"backbone", "exit_heads", "tables"} & set(plan.stages):
    parts += [("exit_heads", plan.exit_heads.batch_size)]
    if plan.backbone is not None:
      parts.insert(0, ("backbone", plan.backbone.batch_size))
  if "tables" in plan.stages:
    parts.append(("collect", c.collect.batch_size))
  for part, size in parts:
    if size % num_devices:
      raise ValueError(f"--config.{part}.batch_size: must be a multiple of the {num_devices}"
                       f" devices a batch is split over, got {size}")
