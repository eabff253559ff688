"""Configuration: nested sections, every field declared once, validated into frozen dataclasses.

A run's config has two top-level fields (``method``, ``seed``) and the sections
``data``, ``model``, ``loss``, ``optim``, ``train``, ``construction``, ``baseline`` and
``selection``.
The dataclasses below declare every field with its default and a comment;
``base_config()`` turns them into the ml_collections ConfigDict that the files in
``configs/`` start from, so every field can be overridden on the command line as
``--config.SECTION.FIELD=VALUE`` (e.g. ``--config.train.num_epochs=5``).

``from_dict`` validates a nested (or dotted, ``{'model.width': 0.5}``) dict into a
frozen, hashable ``Config``: unknown keys, unknown names (model, method, optimizer,
schedule, objective) and every cross-field check fail there, before anything is built,
compiled or written. Configs saved by versions before the sections existed were flat
(``num_epochs`` for ``train.num_epochs``); ``from_saved`` reads both, so their workdirs
load, resume and are reused as before.

A study's config file (``configs/compare_fashion_mnist.py``, ...) has sections beyond the
run config ``common``: each study declares them as frozen dataclasses beside its code,
and ``study_config`` validates the file into that record the same way (unknown keys,
with the closest known ones, and wrong types are errors; the ``quick`` section's keys are
checked too), before anything trains.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import ml_collections
import numpy as np


class SettingsError(ValueError, TypeError):
  """Settings a command refuses before it builds or writes anything: a config value, a workdir
  that is not this run's, a network too narrow for its levels. The user fixes it by changing the
  command, so commands end on its one-line message (``cli.FAILURES``), not a traceback. A
  ``ValueError`` and a ``TypeError``, as the checks it replaced raised."""


# The default dataset: Debian's dataset-fashion-mnist package (``data.datasets`` reads it).
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST = f'idx:{FASHION_MNIST_DIR}'


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the images come from (``data/datasets.py``)."""

  name: str = FASHION_MNIST  # idx:DIR, digits, or a TFDS name
  data_dir: str = ''  # TFDS data_dir ('' = TFDS default)
  train_subset: int = 0  # use only this many training images (0 = all)
  test_subset: int = 0  # use only this many test images (0 = all)
  validation_examples: int = 0  # hold out this many training images (never trained on): data.split_validation
  augment: bool = False  # random crop (pad 4) + horizontal flip, on device
  pad_to: int = 0  # zero-pad every image to pad_to x pad_to pixels, centred (0 = off): datasets.pad_dataset


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and level assignment (``models/zoo.py``)."""

  name: str = 'lenet3c1l'  # a name in models.MODELS
  width: float = 1.0  # channel multiplier
  num_levels: int = 4
  level_widths: tuple[float, ...] = ()  # cumulative channel fractions per level; () = (k+1)/K
  triangular: bool = False  # Any-Width-Networks per-channel triangles inside level blocks
  mask_rule: bool = True  # False: slimmable prefix subnets, private BN each, not reusable
  batch_norm: str = 'auto'  # auto (per subnet exactly without the mask rule) | shared | per_subnet
  exit_heads: str = 'shared'  # shared: one additive classifier; private: one per exit (layers.Head)
  init: str = 'he'  # he | torch (PyTorch's default init, as Any-Width Networks' code trains): config.INITS
  assignment: str = ''  # JSON text or file: {layer: [sizes per level]}

  def switchable_bn(self) -> bool | None:
    """Whether every subnet has its own BatchNorm; None for ``auto`` (``zoo.build_model``
    decides: exactly without the mask rule)."""
    return {'auto': None, 'shared': False, 'per_subnet': True}[self.batch_norm]

  def assignment_dict(self) -> dict[str, list[int]]:
    """``assignment`` (JSON text or a path to a JSON file) as {layer: level sizes}; {} if unset."""
    if not self.assignment:
      return {}
    text = self.assignment
    if os.path.exists(text):
      with open(text) as f:
        text = f.read()
    return {k: [int(s) for s in v] for k, v in json.loads(text).items()}


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The training objective (``training/losses.py``)."""

  objective: str = 'multi_exit'  # a name in losses.OBJECTIVES: multi_exit | sandwich
  exit_weights: tuple[float, ...] = ()  # () = all ones
  distill_weight: float = 0.0  # KL from the top exit to every lower exit
  distill_temperature: float = 4.0
  distill_mode: str = 'add'  # add: CE + distill_weight x KL; replace: lower exits learn only the top's soft labels
  sandwich_widths: int = 0  # 'sandwich' (AWN): smallest + largest + this many random widths
  label_smoothing: float = 0.0  # every exit's cross-entropy against (1 - e) one_hot + e / classes
  # mean: sum_k w_k CE_k / sum_k w_k; sum: sum_k w_k CE_k, what one backward pass per subnet
  # into the same gradients trains (Any-Width Networks' and slimmable networks' code)
  exit_reduction: str = 'mean'


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer and learning-rate schedule (``training/optim.py``)."""

  name: str = 'adam'  # a name in optim.OPTIMIZERS: adam | adamw | sgd
  learning_rate: float = 1e-3
  momentum: float = 0.9  # sgd only
  weight_decay: float = 0.0
  schedule: str = 'cosine'  # a name in optim.SCHEDULES: cosine | step | constant
  step_decay_at: tuple[float, ...] = (0.5, 0.75)  # fractions of training where 'step' multiplies lr by 0.1
  warmup_epochs: float = 0.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Length of training, batches, logging and checkpoints (``training/``)."""

  num_epochs: int = 5
  batch_size: int = 128
  eval_batch_size: int = 1000
  log_every_steps: int = 50
  keep_checkpoints: int = 2
  checkpoint_every_steps: int = 0  # also checkpoint mid-epoch every this many steps (0: at epoch ends only)
  divergence_steps: int = 200  # stop when the smoothed loss stays this many steps above (0: never) ...
  divergence_factor: float = 3.0  # ... this x min(its best, chance level): loop.DivergenceGuard
  progress: bool = True  # tqdm progress bar


