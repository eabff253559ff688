"""Every way of making levels, by name: ``METHODS``, and ``train(cfg, workdir)``.

``cfg.method`` picks the entry. 'joint' trains a given assignment with all exits at
once (the plain SteppingNet layout, AWN's triangular masks, slimmable prefix subnets
and plain single-level networks are all this, with different options); 'steppingnet'
constructs the levels under MAC budgets (``construct.py``); 'nonuniform' is Yang &
Fan's single-path non-uniform subnets (``nonuniform.py``). Every method saves a
standard checkpoint that ``stepnet_jax.load`` and ``evaluate.py`` read. The table is
used by config validation, ``train.py`` and the comparison.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from stepnet_jax import construct, data, nonuniform
from stepnet_jax.config import Config
from stepnet_jax.registry import Registry
from stepnet_jax.training import run


def _no_check(cfg: Config, dataset: data.Dataset) -> None:
  del cfg, dataset


@dataclasses.dataclass(frozen=True)
class Method:
  """A trainer and what the rest of the library needs to know about it."""
  train: Callable[[Config, str, data.Dataset | None], dict]   # result: 'test_accuracy', 'seconds', ...
  check: Callable[[Config, data.Dataset], None] = _no_check     # raises before any training (budgets)
  needs_budgets: bool = False                                    # construction.budgets: one per level


METHODS: Registry[Method] = Registry('method')
METHODS.register('joint', Method(run.train_and_evaluate))
METHODS.register('steppingnet', Method(construct.construct, construct.check, needs_budgets=True))
METHODS.register('nonuniform', Method(nonuniform.train_nonuniform, nonuniform.check, needs_budgets=True))


def check(cfg: Config, dataset: data.Dataset) -> None:
  """Raises if ``cfg`` cannot train on ``dataset`` (e.g. infeasible budgets), before any training."""
  METHODS.get(cfg.method).check(cfg, dataset)


def train(cfg: Config, workdir: str, dataset: data.Dataset | None = None, *, restore_previous: bool = False) -> dict:
  """Runs ``cfg.method`` in ``workdir``; the result has at least 'test_accuracy' and 'seconds'
  (training time of the run, also when it was resumed or found finished). ``restore_previous``:
  resume a joint run from its newest readable checkpoint (``run.train_and_evaluate``). A second
  process training in the same ``workdir`` is refused (``run.WorkdirBusy``)."""
  method = METHODS.get(cfg.method)
  if restore_previous and cfg.method != 'joint':
    raise ValueError(f'--restore_previous resumes joint runs; a {cfg.method!r} run is trained in phases and '
                     'starts over when it was interrupted')
  with run.lock_workdir(workdir):      # one trainer per workdir
    if restore_previous:
      return run.train_and_evaluate(cfg, workdir, dataset, restore_previous=True)
    return method.train(cfg, workdir, dataset)
