"""Guan et al.'s selection module: trained by REINFORCE (an unbiased estimate of the exact
gradient), frozen or fine-tuning the exits, inside the compiled program, and trading
accuracy for MACs on a trained network."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testlib

import stepnet_jax
from stepnet_jax.core import anytime
from stepnet_jax.inference import policies


@pytest.fixture(scope='module')
def digits_net(tmp_path_factory):
  """A 3-level MLP trained for 3 epochs on the digits, 300 training images held out."""
  from stepnet_jax import config
  from stepnet_jax.data import datasets
  from stepnet_jax.training import run

  cfg = config.from_dict(
    {
      'data.name': 'digits',
      'data.validation_examples': 300,
      'model.name': 'mlp',
      'model.width': 0.25,
      'model.num_levels': 3,
      'train.num_epochs': 3,
      'train.batch_size': 64,
      'optim.learning_rate': 3e-3,
      'train.progress': False,
      'selection.epochs': 25,
      'selection.batch_size': 100,
      'selection.learning_rate': 1e-2,
    }
  )
  workdir = str(tmp_path_factory.mktemp('digits_net'))
  full = datasets.load_digits()
  run.train_and_evaluate(cfg, workdir, dataset=full)
  _, held = datasets.split_validation(full, 300, cfg.seed)
  return cfg, stepnet_jax.load(workdir), full.train_images[held], full.train_labels[held], full


def test_a_stateful_learned_policy_in_the_program(digits_net):
  """The selection module with history: its state (the previous exit's probabilities) is per input."""
  from stepnet_jax.methods import selection

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
  ref_logits, ref_levels = testlib.step_each_alone(net, x, learned)
  assert len(set(ref_levels.tolist())) >= 3, ref_levels
  for strategy in anytime.STRATEGIES:
    got = net.predict(x, learned, strategy)
    np.testing.assert_array_equal(np.asarray(got.exit_level), ref_levels, err_msg=strategy)
    testlib.assert_close(got.logits, ref_logits)


def test_reinforce_estimate_is_unbiased_against_the_exact_gradient():
  """On a tiny problem (4 inputs, 3 levels, fixed exits) the mean of many REINFORCE
  estimates equals the exact gradient of the expected reward, with and without a
  (decision-independent) baseline."""
  from stepnet_jax.methods import selection

  rng = np.random.RandomState(0)
  logits = jnp.asarray(rng.normal(0, 2, (3, 4, 5)), jnp.float32)
  labels = jnp.asarray([0, 1, 2, 3])
  reward = selection.rewards(logits, labels, jnp.asarray([0.2, 0.5, 1.0]), 0.6)
  probs = jax.nn.softmax(logits, -1)
  params = policies.init_selector(jax.random.key(1), 5, 3, hidden=4, history=True)
  params['w2'] = jnp.asarray(rng.normal(0, 1, 4), jnp.float32)
  exact = jax.grad(selection.expected_reward)(params, probs, reward, True)

  def estimate(key, baseline, samples):
    return jax.grad(lambda p: -selection.reinforce_terms(p, probs, reward, key, baseline, True, samples)['surrogate'])(
      params
    )

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

  from stepnet_jax.methods import selection

  net = testlib.built_model('mlp')
  model = selection.PolicyNet(net, selection.Selector(10, net.num_levels, 4, True, 0))
  _, params, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
  grads = jax.tree.map(jnp.ones_like, params)
  for joint in (False, True):
    tx = selection._optimizer(1e-2, joint, 1e-4)
    updates, _ = tx.update(grads, tx.init(params), params)
    net_updates = jax.tree.leaves(updates['net'])
    assert all(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(updates['selector']))
    assert all(np.all(np.asarray(u) == 0) for u in net_updates) == (not joint)
  # Adam's first step on a gradient of ones is minus its learning rate: each part its own.
  for u in jax.tree.leaves(updates['selector']):
    np.testing.assert_allclose(np.asarray(u), -1e-2, rtol=1e-3)
  for u in net_updates:
    np.testing.assert_allclose(np.asarray(u), -1e-4, rtol=1e-3)


def test_selection_module_trades_accuracy_for_macs(digits_net):
  """A high MAC price stops inputs earlier than a free one; the frozen network is untouched,
  and the learned policy runs in the compiled program."""
  from flax import nnx

  from stepnet_jax.methods import selection

  cfg, net, x_val, y_val, full = digits_net
  graph_model = nnx.merge(net.graphdef, net.variables)
  before = jax.tree.map(np.asarray, nnx.state(graph_model))
  avg = {}
  for lam in (0.0, 1.5):
    policy, variables = selection.train_selector(cfg, graph_model, net.macs_to_reach, x_val, y_val, 10, cost_weight=lam)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, variables), before)
    out = net.predict(jnp.asarray(full.test_images), policy)
    avg[lam] = float(np.asarray(out.macs).mean())
  assert avg[1.5] < 0.6 * avg[0.0], avg
  assert avg[0.0] > 0.8 * net.macs_to_reach[-1], avg  # free MACs: (nearly) everyone goes to the top


