"""SteppingNet construction: levels by importance under cumulative MAC budgets.

The paper (Sun et al., DATE 2023) publishes the idea, not every detail; the choices
made here are:

1. Start from the base network widened by ``widen`` with every neuron at level 0
   (subnet 0 = the whole widened network) and train all exits jointly for
   ``pretrain_epochs``.
2. ``construct_rounds`` rounds, each: evaluate importance on training data
   (``importance.py``: Taylor or class-based); lower every subnet's MAC target
   geometrically from its MACs at the start of construction, M, towards its budget b
   (round r of R reaches ``M * (b / M)^(r / R)``, the last round b itself); then, for k = 0..K-1
   in order, move the least important level-k neuron (ranked across all layers) up to
   level k+1 -- or, for the top level, remove it -- and re-count subnet k's MACs with
   the mask rule after every single move, until subnet k fits its target (with
   ``rank_per_mac``, the lowest importance per MAC saved goes first); then moved
   neurons go back, last moved first, wherever subnet k still fits. Every layer
   keeps at least one level-0 neuron. Moves of level k only change subnets >= k, so
   handling levels in order never breaks a target already met. The moved neurons keep
   their trained weights (``surgery.relevel``); a connection the mask rule newly
   allows starts at 0. Then all levels are retrained jointly for ``round_epochs``.
3. The remaining epochs fine-tune the final assignment, with distillation from the
   top exit when ``finetune_distill_weight`` > 0.

``triangular=True`` (an extension, not the paper's) also keeps only Any-Width Networks'
per-channel triangle inside each level block, so a subnet holds more, sparser
neurons for its MACs; the mask rule between levels is unchanged.

One cosine (or step) learning-rate schedule spans all phases; the optimizer state is
reset when the structure changes. Budgets are fractions of the MACs of the dense,
un-widened base network (``width``); infeasible ones are rejected before training.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
from flax import nnx

from stepnet_jax import budgets as budgets_lib
from stepnet_jax import checkpoint, data, importance, models, surgery, train_lib
from stepnet_jax.config import Config
from stepnet_jax.model import SteppingModel


def assign_levels(levels: Mapping[str, np.ndarray], scores: Mapping[str, np.ndarray],
                  mac_model: budgets_lib.MacModel, targets: Sequence[float],
                  per_mac: bool = False, allocation: str = 'global') -> dict[str, np.ndarray]:
  """One greedy pass: for k = 0..K-1, push the least important level-k neurons up
  (or remove them at the top) until subnet k's MACs <= ``targets[k]``.

  Which layer gives up a neuron next:
  * ``allocation='global'``: the layer holding the lowest score (across all layers);
    with ``per_mac=True``, the lowest score per MAC saved (knapsack-style; the saving
    of moving a layer's neuron is re-counted after every move).
  * ``allocation='uniform'``: the layer whose subnet k keeps the largest fraction of
    its channels, so every layer shrinks at the same rate (the base network's
    proportions, as in AWN and slimmable nets); importance decides only which of the
    layer's neurons go (its least important).

  Then the slack the last move left is filled: the moved neurons, in the reverse order
  of their moves (within a layer, the most important first), go back to level k
  wherever subnet k still fits (with ``'uniform'``, and no layer's share grows past the
  widest other layer's), so no moved neuron can be put back without breaking the
  target (or, uniform, the equal shares).

  ``levels``: per layer, per neuron level (-1 = removed). Returns new arrays; neurons
  only move up. Raises if a target cannot be met (the budget checks prevent that).
  """
  names = mac_model.names
  new = {n: np.array(levels[n], np.int64) for n in names}
  num_levels = len(targets)
  counts = mac_model.counts_of(new, num_levels)
  for k in range(num_levels):
    macs = int(mac_model.subnet_macs(counts)[k])
    # Per layer, its level-k neurons from the least important up.
    queues = [sorted(np.nonzero(new[n] == k)[0], key=lambda i, n=n: (float(scores[n][i]), i)) for n in names]
    heads = [0] * len(names)
    moved = []
    while macs > targets[k]:
      best, best_key = None, None
      for li, n in enumerate(names):
        if heads[li] >= len(queues[li]) or (k == 0 and counts[li][0] <= 1):  # keep a level-0 neuron per layer
          continue
        i = queues[li][heads[li]]
        key = float(scores[n][i])
        if allocation == 'uniform':
          key = (-float(np.sum(counts[li][:k + 1])) / len(new[n]), key)
        elif per_mac:
          counts[li][k] -= 1
          saved = macs - int(mac_model.subnet_macs(counts)[k])
          counts[li][k] += 1
          key = key / max(saved, 1)
        if best_key is None or key < best_key:
          best, best_key = li, key
      if best is None:
        raise RuntimeError(f'cannot bring subnet {k} to {targets[k]:,.0f} MACs (left at {macs:,})')
      i = queues[best][heads[best]]
      heads[best] += 1
      moved.append((best, i))
      _move(new, counts, names[best], best, i, k, k + 1 if k + 1 < num_levels else surgery.REMOVED)
      macs = int(mac_model.subnet_macs(counts)[k])
    # Fill the slack the last move left: put moved neurons back, last moved first,
    # wherever one still fits. Afterwards no moved neuron fits back.
    # With uniform allocation a layer may not grow past the widest other layer's share.
    sizes = [len(new[n]) for n in names]
    for li, i in reversed(moved):
      back = [c.copy() for c in counts]
      back[li][k] += 1
      if k + 1 < num_levels:
        back[li][k + 1] -= 1
      share = [np.sum(c[:k + 1]) / s for c, s in zip(back, sizes)]
      if allocation == 'uniform' and len(names) > 1 and share[li] > max(share[:li] + share[li + 1:]) + 1e-12:
        continue
      if mac_model.subnet_macs(back)[k] <= targets[k]:
        _move(new, counts, names[li], li, i, int(new[names[li]][i]), k)
  return new


def _move(levels: dict[str, np.ndarray], counts: list[np.ndarray], name: str, li: int, i: int,
          old: int, level: int) -> None:
  """Moves neuron ``i`` of layer ``name`` from level ``old`` to ``level`` (REMOVED = -1), in place."""
  if old >= 0:
    counts[li][old] -= 1
  if level >= 0:
    counts[li][level] += 1
  levels[name][i] = level


def round_targets(current: np.ndarray, budgets: np.ndarray, r: int, rounds: int) -> np.ndarray:
  """Round r of R: geometric step from the starting MACs to the budgets (exact at r = R)."""
  if r >= rounds:
    return budgets.astype(np.float64)
  t = np.where(current > budgets, current * (budgets / np.maximum(current, 1)) ** (r / rounds), budgets)
  return np.maximum(np.floor(t), budgets)


@dataclasses.dataclass
class Plan:
  """Step boundaries of the construction phases (global optimizer steps)."""
  pretrain_end: int
  round_ends: tuple[int, ...]
  total: int

  @classmethod
  def of(cls, cfg: Config, steps_per_epoch: int) -> Plan:
    """The phases of ``cfg``; raises if pretraining and rounds do not fit in ``num_epochs``."""
    pre = int(round(cfg.pretrain_epochs * steps_per_epoch))
    per_round = int(round(cfg.round_epochs * steps_per_epoch))
    total = cfg.num_epochs * steps_per_epoch
    ends = tuple(pre + per_round * (r + 1) for r in range(cfg.construct_rounds))
    if (ends[-1] if ends else pre) > total:
      raise ValueError(f'pretrain_epochs {cfg.pretrain_epochs} + {cfg.construct_rounds} rounds x round_epochs '
                       f'{cfg.round_epochs} exceed num_epochs {cfg.num_epochs}')
    return cls(pre, ends, total)


def widened_start(cfg: Config, dataset: data.Dataset) -> SteppingModel:
  """The widened base network with every neuron at level 0."""
  channels = budgets_lib.layer_channels(cfg.model, input_shape=dataset.input_shape,
                                        num_classes=dataset.num_classes, width=cfg.width * cfg.widen)
  assignment = {n: budgets_lib.level_sizes_for(c, cfg.num_levels) for n, c in channels.items()}
  mean, std = dataset.channel_stats()
  return models.build_model(cfg.model, num_classes=dataset.num_classes, input_shape=dataset.input_shape,
                            num_levels=cfg.num_levels, assignment=assignment, triangular=cfg.triangular,
                            mean=mean, std=std, seed=cfg.seed)


def budget_macs(cfg: Config, dataset: data.Dataset, model: SteppingModel) -> tuple[int, np.ndarray]:
  """(dense base MACs, budgets in MACs), after checking the budgets are feasible."""
  if len(cfg.budgets) != cfg.num_levels:
    raise ValueError(f'{len(cfg.budgets)} budgets for {cfg.num_levels} levels')
  base = budgets_lib.dense_macs(cfg.model, input_shape=dataset.input_shape, num_classes=dataset.num_classes,
                                width=cfg.width)
  channels = [sum(u.conn.out_sizes) for u in model.units]
  return base, budgets_lib.check_budgets(cfg.budgets, base, budgets_lib.MacModel.of(model), channels)


def check(cfg: Config, dataset: data.Dataset) -> None:
  """Raises if ``cfg`` cannot be constructed on ``dataset`` (model kind, budgets); trains nothing."""
  model = nnx.eval_shape(lambda: widened_start(cfg, dataset))
  surgery.check_chain(model)
  budget_macs(cfg, dataset, model)


def _sample(dataset: data.Dataset, cfg: Config, rnd: int) -> tuple[np.ndarray, np.ndarray]:
  """Training examples for importance: ``importance_examples`` in all, or that many per class."""
  rng = np.random.RandomState(cfg.seed + 1000 + rnd)
  y = dataset.train_labels
  if cfg.importance == 'class':
    idx = np.concatenate([rng.permutation(np.nonzero(y == c)[0])[:cfg.importance_examples]
                          for c in range(dataset.num_classes)])
  else:
    idx = rng.permutation(len(y))[:cfg.importance_examples]
  return dataset.train_images[idx], y[idx]


def construct(cfg: Config, workdir: str, dataset: data.Dataset | None = None) -> dict:
  """Builds, trains and saves a SteppingNet in ``workdir`` (standard checkpoint format).

  Returns {'test_accuracy', 'level_macs', 'seconds', 'rounds': [...]}; the rounds'
  log is also written to ``workdir/construction.json``.
  """
  os.makedirs(workdir, exist_ok=True)
  dataset, steps_per_epoch = train_lib.prepare_data(cfg, dataset)
  done = train_lib.finished_run(workdir, cfg, 'construction.json')
  if done is not None:
    return done
  model = widened_start(cfg, dataset)
  surgery.check_chain(model)
  base, targets = budget_macs(cfg, dataset, model)   # before any training
  plan = Plan.of(cfg, steps_per_epoch)
  meta = checkpoint.model_meta(model, cfg.model, dataset.num_classes)
  writer = train_lib.MetricWriter(workdir, fresh=True)
  t0 = time.time()
  log = []

  def train(model: SteppingModel, first: int, last: int, desc: str, phase_cfg: Config = cfg) -> SteppingModel:
    return train_lib.train_phase(model, phase_cfg, dataset, first, last, steps_per_epoch, writer, desc)

  model = train(model, 0, plan.pretrain_end, 'pretrain (all neurons at level 0)')
  step = plan.pretrain_end
  start_macs = None
  for r, end in enumerate(plan.round_ends, start=1):
    mac_model = budgets_lib.MacModel.of(model)
    levels = surgery.neuron_levels(model)
    macs_now = mac_model.subnet_macs(mac_model.counts_of(levels, cfg.num_levels))
    start_macs = macs_now if start_macs is None else start_macs
    goal = round_targets(start_macs, targets, r, cfg.construct_rounds)
    x, y = _sample(dataset, cfg, r)
    scores = importance.importance(model, x, y, method=cfg.importance, weights=cfg.weights,
                                   num_classes=dataset.num_classes, class_threshold=cfg.class_threshold)
    new_levels = assign_levels(levels, scores, mac_model, goal, per_mac=cfg.rank_per_mac,
                               allocation=cfg.allocation)
    model, meta = surgery.relevel(model, meta, new_levels)
    mac_model = budgets_lib.MacModel.of(model)
    macs = mac_model.subnet_macs(mac_model.counts_of(surgery.neuron_levels(model), cfg.num_levels))
    entry = {'round': r, 'step': step, 'targets': [float(t) for t in goal], 'macs': [int(m) for m in macs],
             'assignment': models.assignment_of(model)}
    log.append(entry)
    print(f'round {r}/{cfg.construct_rounds}: subnet MACs ' + ' '.join(f'{m / 1e6:.3f}M' for m in macs)
          + ' (targets ' + ' '.join(f'{t / 1e6:.3f}M' for t in goal) + ')', flush=True)
    model = train(model, step, end, f'round {r}/{cfg.construct_rounds} retrain')
    step = end
  if step < plan.total:
    ft = dataclasses.replace(cfg, distill_weight=cfg.finetune_distill_weight or cfg.distill_weight)
    model = train(model, step, plan.total, 'fine-tune', ft)

  test_acc = train_lib.save_final(model, meta, cfg, dataset, workdir, plan.total, steps_per_epoch, writer)
  writer.close()
  seconds = time.time() - t0
  level_macs = [int(m) for m in np.cumsum(model.delta_macs().sum(0))]
  result = {'test_accuracy': [float(a) for a in test_acc], 'level_macs': level_macs,
            'budget_macs': [float(t) for t in targets], 'base_macs': base, 'seconds': seconds, 'rounds': log}
  with open(os.path.join(workdir, 'construction.json'), 'w') as f:
    json.dump(result, f, indent=2)
  print('construction done: test accuracy per level ' + ' '.join(f'{a:.4f}' for a in test_acc)
        + ', MACs ' + ' '.join(f'{m / 1e6:.3f}M' for m in level_macs) + f', {seconds:.0f} s', flush=True)
  return result
