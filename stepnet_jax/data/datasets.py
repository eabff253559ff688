"""Datasets as in-memory uint8 arrays: IDX files, scikit-learn digits, or TFDS.

Dataset specs (``data.name`` in a config):
* ``idx:/path/to/dir`` — MNIST-format IDX files (``train-images-idx3-ubyte`` etc.,
  plain or ``.gz``). ``FASHION_MNIST`` is Debian's ``dataset-fashion-mnist`` package.
* ``digits`` — scikit-learn's 8x8 digits (1,797 images), a fixed 80/20 split.
* any other name (``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist``,
  ``svhn_cropped``, ...) — a TFDS dataset through ``tfds.data_source``. Preparing it
  the first time downloads it and needs TensorFlow (``pip install .[tfds]``).

``data.pad_to`` (``pad_dataset``) zero-pads every image to a square: Fashion-MNIST at 32x32
runs the CIFAR-sized networks offline. ``load_for`` is a config's ``data`` section loaded and
padded: what every training run reads.

A missing or malformed dataset raises ``DatasetError`` saying which file and how to
get it; nothing ever falls back to synthetic data.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import re
import struct
import zlib

import numpy as np

from stepnet_jax import seeds
from stepnet_jax.config import FASHION_MNIST, FASHION_MNIST_DIR, DataConfig, SettingsError  # noqa: F401  (re-exported)

IDX_FILES = {
  'train_images': 'train-images-idx3-ubyte',
  'train_labels': 'train-labels-idx1-ubyte',
  'test_images': 't10k-images-idx3-ubyte',
  'test_labels': 't10k-labels-idx1-ubyte',
}
_IDX_UBYTE = 0x08


class DatasetError(RuntimeError):
  """A dataset could not be found or read."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train and test splits as uint8 images [N, H, W, C] and int32 labels [N]."""

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """[H, W, C] of one image."""
    return tuple(self.train_images.shape[1:])

  def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the training images on the [0, 1] scale."""
    x = self.train_images.reshape(-1, self.train_images.shape[-1]).astype(np.float64) / 255.0
    return tuple(x.mean(0).tolist()), tuple(np.maximum(x.std(0), 1e-6).tolist())


def _open(path: str):
  return gzip.open(path, 'rb') if path.endswith('.gz') else open(path, 'rb')


def _kind(e: BaseException) -> str:
  """An exception's type for a message: ``EOFError``, ``zlib.error``, ``gzip.BadGzipFile``."""
  module = type(e).__module__
  return type(e).__qualname__ if module == 'builtins' else f'{module}.{type(e).__qualname__}'


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file of unsigned bytes (the MNIST format), plain or gzipped.

  Anything unreadable (missing, truncated, corrupt gzip, a header that does not match
  the data) raises ``DatasetError`` naming ``path``.
  """
  try:
    with _open(path) as f:
      header = f.read(4)
      if len(header) != 4 or header[0] != 0 or header[1] != 0:
        raise DatasetError(f'{path}: not an IDX file (bad magic number {header.hex() or "<empty>"})')
      if header[2] != _IDX_UBYTE:
        raise DatasetError(f'{path}: IDX element type 0x{header[2]:02x} is not unsigned byte (0x08)')
      ndim = header[3]
      if ndim == 0:
        raise DatasetError(f'{path}: IDX header declares 0 dimensions')
      dim_bytes = f.read(4 * ndim)
      if len(dim_bytes) != 4 * ndim:
        raise DatasetError(
          f'{path}: IDX header truncated: {ndim} dimensions need {4 * ndim} bytes of sizes, file holds {len(dim_bytes)}'
        )
      dims = struct.unpack(f'>{ndim}I', dim_bytes)
      expected = math.prod(dims)  # Python ints: no overflow for absurd headers
      most = _readable_bytes(path, 4 + 4 * ndim + expected)
      # Never more than the header claims (a gzip bomb stops here) nor than the file can hold.
      data = f.read(min(expected + 1, most))
  except FileNotFoundError as e:
    raise DatasetError(f'{path}: no such IDX file') from e
  except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # what gzip raises for a bad stream
    raise DatasetError(f'{path}: corrupt or truncated gzip data ({_kind(e)}: {e})') from e
  except OSError as e:
    raise DatasetError(f'{path}: cannot read IDX file ({_kind(e)}: {e})') from e
  if len(data) != expected:
    held = f'more than {expected}' if len(data) > expected else str(len(data))
    raise DatasetError(f'{path}: header promises {dims} = {expected} bytes, file holds {held}')
  return np.frombuffer(data, np.uint8).reshape(dims)


# Deflate cannot compress better than about 1032:1, so a gzip file claiming more than this
# many bytes per compressed byte lies about its size: refused before anything is decompressed.
_MAX_GZIP_RATIO = 1100


def _readable_bytes(path: str, claimed: int) -> int:
  """The most bytes ``path`` can yield: its size, or for gzip deflate's ratio times it.
  DatasetError if a gzip file claims (header included, decompressed) more than that: a
  corrupt header or a decompression bomb, refused before anything is decompressed."""
  size = os.path.getsize(path)
  if not path.endswith('.gz'):
    return size
  if claimed > _MAX_GZIP_RATIO * size:
    raise DatasetError(
      f'{path}: header promises {claimed} bytes from {size} compressed bytes, more than deflate can hold: '
      'a corrupt header or a decompression bomb'
    )
  return _MAX_GZIP_RATIO * size


def _find_idx(directory: str, stem: str) -> str:
  for candidate in (stem, stem + '.gz', stem.replace('-idx', '.idx'), stem.replace('-idx', '.idx') + '.gz'):
    path = os.path.join(directory, candidate)
    if os.path.exists(path):
      return path
  hint = (
    ' Install it with: apt-get update && apt-get install -y dataset-fashion-mnist'
    if os.path.abspath(directory) == FASHION_MNIST_DIR
    else ''
  )
  raise DatasetError(f'missing IDX file {os.path.join(directory, stem)}[.gz].{hint}')


def load_idx(directory: str) -> Dataset:
  """MNIST-format dataset from a directory of the four IDX files.

  Images must be [N, H, W] with N, H, W > 0 and the same H, W in both splits; labels
  [N] with one per image. ``num_classes`` is max(training label) + 1 (classes without
  training images are allowed); a test label outside 0..num_classes-1 is an error, not
  a silently larger ``num_classes``.
  """
  paths = {key: _find_idx(directory, stem) for key, stem in IDX_FILES.items()}
  arrays = {key: read_idx(path) for key, path in paths.items()}
  for split in ('train', 'test'):
    images, labels = arrays[f'{split}_images'], arrays[f'{split}_labels']
    img_path, lab_path = paths[f'{split}_images'], paths[f'{split}_labels']
    if images.ndim != 3:
      raise DatasetError(f'{img_path}: expected a 3-D [N, H, W] image array, got shape {images.shape}')
    if 0 in images.shape:
      raise DatasetError(f'{img_path}: no images (shape {images.shape}); every dimension must be > 0')
    if labels.ndim != 1:
      raise DatasetError(f'{lab_path}: expected a 1-D [N] label array, got shape {labels.shape}')
    if len(labels) != len(images):
      raise DatasetError(f'{lab_path}: {len(labels)} labels for {len(images)} images in {img_path}')
  if arrays['test_images'].shape[1:] != arrays['train_images'].shape[1:]:
    raise DatasetError(
      f'{paths["test_images"]}: images are {arrays["test_images"].shape[1:]} but the training '
      f'images in {paths["train_images"]} are {arrays["train_images"].shape[1:]}'
    )
  num_classes = int(arrays['train_labels'].max()) + 1
  bad = arrays['test_labels'] >= num_classes
  if bad.any():
    raise DatasetError(
      f'{paths["test_labels"]}: {int(bad.sum())} test labels (e.g. {int(arrays["test_labels"][bad][0])} at index '
      f'{int(np.argmax(bad))}) are outside the classes 0..{num_classes - 1} of the training labels in '
      f'{paths["train_labels"]}'
    )
  return Dataset(
    name=f'idx:{directory}',
    train_images=arrays['train_images'][..., None],
    train_labels=arrays['train_labels'].astype(np.int32),
    test_images=arrays['test_images'][..., None],
    test_labels=arrays['test_labels'].astype(np.int32),
    num_classes=num_classes,
  )


def load_digits() -> Dataset:
  """scikit-learn's 8x8 digits, rescaled to uint8, split 80/20 with a fixed permutation."""
  from sklearn.datasets import load_digits as sk_digits

  d = sk_digits()
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = d.target.astype(np.int32)
  order = np.random.RandomState(0).permutation(len(labels))
  cut = int(0.8 * len(labels))
  tr, te = order[:cut], order[cut:]
  return Dataset('digits', images[tr], labels[tr], images[te], labels[te], 10)


