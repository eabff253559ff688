"""The precision study end to end on the digits with tiny settings: the file format, the
budgets met, and each fine-tuned network reloaded from its checkpoint (bits included)
giving the accuracy the study reported."""
import json
import os

import jax
import numpy as np

import stepnet_jax
from stepnet_jax import config, data, precision, quant

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                      'precision_fashion_mnist.py')


def test_precision_study_end_to_end_on_digits(tmp_path):
  cc = config.load_file(CONFIG)
  cc.common.data.name = 'digits'
  cc.common.model.name = 'mlp'
  cc.quick.common.data = dict(train_subset=0, test_subset=0, validation_examples=300)
  cc.quick.common.model = dict(width=0.125)
  cc.quick.common.train = dict(num_epochs=2, batch_size=64, eval_batch_size=400, progress=False)
  out = precision.study(cc, str(tmp_path), quick=True)
  saved = json.loads((tmp_path / 'precision.json').read_text())
  assert saved == json.loads(json.dumps(out))
  assert (tmp_path / 'precision.md').exists() and (tmp_path / 'precision.png').read_bytes()[:4] == b'\x89PNG'
  assert set(saved) >= {'dataset', 'float_accuracy', 'class_based', 'uniform', 'magnitude', 'random'}
  test = data.load_digits()
  for method in precision.METHODS:
    entries = saved[method]
    assert [e['budget'] for e in entries] == [2.0, 4.0]
    for e in entries:
      assert set(e) >= {'avg_bits', 'accuracy', 'bitops'}
      assert e['avg_bits'] <= e['budget'] + 1e-9
      if method == 'uniform':
        assert e['avg_bits'] == e['budget']
      net = stepnet_jax.load(str(tmp_path / e['workdir']))
      bits = quant.Precision.from_json(net.meta['model_meta']['precision']).weight_bits
      assert np.isclose(quant.bitops(stepnet_jax.restore.load_variables(str(tmp_path / e['workdir']))[0], bits,
                                     saved['settings']['act_bits']).sum(), e['bitops'])
      top = np.asarray(jax.jit(net.functions.exits)(net.variables, test.test_images))[-1].argmax(-1)
      assert np.isclose((top == test.test_labels).mean(), e['accuracy'])
