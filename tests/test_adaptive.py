"""The anytime study command end to end (``python -m stepnet_jax.adaptive``) on the digits."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import stepnet_jax
from stepnet_jax.core import anytime


def test_adaptive_study_end_to_end_on_digits(tmp_path, monkeypatch):
  """The whole study on the digits with tiny settings: files, format, the validation split
  kept apart from what the networks trained on, and the points' bookkeeping. (It runs the
  masked program, which compiles in a fraction of the compact one's time; both give the
  same answers, tested above.)"""
  monkeypatch.setitem(anytime.DEFAULT_STRATEGY, jax.default_backend(), 'masked')
  import json
  import os

  from stepnet_jax import config
  from stepnet_jax.data import datasets
  from stepnet_jax.inference import restore
  from stepnet_jax.studies import stopping

  cc = config.load_file(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'adaptive_fashion_mnist.py')
  )
  cc.common.data.name = 'digits'
  cc.common.model.name = 'mlp'
  # The test split and the choice half (150) share one batch shape: each program compiles once.
  cc.quick.common.data = dict(train_subset=0, test_subset=150, validation_examples=300)
  cc.quick.common.model = dict(width=0.125)
  cc.quick.common.train = dict(num_epochs=2, batch_size=64, eval_batch_size=400, progress=False)
  cc.quick.steppingnet.construction.rounds = 1
  cc.quick.families = ('steppingnet', 'cascade')
  cc.quick.joint_families = ('cascade',)
  cc.quick.lambdas = (0.5,)
  cc.quick.knobs.confidence = (0.5, 0.9)
  out = stopping.adaptive(cc, str(tmp_path), quick=True)
  saved = json.loads((tmp_path / 'adaptive.json').read_text())
  assert saved == json.loads(json.dumps(out))
  assert set(saved['methods']) == {
    'steppingnet_confidence',
    'steppingnet_entropy',
    'steppingnet_learned',
    'cascade_confidence',
    'cascade_learned',
    'cascade_learned_joint',
  }
  for name, res in saved['methods'].items():
    levels = len(saved['static'][name.split('_')[0]])
    reach = [r['macs_to_reach'] for r in saved['static'][name.split('_')[0]]]
    for p in res['points']:
      assert set(p) == {'knob', 'avg_macs', 'accuracy', 'exit_fraction'}
      assert len(p['exit_fraction']) == levels and abs(sum(p['exit_fraction']) - 1) < 1e-6
      np.testing.assert_allclose(p['avg_macs'], np.dot(p['exit_fraction'], reach), rtol=1e-6)
  # The networks trained on exactly the training images minus the 300 held out (counted by
  # image content), and the cascade's MACs are its networks' own MACs added up.
  import collections

  from stepnet_jax.training import run

  full = datasets.load_digits()
  held = np.load(tmp_path / 'validation_indices.npy')
  assert len(np.unique(held)) == 300 and saved['validation']['examples'] == 300
  trained_on, _ = run.prepare_data(
    config.from_saved(restore.restore_meta(str(tmp_path / 'steppingnet'))['config']), full
  )
  count = lambda images: collections.Counter(x.tobytes() for x in images)
  assert count(full.train_images) - count(trained_on.train_images) == count(full.train_images[held])
  own = [
    stepnet_jax.load(str(tmp_path / 'independent' / f'budget{k}')).level_macs[0]
    for k in range(len(saved['static']['cascade']))
  ]
  assert [r['macs_to_reach'] for r in saved['static']['cascade']] == list(np.cumsum(own))
  for name in ('adaptive.md', 'adaptive.png'):
    assert (tmp_path / name).stat().st_size > 0
  assert 'Targets' in (tmp_path / 'adaptive.md').read_text()

  # --timing on the finished study: trains the operating point's selection module once and
  # keeps it; a second --timing reuses it (no training) and times the same policy.
  monkeypatch.setattr(stopping, 'BATCH1_INPUTS', 3)
  first = stopping.timing_study(cc, str(tmp_path), quick=True, repeats=2)
  assert (tmp_path / stopping.TIMING_SELECTOR).exists()
  from stepnet_jax.methods import selection

  def no_training(*args, **kwargs):
    raise AssertionError('the kept selection module should have been reused')

  train_selector = selection.train_selector
  monkeypatch.setattr(selection, 'train_selector', no_training)
  second = stopping.timing_study(cc, str(tmp_path), quick=True, repeats=2)
  monkeypatch.setattr(selection, 'train_selector', train_selector)
  assert json.loads((tmp_path / 'timing.json').read_text()) == json.loads(json.dumps(second))
  assert [(r['policy'], r['batch'], r['inputs']) for r in second['results']] == [
    ('learned', 1, 3),
    ('learned', 150, 150),
    ('confidence', 1, 3),
    ('confidence', 150, 150),
  ]
  for a, b in zip(first['results'], second['results']):  # the same decisions, so the same MACs
    assert a['avg_macs_fraction'] == b['avg_macs_fraction']
    assert all(b[f'{s}_ms'] > 0 and b[f'{s}_ratio'] > 0 for s in anytime.STRATEGIES)

  # policy_split='test' on these networks, read where they are (networks=): 100 of the 150
  # test images fit and choose the policies; every accuracy, the static levels' too, is on
  # the other 50, checked against each network's direct forward there. The networks'
  # directory keeps its files: nothing trains, its compare.json stays.
  (tmp_path / 'compare.json').unlink()
  cc.quick.update(dict(policy_split='test', policy_examples=100, networks=str(tmp_path), joint_families=()))
  on_test = tmp_path / 'on_test'
  moved = stopping.adaptive(cc, str(on_test), quick=True)
  assert not (tmp_path / 'compare.json').exists()
  assert sorted(os.listdir(on_test)) == sorted(
    ['adaptive.json', 'adaptive.md', 'adaptive.png', 'validation_indices.npy']
    + [f'selection_points_{f}.json' for f in ('steppingnet', 'cascade')]
  )
  held = np.load(on_test / 'validation_indices.npy')
  assert len(np.unique(held)) == 100 and held.max() < 150
  assert moved['validation'] == {
    'split': 'test',
    'fit_from': 'held',
    'examples': 100,
    'fit': 50,
    'choose': 50,
    'reported': 50,
    'seed': 0,
    'indices_file': 'validation_indices.npy',
  }
  test = datasets.subset(full, 0, 150, 0)
  report = np.setdiff1d(np.arange(150), held)
  images, labels = test.test_images[report], test.test_labels[report]
  stepping = stepnet_jax.load(str(tmp_path / 'steppingnet'))
  independent = [stepnet_jax.load(str(tmp_path / 'independent' / f'budget{k}')) for k in range(len(own))]
  nets = {
    'steppingnet': [(stepping, k) for k in range(stepping.num_levels)],
    'cascade': [(net, net.num_levels - 1) for net in independent],
  }
  for family, members in nets.items():
    direct = [float((np.asarray(net.forward(images, k)).argmax(-1) == labels).mean()) for net, k in members]
    np.testing.assert_allclose([r['accuracy'] for r in moved['static'][family]], direct, atol=1e-6)
  assert moved['top_accuracy'] == moved['static']['steppingnet'][-1]['accuracy']
  # policy_fit='train' on the same networks: the modules fit on 200 training images, all 100
  # held-out test images choose, the reported ones stay; --timing refuses another fit.
  cc.quick.update(dict(policy_fit='train', policy_fit_examples=200, families=('steppingnet',)))
  fitted = stopping.adaptive(cc, str(tmp_path / 'fit_train'), quick=True)
  assert (fitted['validation']['fit_from'], fitted['validation']['fit'], fitted['validation']['choose']) == (
    'train',
    200,
    100,
  )
  assert fitted['static']['steppingnet'] == moved['static']['steppingnet']
  assert 'fitted on 200 of the images the networks trained on' in (tmp_path / 'fit_train' / 'adaptive.md').read_text()
  assert fitted['validation']['fit_key'].startswith('train:')
  cc.quick.update(dict(policy_fit='held', families=('steppingnet', 'cascade')))
  with pytest.raises(ValueError, match='fits on other images'):
    stopping.timing_study(cc, str(tmp_path / 'fit_train'), quick=True, repeats=2)
  # As many training images, but other ones (as another fitting seed would draw): refused too.
  cc.quick.policy_fit = 'train'
  report = tmp_path / 'fit_train' / 'adaptive.json'
  report.write_text(report.read_text().replace(fitted['validation']['fit_key'], 'train:0123456789abcdef'))
  with pytest.raises(ValueError, match='fits on other images'):
    stopping.timing_study(cc, str(tmp_path / 'fit_train'), quick=True, repeats=2)
  cc.quick.policy_fit = 'held'
  # Refused before anything trains: networks= without finished runs there, and --timing
  # with a config that holds out other images than the study did.
  with pytest.raises(ValueError, match='has no finished run'):
    cc.quick.networks = str(tmp_path / 'on_test')
    stopping.adaptive(cc, str(tmp_path / 'elsewhere'), quick=True)
  cc.quick.networks, cc.quick.policy_split = str(tmp_path), 'train'
  with pytest.raises(ValueError, match='holds out or fits on other images'):
    stopping.timing_study(cc, str(on_test), quick=True, repeats=2)
  assert 'the other 50 test images' in (on_test / 'adaptive.md').read_text()


def test_learned_points_go_on_from_the_lambdas_a_stopped_sweep_kept(tmp_path, monkeypatch):
  """Each lambda's points are kept as they are measured: a second sweep with the same
  settings trains only the lambdas not yet kept, and other settings start anew."""
  import types

  from stepnet_jax import config
  from stepnet_jax.methods import selection
  from stepnet_jax.studies import stopping

  trained = []

  def train(cfg, module, macs, images, labels, classes, cost_weight, desc):
    trained.append(cost_weight)
    return cost_weight, None

  monkeypatch.setattr(selection, 'train_selector', train)
  monkeypatch.setattr(
    stopping.sweeps,
    'evaluate_policy',
    lambda predict, variables, policy, images, labels, levels: {
      'avg_macs': 100 * policy + len(labels),
      'accuracy': 0.5,
    },
  )
  family = types.SimpleNamespace(
    name='steppingnet',
    module=None,
    program=types.SimpleNamespace(macs_to_reach=(1, 2), num_levels=2),
    static=[{'level': 0, 'macs_to_reach': 1, 'accuracy': 0.8}],
    predict_fn=lambda strategy: None,
  )
  cfg = config.from_dict({})
  split = (np.zeros((4, 1)), np.zeros(4)), (np.zeros((3, 1)), np.zeros(3)), (np.zeros((5, 1)), np.zeros(5))
  keep = str(tmp_path / 'kept.json')
  first = stopping.learned_points(family, cfg, (0.0, 0.5), *split, 10, 'masked', keep=keep)
  assert trained == [0.0, 0.5] and first[0][1] == {'knob': 0.5, 'avg_macs': 55.0, 'accuracy': 0.5}
  again = stopping.learned_points(family, cfg, (0.0, 0.5, 0.8), *split, 10, 'masked', keep=keep)
  assert trained == [0.0, 0.5, 0.8] and again[0][:2] == first[0] and again[1][:2] == first[1]
  other = cfg.replace(**{'selection.epochs': 7})
  stopping.learned_points(family, other, (0.0,), *split, 10, 'masked', keep=keep)
  assert trained == [0.0, 0.5, 0.8, 0.0]


@pytest.mark.parametrize('split,validation', [('train', 10), ('test', 0), ('test', 10)])
def test_selection_modules_fit_on_training_images_the_networks_saw(split, validation):
  """policy_fit='train': the modules fit on training images that every network trained on
  (never one of a validation split, whichever split the policies use), at most
  policy_fit_examples of them, and every held-out image chooses; policy_fit='held' splits
  the held-out images in two as before. Images are identified by content (each image holds
  its own index)."""
  import dataclasses

  from stepnet_jax import config
  from stepnet_jax.data import datasets
  from stepnet_jax.studies import stopping

  n_train, n_test = 60, 20
  ds = datasets.Dataset(
    'indexed',
    np.arange(n_train, dtype=np.int32).reshape(-1, 1, 1, 1),
    np.arange(n_train, dtype=np.int32) % 3,
    1000 + np.arange(n_test, dtype=np.int32).reshape(-1, 1, 1, 1),
    np.arange(n_test, dtype=np.int32) % 3,
    3,
  )
  # The training images no network saw: the seeded validation split (data.datasets' rule).
  unseen = set(np.random.RandomState(12345).permutation(n_train)[:validation].tolist())
  common = config.from_dict({'data': {'validation_examples': validation}})
  study = stopping.AdaptiveConfig(common=common, policy_split=split, policy_examples=8, policy_fit='train')
  ids = lambda pair: set(pair[0].ravel().tolist())
  halves = stopping.policy_data(dataclasses.replace(study, policy_fit='held'), ds)
  for fit_examples, expected in ((1000, n_train - validation), (7, 7)):
    data = stopping.policy_data(dataclasses.replace(study, policy_fit_examples=fit_examples), ds)
    held = ids(halves.fit) | ids(halves.choose)
    assert ids(data.choose) == held and len(data.choose[1]) == len(held)
    assert ids(data.test) == ids(halves.test)
    fit = ids(data.fit)
    assert len(fit) == len(data.fit[1]) == expected and fit <= set(range(n_train)) - unseen
    np.testing.assert_array_equal(data.fit[1], np.asarray(sorted(fit)) % 3)
    assert data.fit_from == 'train' and data.digest('n') != halves.digest('n')
    assert data.fit_key().startswith('train:') and halves.fit_key() == 'held'