@dataclasses.dataclass(frozen=True)
class ConstructionConfig:
  """Levels made under MAC budgets: SteppingNet construction (``methods/construct.py``); the
  non-uniform baseline uses ``budgets``, ``widen`` and ``pretrain_epochs`` too."""

  budgets: tuple[float, ...] = ()  # cumulative MAC budgets, fractions of the dense base network at model.width
  widen: float = 2.0  # widening factor of the base network before construction
  importance: str = 'taylor'  # taylor | class
  importance_examples: int = 512  # training examples (per class for 'class') per importance evaluation
  class_threshold: float = 0.5  # class-based: score > this x the layer's mean counts a class
  allocation: str = 'global'  # global: lowest importance anywhere goes first; uniform: layers shrink alike;
  # uniform_fill: uniform, then the slack filled by any layer's neurons
  rank_per_mac: bool = False  # move the lowest importance per MAC saved first (else lowest importance)
  rounds: int = 4  # importance -> move neurons -> retrain rounds
  pretrain_epochs: float = 1.0  # epochs of the full network before the levels are made
  round_epochs: float = 0.25  # retraining after each round; the rest of train.num_epochs fine-tunes
  finetune_distill_weight: float = 0.0  # distillation while fine-tuning (0 = loss.distill_weight)


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
  """Settings of the peer methods that are not a level assignment (``methods/nonuniform.py``)."""

  # Epochs at which the non-uniform subnets are carved out, largest first; () = evenly from
  # construction.pretrain_epochs to half of train.num_epochs (methods/nonuniform.py).
  generation_epochs: tuple[float, ...] = ()
  recalibrate_batches: int = 50  # train-mode batches that re-estimate each subnet's BN statistics


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
  """Guan et al.'s selection module, trained by REINFORCE on the validation split (``methods/selection.py``)."""

  cost_weight: float = 0.5  # lambda: reward = correct - lambda * MACs spent / top-level MACs
  hidden: int = 32  # hidden units of the selection MLP
  history: bool = True  # also read the previous exit's probabilities
  epochs: int = 60  # passes over the half of the validation split it is fitted on
  batch_size: int = 256
  learning_rate: float = 1e-2  # Adam
  entropy_weight: float = 0.01  # bonus on the stop decisions' entropy
  samples: int = 8  # episodes per input and step; > 1: leave-one-out baseline
  baseline: str = 'running'  # with 1 sample: running per-level mean of the reward, or none
  joint: bool = False  # also fine-tune the exits (Guan et al.); default: the network is frozen
  network_learning_rate: float = 1e-4  # joint: Adam's learning rate on the network (trained already)
  ce_weight: float = 1.0  # joint: weight of the cross-entropy of the exit each episode stopped at


