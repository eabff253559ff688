"""Stopping policies and the one compiled anytime program.

Policies are checked on constructed logits against numpy; the compiled program against
stepping each input alone in Python (batch 1, the library's start/advance), for both
batch strategies, for a reusable network, a recomputing one and a stateful policy.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stepnet_jax
import testlib
from stepnet_jax import anytime, models, policies


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_heuristic_policies_stop_where_numpy_says():
  rng = np.random.RandomState(0)
  logits = rng.normal(0, 2, (50, 7)).astype(np.float32)
  p = _softmax(logits.astype(np.float64))
  top2 = np.sort(p, -1)[:, ::-1][:, :2]
  entropy = -(p * np.log(p)).sum(-1)
  level = jnp.int32(1)
  for policy, expected in [
      (policies.Confidence(0.5), p.max(-1) >= 0.5),
      (policies.Margin(0.3), top2[:, 0] - top2[:, 1] >= 0.3),
      (policies.Entropy(1.0), entropy <= 1.0)]:
    stop, _ = jax.jit(lambda pol, z: pol.stop(z, level, pol.init(50, 7)))(policy, logits)
    assert 5 < expected.sum() < 45                       # the constructed logits straddle the knob
    np.testing.assert_array_equal(np.asarray(stop), expected, err_msg=type(policy).__name__)
  budget = policies.MacBudget(250.0, (100, 200, 300))
  for lvl, expected in [(0, False), (1, True), (2, True)]:   # after level 1, level 2 would cost 300 > 250
    stop, _ = budget.stop(logits, jnp.int32(lvl), ())
    assert np.all(np.asarray(stop) == expected), lvl
  assert policies.heuristic('entropy', 0.7) == policies.Entropy(0.7)
  with pytest.raises(ValueError, match="unknown policy 'greedy'"):
    policies.heuristic('greedy', 0.5)


def test_bucket_sizes():
  assert anytime.bucket_sizes(256) == (256, 128, 64, 32, 16, 8, 4, 2, 1)
  assert anytime.bucket_sizes(256, 4) == (256, 64, 16, 4, 1)
  assert anytime.bucket_sizes(10, 3) == (10, 4, 2, 1)
  assert anytime.bucket_sizes(1) == (1,)


def _alone(net, x, policy):
  """Reference: each input stepped alone (batch 1) with start/advance, the policy asked in Python."""
  logits, levels = [], []
  for i in range(x.shape[0]):
    xi = x[i:i + 1]
    state = policy.init(1, net.functions.exits(net.variables, xi).shape[-1])
    if net.reusable:
      cache = net.start(xi)
      out = cache.logits
    else:
      out = net.forward(xi, 0)
    level = 0
    while True:
      stop, state = policy.stop(out, jnp.int32(level), state)
      if bool(stop[0]) or level == net.num_levels - 1:
        break
      level += 1
      if net.reusable:
        cache = net.advance(cache)
        out = cache.logits
      else:
        out = net.forward(xi, level)
    logits.append(np.asarray(out[0]))
    levels.append(level)
  return np.stack(logits), np.asarray(levels)


@pytest.fixture(scope='module')
def nets():
  reusable = stepnet_jax.Stepper(testlib.built_model('lenet3c1l'))
  with testlib.numpy_initializers(3):
    slim = models.build_model('lenet3c1l', num_classes=10, input_shape=testlib.MNIST_SHAPE, num_levels=3,
                              assignment={'conv1': (3, 2, 3), 'conv2': (3, 3, 2), 'conv3': (2, 3, 3)},
                              mask_rule=False, mean=(0.3,), std=(0.3,))
  return {'reusable': reusable, 'recompute': stepnet_jax.Stepper(testlib.randomize(slim, 3))}


def _policy_with_varied_exits(net, x):
  """The confidence threshold (among the probabilities' quantiles) that spreads the inputs
  over the most exit levels."""
  probs = np.asarray(jax.nn.softmax(net.exits(x), -1)).max(-1)      # [K, B]

  def exits(t):
    above = probs >= t
    above[-1] = True
    return above.argmax(0)

  best = max(np.quantile(probs, np.linspace(0.05, 0.95, 19)), key=lambda t: len(set(exits(t).tolist())))
  return policies.Confidence(float(best) + 1e-6)


@pytest.mark.parametrize('kind', ['reusable', 'recompute'])
@pytest.mark.parametrize('strategy', anytime.STRATEGIES)
def test_compiled_predict_equals_stepping_each_input_alone(nets, kind, strategy):
  net = nets[kind]
  x = testlib.images(testlib.MNIST_SHAPE, batch=12, seed=7)
  policy = _policy_with_varied_exits(net, x)
  ref_logits, ref_levels = _alone(net, x, policy)
  assert len(set(ref_levels.tolist())) >= 3, ref_levels       # several exit levels in the batch
  got = net.predict(x, policy, strategy)
  np.testing.assert_array_equal(np.asarray(got.exit_level), ref_levels)
  testlib.assert_close(got.logits, ref_logits)
  np.testing.assert_array_equal(np.asarray(got.macs), np.asarray(net.macs_to_reach)[ref_levels])


@pytest.fixture(scope='module')
def digits_net(tmp_path_factory):
  """A 3-level MLP trained for 3 epochs on the digits, 300 training images held out."""
  from stepnet_jax import config, data
  from stepnet_jax.training import run
  cfg = config.from_dict({'data.name': 'digits', 'data.validation_examples': 300, 'model.name': 'mlp',
                          'model.width': 0.25, 'model.num_levels': 3, 'train.num_epochs': 3, 'train.batch_size': 64,
                          'optim.learning_rate': 3e-3, 'train.progress': False, 'selection.epochs': 25,
                          'selection.batch_size': 100, 'selection.learning_rate': 1e-2})
  workdir = str(tmp_path_factory.mktemp('digits_net'))
  full = data.load_digits()
  run.train_and_evaluate(cfg, workdir, dataset=full)
  _, held = data.split_validation(full, 300, cfg.seed)
  return cfg, stepnet_jax.load(workdir), full.train_images[held], full.train_labels[held], full


def test_a_stateful_learned_policy_in_the_program(digits_net):
  """The selection module with history: its state (the previous exit's probabilities) is per input."""
  from stepnet_jax import selection
  net, x = digits_net[1], jnp.asarray(digits_net[4].test_images[:12])
  params = policies.init_selector(jax.random.key(0), 10, net.num_levels, hidden=8)
  params['w2'] = jax.random.normal(jax.random.key(1), (8,)) * 3.0
  # The threshold among the module's stop probabilities that spreads the inputs over the most levels.
  stop_p = np.asarray(jax.nn.sigmoid(selection.stop_logits(params, jax.nn.softmax(net.exits(x), -1), True)))

  def exits(t):
    above = stop_p > t
    above[-1] = True
    return above.argmax(0)

  best = max(np.quantile(stop_p, np.linspace(0.05, 0.95, 19)), key=lambda t: len(set(exits(t).tolist())))
  learned = policies.Learned(params, net.num_levels, history=True, threshold=float(best))
  ref_logits, ref_levels = _alone(net, x, learned)
  assert len(set(ref_levels.tolist())) >= 3, ref_levels
  for strategy in anytime.STRATEGIES:
    got = net.predict(x, learned, strategy)
    np.testing.assert_array_equal(np.asarray(got.exit_level), ref_levels, err_msg=strategy)
    testlib.assert_close(got.logits, ref_logits)


def test_a_single_level_network_has_nothing_to_decide():
  program = anytime.recompute_program([lambda v, x: x[:, :3] * v], (5,))
  for strategy in anytime.STRATEGIES:
    out = anytime.make_predict(program, strategy)(2.0, jnp.ones((4, 6)), policies.Confidence(2.0))
    assert np.asarray(out.exit_level).tolist() == [0] * 4 and np.asarray(out.macs).tolist() == [5] * 4


def test_compact_steps_only_the_running_inputs():
  """With 1 of 8 inputs still running, the compact program steps a bucket of 1 (masked: all 8),
  and padding rows marked invalid never keep a level running."""
  seen = []
  forwards = [lambda v, x, k=k: jax.debug.callback(lambda n=x.shape[0], k=k: seen.append((k, n))) or x[:, :4] * v[k]
              for k in range(3)]
  program = anytime.recompute_program(forwards, (1, 3, 6))
  v = jnp.asarray([1.0, 2.0, 3.0])
  x = jnp.zeros((8, 4)).at[:, 0].set(5.0).at[3, 0].set(0.2)           # input 3 is unsure at level 0
  policy = policies.Confidence(0.9)
  for strategy, expected in (('compact', [(0, 8), (1, 1), (2, 1)]), ('masked', [(0, 8), (1, 8), (2, 8)])):
    seen.clear()
    out = anytime.make_predict(program, strategy)(v, x, policy)
    jax.effects_barrier()
    assert seen == expected, (strategy, seen)
    assert np.asarray(out.exit_level).tolist() == [0, 0, 0, 2, 0, 0, 0, 0]
  seen.clear()
  valid = jnp.arange(8) != 3                                            # input 3 is padding
  anytime.make_predict(program, 'masked')(v, x, policy, valid)
  jax.effects_barrier()
  assert seen == [(0, 8)]


def test_levels_nobody_needs_are_never_run():
  """Level k's forward runs (once per batch) only while some input still wants it."""
  ran = []
  forwards = [lambda v, x, k=k: jax.debug.callback(lambda k=k: ran.append(k)) or x[:, :4] * v[k]
              for k in range(4)]
  program = anytime.recompute_program(forwards, (1, 3, 6, 10))
  fn = anytime.make_predict(program, 'masked')
  v = jnp.asarray([1.0, 2.0, 3.0, 4.0])
  x = jnp.asarray([[5.0, 0, 0, 0], [0.2, 0, 0, 0]])               # probabilities rise with the level
  stop_all = policies.Confidence(0.0)
  out = fn(v, x, stop_all)
  jax.effects_barrier()
  assert ran == [0] and np.asarray(out.exit_level).tolist() == [0, 0]
  ran.clear()
  p1 = _softmax(np.asarray(x[1:] * 2.0, np.float64)).max()
  out = fn(v, x, policies.Confidence(float(p1) - 1e-4))         # input 0 stops at 0, input 1 at level 1
  jax.effects_barrier()
  assert ran == [0, 1], ran
  assert np.asarray(out.exit_level).tolist() == [0, 1] and np.asarray(out.macs).tolist() == [1, 3]


# ------------------------------------------------------------------ REINFORCE


def test_reinforce_estimate_is_unbiased_against_the_exact_gradient():
  """On a tiny problem (4 inputs, 3 levels, fixed exits) the mean of many REINFORCE
  estimates equals the exact gradient of the expected reward, with and without a
  (decision-independent) baseline."""
  from stepnet_jax import selection
  rng = np.random.RandomState(0)
  logits = jnp.asarray(rng.normal(0, 2, (3, 4, 5)), jnp.float32)
  labels = jnp.asarray([0, 1, 2, 3])
  reward = selection.rewards(logits, labels, jnp.asarray([0.2, 0.5, 1.0]), 0.6)
  probs = jax.nn.softmax(logits, -1)
  params = policies.init_selector(jax.random.key(1), 5, 3, hidden=4, history=True)
  params['w2'] = jnp.asarray(rng.normal(0, 1, 4), jnp.float32)
  exact = jax.grad(selection.expected_reward)(params, probs, reward, True)

  def estimate(key, baseline, samples):
    return jax.grad(lambda p: -selection.reinforce_terms(p, probs, reward, key, baseline, True,
                                                         samples)['surrogate'])(params)

  keys = jax.random.split(jax.random.key(2), 40000)
  for baseline, samples in ((jnp.zeros(3), 1), (jnp.asarray([0.3, 0.1, -0.2]), 1), (jnp.zeros(3), 4)):
    grads = jax.jit(jax.vmap(lambda k: estimate(k, baseline, samples)))(keys)
    for name in params:
      mean, std = grads[name].mean(0), grads[name].std(0) / np.sqrt(len(keys))
      assert np.all(np.abs(mean - exact[name]) <= 5 * std + 1e-4), (name, mean, exact[name])
  # The exact objective itself: sum over stop levels of P(stop at k) * reward, by brute force.
  z = selection.stop_logits(params, probs, True)
  p = np.array(jax.nn.sigmoid(z))
  p[-1] = 1.0
  brute = np.mean([sum(p[k, b] * np.prod(1 - p[:k, b]) * float(reward[k, b]) for k in range(3)) for b in range(4)])
  np.testing.assert_allclose(float(selection.expected_reward(params, probs, reward, True)), brute, rtol=1e-5)


def test_frozen_selection_updates_only_the_selector():
  """The frozen network's optimizer slot is zero whatever its gradient; the selector's is Adam."""
  from flax import nnx
  from stepnet_jax import selection
  net = testlib.built_model('mlp')
  model = selection.PolicyNet(net, selection.Selector(10, net.num_levels, 4, True, 0))
  _, params, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
  grads = jax.tree.map(jnp.ones_like, params)
  for joint in (False, True):
    tx = selection._optimizer(1e-2, joint, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    net_updates = jax.tree.leaves(updates['net'])
    assert all(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(updates['selector']))
    assert all(np.all(np.asarray(u) == 0) for u in net_updates) == (not joint)


def test_selection_module_trades_accuracy_for_macs(digits_net):
  """A high MAC price stops inputs earlier than a free one; the frozen network is untouched,
  and the learned policy runs in the compiled program."""
  from stepnet_jax import selection
  from flax import nnx
  cfg, net, x_val, y_val, full = digits_net
  graph_model = nnx.merge(net.graphdef, net.variables)
  before = jax.tree.map(np.asarray, nnx.state(graph_model))
  avg = {}
  for lam in (0.0, 1.5):
    policy, variables = selection.train_selector(cfg, graph_model, net.macs_to_reach, x_val, y_val, 10,
                                                 cost_weight=lam)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, variables), before)
    out = net.predict(jnp.asarray(full.test_images), policy)
    avg[lam] = float(np.asarray(out.macs).mean())
  assert avg[1.5] < 0.6 * avg[0.0], avg
  assert avg[0.0] > 0.8 * net.macs_to_reach[-1], avg        # free MACs: (nearly) everyone goes to the top


# ------------------------------------------------------------------ deployment artifacts


def test_exported_chain_runs_without_the_library_and_matches_every_level(tmp_path, nets):
  """export.save writes start/step modules; a fresh Python that imports only jax and numpy
  (the README's recipe) runs the chain, and every level's logits equal the library's."""
  import json
  import subprocess
  import sys
  from stepnet_jax import export
  net = nets['reusable']
  manifest = export.save(net, str(tmp_path / 'art'))
  assert manifest['platforms'] == ['cpu', 'cuda'] and len(manifest['steps']) == net.num_levels - 1
  assert manifest['level_macs'] == list(net.level_macs) and manifest['input_dtype'] == 'uint8'
  x = np.asarray(testlib.images(testlib.MNIST_SHAPE, batch=5, seed=9))
  np.save(tmp_path / 'x.npy', x)
  script = f'''
import json, sys, jax, numpy as np
d = {str(tmp_path / 'art')!r}
m = json.load(open(d + '/manifest.json'))
load = lambda name: jax.export.deserialize(bytearray(open(d + '/' + name, 'rb').read()))
start, steps = load(m['start']), [load(name) for name in m['steps']]
cache = start.call(np.load({str(tmp_path / 'x.npy')!r}))
out = [np.asarray(cache[-1])]
for step in steps:
  cache = step.call(*cache)
  out.append(np.asarray(cache[-1]))
np.save({str(tmp_path / 'out.npy')!r}, np.stack(out))
assert not [k for k in sys.modules if k.startswith('stepnet_jax')]
'''
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  testlib.assert_close(np.load(tmp_path / 'out.npy'), net.exits(jnp.asarray(x)))
  with open(tmp_path / 'art' / 'manifest.json') as f:
    assert json.load(f) == manifest
  with pytest.raises(ValueError, match='only a reusable network'):
    export.save(nets['recompute'], str(tmp_path / 'no'))


# ------------------------------------------------------------------ the study command


def test_adaptive_study_end_to_end_on_digits(tmp_path):
  """The whole study on the digits with tiny settings: files, format, the validation split
  kept apart from what the networks trained on, and the points' bookkeeping."""
  import json
  import os
  from stepnet_jax import adaptive, config, data, restore
  cc = config.load_file(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                                     'adaptive_fashion_mnist.py'))
  cc.common.data.name = 'digits'
  cc.common.model.name = 'mlp'
  # The test split and the choice half (150) share one batch shape: each program compiles once.
  cc.quick.common.data = dict(train_subset=0, test_subset=150, validation_examples=300)
  cc.quick.common.model = dict(width=0.125)
  cc.quick.common.train = dict(num_epochs=2, batch_size=64, eval_batch_size=400, progress=False)
  cc.quick.steppingnet.construction.rounds = 1
  cc.quick.families = ('steppingnet', 'cascade')
  cc.quick.lambdas = (0.5,)
  cc.quick.knobs.confidence = (0.5, 0.9)
  out = adaptive.adaptive(cc, str(tmp_path), quick=True)
  saved = json.loads((tmp_path / 'adaptive.json').read_text())
  assert saved == json.loads(json.dumps(out))
  assert set(saved['methods']) == {'steppingnet_confidence', 'steppingnet_entropy', 'steppingnet_learned',
                                   'cascade_confidence', 'cascade_learned'}
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
  full = data.load_digits()
  held = np.load(tmp_path / 'validation_indices.npy')
  assert len(np.unique(held)) == 300 and saved['validation']['examples'] == 300
  trained_on, _ = run.prepare_data(config.from_saved(restore.restore_meta(str(tmp_path / 'steppingnet'))['config']),
                                   full)
  count = lambda images: collections.Counter(x.tobytes() for x in images)
  assert count(full.train_images) - count(trained_on.train_images) == count(full.train_images[held])
  own = [stepnet_jax.load(str(tmp_path / 'independent' / f'budget{k}')).level_macs[0]
         for k in range(len(saved['static']['cascade']))]
  assert [r['macs_to_reach'] for r in saved['static']['cascade']] == list(np.cumsum(own))
  for name in ('adaptive.md', 'adaptive.png'):
    assert (tmp_path / name).stat().st_size > 0
  assert 'Targets' in (tmp_path / 'adaptive.md').read_text()


