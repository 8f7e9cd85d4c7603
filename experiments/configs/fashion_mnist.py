r"""Fashion-MNIST: a small ViT trained here, exit heads post hoc, QuEE over a 4-level ladder.

Variants:
  (default)  the full dataset from Debian's `dataset-fashion-mnist` IDX files (or
             tfds where they are absent): 45k train / 10k fit / 5k cal / 10k test.
             About 35 minutes of training on 2 CPU cores.
  demo       the Fashion-MNIST subset embedded in the package: 10k train / 3.5k fit /
             1.5k cal / 3k test; a few minutes on 2 CPU cores.

  python -m experiments.run --config experiments/configs/fashion_mnist.py:demo --workdir /tmp/fm_demo
  python -m experiments.run --config experiments/configs/fashion_mnist.py --workdir /tmp/fm
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant not in ("", "demo"):
    raise ValueError(f"config variant: expected '' or 'demo', got {variant!r}")
  demo = variant == "demo"
  c = ml_collections.ConfigDict()
  c.dataset = "fashion_mnist_embedded" if demo else "fashion_mnist"
  c.source = "auto"
  c.data_dir = ""
  c.splits = ml_collections.ConfigDict(
      dict(train=10_000, fit=3_500, cal=1_500, test=3_000) if demo else
      dict(train=45_000, fit=10_000, cal=5_000, test=10_000))
  c.seed = 0

  # ViT with 49 patches of 4x4 + a class token, an exit after every block. Patches of
  # 7x7 with twice the width cost as much per image but overfit: 88.6% at 10 epochs.
  c.model = ml_collections.ConfigDict(dict(
      image_size=28, channels=1, patch=4, dim=64, depth=6, heads=4, mlp_dim=256,
      num_classes=10))

  c.backbone = ml_collections.ConfigDict(dict(
      epochs=12 if demo else 25, batch_size=128, learning_rate=1e-3, warmup_epochs=1.0,
      weight_decay=0.05, label_smoothing=0.1, grad_clip=1.0, augment=True, seed=0,
      # Without stochastic depth this model overfits: 95.5% train, 88.9% test at epoch 14.
      drop_path=0.1, checkpoint_every=200))
  c.exit_heads = ml_collections.ConfigDict(dict(
      epochs=3, batch_size=128, learning_rate=3e-3, warmup_epochs=0.5,
      weight_decay=0.0, label_smoothing=0.0, grad_clip=1.0, augment=True, drop_path=0.0,
      seed=0, checkpoint_every=200))
  c.exit_heads_level = "float"  # features the exit heads are trained on

  # w2a4 costs about a point at full depth on this model (see shared/FINDINGS.md):
  # a ladder without it spans no accuracy trade-off.
  c.ladder = "float,w8a8,w4a4,w2a4"
  c.family = "switch_once"
  c.cost_unit = "bops"
  c.collect = ml_collections.ConfigDict(dict(batch_size=250, summary_dim=8))

  c.eval = ml_collections.ConfigDict(dict(
      seeds=(0, 1, 2), min_cluster=100, max_clusters=32, alpha=10.0,
      predictor=dict(hidden=16, epochs=40, batch_size=128, learning_rate=3e-3,
                     weight_decay=1e-4, val_fraction=0.2, patience=6, level="w8a8", seed=0),
      # Semi-synthetic signal-recovery check ("" to skip), with its own seeds.
      signal_level="w2a4", signal_seeds=(0,)))
  return c