@dataclasses.dataclass(frozen=True)
class Config:
  """A validated, hashable run configuration."""

  method: str = 'joint'  # how the levels are made: a name in methods.trainers.TRAINERS
  seed: int = 0
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  loss: LossConfig = dataclasses.field(default_factory=LossConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  construction: ConstructionConfig = dataclasses.field(default_factory=ConstructionConfig)
  baseline: BaselineConfig = dataclasses.field(default_factory=BaselineConfig)
  selection: SelectionConfig = dataclasses.field(default_factory=SelectionConfig)

  @property
  def exit_weights(self) -> tuple[float, ...]:
    """Per-exit loss weights: ``loss.exit_weights``, or 1 for every exit when it is empty."""
    return self.loss.exit_weights or (1.0,) * self.model.num_levels

  def to_dict(self) -> dict[str, Any]:
    """Nested plain dict (JSON-able)."""
    return dataclasses.asdict(self)

  def replace(self, **changes: Any) -> Config:
    """A validated copy with dotted fields changed: ``cfg.replace(**{'model.width': 0.5})``."""
    return from_dict(merge(self.to_dict(), nest(changes)))


SECTIONS = {
  f.name: f.default_factory for f in dataclasses.fields(Config) if f.default_factory is not dataclasses.MISSING
}
# construction.allocation: how the greedy construction spreads a level's MAC cut over layers.
ALLOCATIONS = ('global', 'uniform', 'uniform_fill')
BATCH_NORMS = ('auto', 'shared', 'per_subnet')
# model.init: he = He-normal hidden kernels, LeCun-normal classifier; torch = PyTorch's
# default, every kernel and the classifier's bias uniform in +-1/sqrt(fan_in) (zoo.torch_init).
INITS = ('he', 'torch')
EXIT_REDUCTIONS = ('mean', 'sum')  # loss.exit_reduction (losses.multi_exit_loss)
SELECTION_BASELINES = ('running', 'none')  # methods.selection
TUPLE_FIELDS = (
  'model.level_widths',
  'loss.exit_weights',
  'optim.step_decay_at',
  'construction.budgets',
  'baseline.generation_epochs',
)
# Keys that change how a run reports, not what it trains, and sections no network trainer
# reads (the selection module is trained afterwards, on a finished network).
REPORTING_KEYS = (
  'train.progress',
  'train.log_every_steps',
  'train.keep_checkpoints',
  'train.eval_batch_size',
  'train.checkpoint_every_steps',
  'train.divergence_steps',
  'train.divergence_factor',
)
NOT_TRAINING_SECTIONS = ('selection',)


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default, as the nested ConfigDict config files start from."""
  return ml_collections.ConfigDict(Config().to_dict())


# ------------------------------------------------------------------ dict plumbing


def flatten(d: Mapping[str, Any], prefix: str = '', sep: str = '.') -> dict[str, Any]:
  """{'model': {'width': 1}} -> {'model.width': 1} (keys joined by ``sep``)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, (Mapping, ml_collections.ConfigDict)):
      out.update(flatten(v, f'{prefix}{k}{sep}', sep))
    else:
      out[f'{prefix}{k}'] = v
  return out


def nest(d: Mapping[str, Any]) -> dict[str, Any]:
  """Dotted keys to nested dicts: {'model.width': 1} -> {'model': {'width': 1}} (others kept)."""
  out: dict[str, Any] = {}
  for key, value in d.items():
    *parents, leaf = key.split('.')
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = nest(value) if isinstance(value, Mapping) else value
  return out


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
  """``base`` with ``overrides`` applied; nested dicts merge field by field."""
  out = dict(base)
  for k, v in overrides.items():
    out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
  return out


