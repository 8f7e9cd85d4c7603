r"""CIFAR-10: a small ViT from scratch, or ViT-Ti/16 fine-tuned; QuEE over a 4-level ladder.

Expected hardware: one GPU or a TPU VM (the default variant trains 200 epochs;
'finetune' 5 epochs at 224x224). Data: tfds `cifar10` (downloaded on first use,
or --config.data_dir).

  python -m experiments.run --config experiments/configs/cifar10.py --workdir $WD
  python -m experiments.run --config experiments/configs/cifar10.py:finetune \
      --config.init_from=/path/to/Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz \
      --workdir $WD
"""

from experiments.configs import common


def get_config(variant: str = ""):
  return common.small_vit_config(
      "cifar10", 10, dict(train=40_000, fit=7_000, cal=3_000, test=None), variant)
