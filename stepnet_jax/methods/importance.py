"""Neuron importance from first-order Taylor expansion, evaluated on training data.

For a hidden neuron (channel) c with activation a (the unit's output after BN, ReLU
and pooling) and g = dL/da, zeroing the channel changes example b's loss by about
``-sum_p a[b, p, c] * g[b, p, c]`` (p runs over spatial positions). The products
``a * g`` are read off as gradients of multiplicative gates of value 1 placed on every
activation a layer writes (``unit.gated``), so one backward pass gives them for all layers.
Scores are per neuron group (``core.wiring``): a residual stream's channel sums its
products over every block that writes it, before the absolute value. L is the weighted sum of
the exits' cross-entropies (``exit_weights``), so a neuron used by several subnets is
scored by all of their losses.

Two scores, chosen by ``importance`` in the config:

* ``'taylor'``: ``mean_b |sum_p a g|`` (Molchanov et al. 2017), divided by the layer's
  mean score so that layers of different size and depth compete on one scale.
* ``'class'``: class-based (Sun et al.): for every class, a batch of that class only;
  per channel ``max_p |mean_b a g|``; the importance is the number of classes whose
  score exceeds ``class_threshold`` x the layer's mean score over classes and channels.
  Ties (the count is an integer) are broken by the channel's normalised summed score
  divided by (classes + 1), which never reorders different counts.

Evaluation is in eval mode (running BN statistics), on the full-width network.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stepnet_jax.core.model import SteppingModel
from stepnet_jax.data import feed, sharding
from stepnet_jax.registry import Registry


def _gated_exits(model: SteppingModel, x: jax.Array, gates: Sequence[jax.Array]) -> jax.Array:
  """Eval-mode exits with every group a layer writes multiplied by its gate (in write order)."""
  remaining = iter(gates)
  h = model.normalize(x)
  for unit in model.units:
    h = unit.gated(h, model.top, lambda group, a: a * next(remaining))
  return model.head.exits(h)


def _writes(model: SteppingModel, x: jax.Array) -> list[tuple[str, tuple[int, ...]]]:
  """(group, activation shape) of every gated write, in forward order: a chain layer writes
  its own group once; a residual stream is written by the stem and by every block of its stage."""
  writes = []

  def record(group, a):
    writes.append((group, a.shape))
    return a

  def forward(x):
    h = model.normalize(x)
    for unit in model.units:
      h = unit.gated(h, model.top, record)
    return h

  jax.eval_shape(forward, x)
  return writes


@functools.partial(jax.jit, static_argnums=(0, 4))
def _activation_gradients(graphdef, variables, images, labels, weights, count):
  """Per gated write, per example and position: a * dL_b/da, shaped like the activation; zero
  for the rows past ``count`` (the feed's padding, which a sum over examples then ignores)."""
  model = nnx.merge(graphdef, variables, copy=True)
  gates = [jnp.ones(shape, jnp.float32) for _, shape in _writes(model, images)]
  real = (jnp.arange(labels.shape[0]) < count).astype(jnp.float32)

  def loss(gates):
    logits = _gated_exits(model, images, gates)  # [K, B, C]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels[None, :])  # [K, B]
    return jnp.sum(jnp.asarray(weights, jnp.float32)[:, None] * ce * real)  # sum over examples

  return jax.grad(loss)(gates)


def _grouper(model: SteppingModel, images: np.ndarray) -> Callable[[Sequence[np.ndarray]], list[np.ndarray]]:
  """A function summing per-write values over the writes of each group (``wiring.groups``
  order); the writes are traced once here, not per batch."""
  groups = model.wiring().groups
  writes = [group for group, _ in _writes(model, jnp.asarray(images[:1]))]
  return lambda per_write: [sum(v for g, v in zip(writes, per_write) if g == group) for group in groups]


def _per_position(ag: jax.Array) -> jax.Array:
  """[B, ..., C] -> [B, P, C]."""
  return ag.reshape(ag.shape[0], -1, ag.shape[-1])


def taylor_scores(
  model: SteppingModel, images: np.ndarray, labels: np.ndarray, weights: Sequence[float], batch_size: int = 256
) -> list[np.ndarray]:
  """Raw Taylor score ``mean_b |sum_p a g|`` per channel of every neuron group (not normalised).

  For a group several layers write (a residual stream), the sum runs over every write too:
  the first-order change of the loss when the channel is scaled everywhere at once, as
  moving or removing it does."""
  graphdef, variables = nnx.split(model)
  by_group = _grouper(model, images)
  sums, n = None, 0
  batches = feed.device_batches(
    images,
    labels,
    feed.sequential_indices(len(labels), batch_size),
    pad_to=sharding.padded_size(min(batch_size, len(labels))),
  )  # one shape, sharded
  for batch in batches:
    ag = _activation_gradients(
      graphdef, variables, batch.images, batch.labels, tuple(float(w) for w in weights), batch.count
    )
    signed = by_group([_per_position(a).sum(1) for a in ag])  # [B, C] per group
    s = [np.asarray(jnp.abs(v).sum(0)) for v in signed]
    sums = s if sums is None else [a + b for a, b in zip(sums, s)]
    n += batch.count
  return [s / n for s in sums]


def class_scores(
  model: SteppingModel, images: np.ndarray, labels: np.ndarray, weights: Sequence[float], num_classes: int
) -> list[np.ndarray]:
  """Per group [classes, C]: ``max_p |mean_b a g|`` over a batch of each class, summed over
  the group's writes (a residual stream is written by every block of its stage)."""
  graphdef, variables = nnx.split(model)
  by_group = _grouper(model, images)
  by_class = [np.nonzero(labels == c)[0] for c in range(num_classes)]
  for c, idx in enumerate(by_class):
    if len(idx) == 0:
      raise ValueError(f'no examples of class {c} for the class-based importance')
  per_class = []
  for idx in by_class:  # one batch per class, padded to split over the devices
    batch = next(feed.device_batches(images, labels, [idx], pad_to=sharding.padded_size(len(idx))))
    ag = _activation_gradients(
      graphdef, variables, batch.images, batch.labels, tuple(float(w) for w in weights), batch.count
    )
    per_write = [np.asarray(jnp.abs(_per_position(a).sum(0) / batch.count).max(0)) for a in ag]
    per_class.append(by_group(per_write))
  return [np.stack([pc[layer] for pc in per_class]) for layer in range(len(per_class[0]))]


def normalised(scores: np.ndarray) -> np.ndarray:
  """Scores divided by their mean, so layers of different scale compete on one scale."""
  mean = float(np.mean(scores))
  return scores / mean if mean > 0 else np.zeros_like(scores)


def _taylor(model, images, labels, weights, num_classes, class_threshold, batch_size) -> list[np.ndarray]:
  del num_classes, class_threshold
  return [normalised(s) for s in taylor_scores(model, images, labels, weights, batch_size)]


def _class(model, images, labels, weights, num_classes, class_threshold, batch_size) -> list[np.ndarray]:
  del batch_size
  scores = []
  for s in class_scores(model, images, labels, weights, num_classes):
    counts = (s > class_threshold * np.mean(s)).sum(0).astype(np.float64)
    total = s.sum(0)
    tie = total / total.max() if total.max() > 0 else np.zeros_like(total)  # in [0, 1]
    scores.append(counts + tie / (num_classes + 1))
  return scores


# name -> (model, images, labels, weights, num_classes, class_threshold, batch_size) -> per-layer scores.
IMPORTANCE_SCORES: Registry[Callable[..., list[np.ndarray]]] = Registry('importance')
IMPORTANCE_SCORES.register('taylor', _taylor)
IMPORTANCE_SCORES.register('class', _class)


def importance(
  model: SteppingModel,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  method: str,
  weights: Sequence[float],
  num_classes: int,
  class_threshold: float = 0.5,
  batch_size: int = 256,
) -> dict[str, np.ndarray]:
  """Importance of every hidden neuron, comparable across groups: {group: [C]} (``core.wiring``).

  ``images``/``labels`` are training examples; for ``'class'`` they must contain every class.
  """
  scores = IMPORTANCE_SCORES.get(method)(model, images, labels, weights, num_classes, class_threshold, batch_size)
  return dict(zip(model.wiring().groups, scores))
