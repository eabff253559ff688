"""Precision study: class-based per-neuron bits against uniform, magnitude and random bits.

    python -m stepnet_jax.precision --config configs/precision_fashion_mnist.py --workdir DIR [--quick]

Trains (or reuses) the float network of ``common`` in ``DIR/float`` without a held-out
validation split of the training images; calibrates the activation clips; then, for
every average weight-bit budget and every method, searches per-neuron bits on the
validation split (``bitsearch``: one search, the methods differ only in their score;
``uniform`` is every neuron at the budget; with ``precision.search_finetune_epochs`` each
candidate is ranked after a short fine-tune), fine-tunes the quantized network for
``precision.finetune_epochs`` with straight-through estimators (the config's objective,
all exits) and reports test accuracy. Each fine-tuned network is saved in
``DIR/METHOD_BBITS`` with its bits in the checkpoint (``evaluate.py --workdir`` shows
them). Then ProgressiveNN (``progressive_study``, skipped when
``precision.progressive_planes`` is 0): one bitwise-binary network trained at N planes
(saved in ``DIR/progressive``, its BN statistics per plane count in
``bn_stats_per_planes.npz``), accuracy of bit-serial inference for b = 1..N planes with
and without BN retraining, and level x precision staircases (combined, chosen on the
validation split; levels only; bits only) of accuracy against cumulative bit-ops.
Writes ``DIR/precision.json``, ``.md`` (targets) and ``.png``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from stepnet_jax import cli, seeds
from stepnet_jax import config as config_lib
from stepnet_jax.core import stepping
from stepnet_jax.data import datasets, feed
from stepnet_jax.inference import evaluation, restore
from stepnet_jax.methods import bitsearch, progressive, staircase
from stepnet_jax.models import quantized
from stepnet_jax.studies import reports
from stepnet_jax.training import checkpoints, fit, loop, losses, optim, run

BIT_ASSIGNMENTS = ('class_based', 'uniform', 'magnitude', 'random')
SCORE_OF = {'class_based': 'class', 'magnitude': 'magnitude', 'random': 'random'}


@dataclasses.dataclass(frozen=True)
class PrecisionSection:
  """``precision``: the bit search, the quantization-aware fine-tunes and ProgressiveNN."""

  budgets: tuple[float, ...] = (2.0, 3.0, 4.0)  # MAC-weighted mean weight bits of the hidden neurons (whole)
  min_bits: int = 1  # each hidden neuron's bits are in [min_bits, max_bits]
  max_bits: int = 8
  head_bits: int = 8  # the classifier is not searched (0.1% of the MACs)
  act_bits: int = 8  # hidden activations, unsigned, clips calibrated on training images
  slopes: tuple[float, ...] = (
    1.0,
    2.0,
    4.0,
    8.0,
  )  # bits = clip(round(offset + slope * score)), offset fit to the budget
  calibration_images: int = 1000  # training images the activation clips are calibrated on
  importance_examples: int = 2000  # training images the neurons' scores are computed on
  finetune_epochs: float = 1.0  # the quantization-aware fine-tune of every assignment
  finetune_learning_rate: float = 2e-4
  finetune_seeds: tuple[int, ...] = (0,)  # each assignment fine-tuned with these seed offsets; accuracy = mean
  search_finetune_epochs: float = 0.0  # each searched candidate ranked after this short fine-tune (0: without)
  search_rank_by: str = 'loss'  # candidates ranked by the top exit's validation 'loss' or 'accuracy'
  # ProgressiveNN: N bitwise-binary planes from one quantization-aware run, BN statistics
  # re-estimated per plane count; 0 planes skips it (and the staircases)
  progressive_planes: int = 0
  progressive_epochs: float = 1.0
  progressive_learning_rate: float = 2e-4
  progressive_bn_batches: int = 50  # training batches that re-estimate BN's statistics per plane count
  progressive_bn_affine_steps: int = 100  # BN scale and bias trained per plane count (Adam, all else frozen); 0: not
  progressive_bn_affine_learning_rate: float = 1e-3
  # Minimum bits (``bitsearch.minimum_bits``): the fewest bits per method whose top-exit
  # validation accuracy, without a fine-tune, is within ``min_bits_tolerance`` of the float
  # network's; budgets bisected on a grid of ``min_bits_step``; a negative tolerance skips it
  min_bits_tolerance: float = 0.005
  min_bits_step: float = 0.25
  min_bits_finetune: bool = True  # also report the found bits' test accuracy after the fine-tune (one seed)


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
  """A precision study config (``configs/precision_fashion_mnist.py``), validated by ``resolve``.
  ``common.data.validation_examples`` must hold images out: the bits are searched there."""

  common: config_lib.Config = dataclasses.field(default_factory=config_lib.Config)  # the float network's run
  precision: PrecisionSection = dataclasses.field(default_factory=PrecisionSection)

  def __post_init__(self):
    p = self.precision
    if not self.common.data.validation_examples:
      raise ValueError('set common.data.validation_examples: bits are searched on a split the network never saw')
    config_lib.check_ranges(
      {f'precision.{k}': v for k, v in dataclasses.asdict(p).items()},
      {
        'precision.min_bits': 1,
        'precision.max_bits': p.min_bits,
        'precision.head_bits': 1,
        'precision.act_bits': 1,
        'precision.calibration_images': 1,
        'precision.importance_examples': 1,
        'precision.search_finetune_epochs': 0,
        'precision.progressive_planes': 0,
        'precision.progressive_bn_batches': 1,
        'precision.progressive_bn_affine_steps': 0,
      },
      (
        'precision.finetune_epochs',
        'precision.finetune_learning_rate',
        'precision.progressive_epochs',
        'precision.progressive_learning_rate',
        'precision.progressive_bn_affine_learning_rate',
        'precision.min_bits_step',
      ),
    )
    if not p.budgets or any(float(b) != int(b) or not p.min_bits <= b <= p.max_bits for b in p.budgets):
      raise ValueError(
        f'precision.budgets must be whole bit counts in [{p.min_bits}, {p.max_bits}] (the uniform baseline '
        f'gives every neuron the budget), got {p.budgets}'
      )
    if not p.slopes:
      raise ValueError('precision.slopes: give at least one slope for the bit search')
    if not p.finetune_seeds or len(set(p.finetune_seeds)) != len(p.finetune_seeds):
      raise ValueError(f'precision.finetune_seeds must be distinct seed offsets, got {p.finetune_seeds}')
    if p.search_rank_by not in bitsearch.RANK_BY:
      raise ValueError(f'precision.search_rank_by must be one of {sorted(bitsearch.RANK_BY)}, got {p.search_rank_by!r}')


def resolve(cc: ml_collections.ConfigDict | Mapping[str, Any], quick: bool = False) -> PrecisionConfig:
  """The precision study config file ``cc`` as run (with ``quick``, its ``quick`` section
  merged in), validated into a ``PrecisionConfig`` (``config.study_config``)."""
  return config_lib.study_config(PrecisionConfig, cc, quick)


class Evaluator:
  """Test / validation accuracy of every exit of a (quantized) model, compiled once per structure."""

  def __init__(self, batch_size: int):
    self.batch_size = batch_size

  def __call__(self, model, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return self.metrics(model, images, labels)['accuracy']

  def metrics(self, model, images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy and cross-entropy of every exit: {'accuracy': [K], 'loss': [K]}."""
    graphdef, variables = nnx.split(model)
    return evaluation.exit_metrics(stepping.jitted_exits(graphdef), variables, images, labels, self.batch_size)


