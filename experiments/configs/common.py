"""Config parts every experiment shares: exit heads, collection, evaluation.

Each `experiments/configs/<name>.py` builds on these and documents its launch
command; `experiments.run` checks the result before any work.
"""

import ml_collections
from ml_collections import config_dict


def train_config(**overrides) -> ml_collections.ConfigDict:
  """AdamW + warmup/cosine settings of `quee_jax.train.TrainConfig`."""
  c = dict(epochs=10, batch_size=128, learning_rate=1e-3, warmup_epochs=1.0, weight_decay=0.05,
           label_smoothing=0.1, grad_clip=1.0, augment=True, drop_path=0.0, seed=0,
           checkpoint_every=200)
  c.update(overrides)
  return ml_collections.ConfigDict(c)


def base_config(dataset: str, splits: dict, model: dict, backbone: dict,
                *, ladder: str = "float,w8a8,w4a4,w2a4") -> ml_collections.ConfigDict:
  """A full experiment config; callers change what differs."""
  c = ml_collections.ConfigDict()
  c.dataset = dataset
  c.source = "auto"  # 'auto', 'embedded', 'idx' or 'tfds'
  c.data_dir = ""  # IDX directory or tfds data_dir ("" = the default)
  c.splits = ml_collections.ConfigDict(splits)
  c.seed = 0
  c.model = ml_collections.ConfigDict(model)
  # A big_vision / vit_jax .npz to start from ("" = random init); the model's
  # geometry must match it. init_head keeps its classifier as the last exit.
  c.init_from = ""
  c.init_head = False
  c.backbone = train_config(**backbone)  # epochs=0: use init_from as it is
  c.exit_heads = train_config(epochs=3, learning_rate=3e-3, warmup_epochs=0.5, weight_decay=0.0,
                              label_smoothing=0.0)
  c.exit_heads_level = "float"  # the precision of the features the exit heads are trained on
  c.ladder = ladder
  # The quantization library behind the backbone's levels: 'aqt' (aqtp) or 'qwix' (its
  # successor); the same conventions, costs and ladder (quee_jax/core/precision.py). The
  # gating predictors (eval.predictor.level) run on AQT either way.
  c.quant_backend = "aqt"
  c.family = "switch_once"
  c.cost_unit = "bops"
  c.collect = ml_collections.ConfigDict(dict(batch_size=250, summary_dim=8))
  c.eval = ml_collections.ConfigDict(dict(
      seeds=(0, 1, 2), min_cluster=100, max_clusters=32, alpha=10.0,
      variants=("quee", "quee_raw_targets", "quee_exit_only", "quee_quant_only"),
      budgets=(1 / 16, 1 / 8, 1 / 4, 1 / 2),  # budget mode's targets (full model = 1)
      soft_floor=0.01,  # the policy's τ: what a cheaper path predicted no worse still pays
      # Risk control's ε: a certified promise ("at most δ below the full model", "QuEE's
      # budget point beats the naive one") fails with probability at most ε over the cal draw.
      risk_eps=0.1,
      risk_deltas=(0.0025, 0.005, 0.01),  # the drops the risk section certifies (0.005 = 0.5 pt)
      predictor=dict(hidden=16, epochs=40, batch_size=128, learning_rate=3e-3,
                     weight_decay=1e-4, val_fraction=0.2, patience=6, level="w8a8", seed=0),
      # Semi-synthetic signal-recovery check ("" to skip), with its own seeds.
      signal_level="", signal_seeds=(0,)))
  return c


def require_checkpoint(c: ml_collections.ConfigDict) -> None:
  """Marks init_from as required: `experiments.run` stops until it is given."""
  c.init_from = config_dict.placeholder(str)


# ViT geometries of the big_vision / vit_jax checkpoints the fine-tuning variants load.
VIT_TI16 = dict(patch=16, dim=192, depth=12, heads=3, mlp_dim=768)
VIT_B16 = dict(patch=16, dim=768, depth=12, heads=12, mlp_dim=3072)


def small_vit_config(dataset: str, num_classes: int, splits: dict,
                     variant: str) -> ml_collections.ConfigDict:
  """32x32 RGB datasets (CIFAR, SVHN): a small ViT from scratch, or ViT-Ti/16 fine-tuned.

  variant '' trains a 4x4-patch ViT (width 192, depth 8) from scratch with the
  dataset's augmentation; 'finetune' resizes images to 224 and fine-tunes
  ViT-Ti/16 from --config.init_from (e.g. an augreg Ti_16 .npz).
  """
  if variant not in ("", "finetune"):
    raise ValueError(f"config variant: expected '' or 'finetune', got {variant!r}")
  if variant == "finetune":
    model = dict(image_size=224, channels=3, num_classes=num_classes, **VIT_TI16)
    backbone = dict(epochs=5, batch_size=256, learning_rate=3e-4, warmup_epochs=0.5,
                    weight_decay=1e-4, label_smoothing=0.0, checkpoint_every=500)
  else:
    model = dict(image_size=32, channels=3, patch=4, dim=192, depth=8, heads=3, mlp_dim=768,
                 num_classes=num_classes)
    backbone = dict(epochs=200, batch_size=256, learning_rate=1e-3, warmup_epochs=5,
                    weight_decay=0.05, label_smoothing=0.1, drop_path=0.1,
                    checkpoint_every=1000)
  c = base_config(dataset, splits, model, backbone)
  c.collect.batch_size = 500
  c.eval.signal_level = "w2a4"
  if variant == "finetune":
    require_checkpoint(c)
  return c
