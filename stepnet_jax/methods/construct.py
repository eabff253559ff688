"""SteppingNet construction: levels by importance under cumulative MAC budgets.

The paper (Sun et al., DATE 2023) publishes the idea, not every detail; the choices
made here are:

1. Start from the base network widened by ``widen`` with every neuron at level 0
   (subnet 0 = the whole widened network) and train all exits jointly for
   ``pretrain_epochs``.
2. ``construction.rounds`` rounds, each: evaluate importance on training data
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

The unit of a move is a neuron *group* (``core.wiring``): a chain layer's neurons, or in a
residual network a stream (the stem and every block of a stage write it, so a stream
channel moves or goes in all of them at once and the identity shortcut keeps the mask
rule) or a block's inner channels, which are levelled freely as a chain layer's are. A
stream channel's importance sums over every write of it (``importance.py``). Below,
"layer" means group.

``triangular=True`` (an extension, not the paper's) also keeps only Any-Width Networks'
per-channel triangle inside each level block, so a subnet holds more, sparser
neurons for its MACs; the mask rule between levels is unchanged.

One cosine (or step) learning-rate schedule spans all phases; the optimizer state is
reset when the structure changes. Budgets are fractions of the MACs of the dense,
un-widened base network (``model.width``); infeasible ones are rejected before training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
from flax import nnx

from stepnet_jax import seeds
from stepnet_jax.config import Config, SettingsError
from stepnet_jax.core import levels as lv
from stepnet_jax.core.model import SteppingModel
from stepnet_jax.data import datasets
from stepnet_jax.methods import importance
from stepnet_jax.models import budgets as budgets_lib
from stepnet_jax.models import structure, surgery, zoo
from stepnet_jax.training.run import PhasedRun


def assign_levels(
  levels: Mapping[str, np.ndarray],
  scores: Mapping[str, np.ndarray],
  mac_model: budgets_lib.MacModel,
  targets: Sequence[float],
  per_mac: bool = False,
  allocation: str = 'global',
) -> dict[str, np.ndarray]:
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
  * ``allocation='uniform_fill'``: as ``'uniform'``, then the slack the equal shares
    leave is filled too (below).

  Then the slack the last move left is filled: the moved neurons, in the reverse order
  of their moves (within a layer, the most important first), go back to level k
  wherever subnet k still fits (with ``'uniform'``, and no layer's share grows past the
  widest other layer's), so no moved neuron can be put back without breaking the
  target (or, uniform, the equal shares). ``'uniform_fill'`` then makes a second such
  pass without the share limit, so no moved neuron fits back at all: a neuron of a
  cheap layer can use MACs that no whole neuron of every layer would fit in.

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
        if heads[li] >= len(queues[li]) or (k == 0 and counts[li][0] <= 1):  # keep a level-0 neuron per group
          continue
        i = queues[li][heads[li]]
        key = float(scores[n][i])
        if allocation in ('uniform', 'uniform_fill'):
          key = (-float(np.sum(counts[li][: k + 1])) / len(new[n]), key)
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
    _fill_back(new, counts, moved, k, mac_model, targets[k], equal_shares=allocation != 'global')
    if allocation == 'uniform_fill':
      _fill_back(new, counts, moved, k, mac_model, targets[k], equal_shares=False)
  return new


def _fill_back(
  new: dict[str, np.ndarray],
  counts: list[np.ndarray],
  moved: Sequence[tuple[int, int]],
  k: int,
  mac_model: budgets_lib.MacModel,
  target: float,
  equal_shares: bool,
) -> None:
  """Fills the slack the last move out of level k left, in place: moved neurons (layer index,
  neuron) go back to level k, last moved first, wherever subnet k still fits ``target``.
  Afterwards no moved neuron fits back. With ``equal_shares`` a layer may not grow past
  the widest other layer's share. Neurons already back at level k are skipped."""
  names, num_levels = mac_model.names, len(counts[0])
  sizes = [len(new[n]) for n in names]
  for li, i in reversed(moved):
    if new[names[li]][i] == k:
      continue
    back = [c.copy() for c in counts]
    back[li][k] += 1
    if k + 1 < num_levels:
      back[li][k + 1] -= 1
    share = [np.sum(c[: k + 1]) / s for c, s in zip(back, sizes)]
    if equal_shares and len(names) > 1 and share[li] > max(share[:li] + share[li + 1 :]) + 1e-12:
      continue
    if mac_model.subnet_macs(back)[k] <= target:
      _move(new, counts, names[li], li, i, int(new[names[li]][i]), k)


