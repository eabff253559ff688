"""MAC accounting (delta_macs) against brute-force counts and published numbers.

Convention: a convolution costs C_in * C_out * k * k * H_out * W_out MACs (every tap of
every output position, padding included); pooling, BN and ReLU are free; the head of
subnet k costs its features of levels <= k times spatial positions times classes.
"""

import numpy as np
import pytest
from flax import nnx
from testlib import brute_mask, level_array, numpy_initializers

from stepnet_jax.core.layers import Head, LevelConv, LevelDense
from stepnet_jax.core.levels import Connectivity
from stepnet_jax.models import zoo

RNGS = nnx.Rngs(0)


def _out_positions(size, kernel, stride, padding):
  """Output coordinates by enumerating window starts (no formula from the library)."""
  if padding == 'VALID':
    return [p for p in range(0, size, stride) if p + kernel <= size]
  return list(range(0, size, stride))  # SAME: one output per stride step


def brute_conv_macs(in_sizes, out_sizes, triangular, kernel, stride, padding, h, w):
  mask = brute_mask(in_sizes, out_sizes, triangular)
  lout = level_array(out_sizes)
  macs = np.zeros(len(out_sizes), np.int64)
  ys, xs = _out_positions(h, kernel, stride, padding), _out_positions(w, kernel, stride, padding)
  for _ in ys:
    for _ in xs:
      for o in range(mask.shape[1]):
        for i in range(mask.shape[0]):
          if not mask[i, o]:
            continue
          for _ in range(kernel):
            for _ in range(kernel):
              macs[lout[o]] += 1
  return macs, (len(ys), len(xs))


def brute_dense_macs(in_sizes, out_sizes, triangular, spatial):
  mask = brute_mask(in_sizes, out_sizes, triangular)
  lout = level_array(out_sizes)
  macs = np.zeros(len(out_sizes), np.int64)
  for _ in range(spatial):
    for o in range(mask.shape[1]):
      for i in range(mask.shape[0]):
        if mask[i, o]:
          macs[lout[o]] += 1
  return macs


def brute_head_macs(in_sizes, spatial, classes):
  lin = level_array(in_sizes)
  macs = np.zeros(len(in_sizes), np.int64)
  for _ in range(spatial):
    for i in range(len(lin)):
      for _ in range(classes):
        macs[lin[i]] += 1
  return macs


CONV_CASES = [
  # in_sizes, out_sizes, triangular, kernel, stride, padding, pool, (h, w)
  ((1, 0, 0), (2, 3, 1), False, 3, 1, 'VALID', 0, (9, 8)),
  ((2, 1, 3), (3, 2, 2), False, 3, 1, 'VALID', 2, (10, 10)),
  ((2, 1, 3), (3, 2, 2), True, 3, 1, 'VALID', 2, (10, 10)),
  ((3, 3, 3), (3, 3, 3), True, 5, 1, 'VALID', 0, (9, 9)),
  ((2, 0, 2), (1, 2, 0), False, 3, 2, 'SAME', 0, (7, 7)),
  ((2, 2), (3, 1), True, 1, 2, 'SAME', 0, (8, 6)),
  ((4,), (5,), False, 3, 1, 'SAME', 2, (6, 6)),
]


@pytest.mark.parametrize('in_sizes,out_sizes,tri,kernel,stride,padding,pool,hw', CONV_CASES)
def test_level_conv_delta_macs_brute_force(in_sizes, out_sizes, tri, kernel, stride, padding, pool, hw):
  with numpy_initializers(0):
    conv = LevelConv(
      Connectivity(in_sizes, out_sizes, tri), kernel, stride=stride, padding=padding, pool=pool, rngs=RNGS
    )
  macs, shape = conv.delta_macs((hw[0], hw[1], sum(in_sizes)))
  expected, (ho, wo) = brute_conv_macs(in_sizes, out_sizes, tri, kernel, stride, padding, *hw)
  np.testing.assert_array_equal(macs, expected)
  if pool:
    ho, wo = ho // pool, wo // pool
  assert tuple(shape) == (ho, wo, sum(out_sizes))


