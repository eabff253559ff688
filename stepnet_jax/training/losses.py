"""Losses and the training objectives built from them (registered by name).

Open this file to change what training minimises: ``multi_exit_loss`` is the weighted
multi-exit loss with distillation; the objectives below wrap it (or another loss) into
what ``training.step.make_train_step`` calls once per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import optax

from stepnet_jax.core import levels as lv
from stepnet_jax.registry import Registry

if TYPE_CHECKING:
  from stepnet_jax.config import Config
  from stepnet_jax.core.model import SteppingModel
  from stepnet_jax.data.feed import Batch


DISTILL_MODES = ('add', 'replace')


def multi_exit_loss(
  logits: jax.Array,
  labels: jax.Array,
  exit_weights: Sequence[float],
  distill_weight: float = 0.0,
  temperature: float = 1.0,
  mode: str = 'add',
  label_smoothing: float = 0.0,
  reduction: str = 'mean',
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Loss over all exits of one forward pass.

  mode 'add':
    loss = sum_k w_k CE_k / sum_k w_k
           + distill_weight * mean_{k<K-1} T^2 KL(softmax(z_top / T) || softmax(z_k / T))
  mode 'replace' (in-place distillation, as universally slimmable networks train their
  subnets; ``distill_weight`` unused):
    loss = (w_top CE_top + sum_{k<K-1} w_k T^2 KL(softmax(z_top / T) || softmax(z_k / T))) / sum_k w_k
  so only the top exit sees the labels and every lower exit learns the top's soft labels.

  The teacher (top exit) is held fixed in the distillation term (stop-gradient), so
  it only pulls the lower exits towards the top one. With ``label_smoothing`` = e every
  CE_k is against the smoothed labels (1 - e) one_hot + e / classes (a regulariser of
  the recipe: every method's objective takes the same e). ``reduction='sum'`` leaves out
  the division by sum_k w_k (the recipe's ``loss.exit_reduction``).

  Args:
    logits: [K, B, classes].
    labels: int [B].
    exit_weights: K non-negative weights (static).
  Returns:
    (scalar loss, {'ce': [K] per-exit cross-entropy, 'distill': scalar mean T^2 KL of the
    lower exits (0 when not computed)}).
  """
  k = logits.shape[0]
  w = jnp.asarray(exit_weights, jnp.float32)
  if w.shape != (k,):
    raise ValueError(f'{len(exit_weights)} exit weights for {k} exits')
  if mode not in DISTILL_MODES:
    raise ValueError(f'unknown distillation mode {mode!r}; choose from {", ".join(DISTILL_MODES)}')
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f'label_smoothing must be in [0, 1), got {label_smoothing}')
  if reduction not in ('mean', 'sum'):
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
  if label_smoothing:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    ce = optax.softmax_cross_entropy(logits, targets[None]).mean(axis=1)  # [K]
  else:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels[None, :]).mean(axis=1)  # [K]
  distill, kl = jnp.zeros((), jnp.float32), None
  if k > 1 and (distill_weight or mode == 'replace'):
    t = float(temperature)
    teacher = jax.nn.log_softmax(jax.lax.stop_gradient(logits[-1]) / t)
    student = jax.nn.log_softmax(logits[:-1] / t)
    kl = (t * t) * jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1).mean(axis=-1)  # [K-1]
    distill = kl.mean()
  total = jnp.sum(w) if reduction == 'mean' else 1.0
  if mode == 'replace' and kl is not None:
    loss = (jnp.sum(w[:-1] * kl) + w[-1] * ce[-1]) / total
  else:
    loss = jnp.sum(w * ce) / total + (distill_weight * distill if distill_weight else 0.0)
  return loss, {'ce': ce, 'distill': distill}


# ------------------------------------------------------------------ objectives
#
# An objective is what one train step minimises: ``objective(model, batch, rng) ->
# (loss, aux)`` with ``model`` the train-mode network (its BatchNorm statistics update
# as it runs), ``batch`` a ``feed.Batch`` and ``rng`` a key fresh at every step. ``aux``
# holds ``logits`` [exits, B, classes] (the train step reports their accuracy) and any
# other per-step metrics (``ce``, ``distill``).

