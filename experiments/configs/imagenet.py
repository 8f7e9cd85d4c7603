r"""ImageNet-1k: a pretrained ViT-B/16 from big_vision, exit heads and predictors post hoc.

The backbone is not trained (backbone.epochs = 0): QuEE is post-training. Get a
checkpoint fine-tuned on ImageNet-1k at 224 (e.g. gs://vit_models/augreg/
B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz)
and prepare tfds `imagenet2012` (manual download) in --config.data_dir.
Expected hardware: a TPU v3-8 / v4-8 VM or one 80 GB GPU (state tables of 85k
images over 204 states of ViT-B/16).

  python -m experiments.run --config experiments/configs/imagenet.py \
      --config.init_from=/path/to/B_16-...-res_224.npz --config.data_dir=$TFDS_DIR --workdir $WD
"""

from experiments.configs import common


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"config variant: expected none, got {variant!r}")
  c = common.base_config(
      "imagenet2012", dict(train=100_000, fit=25_000, cal=10_000, test=None),
      dict(image_size=224, channels=3, num_classes=1000, **common.VIT_B16),
      dict(epochs=0))
  common.require_checkpoint(c)
  c.init_head = True  # the checkpoint's ImageNet classifier is the last exit
  c.exit_heads.update(epochs=2, batch_size=512, checkpoint_every=100)
  c.collect.batch_size = 256
  c.eval.update(min_cluster=200, max_clusters=64, signal_level="w2a4")
  return c
