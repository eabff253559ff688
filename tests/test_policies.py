"""Stopping policies at their boundaries, and policies that do not fit the network they are given.

The heuristics stop *at* their threshold (confidence and margin >=, entropy <=): checked on
logits whose softmax statistics are exact in float32 (equal logits give probabilities 1/2 or
1/4 exactly; -inf logits give exact zeros), at the threshold and one float32 step past it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stepnet_jax
from stepnet_jax.core import anytime
from stepnet_jax.inference import policies, sweeps
from stepnet_jax.models import zoo

INF = np.float32(np.inf)


def _stops(policy, logits) -> bool:
  logits = jnp.asarray(np.asarray(logits, np.float32)[None])
  stop, _ = policy.stop(logits, jnp.int32(0), policy.init(1, logits.shape[-1]))
  return bool(stop[0])


def _past(value: float, direction: float) -> float:
  """The next normal float32 after ``value`` towards ``direction`` (XLA on CPU flushes
  subnormals to zero, so past 0 the step is the smallest normal number)."""
  if value == 0:
    return float(np.copysign(np.finfo(np.float32).tiny, direction))
  return float(np.nextafter(np.float32(value), np.float32(direction)))


@pytest.mark.parametrize(
  'make, logits, at, past',
  [
    (policies.Confidence, [0.0, 0.0], 0.5, 1.0),  # top probability exactly 1/2
    (policies.Confidence, [0.0, 0.0, 0.0, 0.0], 0.25, 1.0),  # exactly 1/4
    (policies.Margin, [0.0, 0.0], 0.0, 1.0),  # top-1 minus top-2 exactly 0
    (policies.Margin, [0.0, -INF, -INF], 1.0, 2.0),  # exactly 1
    (policies.Entropy, [3.0], 0.0, -1.0),  # one class: entropy exactly 0
  ],
)
def test_heuristics_stop_exactly_at_their_threshold(make, logits, at, past):
  assert _stops(make(at), logits)
  assert not _stops(make(_past(at, past)), logits)


@pytest.fixture(scope='module')
def nets():
  """Two 3-level MLPs of other widths (other MAC tables) and a 2-level one."""
  build = lambda width, levels: stepnet_jax.Stepper(
    zoo.build_model('mlp', num_classes=10, input_shape=(8, 8, 1), num_levels=levels, width=width)
  )
  return build(0.125, 3), build(0.25, 3), build(0.125, 2)


def test_a_mac_budget_for_another_network_is_refused(nets):
  net, other, two_levels = nets
  x = jnp.zeros((4, 8, 8, 1), jnp.uint8)
  budget = 0.5 * net.macs_to_reach[-1]
  assert net.predict(x, policies.MacBudget(budget, net.macs_to_reach)).logits.shape == (4, 10)
  for table in (other.macs_to_reach, two_levels.macs_to_reach, net.macs_to_reach[:2]):
    with pytest.raises(ValueError, match="is not this network's"):
      net.predict(x, policies.MacBudget(budget, table))
  learned = policies.Learned(policies.init_selector(jax.random.key(0), 10, 2), num_levels=2)
  with pytest.raises(ValueError, match='made for 2 levels; the network has 3'):
    net.predict(x, learned)


def test_nan_knobs_and_deadlines_are_refused(nets):
  net = nets[0]
  x = jnp.zeros((2, 8, 8, 1), jnp.uint8)
  for policy in (policies.Confidence(float('nan')), policies.MacBudget(float('nan'), net.macs_to_reach)):
    with pytest.raises(ValueError, match='NaN'):
      net.predict(x, policy)
  predict = anytime.make_predict(net.program, 'masked')
  with pytest.raises(ValueError, match='NaN'):  # the sweeps evaluate.py runs
    sweeps.evaluate_policy(
      predict,
      net.variables,
      policies.Entropy(float('nan')),
      np.zeros((3, 8, 8, 1), np.uint8),
      np.zeros(3, np.int32),
      net.num_levels,
    )
  with pytest.raises(ValueError, match='deadline_ms must be a number'):
    net.run_until(x, deadline_ms=float('nan'))
  assert net.run_until(x, deadline_ms=float('inf')).level == net.num_levels - 1
