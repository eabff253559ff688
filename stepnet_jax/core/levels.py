"""Static level metadata: which neurons of a layer belong to which level.

A layer's neurons are stored sorted by level, so its level structure is a tuple of
per-level counts ``sizes = (n_0, ..., n_{K-1})``; level k occupies the contiguous
channel slice ``[start(k), end(k))``. Everything here is plain numpy / Python data,
hashable and known at trace time: it is never traced.

The mask rule: a connection from input channel i to output channel o exists only if
``level(i) <= level(o)``. The optional "triangular" (Any-Width-Networks style) rule
additionally restricts connections *inside* a level block: output channel o reads
input channel i of the same level only if ``i * b < (o + 1) * a`` (a, b = the input
and output block sizes), which for equal sizes is the lower triangle ``i <= o``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

LevelSizes = tuple[int, ...]


def bounds(sizes: LevelSizes) -> tuple[int, ...]:
  """Cumulative boundaries ``(0, n_0, n_0 + n_1, ...)`` of a layer's level blocks."""
  return tuple(int(b) for b in np.concatenate([[0], np.cumsum(sizes)]))


def start(sizes: LevelSizes, level: int) -> int:
  """First channel index of ``level``."""
  return bounds(sizes)[level]


def end(sizes: LevelSizes, level: int) -> int:
  """Number of channels in subnet ``level`` (channels of level <= ``level``)."""
  return bounds(sizes)[level + 1]


def level0_sizes(count: int, num_levels: int) -> LevelSizes:
  """Level sizes of ``count`` neurons all at level 0: the image channels, and every layer
  of a network before construction moves neurons up."""
  return (count,) + (0,) * (num_levels - 1)


def round_half_up(x: float) -> int:
  """Rounds halves up (``round`` would round them to even)."""
  return int(np.floor(x + 0.5))


def sizes_from_widths(channels: int, widths: Sequence[float]) -> LevelSizes:
  """Contiguous blocks from cumulative width fractions, e.g. (0.25, 0.5, 0.75, 1.0).

  Subnet k keeps ``round(widths[k] * channels)`` channels (rounding half up, as
  Any-Width Networks does: 45 channels give 11/23/34/45).
  """
  widths = tuple(float(w) for w in widths)
  if any(b <= a for a, b in zip(widths, widths[1:])) or widths[0] <= 0 or abs(widths[-1] - 1.0) > 1e-9:
    raise ValueError(f'widths must increase strictly and end at 1.0, got {widths}')
  cum = [round_half_up(w * channels) for w in widths]
  cum[-1] = channels
  sizes = tuple(int(b - a) for a, b in zip([0] + cum[:-1], cum))
  if min(sizes) < 0:
    raise ValueError(f'{channels} channels cannot be split at widths {widths}')
  return sizes


def even_widths(num_levels: int) -> tuple[float, ...]:
  """Evenly spaced cumulative widths (k+1)/K: the default level split."""
  return tuple((k + 1) / num_levels for k in range(num_levels))


def sizes_from_levels(levels: np.ndarray, num_levels: int) -> tuple[LevelSizes, np.ndarray]:
  """Turn any per-neuron level array into (sizes, order).

  ``order`` is the stable permutation that sorts neurons by level; construction
  code applies it to a trained layer's output axis (and the next layer's input
  axis) so that every level becomes a contiguous slice.
  """
  levels = np.asarray(levels)
  if levels.ndim != 1 or not np.issubdtype(levels.dtype, np.integer):
    raise ValueError('levels must be a 1-D integer array')
  if levels.size and (levels.min() < 0 or levels.max() >= num_levels):
    raise ValueError(f'levels must lie in [0, {num_levels}), got range [{levels.min()}, {levels.max()}]')
  sizes = tuple(int(c) for c in np.bincount(levels, minlength=num_levels))
  return sizes, np.argsort(levels, kind='stable')


