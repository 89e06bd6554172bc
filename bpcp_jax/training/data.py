"""Input pipeline for bpcp_jax: loading, caching, augmenting and batching image data.

What lives here:

* Loading a split of an image-folder data set (``[<top>/]<split>/<class>/*.jpg|png``) from a
  directory or straight from a ``.tar``/``.tar.gz`` archive, decoded once with Pillow and
  cached as uint8 arrays in an ``.npz`` file (``load_image_folder``); the optional
  ``tensorflow_datasets`` path (``load_tfds``); and ``load_dataset`` choosing between them.
* On-device, jittable preprocessing: ``normalize`` and the standard CIFAR ``augment``
  (zero-pad 4, random crop, random horizontal flip, normalize).
* Host-side batching for single- and multi-host training: ``epoch_batches`` (seeded
  per-epoch permutations, each process reading its own share of every global batch),
  ``num_batches``, ``shard``, ``pad_batch`` (fixed-shape evaluation) and a background
  thread ``prefetch``.

Everything is a pure function of its arguments: randomness comes from explicit seeds or
PRNG keys, and there is no module-level mutable state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import queue
import tarfile
import threading
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from bpcp_jax.training import files

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
DEFAULT_DATA_ENV = "BPCP_DATA"
DEFAULT_CACHE_ENV = "BPCP_CACHE"

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
_DEFAULT_ARCHIVE = os.path.join("..", "shared", "data", "cifar10-jpeg.tar.gz")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_FOLDER_SOURCE = "folder"
TFDS_SOURCES = ("tfds:cifar10", "tfds:cifar100")
_TFDS_SOURCES = TFDS_SOURCES
# Bump when the cache contents or layout change, so stale caches are never reused.
_CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: array fields make == ambiguous
class Split:
  """One split of a data set, held in host memory."""

  images: np.ndarray  # uint8 [N, H, W, 3]
  labels: np.ndarray  # int32 [N]
  class_names: tuple[str, ...]

  def __post_init__(self):
    if self.images.ndim != 4 or self.images.shape[-1] != 3:
      raise DataError(f"Split images must be [N, H, W, 3], got shape {self.images.shape}")
    if self.labels.shape != (self.images.shape[0],):
      raise DataError(
          f"Split labels shape {self.labels.shape} does not match "
          f"{self.images.shape[0]} images")

  def __len__(self) -> int:
    return int(self.images.shape[0])

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


class DataError(ValueError):
  """Bad input data or arguments; the message names the offending file, path, key or value."""


# --------------------------------------------------------------------------------------
# Locating and loading data
# --------------------------------------------------------------------------------------


def default_data_path() -> str:
  """The CIFAR-10 archive to use when none is given.

  ``$BPCP_DATA`` if set; otherwise the first existing of ``../shared/data/cifar10-jpeg.tar.gz``
  relative to the cwd and relative to the repository root. If neither exists, the
  cwd-relative path is returned so the "not found" error names it.
  """
  env = os.environ.get(DEFAULT_DATA_ENV)
  if env:
    return env
  repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # <repo>/bpcp_jax/training/
  candidates = [
      os.path.abspath(_DEFAULT_ARCHIVE),
      os.path.normpath(os.path.join(repo_root, _DEFAULT_ARCHIVE)),
  ]
  for candidate in candidates:
    if os.path.exists(candidate):
      return candidate
  return candidates[0]


def cache_root() -> str:
  """Where bpcp_jax keeps what it caches on disk: ``$BPCP_CACHE``, else ``~/.cache/bpcp_jax``."""
  env = os.environ.get(DEFAULT_CACHE_ENV)
  if env:
    return env
  return os.path.join(os.path.expanduser("~"), ".cache", "bpcp_jax")


def _is_image_name(name: str) -> bool:
  base = name.rsplit("/", 1)[-1]
  # Skip hidden files such as macOS "._x.jpg" resource forks, which are not images.
  return not base.startswith(".") and base.lower().endswith(_IMAGE_EXTENSIONS)


def _parse_member(name: str) -> tuple[str, str, str, str] | None:
  """Split ``[<top>/]<split>/<class>/<file>`` into (top, split, class, file); None otherwise."""
  parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
  if len(parts) == 3:
    return ("", parts[0], parts[1], parts[2])
  if len(parts) == 4 and parts[0] != "__MACOSX":
    return (parts[0], parts[1], parts[2], parts[3])
  return None


def _is_archive(path: str) -> bool:
  return os.path.isfile(path) and path.lower().endswith(_TAR_SUFFIXES)


def _list_directory(path: str) -> list[str]:
  """Relative '/'-separated names of image files at depth 3 or 4 under ``path``."""
  names = []
  root_depth = path.rstrip(os.sep).count(os.sep)
  for dirpath, dirnames, filenames in os.walk(path):
    depth = dirpath.rstrip(os.sep).count(os.sep) - root_depth
    if depth >= 3:
      dirnames[:] = []  # deeper than <top>/<split>/<class>: not part of the layout
    dirnames.sort()
    rel = os.path.relpath(dirpath, path)
    for f in filenames:
      name = f if rel == "." else os.path.join(rel, f).replace(os.sep, "/")
      if _is_image_name(name):
        names.append(name)
  return names


def _select_split(names: Iterable[str], path: str, split: str) -> dict[str, list[tuple[str, str]]]:
  """Group the image names belonging to ``split`` by class: {class: [(filename, name)]}.

  The optional top-level folder is detected from the names themselves: images whose
  parent's parent is ``split`` and that sit at most one folder deeper than the root.
  """
  splits_found: set[str] = set()
  by_top: dict[str, dict[str, list[tuple[str, str]]]] = {}
  any_image = False
  for name in names:
    if not _is_image_name(name):
      continue
    any_image = True
    parsed = _parse_member(name)
    if parsed is None:
      continue
    top, split_name, cls, fname = parsed
    splits_found.add(split_name)
    if split_name == split:
      by_top.setdefault(top, {}).setdefault(cls, []).append((fname, name))
  if not any_image:
    raise DataError(f"no images (*.jpg, *.jpeg, *.png) found in {path}")
  if not by_top:
    raise DataError(
        f"split {split!r} not found in {path}; splits found: {sorted(splits_found)} "
        f"(expected layout [<top>/]<split>/<class>/<image>)")
  if len(by_top) > 1:
    tops = sorted(t or "<root>" for t in by_top)
    raise DataError(
        f"ambiguous layout in {path}: split {split!r} appears under several top-level "
        f"folders {tops}")
  return next(iter(by_top.values()))


def _order_classes(class_names: Iterable[str]) -> tuple[str, ...]:
  names = set(class_names)
  # CIFAR-10's canonical label order happens to be alphabetical, but pin it explicitly so
  # labels always match every other CIFAR-10 pipeline, whatever the sort rules.
  if names == set(CIFAR10_CLASSES):
    return CIFAR10_CLASSES
  return tuple(sorted(names))


def _pick_files(groups: dict[str, list[tuple[str, str]]], max_per_class: int | None
                ) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
  """(class_names, [(member name, label)]) with the first ``max_per_class`` files per class."""
  class_names = _order_classes(groups)
  picked = []
  for label, cls in enumerate(class_names):
    files = sorted(groups[cls])
    if max_per_class is not None:
      files = files[:max_per_class]
    picked.extend((name, label) for _, name in files)
  return class_names, picked


def _decode(data: bytes, name: str, path: str, image_size: int) -> np.ndarray:
  from PIL import Image  # local import: Pillow is only needed when decoding, not for caches

  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      if img.mode == "P":
        # Palette images may carry transparency; converting via RGBA avoids Pillow's
        # warning (which the test suite turns into an error).
        img = img.convert("RGBA")
      rgb = img.convert("RGB")
  except Exception as e:  # Pillow raises several types (UnidentifiedImageError, OSError, ...)
    raise DataError(f"cannot decode image {name!r} in {path}: {e}") from e
  if rgb.size != (image_size, image_size):
    w, h = rgb.size
    raise DataError(
        f"image {name!r} in {path} has size {w}x{h}, expected {image_size}x{image_size}")
  return np.asarray(rgb, dtype=np.uint8)


def _progress(iterable, total: int, desc: str, enabled: bool):
  if not enabled:
    return iterable
  from tqdm.auto import tqdm

  return tqdm(iterable, total=total, desc=desc, unit="img", leave=False)


def _cache_file(path: str, split: str, image_size: int, max_per_class: int | None,
                cache_dir: str) -> str:
  """Cache file name keyed on the source's identity (absolute path, size, mtime) and options."""
  abspath = os.path.abspath(path)
  st = os.stat(abspath)
  fingerprint = f"{st.st_size}:{st.st_mtime_ns}"
  if os.path.isdir(abspath):
    # A directory's own size/mtime do not change when files deep inside change, so
    # fingerprint every image file's name, size and mtime instead (cheap: stat only).
    h = hashlib.sha256()
    for name in sorted(_list_directory(abspath)):
      s = os.stat(os.path.join(abspath, name))
      h.update(f"{name}:{s.st_size}:{s.st_mtime_ns}\n".encode())
    fingerprint = h.hexdigest()
  key = "|".join(str(x) for x in (
      _CACHE_VERSION, abspath, fingerprint, split, image_size, max_per_class))
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  base = os.path.basename(abspath.rstrip(os.sep))
  for suffix in _TAR_SUFFIXES:
    if base.lower().endswith(suffix):
      base = base[: -len(suffix)]
      break
  mpc = "all" if max_per_class is None else str(max_per_class)
  return os.path.join(cache_dir, f"{base}-{split}-{image_size}px-{mpc}-{digest}.npz")