def finetune(
  cfg: config_lib.Config,
  model,
  precision: quantized.Precision,
  dataset: datasets.Dataset,
  epochs: float,
  learning_rate: float,
  steps_per_epoch: int,
  desc: str,
  seed_offset: int = 0,
):
  """Quantization-aware fine-tune of a copy of ``model`` (float weights kept by the optimizer).

  ``epochs`` (may be fractional) of ``steps_per_epoch`` steps; the config's optimizer at
  ``learning_rate``, its schedule spanning the fine-tune. ``seed_offset`` shifts the seed
  of the batch order and augmentation (0: the config's).
  """
  steps = max(1, int(round(epochs * steps_per_epoch)))
  seed = cfg.seed + seed_offset
  o = dataclasses.replace(cfg.optim, learning_rate=learning_rate)
  tx = optim.optimizer_over(o, steps, int(o.warmup_epochs * steps_per_epoch))
  batches = feed.training_batches(
    dataset.train_images, dataset.train_labels, cfg.train.batch_size, seed, 0, steps, steps_per_epoch
  )
  tuned, _ = fit.fit(
    model,
    tx,
    quantized.quantization_aware(losses.objective_for(cfg), precision),
    batches,
    steps,
    seed=seeds.seed_for(seed, seeds.Stream.QUANTIZED_FINETUNE),
    augment_images=cfg.data.augment,
    settings=loop.LoopSettings.from_config(cfg, dataset.num_classes),
    desc=desc,
  )
  return tuned


