"""Side-by-side comparison at matched MAC budgets: SteppingNet and its peers.

    python -m stepnet_jax.compare --config configs/compare_fashion_mnist.py --workdir DIR [--quick] [--plan]

Trains (or reuses, when DIR/NAME/result.json exists) every method on the same data
with the same epochs, evaluates each level's test accuracy and MACs, and writes
DIR/compare.json, DIR/compare.md and DIR/compare.png. Methods:

* steppingnet: levels constructed by importance under the budgets (``methods/construct.py``).
* steppingnet_tri: the same with Any-Width Networks' triangles inside each level block
  (an extension: more, sparser neurons per MAC; the mask rule between levels holds).
* awn: Any-Width Networks: triangular masks, base widened by ``awn.widen``, widths
  ``awn.widths``, all widths trained every batch. Its level MACs are the budget points.
* awn_sandwich: the same network trained with the sandwich rule: per batch the
  smallest and largest width and ``awn.sandwich_widths`` random widths.
* slimmable: uniform prefix subnets without the mask rule, a private BN per width, one
  forward pass per width per batch; widths are the widest uniform plans that fit each
  budget. Recomputes: stepping to level k costs every subnet up to k.
* singlepath: Yang & Fan's single-path non-uniform subnets: one training round of the
  background network, a smaller subnet carved out of it at each of the generation epochs
  (``methods/nonuniform.py``); recomputes.
* multipath: Yang & Fan's multi-path non-uniform subnets: per budget, the background
  network trained, pruned by filter norm to that budget and trained on (one full training
  per subnet; the subnets share no weights); recomputes.
* independent: one plain network per budget, the widest uniform plan that fits it.

Every method's entry in compare.json has its training cost: ``train_seconds`` (the
training time its runs report) and ``train_steps`` (optimizer updates over all its runs;
an update of slimmable, single-path or AWN passes each batch through several subnets).

Budgets: the AWN points (as fractions of the dense base network at ``common.model.width``)
plus ``extra_budgets``. ``--config.seeds=0,1,2`` repeats everything per seed and reports
mean and standard deviation per level.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import flags

import stepnet_jax
from stepnet_jax import cli
from stepnet_jax import config as config_lib
from stepnet_jax.config import Config
from stepnet_jax.data import datasets
from stepnet_jax.inference import evaluation
from stepnet_jax.methods import trainers
from stepnet_jax.models import budgets as budgets_lib
from stepnet_jax.models import zoo
from stepnet_jax.registry import Registry
from stepnet_jax.studies import compare_report, reports
from stepnet_jax.studies import ledger as ledger_lib
from stepnet_jax.training import run

# The per-level fields of compare.json (``validation_accuracy`` only with a validation split).
LEVEL_KEYS = ('level', 'macs', 'accuracy', 'macs_to_reach', 'validation_accuracy')

# Training recipes a comparison applies to every method (``recipe``: the fairness rule), as
# dotted overrides of ``common``: a recipe's keys replace common's, and a method's own
# section and the keys its entry fixes come after it. 'published' is Any-Width Networks' (github thanhmvu/awn,
# train.py): SGD at 0.01, momentum 0.9, L2 decay 5e-4 on the gradient, x0.1 at 50% and 75%
# of training, on the SUM of the subnets' cross-entropies (one backward pass per width into
# the same gradients). The two 'sgd_cosine' recipes keep that optimiser and loss with a
# cosine schedule and decay 1e-4 or 5e-4; 'sgd_0.1_cosine_1e-4' is the CIFAR ResNets' rate.
# Summed, K exits give the layers under them up to K times the step of one (construction's
# pretraining, where every neuron is at level 0, too), and a distillation term is not scaled
# with them: part of what the recipe is.
_SGD = {
  'optim.name': 'sgd',
  'optim.learning_rate': 0.01,
  'optim.momentum': 0.9,
  'optim.warmup_epochs': 0.0,
  'loss.exit_reduction': 'sum',
}
RECIPES: dict[str, dict[str, Any]] = {
  'common': {},  # common as the config gives it
  'published': {**_SGD, 'optim.weight_decay': 5e-4, 'optim.schedule': 'step', 'optim.step_decay_at': (0.5, 0.75)},
  'sgd_cosine_1e-4': {**_SGD, 'optim.weight_decay': 1e-4, 'optim.schedule': 'cosine'},
  'sgd_cosine_5e-4': {**_SGD, 'optim.weight_decay': 5e-4, 'optim.schedule': 'cosine'},
  # The CIFAR ResNets' recipe (He et al. 2016: SGD at 0.1, momentum 0.9, decay 1e-4), cosine.
  'sgd_0.1_cosine_1e-4': {**_SGD, 'optim.learning_rate': 0.1, 'optim.weight_decay': 1e-4, 'optim.schedule': 'cosine'},
}
# Each SGD recipe with PyTorch's default initialisation (``NAME_torch``): AWN's published
# recipe was tuned on it (its code is PyTorch's), and it adds about 0.5 point at every AWN
# width over He initialisation there (results/compare_log.md), so a recipe search that
# offers AWN's recipe offers it with the initialisation it was published with.
RECIPES.update(
  {f'{name}_torch': {**RECIPES[name], 'model.init': 'torch'} for name in list(RECIPES) if name != 'common'}
)
AWN_RECIPES = ('common', 'published', 'published_torch')


@dataclasses.dataclass(frozen=True)
class AwnSection:
  """``awn``: Any-Width Networks' settings (methods ``awn`` and ``awn_sandwich``)."""

  widen: float = math.sqrt(2)  # the base network (common.model.width) widened by this, as AWN does
  widths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # cumulative width fractions of the widened network, one per level
  recipe: str = 'common'  # common: the comparison's recipe; published(_torch): AWN's own (RECIPES), for AWN alone
  sandwich_widths: int = 2  # awn_sandwich: random widths per batch besides the smallest and the largest


