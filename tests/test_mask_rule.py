"""The mask rule level(in) <= level(out) (and AWN triangles) in every model.

Expected masks come from testlib.brute_mask (double loop over per-channel levels);
expected subnet logits come from the full-width network with every parameter that
belongs to a neuron above the subnet zeroed by hand.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testlib import (
  MASK_SPEC_IDS,
  SPEC_BY_ID,
  assert_close,
  block_end,
  block_start,
  brute_mask,
  built_model,
  bundle,
  images,
  level_array,
  linear_units,
  numpy_initializers,
)

from stepnet_jax.core import layers
from stepnet_jax.models import zoo
from stepnet_jax.training import losses


@pytest.fixture(scope='module', params=MASK_SPEC_IDS)
def built(request):
  return SPEC_BY_ID[request.param], built_model(request.param)


def _expected_tri(spec, reads_hidden):
  """AWN triangles apply between hidden layers, never to the image-reading first layer."""
  return spec.triangular and reads_hidden


def test_assignment_is_respected(built):
  """Layers named in the assignment have exactly the requested level sizes."""
  spec, model = built
  got = dict(model.assignment)
  for name, sizes in spec.assignment:
    assert tuple(got[name]) == tuple(sizes), name
  for name, unit, _ in linear_units(model):
    if name in dict(spec.assignment):
      assert tuple(unit.conn.out_sizes) == tuple(dict(spec.assignment)[name])
  # The first layer reads the image: every input channel is level 0.
  first = linear_units(model)[0][1]
  assert tuple(first.conn.in_sizes) == (spec.input_shape[-1],) + (0,) * (spec.num_levels - 1)


# ----------------------------------------------------------------- effective kernels


PER_LEVEL_PROBES = ('mlp_tri', 'lenet3c1l_tri', 'lenet5_empty')


def _probe_input(unit, rng):
  cin = sum(unit.conn.in_sizes)
  if isinstance(unit, layers.LevelConv):
    hw = unit.kernel_size + 3
    shape = (2, hw, hw, cin)
  else:
    shape = (2, unit.spatial, cin)
  return jnp.asarray(rng.uniform(0.5, 1.5, shape), jnp.float32)


def _active_probe(unit):
  """A copy of ``unit`` whose BN is the identity plus a large bias, so ReLU passes everything."""
  u = nnx.clone(unit)
  n = u.bn.scale[...].shape
  u.bn.mean[...] = jnp.zeros(n)
  u.bn.var[...] = jnp.ones(n) - layers.BN_EPSILON
  u.bn.scale[...] = jnp.ones(n)
  u.bn.bias[...] = jnp.full(n, 100.0)
  return u


def _probe_all(units, xs, num_levels, per_level):
  """For each unit: kernel gradients of the full-width forward and, where ``per_level``,
  of every prefix and every block. One jitted computation per model.
  """
  splits = [nnx.split(u) for u in units]
  in_sizes = [u.conn.in_sizes for u in units]
  top = num_levels - 1

  def kernel_grad(graphdef, state, fn):
    def f(st):
      return jnp.sum(fn(nnx.merge(graphdef, st, copy=True)))

    return jax.grad(f)(state)['kernel'][...]

  @jax.jit
  def run(states, xs):
    out = []
    for (graphdef, _), st, x, sizes, full in zip(splits, states, xs, in_sizes, per_level):
      row = {'top': kernel_grad(graphdef, st, lambda m: m(x, top))}
      for k in range(num_levels if full else 0):
        ie = block_end(sizes, k)
        if k < top:  # the top prefix is the full-width forward above
          row[f'prefix{k}'] = kernel_grad(graphdef, st, lambda m, k=k, ie=ie: m(x[..., :ie], k))
        row[f'block{k}'] = kernel_grad(graphdef, st, lambda m, k=k: m.block(x, k))
      out.append(row)
    return out

  return jax.device_get(run([st for _, st in splits], xs))


def test_effective_kernels_follow_the_mask_rule(built):
  """For every linear layer, dOut/dW != 0 exactly where the brute-force mask keeps (i, o).

  With positive inputs, identity BN and an always-active ReLU, the gradient of the
  summed outputs w.r.t. a kernel entry is positive iff the entry is used by the forward
  (masked entries have gradient zero), so this reads off the effective mask of the
  full-width forward, the prefix forward of every subnet and the per-level step block.
  """
  spec, model = built
  rng = np.random.RandomState(0)
  k_levels = spec.num_levels
  named = linear_units(model)
  probes = [_active_probe(u) for _, u, _ in named]
  # Prefix / block probes (one compiled gradient per unit and level) on the models with
  # triangles, unequal and empty blocks; elsewhere the subnet and stepping tests cover those paths.
  per_level = [spec.id in PER_LEVEL_PROBES] * len(named)
  grads = _probe_all(probes, [_probe_input(u, rng) for u in probes], k_levels, per_level)
  for (name, unit, hidden), g_all, full in zip(named, grads, per_level):
    in_sizes, out_sizes = unit.conn.in_sizes, unit.conn.out_sizes
    mask = brute_mask(in_sizes, out_sizes, _expected_tri(spec, hidden))
    g = np.asarray(g_all['top'])
    # Every tap of a kept connection is used, no tap of a masked one.
    np.testing.assert_array_equal(
      g != 0, np.broadcast_to(mask, g.shape), err_msg=f'{spec.id}/{name}: full-width forward'
    )
    for k in range(k_levels if full else 0):
      ie = block_end(in_sizes, k)
      os_, oe = block_start(out_sizes, k), block_end(out_sizes, k)
      g = np.asarray(g_all[f'prefix{k}' if k < k_levels - 1 else 'top'])
      expected = np.zeros_like(mask)
      expected[:ie, :oe] = mask[:ie, :oe]
      np.testing.assert_array_equal(
        g != 0, np.broadcast_to(expected, g.shape), err_msg=f'{spec.id}/{name}: prefix forward of level {k}'
      )
      g = np.asarray(g_all[f'block{k}'])
      expected = np.zeros_like(mask)
      expected[:ie, os_:oe] = mask[:ie, os_:oe]
      np.testing.assert_array_equal(
        g != 0, np.broadcast_to(expected, g.shape), err_msg=f'{spec.id}/{name}: level-{k} block'
      )


# ----------------------------------------------------------------- subnets


def _zeroed_copy(spec, model, k):
  """Full-width copy computing subnet k: hand-masked kernels, no weights into or out of levels > k."""
  m = nnx.clone(model)
  for _name, unit, hidden in linear_units(m):
    in_sizes, out_sizes = unit.conn.in_sizes, unit.conn.out_sizes
    keep = brute_mask(in_sizes, out_sizes, _expected_tri(spec, hidden)).astype(np.float32)
    keep[:, level_array(out_sizes) > k] = 0.0  # neurons above level k compute nothing
    unit.kernel[...] = unit.kernel[...] * jnp.asarray(keep)
  head_keep = (level_array(m.head.in_sizes) <= k).astype(np.float32)
  m.head.kernel[...] = m.head.kernel[...] * jnp.asarray(head_keep)[None, :, None]
  return m


def _noisy_unit_outputs(model, x, noise):
  outs = []
  for unit, n in zip(model.units, noise):
    x = unit(x, model.num_levels - 1) + n
    outs.append(x)
  return outs


def _normalize_by_hand(x, model):
  x = np.asarray(x, np.float64) / 255.0
  return jnp.asarray((x - np.asarray(model.mean)) / np.asarray(model.std), jnp.float32)


@pytest.fixture(scope='module')
def forwards(built):
  """The library's subnet computations (testlib.bundle: prefix unit outputs, forward(k),
  exits) and ``full(state, x_normalised, noise)``: the full-width unit outputs with
  ``noise`` added after each unit, and the head's exits, jitted once and called with
  the hand-zeroed copies as ``state``."""
  spec, model = built
  graphdef, state = nnx.split(model)
  b = bundle(spec.id)

  @jax.jit
  def full(st, xn, noise):
    m = nnx.merge(graphdef, st, copy=True)
    feats = _noisy_unit_outputs(m, xn, noise)
    return feats, m.head.exits(feats[-1])

  zero_noise = [jnp.zeros_like(f) for f in b['prefix_units'][-1]]
  return dict(
    x=b['x'],
    xn=_normalize_by_hand(b['x'], model),
    per_level=b['prefix_units'],
    subnet_logits=b['forward'],
    exits=b['exits'],
    full=full,
    zero_noise=zero_noise,
    state=state,
  )


def test_subnet_equals_full_network_with_upper_levels_zeroed(built, forwards):
  """model(x, k) and exits[k] == the FULL-width network whose kernels are multiplied by the
  brute-force mask, with every kernel column of a neuron above level k and every head row
  of a feature above level k zeroed."""
  spec, model = built
  top = spec.num_levels - 1
  exits = np.asarray(forwards['exits'])
  chex.assert_shape(exits, (spec.num_levels, 4, spec.num_classes))
  for k in range(spec.num_levels):
    zeroed = nnx.state(_zeroed_copy(spec, model, k))
    _, ref_exits = forwards['full'](zeroed, forwards['xn'], forwards['zero_noise'])
    ref = np.asarray(ref_exits[top])
    assert_close(forwards['subnet_logits'][k], ref, err_msg=f'{spec.id}: model(x, {k})')
    assert_close(exits[k], ref, err_msg=f'{spec.id}: exits[{k}]')
  # The subnets differ (the test is not vacuous).
  assert not np.allclose(exits[-1], exits[0])


def test_shared_neurons_identical_across_subnets(built, forwards):
  """A neuron's activation does not depend on the subnet it is computed in."""
  spec, model = built
  per_level = forwards['per_level']
  full, _ = forwards['full'](forwards['state'], forwards['xn'], forwards['zero_noise'])
  for k, prefix in enumerate(per_level):
    # Each unit's prefix output is its full output's first end(k) channels (shapes included).
    ends = [block_end(unit.conn.out_sizes, k) for unit in model.units]
    assert_close(prefix, [f[..., :e] for f, e in zip(full, ends)], rtol=1e-5, atol=1e-5)


