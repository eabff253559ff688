"""multi_exit_loss against a hand-written numpy computation, and one-pass exits."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testlib import assert_close, built_model, bundle

from stepnet_jax import config
from stepnet_jax.training import losses


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def reference_loss(logits, labels, weights, distill_weight, t):
  logits = np.asarray(logits, np.float64)
  k, b, _ = logits.shape
  ce = np.array([np.mean([-_log_softmax(logits[j, n])[labels[n]] for n in range(b)]) for j in range(k)])
  w = np.asarray(weights, np.float64)
  loss = (w * ce).sum() / w.sum()
  distill = 0.0
  if distill_weight and k > 1:
    p = np.exp(_log_softmax(logits[-1] / t))
    kls = []
    for j in range(k - 1):
      q = _log_softmax(logits[j] / t)
      kls.append(np.mean(np.sum(p * (np.log(p) - q), axis=-1)))
    distill = t * t * np.mean(kls)
    loss += distill_weight * distill
  return loss, ce, distill


@pytest.mark.parametrize(
  'weights,distill_weight,t',
  [
    ((1.0, 1.0, 1.0), 0.0, 1.0),
    ((0.2, 0.5, 2.0), 0.0, 1.0),
    ((1.0, 1.0, 1.0), 0.7, 4.0),
    ((0.0, 1.0, 3.0), 1.5, 2.0),
  ],
)
def test_multi_exit_loss_matches_numpy(weights, distill_weight, t):
  rng = np.random.RandomState(0)
  logits = rng.normal(0, 3, (3, 6, 5)).astype(np.float32)
  labels = rng.randint(0, 5, 6)
  loss, aux = losses.multi_exit_loss(jnp.asarray(logits), jnp.asarray(labels), weights, distill_weight, t)
  ref, ce, distill = reference_loss(logits, labels, weights, distill_weight, t)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(aux['ce']), ce, rtol=1e-5)
  np.testing.assert_allclose(float(aux['distill']), distill, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('weights,t', [((1.0, 1.0, 1.0), 1.0), ((0.5, 2.0, 1.5), 3.0)])
def test_in_place_distillation_replaces_the_lower_exits_labels(weights, t):
  """mode 'replace': (w_top CE_top + sum_k w_k T^2 KL_k) / sum w, by numpy; the top exit's
  gradient is its own weighted cross-entropy's only (the teacher is held fixed)."""
  rng = np.random.RandomState(3)
  logits = rng.normal(0, 3, (3, 6, 5)).astype(np.float32)
  labels = rng.randint(0, 5, 6)
  loss, aux = losses.multi_exit_loss(jnp.asarray(logits), jnp.asarray(labels), weights, 0.0, t, 'replace')
  _, ce, _ = reference_loss(logits, labels, weights, 0.0, t)
  p = np.exp(_log_softmax(np.asarray(logits[-1], np.float64) / t))
  kls = [
    t * t * np.mean(np.sum(p * (np.log(p) - _log_softmax(np.asarray(logits[j], np.float64) / t)), -1)) for j in range(2)
  ]
  w = np.asarray(weights)
  np.testing.assert_allclose(float(loss), (w[0] * kls[0] + w[1] * kls[1] + w[2] * ce[2]) / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(aux['distill']), np.mean(kls), rtol=1e-5)
  grad = jax.grad(lambda z: losses.multi_exit_loss(z, jnp.asarray(labels), weights, 0.0, t, 'replace')[0])(
    jnp.asarray(logits)
  )
  top_ce = jax.grad(lambda z: w[2] / w.sum() * losses.multi_exit_loss(z[None], jnp.asarray(labels), (1.0,))[0])(
    jnp.asarray(logits[-1])
  )
  assert_close(grad[-1], top_ce)
  with pytest.raises(ValueError, match='unknown distillation mode'):
    losses.multi_exit_loss(jnp.asarray(logits), jnp.asarray(labels), weights, 0.0, t, 'mix')


