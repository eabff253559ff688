"""The LiteRT (TFLite) export: exported networks run by LiteRT in a process that imports
neither JAX, TensorFlow nor the library, against the library's logits and stopping."""

import json

import jax
import numpy as np
import pytest
import testlib

pytest.importorskip('tensorflow')
pytest.importorskip('ai_edge_litert')

from stepnet_jax.inference import export, policies  # noqa: E402

RNG = np.random.RandomState(1)
BATCH = 5  # the export's fixed batch; predict's 12 images make batches of 5, 5 and 2 (+3 copies)

HOST_CHECK = testlib.device_script(
  'anytime_litert',
  """
  for label, call in (('repeated', lambda: net.advance(cache)), ('batch', lambda: net.start(ref['images']))):
    try:
      call()
    except ValueError as e:
      out[name][label] = str(e)
  if 'confidence' in ref:
    for label, policy in (('confidence', ax.Confidence(float(ref['confidence']))),
                          ('budgets', ax.MacBudget(ref['budgets'], net.macs_to_reach)),
                          ('learned', ax.Learned(d + '/selector.npz'))):
      pred = net.predict(ref['images'], policy)
      rows = np.arange(len(ref['images']))
      out[name][label] = [pred.exit_level.tolist(), pred.macs.tolist(),
                          float(np.abs(pred.logits - ref['exits'][pred.exit_level, rows]).max())]
""",
)


def test_litert_exports_match_the_library_in_a_process_without_jax_or_tensorflow(tmp_path):
  """LeNet-3C1L, ResNet-20 and a quantized LeNet exported as LiteRT models for batches of
  5: LiteRT, from a Python that imports neither jax, TensorFlow nor stepnet_jax, gives the
  library's logits at every level by stepping and by the direct forwards; ``predict`` over
  12 images (batches of 5, 5 and 2 padded) stops each where the library's ``predict`` does."""
  directories, expected = {}, {}
  for name, net in testlib.export_networks(RNG).items():
    d = directories[name] = str(tmp_path / name)
    selector = None
    if name == 'lenet3c1l':
      selector = policies.Learned(
        policies.init_selector(jax.random.key(3), 10, net.num_levels) | {'w2': RNG.randn(32).astype(np.float32)},
        num_levels=net.num_levels,
      )
    manifest = export.save(net, d, format='tflite', batch=BATCH, selector=selector)
    assert manifest['batch'] == BATCH and manifest['runner'] == 'anytime_litert.py'
    assert manifest['macs_to_reach'] == list(net.macs_to_reach)
    x = RNG.randint(0, 256, (12,) + net.input_shape).astype(np.uint8)
    exits = np.asarray(net.exits(x))
    knobs = {}
    if selector is not None:
      top = np.sort(np.asarray(jax.nn.softmax(exits[0])).max(-1))
      knobs = {
        'confidence': float((top[5] + top[6]) / 2),  # half the inputs stop at level 0
        'budgets': np.linspace(0, net.macs_to_reach[-1], len(x)),  # one per input: each batch mixes levels
      }
      library = {
        'confidence': policies.Confidence(knobs['confidence']),
        'budgets': policies.MacBudget(knobs['budgets'], tuple(net.macs_to_reach)),
        'learned': selector,
      }
      expected = {label: np.asarray(net.predict(x, p).exit_level).tolist() for label, p in library.items()}
    np.savez(f'{d}/reference.npz', images=x, exits=exits, **knobs)
  out = testlib.run_on_device(tmp_path, HOST_CHECK, directories)
  for name, got in out.items():
    assert 'cannot advance a cache of level 3' in got['repeated']
    assert f'exactly {BATCH} images, got 12' in got['batch']
    testlib.assert_device_logits(name, got, quantized_share=0.6)
  got = out['lenet3c1l']
  macs_to_reach = json.load(open(f'{directories["lenet3c1l"]}/manifest.json'))['macs_to_reach']
  for label, levels in expected.items():
    device_levels, device_macs, logits_error = got[label]
    assert device_levels == levels, label
    assert logits_error <= 1e-4 * max(1.0, got['scale']), label
    assert device_macs == [macs_to_reach[lv] for lv in levels], label
  assert len(set(expected['confidence'])) > 1 and len(set(expected['budgets'])) == 4  # the policies split the batch