def _move(
  levels: dict[str, np.ndarray], counts: list[np.ndarray], name: str, li: int, i: int, old: int, level: int
) -> None:
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
    """The phases of ``cfg``; raises if pretraining and rounds do not fit in ``train.num_epochs``."""
    con = cfg.construction
    pre = int(round(con.pretrain_epochs * steps_per_epoch))
    per_round = int(round(con.round_epochs * steps_per_epoch))
    total = cfg.train.num_epochs * steps_per_epoch
    ends = tuple(pre + per_round * (r + 1) for r in range(con.rounds))
    if (ends[-1] if ends else pre) > total:
      raise SettingsError(
        f'construction.pretrain_epochs {con.pretrain_epochs} + construction.rounds {con.rounds} x '
        f'construction.round_epochs {con.round_epochs} exceed train.num_epochs {cfg.train.num_epochs}'
      )
    return cls(pre, ends, total)


def level0_network(cfg: Config, dataset: datasets.Dataset, *, mask_rule: bool = True) -> SteppingModel:
  """The base network widened by ``construction.widen`` with every neuron at level 0: where
  construction (and, without the mask rule, the non-uniform baseline) starts."""
  k = cfg.model.num_levels
  channels = budgets_lib.layer_channels(
    cfg.model.name,
    input_shape=dataset.input_shape,
    num_classes=dataset.num_classes,
    width=cfg.model.width * cfg.construction.widen,
  )
  mean, std = dataset.channel_stats()
  return zoo.build_model(
    cfg.model.name,
    num_classes=dataset.num_classes,
    input_shape=dataset.input_shape,
    num_levels=k,
    assignment={n: lv.level0_sizes(c, k) for n, c in channels.items()},
    triangular=cfg.model.triangular,
    mask_rule=mask_rule,
    exit_heads=cfg.model.exit_heads,
    mean=mean,
    std=std,
    init=cfg.model.init,
    seed=cfg.seed,
  )


def budget_macs(cfg: Config, dataset: datasets.Dataset, model: SteppingModel) -> tuple[int, np.ndarray]:
  """(dense base MACs, budgets in MACs), after checking the budgets are feasible."""
  budgets = cfg.construction.budgets
  if len(budgets) != cfg.model.num_levels:
    raise SettingsError(f'{len(budgets)} budgets for {cfg.model.num_levels} levels')
  base = budgets_lib.dense_macs(
    cfg.model.name, input_shape=dataset.input_shape, num_classes=dataset.num_classes, width=cfg.model.width
  )
  channels = [sum(sizes) for _, sizes in model.assignment]  # per group, in the MacModel's order
  return base, budgets_lib.check_budgets(budgets, base, budgets_lib.MacModel.of(model), channels)


def check(cfg: Config, dataset: datasets.Dataset) -> None:
  """Raises if ``cfg`` cannot be constructed on ``dataset`` (model kind, budgets); trains nothing."""
  model = nnx.eval_shape(lambda: level0_network(cfg, dataset))
  budget_macs(cfg, dataset, model)  # raises wiring.NotWired for a unit construction cannot re-level


def _sample(dataset: datasets.Dataset, cfg: Config, rnd: int) -> tuple[np.ndarray, np.ndarray]:
  """Training examples for importance: ``importance_examples`` in all, or that many per class."""
  con = cfg.construction
  rng = np.random.RandomState(seeds.seed_for(cfg.seed, seeds.Stream.CONSTRUCTION_ROUND, rnd))
  y = dataset.train_labels
  if con.importance == 'class':
    idx = np.concatenate(
      [rng.permutation(np.nonzero(y == c)[0])[: con.importance_examples] for c in range(dataset.num_classes)]
    )
  else:
    idx = rng.permutation(len(y))[: con.importance_examples]
  return dataset.train_images[idx], y[idx]