DENSE_CASES = [
  ((1, 0, 0), (3, 2, 4), False, 12),
  ((2, 3, 1), (4, 0, 2), False, 1),
  ((2, 3, 1), (4, 1, 2), True, 3),
  ((5, 5), (5, 5), True, 1),
]


@pytest.mark.parametrize('in_sizes,out_sizes,tri,spatial', DENSE_CASES)
def test_level_dense_delta_macs_brute_force(in_sizes, out_sizes, tri, spatial):
  with numpy_initializers(0):
    dense = LevelDense(Connectivity(in_sizes, out_sizes, tri), spatial, rngs=RNGS)
  macs, shape = dense.delta_macs((spatial, sum(in_sizes)))
  np.testing.assert_array_equal(macs, brute_dense_macs(in_sizes, out_sizes, tri, spatial))
  assert tuple(shape) == (sum(out_sizes),)


@pytest.mark.parametrize(
  'in_sizes,spatial,pool', [((3, 0, 2), 16, 'flatten'), ((2, 2, 2, 1), 4, 'avg'), ((5,), 1, 'flatten')]
)
def test_head_delta_macs_brute_force(in_sizes, spatial, pool):
  with numpy_initializers(0):
    head = Head(in_sizes, 7, spatial, pool=pool, rngs=RNGS)
  macs, shape = head.delta_macs(None)
  expected = brute_head_macs(in_sizes, 1 if pool == 'avg' else spatial, 7)
  np.testing.assert_array_equal(macs, expected)
  assert tuple(shape) == (7,)


def test_small_lenet3c1l_brute_force():
  """Whole model: shapes tracked by hand (28 -conv3-> 26 -conv3-> 24 -pool-> 12 -conv5-> 8 -pool-> 4)."""
  k = 3
  a = {'conv1': (2, 3, 1), 'conv2': (3, 1, 2), 'conv3': (2, 2, 3)}
  with numpy_initializers(0):
    model = zoo.build_model(
      'lenet3c1l', num_classes=10, input_shape=(28, 28, 1), num_levels=k, assignment=a, triangular=True
    )
  got = model.delta_macs()
  assert got.shape == (4, k) and got.dtype == np.int64
  c1, _ = brute_conv_macs((1, 0, 0), a['conv1'], False, 3, 1, 'VALID', 28, 28)
  c2, _ = brute_conv_macs(a['conv1'], a['conv2'], True, 3, 1, 'VALID', 26, 26)
  c3, _ = brute_conv_macs(a['conv2'], a['conv3'], True, 5, 1, 'VALID', 12, 12)
  head = brute_head_macs(a['conv3'], 16, 10)
  np.testing.assert_array_equal(got, np.stack([c1, c2, c3, head]))


def _formula_conv(in_sizes, out_sizes, tri, kernel, h_out, w_out):
  mask = brute_mask(in_sizes, out_sizes, tri)
  lout = level_array(out_sizes)
  return np.array([mask[:, lout == j].sum() for j in range(len(out_sizes))], np.int64) * kernel**2 * h_out * w_out


def test_resnet20_delta_macs_by_formula():
  """ResNet-20 (32x32): stem + 9 blocks (two 3x3 convs, 1x1 projection when the shape changes) + head."""
  k = 3
  rng = np.random.RandomState(0)
  names = ['stage1', 'stage2', 'stage3'] + [f'stage{s}.block{m}.mid' for s in (1, 2, 3) for m in range(3)]
  a = {n: tuple(int(v) for v in rng.randint(1, 4, size=k)) for n in names}
  with numpy_initializers(0):
    model = zoo.build_model('resnet20', num_classes=10, input_shape=(32, 32, 3), num_levels=k, assignment=a)
  rows = [_formula_conv((3, 0, 0), a['stage1'], False, 3, 32, 32)]
  sizes, hw = a['stage1'], 32
  for s in (1, 2, 3):
    out = a[f'stage{s}']
    for m in range(3):
      stride = 2 if s > 1 and m == 0 else 1
      ho = hw // stride
      mid = a[f'stage{s}.block{m}.mid']
      r = _formula_conv(sizes, mid, False, 3, ho, ho) + _formula_conv(mid, out, False, 3, ho, ho)
      if stride != 1 or sizes != out:
        r = r + _formula_conv(sizes, out, False, 1, ho, ho)
      rows.append(r)
      sizes, hw = out, ho
  rows.append(np.asarray(sizes, np.int64) * 10)  # global average pool, then 10 classes
  np.testing.assert_array_equal(model.delta_macs(), np.stack(rows))


