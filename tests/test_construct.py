"""SteppingNet construction: MAC counts from level counts, budgets, the greedy fill,
re-levelling trained weights, and importance scores against finite differences."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import testlib
from flax import nnx

from stepnet_jax import config
from stepnet_jax.core import levels
from stepnet_jax.data import datasets
from stepnet_jax.methods import construct, importance
from stepnet_jax.models import budgets, structure, surgery, zoo
from stepnet_jax.training import run


def _macs_by_layers(model):
  """Cumulative subnet MACs from the layers' own mask-based counts."""
  return np.cumsum(model.delta_macs().sum(0))


@pytest.mark.parametrize(
  'name,layers,mask_rule,triangular',
  [
    ('lenet3c1l', testlib.LENET3, True, False),
    ('lenet5', testlib.LENET5, True, False),
    ('mlp', ('fc1', 'fc2'), True, False),
    ('lenet3c1l', testlib.LENET3, False, False),
    ('lenet5', testlib.LENET5, False, False),
    ('lenet3c1l', testlib.LENET3, True, True),
    ('lenet5', testlib.LENET5, True, True),
  ],
)
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_mac_model_matches_layer_counts(name, layers, mask_rule, triangular, seed):
  assignment = dict(testlib.random_assignment(layers, 4, seed=seed, low=1, high=7, allow_zero=True))
  model = nnx.eval_shape(
    lambda: zoo.build_model(
      name,
      num_classes=10,
      input_shape=testlib.MNIST_SHAPE,
      num_levels=4,
      assignment=assignment,
      mask_rule=mask_rule,
      triangular=triangular,
    )
  )
  mm = budgets.MacModel.of(model)
  got = mm.subnet_macs([assignment[n] for n in mm.names])
  np.testing.assert_array_equal(got, _macs_by_layers(model))


def _lenet(num_levels, sizes, seed=0, triangular=False):
  return testlib.random_model(
    'lenet3c1l', seed, num_levels=num_levels, assignment=sizes, triangular=triangular, mean=(0.3,), std=(0.3,)
  )


def _level0_lenet(k, channels, triangular=False):
  """A LeNet-3C1L with every neuron at level 0, its MacModel and its full MACs."""
  model = _lenet(k, {n: levels.level0_sizes(channels, k) for n in testlib.LENET3}, triangular=triangular)
  mm = budgets.MacModel.of(model)
  return model, mm, mm.subnet_macs([levels.level0_sizes(channels, k)] * 3)[0]


def _meta(model):
  return structure.model_meta(model, 'lenet3c1l', 10)


@pytest.mark.parametrize('triangular,allocation', [(False, 'global'), (True, 'global'), (False, 'uniform_fill')])
def test_assign_levels_meets_every_budget_within_one_neuron(triangular, allocation):
  k = 4
  model, mm, full = _level0_lenet(k, 12, triangular=triangular)
  targets = np.array([0.05, 0.2, 0.45, 0.8]) * full
  rng = np.random.RandomState(0)
  scores = {n: rng.uniform(size=12) for n in testlib.LENET3}
  start = surgery.neuron_levels(model)
  new = construct.assign_levels(start, scores, mm, targets, allocation=allocation)
  rebuilt, _ = surgery.relevel(model, _meta(model), new)
  macs = _macs_by_layers(rebuilt)  # counted by the layers' masks, not by MacModel
  assert np.all(macs <= targets), (macs, targets)
  for n in testlib.LENET3:
    assert np.all((new[n] >= start[n]) | (new[n] == surgery.REMOVED)), 'neurons only move up'
    assert np.sum(new[n] == 0) >= 1, 'every layer keeps a level-0 neuron'
  # Moves go one level at a time, levels in order, so the neurons that started at or
  # below `lvl` and ended above it (or removed) are exactly those moved out of `lvl`.
  # The fill is maximal: putting any one of them back breaks the budget (counted by
  # brute force over the layers' masks, not by MacModel).
  checked = 0
  for lvl in range(k):
    moved = [
      (n, i)
      for n in testlib.LENET3
      for i in range(12)
      if start[n][i] <= lvl and (new[n][i] == surgery.REMOVED or new[n][i] > lvl)
    ]
    for n, i in moved:
      undo = {m: v.copy() for m, v in new.items()}
      undo[n][i] = lvl
      back, _ = surgery.relevel(model, _meta(model), undo)
      assert _macs_by_layers(back)[lvl] > targets[lvl], f'level {lvl}: {n}[{i}] still fits back'
      checked += 1
  assert checked > 10


