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
tokenizer of the model that reads them. Where the data comes from:
`quee_jax.data.sources`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Mapping

import numpy as np

from quee_jax.data.sources import (
  DATASETS,
  ArraySource,
  DatasetInfo,
  Source,
  fit_image,
  open_sources,
)

SPLITS = ("train", "fit", "cal", "test")


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

  def read(self, positions: np.ndarray, augment_seed: tuple[int, ...] | None = None,
           augment_at: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed inputs and labels at `positions` (images augmented if a seed is given).

    augment_at: (offset, total) when `positions` are rows offset.. of a batch of `total`
    (a process's block): each row is augmented as it is in the whole batch.
    """
    if len(positions) == 0 and len(self):  # a process's empty block of a last batch:
      images, labels = self.read(np.arange(1))  # shaped as a row is (sources differ on none)
      return images[:0], labels[:0]
    images, labels = self.source.read(self.indices[positions])
    if self.info.kind == "text":
      return self.tokenizer(list(images)), np.asarray(labels, np.int32)
    if images.shape[1:3] != (self.image_size, self.image_size):
      images = np.stack([fit_image(im, self.image_size) for im in images])
    if augment_seed is not None and self.info.augment:
      offset, total = augment_at or (0, len(images))
      images = augment(images, self.info.augment, np.random.default_rng(augment_seed),
                       offset, total)
    return images.astype(np.float32) / 127.5 - 1.0, labels.astype(np.int32)

  def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
              start_step: int = 0, num_steps: int | None = None, augment: bool = False,
              rows: slice = slice(None)) -> Iterator[Batch]:
    """Fixed-size batches.

    Without shuffle: one pass in order, the last batch padded (mask False).
    With shuffle: endless epochs, each a permutation keyed by (seed, epoch)
    with full batches only; step k's batch and augmentation depend on
    (seed, k) alone, so a run resumed at `start_step` sees what an
    uninterrupted run would have.
    rows: read only these rows of every batch (a process's block of a global
    batch; `hosts.local_rows`); they are what they are in the whole batch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    n = len(self)
    lo, hi, _ = rows.indices(batch_size)
    if not shuffle:
      for start in range(0, n, batch_size):
        pos = np.arange(start, min(start + batch_size, n))[lo:hi]
        images, labels = self.read(pos)
        yield _pad(images, labels, hi - lo)
      return
    if batch_size > n:
      raise ValueError(f"batch_size: {batch_size} exceeds the {n} samples of split {self.name!r}")
    per_epoch = n // batch_size
    step = start_step
    while num_steps is None or step < start_step + num_steps:
      epoch, k = divmod(step, per_epoch)
      order = np.random.default_rng([seed, 0, epoch]).permutation(n)
      pos = order[k * batch_size:(k + 1) * batch_size]
      images, labels = self.read(pos[lo:hi], augment_seed=(seed, 1, step) if augment else None,
                                 augment_at=(lo, batch_size))
      yield Batch(images, labels, np.ones(hi - lo, bool))
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


def augment(images: np.ndarray, kind: str, rng: np.random.Generator, offset: int = 0,
            total: int | None = None) -> np.ndarray:
  """Random crop after reflect-padding by size/8, plus a horizontal flip for 'crop_flip'.

  offset, total: `images` are rows offset.. of a batch of `total` (default: the whole
  batch); the draws are made for the whole batch, so a row's augmentation does not depend
  on which process reads it.
  """
  n, h, w, _ = images.shape
  total = n if total is None else total
  rows = slice(offset, offset + n)
  pad = max(1, h // 8)
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
  dy, dx = rng.integers(0, 2 * pad + 1, (2, total))[:, rows]
  out = np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
  if kind == "crop_flip":
    flip = rng.random(total)[rows] < 0.5
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

  train_src, test_src = open_sources(info, source, data_dir, image_size)
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