def subnet_macs(model: SteppingModel) -> np.ndarray:
  """Cumulative MACs of every subnet, from the per-neuron levels of its groups."""
  mac_model = budgets_lib.MacModel.of(model)
  return mac_model.subnet_macs(mac_model.counts_of(surgery.neuron_levels(model), model.num_levels))


def construct(cfg: Config, workdir: str, dataset: datasets.Dataset | None = None) -> dict:
  """Builds, trains and saves a SteppingNet in ``workdir`` (standard checkpoint format).

  Returns {'test_accuracy', 'level_macs', 'seconds', 'budget_macs', 'base_macs', 'rounds': [...]};
  the same is written to ``workdir/construction.json``.
  """
  with PhasedRun.open(cfg, workdir, dataset, 'construction.json') as run:
    if run.finished is not None:
      return run.finished
    resumed = run.resume()
    if resumed is None:
      model = level0_network(cfg, run.dataset)
      base, targets = budget_macs(cfg, run.dataset, model)  # before any training
      plan = Plan.of(cfg, run.steps_per_epoch)
      meta = structure.model_meta(model, cfg.model.name, run.dataset.num_classes)
      run.begin()
      model = run.train(model, 0, plan.pretrain_end, 'pretrain (all neurons at level 0)')
      step = plan.pretrain_end
      progress = {'base_macs': int(base), 'budget_macs': [float(t) for t in targets], 'start_macs': None, 'rounds': []}
      run.save_phase(step, model, meta, progress)
    else:
      step, model, meta, progress = resumed
      plan = Plan.of(cfg, run.steps_per_epoch)
    model, meta, step = _rounds(run, model, meta, plan, step, progress)
    if step < plan.total:
      distill = cfg.construction.finetune_distill_weight or cfg.loss.distill_weight
      model = run.train(model, step, plan.total, 'fine-tune', cfg=cfg.replace(**{'loss.distill_weight': distill}))
    return run.finish(
      model,
      meta,
      'construction',
      {'budget_macs': progress['budget_macs'], 'base_macs': progress['base_macs'], 'rounds': progress['rounds']},
    )


def _rounds(
  run: PhasedRun, model: SteppingModel, meta: dict, plan: Plan, step: int, progress: dict
) -> tuple[SteppingModel, dict, int]:
  """The construction rounds not done by global ``step``: importance, re-levelling towards
  the round's targets, retraining, a phase checkpoint.

  ``progress`` (JSON, saved with every phase checkpoint) holds the budgets, the MACs the
  rounds started from and one log entry per round done; it is updated in place. Returns
  the model, its model_meta and the global step reached.
  """
  cfg, con = run.cfg, run.cfg.construction
  targets = np.asarray(progress['budget_macs'])
  for r, end in enumerate(plan.round_ends, start=1):
    if r <= len(progress['rounds']):  # done before an interruption
      continue
    if progress['start_macs'] is None:
      progress['start_macs'] = [int(m) for m in subnet_macs(model)]
    goal = round_targets(np.asarray(progress['start_macs']), targets, r, con.rounds)
    x, y = _sample(run.dataset, cfg, r)
    scores = importance.importance(
      model,
      x,
      y,
      method=con.importance,
      weights=cfg.exit_weights,
      num_classes=run.dataset.num_classes,
      class_threshold=con.class_threshold,
    )
    new_levels = assign_levels(
      surgery.neuron_levels(model),
      scores,
      budgets_lib.MacModel.of(model),
      goal,
      per_mac=con.rank_per_mac,
      allocation=con.allocation,
    )
    model, meta = surgery.relevel(model, meta, new_levels)
    macs = subnet_macs(model)
    progress['rounds'].append(
      {
        'round': r,
        'step': step,
        'targets': [float(t) for t in goal],
        'macs': [int(m) for m in macs],
        'assignment': zoo.assignment_of(model),
      }
    )
    print(
      f'round {r}/{con.rounds}: subnet MACs '
      + ' '.join(f'{m / 1e6:.3f}M' for m in macs)
      + ' (targets '
      + ' '.join(f'{t / 1e6:.3f}M' for t in goal)
      + ')',
      flush=True,
    )
    model = run.train(model, step, end, f'round {r}/{con.rounds} retrain')
    step = end
    run.save_phase(step, model, meta, progress)
  return model, meta, step