def test_assign_levels_per_mac_meets_budgets_and_spares_cheap_neurons():
  k = 3
  model, mm, full = _level0_lenet(k, 12)
  targets = np.array([0.1, 0.4, 0.8]) * full
  scores = {n: np.ones(12) for n in testlib.LENET3}  # equal importance: cost decides
  start = surgery.neuron_levels(model)
  plain = construct.assign_levels(start, scores, mm, targets)
  per_mac = construct.assign_levels(start, scores, mm, targets, per_mac=True)
  for new in (plain, per_mac):
    rebuilt, _ = surgery.relevel(model, _meta(model), new)
    assert np.all(np.cumsum(rebuilt.delta_macs().sum(0)) <= targets)
  # conv1 neurons cost ~9 x 676 MACs each, far less than conv2's: per MAC, they stay.
  assert np.sum(per_mac['conv1'] == 0) > np.sum(plain['conv1'] == 0)


def test_check_budgets_rejects_infeasible():
  k = 3
  model = _lenet(k, {n: levels.level0_sizes(8, k) for n in testlib.LENET3})
  mm = budgets.MacModel.of(model)
  base = budgets.dense_macs('lenet3c1l', input_shape=testlib.MNIST_SHAPE, num_classes=10, width=0.25)
  ok = budgets.check_budgets((0.1, 0.5, 1.0), base, mm, [8, 8, 8])
  np.testing.assert_allclose(ok, np.array([0.1, 0.5, 1.0]) * base)
  with pytest.raises(ValueError, match='strictly increasing'):
    budgets.check_budgets((0.5, 0.4, 1.0), base, mm, [8, 8, 8])
  with pytest.raises(ValueError, match='one neuron per layer'):
    budgets.check_budgets((1e-4, 0.5, 1.0), base, mm, [8, 8, 8])
  with pytest.raises(ValueError, match='exceeds the widened network'):
    budgets.check_budgets((0.1, 0.5, 1.5), base, mm, [8, 8, 8])


def test_construct_rejects_infeasible_budgets_before_training(tmp_path, monkeypatch):
  ds = datasets.load_dataset('digits')
  cfg = config.from_dict(
    {
      'method': 'steppingnet',
      'data.name': 'digits',
      'model.name': 'mlp',
      'model.width': 0.1,
      'model.num_levels': 2,
      'construction.budgets': (0.2, 5.0),
      'construction.widen': 2.0,
      'train.num_epochs': 1,
      'train.batch_size': 32,
      'train.progress': False,
    }
  )
  monkeypatch.setattr(run.PhasedRun, 'train', lambda *a, **k: pytest.fail('trained'))
  with pytest.raises(ValueError, match='exceeds the widened network'):
    construct.construct(cfg, str(tmp_path), ds)
  assert not (tmp_path / 'metrics.jsonl').exists(), 'wrote to the workdir before the checks'


def test_relevel_unchanged_levels_is_identity():
  model = testlib.built_model('lenet3c1l')
  same, _ = surgery.relevel(model, _meta(model), surgery.neuron_levels(model))
  x = jnp.asarray(testlib.images(testlib.MNIST_SHAPE, batch=3))
  testlib.assert_close(same.exits(x), model.exits(x))


