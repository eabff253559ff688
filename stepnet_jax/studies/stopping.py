"""Anytime inference study: stopping policies on SteppingNet, AWN and Guan et al.'s cascade.

    python -m stepnet_jax.adaptive --config configs/adaptive_fashion_mnist.py --workdir DIR [--quick]

Trains (through the comparison's machinery, reusing finished runs) SteppingNet, AWN and
the independent networks at SteppingNet's budgets, all without the validation split
carved from the training data (``common.data.validation_examples``). With
``policy_split='test'`` the networks train on every training image instead (a finished
comparison's runs serve: ``networks``) and ``policy_examples`` test images take the
validation split's place; the study reports on the other test images. Then, per family:

* ``steppingnet`` and ``awn`` step with reuse; ``cascade`` is the independent networks
  run one after another from scratch (Guan et al.): reaching level k costs networks 0..k;
* heuristic policies (``confidence``, ``entropy``) are swept over their thresholds, and
  the learned selection module (``methods/selection.py``) is trained for each MAC price
  lambda on one half of the validation split (``policy_fit='held'``) or on the networks'
  own training images (``'train'``); every point is the compiled anytime
  program (``core/anytime.py``) on the test set: accuracy, average MACs actually spent per
  input, and where inputs stopped;
* for the ``joint_families``, the selection module is trained again at each lambda
  together with the network (Guan et al.'s joint training: rows ``<family>_learned_joint``,
  each point on its own fine-tuned copy of the network);
* the operating points the targets speak of are chosen on the other half (with
  ``policy_fit='train'``, on the whole validation split).

Writes DIR/adaptive.json, DIR/adaptive.md (table, targets checked) and DIR/adaptive.png.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging
from flax import nnx

import stepnet_jax
from stepnet_jax import cli, seeds
from stepnet_jax import config as config_lib
from stepnet_jax.config import Config
from stepnet_jax.core import anytime
from stepnet_jax.data import datasets
from stepnet_jax.inference import policies, sweeps, timing
from stepnet_jax.methods import selection
from stepnet_jax.models import cascade
from stepnet_jax.studies import compare, reports

# family -> the comparison method whose runs it uses.
FAMILIES = {'steppingnet': 'steppingnet', 'awn': 'awn', 'cascade': 'independent'}


@dataclasses.dataclass(frozen=True)
class Heuristics:
  """``heuristics``: the heuristic policies swept on each family (fields of ``Knobs``)."""

  steppingnet: tuple[str, ...] = ()  # () sweeps none on this family
  awn: tuple[str, ...] = ()
  cascade: tuple[str, ...] = ()


POLICY_SPLITS = ('train', 'test')  # AdaptiveConfig.policy_split: where the policies' images come from
POLICY_FITS = ('held', 'train')  # AdaptiveConfig.policy_fit: where the selection modules are fitted


@dataclasses.dataclass(frozen=True)
class Knobs:
  """``knobs``: the values each heuristic policy (``policies.HEURISTICS``) is swept over,
  from stopping early to stopping late; a policy named in ``heuristics`` needs some."""

  # stop when the top class's probability exceeds the knob
  confidence: tuple[float, ...] = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
  margin: tuple[float, ...] = ()  # stop when the top-1 probability exceeds the top-2 one by the knob
  # stop when the entropy of the prediction falls below the knob (nats)
  entropy: tuple[float, ...] = (2.0, 1.5, 1.2, 1.0, 0.8, 0.6, 0.45, 0.3, 0.2, 0.12, 0.07, 0.04, 0.02, 0.01)


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig(compare.CompareConfig):
  """An anytime study config (``configs/adaptive_fashion_mnist.py``), validated by ``resolve``:
  the comparison's sections (which trains the networks; its ``methods`` are set from
  ``families``) and the policies'. ``common.data.validation_examples`` must hold images
  out: the policies' operating points are chosen there, and the selection modules trained
  there too unless ``policy_fit='train'``."""

  families: tuple[str, ...] = tuple(FAMILIES)  # names in FAMILIES; steppingnet's top exit is the reference
  heuristics: Heuristics = dataclasses.field(default_factory=Heuristics)
  knobs: Knobs = dataclasses.field(default_factory=Knobs)
  lambdas: tuple[float, ...] = (0.0, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 0.8)  # MAC prices: a module each
  # Families whose selection module is also trained end to end with their networks (Guan et
  # al.'s joint training; ``common.selection.network_learning_rate``): rows <family>_learned_joint.
  joint_families: tuple[str, ...] = ()
  tolerance: float = 0.003  # operating point: the cheapest within this of the top exit, on validation
  # Where the policies are fitted and chosen (``policy_data``), on images no network saw:
  # 'train' holds common.data.validation_examples training images out of every network's
  # training; 'test' takes ``policy_examples`` test images instead and reports on the rest
  # of the test set (set validation_examples to 0 so the networks train on every training
  # image, as a comparison's do).
  policy_split: str = 'train'
  policy_examples: int = 5000  # with policy_split='test': test images that choose (and, if 'held', fit) the policies
  # Where the selection modules are fitted (``policy_data``): 'held' on half of the held-out
  # images, the other half choosing every operating point; 'train' on at most
  # ``policy_fit_examples`` of the images the networks trained on, all held-out images
  # choosing. 'train' gives the module many more images and the choice twice as many, but it
  # is sound only where the exits are about as accurate on the training images as on unseen
  # ones (ResNet-20 after 3 epochs, results/resnet20_32_log.md); a network that fits its
  # training images (LeNet at 20 epochs: 99.4%) would teach the module that early exits are
  # right more often than they are.
  policy_fit: str = 'held'
  policy_fit_examples: int = 20000
  # A comparison's workdir whose runs are the networks (the same settings, or it is refused),
  # read there and not copied; '' trains them in the study's workdir.
  networks: str = ''

  def __post_init__(self):
    super().__post_init__()
    if self.policy_split not in POLICY_SPLITS:
      raise ValueError(f'unknown policy_split {self.policy_split!r}; choose one of {", ".join(POLICY_SPLITS)}')
    if self.policy_split == 'train' and not self.common.data.validation_examples:
      raise ValueError(
        'set common.data.validation_examples: policies are tuned on a split the networks never saw '
        "(or policy_split='test' to take it from the test set)"
      )
    if self.policy_examples < 2:
      raise ValueError(f'policy_examples must be at least 2 (one per half), got {self.policy_examples}')
    if self.policy_fit not in POLICY_FITS:
      raise ValueError(f'unknown policy_fit {self.policy_fit!r}; choose one of {", ".join(POLICY_FITS)}')
    if self.policy_fit_examples < 1:
      raise ValueError(f'policy_fit_examples must be at least 1, got {self.policy_fit_examples}')
    if self.seeds:
      raise ValueError(f'the anytime study trains one seed (common.seed): seeds must be (), got {self.seeds}')
    if self.recipes:
      raise ValueError(f'the anytime study trains on one recipe (recipe): recipes must be (), got {self.recipes}')
    if self.ledger:
      raise ValueError(
        f'the anytime study needs the networks, which a ledger does not hold: ledger must be empty, got {self.ledger!r}'
      )
    for family in self.families:
      if family not in FAMILIES:
        raise ValueError(f'unknown family {family!r}; choose from {", ".join(FAMILIES)}')
    if self.common.selection.joint:
      raise ValueError(
        'common.selection.joint: the learned rows keep the networks frozen; name the families '
        'whose selection module trains with the network in joint_families (rows <family>_learned_joint)'
      )
    for family in self.joint_families:
      if family not in self.families:
        raise ValueError(f'joint_families: {family!r} is not one of the families {self.families}')
    if 'steppingnet' not in self.families:
      raise ValueError(f"families must include steppingnet (the targets are its top exit's), got {self.families}")
    known = [f.name for f in dataclasses.fields(Knobs)]
    for family in FAMILIES:
      for policy in getattr(self.heuristics, family):
        if policy not in known:
          raise ValueError(f'unknown policy {policy!r} in heuristics.{family}; choose from {", ".join(known)}')
        if not getattr(self.knobs, policy):
          raise ValueError(f'heuristics.{family} sweeps {policy}: give its values in knobs.{policy}')
    if not self.lambdas:
      raise ValueError('lambdas: give at least one MAC price for the selection module')
    config_lib.check_ranges({'lambdas': min(self.lambdas), 'tolerance': self.tolerance}, {'lambdas': 0, 'tolerance': 0})


def resolve(cc: ml_collections.ConfigDict | Mapping[str, Any], quick: bool = False) -> AdaptiveConfig:
  """The anytime study config file ``cc`` as run (with ``quick``, its ``quick`` section merged
  in), validated into an ``AdaptiveConfig`` (``config.study_config``)."""
  return config_lib.study_config(AdaptiveConfig, cc, quick)


@dataclasses.dataclass
class Family:
  """A trained network (or cascade) ready for policies."""

  name: str
  module: nnx.Module  # has ``exits(x, train)``: for training the selection module
  program: anytime.Program
  static: list[dict]  # the levels without a policy: level, macs_to_reach, accuracy

  def predict_fn(self, strategy: str) -> Callable:
    """The jitted anytime program of this family with ``strategy``."""
    return anytime.make_predict(self.program, strategy)


def load_family(name: str, workdir: str, rows: list[dict]) -> Family:
  """The family ``name`` from the comparison's run(s) in ``workdir`` (its ``levels`` ``rows``)."""
  static = [{'level': r['level'], 'macs_to_reach': r['macs_to_reach'], 'accuracy': r['accuracy']} for r in rows]
  macs = [r['macs_to_reach'] for r in rows]
  if name != 'cascade':
    net = stepnet_jax.load(workdir)
    return Family(name, nnx.merge(net.graphdef, net.variables), net.program, static)
  nets = [stepnet_jax.load(os.path.join(workdir, f'budget{k}')) for k in range(len(rows))]
  module = cascade.Cascade([nnx.merge(n.graphdef, n.variables) for n in nets])
  graphdef = nnx.graphdef(module)
  forwards = [lambda v, x, k=k: nnx.merge(graphdef, v, copy=True).nets[k](x) for k in range(len(nets))]
  return Family(name, module, anytime.recompute_program(forwards, macs), static)


