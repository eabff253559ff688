"""Incremental inference: stepping 0 -> K-1 reproduces every subnet's direct forward.

For every model (random level sizes, triangles, empty levels, ResNet, VGG): the logits
after step k equal the masked-prefix forward at level k and exit k of the one-pass
forward (the numpy references of test_api check those); stepping starts from buffers
full of NaN, so a step that read a channel it had not computed would show; and the
cache holds exactly the channels of levels <= k (the upper ones are never computed).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testlib import (
  SPEC_BY_ID,
  SPEC_IDS,
  assert_close,
  block_end,
  built_model,
  bundle,
  images,
  numpy_initializers,
  poison,
  traced_at_most,
  unit_buffer,
)

import stepnet_jax
from stepnet_jax.core import stepping
from stepnet_jax.models import zoo
from stepnet_jax.studies import bench

RTOL, ATOL = 1e-5, 1e-4


@pytest.fixture(scope='module')
def net():
  """One Stepper (and its jitted functions) shared by the tests of this module."""
  return stepnet_jax.Stepper(built_model('lenet3c1l_tri'))


@pytest.mark.parametrize('spec_id', SPEC_IDS)
def test_stepping_matches_direct_forward_and_exits(spec_id):
  spec = SPEC_BY_ID[spec_id]
  model = built_model(spec_id)
  b = bundle(spec_id)
  exits = b['exits']
  chex.assert_shape(exits, (spec.num_levels, 4, spec.num_classes))
  full_units = b['prefix_units'][-1]
  for k in range(spec.num_levels):
    logits = b['step_logits'][k]
    assert b['step_levels'][k] == k
    chex.assert_shape(logits, (4, spec.num_classes))
    assert_close(logits, exits[k], RTOL, ATOL, err_msg=f'{spec_id}: step {k} vs exits[{k}]')
    assert_close(logits, b['forward'][k], RTOL, ATOL, err_msg=f'{spec_id}: step {k} vs forward')
    # forward_blocked (steps 0..k fused) against the masked forward, an independent path.
    assert_close(b['blocked'][k], b['forward'][k], RTOL, ATOL, err_msg=f'{spec_id}: forward_blocked {k}')
    # The cache holds the level <= k channels of every unit; the rest is still the NaN
    # the buffers started with (never computed, never read: the logits are finite).
    chex.assert_tree_all_finite(logits)
    units = b['step_units'][k]
    chex.assert_trees_all_equal_shapes(units, full_units)
    ends = [block_end(unit.conn.out_sizes, k) for unit in model.units]
    assert_close([u[..., :e] for u, e in zip(units, ends)], [f[..., :e] for f, e in zip(full_units, ends)], RTOL, ATOL)
    assert all(np.isnan(u[..., e:]).all() for u, e in zip(units, ends)), (
      f'{spec_id}: channels above level {k} were computed'
    )


def test_stepping_separately_compiled_functions(net):
  """The library's own jitted start/advance/forward/forward_blocked, called one by one."""
  spec_id = 'lenet3c1l_tri'
  b = bundle(spec_id)
  fns, v, x = net.functions, net.variables, b['x']
  cache = fns.start(v, x)
  for k in range(SPEC_BY_ID[spec_id].num_levels):
    if k:
      cache = fns.advance(v, cache)
    assert cache.level == k
    assert_close(cache.logits, b['exits'][k], RTOL, ATOL)
    assert_close(fns.forward(v, x, level=k), b['exits'][k], RTOL, ATOL)
    assert_close(fns.forward_blocked(v, x, level=k), b['exits'][k], RTOL, ATOL)
    assert_close(fns.forward_fastest(v, x, k), b['exits'][k], RTOL, ATOL)
  assert_close(fns.exits(v, x), b['exits'], RTOL, ATOL)


@pytest.mark.parametrize('spec_id', ['lenet3c1l', 'resnet20'])
def test_stepping_some_rows_leaves_the_others(spec_id):
  """``step(cache, k, rows)`` (the compact strategy's step) computes level k of the rows
  ``rows`` exactly as stepping the whole batch does, and leaves every other row as it was
  (its channels above level 0 stay the NaN they started as)."""
  spec = SPEC_BY_ID[spec_id]
  b = bundle(spec_id)
  graphdef, v, x = b['graphdef'], b['variables'], b['x']
  rows = np.asarray([2, 0])
  others = np.asarray([1, 3])

  @jax.jit
  def stepped(v, x):
    m = nnx.merge(graphdef, v, copy=True)
    cache = poison(m, m.start(x), 0)
    out = []
    for k in range(1, spec.num_levels):
      cache = m.step(cache, k, jnp.asarray(rows))
      out.append(
        (
          cache.logits,
          [unit_buffer(c) for c in cache.units],
          [c[0] if isinstance(c, tuple) else None for c in cache.units],
        )
      )
    return out

  model = built_model(spec_id)
  for k, (logits, units, inners) in enumerate(jax.device_get(stepped(v, x)), start=1):
    assert_close(logits[rows], b['step_logits'][k][rows], RTOL, ATOL, err_msg=f'{spec_id}: level {k}')
    assert_close(logits[others], b['step_logits'][0][others], RTOL, ATOL)
    for unit, buf, ref in zip(model.units, units, b['step_units'][k]):
      e0, e = block_end(unit.conn.out_sizes, 0), block_end(unit.conn.out_sizes, k)
      assert_close(buf[rows][..., :e], ref[rows][..., :e], RTOL, ATOL)
      assert np.isnan(buf[others][..., e0:]).all(), f'{spec_id}: level {k} wrote a row it was not given'
    for unit, inner in zip(model.units, inners):
      if inner is not None:  # a residual block's inner activation
        e0 = block_end(unit.conv1.conn.out_sizes, 0)
        assert np.isnan(inner[others][..., e0:]).all(), f'{spec_id}: level {k} wrote an inner row it was not given'


