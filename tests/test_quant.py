"""Quantization core: per-neuron weight quantizers, activation quantizers, bit-op counts,
the level invariant under quantization, and precision stored in a checkpoint.

References are independent: numpy re-derivations of the documented quantizers, and a
bit-op count that walks every (input channel, output neuron, tap, output position) of
the brute-force connection mask.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testlib import brute_mask, images

import stepnet_jax
from stepnet_jax.models import quantized, zoo


@pytest.fixture(scope='module')
def small():
  model = zoo.build_model(
    'lenet3c1l',
    num_classes=10,
    input_shape=(16, 16, 1),
    num_levels=3,
    width=0.25,
    assignment={'conv1': [3, 2, 3], 'conv2': [1, 4, 3], 'conv3': [2, 2, 4]},
  )
  rng = np.random.RandomState(0)
  bits = {
    name: tuple(int(b) for b in rng.randint(1, 9, layer.kernel.shape[-1]))
    for name, layer in quantized.linear_layers(model).items()
  }
  return model, bits


def _numpy_quantize(w, bits):
  """The documented quantizer, per output neuron, in numpy float64."""
  out = np.empty_like(w, dtype=np.float64)
  for o, b in enumerate(bits):
    col = w[..., o].astype(np.float64)
    if b >= quantized.FLOAT_BITS:
      out[..., o] = col
    elif b == 1:
      out[..., o] = np.where(col >= 0, 1.0, -1.0) * np.abs(col).mean()
    else:
      top = 2 ** (b - 1) - 1
      s = np.abs(col).max() / top
      out[..., o] = np.clip(np.round(col / s), -top, top) * s
  return out


def test_weight_quantizer_matches_numpy_and_has_at_most_2b_values():
  rng = np.random.RandomState(1)
  w = rng.normal(0, 0.3, (3, 3, 5, 6)).astype(np.float32)
  bits = np.asarray([1, 2, 3, 4, 8, 32])
  q = np.asarray(quantized.quantize_kernel(jnp.asarray(w), jnp.asarray(bits)))
  np.testing.assert_allclose(q, _numpy_quantize(w, bits), rtol=1e-6, atol=1e-7)
  for o, b in enumerate(bits[:-1]):
    assert len(np.unique(q[..., o])) <= 2**b - (b > 1)  # symmetric: 2^b - 1 levels; binary: 2
  np.testing.assert_array_equal(q[..., -1], w[..., -1])  # FLOAT_BITS: untouched
  # With a connection mask the statistics come from the kept weights only.
  mask = rng.rand(5, 6) < 0.6
  qm = np.asarray(quantized.quantize_kernel(jnp.asarray(w), jnp.asarray(bits), mask=jnp.asarray(mask)))
  for o, b in enumerate(bits):
    kept = w[..., mask[:, o], o]
    np.testing.assert_allclose(
      qm[..., mask[:, o], o], _numpy_quantize(kept[..., None], [b])[..., 0], rtol=1e-6, atol=1e-7
    )
    assert not qm[..., ~mask[:, o], o].any()
  # Straight-through: the gradient of <quantized w, c> w.r.t. w is c.
  c = rng.normal(size=w.shape).astype(np.float32)
  g = jax.grad(lambda w: (quantized.quantize_kernel(w, jnp.asarray(bits), ste=True) * c).sum())(jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(g), c, rtol=1e-6)


def test_activation_quantizer_grid_and_straight_through():
  y = jnp.linspace(-1.0, 3.0, 401)
  q = np.asarray(quantized.quantize_activation(y, 3, 2.0))
  grid = np.arange(8) * (2.0 / 7)
  assert np.abs(q[:, None] - grid[None]).min(axis=1).max() < 1e-6  # on the 8-value grid of [0, 2]
  assert np.abs(q - np.clip(np.asarray(y), 0, 2)).max() <= 1.0 / 7 + 1e-6
  g = np.asarray(jax.grad(lambda y: quantized.quantize_activation(y, 3, 2.0, ste=True).sum())(y))
  np.testing.assert_array_equal(g, ((np.asarray(y) > 0) & (np.asarray(y) < 2)).astype(np.float32))


def test_quantized_model_keeps_the_level_invariant(small):
  """Stepping the quantized model gives its direct forward at every level, hidden outputs
  are on the activation grid, and each neuron's weights take at most 2^b values."""
  model, bits = small
  x = images(model.input_shape, batch=8, seed=3)
  clips = quantized.calibrate_clips(model, x)
  q = quantized.apply(model, quantized.Precision(bits, 4, clips))
  for name, layer in quantized.linear_layers(q).items():
    k = np.asarray(layer.kernel[...])
    mask = np.ones(k.shape[-2:], bool) if name == 'head' else layer.conn.mask
    for o, b in enumerate(bits[name]):
      kept = k[..., mask[:, o], o]
      assert len(np.unique(kept)) <= 2**b
      assert not k[..., ~mask[:, o], o].any()  # masked weights are zero
  net = stepnet_jax.Stepper(q)
  cache = net.start(jnp.asarray(x))
  for level in range(q.num_levels):
    if level:
      cache = net.advance(cache)
    np.testing.assert_allclose(
      np.asarray(cache.logits), np.asarray(net.forward(jnp.asarray(x), level)), rtol=1e-5, atol=1e-5
    )
  for name, buf in zip(q.unit_names, cache.units):
    step = clips[name] / 15
    ratio = np.asarray(buf) / step
    np.testing.assert_allclose(ratio, np.round(ratio), atol=1e-3)
    assert ratio.min() >= -1e-3 and ratio.max() <= 15 + 1e-3
  assert not np.allclose(
    np.asarray(net.forward(jnp.asarray(x), 2)), np.asarray(stepnet_jax.Stepper(model).forward(jnp.asarray(x), 2))
  )


