"""Every way of making levels, by name: ``TRAINERS``, and ``train(cfg, workdir)``.

``cfg.method`` picks the entry. 'joint' trains a given assignment with all exits at
once (the plain SteppingNet layout, AWN's triangular masks, slimmable prefix subnets
and plain single-level networks are all this, with different options); 'steppingnet'
constructs the levels under MAC budgets (``construct.py``); 'nonuniform' is Yang &
Fan's non-uniform subnets carved out of a background network by filter norm on a
schedule (``nonuniform.py``: single-path in one run, multi-path as one run per subnet). Every method saves a
standard checkpoint that ``stepnet_jax.load`` and ``evaluate.py`` read. The table is
used by config validation, ``train.py`` and the comparison.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from stepnet_jax.config import Config, SettingsError
from stepnet_jax.core import layers
from stepnet_jax.data import datasets
from stepnet_jax.methods import construct, importance, nonuniform
from stepnet_jax.models import zoo
from stepnet_jax.registry import Registry
from stepnet_jax.training import losses, optim, run


def _no_check(cfg: Config, dataset: datasets.Dataset) -> None:
  del cfg, dataset


@dataclasses.dataclass(frozen=True)
class Method:
  """A trainer and what the rest of the library needs to know about it."""

  train: Callable[[Config, str, datasets.Dataset | None], dict]  # result: 'test_accuracy', 'seconds', ...
  check: Callable[[Config, datasets.Dataset], None] = _no_check  # raises before any training (budgets)
  needs_budgets: bool = False  # construction.budgets: one per level


TRAINERS: Registry[Method] = Registry('method')
TRAINERS.register('joint', Method(run.train_and_evaluate))
TRAINERS.register('steppingnet', Method(construct.construct, construct.check, needs_budgets=True))
TRAINERS.register('nonuniform', Method(nonuniform.train_nonuniform, nonuniform.check, needs_budgets=True))


def validate(cfg: Config) -> Config:
  """Checks the names a config gives against their tables (model, method, optimizer, schedule,
  objective, importance, exit heads, distillation mode) and the combinations of method and
  options, before anything is built; returns ``cfg``. ``config.from_dict`` has already
  checked the schema, types and ranges."""
  m, loss, con = cfg.model, cfg.loss, cfg.construction
  zoo.MODELS.get(m.name)
  optim.OPTIMIZERS.get(cfg.optim.name)
  optim.SCHEDULES.get(cfg.optim.schedule)
  losses.OBJECTIVES.get(loss.objective)
  importance.IMPORTANCE_SCORES.get(con.importance)
  method = TRAINERS.get(cfg.method)
  for key, value, choices in (
    ('model.exit_heads', m.exit_heads, layers.EXIT_HEADS),
    ('loss.distill_mode', loss.distill_mode, losses.DISTILL_MODES),
  ):
    if value not in choices:
      raise SettingsError(f'unknown {key} {value!r}; choose one of {", ".join(choices)}')
  if method.needs_budgets and len(con.budgets) != m.num_levels:
    raise SettingsError(
      f'method {cfg.method} needs one budget per level: {len(con.budgets)} budgets, {m.num_levels} levels'
    )
  if cfg.method == 'nonuniform' and min(cfg.exit_weights) <= 0:
    raise SettingsError(
      'the non-uniform baseline trains its subnets alone or in groups (the top alone first): '
      'every exit weight must be positive, '
      f'got {cfg.exit_weights}'
    )
  if loss.objective == 'sandwich' and (not m.triangular or cfg.method != 'joint'):
    raise SettingsError(
      "the 'sandwich' objective is the Any-Width-Networks variant: it needs model.triangular=True, method joint"
    )
  if m.exit_heads == 'private' and not m.mask_rule:
    raise SettingsError("model.exit_heads='private' counts and steps exits by reuse: it needs model.mask_rule=True")
  if m.exit_heads == 'private' and loss.objective == 'sandwich':
    raise SettingsError(
      "the 'sandwich' objective reads random widths off one shared classifier: it needs model.exit_heads='shared'"
    )
  if m.batch_norm != 'auto' and cfg.method != 'joint':
    raise SettingsError(
      f'model.batch_norm={m.batch_norm!r} is an option of method joint; method {cfg.method} '
      "chooses its batch norm itself (keep model.batch_norm='auto')"
    )
  if cfg.method == 'steppingnet' and con.allocation != 'global' and con.rank_per_mac:
    raise SettingsError(
      'rank_per_mac ranks layers against each other; allocation uniform fixes every '
      "layer's share, so the two do not combine: use construction.allocation='global'"
    )
  return cfg


def check(cfg: Config, dataset: datasets.Dataset) -> None:
  """Raises if ``cfg`` cannot train on ``dataset`` (e.g. infeasible budgets), before any training."""
  TRAINERS.get(validate(cfg).method).check(cfg, dataset)


def train(
  cfg: Config, workdir: str, dataset: datasets.Dataset | None = None, *, restore_previous: bool = False
) -> dict:
  """Runs ``cfg.method`` in ``workdir``; the result has at least 'test_accuracy' and 'seconds'
  (training time of the run, also when it was resumed or found finished). ``restore_previous``:
  resume a joint run from its newest readable checkpoint (``run.train_and_evaluate``). A second
  process training in the same ``workdir`` is refused (``run.WorkdirBusy``)."""
  method = TRAINERS.get(validate(cfg).method)
  if restore_previous and cfg.method != 'joint':
    raise SettingsError(
      f'--restore_previous resumes joint runs; a {cfg.method!r} run is trained in phases: the same '
      'command goes on from its last phase checkpoint and its last checkpoint inside the phase, or '
      'delete WORKDIR/phases/within to go on from the phase checkpoint alone'
    )
  with run.lock_workdir(workdir):  # one trainer per workdir
    if restore_previous:
      return run.train_and_evaluate(cfg, workdir, dataset, restore_previous=True)
    return method.train(cfg, workdir, dataset)