# Python modules whose absence stops TFDS from preparing a dataset -> how to install them.
_TFDS_INSTALL = {
  'tensorflow': 'pip install ".[tfds]" (TensorFlow, needed to download and convert a TFDS dataset the first time)',
  'tensorflow_datasets': 'pip install -e . (tensorflow-datasets is a core dependency)',
  'PIL': 'pip install pillow',
}
_OFFLINE = f'--config.data.name={FASHION_MNIST} (or idx:/path/to/mnist-format/dir)'


def _import_error(e: BaseException | None) -> ImportError | None:
  """The ImportError behind ``e`` (``e`` itself or its ``raise ... from`` causes), or None.

  Only explicit causes count: an error raised while handling an ImportError (a fallback
  for an optional import) is not an import failure.
  """
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, ImportError):
      return e
    seen.add(id(e))
    e = e.__cause__
  return None


def _import_failure(name: str, split: str, e: ImportError) -> DatasetError:
  """DatasetError for a TFDS preparation that failed on an import: which package, how to install it."""
  prefix = f'TFDS dataset {name!r} ({split}) cannot be prepared'
  if not isinstance(e, ModuleNotFoundError):
    return DatasetError(
      f'{prefix}: a Python import failed ({e}). The installed packages look inconsistent; '
      f'reinstall them with pip install -e ".[tfds]". Offline, use {_OFFLINE}.'
    )
  # TFDS re-raises with a prefixed message (etils.epy.reraise), which loses ``e.name``.
  match = re.search(r"No module named '([^']+)'", str(e))
  module = getattr(e, 'name', None) or (match.group(1) if match else None)
  if module is None:
    return DatasetError(
      f'{prefix}: a Python package is not installed ({e}). Install the optional TFDS '
      f'dependencies with pip install ".[tfds]". Offline, use {_OFFLINE}.'
    )
  top = module.split('.')[0]
  how = _TFDS_INSTALL.get(top, f'pip install {top.replace("_", "-")} (the package providing {module!r})')
  return DatasetError(
    f'{prefix}: the Python package {top!r} is not installed ({e}). Install it with: {how}. Offline, use {_OFFLINE}.'
  )