@dataclasses.dataclass(frozen=True)
class PolicyData:
  """The study's splits: ``fit`` trains the selection modules, ``choose`` picks every
  operating point, ``test`` reports (each images, labels); ``held``: the indices of the
  held-out images in the training split (policy_split 'train') or the test split ('test');
  ``fit_from``: 'held' (fit and choose are its halves) or 'train' (fit is ``fit_indices``
  of the training split, choose is every held-out image)."""

  fit: tuple[np.ndarray, np.ndarray]
  choose: tuple[np.ndarray, np.ndarray]
  test: tuple[np.ndarray, np.ndarray]
  held: np.ndarray
  split: str
  fit_from: str = 'held'
  fit_indices: np.ndarray | None = None

  def fit_key(self) -> str:
    """'held', or 'train:' and a fingerprint of the training images the modules are fitted on."""
    if self.fit_from == 'held':
      return 'held'
    return 'train:' + hashlib.sha1(np.asarray(self.fit_indices, np.int64).tobytes()).hexdigest()[:16]

  def digest(self, networks: str) -> str:
    """A short fingerprint of the split and the networks, kept with what was fitted on them."""
    text = f'{self.split}:{os.path.abspath(networks)}:'.encode() + np.asarray(self.held, np.int64).tobytes()
    if self.fit_from != 'held':  # the digests of 'held' studies stay what they were
      text += f':fit {self.fit_key()}'.encode()
    return hashlib.sha1(text).hexdigest()[:16]