def study(cc: ml_collections.ConfigDict | Mapping[str, Any], workdir: str, quick: bool = False) -> dict:
  """Runs the precision study of config ``cc`` in ``workdir`` (``quick``: its quick settings); returns its results."""
  resolved = resolve(cc, quick)  # validated before anything trains
  p, cfg = resolved.precision, resolved.common
  full = datasets.load_for(cfg.data)
  dataset = datasets.subset(full, cfg.data.train_subset, cfg.data.test_subset, cfg.seed)
  train_split, held = datasets.split_validation(dataset, cfg.data.validation_examples, cfg.seed)
  val = (dataset.train_images[held], dataset.train_labels[held])
  test = (dataset.test_images, dataset.test_labels)
  t0 = time.time()
  float_dir = os.path.join(workdir, 'float')
  run.train_and_evaluate(cfg, float_dir, dataset=dataset)  # trains or reuses; holds out the same split
  model, meta = restore.load_variables(float_dir)
  evaluate = Evaluator(cfg.train.eval_batch_size)
  float_acc = evaluate(model, *test)
  rng = np.random.RandomState(cfg.seed)
  calib = train_split.train_images[rng.permutation(len(train_split.train_labels))[: p.calibration_images]]
  clips = quantized.calibrate_clips(model, calib)
  imp_idx = rng.permutation(len(train_split.train_labels))[: p.importance_examples]
  scores = {
    m: bitsearch.SCORES.get(SCORE_OF[m])(
      model, train_split.train_images[imp_idx], train_split.train_labels[imp_idx], dataset.num_classes, cfg.seed
    )
    for m in BIT_ASSIGNMENTS
    if m in SCORE_OF
  }
  steps_per_epoch = len(train_split.train_labels) // cfg.train.batch_size
  top = model.num_levels - 1
  # Every assignment is fine-tuned once per seed offset; the accuracy is the mean over them.
  seeds, search_epochs, search_rank_by = p.finetune_seeds, p.search_finetune_epochs, p.search_rank_by
  out = {
    'dataset': dataset.name,
    'float_accuracy': float(float_acc[top]),
    'float_accuracy_per_level': [float(a) for a in float_acc],
    'settings': {
      'act_bits': p.act_bits,
      'bit_range': [p.min_bits, p.max_bits],
      'head_bits': p.head_bits,
      'finetune_epochs': p.finetune_epochs,
      'finetune_learning_rate': p.finetune_learning_rate,
      'finetune_seeds': list(seeds),
      'search_finetune_epochs': search_epochs,
      'search_rank_by': search_rank_by,
      'validation_examples': int(len(held)),
      'clips': clips,
    },
    **{m: [] for m in BIT_ASSIGNMENTS},
  }
  float_macs = int(model.delta_macs().sum())
  hidden_macs = quantized.hidden_neuron_macs(model)
  tuned_accuracy, saved_as = {}, {}

  def tune(precision: quantized.Precision, desc: str, seed_offset: int = 0):
    """The study's quantization-aware fine-tune of the float network at ``precision``."""
    return finetune(
      cfg,
      model,
      precision,
      train_split,
      p.finetune_epochs,
      p.finetune_learning_rate,
      steps_per_epoch,
      desc=desc,
      seed_offset=seed_offset,
    )

  for budget in p.budgets:
    for method in BIT_ASSIGNMENTS:

      def validate(weight_bits):
        candidate = quantized.Precision(weight_bits, p.act_bits, clips)
        searched = model
        if search_epochs:  # rank the candidate as it will be used: fine-tuned
          searched = finetune(
            cfg,
            model,
            candidate,
            train_split,
            search_epochs,
            p.finetune_learning_rate,
            steps_per_epoch,
            desc=f'{method} {budget:g} bits, search',
          )
        return {k: v[top] for k, v in evaluate.metrics(quantized.apply(searched, candidate), *val).items()}

      if method == 'uniform':
        weight_bits = {
          **quantized.uniform_bits(model, int(budget)),
          'head': (p.head_bits,) * model.head.kernel.shape[-1],
        }
        record = {}
      else:
        weight_bits, record = bitsearch.search(
          model,
          scores[method],
          float(budget),
          validate,
          min_bits=p.min_bits,
          max_bits=p.max_bits,
          head_bits=p.head_bits,
          slopes=p.slopes,
          rank_by=search_rank_by,
        )
      precision = quantized.Precision(weight_bits, p.act_bits, clips)
      before = evaluate(quantized.apply(model, precision), *test)
      name = f'{method}_{budget:g}bits'
      key = tuple(sorted(weight_bits.items()))
      afters = []
      for offset in seeds:
        if (key, offset) not in tuned_accuracy:  # another method's search found the same bits: same run
          tuned = tune(precision, f'{method} {budget:g} bits, seed offset {offset}', offset)
          tuned_accuracy[key, offset] = evaluate(quantized.apply(tuned, precision), *test)
          if offset == seeds[0]:
            _save(os.path.join(workdir, name), tuned, meta, precision)
        elif offset == seeds[0]:
          shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
          shutil.copytree(os.path.join(workdir, saved_as[key]), os.path.join(workdir, name))
        afters.append(tuned_accuracy[key, offset])
      saved_as.setdefault(key, name)
      after = np.mean(afters, axis=0)
      ops = quantized.bitops(model, weight_bits, p.act_bits)
      entry = {
        'avg_bits': quantized.mean_bits(weight_bits, hidden_macs),
        'avg_bits_with_head': quantized.mac_weighted_bits(model, weight_bits),
        'budget': float(budget),
        'accuracy': float(after[top]),
        'accuracy_per_level': [float(a) for a in after],
        'accuracy_per_seed': [float(a[top]) for a in afters],
        'accuracy_std': float(np.std([a[top] for a in afters])),
        'accuracy_before_finetune': float(before[top]),
        'bitops': int(ops.sum()),
        'bitops_fraction_of_float32': float(ops.sum() / (float_macs * 32 * 32)),
        'search': record,
        'workdir': name,
      }
      out[method].append(entry)
      print(
        f'{method:>12} {budget:g} bits: mean {entry["avg_bits"]:.2f}, test {before[top]:.4f} -> '
        f'{after[top]:.4f} after the fine-tune (mean of {len(seeds)}; float {float_acc[top]:.4f})',
        flush=True,
      )
  if p.min_bits_tolerance >= 0:
    out['min_bits'] = minimum_bits_study(p, model, scores, clips, val, test, evaluate, tune, float(float_acc[top]))
  if p.progressive_planes:
    out.update(
      progressive_study(
        cfg,
        p,
        model,
        train_split,
        val,
        test,
        clips,
        evaluate,
        steps_per_epoch,
        meta,
        workdir,
        scores.get('class_based'),
      )
    )
  out['seconds'] = time.time() - t0
  reports.write_study(workdir, 'precision', out, markdown(out), functools.partial(plot, out=out))
  return out