def test_higher_levels_do_not_reach_lower_neurons(built, forwards):
  """Full-width forward with noise added to every channel above level k after each layer:
  the channels of levels <= k, and exit k, are unchanged."""
  spec, model = built
  top = spec.num_levels - 1
  run = functools.partial(forwards['full'], forwards['state'], forwards['xn'])
  clean, clean_exits = run(forwards['zero_noise'])
  rng = np.random.RandomState(0)
  for k in range(top):
    noise = []
    for unit, z in zip(model.units, forwards['zero_noise']):
      n = rng.normal(0, 10.0, z.shape).astype(np.float32)
      n[..., : block_end(unit.conn.out_sizes, k)] = 0.0
      noise.append(jnp.asarray(n))
    feats, ex = run(noise)
    ends = [block_end(unit.conn.out_sizes, k) for unit in model.units]
    assert_close(
      [n[..., :e] for n, e in zip(feats, ends)], [c[..., :e] for c, e in zip(clean, ends)], rtol=1e-5, atol=1e-5
    )
    assert_close(ex[k], clean_exits[k])
    assert not np.allclose(ex[top], clean_exits[top])


# ----------------------------------------------------------------- gradients


# vgg16_tri is a LevelConv stack like lenet3c1l_tri; left out to keep the suite fast.
@pytest.mark.parametrize('spec_id', [s for s in MASK_SPEC_IDS if s != 'vgg16_tri'])
def test_masked_weights_get_zero_gradient(spec_id):
  """Training loss (train-mode BN, all exits, distillation): masked kernel entries get
  exactly zero gradient; kept entries mostly do not."""
  spec, model = SPEC_BY_ID[spec_id], built_model(spec_id)
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  x = images(spec.input_shape, batch=4, seed=6)
  y = jnp.asarray([0, 1, 2, 3])

  def loss_fn(p):
    m = nnx.merge(graphdef, p, stats, copy=True)
    logits = m.exits(x, train=True)
    return losses.multi_exit_loss(logits, y, (1.0,) * spec.num_levels, 0.5, 2.0)[0]

  grads = nnx.merge(graphdef, jax.jit(jax.grad(loss_fn))(params), stats, copy=True)
  kept_nonzero, kept_total = 0, 0
  for (name, gunit, hidden), (_, unit, _) in zip(linear_units(grads), linear_units(model)):
    mask = brute_mask(unit.conn.in_sizes, unit.conn.out_sizes, _expected_tri(spec, hidden))
    g = np.asarray(gunit.kernel[...])
    m = np.broadcast_to(mask, g.shape)
    assert np.all(g[~m] == 0.0), f'{spec.id}/{name}: masked weights have nonzero gradient'
    kept_nonzero += int((g[m] != 0).sum())
    kept_total += int(m.sum())
  assert kept_nonzero > 0.5 * kept_total


# ----------------------------------------------------------------- the triangular option


@pytest.mark.parametrize(
  'name,shape',
  [
    ('mlp', (28, 28, 1)),
    ('lenet3c1l', (28, 28, 1)),
    ('lenet5', (28, 28, 1)),
    ('vgg16', (32, 32, 3)),
    ('resnet20', (32, 32, 3)),
  ],
)
def test_triangular_option_reaches_every_hidden_layer(name, shape):
  """triangular=True: every linear layer that reads hidden neurons uses the AWN triangle
  inside its level blocks (only the image-reading first layer is plain)."""
  with numpy_initializers(0):
    model = zoo.build_model(name, num_classes=10, input_shape=shape, num_levels=2, width=0.25, triangular=True)
  plain = []
  for unit_name, unit, hidden in linear_units(model):
    expected = brute_mask(unit.conn.in_sizes, unit.conn.out_sizes, hidden)
    if not np.array_equal(unit.conn.mask, expected):
      plain.append(unit_name)
  assert not plain, f'{name}: triangular=True is ignored by {plain}'