def test_mlp_and_lenet5_delta_macs_by_formula():
  k = 2
  a = {'fc1': (3, 2), 'fc2': (1, 4)}
  with numpy_initializers(0):
    mlp = zoo.build_model('mlp', num_classes=10, input_shape=(28, 28, 1), num_levels=k, assignment=a)
  expected = np.stack(
    [
      brute_dense_macs((1, 0), a['fc1'], False, 784),
      brute_dense_macs(a['fc1'], a['fc2'], False, 1),
      brute_head_macs(a['fc2'], 1, 10),
    ]
  )
  np.testing.assert_array_equal(mlp.delta_macs(), expected)

  a = {'conv1': (2, 1), 'conv2': (3, 2), 'fc1': (4, 4), 'fc2': (2, 3)}
  with numpy_initializers(0):
    lenet5 = zoo.build_model('lenet5', num_classes=10, input_shape=(28, 28, 1), num_levels=k, assignment=a)
  expected = np.stack(
    [
      _formula_conv((1, 0), a['conv1'], False, 5, 28, 28),  # SAME on 28x28, pool -> 14
      _formula_conv(a['conv1'], a['conv2'], False, 5, 10, 10),  # VALID -> 10, pool -> 5
      brute_dense_macs(a['conv2'], a['fc1'], False, 25),
      brute_dense_macs(a['fc1'], a['fc2'], False, 1),
      brute_head_macs(a['fc2'], 1, 10),
    ]
  )
  np.testing.assert_array_equal(lenet5.delta_macs(), expected)


def test_dense_lenet3c1l_is_7146624_macs():
  with numpy_initializers(0):
    model = zoo.build_model('lenet3c1l', num_classes=10, input_shape=(28, 28, 1), num_levels=1)
  macs = model.delta_macs()
  assert macs.shape == (4, 1)
  # conv1 1*32*9*26*26 + conv2 32*32*9*24*24 + conv3 32*32*25*8*8 + head 32*16*10
  assert 1 * 32 * 9 * 26 * 26 + 32 * 32 * 9 * 24 * 24 + 32 * 32 * 25 * 8 * 8 + 32 * 16 * 10 == 7_146_624
  assert int(macs.sum()) == 7_146_624


@pytest.mark.parametrize('how', ['width', 'assignment'])
def test_awn_triangular_widened_lenet3c1l(how):
  """Any-Width Networks' sqrt(2)-widened triangular LeNet-3C1L (45 filters, 4 widths):
  0.52M / 2.02M / 4.25M / 7.30M cumulative MACs."""
  kw = dict(num_classes=10, input_shape=(28, 28, 1), num_levels=4, triangular=True)
  if how == 'width':
    kw.update(width=1.41421356, level_widths=(0.25, 0.5, 0.75, 1.0))
  else:
    kw.update(assignment={f'conv{i}': (11, 12, 11, 11) for i in (1, 2, 3)})
  with numpy_initializers(0):
    model = zoo.build_model('lenet3c1l', **kw)
  cumulative = np.cumsum(model.delta_macs().sum(axis=0))
  expected = []
  for n in (11, 23, 34, 45):  # channels of subnet k in every layer
    pairs = n * (n + 1) // 2  # global lower triangle i <= o between hidden layers
    expected.append(1 * n * 9 * 26 * 26 + pairs * 9 * 24 * 24 + pairs * 25 * 8 * 8 + n * 16 * 10)
  np.testing.assert_array_equal(cumulative, expected)
  np.testing.assert_allclose(np.asarray(expected) / 1e6, [0.52, 2.02, 4.25, 7.30], atol=0.005)