def policy_data(study: AdaptiveConfig, dataset: datasets.Dataset) -> PolicyData:
  """The images the policies are fitted, chosen and reported on (``AdaptiveConfig.policy_split``
  and ``policy_fit``)."""
  seed = study.common.seed
  # The training images no network trained on (none without a validation split).
  _, unseen = datasets.split_validation(dataset, study.common.data.validation_examples, seed)
  if study.policy_split == 'train':
    held = unseen
    images, labels = dataset.train_images, dataset.train_labels
    test = (dataset.test_images, dataset.test_labels)
  else:
    count = len(dataset.test_labels)
    if study.policy_examples >= count:
      raise ValueError(f'policy_examples {study.policy_examples} leaves none of the {count} test images to report on')
    order = np.random.RandomState(seeds.seed_for(seed, seeds.Stream.POLICY_TEST_SPLIT)).permutation(count)
    held, report = np.sort(order[: study.policy_examples]), np.sort(order[study.policy_examples :])
    images, labels = dataset.test_images, dataset.test_labels
    test = (images[report], labels[report])
  if study.policy_fit == 'held':
    fit_idx, choose_idx = validation_halves(held, seed)
    fit, choose = [(images[i], labels[i]) for i in (fit_idx, choose_idx)]
    return PolicyData(fit, choose, test, held, study.policy_split)
  trained_on = np.setdiff1d(np.arange(len(dataset.train_labels)), unseen)
  order = np.random.RandomState(seeds.seed_for(seed, seeds.Stream.POLICY_FIT_SUBSET)).permutation(trained_on)
  fit_idx = np.sort(order[: study.policy_fit_examples])
  fit = (dataset.train_images[fit_idx], dataset.train_labels[fit_idx])
  return PolicyData(fit, (images[held], labels[held]), test, held, study.policy_split, 'train', fit_idx)


def static_levels(predict: Callable, variables, static: list[dict], split: tuple) -> list[dict]:
  """``static`` (a family's levels) with each level's accuracy measured on ``split``: every
  input stopped at that level by a MAC budget."""
  macs = tuple(int(r['macs_to_reach']) for r in static)
  out = []
  for row in static:
    policy = policies.MacBudget(row['macs_to_reach'], macs)
    out.append({**row, 'accuracy': sweeps.evaluate_policy(predict, variables, policy, *split, len(static))['accuracy']})
  return out


