"""Per-input stopping policies: after level k's answer, stop or pay for level k + 1.

A policy is a small pytree with a pure ``stop(logits, level, state) -> (stop, state)``:
``logits`` [B, classes] of the level just computed, ``level`` its index (an int32 that
may be traced: one compiled program serves every level), ``state`` whatever the policy
carries from level to level (``init(batch, classes)`` makes it). ``stop`` is bool [B].
The knobs (thresholds, budgets, the learned module's weights) are pytree leaves, so a
sweep over them reuses one compilation. At the top level the caller stops every input
whatever the policy says.

* ``Confidence(t)``: the top class's softmax probability >= t;
* ``Margin(t)``: top-1 minus top-2 probability >= t;
* ``Entropy(t)``: the softmax entropy (nats) <= t;
* ``MacBudget(budget, macs_to_reach)``: stop before the step whose MACs would exceed the
  per-input budget (``macs_to_reach[k]``: MACs spent to have level k's answer);
* ``Learned(params)``: the selection module of Guan et al. (IJCAI 2018), a small MLP
  reading the current exit's class probabilities (sorted), the level and (``history``)
  the previous exit's, giving a stop probability; trained by REINFORCE in
  ``methods/selection.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from stepnet_jax.registry import Registry

PolicyState = Any


def _probs(logits: jax.Array) -> jax.Array:
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


class _Stateless:
  """A policy that carries nothing from level to level."""

  def init(self, batch_size: int, num_classes: int) -> PolicyState:
    return ()


@struct.dataclass
class Confidence(_Stateless):
  """Stop when the top class's probability reaches ``threshold``."""

  threshold: float | jax.Array

  def stop(self, logits: jax.Array, level: jax.Array, state: PolicyState) -> tuple[jax.Array, PolicyState]:
    """Stop where the top probability is at least the threshold; no state."""
    return _probs(logits).max(axis=-1) >= self.threshold, state


@struct.dataclass
class Margin(_Stateless):
  """Stop when the top-1 probability exceeds the top-2 one by ``threshold``."""

  threshold: float | jax.Array

  def stop(self, logits: jax.Array, level: jax.Array, state: PolicyState) -> tuple[jax.Array, PolicyState]:
    """Stop where the top-1 probability exceeds the top-2 one by at least the threshold; no state."""
    top2 = jax.lax.top_k(_probs(logits), 2)[0]
    return top2[:, 0] - top2[:, 1] >= self.threshold, state


@struct.dataclass
class Entropy(_Stateless):
  """Stop when the softmax entropy (in nats) is at most ``threshold``."""

  threshold: float | jax.Array

  def stop(self, logits: jax.Array, level: jax.Array, state: PolicyState) -> tuple[jax.Array, PolicyState]:
    """Stop where the softmax entropy (nats) is at most the threshold; no state."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -(jnp.exp(logp) * logp).sum(axis=-1) <= self.threshold, state


@struct.dataclass
class MacBudget(_Stateless):
  """Stop before the step that would take an input past ``budget`` MACs.

  ``macs_to_reach[k]``: MACs spent per input to have level k's answer (cumulative for a
  reusable network, the running sum of subnets for one that recomputes).
  """

  budget: float | jax.Array
  macs_to_reach: tuple[int, ...] = struct.field(pytree_node=False, default=())

  def __post_init__(self):
    if not self.macs_to_reach:
      raise ValueError('MacBudget needs macs_to_reach: the MACs spent to reach each level (Stepper.macs_to_reach)')
    m = self.macs_to_reach
    if any(not isinstance(v, (int, np.integer)) or v < 0 for v in m) or any(b < a for a, b in zip(m, m[1:])):
      raise ValueError(f'macs_to_reach must be non-negative, non-decreasing integers (one per level), got {m}')

  def stop(self, logits: jax.Array, level: jax.Array, state: PolicyState) -> tuple[jax.Array, PolicyState]:
    """Stop every input when the next level's ``macs_to_reach`` would exceed the budget; no state."""
    nxt = jnp.asarray(tuple(self.macs_to_reach[1:]) + (np.inf,), jnp.float32)[level]  # MACs after one more step
    return jnp.broadcast_to(nxt > self.budget, logits.shape[:1]), state


# ------------------------------------------------------------------ the learned selection module


def num_selector_features(num_classes: int, num_levels: int, history: bool) -> int:
  """F, the length of the feature vector ``selector_features`` gives."""
  return num_classes + num_levels + (num_classes + 2 if history else 0)


def selector_features(
  probs: jax.Array, level: jax.Array, previous: jax.Array, num_levels: int, history: bool
) -> jax.Array:
  """What the selection module reads, [B, F]: the exit's class probabilities sorted from the
  most likely down (so the module learns confidence, not class identity), the level
  one-hot and (``history``) the previous exit's sorted probabilities, its probability of
  the current top class, and whether the two exits agree (zeros at level 0)."""
  onehot = jnp.broadcast_to(jax.nn.one_hot(level, num_levels), probs.shape[:1] + (num_levels,))
  parts = [-jnp.sort(-probs, axis=-1), onehot]
  if history:
    top = probs.argmax(-1)
    seen = (previous.sum(-1, keepdims=True) > 0).astype(probs.dtype)  # 0 at level 0
    agree = (previous.argmax(-1) == top)[:, None].astype(probs.dtype) * seen
    parts += [-jnp.sort(-previous, axis=-1), jnp.take_along_axis(previous, top[:, None], axis=-1), agree]
  return jnp.concatenate(parts, axis=-1)


