"""The training seam: one train step for every objective, the feed, the epoch order.

Each test checks the library against a second computation: XLA's FLOP count of a
deliberately wasteful objective, the loss recomputed from a direct (prefix) head in
numpy, numpy permutations, and accuracy counted by hand.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import testlib
from flax import nnx
from test_losses import reference_loss

from stepnet_jax import config
from stepnet_jax.data import datasets, feed
from stepnet_jax.inference import evaluation
from stepnet_jax.studies import bench
from stepnet_jax.training import loop, losses, optim, run
from stepnet_jax.training import step as step_lib

K = 4


def _model(width=0.25, num_levels=K, seed=0):
  return testlib.random_model('lenet3c1l', seed, num_levels=num_levels, width=width, mean=(0.3,), std=(0.3,))


def _batch(n=16, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.randint(0, 256, (n,) + testlib.MNIST_SHAPE).astype(np.uint8)
  y = rng.randint(0, 10, n).astype(np.int32)
  return next(feed.device_batches(x, y, [np.arange(n)]))


def _separate_passes(weights):
  """A wasteful objective with the same value as multi_exit: one train-mode forward per exit."""

  def objective(model, batch, rng):
    del rng
    x = model.normalize(batch.images)
    logits = jnp.stack([model.head(model.features(x, model.top, True), k) for k in range(model.num_levels)])
    loss, aux = losses.multi_exit_loss(logits, batch.labels, weights)
    return loss, {'logits': logits, **aux}

  return objective


def test_joint_step_costs_about_one_single_exit_step_in_compiled_flops():
  """All K exits from one pass: the joint train step's FLOPs are within 1.15x of training
  the top exit alone; computing the exits with K passes (same loss) would cost about Kx."""
  model, batch = _model(), _batch()
  tx = optax.adam(1e-3)
  graphdef, state = step_lib.init_state(model, tx)

  def flops(objective):
    return bench.compiled_flops(step_lib.make_train_step(graphdef, tx, objective), state, batch)

  joint = flops(losses.multi_exit((1.0,) * K))
  single = flops(losses.single_exit())
  wasteful = flops(_separate_passes((1.0,) * K))
  assert joint <= 1.15 * single, (joint, single)
  assert wasteful > 2.0 * single, (wasteful, single)  # the check can tell the two apart


def test_train_step_compiles_once():
  """make_train_step traces its step once: many steps on new batches of one shape, from the
  state init_state gives, reuse the program (chex.assert_max_traces on the objective, which
  the step calls once per trace)."""
  chex.clear_trace_counter()
  objective = testlib.traced_at_most(losses.multi_exit((1.0,) * K), lambda model, batch, rng: batch.images.shape[0])
  tx = optax.adam(1e-3)
  graphdef, state = step_lib.init_state(_model(), tx)
  train_step = step_lib.make_train_step(graphdef, tx, objective)
  for seed in range(4):
    state, metrics = train_step(state, _batch(seed=seed))
  assert int(state.step) == 4 and set(objective.traced) == {16}
  chex.assert_tree_all_finite(metrics)


def _train_mode_exits_by_hand(model, batch):
  """Train-mode (batch-statistics) logits of every exit through the head's direct prefix
  forward ``head(features[..., :end(k)], k)``, not the cumulative ``head.exits``."""
  m = nnx.clone(model)
  feats = m.features(m.normalize(batch.images), m.top, train=True)
  return np.stack([np.asarray(m.head(feats, k)) for k in range(m.num_levels)])


@pytest.mark.parametrize(
  'overrides',
  [
    {'loss.exit_weights': (0.0, 0.0, 0.0, 1.0)},
    {'loss.exit_weights': (3.0, 0.0, 1.0, 0.5)},
    {'loss.distill_weight': 0.5, 'loss.distill_temperature': 2.0},
  ],
)
def test_reported_loss_uses_the_configured_weights_and_distillation(overrides):
  """One step of the configured objective reports the loss recomputed in numpy from the
  same exits with the configured weights and distillation."""
  cfg = config.from_dict({'model.num_levels': K, **overrides})
  model, batch = _model(), _batch(seed=1)
  logits = _train_mode_exits_by_hand(model, batch)
  ref, ce, distill = reference_loss(
    logits, np.asarray(batch.labels), cfg.exit_weights, cfg.loss.distill_weight, cfg.loss.distill_temperature
  )
  tx = optim.make_optimizer(cfg, 10)
  graphdef, state = step_lib.init_state(model, tx)
  _, metrics = step_lib.make_train_step(graphdef, tx, losses.objective_for(cfg))(state, batch)
  np.testing.assert_allclose(float(metrics['loss']), ref, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(metrics['ce']), ce, rtol=2e-5)
  np.testing.assert_allclose(float(metrics['distill']), distill, rtol=2e-5, atol=1e-7)
  expected_acc = (logits.argmax(-1) == np.asarray(batch.labels)[None]).mean(1)
  np.testing.assert_array_equal(np.asarray(metrics['accuracy']), expected_acc)


def test_subnet_and_single_exit_objectives_are_one_cross_entropy():
  model, batch = _model(), _batch(seed=2)
  logits = _train_mode_exits_by_hand(model, batch)
  y = np.asarray(batch.labels)
  for k in (0, 2):
    loss, aux = losses.multi_exit((1.0,), levels=(k,))(nnx.clone(model), batch, None)
    np.testing.assert_allclose(float(loss), reference_loss(logits[k : k + 1], y, (1.0,), 0.0, 1.0)[0], rtol=2e-5)
    assert aux['logits'].shape == (1, 16, 10)
  loss, _ = losses.single_exit()(nnx.clone(model), batch, None)
  np.testing.assert_allclose(float(loss), reference_loss(logits[-1:], y, (1.0,), 0.0, 1.0)[0], rtol=2e-5)


class _Recorder:
  """A stand-in train step that records which examples (labels = their indices) it got."""

  def __init__(self):
    self.seen = []

  def __call__(self, state, batch):
    self.seen.append(np.asarray(batch.labels))
    return state, {'loss': jnp.zeros(()), 'accuracy': jnp.zeros((1,))}


def test_each_epoch_has_its_own_permutation():
  """The examples of global step s are batch s % spe of epoch s // spe's order, which is
  np.random.RandomState(seed + epoch).permutation(n): a new order every epoch."""
  n, batch_size, seed, epochs = 70, 16, 5, 3
  spe = n // batch_size
  images = np.zeros((n, 8, 8, 1), np.uint8)
  ds = datasets.Dataset('ids', images, np.arange(n, dtype=np.int32), images[:1], np.zeros(1, np.int32), 10)
  cfg = config.from_dict(
    {'seed': seed, 'train.batch_size': batch_size, 'train.progress': False, 'train.log_every_steps': 1000}
  )
  rec = _Recorder()
  settings = loop.LoopSettings.from_config(cfg, ds.num_classes)
  batches = run.training_batches(cfg, ds, 0, epochs * spe, spe)
  loop.run_steps(None, rec, batches, settings, first=0, last=epochs * spe, writer=None, desc='')
  assert len(rec.seen) == epochs * spe
  orders = []
  for e in range(epochs):
    perm = np.random.RandomState(seed + e).permutation(n)
    for i in range(spe):
      np.testing.assert_array_equal(rec.seen[e * spe + i], np.sort(perm[i * batch_size : (i + 1) * batch_size]))
    epoch = np.concatenate(rec.seen[e * spe : (e + 1) * spe])
    assert len(set(epoch.tolist())) == spe * batch_size  # no example twice in an epoch
    orders.append(epoch)
  assert not any(np.array_equal(orders[a], orders[b]) for a in range(epochs) for b in range(a))
  # A run resumed at step 5 sees exactly the batches an uninterrupted run sees from there.
  resumed = _Recorder()
  batches = run.training_batches(cfg, ds, 5, epochs * spe, spe)
  loop.run_steps(None, resumed, batches, settings, first=5, last=epochs * spe, writer=None, desc='')
  for a, b in zip(resumed.seen, rec.seen[5:]):
    np.testing.assert_array_equal(a, b)


def test_a_nan_loss_stops_the_loop_naming_the_step_and_the_exit_before_any_save():
  """A train step whose loss turns NaN at step 2 (exit 1's cross-entropy NaN; exit 0 finite),
  with a checkpoint due at that very step: run_steps raises naming step 2 and exit 1, and the
  checkpoint function is never called."""
  saved = []

  def step(state, batch):
    ce = jnp.asarray([0.5, jnp.nan if state == 1 else 0.4])
    return state + 1, {'loss': ce.sum(), 'ce': ce, 'accuracy': jnp.zeros((2,))}

  settings = loop.LoopSettings(log_every_steps=5, checkpoint_every_steps=2, progress=False)
  batches = (feed.Batch(jnp.zeros((4, 8, 8, 1), jnp.uint8), jnp.zeros((4,), jnp.int32), 4) for _ in range(10))
  with pytest.raises(FloatingPointError, match=r'loss became nan at step 2: exit\(s\) \[1\] have a non-finite'):
    loop.run_steps(0, step, batches, settings, first=0, last=10, writer=None, desc='', checkpoint=saved.append)
  assert saved == []


def test_exit_accuracy_pads_the_last_batch_and_does_not_count_the_padding():
  model = _model(num_levels=3)
  graphdef, variables = nnx.split(model)
  rng = np.random.RandomState(3)
  x = rng.randint(0, 256, (37,) + testlib.MNIST_SHAPE).astype(np.uint8)
  y = rng.randint(0, 10, 37).astype(np.int32)
  shapes = []

  def exits(v, images):
    shapes.append(images.shape[0])
    return nnx.merge(graphdef, v).exits(images)

  got = evaluation.exit_accuracy(exits, variables, x, y, batch_size=10)
  assert shapes == [10, 10, 10, 10]  # 37 = 3 x 10 + 7 padded to 10
  logits = np.asarray(model.exits(jnp.asarray(x)))
  by_hand = (logits.argmax(-1) == y[None]).mean(axis=1)
  np.testing.assert_allclose(got, by_hand)
  # The cross-entropy of every exit, padding left out, against optax on the whole split at once.
  metrics = evaluation.exit_metrics(exits, variables, x, y, batch_size=10)
  np.testing.assert_allclose(metrics['accuracy'], by_hand)
  ce = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(y)[None]).mean(axis=1)
  np.testing.assert_allclose(metrics['loss'], np.asarray(ce), rtol=1e-5)
  # A predictor that answers 0 for everything, padding included, on labels all 0: exactly 1.
  always_zero = lambda v, images: jnp.zeros((2, images.shape[0], 10)).at[..., 0].set(1.0)
  np.testing.assert_array_equal(evaluation.exit_accuracy(always_zero, None, x, np.zeros(37, np.int32), 10), [1, 1])
  # A split smaller than one batch is one batch of its own size.
  shapes.clear()
  evaluation.exit_accuracy(exits, variables, x[:7], y[:7], batch_size=10)
  assert shapes == [7]


def test_feed_pads_with_zeros_and_counts_real_examples():
  x = np.arange(5 * 2 * 2 * 1, dtype=np.uint8).reshape(5, 2, 2, 1) + 1
  y = np.arange(5, dtype=np.int32) + 1
  batches = list(feed.device_batches(x, y, [np.array([4, 0, 2]), np.array([1])], pad_to=3))
  assert [b.count for b in batches] == [3, 1]
  np.testing.assert_array_equal(batches[0].images, x[[4, 0, 2]])
  np.testing.assert_array_equal(batches[1].images, np.concatenate([x[[1]], np.zeros((2, 2, 2, 1), np.uint8)]))
  np.testing.assert_array_equal(batches[1].labels, [2, 0, 0])
  assert isinstance(batches[0].images, jax.Array)
