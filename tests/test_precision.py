"""The precision study end to end on the digits with tiny settings: the file format, the
budgets met, and each fine-tuned network reloaded from its checkpoint (bits included)
giving the accuracy the study reported."""

import json
import os

import jax
import numpy as np
import pytest

import stepnet_jax
from stepnet_jax import config
from stepnet_jax.data import datasets
from stepnet_jax.inference import restore
from stepnet_jax.models import quantized
from stepnet_jax.studies import precision

CONFIG = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'precision_fashion_mnist.py'
)


def test_precision_study_end_to_end_on_digits(tmp_path):
  cc = config.load_file(CONFIG)
  cc.common.data.name = 'digits'
  cc.common.model.name = 'mlp'
  cc.quick.common.data = dict(train_subset=0, test_subset=0, validation_examples=300)
  cc.quick.common.model = dict(width=0.125)
  cc.quick.common.train = dict(num_epochs=2, batch_size=64, eval_batch_size=400, progress=False)
  cc.quick.precision.budgets = (3.0,)
  cc.quick.precision.progressive_planes = 4
  cc.quick.precision.progressive_bn_affine_steps = 2  # BN scale/bias per plane count too: saved and reloaded below
  cc.quick.precision.finetune_seeds = (0, 1)
  cc.quick.precision.search_finetune_epochs = 0.1  # candidates ranked after a few fine-tune steps
  cc.quick.precision.slopes = (4.0,)  # (choosing among slopes: test_quant)
  out = precision.study(cc, str(tmp_path), quick=True)
  saved = json.loads((tmp_path / 'precision.json').read_text())
  assert saved == json.loads(json.dumps(out))
  assert (tmp_path / 'precision.md').exists() and (tmp_path / 'precision.png').read_bytes()[:4] == b'\x89PNG'
  assert '## Bit search' in (tmp_path / 'precision.md').read_text()
  for method in ('class_based', 'magnitude', 'random'):  # ranked by the validation loss, both metrics kept
    search = saved[method][0]['search']
    assert search['rank_by'] == 'loss' and all(
      {'validation_loss', 'validation_accuracy'} <= set(t) for t in search['tried']
    )
  assert set(saved) >= {
    'dataset',
    'float_accuracy',
    'class_based',
    'uniform',
    'magnitude',
    'random',
    'progressive',
    'staircase',
  }
  # Minimum bits: each found assignment meets the rule on the validation split it was searched on
  # (recomputed here from the float network, the split and the bits).
  m = saved['min_bits']
  target = m['float_validation_accuracy'] - m['tolerance']
  resolved = precision.resolve(cc, quick=True)
  digits = datasets.subset(
    datasets.load_digits(), resolved.common.data.train_subset, resolved.common.data.test_subset, resolved.common.seed
  )
  _, held = datasets.split_validation(digits, resolved.common.data.validation_examples, resolved.common.seed)
  float_model, _ = restore.load_variables(str(tmp_path / 'float'))
  evaluate = precision.Evaluator(400)
  assert evaluate(float_model, digits.train_images[held], digits.train_labels[held])[-1] == pytest.approx(
    m['float_validation_accuracy']
  )
  for method in precision.BIT_ASSIGNMENTS:
    e = m[method]
    tried = e['search']['tried']
    if method == 'uniform':  # whole widths upwards: every smaller one failed
      assert all(t['validation_accuracy'] < target for t in tried[:-1])
    if not e['found']:
      assert all(t['validation_accuracy'] < target for t in tried)
      continue
    bits = {k: tuple(v) for k, v in e['weight_bits'].items()}
    q = quantized.apply(
      float_model, quantized.Precision(bits, saved['settings']['act_bits'], saved['settings']['clips'])
    )
    again = evaluate(q, digits.train_images[held], digits.train_labels[held])[-1]
    assert again == pytest.approx(e['validation_accuracy']) and again >= target
    assert e['mean_bits'] <= min(t['budget'] for t in tried if t['validation_accuracy'] >= target) + 1e-9
  test = datasets.load_digits()
  for method in precision.BIT_ASSIGNMENTS:
    entries = saved[method]
    assert [e['budget'] for e in entries] == [3.0]
    for e in entries:
      assert set(e) >= {'avg_bits', 'accuracy', 'bitops'}
      assert e['avg_bits'] <= e['budget'] + 1e-9
      if method == 'uniform':
        assert e['avg_bits'] == e['budget']
      net = stepnet_jax.load(str(tmp_path / e['workdir']))
      bits = quantized.Precision.from_json(net.meta['model_meta']['precision']).weight_bits
      assert np.isclose(
        quantized.bitops(
          restore.load_variables(str(tmp_path / e['workdir']))[0], bits, saved['settings']['act_bits']
        ).sum(),
        e['bitops'],
      )
      # The saved network is the first seed's fine-tune; the reported accuracy is the seeds' mean.
      top = np.asarray(jax.jit(net.functions.exits)(net.variables, test.test_images))[-1].argmax(-1)
      assert len(e['accuracy_per_seed']) == 2
      assert np.isclose((top == test.test_labels).mean(), e['accuracy_per_seed'][0])
      assert np.isclose(np.mean(e['accuracy_per_seed']), e['accuracy'])

  # ProgressiveNN: plane counts 1..4, bit-serial == direct forward, cumulative cost grows;
  # the saved BWB network and its per-plane BN statistics reproduce the reported accuracy.
  rows = saved['progressive']
  assert [r['bits'] for r in rows] == [1, 2, 3, 4]
  assert [r['compute_fraction'] for r in rows] == [0.25, 0.5, 0.75, 1.0]
  assert all(r['accuracy'] == r['accuracy_direct'] for r in rows)
  assert np.all(np.diff([r['bitops_cumulative'] for r in rows]) > 0)
  stairs = saved['staircase']
  assert set(stairs) == {'combined', 'optimal', 'levels_only', 'bits_only', 'combined_class', 'bits_only_class'}
  levels = len(saved['float_accuracy_per_level'])
  grid = np.asarray(saved['grid']['validation'])
  for kind, steps in stairs.items():
    assert np.all(np.diff([s['bitops'] for s in steps]) > 0), kind
    on_ladder = grid if not kind.endswith('_class') else None  # the class ladder's grid is its own
    assert all(
      'validation_accuracy' in s
      and (on_ladder is None or s['validation_accuracy'] == on_ladder[s['state'][0], s['state'][1] - 1])
      for s in steps
    ), kind
    if kind == 'optimal':  # starts and stops where the search found best
      continue
    assert steps[-1]['state'] == [levels - 1, 4], kind
    assert (
      steps[0]['state']
      == {
        'combined': [0, 1],
        'levels_only': [0, 4],
        'bits_only': [levels - 1, 1],
        'combined_class': [0, 1],
        'bits_only_class': [levels - 1, 1],
      }[kind]
    )

  # On validation the optimal staircase is at most its recorded shortfall below levels-only and bits-only.
  def at(steps, c):  # the validation accuracy once c bit-ops are spent
    return ([0.0] + [s['validation_accuracy'] for s in steps if s['bitops'] <= c])[-1]

  worst = max(
    at(stairs[base], c) - at(stairs['optimal'], c)
    for base in ('levels_only', 'bits_only')
    for c in {s['bitops'] for k in ('optimal', 'levels_only', 'bits_only') for s in stairs[k]}
  )
  assert max(worst, 0.0) == pytest.approx(saved['optimal_staircase']['shortfall'], abs=1e-6)
  # The class ladder: rungs 1 and N uniform (same state, same cost and accuracy as the
  # uniform ladder's), the middle rungs at most b planes on the MAC-weighted mean.
  ladder = saved['class_ladder']
  assert ladder['slope'] == 4.0
  assert [r['rung'] for r in ladder['rungs']] == [1, 2, 3, 4]
  assert all(r['mean_planes'] <= r['rung'] + 1e-9 for r in ladder['rungs'])
  assert ladder['rungs'][0]['mean_planes'] == 1.0 and ladder['rungs'][-1]['mean_planes'] == 4.0
  for b in (0, 3):
    assert stairs['bits_only_class'][b]['accuracy'] == stairs['bits_only'][b]['accuracy']
  assert stairs['bits_only_class'][0]['bitops'] == stairs['bits_only'][0]['bitops']
  model, meta = restore.load_variables(str(tmp_path / 'progressive'), apply_precision=False)
  prec = quantized.Precision.from_json(meta['model_meta']['precision'])
  assert prec.bwb_bits == 4
  stats = np.load(tmp_path / 'progressive' / 'bn_stats_per_planes.npz')
  assert saved['progressive_settings']['bn_affine_steps'] == 2
  assert any(k.startswith('planes1/') and k.endswith('bn/scale') for k in stats.files)
  # Reloaded at each plane count with its saved BN state, the network gives the reported accuracy.
  from stepnet_jax.methods import progressive

  planes = progressive.load_planes(str(tmp_path / 'progressive'))
  assert len(planes) == 4
  for b in (1, 4):
    top = np.asarray(planes[b - 1].exits(test.test_images))[-1].argmax(-1)
    assert np.isclose((top == test.test_labels).mean(), rows[b - 1]['accuracy_direct'])


def test_targets_say_when_the_class_based_search_kept_uniform_bits():
  def entry(acc, slope=None, uniform=False):
    search = {'slope': slope, 'tried': [{'slope': 1.0, 'uniform': uniform}, {'slope': 4.0, 'uniform': False}]}
    return {'budget': 4.0, 'accuracy': acc, 'search': search if slope else {}}

  out = {
    'float_accuracy': 0.90,
    'class_based': [entry(0.901, 1.0, uniform=True)],
    'uniform': [entry(0.901)],
    'magnitude': [entry(0.899, 4.0)],
    'random': [entry(0.902, 4.0)],
  }
  first = precision.targets(out)[0]
  assert 'kept uniform bits' in first and first.endswith('NOT met')  # random is above it
  out['class_based'] = [entry(0.903, 4.0)]
  first = precision.targets(out)[0]
  assert 'kept uniform' not in first and first.endswith(': met')