@dataclasses.dataclass(frozen=True)
class CompareConfig:
  """A comparison config (``configs/compare_fashion_mnist.py``), validated by ``resolve``."""

  common: Config = dataclasses.field(default_factory=Config)  # the run settings every method shares
  methods: tuple[str, ...] = ('steppingnet', 'awn', 'slimmable', 'singlepath', 'independent')  # names in ENTRIES
  extra_budgets: tuple[float, ...] = (0.15, 0.42)  # MAC budgets (fractions of the dense base) besides AWN's points
  seeds: tuple[int, ...] = ()  # () trains each method once (common.seed); else once per seed, in DIR/seedS
  recipe: str = 'common'  # a name in RECIPES: the training recipe every method takes over common
  # Names in RECIPES to choose among: the comparison once per recipe on the validation split
  # (DIR/recipe_NAME) and DIR/recipes.json naming the best (compare_recipes); () = just ``recipe``.
  recipes: tuple[str, ...] = ()
  # A directory of finished methods' results (studies/ledger.py), e.g. results/ledger: each
  # method finished is recorded there, and a method whose settings equal an entry's is taken
  # from it instead of trained, so a study can span machines; '' = none.
  ledger: str = ''
  # A compare.json of another run whose ``awn`` levels SteppingNet is also judged against at
  # equal or lower MACs, e.g. AWN on its own published recipe
  # (results/awn_published_recipe_torchinit_20ep_fashion_mnist.json); '' = none.
  awn_reference: str = ''
  awn: AwnSection = dataclasses.field(default_factory=AwnSection)
  # A method's run settings over common (nested like common; the keys a method's entry fixes
  # itself are refused). SteppingNet's loss.exit_weights: one per budget, () = 1 for every exit.
  steppingnet: config_lib.Overrides = dataclasses.field(default_factory=config_lib.Overrides)
  nonuniform: config_lib.Overrides = dataclasses.field(default_factory=config_lib.Overrides)  # singlepath, multipath

  def __post_init__(self):
    for name in self.methods:
      ENTRIES.get(name)
    if len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f'seeds repeat: {self.seeds}')
    config_lib.check_ranges(
      {
        'seeds': min(self.seeds, default=0),
        'extra_budgets': min(self.extra_budgets, default=1.0),
        'awn.widen': self.awn.widen,
        'awn.sandwich_widths': self.awn.sandwich_widths,
      },
      {'seeds': 0, 'awn.sandwich_widths': 0},
      ('extra_budgets', 'awn.widen'),
    )
    if not self.awn.widths or self.awn.widths[-1] > 1:
      raise ValueError(f'awn.widths are fractions of the widened network, the last <= 1; got {self.awn.widths}')
    config_lib.check_increasing('awn.widths', self.awn.widths)
    for recipe in (self.recipe, *self.recipes):
      if recipe not in RECIPES:
        raise ValueError(f'recipe must be one of {", ".join(RECIPES)}, got {recipe!r}')
    if self.recipes and (self.seeds or not self.common.data.validation_examples):
      raise ValueError(
        'recipes are chosen on the validation split of one seed: set common.data.validation_examples '
        f'and leave seeds empty (got {self.common.data.validation_examples} examples, seeds {self.seeds})'
      )
    if len(set(self.recipes)) != len(self.recipes):
      raise ValueError(f'recipes repeat: {self.recipes}')
    if self.recipes and (self.recipe != 'common' or self.awn.recipe != 'common'):
      raise ValueError(
        'recipes chooses the one recipe of every method: leave recipe and awn.recipe at common '
        f'(got recipe {self.recipe!r}, awn.recipe {self.awn.recipe!r})'
      )
    if self.awn.recipe not in AWN_RECIPES:
      raise ValueError(f'awn.recipe must be one of {", ".join(AWN_RECIPES)}, got {self.awn.recipe!r}')
    if self.awn_reference:
      reference_levels(self.awn_reference)  # a missing or foreign file fails before any training


