r"""SVHN (cropped digits): a small ViT from scratch, or ViT-Ti/16 fine-tuned.

Expected hardware: one GPU or a TPU VM (73k training images, 60 epochs from
scratch). Data: tfds `svhn_cropped`; augmentation is random crop without flips
(digits).

  python -m experiments.run --config experiments/configs/svhn.py --workdir $WD
  python -m experiments.run --config experiments/configs/svhn.py:finetune \
      --config.init_from=/path/to/Ti_16-i21k-300ep-....npz --workdir $WD
"""

from experiments.configs import common


def get_config(variant: str = ""):
  c = common.small_vit_config(
      "svhn_cropped", 10, dict(train=60_000, fit=8_000, cal=5_257, test=None), variant)
  if not variant:
    c.backbone.epochs = 60  # 1.5x CIFAR's images per epoch, easier task
  return c