def _load_cache(cache_file: str) -> Split | None:
  try:
    with np.load(cache_file, allow_pickle=False) as z:
      return Split(images=z["images"], labels=z["labels"],
                   class_names=tuple(str(c) for c in z["class_names"]))
  except Exception:  # missing, truncated or stale cache: just decode again
    return None


def _save_cache(cache_file: str, split: Split) -> None:
  os.makedirs(os.path.dirname(cache_file), exist_ok=True)
  # concurrent readers (or a crash mid-write) never see a half-written cache

  def write(tmp):
    with open(tmp, "wb") as f:
      np.savez(f, images=split.images, labels=split.labels, class_names=np.array(split.class_names, dtype=np.str_))

  files.replace_file(cache_file, write)


def _read_split(path: str, split: str, image_size: int, max_per_class: int | None,
                progress: bool) -> Split:
  if os.path.isdir(path):
    groups = _select_split(_list_directory(path), path, split)
    class_names, picked = _pick_files(groups, max_per_class)

    def read(name):
      with open(os.path.join(path, name), "rb") as f:
        return f.read()
    blobs = ((name, read(name)) for name, _ in picked)
  else:
    try:
      # Stream mode ("r|*"): one sequential pass over the compressed archive, keeping only
      # this split's (small, still-compressed) JPEG bytes in memory; nothing is extracted.
      with tarfile.open(path, "r|*") as tf:
        raw = {}
        for member in tf:
          if not member.isfile() or not _is_image_name(member.name):
            continue
          parsed = _parse_member(member.name)
          if parsed is None or parsed[1] != split:
            raw.setdefault(member.name, None)  # seen (for the split listing), not kept
            continue
          f = tf.extractfile(member)
          raw[member.name] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
      raise DataError(f"cannot read archive {path}: {e}") from e
    groups = _select_split(raw.keys(), path, split)
    class_names, picked = _pick_files(groups, max_per_class)
    blobs = ((name, raw[name]) for name, _ in picked)

  images = np.empty((len(picked), image_size, image_size, 3), dtype=np.uint8)
  desc = f"decoding {os.path.basename(path.rstrip(os.sep))}/{split}"
  for i, (name, data) in enumerate(_progress(blobs, len(picked), desc, progress)):
    images[i] = _decode(data, name, path, image_size)
  labels = np.array([label for _, label in picked], dtype=np.int32)
  return Split(images=images, labels=labels, class_names=class_names)