def reference_levels(path: str, dataset: str | None = None, base_macs: int | None = None) -> dict[str, list[dict]]:
  """The ``awn`` levels of the compare.json at ``path``, by a label naming it
  (``compare_report.targets``' references); a clear error for a missing or foreign file, for
  levels without MACs and accuracy and, given ``dataset`` and ``base_macs``, for a comparison
  on other data or another base network (its MACs would not be this one's)."""
  if not os.path.isfile(path):
    raise ValueError(f'awn_reference {path!r}: no such file (a compare.json with an awn entry)')
  with open(path) as f:
    result = json.load(f)
  try:
    levels = result['methods']['awn']['levels']
  except (KeyError, TypeError):
    raise ValueError(f'awn_reference {path!r} has no methods.awn.levels: not a comparison with AWN') from None
  if not levels or any(not isinstance(r, dict) or {'level', 'macs', 'accuracy'} - set(r) for r in levels):
    raise ValueError(f'awn_reference {path!r}: every AWN level needs level, macs and accuracy')
  for key, ours in (('dataset', dataset), ('base_macs', base_macs)):
    if ours is not None and result.get(key) != ours:
      raise ValueError(f'awn_reference {path!r} has {key} {result.get(key)!r}; this comparison has {ours!r}')
  return {f'AWN of {path}': levels}


# Config sections that hold a run's config: a flat-era override there gets its new spelling.
RUN_ROOTS = config_lib.run_sections(CompareConfig)


def resolve(cc: ml_collections.ConfigDict | Mapping[str, Any], quick: bool = False) -> CompareConfig:
  """The comparison config file ``cc`` as run: with ``quick`` its ``quick`` section's fields
  merged in (sections field by field), validated into a ``CompareConfig``
  (``config.study_config``: an unknown key anywhere is an error naming the closest ones;
  ``--config.methods=a,b`` and ``--config.seeds=0,1`` are accepted as text)."""
  return config_lib.study_config(CompareConfig, cc, quick)


def _config(common: dict, own: Mapping[str, Any], fixed: dict) -> Config:
  """The common settings, then a method's overrides ``own`` (dotted keys), then the dotted
  keys the comparison ``fixed`` for that method (a section may not set those), validated."""
  clash = sorted(set(own) & set(fixed))
  if clash:
    raise ValueError(f'the comparison sets {clash} itself for this method; remove them from its config section')
  return config_lib.from_dict(config_lib.merge(config_lib.merge(common, config_lib.nest(own)), config_lib.nest(fixed)))


def recipe_common(cc: CompareConfig, recipe: str | None = None) -> dict:
  """``common`` with the comparison's recipe (or ``recipe``) applied: what every method starts from."""
  return config_lib.merge(cc.common.to_dict(), config_lib.nest(RECIPES[recipe or cc.recipe]))


def awn_config(cc: CompareConfig) -> Config:
  """AWN on the comparison's recipe, or on its own published one (``awn.recipe``, RECIPES)."""
  fixed = {
    'method': 'joint',
    'model.triangular': True,
    'model.width': cc.common.model.width * cc.awn.widen,
    'model.num_levels': len(cc.awn.widths),
    'model.level_widths': cc.awn.widths,
    'loss.exit_weights': (),
  }
  recipe = cc.awn.recipe if cc.awn.recipe != 'common' else None
  return _config(recipe_common(cc, recipe), {}, fixed)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What every method's configs are built from: the comparison config and the budgets."""

  cc: CompareConfig
  budgets: tuple[float, ...]  # sorted fractions of ``base``
  base: int  # dense base network's MACs
  plans: tuple[tuple[float, dict], ...]  # per budget: widest uniform width that fits, its channels

  @classmethod
  def of(cls, cc: CompareConfig, dataset: datasets.Dataset) -> Setup:
    """The budgets and uniform plans of a comparison config on ``dataset``."""
    budgets, base = budget_points(cc, dataset)
    return cls(cc, tuple(budgets), base, tuple(uniform_plans(cc, dataset, budgets, base)))

  @property
  def common(self) -> dict:
    """The ``common`` section with the comparison's recipe: the run config every method starts from."""
    return recipe_common(self.cc)


def budget_points(cc: CompareConfig, dataset: datasets.Dataset) -> tuple[list[float], int]:
  """(budget fractions sorted, dense base MACs): the AWN level MACs plus the extra points."""
  shape, classes, name = dataset.input_shape, dataset.num_classes, cc.common.model.name
  base = budgets_lib.dense_macs(name, input_shape=shape, num_classes=classes, width=cc.common.model.width)
  awn = awn_config(cc).model
  model = zoo.build_model(
    awn.name,
    num_classes=classes,
    input_shape=shape,
    num_levels=awn.num_levels,
    width=awn.width,
    level_widths=awn.level_widths,
    triangular=True,
  )
  awn_macs = np.cumsum(model.delta_macs().sum(0))
  points = sorted({round(float(m) / base, 6) for m in awn_macs} | set(cc.extra_budgets))
  return points, base