def minimum_bits_study(
  p: PrecisionSection,
  model,
  scores: dict[str, dict[str, np.ndarray]],
  clips,
  val,
  test,
  evaluate: Evaluator,
  tune: Callable[[quantized.Precision, str], Any],
  float_test_accuracy: float,
) -> dict:
  """Per method, the fewest bits whose validation accuracy (top exit, no fine-tune) is within
  ``min_bits_tolerance`` of the float network's (``bitsearch.minimum_bits``): the class-based,
  magnitude and random scores under one search, and the smallest uniform width. Each found
  assignment's test accuracy, bit-ops and (``min_bits_finetune``) test accuracy after the
  study's fine-tune (``tune(precision, desc)``)."""
  top = model.num_levels - 1
  float_val = float(evaluate(model, *val)[top])
  hidden_macs = quantized.hidden_neuron_macs(model)

  def validate(weight_bits):
    quantized_model = quantized.apply(model, quantized.Precision(weight_bits, p.act_bits, clips))
    return {k: v[top] for k, v in evaluate.metrics(quantized_model, *val).items()}

  out = {
    'float_validation_accuracy': float_val,
    'float_accuracy': float_test_accuracy,
    'tolerance': p.min_bits_tolerance,
  }
  for method in BIT_ASSIGNMENTS:
    weight_bits, record = bitsearch.minimum_bits(
      model,
      scores.get(method),
      validate,
      float_val - p.min_bits_tolerance,
      min_bits=p.min_bits,
      max_bits=p.max_bits,
      head_bits=p.head_bits,
      slopes=p.slopes,
      step=p.min_bits_step,
    )
    if weight_bits is None:
      out[method] = {'found': False, 'search': record}
      print(f'minimum bits, {method}: even {p.max_bits} bits lose more than the tolerance', flush=True)
      continue
    precision = quantized.Precision(weight_bits, p.act_bits, clips)
    entry = {
      'found': True,
      'mean_bits': quantized.mean_bits(weight_bits, hidden_macs),
      'accuracy': float(evaluate(quantized.apply(model, precision), *test)[top]),
      'validation_accuracy': record['validation_accuracy'],
      'bitops': int(quantized.bitops(model, weight_bits, p.act_bits).sum()),
      'weight_bits': {k: [int(b) for b in v] for k, v in weight_bits.items()},
      'search': record,
    }
    if p.min_bits_finetune:
      tuned = tune(precision, f'{method} minimum bits')
      entry['accuracy_after_finetune'] = float(evaluate(quantized.apply(tuned, precision), *test)[top])
    out[method] = entry
    print(
      f'minimum bits, {method}: mean {entry["mean_bits"]:.2f} (validation {entry["validation_accuracy"]:.4f}, '
      f'float {float_val:.4f}), test {entry["accuracy"]:.4f}',
      flush=True,
    )
  return out