def test_pure_predict_and_run_until(nets, monkeypatch):
  """stepping.predict(graphdef, variables, ...) is the Stepper's program; run_until steps while
  the measured next step fits the deadline."""
  from stepnet_jax import stepping
  net = nets['reusable']
  x = testlib.images(testlib.MNIST_SHAPE, batch=6, seed=10)
  policy = _policy_with_varied_exits(net, x)
  pure = jax.jit(stepping.predict, static_argnums=(0,), static_argnames='strategy')(net.graphdef, net.variables, x,
                                                                                      policy)
  got = net.predict(x, policy, 'masked')
  np.testing.assert_array_equal(np.asarray(pure.exit_level), np.asarray(got.exit_level))
  testlib.assert_close(pure.logits, got.logits)
  assert net.run_until(x, deadline_ms=0.0).level == 0                      # level 0 always runs
  assert net.run_until(x, deadline_ms=1e9).level == net.num_levels - 1
  monkeypatch.setitem(net._latency_ms, tuple(x.shape) + (str(x.dtype),), [0.0, 0.0, 1e6, 0.0])
  assert net.run_until(x, deadline_ms=1e5).level == 1                      # level 2 would take 1e6 ms


def test_joint_selection_fine_tunes_the_exits(digits_net):
  from flax import nnx
  from stepnet_jax import selection
  cfg, net, x_val, y_val, _ = digits_net
  cfg = cfg.replace(**{'selection.joint': True, 'selection.epochs': 2})
  model = nnx.merge(net.graphdef, net.variables)
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  _, variables = selection.train_selector(cfg, model, net.macs_to_reach, x_val, y_val, 10, cost_weight=0.1)
  after = nnx.state(nnx.merge(net.graphdef, variables), nnx.Param)
  changed = [not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
  assert all(changed), changed