def uniform_plans(
  cc: CompareConfig, dataset: datasets.Dataset, budgets: list[float], base: int
) -> list[tuple[float, dict]]:
  """Per budget: the widest uniform width whose dense network fits, and its channels."""
  plans, name = [], cc.common.model.name
  for b in budgets:
    w, _ = budgets_lib.width_for_budget(
      name, b * base, input_shape=dataset.input_shape, num_classes=dataset.num_classes
    )
    plans.append(
      (w, budgets_lib.layer_channels(name, input_shape=dataset.input_shape, num_classes=dataset.num_classes, width=w))
    )
  return plans


# name -> (setup) -> the configs that method trains (one per budget for 'independent').
ENTRIES: Registry[Callable[[Setup], list[Config]]] = Registry('comparison method')


@ENTRIES.register('steppingnet')
def _steppingnet(s: Setup) -> list[Config]:
  # Exit weights are a SteppingNet lever of its own section (one per budget); the common
  # ones are for another level count, so without the section's every exit weighs 1.
  own = dict(s.cc.steppingnet)
  weights = own.pop('loss.exit_weights', ())
  return [
    _config(
      s.common,
      own,
      {
        'method': 'steppingnet',
        'model.num_levels': len(s.budgets),
        'construction.budgets': s.budgets,
        'loss.exit_weights': weights,
      },
    )
  ]


@ENTRIES.register('steppingnet_tri')
def _steppingnet_tri(s: Setup) -> list[Config]:
  return [c.replace(**{'model.triangular': True}) for c in _steppingnet(s)]


@ENTRIES.register('awn')
def _awn(s: Setup) -> list[Config]:
  return [awn_config(s.cc)]


@ENTRIES.register('awn_sandwich')
def _awn_sandwich(s: Setup) -> list[Config]:
  return [awn_config(s.cc).replace(**{'loss.objective': 'sandwich', 'loss.sandwich_widths': s.cc.awn.sandwich_widths})]


@ENTRIES.register('slimmable')
def _slimmable(s: Setup) -> list[Config]:
  channels = [c for _, c in s.plans]
  sizes = {
    name: [channels[0][name]] + [channels[j][name] - channels[j - 1][name] for j in range(1, len(channels))]
    for name in channels[0]
  }
  return [
    _config(
      s.common,
      {},
      {
        'method': 'joint',
        'model.mask_rule': False,
        'model.num_levels': len(s.budgets),
        'loss.exit_weights': (),
        'model.assignment': json.dumps(sizes),
      },
    )
  ]


def _nonuniform(s: Setup, budgets: tuple[float, ...], schedule: bool = True) -> Config:
  """Yang & Fan's non-uniform subnets for ``budgets`` out of the background network that
  is the widest uniform plan under the top budget (the ``nonuniform`` section over common;
  without ``schedule``, the default schedule whatever the sections say)."""
  own = {k: v for k, v in s.cc.nonuniform.items() if schedule or k != 'baseline.generation_epochs'}
  fixed = {
    'method': 'nonuniform',
    'model.num_levels': len(budgets),
    'construction.budgets': budgets,
    'loss.exit_weights': (),
    'construction.widen': s.plans[-1][0] / s.cc.common.model.width,
  }
  if not schedule:
    fixed['baseline.generation_epochs'] = ()  # nor common's
  return _config(s.common, own, fixed)


@ENTRIES.register('singlepath')
def _singlepath(s: Setup) -> list[Config]:
  return [_nonuniform(s, s.budgets)]


@ENTRIES.register('multipath')
def _multipath(s: Setup) -> list[Config]:
  # One run per budget, pruned once at construction.pretrain_epochs (a single-path schedule
  # in the nonuniform section is not one for a single subnet).
  return [_nonuniform(s, (b,), schedule=False) for b in s.budgets]


@ENTRIES.register('independent')
def _independent(s: Setup) -> list[Config]:
  return [
    _config(
      s.common,
      {},
      {'method': 'joint', 'model.num_levels': 1, 'model.width': w, 'loss.exit_weights': (), 'model.level_widths': ()},
    )
    for w, _ in s.plans
  ]


