"""Backbones implementing the `quee_jax.core.backbone.Backbone` interface.

A model config is a plain dict (as in experiment configs) whose key `arch`
names the architecture: 'vit' (the default) or 'bert'.
"""

from __future__ import annotations

from quee_jax.core import precision
from quee_jax.core.backbone import Backbone
from quee_jax.models import bert, vit

ModelConfig = vit.ViTConfig | bert.BertConfig
ARCHS = {"vit": vit.ViTConfig, "bert": bert.BertConfig}


def make_config(model: dict) -> ModelConfig:
  """The typed config of a model dict; raises ValueError on an unknown arch or field."""
  model = dict(model)
  arch = model.pop("arch", "vit")
  if arch not in ARCHS:
    raise ValueError(f"arch: expected one of {sorted(ARCHS)}, got {arch!r}")
  try:
    return ARCHS[arch](**model)
  except TypeError as e:  # an unknown field
    raise ValueError(f"{e} (arch {arch!r})") from None


def backbone(cfg: ModelConfig, backend: str = precision.DEFAULT_BACKEND) -> Backbone:
  """The model behind the backbone interface, quantized with `backend` ('aqt' or 'qwix');
  one Backbone object per (config, backend) (`layers.multi_exit_backbone`)."""
  if isinstance(cfg, bert.BertConfig):
    return bert.backbone(cfg, backend)
  if isinstance(cfg, vit.ViTConfig):
    return vit.backbone(cfg, backend)
  raise ValueError(f"cfg: expected a ViTConfig or BertConfig, got {type(cfg).__name__}")