def _split(text: str) -> list[str]:
  """'(1, 2)', '[a,b]' or 'a,b' (a sequence as text, e.g. from the command line) -> its items."""
  for bracket in '()[]':
    text = text.replace(bracket, '')
  return [s.strip() for s in text.split(',') if s.strip()]


def _as_tuple(v) -> tuple:
  if isinstance(v, str):
    v = _split(v)
  try:
    return tuple(float(x) for x in v)
  except (TypeError, ValueError):
    raise SettingsError(f'expected a sequence of numbers, got {v!r}') from None


def _typed(key: str, value: Any, kind: type) -> Any:
  """``value`` as the field's type (int, float, bool, str or tuple); TypeError naming the key
  when it is not one (a bool is not a number here, and 2.5 is not an int)."""
  ok = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    tuple: lambda v: isinstance(v, tuple),
  }[kind]
  if not ok(value):
    raise SettingsError(f'config key {key} must be {kind.__name__}, got {type(value).__name__} {value!r}')
  return float(value) if kind is float else int(value) if kind is int else value


# ------------------------------------------------------------------ validation


def close_keys(key: str, known: Iterable[str]) -> list[str]:
  """The known keys closest to a misspelt ``key`` (difflib), else those with its last part."""
  known = list(known)
  return difflib.get_close_matches(key, known, n=3, cutoff=0.5) or [
    k for k in known if k.rsplit('.', 1)[-1] == key.rsplit('.', 1)[-1]
  ]


def check_known(given: Iterable[str], known: Iterable[str], what: str = 'config keys', where: str = '') -> None:
  """ValueError listing the keys of ``given`` that are not ``known``, each with the closest known
  ones (``where``: the section they are in, if any)."""
  known = list(known)
  unknown = sorted(set(given) - set(known))
  if unknown:
    hints = ''.join(f'; {k}: did you mean {" or ".join(c)}?' for k in unknown if (c := close_keys(k, known)))
    raise SettingsError(f'{f"section {where!r}: " if where else ""}unknown {what}: {unknown}{hints}')


class Overrides(dict):
  """A partial run config as dotted keys -> values (``{'construction.widen': 3.0}``), e.g. a
  study section that overrides ``common`` for one method: every key a ``Config`` field and
  every value of its type (``overrides``); the cross-field checks run on the whole config
  it is merged into."""


def overrides(cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> Overrides:
  """A (partial) nested or dotted dict, or a ConfigDict, checked key by key against ``Config``:
  unknown keys (named with the closest fields) and values of the wrong type are errors."""
  if not isinstance(cfg, (Mapping, ml_collections.ConfigDict)):
    raise SettingsError(f'a run config must be a section (nested keys), got {type(cfg).__name__} {cfg!r}')
  given = flatten(nest(cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)))
  defaults = flatten(Config().to_dict())
  check_known(given, defaults)
  return Overrides(
    {
      key: _typed(key, _as_tuple(value) if key in TUPLE_FIELDS else value, type(defaults[key]))
      for key, value in given.items()
    }
  )


