"""Private exit heads (``model.exit_heads='private'``): exit k's own classifier over the
features of levels <= k.

References are independent: a numpy classifier per exit over the last hidden features
(with the kernel entries of higher-level features filled with noise, so a head that read
them would show), the layers' MAC count per level by hand, and an identity re-levelling.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from testlib import LENET3, images, numpy_initializers, poison, randomize

from stepnet_jax import config
from stepnet_jax.methods import trainers
from stepnet_jax.models import budgets, quantized, structure, surgery, zoo

SIZES = {'conv1': (3, 2, 3), 'conv2': (2, 0, 4), 'conv3': (2, 3, 2)}  # an empty level block in conv2


@pytest.fixture(scope='module')
def private():
  with numpy_initializers(1):
    model = zoo.build_model(
      'lenet3c1l',
      num_classes=5,
      input_shape=(16, 16, 1),
      num_levels=3,
      assignment=SIZES,
      exit_heads='private',
      mean=(0.3,),
      std=(0.2,),
      seed=1,
    )
  model = randomize(model, seed=2)
  rng = np.random.RandomState(3)
  model.head.kernel[...] = jnp.asarray(rng.normal(0, 0.3, model.head.kernel[...].shape), jnp.float32)  # noise
  model.head.bias[...] = jnp.asarray(rng.normal(0, 0.5, model.head.bias[...].shape), jnp.float32)  # everywhere
  return model


def _numpy_exits(model, x):
  """Exit k = bias_k + sum over positions and the features of levels <= k of x * W_k."""
  feats = np.asarray(model.features(model.normalize(x), model.top), np.float64)
  feats = feats.reshape(feats.shape[0], -1, feats.shape[-1])  # [B, S, C]
  w, b = np.asarray(model.head.kernel[...], np.float64), np.asarray(model.head.bias[...], np.float64)
  ends = np.cumsum(SIZES['conv3'])
  return np.stack([np.einsum('bsc,sco->bo', feats[..., :e], w[k, :, :e]) + b[k] for k, e in enumerate(ends)])


def test_private_exits_forward_and_steps_agree_with_numpy(private):
  model, x = private, images((16, 16, 1), batch=3, seed=4)
  want = _numpy_exits(model, x)
  np.testing.assert_allclose(np.asarray(model.exits(x)), want, rtol=1e-5, atol=1e-4)
  cache = model.start(x)
  for k in range(model.num_levels):
    if k:  # channels above level k-1 are NaN: exit k's head may read only what step k computed
      cache = model.step(poison(model, cache, k - 1), k)
    np.testing.assert_allclose(np.asarray(cache.logits), want[k], rtol=1e-5, atol=1e-4, err_msg=f'step {k}')
    np.testing.assert_allclose(np.asarray(model(x, k)), want[k], rtol=1e-5, atol=1e-4, err_msg=f'forward {k}')
  # stepping some rows replaces only their logits
  cache0 = model.start(x)
  rows = jnp.asarray([2, 0])
  part = model.step(cache0, 1, rows)
  np.testing.assert_allclose(np.asarray(part.logits)[[0, 2]], want[1][[0, 2]], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(part.logits)[1], want[0][1], rtol=1e-5, atol=1e-4)


def test_private_head_macs_count_every_exit_up_to_k(private):
  """Step k's head reads every feature of levels <= k: S x end_k x classes MACs; the
  construction's MAC model agrees with the layers' own count, level by level."""
  model = private
  head = model.delta_macs()[-1]
  spatial = 1  # 16 -> conv3 14 -> conv3 12 -> pool 6 -> conv5 2 -> pool 1: a 1x1 last map
  np.testing.assert_array_equal(head, spatial * 5 * np.cumsum(SIZES['conv3']))
  mm = budgets.MacModel.of(model)
  counts = [np.asarray(SIZES[n]) for n in LENET3]
  np.testing.assert_array_equal(mm.subnet_macs(counts), np.cumsum(model.delta_macs().sum(0)))
  shared = zoo.build_model('lenet3c1l', num_classes=5, input_shape=(16, 16, 1), num_levels=3, assignment=SIZES)
  np.testing.assert_array_equal(model.delta_macs()[:-1], shared.delta_macs()[:-1])  # only the head differs
  assert quantized.bitops(model, quantized.uniform_bits(model, 1), 1, input_bits=1)[-1].tolist() == head.tolist()


def test_relevel_and_restore_keep_private_heads(private):
  """Identity re-levelling gives the same exits; moving a last-layer neuron up takes it out
  of the lower exits' classifiers (their kernel entries zeroed); the meta rebuilds the kind."""
  model, x = private, images((16, 16, 1), batch=2, seed=5)
  meta = structure.model_meta(model, 'lenet3c1l', 5)
  assert meta['exit_heads'] == 'private' and structure.build_from_meta(meta).head.private
  levels = surgery.neuron_levels(model)
  same, _ = surgery.relevel(model, meta, levels)
  np.testing.assert_allclose(np.asarray(same.exits(x))[-1], np.asarray(model.exits(x))[-1], rtol=1e-5, atol=1e-4)
  moved = {k: v.copy() for k, v in levels.items()}
  moved['conv3'][0] = 2  # a level-0 feature moves to level 2
  new, _ = surgery.relevel(model, meta, moved)
  kernel = np.asarray(new.head.kernel[...])
  ends = np.cumsum(new.head.in_sizes)
  for k in range(3):
    assert not kernel[k, :, ends[k] :].any(), f'exit {k} keeps weights of higher-level features'


def test_private_heads_refuse_the_sandwich_rule():
  with pytest.raises(ValueError, match="needs model.exit_heads='shared'"):
    trainers.validate(
      config.from_dict(
        {
          'model': {'triangular': True, 'exit_heads': 'private'},
          'loss': {'objective': 'sandwich', 'sandwich_widths': 1},
        }
      )
    )
  with pytest.raises(ValueError, match='needs model.mask_rule=True'):
    trainers.validate(config.from_dict({'model': {'mask_rule': False, 'exit_heads': 'private'}}))
  with pytest.raises(ValueError, match='unknown model.exit_heads'):
    trainers.validate(config.from_dict({'model': {'exit_heads': 'own'}}))


def test_checkpoints_from_before_exit_heads_read_as_shared(private):
  """A model meta written before ``exit_heads`` existed describes a shared head: resuming
  such a run is not refused, and a private-head meta still differs from it."""
  meta = structure.model_meta(private, 'lenet3c1l', 5)
  older = {k: v for k, v in meta.items() if k != 'exit_heads'}
  assert structure.same_model(older, {**meta, 'exit_heads': 'shared'})
  assert not structure.same_model(older, meta)
  assert not structure.build_from_meta(older).head.private
