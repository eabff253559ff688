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
  c.sandwich_widths = 0            # AWN sandwich rule: smallest + largest + this many random widths
  c.mask_rule = True               # False: slimmable prefix subnets, private BN each, not reusable
  c.assignment = ''                # JSON text or file: {layer: [sizes per level]}
  # How the levels are made (train.py dispatches on it):
  #   'joint': train the given assignment, all exits jointly (also AWN, slimmable, plain nets);
  #   'steppingnet': construct levels by importance under MAC budgets (construct.py);
  #   'nonuniform': Yang & Fan's single-path non-uniform subnets (nonuniform.py).
  c.method = 'joint'
  c.budgets = ()                   # cumulative MAC budgets, fractions of the dense base network at `width`
  # SteppingNet construction.
  c.widen = 2.0                    # widening factor of the base network before construction
  c.importance = 'taylor'          # taylor | class
  c.importance_examples = 512      # training examples (per class for 'class') per importance evaluation
  c.class_threshold = 0.5          # class-based: score > this x the layer's mean counts a class
  c.allocation = 'global'          # global: lowest importance anywhere goes first; uniform: layers shrink alike
  c.rank_per_mac = False           # move the lowest importance per MAC saved first (else lowest importance)
  c.construct_rounds = 4           # importance -> move neurons -> retrain rounds
  c.pretrain_epochs = 1.0          # epochs with every neuron at level 0, before the first round
  c.round_epochs = 0.25            # retraining after each round; the rest of num_epochs fine-tunes
  c.finetune_distill_weight = 0.0  # distillation from the top exit while fine-tuning (0 = distill_weight)
  # Non-uniform subnets (single path).
  c.nonuniform_cycles = 2          # round-robin passes over the subnets after the channel ranking
  c.recalibrate_batches = 50       # train-mode batches that refresh each subnet's BN statistics
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
  sandwich_widths: int
  assignment: str
  method: str
  budgets: tuple[float, ...]
  widen: float
  importance: str
  importance_examples: int
  class_threshold: float
  allocation: str
  rank_per_mac: bool
  construct_rounds: int
  pretrain_epochs: float
  round_epochs: float
  finetune_distill_weight: float
  nonuniform_cycles: int
  recalibrate_batches: int
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
    """Per-exit loss weights: ``exit_weights``, or 1 for every exit when it is empty."""
    return self.exit_weights or (1.0,) * self.num_levels

  def assignment_dict(self) -> dict[str, list[int]]:
    """``assignment`` (JSON text or a path to a JSON file) as {layer: level sizes}; {} if unset."""
    if not self.assignment:
      return {}
    text = self.assignment
    if os.path.exists(text):
      with open(text) as f:
        text = f.read()
    return {k: [int(s) for s in v] for k, v in json.loads(text).items()}

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# Keys that change how a run reports, not what it trains.
REPORTING_KEYS = ('progress', 'log_every_steps', 'keep_checkpoints', 'eval_batch_size')


def differing_keys(saved: Mapping[str, Any], cfg: Config) -> list[str]:
  """Keys whose value in a saved config (JSON) differs from ``cfg``'s, reporting keys aside.

  Keys added since the config was saved take their defaults.
  """
  a, b = from_dict(saved).to_dict(), cfg.to_dict()
  return sorted(k for k in a if k not in REPORTING_KEYS and a[k] != b[k])


def same_settings(saved: Mapping[str, Any], cfg: Config) -> bool:
  """Whether a saved config (JSON) trains the same as ``cfg``."""
  return not differing_keys(saved, cfg)


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
  for key in ('level_widths', 'exit_weights', 'step_decay_at', 'budgets'):
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
  if c.method not in ('joint', 'steppingnet', 'nonuniform'):
    raise ValueError(f'unknown method {c.method!r}; choose joint, steppingnet or nonuniform')
  if c.method != 'joint' and len(c.budgets) != c.num_levels:
    raise ValueError(f'method {c.method} needs one budget per level: {len(c.budgets)} budgets, '
                     f'{c.num_levels} levels')
  if c.sandwich_widths and (not c.triangular or c.method != 'joint'):
    raise ValueError('sandwich_widths is the Any-Width-Networks variant: it needs triangular=True, method joint')
  if c.allocation not in ('global', 'uniform'):
    raise ValueError(f'unknown allocation {c.allocation!r}; choose global or uniform')
  if c.importance not in ('taylor', 'class'):
    raise ValueError(f'unknown importance {c.importance!r}; choose taylor or class')
  if c.method == 'steppingnet' and c.allocation == 'uniform' and c.rank_per_mac:
    raise ValueError('rank_per_mac ranks layers against each other; allocation uniform fixes every '
                     "layer's share, so the two do not combine: use allocation='global'")
  _check_ranges(c)
  return c


def _check_ranges(c: Config) -> None:
  """Numeric settings outside their meaningful range are errors, not silent no-ops."""
  minimum = {'batch_size': 1, 'num_epochs': 0, 'construct_rounds': 1, 'pretrain_epochs': 0, 'round_epochs': 0,
             'importance_examples': 1, 'class_threshold': 0, 'nonuniform_cycles': 1, 'recalibrate_batches': 0,
             'sandwich_widths': 0, 'warmup_epochs': 0}
  for key, low in minimum.items():
    if getattr(c, key) < low:
      raise ValueError(f'{key} must be >= {low}, got {getattr(c, key)}')
  if c.widen <= 0:
    raise ValueError(f'widen must be > 0, got {c.widen}')