def from_dict(cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> Config:
  """Validates a (partial) nested or dotted dict, or a ConfigDict, into a frozen ``Config``."""
  tree = nest({**flatten(Config().to_dict()), **overrides(cfg)})
  c = Config(**{k: SECTIONS[k](**v) if k in SECTIONS else v for k, v in tree.items()})
  _check(c)
  return c


def _check(c: Config) -> None:
  """Cross-field checks that need no registry; the names (model, method, optimizer, ...)
  and the method combinations are checked next to their tables, ``methods.trainers.validate``."""
  m, loss = c.model, c.loss
  if m.num_levels < 1:
    raise SettingsError('num_levels must be >= 1')
  if loss.exit_weights and len(loss.exit_weights) != m.num_levels:
    raise SettingsError(f'exit_weights has {len(loss.exit_weights)} entries for {m.num_levels} levels')
  if any(w < 0 for w in c.exit_weights) or sum(c.exit_weights) <= 0:
    raise SettingsError(f'exit_weights must be non-negative with a positive sum, got {c.exit_weights}')
  if m.level_widths and len(m.level_widths) != m.num_levels:
    raise SettingsError(f'level_widths has {len(m.level_widths)} entries for {m.num_levels} levels')
  for key, value, choices in (
    ('model.batch_norm', m.batch_norm, BATCH_NORMS),
    ('model.init', m.init, INITS),
    ('loss.exit_reduction', loss.exit_reduction, EXIT_REDUCTIONS),
    ('construction.allocation', c.construction.allocation, ALLOCATIONS),
    ('selection.baseline', c.selection.baseline, SELECTION_BASELINES),
  ):
    if value not in choices:
      raise SettingsError(f'unknown {key} {value!r}; choose one of {", ".join(choices)}')
  _check_ranges(c)


def _check_ranges(c: Config) -> None:
  """Numeric settings outside their meaningful range are errors, not silent no-ops."""
  values = flatten(c.to_dict())
  check_ranges(values, RUN_MINIMUM, RUN_POSITIVE)
  if not 0 <= values['loss.label_smoothing'] < 1:
    raise SettingsError(f'loss.label_smoothing must be in [0, 1), got {values["loss.label_smoothing"]}')
  if values['optim.momentum'] >= 1:
    raise SettingsError(f'optim.momentum must be < 1, got {values["optim.momentum"]}')
  for key in ('model.level_widths', 'construction.budgets'):
    check_increasing(key, values[key])
  epochs = values['baseline.generation_epochs']
  if any(e <= 0 for e in epochs) or any(b < a for a, b in zip(epochs, epochs[1:])):
    raise SettingsError(f'baseline.generation_epochs must be positive and must not decrease, got {tuple(epochs)}')
  if c.model.level_widths and c.model.level_widths[-1] > 1:
    raise SettingsError(
      f'model.level_widths are fractions of the full width: the last must be <= 1, got {c.model.level_widths}'
    )


def check_ranges(values: Mapping[str, Any], minimum: Mapping[str, float], positive: Iterable[str] = ()) -> None:
  """ValueError for the first of ``values`` (dotted key -> number) below its ``minimum``, or
  not above 0 for a key in ``positive``."""
  for key, low in minimum.items():
    if values[key] < low:
      raise SettingsError(f'{key} must be >= {low}, got {values[key]}')
  for key in positive:
    if not values[key] > 0:
      raise SettingsError(f'{key} must be > 0, got {values[key]}')


def check_increasing(key: str, v: tuple[float, ...]) -> None:
  """ValueError unless the cumulative fractions ``v`` (one per level; () = unset) are positive
  and strictly increasing."""
  if v and (v[0] <= 0 or any(b <= a for a, b in zip(v, v[1:]))):
    raise SettingsError(f'{key} must be positive and strictly increasing (cumulative, one per level), got {v}')


# The run config's numeric ranges: the least value of each key ...
RUN_MINIMUM = {
  'seed': 0,
  'train.batch_size': 1,
  'train.num_epochs': 1,
  'train.eval_batch_size': 1,
  'train.log_every_steps': 1,
  'train.keep_checkpoints': 1,
  'train.checkpoint_every_steps': 0,
  'train.divergence_steps': 0,
  'data.train_subset': 0,
  'data.test_subset': 0,
  'data.pad_to': 0,
  'optim.momentum': 0,
  'optim.weight_decay': 0,
  'loss.distill_weight': 0,
  'construction.rounds': 1,
  'construction.pretrain_epochs': 0,
  'construction.round_epochs': 0,
  'construction.importance_examples': 1,
  'construction.class_threshold': 0,
  'baseline.recalibrate_batches': 0,
  'loss.sandwich_widths': 0,
  'optim.warmup_epochs': 0,
  'data.validation_examples': 0,
  'selection.hidden': 1,
  'selection.epochs': 1,
  'selection.samples': 1,
  'selection.batch_size': 1,
  'selection.cost_weight': 0,
  'selection.entropy_weight': 0,
  'selection.ce_weight': 0,
  'selection.network_learning_rate': 0,
}
# ... and the keys that must be above 0.
RUN_POSITIVE = (
  'construction.widen',
  'model.width',
  'optim.learning_rate',
  'loss.distill_temperature',
  'selection.learning_rate',
  'train.divergence_factor',
)


# ------------------------------------------------------------------ saved configs


# Flat keys of configs saved before the sections existed whose leaf name changed, and the
# sections their fields went to (sections added later, like ``selection``, had no flat keys).
_RENAMED = {
  'model': 'model.name',
  'dataset': 'data.name',
  'optimizer': 'optim.name',
  'construct_rounds': 'construction.rounds',
}
_FLAT_ERA = ('method', 'seed', 'data', 'model', 'loss', 'optim', 'train', 'construction', 'baseline')


def flat_paths() -> dict[str, str]:
  """Flat (pre-section) key -> dotted key. Leaf names were the flat names, except _RENAMED."""
  keys = [k for k in flatten(Config().to_dict()) if k.split('.')[0] in _FLAT_ERA and not k.endswith('.name')]
  paths = {key.rsplit('.', 1)[-1]: key for key in keys}
  if len(paths) != len(keys):
    raise AssertionError('two fields of the flat-era sections share a name')  # the conversion would be ambiguous
  return {**paths, **_RENAMED}


def _upgrade(saved: Mapping[str, Any]) -> dict[str, Any]:
  """A saved config, nested (as written now) or flat (before the sections), as a nested dict.

  A flat config's ``sandwich_widths > 0`` meant the sandwich objective. The retired
  ``baseline.nonuniform_cycles`` (of the turn-based non-uniform trainer) is dropped: the
  network reads as before, and ``differing_keys`` keeps such a run from being reused.
  """
  saved = dict(saved)
  flat = isinstance(saved.get('model'), str)  # flat configs had the model's name at the top
  if _retired_turns(saved):
    if flat:
      saved.pop('nonuniform_cycles')
    else:
      saved['baseline'] = {k: v for k, v in saved['baseline'].items() if k != 'nonuniform_cycles'}
  if not flat:
    return saved
  paths = flat_paths()
  unknown = sorted(set(saved) - set(paths) - {'sandwich_widths'})
  if unknown:
    raise SettingsError(
      f'saved config has unknown keys {unknown}: written by another version of stepnet_jax; retrain in a new --workdir'
    )
  widths = int(saved.pop('sandwich_widths', 0))
  nested = nest({paths[k]: v for k, v in saved.items()})
  if widths:
    nested = merge(nested, {'loss': {'objective': 'sandwich', 'sandwich_widths': widths}})
  return nested


def _retired_turns(saved: Mapping[str, Any]) -> bool:
  """Whether a saved config has the retired ``baseline.nonuniform_cycles`` (nested or flat)."""
  return 'nonuniform_cycles' in saved or 'nonuniform_cycles' in (saved.get('baseline') or {})


def from_saved(saved: Mapping[str, Any]) -> Config:
  """A config as saved in a workdir (``config.json``, checkpoint meta), nested or flat (older runs), validated."""
  return from_dict(_upgrade(saved))


def saved_data(saved: Mapping[str, Any]) -> DataConfig:
  """Only the ``data`` section of a saved config: what evaluating a trained run needs (no
  validation, so reading a run does not load the trainers)."""
  return DataConfig(**{**dataclasses.asdict(DataConfig()), **_upgrade(saved).get('data', {})})


def differing_keys(saved: Mapping[str, Any], cfg: Config) -> list[str]:
  """Dotted keys whose value in a saved config (JSON) differs from ``cfg``'s, leaving aside
  reporting keys and sections the network trainers do not read.

  Keys added since the config was saved take their defaults.
  """
  a, b = flatten(from_saved(saved).to_dict()), flatten(cfg.to_dict())
  differ = [k for k in a if k not in REPORTING_KEYS and k.split('.')[0] not in NOT_TRAINING_SECTIONS and a[k] != b[k]]
  if _retired_turns(saved) and saved.get('method') == 'nonuniform':
    differ.append('baseline.nonuniform_cycles (the retired turn-based trainer)')
  return sorted(differ)


def load_file(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of the config file ``path`` (for configs and tests building on another)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# ------------------------------------------------------------------ study configs

Study = TypeVar('Study')


def study_config(kind: type[Study], cc: Mapping[str, Any] | ml_collections.ConfigDict, quick: bool = False) -> Study:
  """A study's config file (``cc``: its ``get_config()``) as the study runs it: the frozen
  record ``kind``, validated before anything is built or trained.

  ``cc``'s keys are ``kind``'s fields (references resolved), plus an optional ``quick``
  section of the same shape whose fields, with ``quick``, are merged in (sections field by
  field); its keys and types are checked either way. An unknown key anywhere is a
  ValueError naming its section and the closest known keys, a value of the wrong type a
  TypeError naming its key. Field types: bool, int, float, str, ``tuple[T, ...]`` (text
  'a,b' and a single value are accepted, as the command line may give them), a nested
  frozen dataclass (a section), ``Config`` (validated by ``from_dict``) and ``Overrides``
  (a partial run config, ``overrides``). The record's own checks (its ``__post_init__``:
  ranges, names, cross-section rules) run last.
  """
  given = cc.copy_and_resolve_references().to_dict() if hasattr(cc, 'to_dict') else copy.deepcopy(dict(cc))
  fast = given.pop('quick', None)
  if fast is not None:
    _section(kind, fast, 'quick', partial=True)
  if quick:
    if fast is None:
      raise SettingsError('--quick: this study config has no quick section')
    given = merge(given, fast)
  return _section(kind, given, '', partial=False)


def run_sections(kind: type) -> tuple[str, ...]:
  """The fields of the study record ``kind`` that hold a run config (``Config`` or ``Overrides``)."""
  hints = typing.get_type_hints(kind)
  return tuple(f.name for f in dataclasses.fields(kind) if hints[f.name] in (Config, Overrides))


def _section(kind: type, given: Any, path: str, partial: bool) -> Any:
  """``given`` checked against the dataclass ``kind``: its typed values (``partial``: as a
  dict, fields left out taking no default) or the record."""
  if not isinstance(given, Mapping):
    raise SettingsError(f'{path} must be a section (nested keys), got {type(given).__name__} {given!r}')
  hints = typing.get_type_hints(kind)
  names = [f.name for f in dataclasses.fields(kind)]
  check_known(given, names, 'keys' if path else 'top-level keys of the study config', where=path)
  values = {
    name: _field(f'{path}.{name}' if path else name, value, hints[name], partial) for name, value in given.items()
  }
  return values if partial else kind(**values)


def _field(key: str, value: Any, hint: Any, partial: bool) -> Any:
  """One value of a study config as its field's type (``study_config`` lists them)."""
  if hint in (Config, Overrides):
    try:
      run_cfg = from_dict(value) if hint is Config and not partial else overrides(value)
    except (TypeError, ValueError) as e:
      raise type(e)(f'section {key!r}: {e}') from None
    if hint is Overrides and 'data.pad_to' in run_cfg:  # a study loads its images once, for every method
      raise SettingsError(f'section {key!r}: data.pad_to is set once for every method, in the common section')
    return run_cfg
  if dataclasses.is_dataclass(hint):
    return _section(hint, value, key, partial)
  if typing.get_origin(hint) is tuple:
    item, rest = typing.get_args(hint)
    if rest is not Ellipsis:
      raise SettingsError(f'{key}: a study config field is a tuple of one type, tuple[T, ...], not {hint}')
    values = list(value) if isinstance(value, (tuple, list)) else [value]
    values = [x for v in values for x in (_split(v) if isinstance(v, str) else [v])]
    return tuple(_typed(f'{key}[{i}]', _parsed(x, item), item) for i, x in enumerate(values))
  if hint not in (bool, int, float, str):
    raise SettingsError(
      f'{key}: a study config field is bool, int, float, str, a tuple, a section or a run config, not {hint}'
    )
  return _typed(key, value, hint)


def _parsed(text: Any, kind: type) -> Any:
  """An item of a sequence given as text ('0,1') as the number it spells, when it is one."""
  if isinstance(text, str) and kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text