def progressive_study(
  cfg: config_lib.Config,
  p: PrecisionSection,
  model,
  train_split: datasets.Dataset,
  val,
  test,
  clips,
  evaluate: Evaluator,
  steps_per_epoch: int,
  meta: dict,
  workdir: str,
  class_score: dict[str, np.ndarray] | None = None,
) -> dict:
  """ProgressiveNN on the float network, then level x precision staircases (``progressive``).

  One BWB training run (a quantization-aware fine-tune of the float network at N planes);
  for every plane count b the BN statistics are re-estimated (``progressive_bn_batches``
  training batches); accuracy of every (level, b) state on validation (to choose the
  combined staircase) and test (reported), the top exit also through bit-serial inference.
  With ``class_score`` the same BWB weights also step on a class-based plane ladder
  (``class_ladder_study``): the staircases ``combined_class`` and ``bits_only_class``.
  """
  n, top = p.progressive_planes, model.num_levels - 1
  tuned = finetune(
    cfg,
    model,
    progressive.precision_at(model, n, n, p.act_bits, clips),
    train_split,
    p.progressive_epochs,
    p.progressive_learning_rate,
    steps_per_epoch,
    desc=f'BWB {n} planes',
  )
  affine_steps, affine_learning_rate = p.progressive_bn_affine_steps, p.progressive_bn_affine_learning_rate
  at_planes = [progressive.precision_at(tuned, b, n, p.act_bits, clips) for b in range(1, n + 1)]
  plain = [quantized.apply(tuned, precision) for precision in at_planes]

  def retrain(precision: quantized.Precision):  # the BWB weights at ``precision``, BN retrained for it
    return progressive.retrain_bn_at(
      tuned, precision, train_split, cfg, p.progressive_bn_batches, affine_steps, affine_learning_rate
    )

  retrained = [retrain(precision) for precision in at_planes]
  first_kernel = tuned.units[0].kernel[...]
  serial = progressive.bit_serial_accuracy(first_kernel, retrained, *test, n, cfg.train.eval_batch_size)
  serial_plain = progressive.bit_serial_accuracy(first_kernel, plain, *test, n, cfg.train.eval_batch_size)
  val_grid = np.stack([evaluate(q, *val) for q in retrained], axis=1)  # [K, N]
  test_grid = np.stack([evaluate(q, *test) for q in retrained], axis=1)
  costs = staircase.PlaneCosts.of(tuned, n, p.act_bits)
  bits_only = staircase.walk(staircase.staircase_path('bits_only', None, costs), costs, test_grid)
  rows = [
    {
      'bits': b,
      'accuracy': float(serial[b - 1, top]),
      'accuracy_no_bn_retrain': float(serial_plain[b - 1, top]),
      'accuracy_direct': float(test_grid[top, b - 1]),
      'compute_fraction': b / n,
      'bitops_cumulative': bits_only[b - 1]['bitops'],
      'bitops_direct': costs.direct(top, b),
      'bitops_cumulative_fraction': bits_only[b - 1]['bitops'] / costs.direct(top, n),
    }
    for b in range(1, n + 1)
  ]
  optimal, optimal_record = staircase.optimal_path(val_grid, costs)  # searched once: its path and its record
  stairs = {
    kind: staircase.walk(
      optimal if kind == 'optimal' else staircase.staircase_path(kind, val_grid, costs), costs, test_grid, val_grid
    )
    for kind in staircase.KINDS
  }
  extra = {}
  if class_score is not None:
    extra = class_ladder_study(cfg, p, tuned, val, test, clips, evaluate, class_score, retrain)
    stairs.update(extra.pop('staircase'))
  # Per plane count: BN statistics, and BN's scale and bias when they were retrained too.
  bn_of = nnx.All(nnx.Param, nnx.PathContains('bn')) if affine_steps else nnx.Nothing()
  bn_stats = {b: nnx.to_pure_dict(nnx.state(q, nnx.Any(nnx.BatchStat, bn_of))) for b, q in enumerate(retrained, 1)}
  _save(os.path.join(workdir, 'progressive'), tuned, meta, progressive.precision_at(tuned, n, n, p.act_bits, clips))
  np.savez(
    os.path.join(workdir, 'progressive', 'bn_stats_per_planes.npz'),
    **{
      f'planes{b}/{key}': np.asarray(v)
      for b, stats in bn_stats.items()
      for key, v in config_lib.flatten(stats, sep='/').items()
    },
  )
  for r in rows:
    print(
      f'progressive {r["bits"]} planes: test {r["accuracy"]:.4f} with BN retraining, '
      f'{r["accuracy_no_bn_retrain"]:.4f} without; {100 * r["bitops_cumulative_fraction"]:.1f}% of an '
      f'{n}-plane forward spent so far',
      flush=True,
    )
  return {
    'progressive': rows,
    'staircase': stairs,
    **extra,
    'optimal_staircase': optimal_record,
    'grid': {'validation': val_grid.tolist(), 'test': test_grid.tolist()},
    'progressive_settings': {
      'planes': n,
      'epochs': p.progressive_epochs,
      'learning_rate': p.progressive_learning_rate,
      'bn_batches': p.progressive_bn_batches,
      'bn_affine_steps': affine_steps,
      'workdir': 'progressive',
    },
  }