# ------------------------------------------------------------------ one small model


@pytest.fixture(scope='module')
def small():
  model = built_model('lenet3c1l')
  graphdef, variables = stepping.split(model)
  return model, graphdef, variables


def test_step_functions_compile_once_per_level_and_batch_size(small, monkeypatch):
  """Each jitted step function traces each level once per batch size: new images and new
  parameter values of the same shapes reuse its program (chex.assert_max_traces on the pure
  functions the library jits)."""
  model, graphdef, variables = small
  k_levels = model.num_levels
  chex.clear_trace_counter()
  start = traced_at_most(stepping.start, lambda graphdef, variables, x: x.shape[0])
  restart = traced_at_most(stepping.restart, lambda graphdef, variables, cache, x: x.shape[0])
  # Level k is traced twice per batch size: once by levels[k], once by advance (on cache.level).
  step = traced_at_most(stepping.step, lambda graphdef, variables, cache, level: (level, cache.logits.shape[0]), n=2)
  advance = traced_at_most(
    stepping.advance, lambda graphdef, variables, cache: (cache.level + 1, cache.logits.shape[0])
  )
  for name, fn in dict(start=start, restart=restart, step=step, advance=advance).items():
    monkeypatch.setattr(stepping, name, fn)
  fns = stepping.make_step_functions(graphdef, k_levels)
  batches = (4, 2)
  for seed in range(3):
    for batch in batches:
      x = images(model.input_shape, batch=batch, seed=seed)
      v = jax.tree.map(lambda a: a * (1.0 + 0.01 * seed), variables)
      cache = fns.levels[0](v, x)
      for k in range(1, k_levels):
        cache = fns.levels[k](v, cache)
      cache = fns.start(v, x)
      for k in range(1, k_levels):
        cache = fns.advance(v, cache)
        assert cache.level == k
      cache = fns.restart(v, cache, images(model.input_shape, batch=batch, seed=seed + 10))
      assert cache.level == 0
  assert set(start.traced) == set(restart.traced) == set(batches)
  assert set(step.traced) == set(advance.traced) == {(k, b) for k in range(1, k_levels) for b in batches}


def test_stepping_out_of_order_raises(net):
  model = built_model('lenet3c1l_tri')
  fns, v = net.functions, net.variables
  x = images(model.input_shape, batch=4)
  cache0 = fns.start(v, x)
  with pytest.raises(ValueError):
    fns.levels[2](v, cache0)  # skips level 1
  with pytest.raises(ValueError):
    model.step(model.init_cache(x), 1)  # nothing computed yet
  cache1 = fns.levels[1](v, cache0)
  with pytest.raises(ValueError):
    fns.levels[1](v, cache1)  # repeats level 1
  with pytest.raises(ValueError):
    model.step(cache1, 1)
  top = fns.advance(v, cache1)
  assert top.level == model.num_levels - 1
  with pytest.raises(ValueError):
    fns.advance(v, top)  # past the top level
  with pytest.raises(ValueError):
    model.step(top, model.num_levels)


def test_stepper_advance_past_top_raises(net):
  x = images((28, 28, 1), batch=4)
  cache = net.start(x)
  levels = [cache.level]
  while cache.level < net.num_levels - 1:
    cache = net.advance(cache)
    levels.append(cache.level)
  assert levels == list(range(net.num_levels))
  with pytest.raises(ValueError):
    net.advance(cache)
  with pytest.raises(ValueError):
    net.forward(x, net.num_levels)
  with pytest.raises(ValueError):
    net.forward(x, -1)


