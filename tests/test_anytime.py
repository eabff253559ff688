"""Stopping policies and the one compiled anytime program.

Policies are checked on constructed logits against numpy; the compiled program against
stepping each input alone in Python (batch 1, the library's start/advance), for both
batch strategies, for a reusable network and a recomputing one (the stateful learned policy:
test_selection.py).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testlib

import stepnet_jax
from stepnet_jax.core import anytime, stepping
from stepnet_jax.inference import policies


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
    (policies.Entropy(1.0), entropy <= 1.0),
  ]:
    stop, _ = jax.jit(lambda pol, z: pol.stop(z, level, pol.init(50, 7)))(policy, logits)
    assert 5 < expected.sum() < 45  # the constructed logits straddle the knob
    np.testing.assert_array_equal(np.asarray(stop), expected, err_msg=type(policy).__name__)
  budget = policies.MacBudget(250.0, (100, 200, 300))
  for lvl, expected in [(0, False), (1, True), (2, True)]:  # after level 1, level 2 would cost 300 > 250
    stop, _ = budget.stop(logits, jnp.int32(lvl), ())
    assert np.all(np.asarray(stop) == expected), lvl
  assert policies.heuristic('entropy', 0.7) == policies.Entropy(0.7)
  with pytest.raises(ValueError, match="unknown policy 'greedy'"):
    policies.heuristic('greedy', 0.5)


def test_bucket_sizes():
  assert anytime.bucket_sizes(256) == (256, 192, 128, 96, 64, 32, 16, 8, 4, 2, 1)
  assert anytime.bucket_sizes(256, 4) == (256, 160, 64, 16, 4, 1)
  assert anytime.bucket_sizes(32) == (32, 16, 8, 4, 2, 1)
  assert anytime.bucket_sizes(10, 3) == (10, 4, 2, 1)
  assert anytime.bucket_sizes(1) == (1,)


@pytest.fixture(scope='module')
def nets():
  reusable = stepnet_jax.Stepper(testlib.built_model('lenet3c1l'))
  slim = testlib.random_model(
    'lenet3c1l',
    3,
    num_levels=3,
    assignment={'conv1': (3, 2, 3), 'conv2': (3, 3, 2), 'conv3': (2, 3, 3)},
    mask_rule=False,
    mean=(0.3,),
    std=(0.3,),
  )
  return {'reusable': reusable, 'recompute': stepnet_jax.Stepper(slim)}


def _policy_with_varied_exits(net, x):
  """The confidence threshold (among the probabilities' quantiles) that spreads the inputs
  over the most exit levels."""
  probs = np.asarray(jax.nn.softmax(net.exits(x), -1)).max(-1)  # [K, B]

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
  ref_logits, ref_levels = testlib.step_each_alone(net, x, policy)
  assert len(set(ref_levels.tolist())) >= 3, ref_levels  # several exit levels in the batch
  got = net.predict(x, policy, strategy)
  np.testing.assert_array_equal(np.asarray(got.exit_level), ref_levels)
  testlib.assert_close(got.logits, ref_logits)
  np.testing.assert_array_equal(np.asarray(got.macs), np.asarray(net.macs_to_reach)[ref_levels])


def test_predict_compiles_once_per_strategy_and_batch_size(nets, monkeypatch):
  """The anytime program of a strategy traces once per batch size: new images, new parameter
  values and new policy knobs (traced) reuse it (chex.assert_max_traces on anytime.predict)."""
  chex.clear_trace_counter()
  predict = testlib.traced_at_most(
    anytime.predict, lambda program, variables, x, policy, valid=None, **kw: (kw['strategy'], x.shape[0])
  )
  monkeypatch.setattr(anytime, 'predict', predict)
  net = nets['reusable']
  for strategy in anytime.STRATEGIES:
    program = stepping.program(net.graphdef, net.variables)  # a new program: a new jitted function
    fn = anytime.make_predict(program, strategy)
    for seed in range(3):
      x = testlib.images(testlib.MNIST_SHAPE, batch=12, seed=seed)
      v = jax.tree.map(lambda a: a * (1.0 + 0.01 * seed), net.variables)
      out = fn(v, x, policies.Confidence(0.3 + 0.2 * seed))
      chex.assert_shape([out.exit_level, out.macs], (12,))
  # Batch 12 only (test_compiled_predict_equals_stepping_each_input_alone's size, so the
  # session's compilation cache serves its programs); the step functions' test covers two sizes.
  assert set(predict.traced) == {(s, 12) for s in anytime.STRATEGIES}


def test_a_single_level_network_has_nothing_to_decide():
  program = anytime.recompute_program([lambda v, x: x[:, :3] * v], (5,))
  for strategy in anytime.STRATEGIES:
    out = anytime.make_predict(program, strategy)(2.0, jnp.ones((4, 6)), policies.Confidence(2.0))
    assert np.asarray(out.exit_level).tolist() == [0] * 4 and np.asarray(out.macs).tolist() == [5] * 4


def test_compact_steps_only_the_running_inputs():
  """With 1 of 8 inputs still running, the compact program steps a bucket of 1 (masked: all 8);
  with 70 of 128, the halfway bucket of 96; padding rows marked invalid never keep a level running."""
  seen = []
  forwards = [
    lambda v, x, k=k: jax.debug.callback(lambda n=x.shape[0], k=k: seen.append((k, n))) or x[:, :4] * v[k]
    for k in range(3)
  ]
  program = anytime.recompute_program(forwards, (1, 3, 6))
  v = jnp.asarray([1.0, 2.0, 3.0])
  x = jnp.zeros((8, 4)).at[:, 0].set(5.0).at[3, 0].set(0.2)  # input 3 is unsure at level 0
  policy = policies.Confidence(0.9)
  for strategy, expected in (('compact', [(0, 8), (1, 1), (2, 1)]), ('masked', [(0, 8), (1, 8), (2, 8)])):
    seen.clear()
    out = anytime.make_predict(program, strategy)(v, x, policy)
    jax.effects_barrier()
    assert seen == expected, (strategy, seen)
    assert np.asarray(out.exit_level).tolist() == [0, 0, 0, 2, 0, 0, 0, 0]
  big = jnp.zeros((128, 4)).at[:, 0].set(5.0).at[:70, 0].set(0.2)  # 70 of 128 unsure: a bucket of 96
  seen.clear()
  out = anytime.make_predict(program, 'compact')(v, big, policy)
  jax.effects_barrier()
  assert seen == [(0, 128), (1, 96), (2, 96)], seen
  assert np.asarray(out.exit_level).tolist() == [2] * 70 + [0] * 58
  seen.clear()
  valid = jnp.arange(8) != 3  # input 3 is padding
  anytime.make_predict(program, 'masked')(v, x, policy, valid)
  jax.effects_barrier()
  assert seen == [(0, 8)]


def test_levels_nobody_needs_are_never_run():
  """Level k's forward runs (once per batch) only while some input still wants it."""
  ran = []
  forwards = [lambda v, x, k=k: jax.debug.callback(lambda k=k: ran.append(k)) or x[:, :4] * v[k] for k in range(4)]
  program = anytime.recompute_program(forwards, (1, 3, 6, 10))
  fn = anytime.make_predict(program, 'masked')
  v = jnp.asarray([1.0, 2.0, 3.0, 4.0])
  x = jnp.asarray([[5.0, 0, 0, 0], [0.2, 0, 0, 0]])  # probabilities rise with the level
  stop_all = policies.Confidence(0.0)
  out = fn(v, x, stop_all)
  jax.effects_barrier()
  assert ran == [0] and np.asarray(out.exit_level).tolist() == [0, 0]
  ran.clear()
  p1 = _softmax(np.asarray(x[1:] * 2.0, np.float64)).max()
  out = fn(v, x, policies.Confidence(float(p1) - 1e-4))  # input 0 stops at 0, input 1 at level 1
  jax.effects_barrier()
  assert ran == [0, 1], ran
  assert np.asarray(out.exit_level).tolist() == [0, 1] and np.asarray(out.macs).tolist() == [1, 3]


# ------------------------------------------------------------------ deployment artifacts


def test_exported_chain_runs_without_the_library_and_matches_every_level(tmp_path, nets):
  """export.save writes start/step modules; a fresh Python that imports only jax and numpy
  (the README's recipe) runs the chain, and every level's logits equal the library's."""
  import json
  import subprocess
  import sys

  from stepnet_jax.inference import export

  net = nets['reusable']
  manifest = export.save(net, str(tmp_path / 'art'))
  assert manifest['platforms'] == ['cpu', 'cuda'] and len(manifest['steps']) == net.num_levels - 1
  assert manifest['level_macs'] == list(net.level_macs) and manifest['input_dtype'] == 'uint8'
  x = np.asarray(testlib.images(testlib.MNIST_SHAPE, batch=5, seed=9))
  np.save(tmp_path / 'x.npy', x)
  script = f"""
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
"""
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  testlib.assert_close(np.load(tmp_path / 'out.npy'), net.exits(jnp.asarray(x)))
  with open(tmp_path / 'art' / 'manifest.json') as f:
    assert json.load(f) == manifest
  with pytest.raises(ValueError, match='only a reusable network'):
    export.save(nets['recompute'], str(tmp_path / 'no'))


def test_pure_predict_and_run_until(nets, monkeypatch):
  """stepping.predict(graphdef, variables, ...) is the Stepper's program; run_until steps while
  the measured next step fits the deadline."""
  from stepnet_jax.core import stepping

  net = nets['reusable']
  x = testlib.images(testlib.MNIST_SHAPE, batch=6, seed=10)
  policy = _policy_with_varied_exits(net, x)
  pure = jax.jit(stepping.predict, static_argnums=(0,), static_argnames='strategy')(
    net.graphdef, net.variables, x, policy
  )
  got = net.predict(x, policy, 'masked')
  np.testing.assert_array_equal(np.asarray(pure.exit_level), np.asarray(got.exit_level))
  testlib.assert_close(pure.logits, got.logits)
  assert net.run_until(x, deadline_ms=0.0).level == 0  # level 0 always runs
  assert net.run_until(x, deadline_ms=1e9).level == net.num_levels - 1
  monkeypatch.setitem(net._latency_ms, tuple(x.shape) + (str(x.dtype),), [0.0, 0.0, 1e6, 0.0])
  assert net.run_until(x, deadline_ms=1e5).level == 1  # level 2 would take 1e6 ms
