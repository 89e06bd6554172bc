"""Tests for bpcp_jax.training.data: loading (real CIFAR-10 archive and generated folders), caching,
bad-input errors, augmentation, batching, sharding, padding and prefetching."""

from __future__ import annotations

import os
import tarfile
import threading
import time

import jax
import numpy as np
import pytest
from PIL import Image

from bpcp_jax.training import data
from tests.conftest import REPO_ROOT
from bpcp_jax.training.data import DataError

REAL_ARCHIVE = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
    "cifar10-jpeg.tar.gz"))
# Tests on the real archive take the ``cifar_archive`` fixture from conftest.py, which honours
# $BPCP_DATA and skips (naming the path) when the archive is absent.


# --------------------------------------------------------------------------------------
# Helpers: a small generated image folder
# --------------------------------------------------------------------------------------


def _pixel(label: int, idx: int) -> tuple[int, int, int]:
  # A distinct, exactly-representable colour per (class, image) so PNG round trips can be
  # checked pixel for pixel.
  return (10 * label + idx, 200 - 10 * label, 7 * idx)


def _make_folder(root, classes=("beta", "alpha", "gamma"), splits=("train", "test"),
                 per_class=3, size=8, top="myset"):
  """root/[top/]<split>/<class>/NN.png, plus one JPEG and one grayscale PNG per split."""
  base = root / top if top else root
  for split in splits:
    for label, cls in enumerate(sorted(classes)):
      d = base / split / cls
      d.mkdir(parents=True)
      for i in range(per_class):
        Image.new("RGB", (size, size), _pixel(label, i)).save(d / f"{i:02d}.png")
    # Grayscale PNG (mode "L") in the last class, and a JPEG in the first class.
    last = sorted(classes)[-1]
    Image.new("L", (size, size), 77).save(base / split / last / "99_gray.png")
    Image.new("RGB", (size, size), (255, 0, 0)).save(base / split / sorted(classes)[0] / "98.jpg")
    (base / split / "README.txt").write_text("not an image, ignored")
  return root


def _make_tar(src_dir, out_path):
  with tarfile.open(out_path, "w:gz") as tf:
    for name in sorted(os.listdir(src_dir)):
      tf.add(os.path.join(src_dir, name), arcname=name)
  return str(out_path)


# --------------------------------------------------------------------------------------
# Real CIFAR-10 archive
# --------------------------------------------------------------------------------------


def test_real_archive_small_and_cache(tmp_path, cifar_archive, monkeypatch):
  cache = tmp_path / "cache"
  train = data.load_image_folder(cifar_archive, "train", cache_dir=str(cache),
                                 max_per_class=20, progress=False)
  assert train.images.shape == (200, 32, 32, 3)
  assert train.images.dtype == np.uint8
  assert train.labels.dtype == np.int32 and train.labels.shape == (200,)
  assert train.class_names == data.CIFAR10_CLASSES
  assert train.class_names[:3] == ("airplane", "automobile", "bird")
  np.testing.assert_array_equal(np.bincount(train.labels, minlength=10), [20] * 10)
  assert set(np.unique(train.labels)) == set(range(10))
  # Real photos, not blank arrays: the mean is near the published CIFAR statistics.
  mean = train.images.reshape(-1, 3).mean(0) / 255.0
  assert np.all(np.abs(mean - np.array(data.CIFAR_MEAN)) < 0.08), mean
  assert train.images.std() > 30

  files = list(cache.glob("*.npz"))
  assert len(files) == 1 and "train" in files[0].name
  assert not list(cache.glob("*.tmp"))
  mtime = files[0].stat().st_mtime_ns

  def no_archive_pass(*args, **kwargs):
    raise AssertionError("the archive was read again instead of the cache")

  with monkeypatch.context() as patch:
    patch.setattr(data, "_read_split", no_archive_pass)
    again = data.load_image_folder(cifar_archive, "train", cache_dir=str(cache),
                                   max_per_class=20, progress=False)
  assert files[0].stat().st_mtime_ns == mtime  # not rewritten
  np.testing.assert_array_equal(again.images, train.images)
  np.testing.assert_array_equal(again.labels, train.labels)
  assert again.class_names == train.class_names
  assert again.labels.dtype == np.int32

  # A different max_per_class is a different cache entry.
  small = data.load_image_folder(cifar_archive, "train", cache_dir=str(cache),
                                 max_per_class=5, progress=False)
  assert len(small) == 50
  assert len(list(cache.glob("*.npz"))) == 2
  # First K files in sorted order: the 5-per-class load is a prefix of the 20-per-class one.
  np.testing.assert_array_equal(small.images[:5], train.images[:5])
  np.testing.assert_array_equal(small.images[5:10], train.images[20:25])