def load_image_folder(path: str, split: str, *, image_size: int = 32,
                      cache_dir: str | None = None, max_per_class: int | None = None,
                      progress: bool = True) -> Split:
  """Load one split of an image-folder data set from a directory or a tar(.gz) archive.

  Layout: ``[<top>/]<split>/<class>/*.jpg|jpeg|png`` (the top folder is optional and
  detected). Labels index the class names sorted alphabetically, except that the CIFAR-10
  class set gets the canonical CIFAR-10 order. Images are decoded once (RGB, uint8) and
  cached as ``.npz`` under ``cache_dir`` (default ``$BPCP_CACHE`` or ``~/.cache/bpcp_jax``).
  ``max_per_class`` keeps the first K files per class in sorted filename order.
  """
  if not path or not os.path.exists(path):
    raise DataError(f"data path not found: {path}; set --data or ${DEFAULT_DATA_ENV}")
  if not os.path.isdir(path) and not _is_archive(path):
    raise DataError(
        f"data path {path} is neither a directory nor a {'/'.join(_TAR_SUFFIXES)} archive")
  if not isinstance(image_size, int) or image_size <= 0:
    raise DataError(f"image_size must be a positive int, got {image_size!r}")
  if max_per_class is not None and (not isinstance(max_per_class, int) or max_per_class <= 0):
    raise DataError(f"max_per_class must be a positive int or None, got {max_per_class!r}")

  cache_file = _cache_file(path, split, image_size, max_per_class,
                           cache_dir or cache_root())
  cached = _load_cache(cache_file)
  if cached is not None:
    return cached
  result = _read_split(path, split, image_size, max_per_class, progress)
  _save_cache(cache_file, result)
  return result