@pytest.mark.parametrize('exit_heads', ['shared', 'private'])
def test_step_k_costs_only_level_k_macs(exit_heads):
  """XLA's cost analysis of compiled step k ~ 2 * delta MACs of level k (not the cumulative).

  With private heads, delta MACs include exit k's whole classifier, which step k computes.
  Batch 1: XLA:CPU may lower a batched convolution to a while loop over the batch, whose
  body cost analysis counts once.
  """
  with numpy_initializers(0):
    model = zoo.build_model('lenet3c1l', num_classes=10, input_shape=(28, 28, 1), num_levels=4, exit_heads=exit_heads)
  graphdef, variables = stepping.split(model)
  delta = model.delta_macs().sum(axis=0)
  for k, flops in enumerate(bench.step_flops(graphdef, variables, images((28, 28, 1), batch=1), 4)):
    ratio = flops / (2.0 * delta[k])
    assert 0.9 <= ratio <= 1.2, f'level {k}: flops / (2 * delta MACs) = {ratio:.3f}'
    if k:
      assert flops < 0.7 * 2.0 * delta[: k + 1].sum()


# ------------------------------------------------------------------ composing with JAX transformations


def test_jit_from_outside(net):
  x = images((28, 28, 1), batch=4, seed=2)

  @jax.jit
  def two_levels(x):
    c = net.start(x)
    c = net.advance(c)
    return c.logits, c.level

  logits, level = two_levels(x)
  assert int(level) == 1
  assert_close(logits, net.forward(x, 1), RTOL, ATOL)
  assert_close(jax.jit(lambda x: net.exits(x))(x), net.exits(x), RTOL, ATOL)


def test_vmap_from_outside(net):
  x = images((28, 28, 1), batch=3, seed=3)
  per_image = jax.vmap(lambda xi: net.advance(net.start(xi[None])).logits[0])(x)
  assert_close(per_image, net.advance(net.start(x)).logits, RTOL, ATOL)
  # vmap over a leading "request" axis of whole batches.
  xs = jnp.stack([x, x[::-1]])
  batched = jax.vmap(lambda b: net.start(b).logits)(xs)
  assert_close(batched[0], net.start(x).logits, RTOL, ATOL)
  assert_close(batched[1], net.start(x[::-1]).logits, RTOL, ATOL)


def test_export_start(net):
  x = images((28, 28, 1), batch=2, seed=4)
  fn = jax.jit(lambda x: net.start(x).logits)
  exported = jax.export.export(fn)(jax.ShapeDtypeStruct(x.shape, x.dtype))
  assert_close(exported.call(x), net.start(x).logits, RTOL, ATOL)
  restored = jax.export.deserialize(exported.serialize())  # needs flatbuffers (a test dependency)
  assert_close(restored.call(x), net.start(x).logits, RTOL, ATOL)
  # Shape-polymorphic batch.
  (b,) = jax.export.symbolic_shape('b')
  poly = jax.export.export(fn)(jax.ShapeDtypeStruct((b,) + x.shape[1:], x.dtype))
  for n in (1, 3):
    xn = images((28, 28, 1), batch=n, seed=5 + n)
    assert_close(poly.call(xn), net.start(xn).logits, RTOL, ATOL)
  # And the next step, exported separately from a concrete cache.
  cache = net.start(x)
  step1 = jax.export.export(jax.jit(lambda c: net.advance(c).logits))(cache)
  assert_close(step1.call(cache), net.forward(x, 1), RTOL, ATOL)


# ------------------------------------------------------------------ cache reuse


@pytest.mark.parametrize('spec_id', ['lenet3c1l_tri', 'resnet20_width'])
def test_restart_reuses_a_full_cache_for_new_images(spec_id, net):
  """restart(cache_of_x1_at_top, x2) then advancing gives exactly the subnets of x2: the stale
  x1 channels of higher levels left in the buffers are never read."""
  if spec_id != 'lenet3c1l_tri':
    net = stepnet_jax.Stepper(built_model(spec_id))
  shape = SPEC_BY_ID[spec_id].input_shape
  x1, x2 = images(shape, batch=3, seed=31), images(shape, batch=3, seed=32)
  expected = np.asarray(net.exits(x2))
  assert not np.allclose(expected, np.asarray(net.exits(x1)))
  cache = net.start(x1)
  while cache.level < net.num_levels - 1:
    cache = net.advance(cache)
  cache = net.restart(cache, x2)
  for k in range(net.num_levels):
    if k:
      cache = net.advance(cache)
    assert cache.level == k
    assert_close(cache.logits, expected[k], RTOL, ATOL, err_msg=f'{spec_id}: level {k} after restart')


def test_advance_consumes_the_cache(net):
  """Stepping donates the old cache's buffers to the new one (documented: do not reuse it)."""
  x = images((28, 28, 1), batch=2, seed=33)
  old = net.start(x)
  logits0 = np.asarray(old.logits)
  new = net.advance(old)
  assert all(buf.is_deleted() for buf in jax.tree.leaves(old.units))
  assert not any(buf.is_deleted() for buf in jax.tree.leaves(new.units))
  assert_close(logits0, net.exits(x)[0], RTOL, ATOL)