def test_real_full_test_split(tmp_path, cifar_archive):
  test = data.load_image_folder(cifar_archive, "test", cache_dir=str(tmp_path), progress=True)
  assert test.images.shape == (10000, 32, 32, 3)
  assert test.images.dtype == np.uint8
  assert test.class_names == data.CIFAR10_CLASSES
  np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
  # Labels are grouped class by class in canonical order.
  np.testing.assert_array_equal(test.labels, np.repeat(np.arange(10, dtype=np.int32), 1000))


def test_load_dataset_folder_real(tmp_path, cifar_archive):
  train, test = data.load_dataset("folder", data_path=cifar_archive, cache_dir=str(tmp_path),
                                  max_per_class=2, progress=False)
  assert len(train) == 20 and len(test) == 20
  assert train.class_names == test.class_names == data.CIFAR10_CLASSES
  # Train and test are different images.
  assert not np.array_equal(train.images, test.images)


def test_default_data_path(monkeypatch, tmp_path):
  monkeypatch.setenv(data.DEFAULT_DATA_ENV, "/some/where.tar.gz")
  assert data.default_data_path() == "/some/where.tar.gz"
  monkeypatch.delenv(data.DEFAULT_DATA_ENV)
  # From an unrelated cwd, the repo-root-relative archive is found (if present).
  monkeypatch.chdir(tmp_path)
  path = data.default_data_path()
  assert path.endswith(os.path.join("shared", "data", "cifar10-jpeg.tar.gz"))
  if os.path.exists(REAL_ARCHIVE):
    assert os.path.samefile(path, REAL_ARCHIVE)
  else:
    assert path == os.path.abspath(os.path.join("..", "shared", "data", "cifar10-jpeg.tar.gz"))