def check_same_classes(a: Split, b: Split, names: tuple[str, str] = ("train", "test")) -> None:
  """Raise DataError if the two splits do not have the same classes in the same order."""
  set_a, set_b = set(a.class_names), set(b.class_names)
  problems = []
  if set_a - set_b:
    problems.append(f"class(es) {sorted(set_a - set_b)} present in {names[0]} "
                    f"but missing from {names[1]}")
  if set_b - set_a:
    problems.append(f"class(es) {sorted(set_b - set_a)} present in {names[1]} "
                    f"but missing from {names[0]}")
  if problems:
    raise DataError("; ".join(problems))
  if tuple(a.class_names) != tuple(b.class_names):
    raise DataError(f"class order differs between {names[0]} {list(a.class_names)} "
                    f"and {names[1]} {list(b.class_names)}")


def tfds_available() -> bool:
  """Whether ``tensorflow_datasets`` can be imported (the ``tfds`` extra)."""
  import importlib.util

  return importlib.util.find_spec("tensorflow_datasets") is not None


def usable_source(source: str) -> tuple[str, str]:
  """``(source, note)``: ``source`` itself when it can be loaded here, else the offline image
  folder (``"folder"``) with a note saying why (a ``tfds:`` source without tensorflow_datasets)."""
  if source in TFDS_SOURCES and not tfds_available():
    return _FOLDER_SOURCE, (f"tensorflow_datasets is not installed, so {source!r} cannot be used: using the offline "
                            f"image folder instead (--data / ${DEFAULT_DATA_ENV}, default {_DEFAULT_ARCHIVE}); "
                            "`pip install tensorflow-datasets` to use TensorFlow Datasets")
  return source, ""


def load_tfds(name: str, split: str, *, data_dir: str | None = None,
              max_per_class: int | None = None) -> Split:
  """Load a split through tensorflow_datasets' random-access source (``tfds.data_source``).

  Reading needs no TensorFlow: the examples come as numpy arrays. The first use downloads and
  prepares the data set (array_record files under ``data_dir``, default ``~/tensorflow_datasets``),
  which needs internet access. ``max_per_class`` keeps the first K examples of each class in
  the data set's order. Needs the optional ``tfds`` extra; errors name the data set and split.
  """
  try:
    import tensorflow_datasets as tfds  # lazy: optional dependency
  except ImportError as e:
    raise ImportError(
        "tensorflow_datasets is not installed; run `pip install bpcp-jax[tfds]` "
        "or use the image-folder loader (--data / $BPCP_DATA)") from e
  if max_per_class is not None and (not isinstance(max_per_class, int) or max_per_class <= 0):
    raise DataError(f"max_per_class must be a positive int or None, got {max_per_class!r}")
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir,
                              builder_kwargs={"file_format": "array_record"})
    class_names = tuple(source.dataset_info.features["label"].names)
    examples = [source[i] for i in range(len(source))]
  except Exception as e:  # download, preparation or reading: say which data set failed
    raise DataError(f"tensorflow_datasets could not load {name!r} split {split!r}: "
                    f"{type(e).__name__}: {e}") from e
  if not examples:
    raise DataError(f"tensorflow_datasets split {split!r} of {name!r} is empty")
  labels = np.asarray([ex["label"] for ex in examples], dtype=np.int32)
  keep = np.arange(len(labels))
  if max_per_class is not None:
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:max_per_class] for c in np.unique(labels)]))
  images = np.stack([np.asarray(examples[i]["image"], dtype=np.uint8) for i in keep])
  return Split(images=images, labels=labels[keep], class_names=class_names)


