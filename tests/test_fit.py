"""The fit tier and the shared pieces under it: ``fit.fit``, the freeze-all-but optimizer
(``optim.train_only``), the one evaluation loop (``evaluation.accumulate``) and the one
jitted-exits builder (``stepping.jitted_exits``).

Each is checked against a second computation: Adam on the trained leaves alone, numpy on
the whole split at once, the leaves of the model before training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import testlib
from flax import nnx

from stepnet_jax.core import stepping
from stepnet_jax.data import feed
from stepnet_jax.inference import evaluation
from stepnet_jax.inference.stepper import Stepper
from stepnet_jax.training import fit, loop, losses, optim


def _data(n=70, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.randint(0, 256, (n,) + testlib.MNIST_SHAPE).astype(np.uint8)
  y = rng.randint(0, 10, n).astype(np.int32)
  return x, y


def _bn_affine(names) -> bool:
  return 'bn' in names and names[-1] in ('scale', 'bias')


def test_fit_with_a_frozen_selection_moves_only_the_rest_and_logs_each_window():
  """Only BN's scale and bias move (every other parameter bit-for-bit unchanged), the model
  given keeps its arrays, and the metrics have one row per logged window: every
  ``log_every_steps`` and at the last step."""
  model = nnx.clone(testlib.built_model('mlp'))
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  x, y = _data()
  steps, settings = 7, loop.LoopSettings(log_every_steps=3, progress=False, num_classes=10)
  trained, rows = fit.fit(
    model,
    optim.train_only(optax.adam(1e-2), _bn_affine),
    losses.multi_exit((1.0,) * model.num_levels),
    feed.training_batches(x, y, 16, seed=3, first=0, last=steps),
    steps,
    seed=0,
    settings=settings,
    desc='',
  )
  assert [r['step'] for r in rows] == [3, 6, 7]
  assert all({'train/loss', 'train/images_per_sec', 'train/accuracy/level0'} <= set(r) for r in rows)
  assert all(np.isfinite(r['train/loss']) for r in rows)
  after = dict(nnx.to_flat_state(nnx.state(trained, nnx.Param)))
  moved = set()
  for path, value in nnx.to_flat_state(before):
    if not np.array_equal(np.asarray(value[...]), np.asarray(after[path][...])):
      moved.add(path)
  assert moved and all(_bn_affine(path) for path in moved), moved
  assert {p[-1] for p in moved} == {'scale', 'bias'}
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model, nnx.Param)), before)


def test_train_only_gives_adam_on_the_trained_leaves_and_exact_zeros_elsewhere():
  """Over several steps the trained leaves get exactly the updates Adam gives them alone
  (no state, no influence from the frozen ones); the frozen leaves get exact zeros."""
  rng = np.random.RandomState(0)
  params = {'net': {'w': jnp.asarray(rng.randn(3, 4), jnp.float32)}, 'head': {'b': jnp.asarray(rng.randn(4))}}
  tx = optim.train_only(optax.adam(1e-2), lambda names: names[0] == 'head')
  alone = optax.adam(1e-2)
  state, alone_state, p, q = tx.init(params), alone.init(params['head']), params, params['head']
  for step in range(4):
    grads = jax.tree.map(lambda v, s=step: jnp.asarray(rng.randn(*v.shape), v.dtype) * (s + 1), params)
    updates, state = tx.update(grads, state, p)
    want, alone_state = alone.update(grads['head'], alone_state, q)
    np.testing.assert_array_equal(np.asarray(updates['head']['b']), np.asarray(want['b']))
    assert np.all(np.asarray(updates['net']['w']) == 0)
    p, q = optax.apply_updates(p, updates), optax.apply_updates(q, want)
  np.testing.assert_array_equal(np.asarray(p['net']['w']), np.asarray(params['net']['w']))


def test_accumulate_leaves_out_the_padding():
  """37 examples in batches of 10: the last batch is padded to 10, and neither the sums nor
  the per-example results count the padding (which here is not zero: ones and label + 1)."""
  x, y = _data(37, seed=4)
  calls = []

  def per_batch(batch):
    calls.append(batch.images.shape[0])
    pixels = batch.images.reshape(batch.images.shape[0], -1).astype(jnp.float32).sum(-1)
    return {'ones': jnp.ones((2, batch.images.shape[0]), jnp.int32), 'label': batch.labels + 1, 'pixels': pixels}

  sums = evaluation.accumulate(per_batch, x, y, 10, axis=-1)
  assert calls == [10, 10, 10, 10]
  np.testing.assert_array_equal(sums['ones'], [37, 37])
  assert sums['label'] == int((y + 1).sum())
  assert sums['pixels'].dtype == np.float64
  np.testing.assert_allclose(sums['pixels'], x.reshape(37, -1).astype(np.float64).sum(), rtol=1e-6)
  joined = evaluation.accumulate(per_batch, x, y, 10, axis=-1, concatenate=True)
  np.testing.assert_array_equal(joined['label'], y + 1)
  assert joined['ones'].shape == (2, 37)
  np.testing.assert_allclose(joined['pixels'], x.reshape(37, -1).astype(np.float64).sum(-1))


def test_one_jitted_exits_per_structure():
  """Equal structures share one jitted ``exits`` (one compilation per input shape), the
  ``Stepper``'s included."""
  model = testlib.built_model('mlp')
  graphdef, variables = nnx.split(model)
  fn = stepping.jitted_exits(graphdef)
  assert stepping.jitted_exits(nnx.graphdef(nnx.clone(model))) is fn
  assert Stepper(model).functions.exits is fn
  x, _ = _data(5)
  testlib.assert_close(fn(variables, jnp.asarray(x)), model.exits(jnp.asarray(x)))