def _evaluate(
  workdir: str, dataset: datasets.Dataset, latency_repeats: int, validation: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[list[dict], bool]:
  """(evaluate.py's rows of the run in ``workdir``, whether it steps by reuse); with
  ``validation`` (images, labels held out of training) each row also has its
  ``validation_accuracy``, the number settings are chosen on."""
  net = stepnet_jax.load(workdir)
  rows = evaluation.evaluate_levels(
    net, dataset.test_images, dataset.test_labels, batch_size=1000, latency_batch=1, latency_repeats=latency_repeats
  )
  if validation is not None:
    acc = evaluation.exit_accuracy(net.functions.exits, net.variables, *validation, 1000)
    for row, a in zip(rows, acc):
      row['validation_accuracy'] = float(a)
  return rows, net.reusable


def _as_levels(rows: list[list[dict]]) -> list[dict]:
  """One single-level network per budget as the levels of one method: level k is network k,
  reached by running networks 0..k."""
  levels, spent = [], 0
  for k, r in enumerate(rows):
    row = dict(r[0], level=k)
    row['delta_macs'] = row['macs'] - (levels[-1]['macs'] if levels else 0)
    spent += row['macs']
    row['macs_to_reach'] = spent
    levels.append(row)
  return levels


def run_method(
  name: str,
  cfgs: list[Config],
  workdir: str,
  full: datasets.Dataset,
  dataset: datasets.Dataset,
  latency_repeats: int,
  validation: tuple[np.ndarray, np.ndarray] | None = None,
  ledger: str = '',
  common: Config | None = None,
) -> dict:
  """Trains (or reuses) one method; returns {'levels': rows, 'train_seconds', 'train_steps',
  'reusable', 'configs'}.

  A result (``workdir/result.json``) is reused when it comes from as many runs as these
  settings make and every run behind it holds exactly these settings; a leftover run
  (e.g. interrupted) must hold exactly these settings too. Both are checked by
  ``run.check_workdir``, for every run before training any.
  ``train_seconds`` adds up the training time each run reports (all of its sessions,
  when it was resumed), not this call's wall time; ``train_steps`` the optimizer updates of
  all its runs (filled in for a result saved before it was recorded). ``full`` is the loaded dataset (each
  method takes the configured subset of it itself); ``dataset`` is that subset, whose
  test split is evaluated here. With a ``ledger`` directory (``studies/ledger.py``) a
  method without a result here is taken from a ledger entry of exactly these settings,
  scored as a comparison with ``common`` scores (its ``ledger`` key says so), and a
  method trained or reused here is recorded there.
  """
  found = finished_result(name, cfgs, workdir, dataset.name, ledger, common)
  if found is not None and 'ledger' not in found:
    print(f'{name}: reusing {os.path.join(workdir, "result.json")}', flush=True)
    if 'train_steps' not in found:
      found['train_steps'] = _train_steps(cfgs, full)
    if ledger and ledger_lib.find(ledger, name, cfgs, dataset.name, common) is None:  # before the ledger was named
      print(f'{name}: recorded in {ledger_lib.record(ledger, name, dataset.name, found, common)}', flush=True)
    return found
  if found is not None:
    print(f'{name}: reusing the ledger entry {found["ledger"]["path"]}', flush=True)
    return found
  subs = _run_dirs(workdir, len(cfgs))
  print(f'=== {name} ===', flush=True)
  seconds, rows, reusable = 0.0, [], len(cfgs) == 1 and cfgs[0].model.num_levels > 1
  for sub, cfg in zip(subs, cfgs):
    seconds += trainers.train(cfg, sub, full)['seconds']
    r, net_reusable = _evaluate(sub, dataset, latency_repeats, validation)
    rows.append(r)
    reusable = reusable and net_reusable
  levels = rows[0] if len(cfgs) == 1 else _as_levels(rows)
  result = {
    'levels': levels,
    'train_seconds': seconds,
    'train_steps': _train_steps(cfgs, full),
    'reusable': reusable,
    'configs': [c.to_dict() for c in cfgs],
  }
  reports.write_json(os.path.join(workdir, 'levels.json'), levels, {'method': name, 'dataset': dataset.name})
  with open(os.path.join(workdir, 'result.json'), 'w') as f:
    json.dump(result, f, indent=2)
  if ledger:
    print(f'{name}: recorded in {ledger_lib.record(ledger, name, dataset.name, result, common)}', flush=True)
  return result


def _run_dirs(workdir: str, count: int) -> list[str]:
  """The run directories of a method of ``count`` runs (one per budget when more than one)."""
  return [workdir] if count == 1 else [os.path.join(workdir, f'budget{i}') for i in range(count)]


def finished_result(
  name: str, cfgs: Sequence[Config], workdir: str, dataset_name: str, ledger: str = '', common: Config | None = None
) -> dict | None:
  """The result ``run_method`` takes instead of training method ``name`` with ``cfgs`` in
  ``workdir``: its ``result.json``, else (with a ``ledger``) the entry of exactly these settings
  scored as a comparison with ``common`` scores (it has a ``ledger`` key), else None.

  A run left in one of its directories must hold exactly these settings, and a result.json
  must come from as many runs as these settings make, each with its checkpoint; otherwise
  ValueError (``run.check_workdir``)."""
  if ledger and common is None:
    raise ValueError('a ledger needs the comparison settings (common) its entries are scored under')
  result_path = os.path.join(workdir, 'result.json')
  left = [run.check_workdir(sub, cfg) for sub, cfg in zip(_run_dirs(workdir, len(cfgs)), cfgs)]
  if os.path.exists(result_path):
    with open(result_path) as f:
      saved = json.load(f)
    if len(saved.get('configs', [])) != len(cfgs) or any(meta is None for meta in left):
      raise ValueError(
        f'{result_path} is the result of {len(saved.get("configs", []))} runs, these settings make '
        f'{len(cfgs)}; delete {workdir} to run {name} again'
      )
    return saved
  return ledger_lib.find(ledger, name, cfgs, dataset_name, common) if ledger else None


def _train_steps(cfgs: list[Config], full: datasets.Dataset) -> int:
  """Optimizer updates of the runs ``cfgs``: every trainer runs ``train.num_epochs`` epochs of
  steps (construction's and the non-uniform baseline's phases included)."""
  return sum(cfg.train.num_epochs * run.prepare_data(cfg, full)[1] for cfg in cfgs)


def compare(
  cc: ml_collections.ConfigDict | Mapping[str, Any], workdir: str, quick: bool = False, latency_repeats: int = 10
) -> dict:
  """Runs every method of compare config ``cc`` in ``workdir``; returns the compare.json dict.

  With ``cc.seeds`` (e.g. ``--config.seeds=0,1,2``) every method is trained once per seed
  (``common.seed``), each seed's comparison in ``workdir/seedS``, and ``workdir/compare.json``
  holds the mean over seeds per level (``aggregate_seeds``). With ``cc.recipes`` the
  comparison runs once per recipe and ``workdir/recipes.json`` is the choice among them
  (``compare_recipes``).
  """
  resolved = resolve(cc, quick)
  if resolved.recipes:
    return compare_recipes(resolved, workdir, latency_repeats)
  return compare_resolved(resolved, workdir, latency_repeats)


RECIPE_RULE = (
  "the recipe with the highest validation accuracy averaged over every method's levels (each level of each "
  'method counts once; the test accuracy plays no part)'
)


def one_comparisons(cc: CompareConfig, workdir: str) -> list[tuple[str | int | None, CompareConfig, str]]:
  """The single comparisons (one recipe, one seed) ``compare`` of ``cc`` in ``workdir`` runs, as
  (the recipe or seed that sets it apart or None, its config, its directory)."""
  if cc.recipes:
    return [
      (recipe, dataclasses.replace(cc, recipes=(), recipe=recipe), os.path.join(workdir, f'recipe_{recipe}'))
      for recipe in cc.recipes
    ]
  if cc.seeds:
    return [
      (
        seed,
        dataclasses.replace(cc, seeds=(), common=cc.common.replace(seed=seed)),
        os.path.join(workdir, f'seed{seed}'),
      )
      for seed in cc.seeds
    ]
  return [(None, cc, workdir)]


def plan(cc: CompareConfig, workdir: str) -> list[dict]:
  """What ``compare`` of the resolved ``cc`` in ``workdir`` would do for each method of each single
  comparison, without training or writing: one row per (recipe or seed, method) with
  ``status`` 'reuse' (its result.json), 'ledger' (an entry of exactly its settings: ``where``),
  'evaluate' (its runs are trained to the end, their evaluation is missing), 'resume' (runs
  left part-way with its settings: ``where`` names their steps) or 'train'. Settings that
  ``compare`` would refuse (a run directory of other settings, a result.json without its
  runs) raise. For a study that spans sessions or machines: the rows to train or resume are
  the work still to do. A finished method's row has ``scores``: ('validation' or 'test', its
  accuracy per level), the validation one when its runs held images out; None otherwise."""
  rows = []
  for key, one, one_dir in one_comparisons(cc, workdir):
    _, dataset, _, cfgs = _method_configs(one)
    for name, c in cfgs.items():
      method_dir = os.path.join(one_dir, name)
      found = finished_result(name, c, method_dir, dataset.name, cc.ledger, one.common)
      scores = None
      if found is not None:
        ledger = 'ledger' in found
        status, where = ('ledger', found['ledger']['path']) if ledger else ('reuse', f'{method_dir}/result.json')
        held_out = all('validation_accuracy' in r for r in found['levels'])
        field = 'validation_accuracy' if held_out else 'accuracy'
        scores = ('validation' if held_out else 'test', [r[field] for r in found['levels']])
      else:
        subs = _run_dirs(method_dir, len(c))
        left = [run.progress_left(sub, cfg) for sub, cfg in zip(subs, c)]
        done = [p is not None and not p.at_phase_boundary and p.step >= p.total_steps for p in left]
        status = 'evaluate' if all(done) else 'resume' if any(left) else 'train'
        where = ', '.join(f'{sub} {p}' for sub, p in zip(subs, left) if p is not None) or method_dir
      rows.append({'comparison': key, 'method': name, 'status': status, 'where': where, 'scores': scores})
  return rows


def plan_lines(rows: list[dict]) -> list[str]:
  """``plan``'s rows as the lines ``--plan`` prints (a finished method's with its accuracy per
  level and their mean), the count still to train or resume last."""
  lines = []
  for r in rows:
    line = f'{"" if r["comparison"] is None else str(r["comparison"]) + " "}{r["method"]}: {r["status"]} {r["where"]}'
    if r.get('scores'):
      split, accuracies = r['scores']
      per_level = ' / '.join(f'{100 * a:.2f}' for a in accuracies)
      line += f' ({split} accuracy {per_level} %, mean {100 * np.mean(accuracies):.2f})'
    lines.append(line)
  todo = sum(r['status'] in ('train', 'resume') for r in rows)  # 'evaluate' takes seconds
  return [*lines, f'{todo} of {len(rows)} runs still to train or resume']


def compare_recipes(cc: CompareConfig, workdir: str, latency_repeats: int = 10) -> dict:
  """The comparison once per recipe of ``cc.recipes``, each in ``workdir/recipe_NAME`` on the
  validation split, and the choice among them by ``RECIPE_RULE``: writes recipes.json/md/png
  (every method's mean validation accuracy per recipe) and returns the recipes.json dict."""
  scores = {}
  for recipe, one, one_dir in one_comparisons(cc, workdir):
    print(f'##### recipe {recipe} #####', flush=True)
    out = compare_resolved(one, one_dir, latency_repeats)
    levels = {name: [r['validation_accuracy'] for r in res['levels']] for name, res in out['methods'].items()}
    scores[recipe] = {
      'settings': RECIPES[recipe],
      'mean_validation_accuracy': float(np.mean([a for accs in levels.values() for a in accs])),
      'methods': {name: float(np.mean(accs)) for name, accs in levels.items()},
    }
  chosen = max(scores, key=lambda r: scores[r]['mean_validation_accuracy'])
  result = {'rule': RECIPE_RULE, 'epochs': cc.common.train.num_epochs, 'recipes': scores, 'chosen': chosen}
  os.makedirs(workdir, exist_ok=True)
  reports.write_study(
    workdir,
    'recipes',
    result,
    compare_report.recipes_markdown(result),
    lambda path: compare_report.recipes_plot(path, result),
  )
  return result


def compare_resolved(cc: CompareConfig, workdir: str, latency_repeats: int = 10, write_report: bool = True) -> dict:
  """``compare`` of a config already validated (``resolve``); without ``write_report`` the
  runs are trained or reused but ``workdir``'s compare.json/md/png are left as they are (a
  study reading another comparison's networks)."""
  if cc.seeds:
    if not write_report:
      raise ValueError('write_report=False is for one seed')
    return compare_seeds(cc, workdir, latency_repeats)
  return _compare_one(cc, workdir, latency_repeats, write_report)


def compare_seeds(cc: CompareConfig, workdir: str, latency_repeats: int) -> dict:
  """The comparison once per seed of ``cc.seeds``, then their mean and spread."""
  per_seed, results = {}, {}
  for seed, one, one_dir in one_comparisons(cc, workdir):
    print(f'##### seed {seed} #####', flush=True)
    seed_runs = {}  # each method's run_method result (from its run directory or the ledger)
    per_seed[seed] = _compare_one(one, one_dir, latency_repeats, runs=seed_runs)
    for name in cc.methods:
      results.setdefault(name, []).append(seed_runs[name])
  first = per_seed[cc.seeds[0]]
  merged = {
    name: {**aggregate_seeds(runs), 'train_steps': first['methods'][name]['train_steps']}
    for name, runs in results.items()
  }
  head = {k: first[k] for k in ('dataset', 'epochs', 'recipe', 'base_macs', 'budgets')}
  out = _summary(cc, merged, {**head, 'seeds': list(cc.seeds)}, LEVEL_KEYS + ('accuracy_std', 'accuracies'))
  title = f'{first["dataset"]}, mean of seeds {", ".join(map(str, cc.seeds))}'
  _write_report(cc, workdir, merged, out, title)
  return out


def _summary(cc: CompareConfig, results: dict[str, dict], head: dict, level_keys: tuple[str, ...]) -> dict:
  """compare.json: ``head`` (dataset, epochs, budgets, ...), each method's levels (their
  ``level_keys``) and training cost, and SteppingNet's leads on both readings."""
  return {
    **head,
    'methods': {
      name: {
        'levels': [{k: r[k] for k in level_keys if k in r} for r in res['levels']],
        'train_seconds': res['train_seconds'],
        'train_steps': res['train_steps'],
        'reusable': res['reusable'],
      }
      for name, res in results.items()
    },
    'leads': compare_report.leads(results),
    'leads_to_reach': compare_report.both_leads(results).get('macs_to_reach', []),
    **({'awn_reference': cc.awn_reference} if cc.awn_reference else {}),
  }


def _write_report(cc: CompareConfig, workdir: str, results: dict[str, dict], out: dict, title: str) -> None:
  """compare.json (``out``), compare.md and compare.png in ``workdir``."""
  os.makedirs(workdir, exist_ok=True)
  references = reference_levels(cc.awn_reference) if cc.awn_reference else None
  title = f'{title} ({out["epochs"]} epochs' + (f', recipe {cc.recipe})' if cc.recipe else ')')
  text = compare_report.markdown(
    results,
    out['budgets'],
    out['base_macs'],
    out['dataset'],
    out['epochs'],
    seeds=cc.seeds,
    recipe=cc.recipe,
    awn_recipe=cc.awn.recipe,
    references=references,
  )
  reports.write_study(workdir, 'compare', out, text, lambda path: compare_report.plot(path, results, title, references))


def aggregate_seeds(runs: list[dict]) -> dict:
  """One method's results over seeds: per level the mean accuracy, its sample standard
  deviation (ddof 1; 0 for one seed) and every seed's accuracy; MACs are the largest of any
  seed (construction may land a few MACs apart), step latency the mean; training seconds
  the mean per seed."""
  levels = []
  for rows in zip(*[r['levels'] for r in runs]):
    acc = np.array([r['accuracy'] for r in rows])
    levels.append(
      {
        'level': rows[0]['level'],
        'macs': max(r['macs'] for r in rows),
        'macs_to_reach': max(r['macs_to_reach'] for r in rows),
        'accuracy': float(acc.mean()),
        'accuracy_std': float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
        'accuracies': [float(a) for a in acc],
        'latency_ms': float(np.mean([r['latency_ms'] for r in rows])),
      }
    )
    if all('validation_accuracy' in r for r in rows):
      levels[-1]['validation_accuracy'] = float(np.mean([r['validation_accuracy'] for r in rows]))
  if len({len(r['levels']) for r in runs}) != 1:
    raise ValueError('the seeds of one method have different level counts')
  return {
    'levels': levels,
    'train_seconds': float(np.mean([r['train_seconds'] for r in runs])),
    'reusable': all(r['reusable'] for r in runs),
    **({'ledger': [r['ledger'] for r in runs if 'ledger' in r]} if any('ledger' in r for r in runs) else {}),
  }


def _method_configs(
  cc: CompareConfig,
) -> tuple[datasets.Dataset, datasets.Dataset, Setup, dict[str, list[Config]]]:
  """(the loaded dataset, the subset every method sees, the budgets, each method's run
  configs) of one comparison (one seed, one recipe); every config is checked against the
  data before any training."""
  full = datasets.load_for(cc.common.data)
  dataset = datasets.subset(full, cc.common.data.train_subset, cc.common.data.test_subset, cc.common.seed)
  setup = Setup.of(cc, dataset)
  cfgs = {name: ENTRIES.get(name)(setup) for name in cc.methods}
  for c in cfgs.values():
    for cfg in c:
      trainers.check(cfg, dataset)
  return full, dataset, setup, cfgs


def _compare_one(
  cc: CompareConfig, workdir: str, latency_repeats: int, write_report: bool = True, runs: dict | None = None
) -> dict:
  """One comparison (one seed: ``common.seed``) of the resolved config ``cc`` in ``workdir``;
  ``runs``, if given, receives each method's ``run_method`` result."""
  common = cc.common
  full, dataset, setup, cfgs = _method_configs(cc)
  print(f'budgets (x {setup.base:,} MACs): ' + ', '.join(f'{b:.4f}' for b in setup.budgets), flush=True)
  if cc.awn_reference:  # judged against in the report: its data and MACs must be this comparison's
    reference_levels(cc.awn_reference, dataset.name, setup.base)
  validation = run.prepare_splits(common, full)[1]  # the images every method held out, if any
  results = {
    name: run_method(
      name, c, os.path.join(workdir, name), full, dataset, latency_repeats, validation, cc.ledger, common
    )
    for name, c in cfgs.items()
  }
  if runs is not None:
    runs.update(results)
  head = {
    'dataset': dataset.name,
    'epochs': common.train.num_epochs,
    'recipe': cc.recipe,
    'base_macs': setup.base,
    'budgets': list(setup.budgets),
  }
  out = _summary(cc, results, head, LEVEL_KEYS)
  if write_report:
    _write_report(cc, workdir, results, out, f'{common.model.name} on {dataset.name}')
  return out


def _define_flags() -> None:
  flags.DEFINE_integer('latency_repeats', 10, 'Timed calls per level for the latency column.')
  flags.DEFINE_boolean(
    'plan',
    False,
    'Print what the comparison would reuse (its result.json, a ledger entry), resume or train, '
    'per recipe or seed and method, and exit without training.',
  )


def _study(f: flags.FlagValues) -> dict | None:
  if f.plan:
    print('\n'.join(plan_lines(plan(resolve(f.config, f.quick), f.workdir))), flush=True)
    return None
  return compare(f.config, f.workdir, quick=f.quick, latency_repeats=f.latency_repeats)


def command() -> None:
  """``python -m stepnet_jax.compare --config FILE --workdir DIR [--quick] [--plan]``."""
  cli.run_study('Comparison', _study, extra_flags=_define_flags, run_roots=RUN_ROOTS)


if __name__ == '__main__':
  command()