def load_dataset(source: str, *, data_path: str | None = None, data_dir: str | None = None,
                 cache_dir: str | None = None, max_per_class: int | None = None,
                 progress: bool = True) -> tuple[Split, Split]:
  """Load (train, test) from ``"folder"`` (an image-folder directory/archive, default the
  shared CIFAR-10 archive) or ``"tfds:cifar10"`` / ``"tfds:cifar100"``; ``max_per_class``
  limits both splits."""
  if source == _FOLDER_SOURCE:
    path = data_path or default_data_path()
    train = load_image_folder(path, "train", cache_dir=cache_dir,
                              max_per_class=max_per_class, progress=progress)
    test = load_image_folder(path, "test", cache_dir=cache_dir,
                             max_per_class=max_per_class, progress=progress)
    check_same_classes(train, test)
    return train, test
  if source in _TFDS_SOURCES:
    name = source.split(":", 1)[1]
    return (load_tfds(name, "train", data_dir=data_dir, max_per_class=max_per_class),
            load_tfds(name, "test", data_dir=data_dir, max_per_class=max_per_class))
  raise DataError(
      f"unknown data source {source!r}; valid choices: {[_FOLDER_SOURCE, *_TFDS_SOURCES]}")


# --------------------------------------------------------------------------------------
# On-device preprocessing (jittable)
# --------------------------------------------------------------------------------------


def normalize(images_uint8: jax.Array) -> jax.Array:
  """uint8 [..., 3] -> float32 ``(x / 255 - CIFAR_MEAN) / CIFAR_STD``."""
  x = jnp.asarray(images_uint8).astype(jnp.float32) / 255.0
  # Explicit reshape to x's rank: the project runs with jax_numpy_rank_promotion='raise'.
  shape = (1,) * (x.ndim - 1) + (3,)
  mean = jnp.asarray(CIFAR_MEAN, dtype=jnp.float32).reshape(shape)
  std = jnp.asarray(CIFAR_STD, dtype=jnp.float32).reshape(shape)
  return (x - mean) / std


def augment(key: jax.Array, images_uint8: jax.Array, *, pad: int = 4) -> jax.Array:
  """Standard CIFAR augmentation on device: zero-pad ``pad`` pixels, take a random crop of
  the original size (per-image offsets), random horizontal flip (per image), normalize.

  ``images_uint8``: uint8 [N, H, W, 3]. Returns float32 [N, H, W, 3]. Deterministic in ``key``.
  """
  x = jnp.asarray(images_uint8)
  n, h, w, c = x.shape
  crop_key, flip_key = jax.random.split(key)
  # Pad the raw pixels with 0 (black) before normalizing, as torchvision's RandomCrop does.
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * pad + 1)

  def crop(img, off):
    return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

  # One vmapped dynamic_slice (a single gather) instead of a Python loop over images.
  cropped = jax.vmap(crop)(padded, offsets)
  flip = jax.random.bernoulli(flip_key, 0.5, (n,))
  flipped = jnp.where(flip[:, None, None, None], cropped[:, :, ::-1, :], cropped)
  return normalize(flipped)