def test_a_frozen_networks_exits_computed_once_train_the_same_module(digits_net):
  """train_selector on exits computed once (the default for a frozen network) gives the
  module that computing the network's exits at every step gives, and returns the network's
  own variables."""
  from flax import nnx

  from stepnet_jax.methods import selection

  cfg, net, x_val, y_val, _ = digits_net
  cfg = cfg.replace(**{'selection.epochs': 2})
  trained = {}
  for cache in (True, False):
    model = nnx.merge(net.graphdef, net.variables)
    policy, variables = selection.train_selector(
      cfg, model, net.macs_to_reach, x_val, y_val, 10, cost_weight=0.3, cache_exits=cache
    )
    trained[cache] = policy.params
    jax.tree.map(
      np.testing.assert_array_equal, jax.tree.map(np.asarray, variables), jax.tree.map(np.asarray, net.variables)
    )
  initial = policies.init_selector(
    jax.random.key(cfg.seed), 10, len(net.macs_to_reach), cfg.selection.hidden, cfg.selection.history
  )
  assert not np.allclose(trained[True]['w1'], initial['w1'])
  for name in trained[True]:
    np.testing.assert_allclose(trained[True][name], trained[False][name], rtol=1e-4, atol=1e-5)


def test_joint_selection_fine_tunes_the_exits(digits_net):
  from flax import nnx

  from stepnet_jax.methods import selection

  cfg, net, x_val, y_val, _ = digits_net
  cfg = cfg.replace(**{'selection.joint': True, 'selection.epochs': 2})
  model = nnx.merge(net.graphdef, net.variables)
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  _, variables = selection.train_selector(cfg, model, net.macs_to_reach, x_val, y_val, 10, cost_weight=0.1)
  after = nnx.state(nnx.merge(net.graphdef, variables), nnx.Param)
  changed = [not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
  assert all(changed), changed
  # The network's own learning rate: at 0 its parameters stay exactly as they were.
  still = cfg.replace(**{'selection.network_learning_rate': 0.0, 'selection.epochs': 1})
  fresh = nnx.merge(net.graphdef, net.variables)
  policy, variables = selection.train_selector(still, fresh, net.macs_to_reach, x_val, y_val, 10, cost_weight=0.1)
  after = nnx.state(nnx.merge(net.graphdef, variables), nnx.Param)
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, after))
  initial = policies.init_selector(
    jax.random.key(still.seed), 10, len(net.macs_to_reach), still.selection.hidden, still.selection.history
  )
  assert not np.array_equal(np.asarray(policy.params['w1']), np.asarray(initial['w1']))  # the selector did train


def test_a_constant_reward_gives_an_estimate_of_exactly_zero_through_the_baseline():
  """When every level pays the same, no decision matters: the REINFORCE estimate must be
  exactly 0, through the leave-one-out baseline (several episodes per input) and through a
  per-level baseline equal to the reward (one episode). Without a baseline it is not 0, so
  this fails if the baseline is dropped (the unbiasedness test passes either way)."""
  from stepnet_jax.methods import selection

  rng = np.random.RandomState(3)
  probs = jax.nn.softmax(jnp.asarray(rng.normal(0, 2, (3, 6, 5)), jnp.float32), -1)
  params = policies.init_selector(jax.random.key(1), 5, 3, hidden=4, history=True)
  params['w2'] = jnp.asarray(rng.normal(0, 1, 4), jnp.float32)
  reward = jnp.full((3, 6), 0.7, jnp.float32)

  def estimate(key, baseline, samples):
    grads = jax.grad(lambda p: selection.reinforce_terms(p, probs, reward, key, baseline, True, samples)['surrogate'])
    return jax.tree.leaves(grads(params))

  for key in jax.random.split(jax.random.key(4), 3):
    for samples, baseline in ((4, jnp.zeros(3)), (1, jnp.full(3, 0.7))):
      assert all(np.all(np.asarray(g) == 0) for g in estimate(key, baseline, samples)), (samples, baseline)
    assert any(np.any(np.asarray(g) != 0) for g in estimate(key, jnp.zeros(3), 1))  # no baseline


def test_the_entropy_bonus_is_subtracted_from_the_objective():
  """For one key, the objective with weight w is the one without minus w times the expected
  entropy of the stop decisions along an episode, computed here by brute force from the
  stop probabilities: a bonus with its sign flipped would add it."""
  from stepnet_jax.data import feed
  from stepnet_jax.methods import selection

  net = testlib.built_model('mlp')
  x = jnp.asarray(testlib.images(net.input_shape, batch=6, seed=5))
  batch = feed.Batch(x, jnp.arange(6, dtype=jnp.int32) % 10, 6)
  macs = tuple(int(m) for m in np.cumsum(net.delta_macs().sum(0)))
  key = jax.random.key(7)

  def loss(weight):
    model = selection.PolicyNet(net, selection.Selector(10, net.num_levels, 4, True, 0))
    objective = selection.reinforce(
      macs, 0.5, history=True, entropy_weight=weight, use_baseline=True, joint=False, ce_weight=1.0, samples=2
    )
    return float(objective(model, batch, key)[0])

  selector = selection.Selector(10, net.num_levels, 4, True, 0)
  probs = np.asarray(jax.nn.softmax(net.exits(x), -1))
  p = np.asarray(jax.nn.sigmoid(selection.stop_logits(selector.params(), jnp.asarray(probs), True)), np.float64)
  h = -(p * np.log(p) + (1 - p) * np.log(1 - p))  # each decision's entropy [K, B]
  reach = np.cumprod(np.concatenate([np.ones_like(p[:1]), 1 - p[:-1]]), axis=0)  # P(reach level k)
  entropy = (reach[:-1] * h[:-1]).sum(0).mean()  # the top level decides nothing
  assert entropy > 0.1
  np.testing.assert_allclose(loss(0.0) - loss(0.3), 0.3 * entropy, rtol=1e-4)