def test_relevel_move_up_equals_hand_zeroed_connections():
  """Moving neurons up (and removing some) equals the old net with those links cut by hand."""
  model = testlib.built_model('lenet3c1l')
  levels = surgery.neuron_levels(model)
  k = model.num_levels
  new = {n: v.copy() for n, v in levels.items()}
  moved = {}
  for n in testlib.LENET3:
    cands = np.nonzero(levels[n] < k - 1)[0]
    i = int(cands[-1])
    new[n][i] = levels[n][i] + 1
    moved[n] = i
  top_idx = np.nonzero(levels['conv3'] == k - 1)[0]
  removed = int(top_idx[0]) if len(top_idx) else None
  if removed is not None:
    new['conv3'][removed] = surgery.REMOVED
  rebuilt, _ = surgery.relevel(model, _meta(model), new)

  # Expected: the old parameters, masked, with the links the new levels forbid set to 0.
  ref = nnx.clone(model)
  names = list(testlib.LENET3)
  for li, n in enumerate(names):
    unit = ref.units[li]
    w = np.asarray(unit.kernel[...]) * unit.conn.mask
    prev_new = new[names[li - 1]] if li else np.zeros(w.shape[-2], np.int64)
    for i in range(w.shape[-2]):
      for o in range(w.shape[-1]):
        if prev_new[i] == surgery.REMOVED or new[n][o] == surgery.REMOVED or prev_new[i] > new[n][o]:
          w[..., i, o] = 0.0
    unit.kernel[...] = jnp.asarray(w)
  head = np.asarray(ref.head.kernel[...]).copy()
  if removed is not None:
    head[:, removed] = 0.0
  ref.head.kernel[...] = jnp.asarray(head)
  x = jnp.asarray(testlib.images(testlib.MNIST_SHAPE, batch=3))
  testlib.assert_close(rebuilt(x), ref(x))  # top-level logits


def _per_example_loss(model, x, y, weights):
  logits = model.exits(x)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[None, :])
  return (jnp.asarray(weights)[:, None] * ce).sum(0)  # [B]


def _finite_difference(model, x, y, weights, layer, channel, eps=1e-3):
  """d L_b / d eps of scaling one channel's output by (1 + eps), per example, through
  its BN scale and bias (ReLU and max-pool are positively homogeneous)."""
  out = []
  for sign in (1.0, -1.0):
    m = nnx.clone(model)
    bn = m.units[layer].bn
    f = 1.0 + sign * eps
    bn.scale[channel] = bn.scale[channel] * f
    bn.bias[channel] = bn.bias[channel] * f
    out.append(np.asarray(_per_example_loss(m, x, y, weights), np.float64))
  return (out[0] - out[1]) / (2 * eps)


