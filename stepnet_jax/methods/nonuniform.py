"""Non-uniform dynamic subnets (Yang & Fan, ASP-DAC 2021), "single-path" variant.

Yang & Fan publish the idea (per-layer channel selection ranked by channel norm; the
single-path method samples different subnets in different epochs of one run), not
every detail. The choices made here:

1. Train the full network (every channel in every subnet; no mask rule) on the top
   exit for ``construction.pretrain_epochs``.
2. Rank each layer's channels by the L1 norm of their filters, divided by the layer's
   mean norm so layers compete on one scale, and give channels levels with the same
   greedy fill as SteppingNet construction (``construct.assign_levels``) but with the
   dense-prefix MAC count: least-norm channels leave subnet k first until it fits
   budget k. Per-layer widths come out non-uniform; subnets are nested prefixes.
3. Rebuild with one private BatchNorm per subnet (started from the full network's)
   and train the subnets one at a time, round-robin from the smallest, in
   ``baseline.nonuniform_cycles`` passes over the remaining steps (one forward pass per batch),
   with one optimizer state throughout.
4. Re-estimate every subnet's BN statistics as their average over
   ``baseline.recalibrate_batches`` training batches (the shared weights moved after each
   subnet's last turn).

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
from stepnet_jax.methods import construct, importance
from stepnet_jax.models import budgets as budgets_lib
from stepnet_jax.models import structure, surgery, zoo
from stepnet_jax.training import losses, optim
from stepnet_jax.training import step as step_lib
from stepnet_jax.training.run import PhasedRun, config_train_step


def channel_norms(model: SteppingModel) -> dict[str, np.ndarray]:
  """Per layer: L1 norm of each output channel's filter, normalised by the layer's mean."""
  out = {}
  for name, unit in zip(model.unit_names, model.units):
    k = np.abs(np.asarray(unit.kernel[...]) * unit.conn.mask)
    out[name] = importance.normalised(k.reshape(-1, k.shape[-1]).sum(0))
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


def _start(cfg: Config, dataset: datasets.Dataset) -> tuple[SteppingModel, budgets_lib.MacModel, int, np.ndarray]:
  """(full network, its MAC model, dense base MACs, budgets in MACs), budgets checked.

  The full network is the widest uniform plan under the top budget (``width x widen``),
  so the top subnet is the whole network even when that leaves part of the top budget
  unused; the top budget is lowered to the network's MACs accordingly.
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
      f'the non-uniform full network (width {cfg.model.width * cfg.construction.widen:.3f}, '
      f'{widest:,} MACs = {widest / base:.4f} of the base) is not above budget {k_levels - 2} '
      f'({budgets[-2]}): raise widen or lower that budget'
    )
  fractions = tuple(budgets[:-1]) + (top,)
  targets = budgets_lib.check_budgets(fractions, base, mac_model, [sizes[0] for sizes in level0])
  return model, mac_model, base, targets


def check(cfg: Config, dataset: datasets.Dataset) -> None:
  """Raises if the budgets of ``cfg`` are infeasible for its network; trains nothing."""
  nnx.eval_shape(lambda: _start(cfg, dataset)[0])


def train_nonuniform(cfg: Config, workdir: str, dataset: datasets.Dataset | None = None) -> dict:
  """Trains and saves the non-uniform subnets in ``workdir`` (standard checkpoint format)."""
  with PhasedRun.open(cfg, workdir, dataset, 'nonuniform.json') as run:
    if run.finished is not None:
      return run.finished
    k_levels = cfg.model.num_levels
    pre, total = int(round(cfg.construction.pretrain_epochs * run.steps_per_epoch)), run.total_steps
    resumed, step = run.resume(), pre
    if resumed is None:
      model, mac_model, base, targets = _start(cfg, run.dataset)
      if pre > total:
        raise SettingsError(
          f'construction.pretrain_epochs {cfg.construction.pretrain_epochs} exceed train.num_epochs '
          f'{cfg.train.num_epochs}'
        )
      meta = structure.model_meta(model, cfg.model.name, run.dataset.num_classes)
      run.begin()
      model = run.train(
        model, 0, pre, 'full network', objective=losses.subnet_for(cfg, k_levels - 1), levels=(k_levels - 1,)
      )
      levels = construct.assign_levels(surgery.neuron_levels(model), channel_norms(model), mac_model, targets)
      model, meta = surgery.relevel(model, meta, levels)
      print('non-uniform subnets by channel norm: ' + json.dumps(zoo.assignment_of(model)), flush=True)
      progress = {'budget_macs': [float(t) for t in targets], 'base_macs': int(base), 'turn': 0}
      run.save_phase(pre, model, meta, progress)
    else:
      step, model, meta, progress = resumed
    # One optimizer state for all turns (the structure no longer changes); one
    # compiled train step per subnet.
    tx = optim.make_optimizer(cfg, run.steps_per_epoch, step_offset=pre)
    graphdef, state = step_lib.init_state(model, tx, pre)
    turns = k_levels * cfg.baseline.nonuniform_cycles
    bounds = np.linspace(pre, total, turns + 1).astype(int)
    if step > pre:  # resumed after a turn: its optimizer state goes on
      state = run.restore_state(state)
    step_fns = [config_train_step(graphdef, tx, cfg, losses.subnet_for(cfg, k)) for k in range(k_levels)]
    for t in range(progress['turn'], turns):
      level = t % k_levels
      if bounds[t + 1] > bounds[t]:
        state = run.run_steps(
          state,
          step_fns[level],
          int(bounds[t]),
          int(bounds[t + 1]),
          f'subnet {level} ({t + 1}/{turns})',
          levels=(level,),
        )
        progress['turn'] = t + 1
        run.save_phase(int(bounds[t + 1]), None, meta, progress, state)
    model = recalibrate(nnx.merge(graphdef, state.params, state.batch_stats), run.dataset, cfg)
    return run.finish(
      model,
      meta,
      'non-uniform',
      {
        'budget_macs': progress['budget_macs'],
        'base_macs': progress['base_macs'],
        'assignment': zoo.assignment_of(model),
      },
    )