@pytest.mark.parametrize('e', [0.1, 0.4])
def test_label_smoothing_mixes_the_labels_with_the_uniform_distribution(e):
  """CE against (1 - e) one_hot + e / C, written out in numpy per example: (1 - e) times the
  label's -log p plus e times the mean over classes of -log p; the config's objective and
  the non-uniform baseline's per-subnet objective take the config's e."""
  rng = np.random.RandomState(5)
  logits = rng.normal(0, 3, (3, 6, 5)).astype(np.float32)
  labels = rng.randint(0, 5, 6)
  logp = np.stack([[_log_softmax(np.asarray(logits[j, n], np.float64)) for n in range(6)] for j in range(3)])
  ce = np.array(
    [np.mean([-(1 - e) * logp[j, n, labels[n]] - e * logp[j, n].mean() for n in range(6)]) for j in range(3)]
  )
  weights = (0.5, 1.0, 2.0)
  loss, aux = losses.multi_exit_loss(jnp.asarray(logits), jnp.asarray(labels), weights, label_smoothing=e)
  np.testing.assert_allclose(np.asarray(aux['ce']), ce, rtol=1e-5)
  np.testing.assert_allclose(float(loss), (np.asarray(weights) * ce).sum() / sum(weights), rtol=1e-5)
  for bad in (-0.1, 1.0):
    with pytest.raises(ValueError, match='label_smoothing'):
      losses.multi_exit_loss(jnp.asarray(logits), jnp.asarray(labels), weights, label_smoothing=bad)
    with pytest.raises(ValueError, match='loss.label_smoothing'):
      config.from_dict(config.merge(config.base_config().to_dict(), {'loss': {'label_smoothing': bad}}))

  class Exits:  # a model whose exits are the logits above
    def exits(self, images, train, levels=None):
      return jnp.asarray(logits if levels is None else logits[np.asarray(levels)])

  batch = types.SimpleNamespace(images=None, labels=jnp.asarray(labels))
  cfg = config.from_dict(
    config.merge(
      config.base_config().to_dict(),
      {'model': {'num_levels': 3}, 'loss': {'exit_weights': weights, 'label_smoothing': e}},
    )
  )
  loss_cfg, _ = losses.objective_for(cfg)(Exits(), batch, None)
  np.testing.assert_allclose(float(loss_cfg), (np.asarray(weights) * ce).sum() / sum(weights), rtol=1e-5)
  loss_1, _ = losses.subnets_for(cfg, (1,))(Exits(), batch, None)
  np.testing.assert_allclose(float(loss_1), ce[1], rtol=1e-5)
  loss_02, _ = losses.subnets_for(cfg, (0, 2))(Exits(), batch, None)
  np.testing.assert_allclose(float(loss_02), (0.5 * ce[0] + 2.0 * ce[2]) / 2.5, rtol=1e-5)


def test_single_exit_distillation_is_zero():
  logits = jnp.asarray(np.random.RandomState(1).normal(size=(1, 4, 3)), jnp.float32)
  labels = jnp.asarray([0, 1, 2, 0])
  loss, aux = losses.multi_exit_loss(logits, labels, (1.0,), 1.0, 2.0)
  ref, _, _ = reference_loss(logits, np.asarray(labels), (1.0,), 0.0, 1.0)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  assert float(aux['distill']) == 0.0


def test_wrong_number_of_weights_raises():
  with pytest.raises(ValueError):
    losses.multi_exit_loss(jnp.zeros((3, 2, 4)), jnp.zeros((2,), jnp.int32), (1.0, 1.0))