@pytest.mark.parametrize('spec_id', ['mlp', 'lenet3c1l'])
def test_taylor_scores_match_finite_differences(spec_id):
  model = testlib.built_model(spec_id)
  x = testlib.images(model.input_shape, batch=6, seed=3)
  y = np.arange(6) % 10
  w = tuple(float(v) for v in np.linspace(1.0, 2.0, model.num_levels))
  got = importance.taylor_scores(model, x, y, w)
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  for layer in range(len(model.units)):
    c_count = got[layer].shape[0]
    for c in sorted({0, c_count // 2, c_count - 1}):
      fd = _finite_difference(model, xj, yj, w, layer, c)
      np.testing.assert_allclose(
        got[layer][c], np.abs(fd).mean(), rtol=2e-2, atol=1e-6, err_msg=f'layer {layer} channel {c}'
      )


def test_class_based_importance_counts_classes_above_threshold():
  """MLP (one position per channel): per class, |mean_b dL_b/d eps| by finite differences."""
  model = testlib.built_model('mlp')
  x = testlib.images(model.input_shape, batch=12, seed=5)
  y = np.arange(12) % 3
  w = (1.0,) * model.num_levels
  raw = importance.class_scores(model, x, y, w, num_classes=3)
  for layer in range(len(model.units)):
    c_count = raw[layer].shape[1]
    fd = np.zeros((3, c_count))
    for c in range(c_count):
      d = _finite_difference(model, jnp.asarray(x), jnp.asarray(y), w, layer, c)
      fd[:, c] = [abs(d[y == k].mean()) for k in range(3)]
    np.testing.assert_allclose(raw[layer], fd, rtol=2e-2, atol=1e-6)
  scores = importance.importance(model, x, y, method='class', weights=w, num_classes=3, class_threshold=0.5)
  for layer, name in enumerate(model.unit_names):
    s = raw[layer]
    counts = (s > 0.5 * s.mean()).sum(0)
    np.testing.assert_array_equal(np.floor(scores[name]), counts)
    assert np.all(scores[name] - counts < 1.0)


def test_round_targets_reach_budgets_geometrically():
  cur = np.array([100.0, 100.0])
  b = np.array([10.0, 40.0])
  t1 = construct.round_targets(cur, b, 1, 2)
  np.testing.assert_allclose(t1, np.floor([100 * (0.1**0.5), 100 * (0.4**0.5)]))
  np.testing.assert_array_equal(construct.round_targets(cur, b, 2, 2), b)


def test_construct_end_to_end_meets_budgets_and_loads(tmp_path):
  import stepnet_jax

  ds = datasets.load_dataset('digits')
  cfg = config.from_dict(
    {
      'method': 'steppingnet',
      'data.name': 'digits',
      'model.name': 'mlp',
      'model.width': 0.125,
      'model.num_levels': 3,
      'construction.budgets': (0.15, 0.4, 0.9),
      'construction.widen': 2.0,
      'train.num_epochs': 3,
      'train.batch_size': 64,
      'optim.learning_rate': 3e-3,
      'construction.pretrain_epochs': 1.0,
      'construction.round_epochs': 0.5,
      'construction.rounds': 2,
      'construction.importance_examples': 128,
      'train.progress': False,
      'train.log_every_steps': 5,
    }
  )
  result = construct.construct(cfg, str(tmp_path), ds)
  net = stepnet_jax.load(str(tmp_path))
  macs = np.asarray(net.level_macs)
  np.testing.assert_array_equal(macs, result['level_macs'])
  assert np.all(macs <= np.asarray(result['budget_macs']))
  assert net.reusable and net.meta['config']['method'] == 'steppingnet'
  # stepping the constructed net gives the direct subnet logits
  x = jnp.asarray(ds.test_images[:8])
  cache = net.start(x)
  for _lvl in range(1, net.num_levels):
    cache = net.advance(cache)
  testlib.assert_close(cache.logits, net.forward(x, net.num_levels - 1))
  # Observed 0.386 / 0.547 / 0.856 on an AMD EPYC and 0.331 / 0.483 / 0.858 on an Intel Xeon
  # (the same code and packages; float rounding differs between the CPUs' kernels). Tiny
  # subnets (0.1 / 0.6 / 2.6 k MACs), 10 classes: each exit well above chance (0.1), rising.
  acc = result['test_accuracy']
  assert np.all(np.asarray(acc) >= [0.25, 0.40, 0.80]) and acc[0] < acc[1] < acc[2], acc


def test_rounds_without_retraining_still_relevel(tmp_path):
  """``round_epochs=0``: every round ends at the pretraining's step; each still re-levels
  (two rounds logged) and the budgets are met."""
  cfg = config.from_dict(
    {
      'method': 'steppingnet',
      'data.name': 'digits',
      'model.name': 'mlp',
      'model.width': 0.125,
      'model.num_levels': 2,
      'construction.budgets': (0.2, 0.6),
      'train.num_epochs': 1,
      'train.batch_size': 64,
      'construction.pretrain_epochs': 0.5,
      'construction.round_epochs': 0.0,
      'construction.rounds': 2,
      'construction.importance_examples': 64,
      'train.progress': False,
    }
  )
  result = construct.construct(cfg, str(tmp_path), datasets.subset(datasets.load_dataset('digits'), train=640))
  assert [r['round'] for r in result['rounds']] == [1, 2]
  assert np.all(np.asarray(result['level_macs']) <= np.asarray(result['budget_macs']))


def test_finished_construction_is_reused_and_other_settings_refused(tmp_path, monkeypatch):
  ds = datasets.load_dataset('digits')
  kw = {
    'method': 'steppingnet',
    'data.name': 'digits',
    'model.name': 'mlp',
    'model.width': 0.0625,
    'model.num_levels': 2,
    'construction.budgets': (0.3, 0.9),
    'construction.widen': 2.0,
    'train.num_epochs': 1,
    'train.batch_size': 128,
    'construction.pretrain_epochs': 0.5,
    'construction.round_epochs': 0.25,
    'construction.rounds': 1,
    'construction.importance_examples': 64,
    'train.progress': False,
  }
  first = construct.construct(config.from_dict(kw), str(tmp_path), ds)
  monkeypatch.setattr(run.PhasedRun, 'train', lambda *a, **k: pytest.fail('retrained'))
  assert construct.construct(config.from_dict(kw), str(tmp_path), ds) == first
  with pytest.raises(ValueError, match=r'other settings \(seed\)'):
    construct.construct(config.from_dict(dict(kw, seed=1)), str(tmp_path), ds)


def test_uniform_allocation_shrinks_layers_alike():
  k = 3
  model, mm, full = _level0_lenet(k, 16)
  targets = np.array([0.1, 0.4, 0.8]) * full
  rng = np.random.RandomState(1)
  scores = {n: rng.uniform(size=16) * (10.0 if n == 'conv3' else 1.0) for n in testlib.LENET3}
  new = construct.assign_levels(surgery.neuron_levels(model), scores, mm, targets, allocation='uniform')
  assert np.all(mm.subnet_macs(mm.counts_of(new, k)) <= targets)
  for lvl in range(k):
    kept = [np.sum((new[n] >= 0) & (new[n] <= lvl)) for n in testlib.LENET3]
    assert max(kept) - min(kept) <= 1, (lvl, kept)  # equal widths (all layers have 16 channels)
  for n in testlib.LENET3:  # inside a layer, importance decides: level-0 neurons outrank the rest
    if np.any(new[n] > 0):
      assert scores[n][new[n] == 0].min() >= scores[n][(new[n] > 0) | (new[n] < 0)].max()
  # uniform_fill starts from the same equal shares and only adds level-0 neurons into the slack
  filled = construct.assign_levels(surgery.neuron_levels(model), scores, mm, targets, allocation='uniform_fill')
  macs, filled_macs = mm.subnet_macs(mm.counts_of(new, k)), mm.subnet_macs(mm.counts_of(filled, k))
  assert np.all(filled_macs <= targets) and filled_macs[0] >= macs[0]
  assert all(np.all(filled[n][new[n] == 0] == 0) for n in testlib.LENET3)


def test_saved_configs_match_with_defaults_for_new_keys():
  cfg = config.from_dict({'train.num_epochs': 2})
  saved = json.loads(json.dumps(cfg.to_dict()))
  del saved['construction']['allocation']  # a key added after the config was saved
  assert config.differing_keys(saved, cfg) == []
  assert config.differing_keys(config.merge(saved, {'train': {'num_epochs': 3}}), cfg) == ['train.num_epochs']
  assert config.differing_keys(config.merge(saved, {'train': {'progress': False}}), cfg) == []  # reporting only
  assert config.differing_keys(config.merge(saved, {'selection': {'epochs': 3}}), cfg) == []  # not the network's
