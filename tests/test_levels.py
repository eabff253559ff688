"""Static level metadata (levels.py) against brute-force reference computations."""

import chex
import numpy as np
import pytest
from testlib import brute_mask, level_array

from stepnet_jax.core import levels as lv

SIZE_CASES = [
  ((3,), (4,)),
  ((1, 0, 0), (4, 3, 5)),  # image input: all level 0
  ((2, 3, 1), (4, 3, 5)),
  ((4, 3, 5), (2, 3, 1)),
  ((0, 3, 2, 2), (2, 0, 1, 3)),  # empty level blocks
  ((5, 5, 5, 5), (5, 5, 5, 5)),
]


@pytest.mark.parametrize('in_sizes,out_sizes', SIZE_CASES)
@pytest.mark.parametrize('triangular', [False, True])
def test_connection_mask_matches_brute_force(in_sizes, out_sizes, triangular):
  got = lv.connection_mask(in_sizes, out_sizes, triangular)
  chex.assert_shape(got, (sum(in_sizes), sum(out_sizes)))
  assert got.dtype == bool
  np.testing.assert_array_equal(got, brute_mask(in_sizes, out_sizes, triangular))
  conn = lv.Connectivity(in_sizes, out_sizes, triangular)
  np.testing.assert_array_equal(conn.mask, got)


def test_mask_rule_from_random_per_channel_levels():
  """Any per-neuron level array: after sorting, the mask is exactly level(i) <= level(o)."""
  rng = np.random.RandomState(0)
  k = 4
  lin = rng.randint(0, k, size=13)
  lout = rng.randint(0, k, size=11)
  in_sizes, in_order = lv.sizes_from_levels(lin, k)
  out_sizes, out_order = lv.sizes_from_levels(lout, k)
  mask = lv.connection_mask(in_sizes, out_sizes)
  for a, i in enumerate(in_order):
    for b, o in enumerate(out_order):
      assert mask[a, b] == (lin[i] <= lout[o])


@pytest.mark.parametrize('n', [1, 4, 7])
@pytest.mark.parametrize('num_levels', [1, 2, 4])
def test_triangular_equal_sizes_is_global_lower_triangle(n, num_levels):
  """AWN: with equal block sizes the mask is the global lower triangle i <= o."""
  sizes = (n,) * num_levels
  mask = lv.connection_mask(sizes, sizes, True)
  c = n * num_levels
  expected = np.array([[i <= o for o in range(c)] for i in range(c)])
  np.testing.assert_array_equal(mask, expected)


def test_triangular_keeps_at_least_one_input_per_output():
  """Unequal blocks: i*b < (o+1)*a keeps output 0 of each block reading input 0 of it."""
  mask = lv.connection_mask((2, 7, 3), (5, 2, 4), True)
  lin, lout = level_array((2, 7, 3)), level_array((5, 2, 4))
  for o in range(mask.shape[1]):
    same = mask[lin == lout[o], o]
    assert same.any()


def test_kept_connections_counts_by_output_level():
  in_sizes, out_sizes = (2, 3, 1), (4, 0, 5)
  for tri in (False, True):
    m = brute_mask(in_sizes, out_sizes, tri)
    lout = level_array(out_sizes)
    expected = [int(m[:, lout == k].sum()) for k in range(3)]
    got = lv.Connectivity(in_sizes, out_sizes, tri).kept_connections()
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)


def test_prefix_and_block_masks():
  in_sizes, out_sizes = (2, 3, 1), (4, 2, 5)
  conn = lv.Connectivity(in_sizes, out_sizes, True)
  full = brute_mask(in_sizes, out_sizes, True)
  for k in range(3):
    ie, os_, oe = sum(in_sizes[: k + 1]), sum(out_sizes[:k]), sum(out_sizes[: k + 1])
    pm = conn.prefix_mask(k)
    bm = conn.block_mask(k)
    np.testing.assert_array_equal(full[:ie, :oe] if pm is None else pm, full[:ie, :oe])
    np.testing.assert_array_equal(full[:ie, os_:oe] if bm is None else bm, full[:ie, os_:oe])
  # Without triangles every block mask keeps everything (all lower inputs feed level k).
  plain = lv.Connectivity(in_sizes, out_sizes)
  assert all(plain.block_mask(k) is None for k in range(3))
  assert plain.prefix_mask(0) is None
  assert plain.prefix_mask(2) is not None