def _tfds_split(name: str, split: str, data_dir: str | None):
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise _import_failure(name, split, e) from e
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as e:  # noqa: BLE001 - TFDS raises many kinds; all mean "not available"
    if (imp := _import_error(e)) is not None:
      raise _import_failure(name, split, imp) from e
    raise DatasetError(
      f'TFDS dataset {name!r} ({split}) is not available: {e}. Preparing a TFDS dataset needs '
      f'internet access the first time and TensorFlow (pip install ".[tfds]"); offline, use {_OFFLINE}.'
    ) from e
  records = [source[i] for i in range(len(source))]
  images = np.stack([r['image'] for r in records]).astype(np.uint8)
  labels = np.asarray([r['label'] for r in records], np.int32)
  return images, labels, source.dataset_info.features['label'].num_classes


def load_tfds(name: str, data_dir: str | None = None) -> Dataset:
  """A TFDS image-classification dataset with 'image' and 'label' features."""
  xtr, ytr, num_classes = _tfds_split(name, 'train', data_dir)
  xte, yte, _ = _tfds_split(name, 'test', data_dir)
  return Dataset(name, xtr, ytr, xte, yte, int(num_classes))


def load_dataset(spec: str, data_dir: str | None = None) -> Dataset:
  """Loads a dataset from a spec string (see the module docstring)."""
  if spec.startswith('idx:'):
    directory = spec[len('idx:') :]
    if not os.path.isdir(directory):
      hint = (
        ' Install it with: apt-get update && apt-get install -y dataset-fashion-mnist'
        if os.path.abspath(directory) == FASHION_MNIST_DIR
        else ''
      )
      raise DatasetError(f'IDX dataset directory {directory} does not exist.{hint}')
    return load_idx(directory)
  if spec == 'digits':
    return load_digits()
  return load_tfds(spec, data_dir)