# --------------------------------------------------------------------------------------
# Host-side batching
# --------------------------------------------------------------------------------------


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
  """Number of global batches ``epoch_batches`` yields per epoch."""
  if batch_size <= 0:
    raise DataError(f"batch_size must be positive, got {batch_size}")
  if drop_remainder:
    return num_examples // batch_size
  return -(-num_examples // batch_size)


def epoch_batches(num_examples: int, batch_size: int, *, seed: int, epoch: int,
                  shuffle: bool = True, drop_remainder: bool = True, process_index: int = 0,
                  process_count: int = 1) -> Iterator[np.ndarray]:
  """Yield this process's example indices for each global batch of one epoch.

  The permutation comes from ``np.random.default_rng((seed, epoch))``, so every process
  computes the same global batches without communicating; each process then takes its
  contiguous ``1/process_count`` share of each global batch (so a host only reads its own
  examples). With ``drop_remainder=False`` the last partial batch is also yielded (split as
  evenly as possible between processes) so evaluation sees every example once.
  """
  if num_examples < 0:
    raise DataError(f"num_examples must be >= 0, got {num_examples}")
  if batch_size <= 0:
    raise DataError(f"batch_size must be positive, got {batch_size}")
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise DataError(
        f"process_index {process_index} is not in [0, process_count={process_count})")
  if batch_size % process_count:
    raise DataError(
        f"batch_size {batch_size} is not divisible by process_count {process_count}")
  if shuffle:
    order = np.random.default_rng((seed, epoch)).permutation(num_examples)
  else:
    order = np.arange(num_examples)
  per_process = batch_size // process_count
  for b in range(num_batches(num_examples, batch_size, drop_remainder)):
    batch = order[b * batch_size:(b + 1) * batch_size]
    if len(batch) == batch_size:
      yield batch[process_index * per_process:(process_index + 1) * per_process]
    else:
      yield np.array_split(batch, process_count)[process_index]


def shard(batch: Any, num_devices: int) -> Any:
  """Reshape every leaf's leading axis ``[B, ...] -> [num_devices, B // num_devices, ...]``."""
  def reshape(x):
    b = x.shape[0]
    if b % num_devices:
      raise DataError(
          f"batch size {b} is not divisible by the device count {num_devices}")
    return x.reshape((num_devices, b // num_devices) + tuple(x.shape[1:]))

  if num_devices <= 0:
    raise DataError(f"num_devices must be positive, got {num_devices}")
  return jax.tree.map(reshape, batch)


def pad_batch(images: np.ndarray, labels: np.ndarray, batch_size: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pad a (final, partial) batch to ``batch_size`` with zero images/labels of weight 0.

  Evaluation then compiles a single batch shape and, summing ``weights``, counts every
  real example exactly once. Returns (images, labels, weights float32).
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  n = images.shape[0]
  if labels.shape[0] != n:
    raise DataError(f"pad_batch: {n} images but {labels.shape[0]} labels")
  if n > batch_size:
    raise DataError(f"pad_batch: batch of {n} is larger than batch_size {batch_size}")
  weights = np.zeros((batch_size,), dtype=np.float32)
  weights[:n] = 1.0
  if n == batch_size:
    return images, labels, weights
  pad_images = np.zeros((batch_size - n,) + images.shape[1:], dtype=images.dtype)
  pad_labels = np.zeros((batch_size - n,) + labels.shape[1:], dtype=labels.dtype)
  return (np.concatenate([images, pad_images]), np.concatenate([labels, pad_labels]),
          weights)


class _Raised:
  """Carries an exception from the producer thread to the consumer."""

  def __init__(self, exc: BaseException):
    self.exc = exc


_DONE = object()


class Prefetcher:
  """Iterator returned by :func:`prefetch`; ``close()`` (or ``with``) stops the thread."""

  def __init__(self, iterator: Iterable, size: int, device_put: Callable | None):
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._finished = False
    # The thread gets only the queue and event, never `self`, so dropping the Prefetcher
    # lets __del__ run and stop the thread.
    self._thread = threading.Thread(
        target=_produce, args=(iter(iterator), device_put, self._queue, self._stop),
        name="bpcp_jax-prefetch", daemon=True)
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    if self._finished:
      raise StopIteration
    item = self._queue.get()
    if item is _DONE:
      self.close()
      raise StopIteration
    if isinstance(item, _Raised):
      self.close()
      raise item.exc
    return item

  def close(self) -> None:
    self._finished = True
    self._stop.set()
    # Unblock a producer waiting on a full queue, then wait for it to notice the stop.
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    if self._thread is not threading.current_thread():
      self._thread.join(timeout=10.0)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:
      pass


def _produce(it: Iterator, device_put: Callable | None, q: queue.Queue,
             stop: threading.Event) -> None:
  def put(item) -> bool:
    # Poll with a timeout so a stopped consumer never leaves this thread blocked forever.
    while not stop.is_set():
      try:
        q.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  try:
    for item in it:
      if stop.is_set():
        break
      if device_put is not None:
        item = device_put(item)
      if not put(item):
        break
    else:
      put(_DONE)
  except BaseException as e:  # all of them: an uncaught thread exception would be lost
    put(_Raised(e))
  finally:
    close = getattr(it, "close", None)
    if close is not None and stop.is_set():
      try:
        close()  # e.g. run a source generator's cleanup when stopped early
      except Exception:
        pass


def prefetch(iterator: Iterable, size: int = 2, device_put: Callable | None = None) -> Prefetcher:
  """Prefetch up to ``size`` items of ``iterator`` in a background thread.

  ``device_put`` (e.g. ``jax.device_put`` or a sharding function) is applied in the thread
  so host-to-device copies overlap with compute. Exceptions from the producer are re-raised
  in the consumer; closing the returned iterator (or dropping it / leaving a ``with``
  block) stops the thread.
  """
  if size < 1:
    raise DataError(f"prefetch size must be >= 1, got {size}")
  return Prefetcher(iterator, size, device_put)