def validation_halves(held: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The held-out images (training or test ones: ``policy_data``) split in two: one half
  trains the selection modules, the other chooses every policy's operating point (so no
  choice is made on the data a module was fitted to)."""
  order = np.random.RandomState(seeds.seed_for(seed, seeds.Stream.VALIDATION_HALVES)).permutation(len(held))
  return np.sort(held[order[: len(held) // 2]]), np.sort(held[order[len(held) // 2 :]])


def learned_points(
  family: Family,
  cfg: Config,
  lambdas: Sequence[float],
  fit: tuple,
  choose: tuple,
  test: tuple,
  num_classes: int,
  strategy: str,
  joint: bool = False,
  keep: str | None = None,
  split: str = 'train',
  fit_key: str = 'held',
) -> tuple[list[dict], list[dict]]:
  """(test points, choice-split points) of the selection module trained on ``fit`` at each MAC
  price; ``joint``: trained together with the network, each point on its own fine-tuned network.

  With ``keep`` (a JSON file) each lambda's points are written there as soon as they are
  measured, under what they depend on (the selection settings, the seed, the network's
  static levels, the split sizes, the strategy, ``fit_key``: ``PolicyData.fit_key``); a study stopped in the middle of a sweep
  (a module can take minutes) goes on from the next lambda, and other settings start anew.
  """
  predict = family.predict_fn(strategy)
  cfg = cfg.replace(**{'selection.joint': joint})  # the config refuses common.selection.joint
  depends = json.loads(
    json.dumps(
      {
        'selection': dataclasses.asdict(cfg.selection),
        'seed': cfg.seed,
        'static': family.static,
        'examples': [len(fit[1]), len(choose[1]), len(test[1])],
        'strategy': strategy,
        **({'split': split} if split != 'train' else {}),  # files of the 'train' studies keep their key
        **({'fit_from': fit_key} if fit_key != 'held' else {}),  # PolicyData.fit_key: which images
      }
    )
  )
  kept = {'depends': depends, 'points': {}}
  if keep and os.path.exists(keep):
    with open(keep) as f:
      saved = json.load(f)
    if saved.get('depends') == depends:
      kept = saved
  test_points, choice_points = [], []
  for lam in lambdas:
    if repr(float(lam)) not in kept['points']:
      policy, variables = selection.train_selector(
        cfg,
        family.module,
        family.program.macs_to_reach,
        *fit,
        num_classes,
        cost_weight=lam,
        desc=f'{family.name} {"joint " if joint else ""}selection',
      )
      levels = family.program.num_levels
      kept['points'][repr(float(lam))] = [
        {'knob': float(lam), **sweeps.evaluate_policy(predict, variables, policy, *images_labels, levels)}
        for images_labels in (test, choose)
      ]
      if keep:
        with open(keep + '.tmp', 'w') as f:
          json.dump(kept, f, indent=1)
        os.replace(keep + '.tmp', keep)
    on_test, on_choice = kept['points'][repr(float(lam))]
    test_points.append(on_test)
    choice_points.append(on_choice)
  return test_points, choice_points


def interpolate(points: Sequence[dict], macs: np.ndarray) -> np.ndarray:
  """A curve's accuracy at ``macs`` (linear between its points, sorted by average MACs)."""
  pts = sorted(points, key=lambda p: p['avg_macs'])
  return np.interp(macs, [p['avg_macs'] for p in pts], [p['accuracy'] for p in pts])


def overlap_grid(a: Sequence[dict], b: Sequence[dict], n: int = 50) -> np.ndarray:
  """Average-MAC values covered by both curves."""
  lo = max(min(p['avg_macs'] for p in a), min(p['avg_macs'] for p in b))
  hi = min(max(p['avg_macs'] for p in a), max(p['avg_macs'] for p in b))
  return np.linspace(lo, hi, n) if hi > lo else np.asarray([])


def curve_gap(a: dict | None, b: dict | None) -> tuple[np.ndarray, np.ndarray] | None:
  """(average MACs both curves cover, curve ``a``'s accuracy minus ``b``'s there), or None when
  a curve is missing or the two do not overlap."""
  if not a or not b:
    return None
  grid = overlap_grid(a['points'], b['points'])
  if not len(grid):
    return None
  return grid, interpolate(a['points'], grid) - interpolate(b['points'], grid)