def pad_images(images: np.ndarray, size: int) -> np.ndarray:
  """``images`` [N, H, W, ...] zero-padded (0: black) to [N, size, size, ...], their dtype kept.

  Each image is centred: of an odd difference, the extra row goes below and the extra column
  to the right (``(size - H) // 2`` rows above, the rest below; the same for columns). Images
  already ``size`` x ``size`` come back unchanged; images taller or wider than ``size`` are a
  ``SettingsError`` naming both sizes.
  """
  if size < 1:
    raise SettingsError(f'cannot pad images to {size}x{size}: the size must be >= 1')
  if images.ndim < 3:
    raise ValueError(f'expected images [N, H, W, ...], got shape {images.shape}')
  h, w = images.shape[1:3]
  if h > size or w > size:
    raise SettingsError(
      f'cannot pad {h}x{w} images to {size}x{size}: they are larger; data.pad_to must be 0 (off) or >= {max(h, w)}'
    )
  if (h, w) == (size, size):
    return images
  top, left = (size - h) // 2, (size - w) // 2
  widths = [(0, 0), (top, size - h - top), (left, size - w - left)] + [(0, 0)] * (images.ndim - 3)
  return np.pad(images, widths, mode='constant', constant_values=0)


def pad_dataset(ds: Dataset, size: int) -> Dataset:
  """``ds`` with the images of both splits zero-padded to ``size`` x ``size`` (``pad_images``);
  ``size=0`` keeps it as it is. ``input_shape`` and ``channel_stats`` follow from the padded
  images."""
  if not size:
    return ds
  try:
    train, test = pad_images(ds.train_images, size), pad_images(ds.test_images, size)
  except SettingsError as e:
    raise SettingsError(f'{ds.name}: {e}') from None
  return dataclasses.replace(ds, train_images=train, test_images=test)


def load_for(data: DataConfig) -> Dataset:
  """The dataset a config's ``data`` section names (``data.name``, ``data.data_dir``), padded
  to ``data.pad_to``: what every training run reads (``training.run.prepare_splits``). The
  subsets and the validation split are taken from it afterwards."""
  return pad_dataset(load_dataset(data.name, data.data_dir or None), data.pad_to)


def subset(ds: Dataset, train: int = 0, test: int = 0, seed: int = 0) -> Dataset:
  """A class-mixed random subset of each split (0 keeps a split whole)."""
  rng = np.random.RandomState(seed)

  def pick(x, y, n):
    if not n or n >= len(y):
      return x, y
    idx = np.sort(rng.permutation(len(y))[:n])
    return x[idx], y[idx]

  xtr, ytr = pick(ds.train_images, ds.train_labels, train)
  xte, yte = pick(ds.test_images, ds.test_labels, test)
  return dataclasses.replace(ds, train_images=xtr, train_labels=ytr, test_images=xte, test_labels=yte)


def split_validation(ds: Dataset, count: int, seed: int = 0) -> tuple[Dataset, np.ndarray]:
  """(the dataset without ``count`` training images, their indices in its training split).

  The held-out images are a seeded random choice of the training split; the returned
  dataset's test split is unchanged. ``count=0`` holds out nothing.
  """
  if count < 0 or count >= len(ds.train_labels):
    raise ValueError(f'cannot hold out {count} of {len(ds.train_labels)} training images for validation')
  held = np.sort(
    np.random.RandomState(seeds.seed_for(seed, seeds.Stream.VALIDATION_SPLIT)).permutation(len(ds.train_labels))[:count]
  )
  keep = np.setdiff1d(np.arange(len(ds.train_labels)), held)
  return dataclasses.replace(ds, train_images=ds.train_images[keep], train_labels=ds.train_labels[keep]), held
