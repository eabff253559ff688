"""Images in: datasets (IDX files, scikit-learn digits, TFDS), the device feed (epoch orders,
padding, sharded transfer) and the device mesh.

``stepnet_jax.data`` itself is the dataset API (``data.datasets``): ``load_dataset``,
``Dataset``, ``subset``, ``split_validation``, ...
"""

from stepnet_jax.data.datasets import (
  FASHION_MNIST,
  FASHION_MNIST_DIR,
  IDX_FILES,
  Dataset,
  DatasetError,
  load_dataset,
  load_digits,
  load_for,
  load_idx,
  load_tfds,
  pad_dataset,
  pad_images,
  read_idx,
  split_validation,
  subset,
)

__all__ = [
  'FASHION_MNIST',
  'FASHION_MNIST_DIR',
  'IDX_FILES',
  'Dataset',
  'DatasetError',
  'load_dataset',
  'load_digits',
  'load_for',
  'load_idx',
  'load_tfds',
  'pad_dataset',
  'pad_images',
  'read_idx',
  'split_validation',
  'subset',
]
