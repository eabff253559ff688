"""Configuration: defaults as an ml_collections ConfigDict, validated into a frozen dataclass.

Config files in ``configs/`` start from ``base_config()`` and override fields; every
field can be overridden on the command line as ``--config.FIELD=VALUE``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from stepnet_jax import data


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default. Sequences use () for 'derive the default'."""
  c = ml_collections.ConfigDict()
  # Data.
  c.dataset = data.FASHION_MNIST   # idx:DIR, digits, or a TFDS name
  c.data_dir = ''                  # TFDS data_dir ('' = TFDS default)
  c.train_subset = 0               # use only this many training images (0 = all)
  c.test_subset = 0
  c.augment = False                # random crop (pad 4) + horizontal flip
  # Model and levels.
  c.model = 'lenet3c1l'
  c.width = 1.0
  c.num_levels = 4
  c.level_widths = ()              # cumulative channel fractions per level; () = (k+1)/K
  c.triangular = False             # Any-Width-Networks per-channel triangles inside levels
  c.mask_rule = True               # False: slimmable prefix subnets, private BN each, not reusable
  c.assignment = ''                # JSON text or file: {layer: [sizes per level]}
  # Loss.
  c.exit_weights = ()              # () = all ones
  c.distill_weight = 0.0
  c.distill_temperature = 4.0
  # Optimisation.
  c.optimizer = 'adam'             # adam | adamw | sgd
  c.learning_rate = 1e-3
  c.momentum = 0.9                 # sgd only
  c.weight_decay = 0.0
  c.schedule = 'cosine'            # cosine | step | constant
  c.step_decay_at = (0.5, 0.75)    # fractions of training where 'step' multiplies lr by 0.1
  c.warmup_epochs = 0.0
  c.num_epochs = 5
  c.batch_size = 128
  c.seed = 0
  # Evaluation, logging, checkpoints.
  c.eval_batch_size = 1000
  c.log_every_steps = 50
  c.keep_checkpoints = 2
  c.progress = True                # tqdm progress bar
  return c


@dataclasses.dataclass(frozen=True)
class Config:
  """Validated, hashable view of a ConfigDict."""
  dataset: str
  data_dir: str
  train_subset: int
  test_subset: int
  augment: bool
  model: str
  width: float
  num_levels: int
  level_widths: tuple[float, ...]
  triangular: bool
  mask_rule: bool
  assignment: str
  exit_weights: tuple[float, ...]
  distill_weight: float
  distill_temperature: float
  optimizer: str
  learning_rate: float
  momentum: float
  weight_decay: float
  schedule: str
  step_decay_at: tuple[float, ...]
  warmup_epochs: float
  num_epochs: int
  batch_size: int
  seed: int
  eval_batch_size: int
  log_every_steps: int
  keep_checkpoints: int
  progress: bool

  @property
  def weights(self) -> tuple[float, ...]:
    return self.exit_weights or (1.0,) * self.num_levels

  def assignment_dict(self) -> dict[str, list[int]]:
    if not self.assignment:
      return {}
    text = self.assignment
    if os.path.exists(text):
      with open(text) as f:
        text = f.read()
    return {k: [int(s) for s in v] for k, v in json.loads(text).items()}

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _as_tuple(v) -> tuple:
  if isinstance(v, str):
    v = [s for s in v.replace('(', '').replace(')', '').replace('[', '').replace(']', '').split(',') if s.strip()]
  return tuple(float(x) for x in v)


def from_dict(cfg: Mapping[str, Any]) -> Config:
  """Validates a ConfigDict (or plain dict) and returns a frozen Config."""
  d = dict(cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg)
  known = {f.name for f in dataclasses.fields(Config)}
  unknown = set(d) - known
  if unknown:
    raise ValueError(f'unknown config keys: {sorted(unknown)}')
  merged = base_config().to_dict()
  merged.update(d)
  for key in ('level_widths', 'exit_weights', 'step_decay_at'):
    merged[key] = _as_tuple(merged[key])
  c = Config(**merged)
  if c.num_levels < 1:
    raise ValueError('num_levels must be >= 1')
  if c.exit_weights and len(c.exit_weights) != c.num_levels:
    raise ValueError(f'exit_weights has {len(c.exit_weights)} entries for {c.num_levels} levels')
  if any(w < 0 for w in c.weights) or sum(c.weights) <= 0:
    raise ValueError(f'exit_weights must be non-negative with a positive sum, got {c.weights}')
  if c.level_widths and len(c.level_widths) != c.num_levels:
    raise ValueError(f'level_widths has {len(c.level_widths)} entries for {c.num_levels} levels')
  if c.optimizer not in ('adam', 'adamw', 'sgd'):
    raise ValueError(f'unknown optimizer {c.optimizer!r}')
  if c.schedule not in ('cosine', 'step', 'constant'):
    raise ValueError(f'unknown schedule {c.schedule!r}')
  if c.batch_size < 1 or c.num_epochs < 0:
    raise ValueError('batch_size must be >= 1 and num_epochs >= 0')
  return c