Objective = Callable[['SteppingModel', 'Batch', jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def multi_exit(
  weights: Sequence[float],
  distill_weight: float = 0.0,
  temperature: float = 1.0,
  levels: Sequence[int] | None = None,
  mode: str = 'add',
  label_smoothing: float = 0.0,
  reduction: str = 'mean',
) -> Objective:
  """``multi_exit_loss`` over the exits ``levels`` (default all) of ONE full-width pass."""
  levels = None if levels is None else tuple(levels)

  def objective(model, batch, rng):
    del rng
    logits = model.exits(batch.images, train=True, levels=levels)  # [len(levels), B, classes]
    loss, aux = multi_exit_loss(
      logits, batch.labels, weights, distill_weight, temperature, mode, label_smoothing, reduction
    )
    return loss, {'logits': logits, **aux}

  return objective


def single_exit() -> Objective:
  """Plain training of the top subnet through the direct forward (the benchmark's reference)."""

  def objective(model, batch, rng):
    del rng
    logits = model(batch.images, train=True)  # [B, classes]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels).mean()
    return ce, {'logits': logits[None], 'ce': ce[None], 'distill': jnp.zeros((), jnp.float32)}

  return objective


def sandwich(
  num_random: int,
  distill_weight: float = 0.0,
  temperature: float = 1.0,
  mode: str = 'add',
  label_smoothing: float = 0.0,
  reduction: str = 'mean',
) -> Objective:
  """Any-Width Networks' sandwich rule: the smallest and the largest subnet plus
  ``num_random`` random widths (prefixes of the last layer's features), all from one pass."""

  def objective(model, batch, rng):
    smallest, widest = lv.end(model.head.in_sizes, 0), sum(model.head.in_sizes)
    widths = jax.random.randint(rng, (num_random,), smallest, widest + 1)
    logits, random_logits = model.sandwich_exits(batch.images, widths, train=True)
    trained = jnp.concatenate([logits[:1], random_logits, logits[-1:]])
    loss, aux = multi_exit_loss(
      trained, batch.labels, (1.0,) * (num_random + 2), distill_weight, temperature, mode, label_smoothing, reduction
    )
    return loss, {'logits': logits, **aux}

  return objective


# name -> (config) -> objective; ``loss.objective`` picks one.
OBJECTIVES: Registry[Callable[[Config], Objective]] = Registry('objective')
OBJECTIVES.register(
  'multi_exit',
  lambda cfg: multi_exit(
    cfg.exit_weights,
    cfg.loss.distill_weight,
    cfg.loss.distill_temperature,
    mode=cfg.loss.distill_mode,
    label_smoothing=cfg.loss.label_smoothing,
    reduction=cfg.loss.exit_reduction,
  ),
)
OBJECTIVES.register(
  'sandwich',
  lambda cfg: sandwich(
    cfg.loss.sandwich_widths,
    cfg.loss.distill_weight,
    cfg.loss.distill_temperature,
    cfg.loss.distill_mode,
    cfg.loss.label_smoothing,
    cfg.loss.exit_reduction,
  ),
)


def objective_for(cfg: Config) -> Objective:
  """The objective the config names, with its settings."""
  return OBJECTIVES.get(cfg.loss.objective)(cfg)


def subnets_for(cfg: Config, levels: Sequence[int]) -> Objective:
  """The subnets ``levels`` alone, each batch through each of them once, their cross-entropies
  combined with the config's exit weights and recipe (label smoothing, exit reduction): how the
  non-uniform baseline trains the subnets it has found so far, under every other method's loss settings."""
  levels = tuple(levels)
  return multi_exit(
    tuple(cfg.exit_weights[k] for k in levels),
    levels=levels,
    label_smoothing=cfg.loss.label_smoothing,
    reduction=cfg.loss.exit_reduction,
  )