def class_ladder_study(
  cfg: config_lib.Config,
  p: PrecisionSection,
  tuned,
  val,
  test,
  clips,
  evaluate: Evaluator,
  class_score: dict[str, np.ndarray],
  retrain,
) -> dict:
  """The BWB network ``tuned`` stepped on class-based plane ladders (``progressive.class_ladder``).

  For each slope of ``precision.slopes`` a ladder, its BN retrained per rung (``retrain``,
  as for the uniform ladder) and its (level, rung) grid on validation; the slope with the
  best mean validation accuracy over the grid is kept. Reports that ladder's rungs (mean planes, top-exit test
  accuracy through bit-serial inference) and its staircases: ``combined_class`` (chosen on
  validation like ``combined``) and ``bits_only_class`` (the top level, rung by rung).
  """
  n = p.progressive_planes
  top = tuned.num_levels - 1
  hidden = quantized.hidden_neuron_macs(tuned)
  best = None
  for slope in p.slopes:
    ladder = progressive.class_ladder(tuned, class_score, n, float(slope))
    nets = [retrain(quantized.Precision(rung, p.act_bits, clips, bwb_bits=n)) for rung in ladder]
    grid = np.stack([evaluate(q, *val) for q in nets], axis=1)  # [K, N]
    print(f'class ladder slope {slope:g}: mean validation accuracy over (level, rung) {grid.mean():.4f}', flush=True)
    if best is None or grid.mean() > best[0]:
      best = (float(grid.mean()), float(slope), ladder, nets, grid)
  _, slope, ladder, nets, val_grid = best
  test_grid = np.stack([evaluate(q, *test) for q in nets], axis=1)
  first_name = tuned.unit_names[0]
  serial = progressive.bit_serial_accuracy(
    tuned.units[0].kernel[...],
    nets,
    *test,
    n,
    cfg.train.eval_batch_size,
    first_planes=[rung[first_name] for rung in ladder],
  )
  costs = staircase.PlaneCosts.of(tuned, n, p.act_bits, ladder)
  rungs = [
    {
      'rung': b,
      'mean_planes': quantized.mean_bits(rung, hidden),
      'accuracy': float(serial[b - 1, top]),
      'bitops_direct': costs.direct(top, b),
    }
    for b, rung in enumerate(ladder, start=1)
  ]
  return {
    'class_ladder': {'slope': slope, 'rungs': rungs},
    'staircase': {
      f'{kind}_class': staircase.walk(staircase.staircase_path(kind, val_grid, costs), costs, test_grid, val_grid)
      for kind in ('combined', 'bits_only')
    },
  }


def _save(path: str, model, meta: dict, precision: quantized.Precision) -> None:
  """The fine-tuned float weights with the bits beside the level assignment (a previous
  study's network in ``path`` is replaced: the checkpoint manager would keep it)."""
  shutil.rmtree(path, ignore_errors=True)
  os.makedirs(path)
  _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  m = {**meta, 'model_meta': {**meta['model_meta'], 'precision': precision.to_json()}}
  checkpoints.save_final(path, 1, 0, params, stats, m)
  checkpoints.write_description(path, m)


def targets(out: dict) -> list[str]:
  """The class-based bits' targets, met or not, as Markdown lines."""
  lines = []
  for i, entry in enumerate(out['class_based']):
    b = entry['budget']
    others = {m: out[m][i]['accuracy'] for m in BIT_ASSIGNMENTS if m != 'class_based'}
    ok = all(entry['accuracy'] >= a for a in others.values())
    chosen = [t for t in entry['search'].get('tried', []) if t['slope'] == entry['search'].get('slope')]
    kept_uniform = (
      ' (the search kept uniform bits: no shaped candidate ranked better)'
      if (chosen and chosen[0].get('uniform'))
      else ''
    )
    lines.append(
      f'- {b:g} bits: class-based {100 * entry["accuracy"]:.2f}% >= every baseline ('
      + ', '.join(f'{m} {100 * a:.2f}%' for m, a in others.items())
      + f'){kept_uniform}: {"met" if ok else "NOT met"}'
    )
    if b == 4:
      gap = out['float_accuracy'] - entry['accuracy']
      lines.append(
        f'- 4 bits: class-based within 0.5 point of float ({100 * out["float_accuracy"]:.2f}%): '
        f'float minus class-based {100 * gap:+.2f} point, {"met" if gap <= 0.005 else "NOT met"}'
      )
  if 'progressive' in out:
    lines += progressive_targets(out)
  return lines


def markdown(out: dict) -> str:
  """The study as Markdown: settings, accuracy per budget and method, the bit search, ProgressiveNN when run, the
  targets."""
  s = out['settings']
  n_seeds = len(s.get('finetune_seeds', [0]))
  seeds_note = (
    f', run {n_seeds} times (seed offsets {s["finetune_seeds"]}): accuracy after it is the mean +- std over the runs'
    if n_seeds > 1
    else ''
  )
  lines = [
    f'# Precision study ({out["dataset"]})',
    '',
    f'Float network: top exit {100 * out["float_accuracy"]:.2f}%. Weight bits per neuron in '
    f'{s["bit_range"][0]}..{s["bit_range"][1]} (head {s["head_bits"]} bits), activations {s["act_bits"]} bits; '
    f'quantization-aware fine-tune {s["finetune_epochs"]:g} epoch(s) at {s["finetune_learning_rate"]:g}'
    f'{seeds_note}; bits searched on {s["validation_examples"]} held-out training images.',
    '',
    '| method | budget | mean bits (hidden, MAC-weighted) | test accuracy before / after fine-tune | '
    'bit-ops per input | of float32 |',
    '|---|---:|---:|---:|---:|---:|',
  ]
  for m in BIT_ASSIGNMENTS:
    for e in out[m]:
      spread = f' +- {100 * e["accuracy_std"]:.2f}' if n_seeds > 1 else ''
      lines.append(
        f'| {m} | {e["budget"]:g} | {e["avg_bits"]:.2f} | {100 * e["accuracy_before_finetune"]:.2f} / '
        f'{100 * e["accuracy"]:.2f}{spread} | {e["bitops"]:,} | '
        f'{100 * e["bitops_fraction_of_float32"]:.2f}% |'
      )
  lines += [''] + search_markdown(out)
  if 'min_bits' in out:
    lines += [''] + min_bits_markdown(out['min_bits'])
  if 'progressive' in out:
    lines += [''] + progressive_markdown(out)
  lines += ['', '## Targets', ''] + targets(out)
  return '\n'.join(lines) + '\n'


