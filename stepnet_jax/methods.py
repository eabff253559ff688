"""One entry point for every way of making levels: ``train(cfg, workdir)``.

``cfg.method`` picks it: 'joint' trains a given assignment with all exits at once (the
plain SteppingNet layout, AWN's triangular masks, slimmable prefix subnets and plain
single-level networks are all this, with different options); 'steppingnet' constructs
the levels under MAC budgets (``construct.py``); 'nonuniform' is Yang & Fan's
single-path non-uniform subnets (``nonuniform.py``). Every method saves a standard
checkpoint that ``stepnet_jax.load`` and ``evaluate.py`` read.
"""
from __future__ import annotations

from stepnet_jax import construct, data, nonuniform, train_lib
from stepnet_jax.config import Config


def check(cfg: Config, dataset: data.Dataset) -> None:
  """Raises if ``cfg`` cannot train on ``dataset`` (e.g. infeasible budgets), before any training."""
  if cfg.method == 'steppingnet':
    construct.check(cfg, dataset)
  elif cfg.method == 'nonuniform':
    nonuniform.check(cfg, dataset)


def train(cfg: Config, workdir: str, dataset: data.Dataset | None = None) -> dict:
  """Runs ``cfg.method`` in ``workdir``; the result has at least 'test_accuracy' and 'seconds'
  (training time of the run, also when it was resumed or found finished)."""
  if cfg.method == 'steppingnet':
    return construct.construct(cfg, workdir, dataset)
  if cfg.method == 'nonuniform':
    return nonuniform.train_nonuniform(cfg, workdir, dataset)
  return train_lib.train_and_evaluate(cfg, workdir, dataset)
