"""Exported steps run in order only: the cache carries its level, a step given another level's
cache poisons it (level -1, NaN logits: a compiled module cannot raise), and the Runner raises."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import stepnet_jax
from stepnet_jax.inference import export
from stepnet_jax.models import zoo


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  net = stepnet_jax.Stepper(zoo.build_model('mlp', num_classes=10, input_shape=(8, 8, 1), num_levels=3, width=0.125))
  directory = str(tmp_path_factory.mktemp('art'))
  export.save(net, directory, platforms=('cpu',))
  x = np.random.RandomState(0).randint(0, 256, (4, 8, 8, 1)).astype(np.uint8)
  return net, export.Runner(directory), x


def test_steps_in_order_match_the_library(exported):
  net, runner, x = exported
  exits = np.asarray(net.exits(jnp.asarray(x)))
  cache = runner.start(x)
  for k in range(net.num_levels):
    assert int(cache[0]) == k
    np.testing.assert_allclose(np.asarray(cache[-1]), exits[k], rtol=1e-5, atol=1e-5)
    if k + 1 < net.num_levels:
      cache = runner.advance(cache)


def test_a_skipped_or_repeated_step_is_an_error(exported):
  _, runner, x = exported
  level0 = runner.start(x)
  skipped = runner._steps[1].call(*level0)  # step 2 straight on level 0, as a device could call it
  assert int(skipped[0]) == -1 and np.isnan(np.asarray(skipped[-1])).all()
  after = runner._steps[0].call(*skipped)  # the poison stays
  assert int(after[0]) == -1 and np.isnan(np.asarray(after[-1])).all()
  with pytest.raises(ValueError, match='step 2 needs the cache of level 1; this cache holds level 0'):
    runner.step(level0, 2)
  level1 = runner.advance(level0)
  with pytest.raises(ValueError, match='step 1 needs the cache of level 0; this cache holds level 1'):
    runner.step(level1, 1)
  with pytest.raises(ValueError, match='this cache holds level -1'):
    runner.advance(skipped)


@pytest.mark.parametrize(
  'kwargs, match',
  [
    ({'format': 'tflite', 'selector': 'four levels'}, 'selector was made for 4 levels'),
    ({'format': 'tflite', 'batch': True}, "positive number of images or 'any'"),
    ({'format': 'tflite', 'batch': 0}, "positive number of images or 'any'"),
    ({'format': 'onnx', 'batch': 8}, "batch= fixes a LiteRT model's batch size"),
  ],
)
def test_bad_export_settings_are_refused_before_anything_is_written(exported, tmp_path, kwargs, match):
  """A selector for another number of levels, a batch that is no positive count (True
  included) or a batch for a format whose graphs take any: refused, the directory not made."""
  net = exported[0]
  if kwargs.get('selector'):
    kwargs = {**kwargs, 'selector': type('Selector', (), {'num_levels': 4})()}
  directory = tmp_path / 'out'
  with pytest.raises(ValueError, match=match):
    export.save(net, str(directory), **kwargs)
  assert not directory.exists()