def levels_of(sizes: LevelSizes) -> np.ndarray:
  """Per-channel level array of a sorted layer (inverse of ``sizes_from_levels``)."""
  return np.repeat(np.arange(len(sizes)), sizes)


@functools.cache
def connection_mask(
  in_sizes: LevelSizes, out_sizes: LevelSizes, triangular: bool = False, mask_rule: bool = True
) -> np.ndarray:
  """Boolean [C_in, C_out] matrix of kept connections (block lower triangular by level).

  ``mask_rule=False`` keeps every connection (slimmable-style prefix subnets, where
  subnet k uses all connections among its channels and nothing is reusable).
  """
  if len(in_sizes) != len(out_sizes):
    raise ValueError(f'level counts differ: {in_sizes} vs {out_sizes}')
  lin, lout = levels_of(in_sizes), levels_of(out_sizes)
  if not mask_rule:
    mask = np.ones((len(lin), len(lout)), bool)
    mask.setflags(write=False)
    return mask
  mask = lin[:, None] <= lout[None, :]
  if triangular:
    for lvl, (a, b) in enumerate(zip(in_sizes, out_sizes)):
      if a == 0 or b == 0:
        continue
      i0, o0 = start(in_sizes, lvl), start(out_sizes, lvl)
      i = np.arange(a)[:, None]
      o = np.arange(b)[None, :]
      mask[i0 : i0 + a, o0 : o0 + b] = i * b < (o + 1) * a
  mask.setflags(write=False)
  return mask


@dataclasses.dataclass(frozen=True)
class Connectivity:
  """Static description of one linear layer's level structure (hashable).

  ``mask_rule=False`` describes a non-reusable (slimmable-style) layer: subnet k is the
  dense prefix of its first end(k) input and output channels.
  """

  in_sizes: LevelSizes
  out_sizes: LevelSizes
  triangular: bool = False
  mask_rule: bool = True

  def __post_init__(self):
    if len(self.in_sizes) != len(self.out_sizes):
      raise ValueError(f'level counts differ: {self.in_sizes} vs {self.out_sizes}')
    if self.triangular and not self.mask_rule:
      raise ValueError('triangular masks need the mask rule')

  @property
  def num_levels(self) -> int:
    """K, the number of levels of the output."""
    return len(self.out_sizes)

  @property
  def mask(self) -> np.ndarray:
    """The static [C_in, C_out] mask of kept connections."""
    return connection_mask(self.in_sizes, self.out_sizes, self.triangular, self.mask_rule)

  def prefix_mask(self, level: int) -> np.ndarray | None:
    """Mask of subnet ``level``'s kernel slice, or None when it keeps everything."""
    m = self.mask[: end(self.in_sizes, level), : end(self.out_sizes, level)]
    return None if m.all() else m

  def block_mask(self, level: int) -> np.ndarray | None:
    """Mask of the kernel slice that computes the level-``level`` outputs."""
    m = self.mask[: end(self.in_sizes, level), start(self.out_sizes, level) : end(self.out_sizes, level)]
    return None if m.all() else m

  def kept_connections(self) -> np.ndarray:
    """Per level k: kept (input, output) channel pairs of subnet k minus those of subnet k-1.

    With the mask rule these are exactly the connections into level-k outputs (the
    work of step k); without it, the growth of the dense prefix.
    """
    subnet = np.array(
      [self.mask[: end(self.in_sizes, k), : end(self.out_sizes, k)].sum() for k in range(self.num_levels)],
      dtype=np.int64,
    )
    return np.diff(subnet, prepend=0)


def check_level_count(sizes: LevelSizes, num_levels: int, name: str) -> None:
  """Raises a ValueError naming layer ``name`` unless ``sizes`` has ``num_levels`` non-negative entries."""
  if len(sizes) != num_levels:
    raise ValueError(f'{name}: {len(sizes)} level sizes {sizes} for {num_levels} levels')
  if any(s < 0 for s in sizes):
    raise ValueError(f'{name}: negative level size in {sizes}')