def test_bitops_match_a_brute_force_count(small):
  model, bits = small
  act_bits = 5
  expected = np.zeros((len(model.units) + 1, model.num_levels), np.int64)
  h, w, in_bits = model.input_shape[0], model.input_shape[1], quantized.INPUT_BITS
  for row, unit in enumerate(model.units):
    c = unit.conn
    mask = brute_mask(c.in_sizes, c.out_sizes)
    level_of = np.repeat(np.arange(len(c.out_sizes)), c.out_sizes)
    k = unit.kernel_size
    oh, ow = h - k + 1, w - k + 1  # VALID convolutions
    for i in range(mask.shape[0]):
      for o in range(mask.shape[1]):
        if mask[i, o]:
          for _ in range(k * k):
            expected[row, level_of[o]] += oh * ow * bits[f'conv{row + 1}'][o] * in_bits
    h, w = (oh // unit.pool, ow // unit.pool) if unit.pool else (oh, ow)
    in_bits = act_bits
  head = model.head
  feature_level = np.repeat(np.arange(len(head.in_sizes)), head.in_sizes)
  for j in range(sum(head.in_sizes)):
    expected[-1, feature_level[j]] += head.spatial * sum(bits['head']) * act_bits
  np.testing.assert_array_equal(quantized.bitops(model, bits, act_bits), expected)
  # With every neuron at 1 bit and 1-bit inputs, bit-ops are the MACs.
  ones = {n: (1,) * len(b) for n, b in bits.items()}
  np.testing.assert_array_equal(quantized.bitops(model, ones, 1, input_bits=1), model.delta_macs())


def test_bad_bits_are_refused_by_name(small):
  model, bits = small
  with pytest.raises(ValueError, match="no weight bits for layer 'head'"):
    quantized.check_bits(model, {k: v for k, v in bits.items() if k != 'head'})
  with pytest.raises(ValueError, match="layer 'conv1' has 8 neurons, got 3 bits"):
    quantized.check_bits(model, {**bits, 'conv1': (4, 4, 4)})
  with pytest.raises(ValueError, match='must be >= 1'):
    quantized.check_bits(model, {**bits, 'conv2': (0,) * 8})
  with pytest.raises(ValueError, match='unknown layers'):
    quantized.check_bits(model, {**bits, 'fc9': (4,)})
  with pytest.raises(ValueError, match='act_clips'):
    quantized.apply(model, quantized.Precision(bits, 8, None))


def test_precision_survives_a_checkpoint_round_trip(small, tmp_path):
  """A run whose model_meta records a precision loads as the quantized model."""
  from stepnet_jax.models import structure
  from stepnet_jax.training import checkpoints

  model, bits = small
  x = images(model.input_shape, batch=8, seed=4)
  precision = quantized.Precision(bits, 6, quantized.calibrate_clips(model, x))
  meta = {
    'model_meta': {**structure.model_meta(model, 'lenet3c1l', 10), 'precision': precision.to_json()},
    'config': {},
  }
  _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  checkpoints.save_final(str(tmp_path), 2, 1, params, stats, meta)
  net = stepnet_jax.load(str(tmp_path))
  assert quantized.Precision.from_json(net.meta['model_meta']['precision']) == precision
  expected = stepnet_jax.Stepper(quantized.apply(model, precision)).forward(jnp.asarray(x), 2)
  np.testing.assert_allclose(np.asarray(net.forward(jnp.asarray(x), 2)), np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_bit_search_meets_the_budget_and_is_monotone_in_importance(small):
  from stepnet_jax.methods import bitsearch

  model, _ = small
  rng = np.random.RandomState(5)
  scores = {name: rng.gamma(2.0, size=unit.kernel.shape[-1]) for name, unit in zip(model.unit_names, model.units)}
  macs = {k: v for k, v in quantized.neuron_macs(model).items() if k != 'head'}

  def validate(weight_bits):  # accuracy prefers the steepest slope offered, loss the flattest
    spread = np.concatenate([np.asarray(weight_bits[k]) for k in macs]).std()
    return {'accuracy': spread, 'loss': spread}

  for rank_by, steepest in (('loss', False), ('accuracy', True)):
    _, record = bitsearch.search(model, scores, 3.0, validate, slopes=(1.0, 4.0), rank_by=rank_by)
    assert record['slope'] == (4.0 if steepest else 1.0) and record['rank_by'] == rank_by
    assert [t['validation_loss'] for t in record['tried']] == [t['validation_accuracy'] for t in record['tried']]
  for budget in (1.5, 3.0, 5.0):
    bits, record = bitsearch.search(model, scores, budget, validate, slopes=(1.0, 4.0), rank_by='accuracy')
    assert record['slope'] == 4.0 and len(record['tried']) == 2
    flat_bits = np.concatenate([np.asarray(bits[k]) for k in macs])
    flat_scores = np.concatenate([scores[k] for k in macs])
    total = sum(float(m.sum()) for m in macs.values())
    mean = sum(float((np.asarray(bits[k]) * macs[k]).sum()) for k in macs) / total  # by hand
    assert mean <= budget + 1e-9 and mean > budget - 1.0  # fits, and the offset was not left low
    assert flat_bits.min() >= 1 and flat_bits.max() <= 8
    order = np.argsort(flat_scores)
    assert np.all(np.diff(flat_bits[order]) >= 0)  # more important: never fewer bits
    assert bits['head'] == (8,) * 10
  with pytest.raises(ValueError, match='fits a mean of 0.5 bits'):
    bitsearch.search(model, scores, 0.5, validate)
  with pytest.raises(ValueError, match='rank_by must be one of'):
    bitsearch.search(model, scores, 3.0, validate, rank_by='f1')
  # Slope 1 at an even whole-bit budget fits as every neuron at the budget, and is marked so.
  _, record = bitsearch.search(model, scores, 4.0, validate, slopes=(1.0,))
  bits_at_4 = bitsearch.fit_offset(bitsearch.scaled(scores), macs, 4.0, 1.0, 1, 8)
  assert record['tried'][0]['uniform'] and all(np.all(v == 4) for v in bits_at_4.values())


def test_minimum_bits_finds_the_fewest_that_keep_the_accuracy(small):
  """With a validation accuracy that rises with the MAC-weighted mean bits, the searched
  minimum is the smallest grid budget whose best candidate passes (brute force over the grid),
  and the uniform minimum the smallest passing whole width."""
  from stepnet_jax.methods import bitsearch

  model, _ = small
  rng = np.random.RandomState(7)
  scores = {name: rng.gamma(2.0, size=unit.kernel.shape[-1]) for name, unit in zip(model.unit_names, model.units)}
  macs = {k: v for k, v in quantized.neuron_macs(model).items() if k != 'head'}

  def validate(weight_bits):
    mean = quantized.mean_bits({k: np.asarray(weight_bits[k]) for k in macs}, macs)
    return {'accuracy': 1.0 - 0.5**mean, 'loss': 0.5**mean}

  target = 1.0 - 0.5**3.4
  bits, record = bitsearch.minimum_bits(model, scores, validate, target, slopes=(1.0, 4.0), step=0.25)
  passing = [
    b
    for b in np.arange(1.0, 8.01, 0.25)
    if max(
      t['validation_accuracy'] for t in bitsearch.search(model, scores, b, validate, slopes=(1.0, 4.0))[1]['tried']
    )
    >= target
  ]
  found = quantized.mean_bits({k: np.asarray(bits[k]) for k in macs}, macs)
  assert record['validation_accuracy'] >= target and found >= 3.4 - 1e-9
  assert min(t['budget'] for t in record['tried'] if t['validation_accuracy'] >= target) == passing[0]
  assert len(record['tried']) <= 7  # bisection, not a scan of the 29 budgets
  uniform, urecord = bitsearch.minimum_bits(model, None, validate, target)
  assert all(np.all(np.asarray(uniform[k]) == 4) for k in macs)  # 3 bits: 0.875 < target; 4 bits pass
  assert [t['budget'] for t in urecord['tried']] == [1.0, 2.0, 3.0, 4.0]
  assert bitsearch.minimum_bits(model, None, validate, 1.0)[0] is None  # nothing reaches accuracy 1
  # A step that does not divide the range still tries max_bits (only all-8-bit neurons pass here).
  top, _ = bitsearch.minimum_bits(model, scores, validate, 1.0 - 0.5**7.95, slopes=(1.0,), step=0.3)
  assert top is not None and all(np.all(np.asarray(top[k]) == 8) for k in macs)


def test_quantization_aware_gradient_is_the_quantized_networks(small):
  """Straight-through: the QAT objective's gradient w.r.t. the float kernels equals the
  gradient of the same loss w.r.t. the kernels of the quantized network taken as inputs."""
  from stepnet_jax.data import feed
  from stepnet_jax.training import losses

  model, bits = small
  x = images(model.input_shape, batch=6, seed=7)
  batch = feed.Batch(jnp.asarray(x), jnp.asarray(np.arange(6) % 10, jnp.int32), 6)
  precision = quantized.Precision(bits, 5, quantized.calibrate_clips(model, x))
  objective = losses.multi_exit((1.0,) * model.num_levels)
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  qat_objective = quantized.quantization_aware(objective, precision)

  def qat_loss(params):
    return qat_objective(nnx.merge(graphdef, params, stats, copy=True), batch, jax.random.key(0))[0]

  def loss_of_kernels(kernels):
    m = nnx.merge(graphdef, params, stats, copy=True)
    quantized.set_kernels(m, kernels)
    quantized.set_activation_quantization(m, precision.act_bits, precision.act_clips, ste=True)
    return objective(m, batch, jax.random.key(0))[0]

  grads = nnx.merge(graphdef, jax.jit(jax.grad(qat_loss))(params), stats)
  kernels = {
    name: layer.kernel[...] for name, layer in quantized.linear_layers(quantized.apply(model, precision)).items()
  }
  ref = jax.jit(jax.grad(loss_of_kernels))(kernels)
  assert all(np.abs(np.asarray(g)).max() > 0 for g in ref.values())
  got = {name: layer.kernel[...] for name, layer in quantized.linear_layers(grads).items()}
  chex.assert_trees_all_close(got, ref, rtol=1e-4, atol=1e-7)  # every layer's, by name


def test_bit_planes_reconstruct_and_accumulate_exactly():
  """Bitwise-binary planes (digits +-1, most significant first) rebuild the n-bit weights
  exactly, and accumulating plane by plane (bit-serial) equals one convolution with the
  truncated weights, bit for bit in float32 on integer-valued inputs."""
  from stepnet_jax.core import quantizers

  rng = np.random.RandomState(2)
  w = jnp.asarray(rng.normal(0, 0.2, (3, 3, 4, 5)).astype(np.float32))
  n = 6
  digits, scale = quantizers.bitplanes(w, n)
  assert set(np.unique(np.asarray(digits))) == {-1.0, 1.0}
  # numpy: the nearest odd multiple of the scale within +-max|w|, from the digits' integer code
  top = 2**n - 1
  code = np.clip(np.round((np.asarray(w) / np.asarray(scale) + top) / 2), 0, top) * 2 - top
  np.testing.assert_array_equal(np.tensordot(2.0 ** (n - 1 - np.arange(n)), np.asarray(digits), axes=1), code)
  np.testing.assert_allclose(np.asarray(quantizers.bwb_kernel(w, n)), code * np.asarray(scale), rtol=1e-6)
  x = jnp.asarray(rng.randint(0, 256, (2, 9, 9, 4)).astype(np.float32))

  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  acc = jnp.zeros((2, 7, 7, 5), jnp.float32)
  for b in range(1, n + 1):
    acc = acc + 2.0 ** (n - b) * conv(x, digits[b - 1])  # add plane b's partial sums
    truncated = jnp.tensordot(quantizers.plane_weights(n, b), digits[:b], axes=1)
    np.testing.assert_array_equal(np.asarray(acc), np.asarray(conv(x, truncated)))
    np.testing.assert_allclose(
      np.asarray(acc * scale), np.asarray(conv(x, quantizers.bwb_kernel(w, n, b))), rtol=1e-5, atol=1e-4
    )