def min_bits_markdown(m: dict) -> list[str]:
  """The minimum-bits search: per method the fewest bits that keep the validation accuracy."""
  lines = [
    '## Minimum bits',
    '',
    f'The fewest weight bits whose top-exit validation accuracy, without a fine-tune, is within '
    f"{100 * m['tolerance']:.2f} point of the float network's ({100 * m['float_validation_accuracy']:.2f}%; test "
    f'{100 * m["float_accuracy"]:.2f}%): searched methods bisect the mean-bit budget, uniform tries whole widths.',
    '',
    '| method | mean bits (hidden, MAC-weighted) | validation accuracy | test accuracy | after fine-tune | bit-ops per input |',
    '|---|---:|---:|---:|---:|---:|',
  ]
  for method in BIT_ASSIGNMENTS:
    e = m.get(method)
    if e is None:
      continue
    if not e['found']:
      lines.append(f'| {method} | not found within the bit range | | | | |')
      continue
    tuned = f'{100 * e["accuracy_after_finetune"]:.2f}' if 'accuracy_after_finetune' in e else '-'
    lines.append(
      f'| {method} | {e["mean_bits"]:.2f} | {100 * e["validation_accuracy"]:.2f} | {100 * e["accuracy"]:.2f} | '
      f'{tuned} | {e["bitops"]:,} |'
    )
  return lines


def search_markdown(out: dict) -> list[str]:
  """The slope candidates of every searched assignment with their validation metrics."""
  s = out['settings']
  rank_by = s.get('search_rank_by', 'accuracy')
  tuned = f' after a {s["search_finetune_epochs"]:g}-epoch fine-tune' if s.get('search_finetune_epochs') else ''
  lines = [
    '## Bit search',
    '',
    f'Candidates per slope (bits = clip(round(offset + slope * score)), offset fit to the budget), each scored on '
    f"the {s['validation_examples']} held-out images{tuned}; ranked by the top exit's validation {rank_by}; "
    'the chosen one in bold.',
    '',
    '| method | budget | slope: validation loss / accuracy (%) |',
    '|---|---:|---|',
  ]
  for m in BIT_ASSIGNMENTS:
    for e in out[m]:
      if not e['search']:
        continue
      cells = []
      for t in e['search']['tried']:
        loss = f'{t["validation_loss"]:.4f}' if 'validation_loss' in t else '-'
        cell = (
          f'{t["slope"]:g}{" (uniform)" if t.get("uniform") else ""}: {loss} / {100 * t["validation_accuracy"]:.2f}'
        )
        cells.append(f'**{cell}**' if t['slope'] == e['search']['slope'] else cell)
      lines.append(f'| {m} | {e["budget"]:g} | {"; ".join(cells)} |')
  return lines


def progressive_markdown(out: dict) -> list[str]:
  """ProgressiveNN's part of the Markdown: accuracy and bit-ops per plane count, targets."""
  s, rows = out['progressive_settings'], out['progressive']
  lines = [
    '## ProgressiveNN: bit-serial inference',
    '',
    f'One BWB network ({s["planes"]} planes, a {s["epochs"]:g}-epoch quantization-aware run from the float '
    f'network at {s["learning_rate"]:g}); BN statistics re-estimated per plane count on {s["bn_batches"]} '
    'training batches'
    + (
      f', and BN scale and bias trained {s["bn_affine_steps"]} steps per plane count (all other weights shared)'
      if s.get('bn_affine_steps')
      else ''
    )
    + '. Accuracy through bit-serial inference (the first layer accumulates planes, later '
    'layers recompute); "spent" is the cumulative bit-ops of stepping plane by plane, against one forward '
    'at all planes.',
    '',
    '| planes b | b/N | test accuracy, BN retrained | without BN retraining | bit-ops spent | of an N-plane forward |',
    '|---:|---:|---:|---:|---:|---:|',
  ]
  for r in rows:
    lines.append(
      f'| {r["bits"]} | {100 * r["compute_fraction"]:.1f}% | {100 * r["accuracy"]:.2f} | '
      f'{100 * r["accuracy_no_bn_retrain"]:.2f} | {r["bitops_cumulative"]:,} | '
      f'{100 * r["bitops_cumulative_fraction"]:.1f}% |'
    )
  lines += [
    '',
    '## Level x precision staircases',
    '',
    'States (level, planes); the combined staircase is chosen greedily on validation (accuracy gained per '
    'bit-op), the optimal one by exact search over every monotone path on validation (its criterion below); '
    'the accuracies are test accuracies (validation in brackets).',
    '',
  ]
  for kind, steps in out['staircase'].items():
    lines.append(
      f'- **{kind}**: '
      + ' -> '.join(
        f'({e["state"][0]},{e["state"][1]}) {100 * e["accuracy"]:.2f}% '
        f'[{100 * e.get("validation_accuracy", float("nan")):.2f}] @ {e["bitops"] / 1e6:.3g}M'
        for e in steps
      )
    )
  if 'optimal_staircase' in out:
    o = out['optimal_staircase']
    lines += [
      '',
      f'The optimal staircase: of {o["paths_searched"]} monotone paths, the {o["criterion"]} '
      f'({o["horizon_bitops"] / 1e6:.4g}M bit-ops). On validation its worst shortfall below levels-only and '
      f'bits-only is {100 * o["shortfall"]:.2f} point and its area {o["area"]:.4f} (levels-only '
      f'{o["baseline_areas"]["levels_only"]:.4f}, bits-only {o["baseline_areas"]["bits_only"]:.4f}; the largest '
      f'area of any path {o["largest_area_of_any_path"]["area"]:.4f}, {100 * o["largest_area_of_any_path"]["shortfall"]:.2f} '
      'point below a baseline at worst).',
    ]
  if 'class_ladder' in out:
    c = out['class_ladder']
    lines += [
      '',
      f'The `_class` staircases step the same BWB weights on a class-based plane ladder: at rung b every '
      f'hidden neuron has its own plane count from its class importance (slope {c["slope"]:g}, chosen on '
      'validation), MAC-weighted mean at most b, head at b; rung 1 and rung N are uniform. Top exit through '
      'bit-serial inference per rung:',
      '',
      '| rung b | mean planes (hidden, MAC-weighted) | test accuracy | bit-ops of a direct forward |',
      '|---:|---:|---:|---:|',
    ]
    lines += [
      f'| {r["rung"]} | {r["mean_planes"]:.2f} | {100 * r["accuracy"]:.2f} | {r["bitops_direct"]:,} |'
      for r in c['rungs']
    ]
  return lines


