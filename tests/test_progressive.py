"""ProgressiveNN and level x precision stepping.

References are independent: a numpy re-derivation of per-neuron truncated bitwise-binary
weights, each plane count's direct forward for bit-serial inference, BN statistics
recomputed from a plain convolution, bit-op costs from the per-layer MAC counts, and a
staircase worked out by hand.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testlib import images

from stepnet_jax import config
from stepnet_jax.core import quantizers
from stepnet_jax.data import datasets
from stepnet_jax.methods import progressive, staircase
from stepnet_jax.models import quantized, zoo


@pytest.fixture(scope='module')
def small():
  return zoo.build_model(
    'lenet3c1l',
    num_classes=10,
    input_shape=(16, 16, 1),
    num_levels=3,
    width=0.25,
    assignment={'conv1': [3, 2, 3], 'conv2': [1, 4, 3], 'conv3': [2, 2, 4]},
  )


def _numpy_bwb(w, mask, n, planes):
  """Per output neuron: the nearest odd multiple of max|w|/(2^n - 1), written in n digits
  +-1 (most significant first), keeping only the neuron's first ``planes[o]`` digits."""
  w = np.asarray(w, np.float64) * mask
  top = 2**n - 1
  out = np.zeros_like(w)
  for o in range(w.shape[-1]):
    col = w[..., o]
    scale = np.abs(col).max() / top or 1.0  # a fully masked neuron keeps zeros
    u = np.clip(np.round((col / scale + top) / 2), 0, top).astype(np.int64)
    for j in range(planes[o]):
      out[..., o] += (2 * ((u >> (n - 1 - j)) & 1) - 1) * 2.0 ** (n - 1 - j) * scale
  return out * mask


def test_truncated_planes_per_neuron_match_numpy():
  rng = np.random.RandomState(3)
  w = rng.normal(0, 0.3, (3, 3, 4, 5)).astype(np.float32)
  mask = (rng.rand(4, 5) > 0.3).astype(np.float32)
  planes = np.asarray([1, 3, 6, 2, 4])
  got = quantizers.bwb_kernel(jnp.asarray(w), 6, jnp.asarray(planes), mask=jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), _numpy_bwb(w, mask, 6, planes), rtol=1e-5, atol=1e-7)
  # 1 plane is +-2^(n-1) scale: two values per neuron (and zero where masked)
  one = np.asarray(quantizers.bwb_kernel(jnp.asarray(w), 6, 1))
  assert all(len(np.unique(np.abs(one[..., o]))) == 1 for o in range(5))


def test_bit_serial_inference_equals_each_plane_counts_direct_forward(small):
  """Accumulating the first layer's planes and recomputing the rest gives, after every
  plane step, the logits of the b-plane network's own forward (each with its own BN)."""
  model, n = small, 5
  x = images(model.input_shape, batch=6, seed=2)
  nets = []
  for b in range(1, n + 1):
    q = quantized.apply(model, progressive.precision_at(model, b, n, quantized.FLOAT_BITS, None))
    for unit in q.units:  # distinct BN statistics per plane count
      unit.bn.mean[...] = unit.bn.mean[...] + 0.05 * b
      unit.bn.var[...] = unit.bn.var[...] * (1 + 0.1 * b)
    nets.append(q)
  serial = progressive.bit_serial_exits(model.units[0].kernel[...], nets, x, n)
  assert serial.shape == (n, model.num_levels, 6, 10)
  for b, q in enumerate(nets):
    direct = np.asarray(q.exits(x))
    np.testing.assert_allclose(np.asarray(serial[b]), direct, rtol=1e-5, atol=1e-5 * np.abs(direct).max())
  with pytest.raises(ValueError, match='6 plane steps asked of 5-plane'):
    progressive.bit_serial_exits(model.units[0].kernel[...], nets + nets[:1], x, n)


def _toy_training(model, batches: int, seed: int, batch_size: int = 16):
  """(random images for ``batches`` batches, a config training ``model``'s exits on them)."""
  rng = np.random.RandomState(seed)
  x = rng.randint(0, 256, (batch_size * batches,) + model.input_shape).astype(np.uint8)
  y = rng.randint(0, 10, len(x)).astype(np.int32)
  cfg = config.from_dict(
    {'model': {'name': 'lenet3c1l', 'num_levels': model.num_levels}, 'train': {'batch_size': batch_size}}
  )
  return datasets.Dataset('toy', x, y, x[:4], y[:4], 10), cfg


