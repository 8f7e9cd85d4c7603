r"""CIFAR-100: a small ViT from scratch, or ViT-Ti/16 fine-tuned; QuEE over a 4-level ladder.

Expected hardware: one GPU or a TPU VM (200 epochs from scratch, or 5 epochs
of fine-tuning at 224x224). Data: tfds `cifar100`. With 100 classes, fit needs
more samples per class than CIFAR-10 for the clustered targets.

  python -m experiments.run --config experiments/configs/cifar100.py --workdir $WD
  python -m experiments.run --config experiments/configs/cifar100.py:finetune \
      --config.init_from=/path/to/Ti_16-i21k-300ep-....npz --workdir $WD
"""

from experiments.configs import common


def get_config(variant: str = ""):
  return common.small_vit_config(
      "cifar100", 100, dict(train=37_000, fit=10_000, cal=3_000, test=None), variant)
