"""Neuron importance from first-order Taylor expansion, evaluated on training data.

For a hidden neuron (channel) c with activation a (the unit's output after BN, ReLU
and pooling) and g = dL/da, zeroing the channel changes example b's loss by about
``-sum_p a[b, p, c] * g[b, p, c]`` (p runs over spatial positions). The products
``a * g`` are read off as gradients of multiplicative gates of value 1 placed on every
unit's output, so one backward pass gives them for all layers. L is the weighted sum of
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
from stepnet_jax.models.surgery import check_chain
from stepnet_jax.registry import Registry


def _gated_exits(model: SteppingModel, x: jax.Array, gates: Sequence[jax.Array]) -> jax.Array:
  """Eval-mode exits with every unit's output multiplied by its gate."""
  h = model.normalize(x)
  for unit, gate in zip(model.units, gates):
    h = unit(h, model.top) * gate
  return model.head.exits(h)


def _gate_shapes(model: SteppingModel, x: jax.Array) -> list[tuple[int, ...]]:
  def outputs(x):
    h, outs = model.normalize(x), []
    for unit in model.units:
      h = unit(h, model.top)
      outs.append(h)
    return outs

  return [o.shape for o in jax.eval_shape(outputs, x)]


@functools.partial(jax.jit, static_argnums=(0, 4))
def _activation_gradients(graphdef, variables, images, labels, weights, count):
  """Per unit, per example and position: a * dL_b/da, shaped like the unit's output; zero
  for the rows past ``count`` (the feed's padding, which a sum over examples then ignores)."""
  model = nnx.merge(graphdef, variables, copy=True)
  gates = [jnp.ones(s, jnp.float32) for s in _gate_shapes(model, images)]
  real = (jnp.arange(labels.shape[0]) < count).astype(jnp.float32)

  def loss(gates):
    logits = _gated_exits(model, images, gates)  # [K, B, C]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels[None, :])  # [K, B]
    return jnp.sum(jnp.asarray(weights, jnp.float32)[:, None] * ce * real)  # sum over examples

  return jax.grad(loss)(gates)


def _per_position(ag: jax.Array) -> jax.Array:
  """[B, ..., C] -> [B, P, C]."""
  return ag.reshape(ag.shape[0], -1, ag.shape[-1])


def taylor_scores(
  model: SteppingModel, images: np.ndarray, labels: np.ndarray, weights: Sequence[float], batch_size: int = 256
) -> list[np.ndarray]:
  """Raw Taylor score ``mean_b |sum_p a g|`` per channel of every hidden layer (not normalised)."""
  check_chain(model)
  graphdef, variables = nnx.split(model)
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
    s = [np.asarray(jnp.abs(_per_position(a).sum(1)).sum(0)) for a in ag]
    sums = s if sums is None else [a + b for a, b in zip(sums, s)]
    n += batch.count
  return [s / n for s in sums]


def class_scores(
  model: SteppingModel, images: np.ndarray, labels: np.ndarray, weights: Sequence[float], num_classes: int
) -> list[np.ndarray]:
  """Per layer [classes, C]: ``max_p |mean_b a g|`` over a batch of each class."""
  check_chain(model)
  graphdef, variables = nnx.split(model)
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
    per_class.append([np.asarray(jnp.abs(_per_position(a).sum(0) / batch.count).max(0)) for a in ag])
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
  """Importance of every hidden neuron, comparable across layers: {layer: [C]}.

  ``images``/``labels`` are training examples; for ``'class'`` they must contain every class.
  """
  scores = IMPORTANCE_SCORES.get(method)(model, images, labels, weights, num_classes, class_threshold, batch_size)
  return dict(zip(model.unit_names, scores))