def test_bn_retraining_changes_only_bn_statistics(small):
  """Parameters stay; the statistics become those of the quantized network's own
  activations (the first layer's: a plain convolution of the normalized images)."""
  model, batches = small, 3
  dataset, cfg = _toy_training(model, batches, seed=5)
  x = dataset.train_images
  q = quantized.apply(model, progressive.precision_at(model, 2, 8, quantized.FLOAT_BITS, None))
  retrained = progressive.retrain_bn(q, dataset, cfg, batches)
  before, after = nnx.state(q, nnx.Param), nnx.state(retrained, nnx.Param)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), before, after)
  first = q.units[0]
  xn = (x.astype(np.float64) / 255.0 - np.asarray(model.mean)) / np.asarray(model.std)
  pre = jax.lax.conv_general_dilated(
    jnp.asarray(xn, jnp.float32), first.kernel[...], (1, 1), first.padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  np.testing.assert_allclose(
    np.asarray(retrained.units[0].bn.mean[...]), np.asarray(pre).mean((0, 1, 2)), rtol=1e-4, atol=1e-5
  )
  assert not np.allclose(np.asarray(retrained.units[1].bn.mean[...]), np.asarray(q.units[1].bn.mean[...]))


def test_step_costs_follow_the_layers_macs(small):
  """A plane step costs one 1-bit plane of the first layer plus every later layer at the
  new plane count; a level step only the new level's connections; levels stepped one by
  one cost exactly the direct forward."""
  model, n, act = small, 4, 6
  costs = staircase.PlaneCosts.of(model, n, act)
  shape, macs = model.input_shape, []  # [layer][level] MACs, and the bits each layer reads
  for unit in list(model.units) + [model.head]:
    m, shape = unit.delta_macs(shape)
    macs.append(np.asarray(m, np.int64))
  reads = [quantized.INPUT_BITS] + [act] * len(model.units)
  top = model.num_levels - 1
  for k in range(model.num_levels):
    for b in range(1, n):
      want = macs[0][: k + 1].sum() * reads[0] + sum(
        m[: k + 1].sum() * r * (b + 1) for m, r in zip(macs[1:], reads[1:])
      )
      assert costs.plane_step(k, b) == want
    for b in range(1, n + 1):
      assert costs.direct(k, b) == sum(m[: k + 1].sum() * r * b for m, r in zip(macs, reads))
  levels = staircase.walk(staircase.staircase_path('levels_only', None, costs), costs, np.zeros((3, n)))
  assert levels[-1]['bitops'] == costs.direct(top, n)
  bits = staircase.walk(staircase.staircase_path('bits_only', None, costs), costs, np.zeros((3, n)))
  assert [s['state'] for s in bits] == [[top, b] for b in range(1, n + 1)]
  assert bits[-1]['bitops'] > costs.direct(top, n)  # stepping planes recomputes: dearer than one forward


def test_combined_staircase_takes_the_best_gain_per_bitop():
  base = np.asarray([[10, 20], [30, 40]])  # [layers, levels] bit-ops of one plane
  costs = staircase.PlaneCosts(np.stack([b * base for b in range(4)]), num_levels=2, n=3)
  acc = np.asarray([[0.1, 0.5, 0.6], [0.3, 0.7, 0.9]])
  # (0,1): level +0.2 for 60, plane +0.4 for 10 + 2*30 = 70 -> plane
  # (0,2): level +0.2 for 120, plane +0.1 for 10 + 3*30 = 100 -> level
  # (1,2): only a plane: (10 + 20) + 3 * (30 + 40) = 240
  path = staircase.staircase_path('combined', acc, costs)
  assert path == [(0, 1), (0, 2), (1, 2), (1, 3)]
  assert [s['bitops'] for s in staircase.walk(path, costs, acc)] == [40, 110, 230, 470]


def test_every_monotone_path_is_searched_once():
  """Paths from any state to any state at or above it: sum over pairs of C(dk + db, dk)."""
  k, n = 3, 4
  paths = staircase.monotone_paths(k, n)
  want = sum(
    math.comb((k2 - k1) + (b2 - b1), k2 - k1)
    for k1 in range(k)
    for b1 in range(n)
    for k2 in range(k1, k)
    for b2 in range(b1, n)
  )
  assert len(paths) == want == len({tuple(p) for p in paths})
  for p in paths:
    steps = {(k2 - k1, b2 - b1) for (k1, b1), (k2, b2) in zip(p, p[1:])}
    assert steps <= {(1, 0), (0, 1)}, p


def test_the_area_is_the_mean_accuracy_of_a_uniform_budget():
  points = [{'bitops': 10, 'accuracy': 0.5}, {'bitops': 30, 'accuracy': 0.8}, {'bitops': 70, 'accuracy': 0.9}]
  budgets = np.arange(0, 50) + 0.5  # midpoints of [0, 50) in unit steps: exact for integer breakpoints
  sampled = np.mean([([0.0] + [p['accuracy'] for p in points if p['bitops'] <= c])[-1] for c in budgets])
  assert staircase.area(points, 50) == pytest.approx(sampled)


def test_the_optimal_staircase_beats_or_matches_every_path_on_its_criterion():
  """On a grid where a fourth plane lowers the accuracy: the chosen path is never below
  levels-only and bits-only, stops before the last plane, and no other path never below them
  has a larger area (every path checked, walked and integrated independently)."""
  base = np.asarray([[10, 40], [20, 60]])
  costs = staircase.PlaneCosts(np.stack([b * base for b in range(5)]), num_levels=2, n=4)
  acc = np.asarray([[0.2, 0.6, 0.7, 0.69], [0.1, 0.5, 0.9, 0.88]])
  # levels-only: (0,4) .69 at 120, (1,4) .88 at 520; bits-only: .1 at 130, .5 at 340, .9 at 630, .88 at 1000;
  # (0,3) .7 at 90 then (1,3) .9 at 390 is above both everywhere, and no other path is (worked out by hand).
  path, record = staircase.optimal_path(acc, costs)
  assert record['shortfall'] == 0.0 and path == [(0, 3), (1, 3)]
  horizon = costs.direct(1, 4)

  def curve(p):  # (bit-ops, accuracy) along p, summed by hand from the step costs
    spent, out = costs.direct(*p[0]), []
    for i, (k, b) in enumerate(p):
      spent += costs.step(p[i - 1], (k, b)) if i else 0
      out.append((spent, acc[k, b - 1]))
    return out

  def at(c, p):
    return ([0.0] + [a for s, a in curve(p) if s <= c])[-1]

  baselines = [[(0, 4), (1, 4)], [(1, 1), (1, 2), (1, 3), (1, 4)]]
  budgets = np.linspace(0, 2 * horizon, 801)

  def below(p):
    return max(max(at(c, q) - at(c, p) for q in baselines) for c in budgets)

  def mean_accuracy(p):
    return np.mean([at(c, p) for c in np.linspace(0, horizon, 1001)[:-1] + horizon / 2000])

  assert below(path) <= 1e-12
  for other in staircase.monotone_paths(2, 4):
    if below(other) <= 1e-12:
      assert mean_accuracy(other) <= mean_accuracy(path) + 1e-3, other


def _score(model, seed=0):
  rng = np.random.RandomState(seed)
  return {name: rng.uniform(size=unit.kernel.shape[-1]) for name, unit in zip(model.unit_names, model.units)}


def test_class_ladder_rungs_fit_their_mean_planes_and_follow_the_score(small):
  """Every rung's MAC-weighted mean planes (hidden neurons) is at most b and within a
  neuron's worth of it; within a layer a higher score never has fewer planes; counts
  never fall between rungs; rung 1 and rung N are uniform."""
  model, n = small, 6
  score = _score(model)
  ladder = progressive.class_ladder(model, score, n, slope=4.0)
  macs = {k: v for k, v in quantized.neuron_macs(model).items() if k != 'head'}
  assert ladder[0] == quantized.uniform_bits(model, 1) and ladder[-1] == quantized.uniform_bits(model, n)
  biggest = max(float(m.max()) for m in macs.values()) / sum(float(m.sum()) for m in macs.values())
  for b, rung in enumerate(ladder, start=1):
    mean = sum((np.asarray(rung[k]) * m).sum() for k, m in macs.items()) / sum(m.sum() for m in macs.values())
    assert b - (n - 1) * biggest - 1e-9 <= mean <= b + 1e-9
    assert rung['head'] == (b,) * model.head.kernel.shape[-1]
    for k, v in score.items():
      order = np.argsort(v)
      assert np.all(np.diff(np.asarray(rung[k])[order]) >= 0)
  assert any(len(set(rung[k])) > 1 for rung in ladder for k in score)  # the score does shape the planes
  bad = [dict(r) for r in ladder]
  bad[3] = {**bad[3], 'conv2': (1,) * len(bad[3]['conv2'])}
  with pytest.raises(ValueError, match="'conv2' loses planes from rung 3 to rung 4"):
    progressive.check_ladder(model, bad, n)


def test_bit_serial_on_a_class_ladder_equals_each_rungs_direct_forward(small):
  """Per-neuron plane counts in the first layer: adding each neuron's new planes to the
  cached sums gives the rung's own network, exactly on integer-valued inputs."""
  model, n = small, 5
  ladder = progressive.class_ladder(model, _score(model, 1), n, slope=8.0)
  assert len(set(ladder[2]['conv1'])) > 1  # conv1's neurons differ at rung 3
  rng = np.random.RandomState(4)
  x = jnp.asarray(rng.randint(0, 256, (5,) + model.input_shape).astype(np.uint8))
  nets = [quantized.apply(model, quantized.Precision(rung, quantized.FLOAT_BITS, None, bwb_bits=n)) for rung in ladder]
  serial = progressive.bit_serial_exits(
    model.units[0].kernel[...], nets, x, n, first_planes=[rung['conv1'] for rung in ladder]
  )
  for b, q in enumerate(nets):
    direct = np.asarray(q.exits(x))
    np.testing.assert_allclose(np.asarray(serial[b]), direct, rtol=1e-5, atol=1e-5 * np.abs(direct).max())
  with pytest.raises(ValueError, match='non-decreasing'):
    progressive.bit_serial_exits(
      model.units[0].kernel[...], nets[:2], x, n, first_planes=[ladder[1]['conv1'], ladder[0]['conv1']]
    )


def test_class_ladder_step_costs_count_each_neurons_planes(small):
  """Brute force per neuron: a plane step pays the first layer's added planes (its MACs
  per neuron x planes gained x input bits) and every later neuron of the subnet at its new
  count; levels stepped at one rung add up to that rung's direct forward."""
  model, n, act = small, 4, 6
  ladder = progressive.class_ladder(model, _score(model, 2), n, slope=4.0)
  costs = staircase.PlaneCosts.of(model, n, act, ladder)
  names = list(model.unit_names) + ['head']
  for k in range(model.num_levels):
    for b in range(1, n):
      lo = quantized.bitops(model, ladder[b - 1], act)[:, : k + 1].sum(axis=1)  # [layers] at rung b
      hi = quantized.bitops(model, ladder[b], act)[:, : k + 1].sum(axis=1)  # at rung b + 1
      assert costs.plane_step(k, b) == (hi[0] - lo[0]) + hi[1:].sum()
    assert costs.direct(0, n) + sum(costs.level_step(j, n) for j in range(k)) == costs.direct(k, n)
  # the first layer's per-neuron count by hand: MACs per neuron x planes gained x 8 input bits
  first = np.asarray(ladder[2][names[0]]) - np.asarray(ladder[1][names[0]])
  top = model.num_levels - 1
  assert (
    costs.ops[3][0, :].sum() - costs.ops[2][0, :].sum()
    == int((quantized.neuron_macs(model)[names[0]] * first).sum()) * quantized.INPUT_BITS
  )
  assert costs.plane_step(top, 2) == int(
    (quantized.neuron_macs(model)[names[0]] * first).sum()
  ) * quantized.INPUT_BITS + sum(
    int((quantized.neuron_macs(model)[nm] * np.asarray(ladder[2][nm])).sum()) * act for nm in names[1:]
  )


def test_bn_affine_retraining_trains_only_bn_scale_and_bias(small):
  """With ``affine_steps`` only BN's scale and bias move (every quantized kernel, the
  classifier included, stays bit-for-bit), gradients reach them through quantized
  activations (straight-through), and the statistics are those of the retrained network:
  a plain statistics pass over the result leaves them unchanged. Without steps it is
  the statistics-only retraining of the quantized network."""
  model, batches = small, 3
  dataset, cfg = _toy_training(model, batches, seed=6)
  x = dataset.train_images
  precision = progressive.precision_at(model, 2, 8, 6, quantized.calibrate_clips(model, x))  # 6-bit activations
  q = quantized.apply(model, precision)
  tuned = progressive.retrain_bn_at(model, precision, dataset, cfg, batches, affine_steps=4, learning_rate=1e-2)
  before = nnx.to_flat_state(nnx.state(q, nnx.Param))
  after = dict(nnx.to_flat_state(nnx.state(tuned, nnx.Param)))
  moved = {path for path, v in before if not np.array_equal(np.asarray(v[...]), np.asarray(after[path][...]))}
  assert moved and all('bn' in path and path[-1] in ('scale', 'bias') for path in moved), moved
  assert {p[-1] for p in moved} == {'scale', 'bias'} and {p[1] for p in moved} == set(range(len(model.units)))
  again = progressive.retrain_bn(tuned, dataset, cfg, batches)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
    nnx.state(tuned, nnx.BatchStat),
    nnx.state(again, nnx.BatchStat),
  )
  plain = progressive.retrain_bn_at(model, precision, dataset, cfg, batches)
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
    nnx.state(plain),
    nnx.state(progressive.retrain_bn(q, dataset, cfg, batches)),
  )
