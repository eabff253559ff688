"""Non-uniform dynamic subnets (Yang & Fan, ASP-DAC 2021): channels chosen per layer by filter norm.

Yang & Fan generate the subnets in one of two ways; both are this trainer with another
schedule (the comparison's methods ``singlepath`` and ``multipath``, ``studies/compare.py``):

* single-path: ONE training round of the background network; at the epochs
  ``baseline.generation_epochs`` (e_1 <= ... <= e_G) the next smaller subnet is carved out
  of the current weights, and training goes on with every subnet found so far.
* multi-path: one run per subnet (``model.num_levels=1`` and that subnet's budget): the
  background network is trained, pruned to the budget at e_1 and trained on. The
  comparison runs it once per budget, so every subnet costs a full training (its
  background's included) and the deployed subnets share no weights.

What the paper leaves open is chosen as follows:

1. The background network is the base network widened by ``construction.widen`` (the
   comparison widens it to the widest uniform plan under the top budget): every neuron at
   level 0, trained on its top exit until e_1.
2. A generation carves subnet s out of the neurons subnet s+1 has (the background, at
   first): each layer's channels are ranked by the L1 norm of their filters over the
   inputs subnet s+1 has, divided by the mean over the layer's channels in subnet s+1 (so
   layers compete on one scale: ``channel_norms``), and the least-norm channels of the
   whole network leave subnet s (up to level s+1, or out of the network when s is the top)
   until it fits budget s (``construct.assign_levels``' greedy fill on the dense-prefix
   MAC count). Per-layer widths come out non-uniform; subnets are nested.
3. One batch norm per subnet: a new subnet starts from the batch norm of the one it was
   carved from; the subnets found before keep theirs.
4. Between generations the subnets found so far train together: each batch goes through
   each of them once and their cross-entropies are averaged with the exit weights
   (``losses.subnets_for``, as slimmable widths train). Fresh optimizer moments after each
   generation (the structure changed); the learning rate follows the schedule at the
   global step.
5. At the end every subnet's BN statistics are re-estimated (``recalibrate``).

The default schedule (``generation_epochs=()``) spaces the G generations evenly from
``construction.pretrain_epochs`` to half of ``train.num_epochs`` (with G > 1 and
``pretrain_epochs`` below that half, the smallest subnet trains for the second half of the
run; with one generation it is at ``pretrain_epochs``); all of them at ``pretrain_epochs``
is the one-shot ranking this baseline used before. A generation at step 0 is refused. G is
K-1, plus one when the top budget is below the background network (multi-path: the top is
pruned first).

A wider subnet recomputes everything: the method is not reusable, and its reports
count ``macs_to_reach`` as the running sum of its subnets.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepnet_jax import seeds
from stepnet_jax.config import Config, SettingsError
from stepnet_jax.core import layers
from stepnet_jax.core.model import SteppingModel
from stepnet_jax.data import datasets, feed
from stepnet_jax.methods import construct
from stepnet_jax.models import budgets as budgets_lib
from stepnet_jax.models import structure, surgery, zoo
from stepnet_jax.training import losses
from stepnet_jax.training.run import PhasedRun


def channel_norms(model: SteppingModel) -> dict[str, np.ndarray]:
  """Per layer: L1 norm of each output channel's filter over the inputs at level 0, divided by
  the mean over the layer's level-0 channels (so layers compete on one scale). The level-0
  neurons are the subnet the next generation carves from; a channel already above level 0
  keeps a score but is never ranked again. On a chain (``surgery.check_chain``) a layer
  reads the layer before it, the first one the image."""
  levels = surgery.neuron_levels(model)
  out, reads = {}, None
  for name, unit in zip(model.unit_names, model.units):
    k = np.abs(np.asarray(unit.kernel[...]) * unit.conn.mask)
    if reads is not None:  # inputs [..., cin, cout]: the previous layer's channels
      k = k * (levels[reads] == 0)[:, None]
    norms = k.reshape(-1, k.shape[-1]).sum(0)
    level0 = levels[name] == 0
    mean = float(norms[level0].mean()) if level0.any() else 0.0
    out[name] = norms / mean if mean > 0 else np.zeros_like(norms)
    reads = name
  return out


def recalibrate(model: SteppingModel, dataset: datasets.Dataset, cfg: Config) -> SteppingModel:
  """Re-estimates every subnet's BN statistics: their average over ``baseline.recalibrate_batches``
  training batches in train mode (weights unchanged; the old statistics are discarded).

  A train-mode pass from zero statistics leaves ``(1 - momentum) x`` the batch's
  statistics in the running buffers, so each batch's own statistics are read off
  exactly and averaged with equal weight.
  """
  num_batches = cfg.baseline.recalibrate_batches
  if num_batches == 0:
    return model
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

  @jax.jit
  def batch_stats(images):
    zeros = jax.tree.map(jnp.zeros_like, stats)
    m = nnx.merge(graphdef, params, zeros, copy=True)
    m.exits(images, train=True)
    return jax.tree.map(lambda v: v / (1.0 - layers.BN_MOMENTUM), nnx.state(m, nnx.BatchStat))

  n, batch_size = len(dataset.train_labels), cfg.train.batch_size
  indices = feed.training_indices(
    0, num_batches, n // batch_size, n, batch_size, seeds.seed_for(cfg.seed, seeds.Stream.BN_RECALIBRATION_ORDER)
  )
  total = None
  for batch in feed.device_batches(dataset.train_images, dataset.train_labels, indices):
    s = batch_stats(batch.images)
    total = s if total is None else jax.tree.map(jnp.add, total, s)
  mean = jax.tree.map(lambda v: v / num_batches, total)
  return nnx.merge(graphdef, params, mean)


def _start(cfg: Config, dataset: datasets.Dataset) -> tuple[SteppingModel, np.ndarray, int, list[int]]:
  """(background network, budgets in MACs, dense base MACs, the subnets to carve out, largest
  first), the budgets checked.

  The background network is the base network at ``width x widen``. When it
  costs less than the top budget the top subnet is the whole network and that budget is
  lowered to its MACs; when it costs more, the top subnet is carved out of it first.
  """
  k_levels, budgets = cfg.model.num_levels, cfg.construction.budgets
  base = budgets_lib.dense_macs(
    cfg.model.name, input_shape=dataset.input_shape, num_classes=dataset.num_classes, width=cfg.model.width
  )
  model = construct.level0_network(cfg, dataset, mask_rule=False)
  surgery.check_chain(model, 'the non-uniform baseline (filter L1 norms per layer)')
  mac_model = budgets_lib.MacModel.of(model)
  level0 = [dict(model.assignment)[name] for name in mac_model.names]  # every neuron at level 0
  widest = mac_model.subnet_macs(level0)[0]
  top = min(budgets[-1], widest / base)
  if k_levels > 1 and top <= budgets[-2]:
    raise SettingsError(
      f'the non-uniform background network (width {cfg.model.width * cfg.construction.widen:.3f}, '
      f'{widest:,} MACs = {widest / base:.4f} of the base) is not above budget {k_levels - 2} '
      f'({budgets[-2]}): raise widen or lower that budget'
    )
  fractions = tuple(budgets[:-1]) + (top,)
  targets = budgets_lib.check_budgets(fractions, base, mac_model, [sizes[0] for sizes in level0])
  carve_top = budgets[-1] * base < widest
  order = ([k_levels - 1] if carve_top else []) + list(range(k_levels - 2, -1, -1))
  return model, targets, base, order


def generation_epochs(cfg: Config, generations: int) -> tuple[float, ...]:
  """The epochs at which the ``generations`` subnets are carved out, largest first:
  ``baseline.generation_epochs``, or by default evenly spaced from
  ``construction.pretrain_epochs`` to half of ``train.num_epochs``. Raises ``SettingsError``
  for a wrong count or an epoch outside (0, train.num_epochs) (the config checked the order)."""
  total = cfg.train.num_epochs
  epochs = tuple(float(e) for e in cfg.baseline.generation_epochs)
  if not epochs:
    pre = cfg.construction.pretrain_epochs
    epochs = tuple(float(e) for e in np.linspace(pre, max(pre, total / 2), generations))
  elif len(epochs) != generations:
    raise SettingsError(
      f'baseline.generation_epochs gives {len(epochs)} epochs; these budgets carve {generations} '
      'subnets out of the background network (one epoch each, largest first)'
    )
  if epochs and (epochs[0] <= 0 or epochs[-1] >= total):
    raise SettingsError(
      f'the non-uniform generation epochs {epochs} must lie inside (0, train.num_epochs={total}) '
      '(by default they start at construction.pretrain_epochs)'
    )
  return epochs


def carve(
  levels: dict[str, np.ndarray],
  scores: dict[str, np.ndarray],
  mac_model: budgets_lib.MacModel,
  subnet: int,
  target: float,
  top: int,
) -> dict[str, np.ndarray]:
  """New levels with subnet ``subnet`` carved out of the level-0 neurons (which, until then,
  form every subnet up to ``subnet + 1``): the least-norm ones move up to level ``subnet + 1``,
  or leave the network when ``subnet`` is the ``top``, until the rest cost <= ``target`` MACs."""
  view = {n: np.where(lvl == 0, 0, np.where(lvl == surgery.REMOVED, surgery.REMOVED, 1)) for n, lvl in levels.items()}
  kept = construct.assign_levels(view, scores, mac_model, [target] if subnet == top else [target, np.inf])
  to = surgery.REMOVED if subnet == top else subnet + 1
  return {n: np.where((levels[n] == 0) & (kept[n] != 0), to, levels[n]) for n in levels}


def check(cfg: Config, dataset: datasets.Dataset) -> None:
  """Raises if the budgets or the generation schedule of ``cfg`` do not fit its network; trains nothing."""
  plan = {}

  def build() -> SteppingModel:
    model, _, _, plan['order'] = _start(cfg, dataset)
    return model

  nnx.eval_shape(build)
  generation_epochs(cfg, len(plan['order']))


def train_nonuniform(cfg: Config, workdir: str, dataset: datasets.Dataset | None = None) -> dict:
  """Trains and saves the non-uniform subnets in ``workdir`` (standard checkpoint format)."""
  with PhasedRun.open(cfg, workdir, dataset, 'nonuniform.json') as run:
    if run.finished is not None:
      return run.finished
    k_levels = cfg.model.num_levels
    resumed = run.resume()
    if resumed is None:
      model, targets, base, order = _start(cfg, run.dataset)
      generation_epochs(cfg, len(order))  # the schedule is checked before anything is written
      meta = structure.model_meta(model, cfg.model.name, run.dataset.num_classes)
      progress = {'budget_macs': [float(t) for t in targets], 'base_macs': int(base), 'order': order, 'phases': 0}
      run.begin()
    else:
      _, model, meta, progress = resumed
    order = progress['order']
    epochs = generation_epochs(cfg, len(order))
    bounds = [int(round(e * run.steps_per_epoch)) for e in epochs] + [run.total_steps]
    if bounds[0] < 1:
      raise SettingsError(
        f'the first non-uniform generation (epoch {epochs[0]:g}) falls on step 0: the background '
        'network would be ranked untrained; give it at least one step'
      )
    # Phase p trains the subnets found so far up to bounds[p], then carves out order[p].
    for p in range(progress['phases'], len(order) + 1):
      first, found = (bounds[p - 1] if p else 0), sorted({k_levels - 1, *order[:p]})
      if bounds[p] > first:
        model = run.train(
          model, first, bounds[p], f'subnets {found}', objective=losses.subnets_for(cfg, found), levels=tuple(found)
        )
      if p == len(order):
        break
      s = order[p]
      levels = carve(
        surgery.neuron_levels(model),
        channel_norms(model),
        budgets_lib.MacModel.of(model),
        s,
        progress['budget_macs'][s],
        k_levels - 1,
      )
      bn_from = [k if k > s else min(s + 1, k_levels - 1) for k in range(k_levels)]
      model, meta = surgery.relevel(model, meta, levels, bn_from=bn_from)
      print(
        f'non-uniform subnet {s} carved out at step {bounds[p]}: ' + json.dumps(zoo.assignment_of(model)), flush=True
      )
      progress['phases'] = p + 1
      run.save_phase(bounds[p], model, meta, progress)
    model = recalibrate(model, run.dataset, cfg)
    return run.finish(
      model,
      meta,
      'non-uniform',
      {
        'budget_macs': progress['budget_macs'],
        'base_macs': progress['base_macs'],
        'generation_epochs': list(epochs),
        'assignment': zoo.assignment_of(model),
      },
    )