def test_bounds_start_end():
  sizes = (3, 0, 4, 2)
  assert lv.bounds(sizes) == (0, 3, 3, 7, 9)
  assert [lv.start(sizes, k) for k in range(4)] == [0, 3, 3, 7]
  assert [lv.end(sizes, k) for k in range(4)] == [3, 3, 7, 9]
  assert lv.level0_sizes(3, 4) == (3, 0, 0, 0)


def test_sizes_from_widths_awn_45():
  sizes = lv.sizes_from_widths(45, (0.25, 0.5, 0.75, 1.0))
  assert tuple(np.cumsum(sizes)) == (11, 23, 34, 45)
  assert sizes == (11, 12, 11, 11)


@pytest.mark.parametrize('channels', [1, 5, 8, 32, 64, 100])
@pytest.mark.parametrize('widths', [(1.0,), (0.5, 1.0), (1 / 3, 2 / 3, 1.0), (0.25, 0.5, 0.75, 1.0), (0.1, 0.6, 1.0)])
def test_sizes_from_widths_round_half_up(channels, widths):
  sizes = lv.sizes_from_widths(channels, widths)
  assert len(sizes) == len(widths) and sum(sizes) == channels and min(sizes) >= 0
  cum = np.cumsum(sizes)
  for k, w in enumerate(widths[:-1]):
    assert cum[k] == int(np.floor(w * channels + 0.5))


@pytest.mark.parametrize('widths', [(0.5, 0.5, 1.0), (0.6, 0.4, 1.0), (0.0, 1.0), (0.5, 0.9), (0.5, 1.2), (-0.1, 1.0)])
def test_sizes_from_widths_invalid(widths):
  with pytest.raises(ValueError):
    lv.sizes_from_widths(16, widths)


@pytest.mark.parametrize('seed', range(4))
def test_sizes_from_levels_round_trip(seed):
  rng = np.random.RandomState(seed)
  k = rng.randint(1, 6)
  levels = rng.randint(0, k, size=rng.randint(1, 40))
  sizes, order = lv.sizes_from_levels(levels, k)
  assert len(sizes) == k
  assert sizes == tuple(int((levels == j).sum()) for j in range(k))
  assert sorted(order.tolist()) == list(range(len(levels)))
  np.testing.assert_array_equal(levels[order], level_array(sizes))
  np.testing.assert_array_equal(lv.levels_of(sizes), level_array(sizes))
  # Stable: neurons of one level keep their original relative order.
  for j in range(k):
    idx = order[levels[order] == j]
    assert list(idx) == sorted(idx)


@pytest.mark.parametrize(
  'levels,k',
  [
    (np.array([0, 1, 4]), 4),  # out of range
    (np.array([0, -1]), 2),  # negative
    (np.array([[0, 1]]), 2),  # not 1-D
    (np.array([0.0, 1.0]), 2),  # not integer
  ],
)
def test_sizes_from_levels_invalid(levels, k):
  with pytest.raises(ValueError):
    lv.sizes_from_levels(levels, k)


def test_level_count_mismatch_raises():
  with pytest.raises(ValueError):
    lv.connection_mask((1, 2), (1, 2, 3))
  with pytest.raises(ValueError):
    lv.Connectivity((1, 2), (1, 2, 3))
  with pytest.raises(ValueError):
    lv.check_level_count((1, 2), 3, 'x')
  with pytest.raises(ValueError):
    lv.check_level_count((1, -2), 2, 'x')


def test_connection_mask_is_read_only():
  m = lv.connection_mask((2, 2), (2, 2))
  with pytest.raises(ValueError):
    m[0, 0] = False
