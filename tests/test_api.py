"""The high-level Stepper handle, and the forward pass against a plain numpy reference.

The numpy references recompute the whole network from the raw parameters (masks from
testlib.brute_mask, BN in eval mode, VALID convolutions as sums of shifted matrix
products, 2x2 max-pooling, a row-major flatten into the additive head).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testlib import (
  assert_close,
  brute_mask,
  built_model,
  bundle,
  images,
  level_array,
  linear_units,
  numpy_initializers,
  randomize,
)

import stepnet_jax
from stepnet_jax.core import layers, stepping
from stepnet_jax.inference import policies
from stepnet_jax.models import zoo

BN_EPS = 1e-5  # documented BN epsilon


@pytest.fixture(scope='module')
def mlp_net():
  model = built_model('mlp')
  return model, stepnet_jax.Stepper(model)


def test_level_macs_cumulative_and_brute_force(mlp_net):
  model, net = mlp_net
  assert net.layer_names == ('fc1', 'fc2', 'head')
  k = model.num_levels
  # Brute force: kept (i, o) pairs per output level times spatial positions; head: features x classes.
  expected = np.zeros(k, np.int64)
  for unit in model.units:
    m = brute_mask(unit.conn.in_sizes, unit.conn.out_sizes)
    lout = level_array(unit.conn.out_sizes)
    for o in range(m.shape[1]):
      expected[lout[o]] += m[:, o].sum() * unit.spatial
  for lvl in level_array(model.head.in_sizes):
    expected[lvl] += 10
  assert net.delta_macs == tuple(int(v) for v in expected)
  assert net.level_macs == tuple(int(v) for v in np.cumsum(expected))
  assert all(isinstance(v, int) for v in net.level_macs)
  np.testing.assert_array_equal(net.layer_delta_macs.sum(axis=0), expected)


def test_start_normalises_uint8_like_by_hand(mlp_net):
  model, net = mlp_net
  x = images(model.input_shape, batch=5, seed=21)
  by_hand = (np.asarray(x, np.float64) / 255.0 - np.asarray(model.mean)) / np.asarray(model.std)
  cache = model.init_cache(x).replace(inputs=jnp.asarray(by_hand, jnp.float32))
  ref = model.step(cache, 0).logits
  got = net.start(x)
  assert got.level == 0
  assert_close(got.logits, ref)
  # Float images in [0, 1] are the same images.
  assert_close(net.start(jnp.asarray(np.asarray(x) / 255.0, jnp.float32)).logits, ref)
  np.testing.assert_allclose(np.asarray(got.inputs), by_hand, rtol=1e-5, atol=1e-5)


def test_forward_equals_exits_and_steps(mlp_net):
  model, net = mlp_net
  x = images(model.input_shape, batch=4, seed=22)
  exits = np.asarray(net.exits(x))
  cache = net.start(x)
  for k in range(net.num_levels):
    if k:
      cache = net.advance(cache)
    assert_close(net.forward(x, k), exits[k])
    assert_close(cache.logits, exits[k])


def test_meta_defaults_and_missing_checkpoint(tmp_path, mlp_net):
  _, net = mlp_net
  assert net.meta == {}
  with pytest.raises(FileNotFoundError) as e:
    stepnet_jax.load(str(tmp_path / 'nothing'))
  assert 'checkpoint' in str(e.value)


# ------------------------------------------------------------------ numpy reference forward


def _bn(y, bn):
  return (y - np.asarray(bn.mean[...])) / np.sqrt(np.asarray(bn.var[...]) + BN_EPS) * np.asarray(
    bn.scale[...]
  ) + np.asarray(bn.bias[...])


def _conv_valid(x, w):
  """[B, H, W, Ci] * [kh, kw, Ci, Co] -> [B, H-kh+1, W-kw+1, Co], by summing shifted products."""
  kh, kw = w.shape[:2]
  ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  out = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
  for a in range(kh):
    for b in range(kw):
      out += x[:, a : a + ho, b : b + wo, :] @ w[a, b]
  return out


def _maxpool2(x):
  b, h, w, c = x.shape
  h2, w2 = h // 2, w // 2
  return x[:, : 2 * h2, : 2 * w2].reshape(b, h2, 2, w2, 2, c).max(axis=(2, 4))


def _masked_kernel(unit, triangular):
  m = brute_mask(unit.conn.in_sizes, unit.conn.out_sizes, triangular)
  return np.asarray(unit.kernel[...], np.float64) * m


def _head_exits(model, feats):
  b = feats.shape[0]
  flat = feats.reshape(b, -1, feats.shape[-1])  # [B, positions (row-major), C]
  lvl = level_array(model.head.in_sizes)
  w = np.asarray(model.head.kernel[...], np.float64)
  out = []
  for k in range(model.num_levels):
    keep = lvl <= k
    out.append(np.einsum('bsc,sco->bo', flat[..., keep], w[:, keep]) + np.asarray(model.head.bias[...]))
  return np.stack(out)


def _normalise(model, x):
  return (np.asarray(x, np.float64) / 255.0 - np.asarray(model.mean)) / np.asarray(model.std)


@pytest.mark.parametrize('spec_id', ['mlp', 'mlp_tri'])
def test_mlp_matches_numpy_reference(spec_id):
  model, b = built_model(spec_id), bundle(spec_id)
  tri = spec_id.endswith('_tri')
  x = b['x']
  n = x.shape[0]
  h = _normalise(model, x).reshape(n, -1, model.input_shape[-1])  # [B, 784, 1]
  for idx, (_, unit, _) in enumerate(linear_units(model)):
    w = _masked_kernel(unit, tri and idx > 0)  # [S, Ci, Co]
    h = np.maximum(_bn(np.einsum('bsi,sio->bo', h.reshape(n, unit.spatial, -1), w), unit.bn), 0)
  ref = _head_exits(model, h)
  assert_close(b['exits'], ref, rtol=1e-4, atol=1e-4)
  for k in range(model.num_levels):
    assert_close(b['forward'][k], ref[k], rtol=1e-4, atol=1e-4)
    assert_close(b['step_logits'][k], ref[k], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('spec_id', ['lenet3c1l', 'lenet3c1l_tri'])
def test_lenet3c1l_matches_numpy_reference(spec_id):
  model, b = built_model(spec_id), bundle(spec_id)
  tri = spec_id.endswith('_tri')
  h = _normalise(model, b['x'])
  c1, c2, c3 = model.units
  assert isinstance(c1, layers.LevelConv)
  h = np.maximum(_bn(_conv_valid(h, _masked_kernel(c1, False)), c1.bn), 0)
  h = _maxpool2(np.maximum(_bn(_conv_valid(h, _masked_kernel(c2, tri)), c2.bn), 0))
  h = _maxpool2(np.maximum(_bn(_conv_valid(h, _masked_kernel(c3, tri)), c3.bn), 0))
  assert h.shape[1:3] == (4, 4)
  ref = _head_exits(model, h)
  assert_close(b['exits'], ref, rtol=1e-4, atol=1e-4)
  for k in range(model.num_levels):
    assert_close(b['forward'][k], ref[k], rtol=1e-4, atol=1e-4)
    assert_close(b['step_logits'][k], ref[k], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ construction


@pytest.mark.parametrize(
  'kwargs',
  [
    dict(name='nope'),
    dict(num_levels=0),
    dict(level_widths=(0.5, 1.0)),  # 2 widths for 3 levels
    dict(level_widths=(0.5, 0.4, 1.0)),  # not increasing
    dict(assignment={'fc9': (1, 1, 1)}),  # no such layer
    dict(assignment={'fc1': (1, 1)}),  # 2 sizes for 3 levels
    dict(assignment={'fc1': (0, 0, 0)}),  # no channels
    dict(assignment={'fc1': (2, -1, 3)}),  # negative size
    dict(name='vgg16'),  # needs 32x32 inputs
  ],
)
def test_build_model_rejects_bad_arguments(kwargs):
  args = dict(name='mlp', num_classes=10, input_shape=(28, 28, 1), num_levels=3)
  args.update(kwargs)
  name = args.pop('name')
  with numpy_initializers(0):
    with pytest.raises(ValueError):
      zoo.build_model(name, **args)


def test_assignment_and_widths_fix_channel_counts():
  with numpy_initializers(0):
    model = zoo.build_model(
      'lenet5',
      num_classes=10,
      input_shape=(32, 32, 1),
      num_levels=2,
      width=0.5,
      level_widths=(0.25, 1.0),
      assignment={'fc1': (7, 1)},
    )
  sizes = dict(model.assignment)
  assert sizes['conv1'] == (1, 2)  # round(6 * 0.5) = 3 channels, round(0.75) = 1 in level 0
  assert sizes['conv2'] == (2, 6)  # 8 channels, 2 in level 0
  assert sizes['fc1'] == (7, 1)  # assigned: overrides the width
  assert sizes['fc2'] == (11, 31)  # round(84 * 0.5) = 42, round(10.5) = 11
  assert model.head.in_sizes == (11, 31)


def test_single_level_network():
  with numpy_initializers(0):
    model = randomize(zoo.build_model('mlp', num_classes=10, input_shape=(28, 28, 1), num_levels=1, width=0.05))
  net = stepnet_jax.Stepper(model)
  x = images((28, 28, 1), batch=3, seed=25)
  cache = net.start(x)
  assert cache.level == 0 and len(net.level_macs) == 1
  assert_close(cache.logits, net.exits(x)[0])
  with pytest.raises(ValueError):
    net.advance(cache)


def _conv_same(x, w, stride):
  """XLA/TF 'SAME' convolution: output ceil(n / stride), padding split low = total // 2."""
  kh = w.shape[0]
  n = x.shape[1]
  out = -(-n // stride)
  total = max((out - 1) * stride + kh - n, 0)
  lo = total // 2
  xp = np.pad(x, ((0, 0), (lo, total - lo), (lo, total - lo), (0, 0)))
  res = np.zeros((x.shape[0], out, out, w.shape[-1]))
  for a in range(kh):
    for b in range(kh):
      res += xp[:, a : a + stride * out : stride, b : b + stride * out : stride, :] @ w[a, b]
  return res


def test_resnet20_matches_numpy_reference():
  """stem conv-BN-ReLU; blocks ReLU(BN(conv2(ReLU(BN(conv1 x)))) + shortcut x), the shortcut a
  1x1 conv + BN when the shape changes; global average pool; additive head."""
  spec_id = 'resnet20'
  model, b = built_model(spec_id), bundle(spec_id)
  stem, blocks = model.units[0], list(model.units[1:])
  h = np.maximum(_bn(_conv_same(_normalise(model, b['x']), _masked_kernel(stem, False), 1), stem.bn), 0)
  for idx, blk in enumerate(blocks):
    stride = 2 if idx in (3, 6) else 1
    shape_changes = stride != 1 or blk.conv1.conn.in_sizes != blk.conv2.conn.out_sizes
    assert (blk.shortcut is not None) == shape_changes
    y = np.maximum(_bn(_conv_same(h, _masked_kernel(blk.conv1, False), stride), blk.conv1.bn), 0)
    y = _bn(_conv_same(y, _masked_kernel(blk.conv2, False), 1), blk.conv2.bn)
    s = h if not shape_changes else _bn(_conv_same(h, _masked_kernel(blk.shortcut, False), stride), blk.shortcut.bn)
    h = np.maximum(y + s, 0)
  assert h.shape[1:3] == (8, 8)
  ref = _head_exits(model, h.mean(axis=(1, 2)))
  assert_close(b['exits'], ref, rtol=1e-4, atol=1e-4)
  for k in range(model.num_levels):
    assert_close(b['forward'][k], ref[k], rtol=1e-4, atol=1e-4)
    assert_close(b['step_logits'][k], ref[k], rtol=1e-4, atol=1e-4)


def test_batchnorm_train_mode_and_running_statistics():
  """Train mode normalises with the batch statistics of the given channel slice and moves
  only that slice's running statistics: new = 0.9 * old + 0.1 * batch (biased variance)."""
  bn = layers.BatchNorm(6)
  rng = np.random.RandomState(0)
  bn.mean[...] = jnp.asarray(rng.normal(size=6), jnp.float32)
  bn.var[...] = jnp.asarray(rng.uniform(0.5, 2, 6), jnp.float32)
  bn.scale[...] = jnp.asarray(rng.uniform(0.5, 2, 6), jnp.float32)
  bn.bias[...] = jnp.asarray(rng.normal(size=6), jnp.float32)
  old_mean, old_var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
  y = rng.normal(2.0, 3.0, (5, 3, 4, 3))  # channels 2..4 of the layer
  out = np.asarray(bn(jnp.asarray(y, jnp.float32), 2, 5, train=True))
  mu, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
  scale, bias = np.asarray(bn.scale[...])[2:5], np.asarray(bn.bias[...])[2:5]
  np.testing.assert_allclose(out, (y - mu) / np.sqrt(var + BN_EPS) * scale + bias, rtol=1e-4, atol=1e-4)
  new_mean, new_var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
  np.testing.assert_allclose(new_mean[2:5], 0.9 * old_mean[2:5] + 0.1 * mu, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new_var[2:5], 0.9 * old_var[2:5] + 0.1 * var, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.delete(new_mean, [2, 3, 4]), np.delete(old_mean, [2, 3, 4]))
  np.testing.assert_array_equal(np.delete(new_var, [2, 3, 4]), np.delete(old_var, [2, 3, 4]))
  # Eval mode uses the running statistics.
  out = np.asarray(bn(jnp.asarray(y, jnp.float32), 2, 5, train=False))
  np.testing.assert_allclose(
    out, (y - new_mean[2:5]) / np.sqrt(new_var[2:5] + BN_EPS) * scale + bias, rtol=1e-4, atol=1e-4
  )


def test_inference_imports_no_training_code():
  """Loading and evaluating a trained network (and reading its saved data settings) loads
  neither the trainers nor the losses."""
  import subprocess
  import sys

  code = (
    'import sys, stepnet_jax, stepnet_jax.inference.evaluation, stepnet_jax.inference.sweeps, '
    'stepnet_jax.stepping, stepnet_jax.policies, stepnet_jax.export, stepnet_jax.config as c; '
    'c.saved_data({"model": "mlp", "dataset": "digits"}); '
    'print(sorted(m for m in sys.modules if m.startswith("stepnet_jax")))'
  )
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  loaded = eval(out.stdout)
  assert 'stepnet_jax.inference.stepper' in loaded and 'stepnet_jax.inference.restore' in loaded
  assert not [m for m in loaded if m.split('.')[1:2] in (['training'], ['methods'], ['studies'], ['cli'])], loaded


@pytest.mark.parametrize(
  'size,kernel,stride,padding,cin,cout',
  [
    (28, 3, 1, 'VALID', 1, 8),
    (28, 5, 1, 'SAME', 1, 6),
    (9, 3, 2, 'SAME', 2, 3),
    (10, 5, 2, 'VALID', 1, 4),
    (8, 1, 2, 'SAME', 2, 3),
    (7, 3, 2, 'SAME', 3, 2),
  ],
)
def test_convolution_by_taps_equals_library_convolution(size, kernel, stride, padding, cin, cout):
  """The tap-sum formulation used for narrow-input convolutions against lax's convolution."""
  rng = np.random.RandomState(size + kernel + cin)
  x = jnp.asarray(rng.randn(3, size, size, cin), jnp.float32)
  w = jnp.asarray(rng.randn(kernel, kernel, cin, cout), jnp.float32)
  ref = jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert_close(layers.conv_by_taps(x, w, stride, padding), ref, 1e-5, 1e-5)


def test_bad_inputs_are_clear_errors_before_tracing():
  """Wrong rank, image size, channels or dtype, a level out of range, a cache of another
  network or batch: each a ValueError / TypeError saying what was expected."""
  net = stepnet_jax.Stepper(
    zoo.build_model('lenet3c1l', num_classes=10, input_shape=(16, 16, 1), num_levels=3, width=0.25)
  )
  other = stepnet_jax.Stepper(
    zoo.build_model('lenet3c1l', num_classes=10, input_shape=(16, 16, 1), num_levels=3, width=0.5)
  )
  x = images((16, 16, 1), batch=2)
  with pytest.raises(ValueError, match=r'rank 4 \[B, 16, 16, 1\].*add a batch axis'):
    net.start(x[0])
  with pytest.raises(ValueError, match=r'shape \[B, 16, 16, 1\] \(H, W, C\), got \(2, 28, 28, 1\)'):
    net.forward(jnp.zeros((2, 28, 28, 1), jnp.uint8), 0)
  with pytest.raises(ValueError, match=r'got \(2, 16, 16, 3\)'):
    net.exits(jnp.zeros((2, 16, 16, 3), jnp.uint8))
  with pytest.raises(TypeError, match='uint8 images .* or float32 in \\[0, 1\\], got int32'):
    net.start(x.astype(jnp.int32))
  with pytest.raises(TypeError, match='expected an array'):
    net.start([[0]])
  with pytest.raises(ValueError, match=r'level must be an int in 0..2, got 3'):
    net.forward(x, 3)
  with pytest.raises(TypeError, match=r'level must be a Python int .* got .*Array.*use int\(level\)'):
    net.forward(x, jnp.int32(1))
  with pytest.raises(ValueError, match='not made by this network'):  # a pure-function cache of another net
    net.advance(stepping.start(other.graphdef, other.variables, x))
  # Same structure and shapes, other weights: the buffers fit, so only the cache's tag tells.
  twin = stepnet_jax.Stepper(
    zoo.build_model('lenet3c1l', num_classes=10, input_shape=(16, 16, 1), num_levels=3, width=0.25, seed=7)
  )
  with pytest.raises(ValueError, match='made by another network'):
    net.advance(twin.start(x))
  with pytest.raises(ValueError, match='made by another network'):
    net.restart(twin.start(x), x)
  assert_close(net.advance(net.start(x)).logits, net.forward(x, 1))  # its own cache steps
  # Floats must be in [0, 1] and finite; integers other than uint8 are refused with a hint.
  for bad in (
    x.astype(jnp.float32),
    jnp.full(x.shape, jnp.nan),
    jnp.full(x.shape, jnp.inf),
    np.asarray(x, np.float32) / 255 - 0.5,
  ):
    with pytest.raises(ValueError, match=r'finite and in \[0, 1\]'):
      net.start(bad)
  for dtype in (jnp.bool_, np.int64, np.float64):
    with pytest.raises(TypeError, match=r'uint8 images'):
      net.exits(np.asarray(x).astype(dtype))
  assert_close(net.exits(np.asarray(x, np.float32) / 255), net.exits(x))  # the documented float range
  with pytest.raises(ValueError, match="restart needs images of the cache's batch size 2, got 3"):
    net.restart(net.start(x), images((16, 16, 1), batch=3))
  with pytest.raises(ValueError, match='already at the top level'):
    net.advance(net.advance(net.advance(net.start(x))))
  with pytest.raises(ValueError, match="unknown strategy 'fast'"):
    net.predict(x, policies.Confidence(0.5), strategy='fast')
  with pytest.raises(TypeError, match='expected a policy with init and stop'):
    net.predict(x, 0.5)
  learned = policies.Learned(policies.init_selector(jax.random.key(0), 10, 4), num_levels=4)
  with pytest.raises(ValueError, match='made for 4 levels; the network has 3'):
    net.predict(x, learned)
  for knob in ('0.9', None):
    with pytest.raises(TypeError, match='Confidence: knobs must be numbers'):
      net.predict(x, policies.Confidence(knob))
  with pytest.raises(ValueError, match='Entropy: a knob is NaN'):
    net.predict(x, policies.Entropy(float('nan')))
  with pytest.raises(ValueError, match='non-decreasing'):
    policies.MacBudget(1e6, (300, 200, 400))
  with pytest.raises(ValueError, match='number of levels'):
    policies.Learned(learned.params, num_levels=0)