def operating_point(
  val_points: Sequence[dict], test_points: Sequence[dict], val_top: float, tolerance: float
) -> dict | None:
  """The cheapest knob whose validation accuracy is within ``tolerance`` of the validation top
  accuracy, with its test numbers (None if no knob gets there)."""
  ok = [(v, t) for v, t in zip(val_points, test_points) if v['accuracy'] >= val_top - tolerance]
  if not ok:
    return None
  v, t = min(ok, key=lambda vt: vt[0]['avg_macs'])
  return {'knob': t['knob'], 'validation': v, 'test': t}


def targets(out: dict) -> list[str]:
  """The issue's targets on the measured numbers (one line each)."""
  lines, m = [], out['methods']
  top_acc, top_macs = out['top_accuracy'], out['top_macs']
  op = out.get('operating_point')
  if op is None:
    lines.append('- learned SteppingNet policy within 0.3 point of the top exit: no lambda got there on validation')
  else:
    t = op['test']
    ok = t['accuracy'] >= top_acc - 0.003 and t['avg_macs'] <= 0.5 * top_macs
    lines.append(
      f'- learned SteppingNet policy (lambda {op["knob"]:g}, chosen on validation): '
      f'{100 * t["accuracy"]:.2f}% at {t["avg_macs"] / top_macs:.1%} of the top MACs vs top exit '
      f'{100 * top_acc:.2f}%: {"met" if ok else "NOT met"} (target: within 0.3 pt at <= 50%)'
    )
  for policy in ('learned', 'confidence'):
    gap = curve_gap(m.get(f'steppingnet_{policy}'), m.get(f'cascade_{policy}'))
    if gap is not None:
      grid, gap = gap
      lines.append(
        f'- SteppingNet vs cascade ({policy}) over {grid[0]:,.0f}..{grid[-1]:,.0f} MACs: min gap '
        f'{100 * gap.min():+.2f} pt: {"met" if gap.min() >= 0 else "NOT met"} (target: >= 0 everywhere)'
      )
  for family in ('steppingnet', 'awn', 'cascade'):
    gap = curve_gap(m.get(f'{family}_learned_joint'), m.get(f'{family}_learned'))
    if gap is not None:
      grid, gap = gap
      lines.append(
        f'- {family}: joint training moves the learned curve by {100 * gap.mean():+.2f} pt on average '
        f'(from {100 * gap.min():+.2f} to {100 * gap.max():+.2f}) over {grid[0]:,.0f}..{grid[-1]:,.0f} MACs'
      )
    gap = curve_gap(m.get(f'{family}_learned'), m.get(f'{family}_confidence'))
    if gap is not None:
      share = float((gap[1] >= 0).mean())
      lines.append(
        f'- {family}: learned >= confidence at {share:.0%} of the shared MAC range (mean gap '
        f'{100 * gap[1].mean():+.2f} pt): {"met" if share > 0.5 else "NOT met"} (target: most of it)'
      )
  return lines


def markdown(out: dict) -> str:
  """The study as Markdown: every policy point per family, the static levels, the targets."""
  lines = [
    f'# Anytime inference on {out["dataset"]}',
    '',
    f'Top exit of SteppingNet: {100 * out["top_accuracy"]:.2f}% at {out["top_macs"]:,} MACs. '
    + validation_sentence(out['validation']),
    '',
    '| method | knob | avg MACs | % of top | accuracy (%) | exits per level |',
    '|---|---:|---:|---:|---:|---|',
  ]
  for name, res in out['methods'].items():
    for p in res['points']:
      lines.append(
        f'| {name} | {p["knob"]:g} | {p["avg_macs"]:,.0f} | {p["avg_macs"] / out["top_macs"]:.1%} | '
        f'{100 * p["accuracy"]:.2f} | {" ".join(f"{f:.2f}" for f in p["exit_fraction"])} |'
      )
  lines += ['', '| static levels | level | MACs to reach | accuracy (%) |', '|---|---:|---:|---:|']
  for family, rows in out['static'].items():
    lines += [f'| {family} | {r["level"]} | {r["macs_to_reach"]:,} | {100 * r["accuracy"]:.2f} |' for r in rows]
  return '\n'.join(lines + ['', '## Targets', ''] + targets(out)) + '\n'


def validation_sentence(v: dict) -> str:
  """Where the policies were fitted and chosen, as a sentence of the report."""
  if v.get('fit_from', 'held') == 'train':
    held = 'training images held out of training' if v.get('split', 'train') == 'train' else 'test images'
    fitted = (
      f'Selection modules fitted on {v["fit"]:,} of the images the networks trained on; operating points '
      f'chosen on {v["choose"]:,} {held} (seed {v["seed"]})'
    )
  else:
    fitted = ''
  if v.get('split', 'train') == 'train':
    return (fitted + '.') if fitted else f'Validation split: {v["examples"]} training images (seed {v["seed"]}).'
  reported = f'every accuracy here, the static levels included, is on the other {v["reported"]} test images.'
  if fitted:
    return f'{fitted}; {reported}'
  return f'Policies fitted and chosen on {v["examples"]} test images (seed {v["seed"]}); {reported}'


