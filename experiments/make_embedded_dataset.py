r"""Rebuilds quee_jax/data/embedded/fashion_mnist_embedded.npz from the original IDX files.

  apt-get install -y dataset-fashion-mnist
  python -m experiments.make_embedded_dataset

Stratified and seeded: 1,500 training images per class (15,000) and 300 test
images per class (3,000), kept in their original order.
"""

import os

import numpy as np
from absl import app, flags

from quee_jax import data

flags.DEFINE_string("idx_dir", data.DEBIAN_FASHION_MNIST, "Directory of the four IDX files.")
flags.DEFINE_integer("train_per_class", 1500, "Training images per class.")
flags.DEFINE_integer("test_per_class", 300, "Test images per class.")
flags.DEFINE_integer("seed", 0, "Selection seed.")
FLAGS = flags.FLAGS


def stratified(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
  picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
  return np.sort(np.concatenate(picks))


def main(argv):
  del argv
  train, test = data.load_idx_dir(FLAGS.idx_dir)
  rng = np.random.default_rng(FLAGS.seed)
  i = stratified(train.labels, FLAGS.train_per_class, rng)
  j = stratified(test.labels, FLAGS.test_per_class, rng)
  os.makedirs(os.path.dirname(data.EMBEDDED_PATH), exist_ok=True)
  np.savez_compressed(data.EMBEDDED_PATH,
                      train_images=train.images[i, ..., 0], train_labels=train.labels[i].astype(np.uint8),
                      test_images=test.images[j, ..., 0], test_labels=test.labels[j].astype(np.uint8))
  print(f"wrote {data.EMBEDDED_PATH}: {len(i)} train + {len(j)} test images,"
        f" {os.path.getsize(data.EMBEDDED_PATH) / 1e6:.1f} MB")


if __name__ == "__main__":
  app.run(main)