# --------------------------------------------------------------------------------------
# Generated folders (directory and tar.gz)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dir", "dir-notop", "targz", "tar-notop"])
def test_generated_folder(tmp_path, kind):
  top = None if "notop" in kind else "myset"
  src = _make_folder(tmp_path / "src", top=top)
  if kind.startswith("dir"):
    path = str(src)
  else:
    path = _make_tar(src, tmp_path / ("set.tar.gz" if kind == "targz" else "set.tar"))
  cache = str(tmp_path / "cache")
  split = data.load_image_folder(path, "train", image_size=8, cache_dir=cache, progress=False)
  # Alphabetical class order (not CIFAR classes), regardless of creation order.
  assert split.class_names == ("alpha", "beta", "gamma")
  assert split.images.shape == (3 * 3 + 2, 8, 8, 3) and split.images.dtype == np.uint8
  np.testing.assert_array_equal(split.labels, [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
  # PNGs decoded exactly, in sorted filename order within each class.
  for i in range(3):
    np.testing.assert_array_equal(split.images[i], np.full((8, 8, 3), _pixel(0, i)))
    np.testing.assert_array_equal(split.images[4 + i], np.full((8, 8, 3), _pixel(1, i)))
  # JPEG (lossy): roughly red. Sorted after "02.png" as "98.jpg".
  assert np.abs(split.images[3].astype(int) - [255, 0, 0]).max() < 10
  # Grayscale PNG became RGB with equal channels.
  np.testing.assert_array_equal(split.images[10], np.full((8, 8, 3), 77))

  test = data.load_image_folder(path, "test", image_size=8, cache_dir=cache,
                                max_per_class=2, progress=False)
  assert len(test) == 6
  data.check_same_classes(split, test)
  # Cached result equals a fresh decode.
  again = data.load_image_folder(path, "train", image_size=8, cache_dir=cache, progress=False)
  np.testing.assert_array_equal(again.images, split.images)


def test_cifar_class_order_in_generated_folder(tmp_path):
  src = _make_folder(tmp_path / "src", classes=data.CIFAR10_CLASSES, per_class=1, size=4,
                     splits=("train",))
  split = data.load_image_folder(str(src), "train", image_size=4,
                                 cache_dir=str(tmp_path / "c"), progress=False)
  assert split.class_names == data.CIFAR10_CLASSES
  # "cat" is label 3 in CIFAR-10 order; its image has the colour made for it.
  cat = split.images[split.labels == 3]
  assert len(cat) == 1
  np.testing.assert_array_equal(cat[0], np.full((4, 4, 3), _pixel(3, 0)))
  # "truck" (label 9) holds the extra grayscale image.
  assert np.sum(split.labels == 9) == 2


def test_directory_cache_invalidated_on_change(tmp_path):
  src = _make_folder(tmp_path / "src", per_class=1, size=4, top=None)
  cache = str(tmp_path / "cache")
  first = data.load_image_folder(str(src), "train", image_size=4, cache_dir=cache,
                                 progress=False)
  Image.new("RGB", (4, 4), (1, 2, 3)).save(src / "train" / "alpha" / "50.png")
  second = data.load_image_folder(str(src), "train", image_size=4, cache_dir=cache,
                                  progress=False)
  assert len(second) == len(first) + 1


def test_cache_env_default(tmp_path, monkeypatch):
  src = _make_folder(tmp_path / "src", per_class=1, size=4)
  monkeypatch.setenv("BPCP_CACHE", str(tmp_path / "envcache"))
  data.load_image_folder(str(src), "train", image_size=4, progress=False)
  assert len(list((tmp_path / "envcache").glob("*.npz"))) == 1


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
  missing = str(tmp_path / "nope.tar.gz")
  with pytest.raises(DataError, match="data path not found") as e:
    data.load_image_folder(missing, "train", cache_dir=str(tmp_path))
  assert missing in str(e.value) and "BPCP_DATA" in str(e.value)


def test_empty_inputs(tmp_path):
  empty_dir = tmp_path / "empty"
  empty_dir.mkdir()
  with pytest.raises(DataError, match="no images") as e:
    data.load_image_folder(str(empty_dir), "train", cache_dir=str(tmp_path / "c"))
  assert str(empty_dir) in str(e.value)

  empty_tar = tmp_path / "empty.tar.gz"
  with tarfile.open(empty_tar, "w:gz"):
    pass
  with pytest.raises(DataError, match="no images"):
    data.load_image_folder(str(empty_tar), "train", cache_dir=str(tmp_path / "c"))

  zero_bytes = tmp_path / "zero.tgz"
  zero_bytes.write_bytes(b"")
  with pytest.raises(DataError, match="zero.tgz"):
    data.load_image_folder(str(zero_bytes), "train", cache_dir=str(tmp_path / "c"))

  not_archive = tmp_path / "file.txt"
  not_archive.write_text("x")
  with pytest.raises(DataError, match="file.txt"):
    data.load_image_folder(str(not_archive), "train", cache_dir=str(tmp_path / "c"))


@pytest.mark.parametrize("as_tar", [False, True])
def test_missing_split(tmp_path, as_tar):
  src = _make_folder(tmp_path / "src", per_class=1, size=4)
  path = _make_tar(src, tmp_path / "s.tar.gz") if as_tar else str(src)
  with pytest.raises(DataError, match="split 'val' not found") as e:
    data.load_image_folder(path, "val", image_size=4, cache_dir=str(tmp_path / "c"))
  assert "'test'" in str(e.value) and "'train'" in str(e.value)


@pytest.mark.parametrize("as_tar", [False, True])
def test_corrupt_file_named(tmp_path, as_tar):
  src = _make_folder(tmp_path / "src", per_class=1, size=4)
  (src / "myset" / "train" / "beta" / "05_broken.jpg").write_bytes(b"definitely not a jpeg")
  path = _make_tar(src, tmp_path / "s.tar.gz") if as_tar else str(src)
  with pytest.raises(DataError, match="cannot decode") as e:
    data.load_image_folder(path, "train", image_size=4, cache_dir=str(tmp_path / "c"),
                           progress=False)
  assert "myset/train/beta/05_broken.jpg" in str(e.value)
  # Nothing was cached for the failed load.
  assert not list((tmp_path / "c").glob("*.npz"))
  # The test split is unaffected.
  data.load_image_folder(path, "test", image_size=4, cache_dir=str(tmp_path / "c"),
                         progress=False)


def test_truncated_image_named(tmp_path):
  src = _make_folder(tmp_path / "src", per_class=1, size=4, top=None)
  good = src / "train" / "alpha" / "00.png"
  (src / "train" / "alpha" / "01_trunc.png").write_bytes(good.read_bytes()[:40])
  with pytest.raises(DataError, match="01_trunc.png"):
    data.load_image_folder(str(src), "train", image_size=4, cache_dir=str(tmp_path / "c"),
                           progress=False)


@pytest.mark.parametrize("as_tar", [False, True])
def test_wrong_size_named(tmp_path, as_tar):
  src = _make_folder(tmp_path / "src", per_class=1, size=4)
  Image.new("RGB", (5, 3)).save(src / "myset" / "train" / "gamma" / "07_big.png")
  path = _make_tar(src, tmp_path / "s.tar.gz") if as_tar else str(src)
  with pytest.raises(DataError) as e:
    data.load_image_folder(path, "train", image_size=4, cache_dir=str(tmp_path / "c"),
                           progress=False)
  msg = str(e.value)
  assert "07_big.png" in msg and "5x3" in msg and "4x4" in msg


def test_class_missing_from_one_split(tmp_path):
  src = _make_folder(tmp_path / "src", per_class=1, size=4)
  # Remove "beta" from the test split.
  beta = src / "myset" / "test" / "beta"
  for f in beta.iterdir():
    f.unlink()
  beta.rmdir()
  path = _make_tar(src, tmp_path / "s.tar.gz")
  cache = str(tmp_path / "c")
  train = data.load_image_folder(path, "train", image_size=4, cache_dir=cache, progress=False)
  test = data.load_image_folder(path, "test", image_size=4, cache_dir=cache, progress=False)
  with pytest.raises(DataError, match=r"\['beta'\] present in train but missing from test"):
    data.check_same_classes(train, test)
  with pytest.raises(DataError, match="present in b but missing from a"):
    data.check_same_classes(test, train, names=("a", "b"))


def test_load_dataset_errors(tmp_path):
  with pytest.raises(DataError, match="tfds:cifar10") as e:
    data.load_dataset("imagenet")
  assert "'imagenet'" in str(e.value) and "folder" in str(e.value)
  with pytest.raises(DataError, match="data path not found"):
    data.load_dataset("folder", data_path=str(tmp_path / "missing"), cache_dir=str(tmp_path))


def test_load_dataset_folder_checks_classes(tmp_path):
  src = _make_folder(tmp_path / "src", per_class=1, size=4, top=None)
  (src / "train" / "delta").mkdir()
  Image.new("RGB", (32, 32)).save(src / "train" / "delta" / "0.png")
  # image_size is 32 in load_dataset; regenerate all images at 32x32.
  for f in src.rglob("*.png"):
    Image.new("RGB", (32, 32)).save(f)
  for f in src.rglob("*.jpg"):
    Image.new("RGB", (32, 32)).save(f)
  with pytest.raises(DataError, match="delta"):
    data.load_dataset("folder", data_path=str(src), cache_dir=str(tmp_path / "c"),
                      progress=False)


def test_load_tfds_without_tensorflow_datasets(monkeypatch):
  import builtins

  real_import = builtins.__import__

  def no_tfds(name, *args, **kwargs):
    if name.startswith("tensorflow_datasets"):
      raise ImportError("No module named 'tensorflow_datasets'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_tfds)
  with pytest.raises(ImportError, match=r"pip install bpcp-jax\[tfds\]"):
    data.load_tfds("cifar10", "train")


def test_tfds_path_with_tfds_mock_data():
  """The tfds source through the pipeline's loader, on tensorflow_datasets' own mock data (no
  download, no TensorFlow: tfds.data_source reads numpy examples)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  from bpcp_jax.run.config import apply_overrides, load_config_file
  from bpcp_jax.run.pipeline import check_run_config, load_data

  config = apply_overrides(load_config_file(os.path.join(REPO_ROOT, "experiments", "configs", "tiny.py")),
                           ["data.source=tfds:cifar10", "data.max_train_per_class=3", "data.max_test_per_class=0"])
  check_run_config(config)
  with tfds.testing.mock_data(num_examples=80):
    train, test = load_data(config, progress=False)
    full = data.load_tfds("cifar10", "train")
  assert train.images.shape[1:] == (32, 32, 3) and train.images.dtype == np.uint8 and train.labels.dtype == np.int32
  assert len(train.class_names) == 10 and train.class_names == test.class_names
  assert len(full.labels) == len(test.labels) == 80  # max_test_per_class 0: every test example
  # max_train_per_class 3: the first 3 examples of each class, in the data set's order
  first3 = np.sort(np.concatenate([np.flatnonzero(full.labels == c)[:3] for c in range(10)]))
  np.testing.assert_array_equal(train.labels, full.labels[first3])
  np.testing.assert_array_equal(train.images, full.images[first3])


# --------------------------------------------------------------------------------------
# normalize / augment
# --------------------------------------------------------------------------------------


def test_normalize_numerics():
  x = np.array([[[[0, 255, 128]]]], dtype=np.uint8)  # [1, 1, 1, 3]
  y = np.asarray(jax.jit(data.normalize)(x))
  expected = (np.array([0, 255, 128]) / 255.0 - np.array(data.CIFAR_MEAN)) / np.array(data.CIFAR_STD)
  assert y.dtype == np.float32 and y.shape == (1, 1, 1, 3)
  np.testing.assert_allclose(y[0, 0, 0], expected, rtol=1e-5, atol=1e-6)
  # A single image [H, W, 3] works too (rank-aware broadcasting).
  assert data.normalize(x[0]).shape == (1, 1, 3)


def _random_images(n=16, size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_augment_shapes_and_determinism():
  images = _random_images()
  aug = jax.jit(data.augment)
  k = jax.random.PRNGKey(0)
  a = np.asarray(aug(k, images))
  b = np.asarray(aug(k, images))
  c = np.asarray(aug(jax.random.PRNGKey(1), images))
  assert a.shape == (16, 32, 32, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # New-style typed keys work as well.
  d = np.asarray(aug(jax.random.key(0), images))
  assert d.shape == a.shape


def test_augment_is_crop_and_flip_of_padded_input():
  images = _random_images(n=64)
  out = np.asarray(jax.jit(data.augment)(jax.random.PRNGKey(3), images))
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  mean = np.array(data.CIFAR_MEAN, np.float32)
  std = np.array(data.CIFAR_STD, np.float32)
  offsets, flips = set(), 0
  for i in range(len(images)):
    # All 9 x 9 crops x 2 flips of this padded image, normalized in NumPy: [162, 32, 32, 3].
    crops = np.stack([padded[i, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)])
    cands = np.concatenate([crops, crops[:, :, ::-1]])
    refs = (cands.astype(np.float32) / 255.0 - mean) / std
    err = np.abs(refs - out[i]).reshape(len(refs), -1).max(axis=1)
    best = int(np.argmin(err))
    assert err[best] < 1e-4, f"output {i} is not a crop/flip of the padded input"
    offsets.add(divmod(best % 81, 9))
    flips += best >= 81
  # Per-image randomness: many different offsets and a mix of flipped/unflipped images.
  assert len(offsets) > 20
  assert 10 < flips < 54
  # Zero padding shows up as normalized black (-mean/std) at the borders of shifted crops.
  black = np.asarray(data.normalize(np.zeros((1, 1, 1, 3), np.uint8)))[0, 0, 0]
  shifted = [i for i in range(64) if out[i, 0, 0, 0] == black[0] and out[i, 0, 1, 0] == black[0]]
  assert shifted


# --------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------


def test_epoch_batches_permutation():
  n, bs = 103, 10
  batches = list(data.epoch_batches(n, bs, seed=0, epoch=0))
  assert len(batches) == data.num_batches(n, bs) == 10
  assert all(b.shape == (bs,) for b in batches)
  flat = np.concatenate(batches)
  assert len(np.unique(flat)) == 100 and flat.min() >= 0 and flat.max() < n
  # Without dropping the remainder every example appears exactly once.
  full = list(data.epoch_batches(n, bs, seed=0, epoch=0, drop_remainder=False))
  assert len(full) == data.num_batches(n, bs, drop_remainder=False) == 11
  assert len(full[-1]) == 3
  np.testing.assert_array_equal(np.sort(np.concatenate(full)), np.arange(n))
  # Same seed/epoch -> same order; other epoch or seed -> different order.
  again = np.concatenate(list(data.epoch_batches(n, bs, seed=0, epoch=0)))
  np.testing.assert_array_equal(again, flat)
  other_epoch = np.concatenate(list(data.epoch_batches(n, bs, seed=0, epoch=1)))
  other_seed = np.concatenate(list(data.epoch_batches(n, bs, seed=1, epoch=0)))
  assert not np.array_equal(flat, other_epoch)
  assert not np.array_equal(flat, other_seed)
  # No shuffle: sequential.
  seq = list(data.epoch_batches(25, 10, seed=0, epoch=0, shuffle=False, drop_remainder=False))
  np.testing.assert_array_equal(np.concatenate(seq), np.arange(25))


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_epoch_batches_process_shares(drop_remainder):
  n, bs, pc = 1003, 64, 4
  global_batches = list(data.epoch_batches(n, bs, seed=5, epoch=2,
                                           drop_remainder=drop_remainder))
  per_process = [list(data.epoch_batches(n, bs, seed=5, epoch=2, process_index=p,
                                         process_count=pc, drop_remainder=drop_remainder))
                 for p in range(pc)]
  assert all(len(batches) == len(global_batches) for batches in per_process)
  for b, global_batch in enumerate(global_batches):
    shares = [per_process[p][b] for p in range(pc)]
    if len(global_batch) == bs:
      assert all(len(s) == bs // pc for s in shares)
    # Contiguous shares, in process order, that together make up the global batch.
    np.testing.assert_array_equal(np.concatenate(shares), global_batch)
    for p in range(pc):
      for q in range(p + 1, pc):
        assert not set(shares[p]) & set(shares[q])


def test_epoch_batches_errors():
  with pytest.raises(DataError, match="batch_size 10 is not divisible by process_count 4"):
    next(data.epoch_batches(100, 10, seed=0, epoch=0, process_count=4))
  with pytest.raises(DataError, match="process_index 2"):
    next(data.epoch_batches(100, 10, seed=0, epoch=0, process_index=2, process_count=2))
  with pytest.raises(DataError, match="batch_size"):
    data.num_batches(10, 0)


def test_shard():
  x = np.arange(8 * 3).reshape(8, 3)
  s = data.shard(x, 4)
  assert s.shape == (4, 2, 3)
  np.testing.assert_array_equal(s.reshape(8, 3), x)
  np.testing.assert_array_equal(s[1], x[2:4])
  d = data.shard({"image": np.zeros((6, 2, 2, 3)), "label": np.zeros(6, np.int32)}, 2)
  assert d["image"].shape == (2, 3, 2, 2, 3) and d["label"].shape == (2, 3)
  with pytest.raises(DataError, match=r"batch size 6 .* device count 4"):
    data.shard({"label": np.zeros(6)}, 4)


def test_pad_batch():
  images = np.ones((3, 4, 4, 3), np.uint8)
  labels = np.array([5, 6, 7], np.int32)
  pi, pl, w = data.pad_batch(images, labels, 8)
  assert pi.shape == (8, 4, 4, 3) and pi.dtype == np.uint8
  assert pl.shape == (8,) and pl.dtype == np.int32
  np.testing.assert_array_equal(pl, [5, 6, 7, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(w, [1, 1, 1, 0, 0, 0, 0, 0])
  assert w.dtype == np.float32
  assert pi[3:].sum() == 0 and pi[:3].min() == 1
  # Full batch: unchanged, all weights 1.
  fi, fl, fw = data.pad_batch(images, labels, 3)
  np.testing.assert_array_equal(fi, images)
  np.testing.assert_array_equal(fw, [1, 1, 1])
  with pytest.raises(DataError, match="larger than batch_size 2"):
    data.pad_batch(images, labels, 2)


def test_eval_counts_every_example_once():
  # epoch_batches(drop_remainder=False) + pad_batch: weights sum to the data set size and
  # every index is covered once.
  n, bs = 37, 8
  seen, total_weight = [], 0.0
  for idx in data.epoch_batches(n, bs, seed=0, epoch=0, shuffle=False, drop_remainder=False):
    imgs, labels, w = data.pad_batch(np.zeros((len(idx), 2, 2, 3)), idx.astype(np.int32), bs)
    assert imgs.shape[0] == bs
    total_weight += w.sum()
    seen.extend(labels[w > 0])
  assert total_weight == n
  np.testing.assert_array_equal(np.sort(seen), np.arange(n))


# --------------------------------------------------------------------------------------
# prefetch
# --------------------------------------------------------------------------------------


def test_prefetch_order_and_device_put():
  items = list(data.prefetch(iter(range(20)), size=3))
  assert items == list(range(20))
  arrays = list(data.prefetch((np.full(2, i) for i in range(5)), device_put=jax.device_put))
  assert all(isinstance(a, jax.Array) for a in arrays)
  assert [int(a[0]) for a in arrays] == list(range(5))


def test_prefetch_propagates_exception():
  def source():
    yield 1
    yield 2
    raise RuntimeError("boom in producer")

  it = data.prefetch(source())
  assert next(it) == 1
  assert next(it) == 2
  with pytest.raises(RuntimeError, match="boom in producer"):
    next(it)
  with pytest.raises(StopIteration):
    next(it)


def test_prefetch_stops_when_consumer_stops_early():
  produced = []
  closed = threading.Event()

  def source():
    try:
      for i in range(10_000):
        produced.append(i)
        yield i
    finally:
      closed.set()

  before = threading.active_count()
  with data.prefetch(source(), size=2) as it:
    assert [next(it) for _ in range(3)] == [0, 1, 2]
  assert closed.wait(5.0)  # the source generator was closed by the producer thread
  assert len(produced) < 20  # bounded look-ahead, not the whole source
  deadline = time.time() + 5.0
  while threading.active_count() > before and time.time() < deadline:
    time.sleep(0.01)
  assert threading.active_count() <= before

  # Dropping an unfinished prefetcher (no explicit close) also stops its thread.
  it = data.prefetch(iter(range(1000)), size=1)
  next(it)
  del it
  deadline = time.time() + 5.0
  while threading.active_count() > before and time.time() < deadline:
    time.sleep(0.01)
  assert threading.active_count() <= before


def test_prefetch_bad_size():
  with pytest.raises(DataError, match="size"):
    data.prefetch(iter([]), size=0)