def plot(path: str, out: dict) -> None:
  """Accuracy against average MACs per input: every policy curve, static levels as points."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.6))
  for name, res in out['methods'].items():
    pts = sorted(res['points'], key=lambda p: p['avg_macs'])
    ax.plot([p['avg_macs'] / 1e6 for p in pts], [100 * p['accuracy'] for p in pts], marker='.', label=name)
  for family, rows in out['static'].items():
    ax.scatter(
      [r['macs_to_reach'] / 1e6 for r in rows],
      [100 * r['accuracy'] for r in rows],
      marker='x',
      label=f'{family} levels (no policy)',
    )
  ax.set_xlabel('average MACs spent per input (millions)')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(f'Anytime inference on {out["dataset"]}')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def adaptive(cc: ml_collections.ConfigDict | Mapping[str, Any], workdir: str, quick: bool = False) -> dict:
  """Runs the study of config ``cc`` in ``workdir``; returns the adaptive.json dict."""
  study = resolve(cc, quick)  # validated before anything trains
  study = dataclasses.replace(study, methods=tuple(FAMILIES[f] for f in study.families))
  common = study.common
  full = datasets.load_for(common.data)
  dataset = datasets.subset(full, common.data.train_subset, common.data.test_subset, common.seed)
  data = policy_data(study, dataset)
  fit, choose, test = data.fit, data.choose, data.test
  networks = study.networks or workdir
  if study.networks:  # read there, never trained there
    missing = [m for m in study.methods if not os.path.exists(os.path.join(networks, m, 'result.json'))]
    if missing:
      raise ValueError(
        f'networks={networks} has no finished run of {missing}: run the comparison there first '
        "(the study reads its networks and does not train into another study's directory)"
      )
  # Trains or reuses every network; a comparison's workdir keeps its own compare.json.
  results = compare.compare_resolved(study, networks, latency_repeats=2, write_report=not study.networks)
  strategy = anytime.default_strategy()
  out = {
    'dataset': dataset.name,
    'strategy': strategy,
    'validation': {
      'split': data.split,
      'fit_from': data.fit_from,
      **({'fit_key': data.fit_key()} if data.fit_from != 'held' else {}),  # which training images
      'examples': int(len(data.held)),
      'fit': int(len(fit[1])),
      'choose': int(len(choose[1])),
      'reported': int(len(test[1])),
      'seed': common.seed,
      'indices_file': 'validation_indices.npy',
    },
    'networks': os.path.abspath(networks),
    'methods': {},
    'static': {},
  }
  os.makedirs(workdir, exist_ok=True)
  np.save(os.path.join(workdir, 'validation_indices.npy'), data.held)
  for family_name in study.families:
    rows = results['methods'][FAMILIES[family_name]]['levels']
    family = load_family(family_name, os.path.join(networks, FAMILIES[family_name]), rows)
    variables = nnx.state(family.module)
    predict, levels = family.predict_fn(strategy), family.program.num_levels
    if data.split == 'test':  # the levels' accuracy on the test images reported on, not the whole test set
      family = dataclasses.replace(family, static=static_levels(predict, variables, family.static, test))
    out['static'][family_name] = family.static
    for policy in getattr(study.heuristics, family_name):
      make, knobs = functools.partial(policies.heuristic, policy), getattr(study.knobs, policy)
      out['methods'][f'{family_name}_{policy}'] = {
        'policy': policy,
        'points': sweeps.sweep(predict, variables, levels, make, knobs, *test),
        'validation_points': sweeps.sweep(predict, variables, levels, make, knobs, *choose),
      }
    for joint in (False, True) if family_name in study.joint_families else (False,):
      suffix = '_joint' if joint else ''
      kept = os.path.join(workdir, f'selection_points_{family_name}{suffix}.json')
      test_pts, val_pts = learned_points(
        family,
        common,
        study.lambdas,
        fit,
        choose,
        test,
        dataset.num_classes,
        strategy,
        joint,
        kept,
        data.split,
        data.fit_key(),
      )
      out['methods'][f'{family_name}_learned{suffix}'] = {
        'policy': f'learned{suffix}',
        'points': test_pts,
        'validation_points': val_pts,
      }
    if family_name == 'steppingnet':
      out['top_accuracy'], out['top_macs'] = family.static[-1]['accuracy'], family.static[-1]['macs_to_reach']
      val_top = sweeps.evaluate_policy(predict, variables, policies.Confidence(2.0), *choose, levels)
      frozen = out['methods']['steppingnet_learned']
      out['operating_point'] = operating_point(
        frozen['validation_points'], frozen['points'], val_top['accuracy'], study.tolerance
      )
  reports.write_study(workdir, 'adaptive', out, markdown(out), functools.partial(plot, out=out))
  return out


# At batch 1 the program is timed on this many test inputs (each stops where the policy
# says, so the average needs many), each input's time the median of ``CALLS_PER_INPUT``
# calls (one call of a few milliseconds is at the mercy of the scheduler).
BATCH1_INPUTS = 200
CALLS_PER_INPUT = 5


def time_program(net: stepnet_jax.Stepper, policy, images: np.ndarray, batch: int, repeats: int = 20) -> dict:
  """Wall time of the compiled anytime program under ``policy`` (each strategy) against the
  faster direct top-level forward, at ``batch``.

  The program and the forwards take turns input by input, so a slow spell of the machine
  (the batch-1 forward's median drifted between 3.6 and 5.4 ms within minutes here) hits
  them alike; each function is timed warm (a call first, then consecutive calls, as a
  device serving one model runs). Batch 1: on each of ``BATCH1_INPUTS`` test inputs every
  function in turn is called ``CALLS_PER_INPUT`` times; its time is the mean over inputs
  of each input's median. Batch 256: each function's median of ``repeats`` calls on one batch.
  """
  top = net.num_levels - 1
  if batch == 1:
    xs, calls = [jnp.asarray(images[i : i + 1]) for i in range(min(BATCH1_INPUTS, len(images)))], CALLS_PER_INPUT
  else:
    xs, calls = [jnp.asarray(images[:batch])], repeats
  # The direct forwards (masked full width, level blocks): the faster one is the reference.
  fns = {
    'forward': lambda x: net.functions.forward(net.variables, x, top),
    'forward_blocked': lambda x: net.functions.forward_blocked(net.variables, x, top),
  }
  for strategy in anytime.STRATEGIES:
    fns[strategy] = functools.partial(anytime.make_predict(net.program, strategy), net.variables, policy=policy)
  seconds = {name: [] for name in fns}
  for x in xs:
    for name, fn in fns.items():  # the warm-up call compiles, and warms code and weights
      seconds[name].append(timing.median_seconds(fn, x, repeats=calls, warmup=1))
  mean_ms = {name: 1e3 * float(np.mean(s)) for name, s in seconds.items()}
  macs = np.concatenate([np.asarray(fns[anytime.STRATEGIES[0]](x).macs) for x in xs])
  out = {
    'batch': int(xs[0].shape[0]),
    'inputs': len(macs),
    'avg_macs_fraction': float(macs.mean() / net.macs_to_reach[-1]),
    'direct_top_ms': min(mean_ms['forward'], mean_ms['forward_blocked']),
  }
  for strategy in anytime.STRATEGIES:
    out[f'{strategy}_ms'] = mean_ms[strategy]
    out[f'{strategy}_ratio'] = out[f'{strategy}_ms'] / out['direct_top_ms']
  return out


TIMING_SELECTOR = 'timing_selector.npz'


def _save_timing_selector(workdir: str, lam: float, cfg: Config, policy: policies.Learned, data: str) -> None:
  """Keeps the operating point's selection module, so that a later ``--timing`` (another
  run to see the spread, or another allocator) reuses it instead of retraining it (about
  10 minutes at width 4 here). The study's learned rows keep the network frozen, so the
  module is all there is to keep."""
  np.savez(
    os.path.join(workdir, TIMING_SELECTOR),
    cost_weight=lam,
    seed=cfg.seed,
    history=policy.history,
    num_levels=policy.num_levels,
    threshold=np.asarray(policy.threshold),
    data=np.asarray(data),  # PolicyData.digest: the images it was fitted on and the network
    **{k: np.asarray(v) for k, v in policy.params.items()},
  )


def _load_timing_selector(workdir: str, lam: float, cfg: Config, num_levels: int, data: str) -> policies.Learned | None:
  """The module ``_save_timing_selector`` kept for this lambda, these settings, this
  network and these fitting images (``data``: their digest), or None."""
  path = os.path.join(workdir, TIMING_SELECTOR)
  if not os.path.exists(path):
    return None
  meta = ('cost_weight', 'seed', 'history', 'num_levels', 'threshold', 'data')
  with np.load(path) as saved:
    if (
      'data' not in saved.files
      or str(saved['data']) != data
      or float(saved['cost_weight']) != lam
      or int(saved['seed']) != cfg.seed
      or bool(saved['history']) != cfg.selection.history
      or int(saved['num_levels']) != num_levels
      or saved['w1'].shape[1] != cfg.selection.hidden
    ):
      return None
    params = {k: jnp.asarray(saved[k]) for k in saved.files if k not in meta}
    threshold = float(saved['threshold'])
  logging.info('%s: reusing the selection module trained for lambda %g', path, lam)
  return policies.Learned(params, num_levels, cfg.selection.history, threshold)


def timing_study(
  cc: ml_collections.ConfigDict | Mapping[str, Any], workdir: str, quick: bool = False, repeats: int = 20
) -> dict:
  """Times SteppingNet's program at the learned policy's 50%-MAC point of a finished study in
  ``workdir`` (the lambda whose validation MACs are closest to half the top level's; its
  selection module retrained, deterministically, and kept in DIR/timing_selector.npz for
  the next ``--timing``) and at the confidence threshold with the closest validation MACs,
  at batch 1 and 256; writes DIR/timing.json. The allocator moves the numbers (README,
  "time following MACs"): time with the one a deployment uses."""
  study_cfg = resolve(cc, quick)
  common = study_cfg.common
  with open(os.path.join(workdir, 'adaptive.json')) as f:
    study = json.load(f)
  half = 0.5 * study['top_macs']
  learned_point = min(
    study['methods']['steppingnet_learned']['validation_points'], key=lambda p: abs(p['avg_macs'] - half)
  )
  dataset = datasets.subset(
    datasets.load_for(common.data),
    common.data.train_subset,
    common.data.test_subset,
    common.seed,
  )
  data = policy_data(study_cfg, dataset)
  saved = study['validation']
  if 'fit_key' in saved:  # the very training images the modules were fitted on
    same_fit = saved['fit_key'] == data.fit_key()
  else:  # a 'held' study (its halves follow from the held-out images) or one written before fit_key
    same_fit = (saved.get('fit_from', 'held'), saved['fit']) == (data.fit_from, len(data.fit[1]))
  if not np.array_equal(np.load(os.path.join(workdir, 'validation_indices.npy')), data.held) or not same_fit:
    raise ValueError(
      f'the config holds out or fits on other images than the study in {workdir} did (policy_split, '
      'validation_examples, policy_examples, policy_fit, policy_fit_examples, seed): time it with the '
      'config it ran with'
    )
  networks = study.get('networks', workdir)
  net = stepnet_jax.load(os.path.join(networks, 'steppingnet'))
  lam = learned_point['knob']
  digest = data.digest(networks)
  learned = _load_timing_selector(workdir, lam, common, net.num_levels, digest)
  if learned is None:
    learned, _ = selection.train_selector(
      common,
      nnx.merge(net.graphdef, net.variables),
      net.macs_to_reach,
      *data.fit,
      dataset.num_classes,
      cost_weight=lam,
    )
    _save_timing_selector(workdir, lam, common, learned, digest)
  # The confidence threshold whose validation MACs are closest to the learned point's (chosen on validation).
  target = learned_point['avg_macs']
  conf = min(study['methods']['steppingnet_confidence']['validation_points'], key=lambda p: abs(p['avg_macs'] - target))
  out = {'lambda': lam, 'confidence': conf['knob'], 'backend': jax.default_backend(), 'results': []}
  for name, policy in (('learned', learned), ('confidence', policies.Confidence(conf['knob']))):
    for batch in (1, 256):
      out['results'].append({'policy': name, **time_program(net, policy, data.test[0], batch, repeats)})
  with open(os.path.join(workdir, 'timing.json'), 'w') as f:
    json.dump(out, f, indent=2)
  for r in out['results']:
    print(
      f'{r["policy"]:>10} batch {r["batch"]:>3}: {r["avg_macs_fraction"]:.1%} of the top MACs; direct top forward '
      f'{r["direct_top_ms"]:.3f} ms, masked {r["masked_ms"]:.3f} ms ({r["masked_ratio"]:.2f}x), compact '
      f'{r["compact_ms"]:.3f} ms ({r["compact_ratio"]:.2f}x)'
    )
  return out


def _define_flags() -> None:
  flags.DEFINE_bool('timing', False, 'Only time the compiled program at the operating point of a finished study.')


def command() -> None:
  """``python -m stepnet_jax.adaptive --config FILE --workdir DIR [--quick] [--timing]``."""
  cli.run_study(
    'Anytime study',
    lambda f: (timing_study if f.timing else adaptive)(f.config, f.workdir, quick=f.quick),
    extra_flags=_define_flags,
    run_roots=compare.RUN_ROOTS,
  )


if __name__ == '__main__':
  command()
