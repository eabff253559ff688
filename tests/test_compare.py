"""A tiny end-to-end run of ``python -m stepnet_jax.compare --quick`` on real Fashion-MNIST."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from test_baselines import compare_config

from stepnet_jax.config import SettingsError
from stepnet_jax.studies import compare, compare_report, paired
from stepnet_jax.training import loop

pytestmark = pytest.mark.slow


def test_quick_compare_runs_every_method_and_reuses_runs(tmp_path, fashion_mnist, monkeypatch):
  cc = compare_config()
  # The pipeline with one method of each kind: constructed and reusable, and recomputing
  # with private BN (triangular AWN: the seeds test below; non-uniform and independent
  # nets: test_baselines.py).
  cc.methods = ('steppingnet', 'slimmable')
  monkeypatch.setattr(compare.datasets, 'load_dataset', lambda *a, **k: fashion_mnist)

  def plan(workdir):  # --plan: {method: (status, where)}
    return {r['method']: (r['status'], r['where']) for r in compare.plan(compare.resolve(cc, True), str(workdir))}

  assert plan(tmp_path) == {name: ('train', str(tmp_path / name)) for name in cc.methods}
  out = compare.compare(cc, str(tmp_path), quick=True, latency_repeats=2)

  with open(tmp_path / 'compare.json') as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(out))
  assert saved['dataset'] == fashion_mnist.name
  assert set(saved['methods']) == set(cc.methods)
  budgets = np.asarray(saved['budgets']) * saved['base_macs']
  for name, res in saved['methods'].items():
    rows = res['levels']
    assert [r['level'] for r in rows] == list(range(len(rows)))
    assert all(set(r) == {'level', 'macs', 'accuracy', 'macs_to_reach'} for r in rows)
    macs = np.array([r['macs'] for r in rows])
    reach = np.array([r['macs_to_reach'] for r in rows])
    assert np.all(np.diff(macs) >= 0), name
    assert res['reusable'] == (name in ('steppingnet', 'awn')), name  # the others recompute every subnet
    np.testing.assert_array_equal(reach, macs if res['reusable'] else np.cumsum(macs), err_msg=name)
    assert res['train_seconds'] > 0
    assert len(rows) == len(budgets)
    assert np.all(macs <= budgets + 1e-6), name
  for name in ('compare.md', 'compare.png'):
    assert os.path.getsize(tmp_path / name) > 0
  assert 'validation accuracy' not in (tmp_path / 'compare.md').read_text()  # nothing was held out
  for name in cc.methods:  # evaluate.py's per-level JSON for every method
    with open(tmp_path / name / 'levels.json') as f:
      assert {'level', 'macs', 'delta_macs', 'accuracy', 'latency_ms'} <= set(json.load(f)['levels'][0])

  assert plan(tmp_path) == {name: ('reuse', str(tmp_path / name / 'result.json')) for name in cc.methods}
  # The paired study (studies/paired.py) evaluates the networks again, image by image: it finds
  # the accuracies compare.json recorded (another code path than the comparison's sums) and
  # refuses a record they do not give. AWN is slimmable's run here, a peer to pair with.
  both = tmp_path / 'paired'
  for name, source in (('steppingnet', 'steppingnet'), ('awn', 'slimmable')):
    shutil.copytree(tmp_path / source, both / name)
  record = json.loads(json.dumps(saved))
  record['methods']['awn'] = record['methods'].pop('slimmable')
  (both / 'compare.json').write_text(json.dumps(record))
  leads = [r for rows in paired.paired_study(str(both))['leads'].values() for r in rows if r['lead'] is not None]
  assert leads and all(r['wins'] + r['losses'] <= r['images'] for r in leads)
  assert all(r['interval'][0] <= r['lead'] <= r['interval'][1] for r in leads)
  record['methods']['steppingnet']['levels'][0]['accuracy'] += 2 / leads[0]['images']
  (both / 'compare.json').write_text(json.dumps(record))
  with pytest.raises(SettingsError, match='steppingnet: the test accuracy evaluated again'):
    paired.paired_study(str(both))
  # A run trained to the end whose evaluation is missing (stopped between the two) is only
  # evaluated: the plan says so, and the comparison there gives the same levels, training nothing.
  shutil.copytree(tmp_path / 'slimmable', tmp_path / 'left' / 'slimmable')
  os.remove(tmp_path / 'left' / 'slimmable' / 'result.json')
  step = max(int(p.name) for p in (tmp_path / 'slimmable' / 'checkpoints').iterdir())
  left = tmp_path / 'left' / 'slimmable'
  assert plan(tmp_path / 'left')['slimmable'] == ('evaluate', f'{left} at step {step} of {step}')
  # A second run finds every finished run and trains nothing.
  monkeypatch.setattr(compare.trainers, 'train', lambda *a, **k: pytest.fail('retrained a finished run'))
  again = compare.compare(cc, str(tmp_path), quick=True, latency_repeats=2)
  assert again['methods'] == out['methods']
  # Another run's AWN (e.g. on its own recipe) is judged too: one AWN level at SteppingNet's
  # top MACs and 1 point above it is a target not met; one point below it, met.
  top = out['methods']['steppingnet']['levels'][-1]
  reference = tmp_path / 'reference.json'
  awn_levels = [{'level': i, 'macs': top['macs'], 'accuracy': top['accuracy'] + d} for i, d in enumerate((0.01, -0.01))]
  head = {'dataset': out['dataset'], 'base_macs': out['base_macs'] + 1}
  reference.write_text(json.dumps({**head, 'methods': {'awn': {'levels': awn_levels}}}))
  cc.awn_reference = str(reference)
  with pytest.raises(ValueError, match='has base_macs'):  # another base network's MACs: refused
    compare.compare(cc, str(tmp_path), quick=True, latency_repeats=2)
  reference.write_text(json.dumps({**head, 'base_macs': out['base_macs'], 'methods': {'awn': {'levels': awn_levels}}}))
  assert compare.compare(cc, str(tmp_path), quick=True, latency_repeats=2)['awn_reference'] == str(reference)
  judged = [line for line in (tmp_path / 'compare.md').read_text().splitlines() if f'AWN of {reference}' in line]
  assert [line.rsplit(': ', 1)[1] for line in judged] == ['NOT met', 'met']
  assert f'SteppingNet {100 * top["accuracy"]:.2f}% at {top["macs"]:,} MACs' in judged[0]
  cc.awn_reference = ''
  monkeypatch.undo()
  monkeypatch.setattr(compare.datasets, 'load_dataset', lambda *a, **k: fashion_mnist)
  monkeypatch.setattr(loop, 'run_steps', lambda *a, **k: pytest.fail('trained an evaluated-only run'))
  cc.methods = ('slimmable',)
  evaluated = compare.compare(cc, str(tmp_path / 'left'), quick=True, latency_repeats=2)['methods']['slimmable']
  assert [r['accuracy'] for r in evaluated['levels']] == [r['accuracy'] for r in out['methods']['slimmable']['levels']]
  cc.methods = ('steppingnet', 'slimmable')

  # A ledger carries finished results to a machine without their runs: the reused results
  # are recorded, an empty workdir takes them, and other settings find nothing there.
  cc.ledger = str(tmp_path / 'ledger')
  compare.compare(cc, str(tmp_path), quick=True, latency_repeats=2)
  assert sorted(p.name.split('-')[0] for p in (tmp_path / 'ledger').iterdir()) == sorted(cc.methods)
  entries = {p.name.split('-')[0]: str(p) for p in (tmp_path / 'ledger').iterdir()}
  assert plan(tmp_path / 'elsewhere') == {name: ('ledger', entries[name]) for name in cc.methods}
  elsewhere = compare.compare(cc, str(tmp_path / 'elsewhere'), quick=True, latency_repeats=2)
  assert elsewhere['methods'] == out['methods'] and not (tmp_path / 'elsewhere' / 'slimmable').exists()
  assert 'Taken from the ledger' in (tmp_path / 'elsewhere' / 'compare.md').read_text()
  assert 'Taken from the ledger' not in (tmp_path / 'compare.md').read_text()
  (tmp_path / 'ledger' / 'slimmable-damaged.json').write_text('{')  # passed over with a warning

  def trains(*a, **k):
    raise RuntimeError('trains')

  monkeypatch.setattr(compare.trainers, 'train', trains)
  cc.quick.common.train.num_epochs = 1
  with pytest.raises(RuntimeError, match='trains'):
    compare.compare(cc, str(tmp_path / 'other'), quick=True, latency_repeats=2)
  # A method's section may set its run's data apart from the comparison's; the images the
  # comparison scores on are then matched too (a shifted test subset finds nothing).
  cc.quick.common.train.num_epochs, cc.methods = 2, ('steppingnet',)
  cc.steppingnet.data = {'test_subset': 300}
  cc.quick.common.data.test_subset = 299
  with pytest.raises(RuntimeError, match='trains'):
    compare.compare(cc, str(tmp_path / 'other'), quick=True, latency_repeats=2)


def test_seeds_are_trained_apart_and_reported_as_mean_and_spread(tmp_path, fashion_mnist, monkeypatch):
  cc = compare_config()
  cc.methods = ('awn',)
  cc.seeds = (3, 4)  # --config.seeds=3,4
  cc.quick.common.data.validation_examples = 100  # held out of the 512 training images
  cc.quick.common.train.num_epochs = 1
  monkeypatch.setattr(compare.datasets, 'load_dataset', lambda *a, **k: fashion_mnist)
  out = compare.compare(cc, str(tmp_path), quick=True, latency_repeats=1)
  assert out['seeds'] == [3, 4]
  awn = out['methods']['awn']  # triangular and reusable; its widths define four of the budget points
  macs = np.array([r['macs'] for r in awn['levels']])
  assert awn['reusable'] and [r['macs_to_reach'] for r in awn['levels']] == macs.tolist()
  assert set(np.round(macs / out['base_macs'], 6)) <= set(out['budgets'])
  per_seed = [json.loads((tmp_path / f'seed{s}' / 'compare.json').read_text()) for s in (3, 4)]
  configs = [json.loads((tmp_path / f'seed{s}' / 'awn' / 'config.json').read_text())['config'] for s in (3, 4)]
  assert [c['seed'] for c in configs] == [3, 4]
  acc = np.array([[r['accuracy'] for r in p['methods']['awn']['levels']] for p in per_seed])  # [seeds, levels]
  rows = out['methods']['awn']['levels']
  np.testing.assert_allclose([r['accuracy'] for r in rows], acc.mean(0))
  np.testing.assert_allclose([r['accuracy_std'] for r in rows], acc.std(0, ddof=1))
  assert [r['accuracies'] for r in rows] == acc.T.tolist()
  assert json.loads((tmp_path / 'compare.json').read_text()) == json.loads(json.dumps(out))
  assert '±' in (tmp_path / 'compare.md').read_text() and (tmp_path / 'compare.png').stat().st_size > 0
  # Validation accuracy per level: each seed's net on the images its run held out (rebuilt
  # here: the seed's subset of the training split, then its held-out choice), level by level.
  import stepnet_jax
  from stepnet_jax.data import datasets

  for seed, p in zip((3, 4), per_seed):
    subset = datasets.subset(fashion_mnist, 512, 300, seed)
    held = np.sort(np.random.RandomState(seed + 12345).permutation(512)[:100])
    net = stepnet_jax.load(str(tmp_path / f'seed{seed}' / 'awn'))
    for r in p['methods']['awn']['levels']:
      pred = np.asarray(net.forward(subset.train_images[held], r['level'])).argmax(-1)
      assert r['validation_accuracy'] == pytest.approx(float((pred == subset.train_labels[held]).mean()))
  # compare.md shows the seeds' mean validation accuracy beside the test accuracy.
  md = (tmp_path / 'compare.md').read_text()
  assert '| validation accuracy (%) | test accuracy (%) |' in md
  for r in rows:
    val = np.mean([p['methods']['awn']['levels'][r['level']]['validation_accuracy'] for p in per_seed])
    assert f'| awn | {r["level"]} | {r["macs"]:,} | {r["macs_to_reach"]:,} | {100 * val:.2f} | ' in md
  # Recorded in a ledger, both seeds' runs make the same comparison where their runs are not.
  cc.ledger = str(tmp_path / 'ledger')
  compare.compare(cc, str(tmp_path), quick=True, latency_repeats=1)
  monkeypatch.setattr(compare.trainers, 'train', lambda *a, **k: pytest.fail('retrained a recorded run'))
  assert compare.compare(cc, str(tmp_path / 'moved'), quick=True, latency_repeats=1)['methods'] == out['methods']


def _levels(points):
  return [{'level': i, 'macs': m, 'accuracy': a, 'accuracies': seeds} for i, (m, a, seeds) in enumerate(points)]


def test_leads_take_each_methods_best_level_at_or_below_every_awn_point():
  # Hand-made table: at AWN's 100-MAC point SteppingNet's level 1 (90 MACs) counts and its
  # 110-MAC level does not; slimmable's cheaper level 0 beats its level 1 there.
  results = {
    'awn': {'levels': _levels([(100, 0.80, [0.79, 0.81]), (300, 0.90, [0.90, 0.90])])},
    'steppingnet': {
      'levels': _levels(
        [(50, 0.70, [0.70, 0.70]), (90, 0.815, [0.81, 0.82]), (110, 0.99, [0.99, 0.99]), (290, 0.91, [0.92, 0.90])]
      )
    },
    'slimmable': {'levels': _levels([(60, 0.81, [0.80, 0.82]), (95, 0.805, [0.80, 0.81]), (400, 0.99, [0.99, 0.99])])},
  }
  rows = compare_report.leads(results)
  assert [r['steppingnet_level'] for r in rows] == [1, 2]  # the most accurate that fits, not the largest
  assert [(r['best_peer'], r['best_peer_macs']) for r in rows] == [('slimmable', 60), ('awn', 300)]
  assert rows[0]['lead'] == pytest.approx(0.5) and rows[1]['lead'] == pytest.approx(9.0)
  assert rows[0]['seed_leads'] == pytest.approx([1.0, 0.0]) and rows[0]['lead_std'] == pytest.approx(2**0.5 / 2)
  lines = compare_report.lead_lines(rows)
  assert lines[0].endswith('met (target: >= 0.5 pt)') and 'NOT' not in ''.join(lines)
  results['steppingnet']['levels'][1]['accuracy'] = 0.8149
  assert compare_report.lead_lines(compare_report.leads(results))[0].endswith('NOT met (target: >= 0.5 pt)')
  # A lead of 0.497 point misses the target: it reads +0.497, never a rounded +0.50; and a
  # level 0.002 point below AWN's shows the third decimal that puts it below.
  results['steppingnet']['levels'][1]['accuracy'] = 0.81497
  line = compare_report.lead_lines(compare_report.leads(results))[0]
  assert ': +0.497 pt (per seed' in line and line.endswith('NOT met (target: >= 0.5 pt)')
  results['steppingnet']['levels'][1]['accuracy'] = 0.79998
  assert '- vs AWN level 0: SteppingNet 79.998% at 90 MACs vs 80.000% at 100: NOT met' in compare_report.targets(
    results
  )
  assert compare_report.leads({'awn': results['awn']}) == []


def test_a_level_a_few_macs_above_an_awn_point_counts_as_at_it(tmp_path):
  """The budgets are AWN's MACs rounded to 1e-6 of the base, so a level built to fill one may
  exceed AWN's MACs by a few: it counts as at the point (within ``MACS_TOLERANCE``), a level
  2e-5 above does not. compare.md and compare.png are written from such a table."""
  point = 516_428

  def results(steppingnet_macs):
    return {
      name: {
        'levels': [{'level': 0, 'macs': m, 'macs_to_reach': m, 'accuracy': a, 'latency_ms': 0.1}],
        'train_seconds': 10.0,
        'train_steps': 5,
        'reusable': True,
      }
      for name, m, a in (('awn', point, 0.80), ('steppingnet', steppingnet_macs, 0.90), ('slimmable', 516_000, 0.85))
    }

  near = results(point + 2)
  assert [r['lead'] for r in compare_report.leads(near)] == pytest.approx([5.0])
  assert '- vs AWN level 0: SteppingNet 90.00% at 516,430 MACs vs 80.00% at 516,428: met' in compare_report.targets(
    near
  )
  far = results(int(point * (1 + 2e-5)) + 1)
  assert [r['lead'] for r in compare_report.leads(far)] == [None]
  assert '- AWN level 0 (516,428 MACs): no SteppingNet level at or below its MACs' in compare_report.targets(far)
  md = compare_report.markdown(near, [0.0723], 7_146_624, 'digits', 1)
  assert 'Train seconds of all methods together: 30 ' in md
  assert '| 0 | 0: 90.00 (516,430) | slimmable 0: 85.00 (516,000) | +5.00 | 0: 90.00 (516,430) |' in md
  reference = {'AWN elsewhere': [{'level': 0, 'macs': point, 'accuracy': 0.82}]}
  compare_report.plot(str(tmp_path / 'compare.png'), near, 'title', reference)
  assert (tmp_path / 'compare.png').stat().st_size > 0


def test_leads_on_the_macs_spent_stepping_charge_recomputation():
  # The same kind of table with the MACs each level costs to reach: slimmable recomputes,
  # so its level 1 (95-MAC subnet) costs 155 to reach and no longer fits AWN's 100-MAC
  # point, while SteppingNet's and AWN's levels cost what their subnets do.
  def levels(points):
    return [{'level': i, 'macs': m, 'macs_to_reach': t, 'accuracy': a} for i, (m, t, a) in enumerate(points)]

  results = {
    'awn': {'levels': levels([(100, 100, 0.80), (300, 300, 0.90)])},
    'steppingnet': {'levels': levels([(50, 50, 0.70), (90, 90, 0.83), (290, 290, 0.91)])},
    'slimmable': {'levels': levels([(60, 60, 0.75), (95, 155, 0.84), (280, 435, 0.95)])},
  }
  subnet, to_reach = compare_report.leads(results), compare_report.leads(results, 'macs_to_reach')
  assert [(r['best_peer'], r['best_peer_level']) for r in subnet] == [('slimmable', 1), ('slimmable', 2)]
  assert [r['lead'] for r in subnet] == pytest.approx([-1.0, -4.0])
  # At 300 MACs to reach, slimmable's best is its level 1 (0.84, 155), below AWN's level 1.
  assert [(r['best_peer'], r['best_peer_level']) for r in to_reach] == [('awn', 0), ('awn', 1)]
  assert [r['lead'] for r in to_reach] == pytest.approx([3.0, 1.0])
  assert [r['best_peer_macs'] for r in to_reach] == [100, 300]
  both = compare_report.both_leads(results)
  assert both == {'macs': subnet, 'macs_to_reach': to_reach}
  # compare.md's side-by-side table: per AWN point, each reading's SteppingNet level, best peer and lead.
  table = compare_report.leads_table(results)
  assert table[2:] == [
    '| 0 | 1: 83.00 (90) | slimmable 1: 84.00 (95) | -1.00 | 1: 83.00 (90) | awn 0: 80.00 (100) | +3.00 |',
    '| 1 | 2: 91.00 (290) | slimmable 2: 95.00 (280) | -4.00 | 2: 91.00 (290) | awn 1: 90.00 (300) | +1.00 |',
  ]
  lines = compare_report.lead_lines(to_reach)
  assert '(100 MACs to reach)' in lines[0] and lines[0].endswith(': met (target: >= 0.5 pt)')
  results['independent'] = {'levels': [{'level': 0, 'macs': 50, 'accuracy': 0.9}]}  # not judged: no effect
  assert compare_report.both_leads(results) == {'macs': subnet, 'macs_to_reach': to_reach}
  del results['slimmable']['levels'][0]['macs_to_reach']  # a table without the second reading
  assert list(compare_report.both_leads(results)) == ['macs']
  with pytest.raises(ValueError, match="unknown reading 'flops'"):
    compare_report.leads(results, 'flops')
