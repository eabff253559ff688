"""Optimizers and learning-rate schedules, chosen by name (``optim.name``, ``optim.schedule``)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING

import jax
import optax

from stepnet_jax.registry import Registry

if TYPE_CHECKING:
  from stepnet_jax.config import Config, OptimConfig

# name -> (optim section, total steps, warmup steps) -> the schedule after warmup.
SCHEDULES: Registry[Callable[[OptimConfig, int, int], optax.Schedule]] = Registry('schedule')
# name -> (optim section, learning-rate schedule) -> optimizer.
OPTIMIZERS: Registry[Callable[[OptimConfig, optax.Schedule], optax.GradientTransformation]] = Registry('optimizer')


@SCHEDULES.register('cosine')
def _cosine(o: OptimConfig, total: int, warmup: int) -> optax.Schedule:
  return optax.cosine_decay_schedule(o.learning_rate, max(1, total - warmup))


@SCHEDULES.register('step')
def _step(o: OptimConfig, total: int, warmup: int) -> optax.Schedule:
  """x0.1 at each fraction ``step_decay_at`` of training."""
  return optax.piecewise_constant_schedule(o.learning_rate, {int(f * total) - warmup: 0.1 for f in o.step_decay_at})


@SCHEDULES.register('constant')
def _constant(o: OptimConfig, total: int, warmup: int) -> optax.Schedule:
  del total, warmup
  return optax.constant_schedule(o.learning_rate)


@OPTIMIZERS.register('adam')
def _adam(o: OptimConfig, lr: optax.Schedule) -> optax.GradientTransformation:
  """Adam with L2 weight decay added to the gradient (not decoupled)."""
  return optax.chain(optax.add_decayed_weights(o.weight_decay), optax.adam(lr))


@OPTIMIZERS.register('adamw')
def _adamw(o: OptimConfig, lr: optax.Schedule) -> optax.GradientTransformation:
  return optax.adamw(lr, weight_decay=o.weight_decay)


@OPTIMIZERS.register('sgd')
def _sgd(o: OptimConfig, lr: optax.Schedule) -> optax.GradientTransformation:
  return optax.chain(optax.add_decayed_weights(o.weight_decay), optax.sgd(lr, momentum=o.momentum, nesterov=False))


def schedule_over(o: OptimConfig, total: int, warmup: int) -> optax.Schedule:
  """``o``'s schedule over ``total`` steps, after ``warmup`` steps of linear warmup."""
  main = SCHEDULES.get(o.schedule)(o, total, warmup)
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, warmup), main], [warmup])


def learning_rate_schedule(cfg: Config, steps_per_epoch: int, step_offset: int = 0) -> optax.Schedule:
  """The config's schedule over ``train.num_epochs``, after ``optim.warmup_epochs`` of linear
  warmup; ``step_offset`` shifts it for a phase whose optimizer starts counting at 0 in the
  middle of training (construction)."""
  if step_offset:
    base = learning_rate_schedule(cfg, steps_per_epoch)
    return lambda count: base(count + step_offset)
  o = cfg.optim
  return schedule_over(o, max(1, cfg.train.num_epochs * steps_per_epoch), int(o.warmup_epochs * steps_per_epoch))


def make_optimizer(cfg: Config, steps_per_epoch: int, step_offset: int = 0) -> optax.GradientTransformation:
  """The config's optimizer on its schedule (see ``learning_rate_schedule``)."""
  return OPTIMIZERS.get(cfg.optim.name)(cfg.optim, learning_rate_schedule(cfg, steps_per_epoch, step_offset))


def optimizer_over(o: OptimConfig, total: int, warmup: int = 0) -> optax.GradientTransformation:
  """``o``'s optimizer on its schedule over ``total`` steps (``schedule_over``): a fine-tune
  with a span of its own."""
  return OPTIMIZERS.get(o.name)(o, schedule_over(o, total, warmup))


def param_names(path: Sequence) -> tuple[Hashable, ...]:
  """A parameter leaf's key path as its names in the model's nested state, e.g.
  ``('units', 0, 'bn', 'scale')`` (attribute keys such as a variable's ``value`` left out)."""
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def train_only(
  tx: optax.GradientTransformation, trained: Callable[[tuple[Hashable, ...]], bool]
) -> optax.GradientTransformation:
  """``tx`` on the parameters whose ``param_names`` satisfy ``trained``, every other one frozen:
  its update is exactly zero and it has no optimizer state (``optax.multi_transform``). The
  trained ones get exactly ``tx``'s updates, as if the others did not exist."""

  def labels(params):
    return jax.tree_util.tree_map_with_path(
      lambda path, _: 'trained' if trained(param_names(path)) else 'frozen', params
    )

  return optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)