def test_teacher_gets_no_gradient_from_distillation():
  rng = np.random.RandomState(2)
  logits = jnp.asarray(rng.normal(0, 2, (4, 5, 6)), jnp.float32)
  labels = jnp.asarray(rng.randint(0, 6, 5))
  w = (1.0, 1.0, 1.0, 1.0)

  def distill_only(z):
    return losses.multi_exit_loss(z, labels, w, 1.0, 3.0)[1]['distill']

  g = np.asarray(jax.grad(distill_only)(logits))
  assert np.all(g[-1] == 0.0)
  # In the total loss, the top exit's gradient is its cross-entropy gradient alone.
  g_total = np.asarray(jax.grad(lambda z: losses.multi_exit_loss(z, labels, w, 1.0, 3.0)[0])(logits))
  g_ce = np.asarray(jax.grad(lambda z: losses.multi_exit_loss(z, labels, w, 0.0, 3.0)[0])(logits))
  np.testing.assert_allclose(g_total[-1], g_ce[-1], rtol=1e-5, atol=1e-7)
  assert np.all(np.abs(g[:-1]).sum(axis=(1, 2)) > 0)
  # The student gradient of T^2 * mean_k mean_b KL: T * (softmax(z_k/T) - softmax(z_top/T)) / (B (K-1)).
  t, b, k = 3.0, 5, 4
  z = np.asarray(logits, np.float64)
  p = np.exp(_log_softmax(z[-1] / t))
  for j in range(k - 1):
    q = np.exp(_log_softmax(z[j] / t))
    np.testing.assert_allclose(g[j], t * (q - p) / (b * (k - 1)), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('spec_id', ['lenet3c1l_tri', 'resnet20'])
def test_one_pass_exits_equal_separate_masked_forwards(spec_id):
  """exits(x) (one full-width pass) == [model(x, k) for each k] (K separate prefix forwards)."""
  b = bundle(spec_id)
  model = built_model(spec_id)
  exits = np.asarray(b['exits'])
  assert exits.shape[0] == model.num_levels
  for k in range(model.num_levels):
    assert_close(exits[k], b['forward'][k])
  assert not np.allclose(exits[0], exits[-1])


def test_exit_reduction_sum_adds_the_weighted_cross_entropies_in_every_objective():
  """loss.exit_reduction='sum': sum_k w_k CE_k without dividing by sum_k w_k (numpy), in the
  config's multi-exit objective, the sandwich objective (its 2 + n subnets) and the
  non-uniform baseline's subnet objective; an unknown reduction is refused."""
  rng = np.random.RandomState(7)
  logits = rng.normal(0, 3, (3, 6, 5)).astype(np.float32)
  extra = rng.normal(0, 3, (2, 6, 5)).astype(np.float32)  # the sandwich's random widths
  labels = rng.randint(0, 5, 6)
  ce = lambda z: np.mean([-_log_softmax(np.asarray(z[n], np.float64))[labels[n]] for n in range(6)])
  weights = (0.5, 1.0, 2.0)

  class Exits:  # a model whose exits (and sandwich widths) are the logits above
    head = types.SimpleNamespace(in_sizes=(2, 2, 2))

    def exits(self, images, train, levels=None):
      return jnp.asarray(logits if levels is None else logits[np.asarray(levels)])

    def sandwich_exits(self, images, widths, train):
      return jnp.asarray(logits), jnp.asarray(extra[: len(widths)])

  batch = types.SimpleNamespace(images=None, labels=jnp.asarray(labels))
  cfg = config.from_dict(
    config.merge(
      config.base_config().to_dict(),
      {'model': {'num_levels': 3}, 'loss': {'exit_weights': weights, 'exit_reduction': 'sum'}},
    )
  )
  loss, _ = losses.objective_for(cfg)(Exits(), batch, None)
  np.testing.assert_allclose(float(loss), sum(w * ce(z) for w, z in zip(weights, logits)), rtol=1e-5)
  loss, _ = losses.subnets_for(cfg, (0, 2))(Exits(), batch, None)
  np.testing.assert_allclose(float(loss), 0.5 * ce(logits[0]) + 2.0 * ce(logits[2]), rtol=1e-5)
  sandwich = cfg.replace(**{'loss.objective': 'sandwich', 'loss.sandwich_widths': 2})
  loss, _ = losses.objective_for(sandwich)(Exits(), batch, jax.random.key(0))
  expected = ce(logits[0]) + ce(extra[0]) + ce(extra[1]) + ce(logits[-1])
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  with pytest.raises(ValueError, match='loss.exit_reduction'):
    cfg.replace(**{'loss.exit_reduction': 'max'})