def init_selector(
  key: jax.Array, num_classes: int, num_levels: int, hidden: int = 32, history: bool = True
) -> dict[str, jax.Array]:
  """Parameters of the selection MLP: features -> ``hidden`` ReLU units -> stop logit."""
  features = num_selector_features(num_classes, num_levels, history)
  return {
    'w1': jax.random.normal(key, (features, hidden)) * np.sqrt(2.0 / features),
    'b1': jnp.zeros((hidden,)),
    'w2': jnp.zeros((hidden,)),
    'b2': jnp.zeros(()),
  }


def selector_logit(params: dict[str, jax.Array], features: jax.Array) -> jax.Array:
  """The stop logit [B] (stop probability = sigmoid)."""
  h = jax.nn.relu(features @ params['w1'] + params['b1'])
  return h @ params['w2'] + params['b2']


@struct.dataclass
class Learned:
  """Guan et al.'s selection module: stop when its stop probability exceeds ``threshold``.

  ``params`` from ``init_selector``/``selection.train_selector``; the state is the previous
  exit's probabilities (used when ``history``). Training samples each decision from the
  stop probability; deployed, the module decides deterministically (p > ``threshold``),
  its most likely decision.
  """

  params: dict[str, jax.Array]
  num_levels: int = struct.field(pytree_node=False, default=1)
  history: bool = struct.field(pytree_node=False, default=True)
  threshold: float | jax.Array = 0.5

  def __post_init__(self):
    if not isinstance(self.num_levels, (int, np.integer)) or self.num_levels < 1:
      raise ValueError(f"Learned needs the network's number of levels (>= 1), got {self.num_levels!r}")

  def init(self, batch_size: int, num_classes: int) -> PolicyState:
    """The state: the previous exit's class probabilities, zeros before level 0 [batch, classes]."""
    return jnp.zeros((batch_size, num_classes), jnp.float32)

  def stop_probability(self, logits: jax.Array, level: jax.Array, state: PolicyState) -> tuple[jax.Array, jax.Array]:
    """(the module's stop probability [B], this exit's class probabilities: the next state)."""
    probs = _probs(logits)
    feats = selector_features(probs, level, state, self.num_levels, self.history)
    return jax.nn.sigmoid(selector_logit(self.params, feats)), probs

  def stop(self, logits: jax.Array, level: jax.Array, state: PolicyState) -> tuple[jax.Array, PolicyState]:
    """Stop where the stop probability exceeds the threshold; the state becomes this exit's probabilities."""
    p, probs = self.stop_probability(logits, level, state)
    return p > self.threshold, probs


# name -> (knob, macs_to_reach) -> a heuristic policy; the knob is its threshold or budget.
HEURISTICS: Registry[Callable[[float, Sequence[int]], Any]] = Registry('policy')
HEURISTICS.register('confidence', lambda knob, macs: Confidence(knob))
HEURISTICS.register('margin', lambda knob, macs: Margin(knob))
HEURISTICS.register('entropy', lambda knob, macs: Entropy(knob))
HEURISTICS.register('macs', lambda knob, macs: MacBudget(knob, tuple(int(m) for m in macs)))


def check_knobs(policy) -> None:
  """TypeError / ValueError unless every knob of ``policy`` (its pytree leaves: thresholds,
  budgets, a module's weights) is a number or a numeric array, and finite where concrete.
  Not in the constructors: pytree operations rebuild policies with other leaves."""
  for leaf in jax.tree.leaves(policy, is_leaf=lambda v: v is None):  # a None knob is no leaf otherwise
    dtype = getattr(leaf, 'dtype', None)
    if dtype is None and not isinstance(leaf, (int, float, np.number)) or isinstance(leaf, bool):
      raise TypeError(f'{type(policy).__name__}: knobs must be numbers or numeric arrays, got {leaf!r}')
    if dtype is not None and not (np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)):
      raise TypeError(f'{type(policy).__name__}: knobs must be numbers or numeric arrays, got dtype {dtype}')
    if (
      not isinstance(leaf, jax.core.Tracer)
      and np.issubdtype(np.asarray(leaf).dtype, np.inexact)
      and np.isnan(np.asarray(leaf)).any()
    ):
      raise ValueError(f'{type(policy).__name__}: a knob is NaN')


def heuristic(name: str, knob: float, macs_to_reach: Sequence[int] = ()):
  """The heuristic policy ``name`` at ``knob`` (its threshold, or the MAC budget for 'macs')."""
  return HEURISTICS.get(name)(knob, macs_to_reach)


def default_knobs(name: str, macs_to_reach: Sequence[int] = ()) -> tuple[float, ...]:
  """A sweep of the heuristic ``name``'s knob from stopping early to stopping late."""
  HEURISTICS.get(name)
  if name == 'macs':
    if not macs_to_reach:
      raise ValueError("the 'macs' policy's default knobs are fractions of the top level's macs_to_reach: give them")
    return tuple(float(f * macs_to_reach[-1]) for f in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0))
  return {
    'confidence': (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999),
    'margin': (0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.98, 0.99),
    'entropy': (1.5, 1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02),
  }[name]