def progressive_targets(out: dict) -> list[str]:
  """ProgressiveNN's targets (BN retraining at 1 plane, 4+ planes near the top), met or not."""
  rows = {r['bits']: r for r in out['progressive']}
  n = max(rows)
  one = rows[1]
  gain = one['accuracy'] - one['accuracy_no_bn_retrain']
  lines = [
    f'- b = 1 with BN retraining {100 * one["accuracy"]:.2f}% vs without {100 * one["accuracy_no_bn_retrain"]:.2f}%'
    f' ({100 * gain:+.2f} point; "clearly above" read as at least 2 points): {"met" if gain >= 0.02 else "NOT met"}'
  ]
  worst = min((r for b, r in rows.items() if b >= 4), key=lambda r: r['accuracy'], default=None)
  if worst is not None:
    gap = rows[n]['accuracy'] - worst['accuracy']
    lines.append(
      f'- b >= 4 within 1 point of b = {n} ({100 * rows[n]["accuracy"]:.2f}%): worst b = {worst["bits"]} at '
      f'{100 * worst["accuracy"]:.2f}% ({100 * gap:+.2f} point below), {"met" if gap <= 0.01 else "NOT met"}'
    )
  return lines


def plot(path: str, out: dict) -> None:
  """The study's plot: accuracy against mean weight bits, and ProgressiveNN's panels when run."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  panels = 3 if 'progressive' in out else 1
  fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
  ax = axes[0, 0]
  for m in BIT_ASSIGNMENTS:
    pts = out[m]
    ax.plot([e['avg_bits'] for e in pts], [100 * e['accuracy'] for e in pts], 'o-', label=m)
  ax.axhline(100 * out['float_accuracy'], color='k', ls='--', lw=1, label='float')
  ax.set_xlabel('mean weight bits (MAC-weighted)')
  ax.set_ylabel('test accuracy, top exit (%)')
  ax.set_title(f'Per-neuron weight bits, {out["dataset"]}')
  if panels == 3:
    rows = out['progressive']
    ax = axes[0, 1]
    ax.plot([r['bits'] for r in rows], [100 * r['accuracy'] for r in rows], 'o-', label='BN retrained')
    ax.plot(
      [r['bits'] for r in rows], [100 * r['accuracy_no_bn_retrain'] for r in rows], 's--', label='no BN retraining'
    )
    ax.set_xlabel('bit-planes used (b)')
    ax.set_ylabel('test accuracy, top exit (%)')
    ax.set_title('ProgressiveNN bit-serial inference')
    ax = axes[0, 2]
    for kind, steps in out['staircase'].items():
      ax.plot([e['bitops'] / 1e6 for e in steps], [100 * e['accuracy'] for e in steps], 'o-', label=kind)
    ax.set_xscale('log')
    ax.set_xlabel('cumulative bit-ops per input (millions)')
    ax.set_ylabel('test accuracy (%)')
    ax.set_title('Level x precision stepping')
  for ax in axes[0]:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def command() -> None:
  """``python -m stepnet_jax.precision --config FILE --workdir DIR [--quick]``."""
  cli.run_study('Precision study', lambda f: study(f.config, f.workdir, quick=f.quick))


if __name__ == '__main__':
  command()
