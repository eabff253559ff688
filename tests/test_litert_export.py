"""The LiteRT (TFLite) export: exported networks run by LiteRT in a process that imports
neither JAX, TensorFlow nor the library, against the library's logits and stopping."""

import jax
import numpy as np
import pytest
import testlib

pytest.importorskip('tensorflow')
pytest.importorskip('ai_edge_litert')

from stepnet_jax.inference import export, policies  # noqa: E402

RNG = np.random.RandomState(1)
FIXED = 'resnet20'  # exported for a fixed batch of 5 (the others: any batch size)
BATCH = 5  # predict's 12 images then make batches of 5, 5 and 2 (+3 copies of the first)

HOST_CHECK = testlib.device_script(
  'anytime_litert',
  """
  out[name]['batch'] = net.batch
  for label, call in (('repeated', lambda: net.advance(cache)), ('wrong_batch', lambda: net.start(ref['images']))):
    try:
      call()
    except ValueError as e:
      out[name][label] = str(e)
  if 'budgets' in ref:
    policies = {'budgets': ax.MacBudget(ref['budgets'], net.macs_to_reach)}
    if 'confidence' in ref:
      policies.update(confidence=ax.Confidence(float(ref['confidence'])), learned=ax.Learned(d + '/selector.npz'))
    for label, policy in policies.items():
      pred = net.predict(ref['images'], policy)
      rows = np.arange(len(ref['images']))
      out[name][label] = [pred.exit_level.tolist(), pred.macs.tolist(),
                          float(np.abs(pred.logits - ref['exits'][pred.exit_level, rows]).max())]
""",
)


def test_litert_exports_match_the_library_in_a_process_without_jax_or_tensorflow(tmp_path):
  """LeNet-3C1L and a quantized LeNet exported as LiteRT models for any batch size, and a
  ResNet-20 for batches of exactly 5: LiteRT, from a Python that imports neither jax,
  TensorFlow nor stepnet_jax, gives the library's logits at every level by stepping and by
  the direct forwards; ``predict`` over 12 images stops each where the library's ``predict``
  does, gathering the rows still going (LeNet: a confidence threshold, per-input MAC
  budgets, a learned selector) or in batches of 5, 5 and 2 padded (ResNet-20: budgets)."""
  directories, expected, macs_to_reach = {}, {}, {}
  for name, net in testlib.export_networks(RNG).items():
    d = directories[name] = str(tmp_path / name)
    selector = None
    if name == 'lenet3c1l':
      selector = policies.Learned(
        policies.init_selector(jax.random.key(3), 10, net.num_levels) | {'w2': RNG.randn(32).astype(np.float32)},
        num_levels=net.num_levels,
      )
    batch = BATCH if name == FIXED else 'any'
    manifest = export.save(net, d, format='tflite', batch=batch, selector=selector)
    assert manifest['batch'] == (BATCH if name == FIXED else None) and manifest['runner'] == 'anytime_litert.py'
    assert manifest['macs_to_reach'] == list(net.macs_to_reach)
    macs_to_reach[name] = manifest['macs_to_reach']
    x = RNG.randint(0, 256, (12,) + net.input_shape).astype(np.uint8)
    exits = np.asarray(net.exits(x))
    knobs, library = {}, {}
    if name in ('lenet3c1l', FIXED):  # one budget per input: every level gets inputs, each batch mixes them
      knobs['budgets'] = np.linspace(0, net.macs_to_reach[-1], len(x))
      library['budgets'] = policies.MacBudget(knobs['budgets'], tuple(net.macs_to_reach))
    if selector is not None:
      top = np.sort(np.asarray(jax.nn.softmax(exits[0])).max(-1))
      knobs['confidence'] = float((top[5] + top[6]) / 2)  # half the inputs stop at level 0
      library.update(confidence=policies.Confidence(knobs['confidence']), learned=selector)
    expected[name] = {label: np.asarray(net.predict(x, p).exit_level).tolist() for label, p in library.items()}
    np.savez(f'{d}/reference.npz', images=x, exits=exits, **knobs)
  out = testlib.run_on_device(tmp_path, HOST_CHECK, directories)
  for name, got in out.items():
    assert 'cannot advance a cache of level 3' in got['repeated']
    if name == FIXED:
      assert got['batch'] == BATCH and f'exactly {BATCH} images, got 12' in got['wrong_batch']
    else:
      assert got['batch'] is None and 'wrong_batch' not in got  # any batch size runs
    testlib.assert_device_logits(name, got, quantized_share=0.6)
    for label, levels in expected[name].items():
      device_levels, device_macs, logits_error = got[label]
      assert device_levels == levels, (name, label)
      assert logits_error <= 1e-4 * max(1.0, got['scale']), (name, label)
      assert device_macs == [macs_to_reach[name][lv] for lv in levels], (name, label)
  assert set(expected['lenet3c1l']) == {'budgets', 'confidence', 'learned'} and set(expected[FIXED]) == {'budgets'}
  assert len(set(expected['lenet3c1l']['confidence'])) > 1 and len(set(expected[FIXED]['budgets'])) == 4
