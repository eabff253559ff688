"""The feed: host arrays -> device batches, the one place data crosses to the device.

Training, evaluation, importance scoring and BN recalibration all get their batches
from ``device_batches``: it gathers the examples of each index batch, pads a short
batch when asked (the padding is zeros and ``Batch.count`` says how many examples are
real) and transfers the batch to the devices, sharded along the batch axis
(``sharding.to_device``: the one place data-parallel placement happens).

Which examples form a batch is decided by the index generators below:
``training_indices`` (a fresh seeded permutation every epoch, batches addressed by
global step, so a run split into pieces sees the same data) and ``sequential_indices``
(a split in order, for evaluation).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

import jax
import numpy as np
from flax import struct

from stepnet_jax.data import sharding


@struct.dataclass
class Batch:
  """Images as stored (uint8 [B, H, W, C]) and int32 labels [B] on the device.

  The first ``count`` examples are real, the rest padding (static: a padded batch
  compiles once more, every full batch shares one compilation).
  """

  images: jax.Array
  labels: jax.Array
  count: int = struct.field(pytree_node=False, default=0)


def device_batches(
  images: np.ndarray, labels: np.ndarray, index_batches: Iterable[np.ndarray], *, pad_to: int | None = None
) -> Iterator[Batch]:
  """One device ``Batch`` per index array; batches shorter than ``pad_to`` are zero-padded to it.

  With several devices the batch is sharded along its leading axis (``sharding``), and
  each host gathers only its own rows of it.
  """
  for idx in index_batches:
    n = len(idx)
    size = max(n, pad_to or 0)
    rows = sharding.local_rows(size)
    mine = idx[rows]  # this host's rows (past n: padding)
    x, y = images[mine], labels[mine]
    short = (rows.stop - rows.start) - len(mine)
    if short:
      x = np.concatenate([x, np.zeros((short,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros((short,), y.dtype)])
    yield Batch(sharding.to_device(x, size), sharding.to_device(y, size), n)


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, num_examples: int) -> np.ndarray:
  """The order of the examples in the epoch whose seed is ``seed`` (training seed + epoch)."""
  return np.random.RandomState(seed).permutation(num_examples)


def step_indices(step: int, steps_per_epoch: int, num_examples: int, batch_size: int, seed: int) -> np.ndarray:
  """Training examples of global step ``step``: a slice of its epoch's permutation (sorted).

  Epoch e (``step // steps_per_epoch``) is ordered by ``epoch_order(seed + e)``; the
  examples past the last full batch of an epoch are not used in that epoch.
  """
  epoch, i = divmod(step, steps_per_epoch)
  return np.sort(epoch_order(seed + epoch, num_examples)[i * batch_size : (i + 1) * batch_size])


def training_indices(
  first: int, last: int, steps_per_epoch: int, num_examples: int, batch_size: int, seed: int
) -> Iterator[np.ndarray]:
  """The index batches of global steps ``[first, last)``."""
  for step in range(first, last):
    yield step_indices(step, steps_per_epoch, num_examples, batch_size, seed)


def training_batches(
  images: np.ndarray,
  labels: np.ndarray,
  batch_size: int,
  seed: int,
  first: int,
  last: int,
  steps_per_epoch: int | None = None,
) -> Iterator[Batch]:
  """The device batches of global steps ``[first, last)`` (``training_indices``; epochs of
  ``steps_per_epoch`` steps, by default as many full batches as the examples give, at least
  one). The batch must split over the devices: checked now, not at the first batch."""
  sharding.check_batch_size(batch_size)
  if steps_per_epoch is None:
    steps_per_epoch = max(1, len(labels) // batch_size)
  indices = training_indices(first, last, steps_per_epoch, len(labels), batch_size, seed)
  return device_batches(images, labels, indices)


def sequential_indices(num_examples: int, batch_size: int) -> Iterator[np.ndarray]:
  """A split in order, ``batch_size`` at a time (the last batch may be shorter)."""
  for i in range(0, num_examples, batch_size):
    yield np.arange(i, min(i + batch_size, num_examples))


def evaluation_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> Iterator[Batch]:
  """A split in order; the last batch is padded to the first's size, so all compile once
  (sizes rounded up to a multiple of the device count, the padding not counted)."""
  batch_size = sharding.padded_size(batch_size)
  return device_batches(
    images,
    labels,
    sequential_indices(len(labels), batch_size),
    pad_to=sharding.padded_size(min(batch_size, len(labels))),
  )
