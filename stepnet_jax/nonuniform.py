"""Non-uniform dynamic subnets (Yang & Fan, ASP-DAC 2021), "single-path" variant.

Yang & Fan publish the idea (per-layer channel selection ranked by channel norm; the
single-path method samples different subnets in different epochs of one run), not
every detail. The choices made here:

1. Train the full network (every channel in every subnet; no mask rule) on the top
   exit for ``pretrain_epochs``.
2. Rank each layer's channels by the L1 norm of their filters, divided by the layer's
   mean norm so layers compete on one scale, and give channels levels with the same
   greedy fill as SteppingNet construction (``construct.assign_levels``) but with the
   dense-prefix MAC count: least-norm channels leave subnet k first until it fits
   budget k. Per-layer widths come out non-uniform; subnets are nested prefixes.
3. Rebuild with one private BatchNorm per subnet (started from the full network's)
   and train the subnets one at a time, round-robin from the smallest, in
   ``nonuniform_cycles`` passes over the remaining steps (one forward pass per batch),
   with one optimizer state throughout.
4. Re-estimate every subnet's BN statistics as their average over
   ``recalibrate_batches`` training batches (the shared weights moved after each
   subnet's last turn).

A wider subnet recomputes everything: the method is not reusable, and its reports
count ``macs_to_reach`` as the running sum of its subnets.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepnet_jax import budgets as budgets_lib
from stepnet_jax import checkpoint, construct, data, importance, layers, models, surgery, train_lib
from stepnet_jax.config import Config
from stepnet_jax.model import SteppingModel


def channel_norms(model: SteppingModel) -> dict[str, np.ndarray]:
  """Per layer: L1 norm of each output channel's filter, normalised by the layer's mean."""
  out = {}
  for name, unit in zip(model.unit_names, model.units):
    k = np.abs(np.asarray(unit.kernel[...]) * unit.conn.mask)
    out[name] = importance.normalised(k.reshape(-1, k.shape[-1]).sum(0))
  return out


def recalibrate(model: SteppingModel, dataset: data.Dataset, cfg: Config) -> SteppingModel:
  """Re-estimates every subnet's BN statistics: their average over ``recalibrate_batches``
  training batches in train mode (weights unchanged; the old statistics are discarded).

  A train-mode pass from zero statistics leaves ``(1 - momentum) x`` the batch's
  statistics in the running buffers, so each batch's own statistics are read off
  exactly and averaged with equal weight.
  """
  if cfg.recalibrate_batches == 0:
    return model
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

  @jax.jit
  def batch_stats(images):
    zeros = jax.tree.map(jnp.zeros_like, stats)
    m = nnx.merge(graphdef, params, zeros, copy=True)
    m.exits(images, train=True)
    return jax.tree.map(lambda v: v / (1.0 - layers.BN_MOMENTUM), nnx.state(m, nnx.BatchStat))

  steps_per_epoch = len(dataset.train_labels) // cfg.batch_size
  total = None
  for step in range(cfg.recalibrate_batches):
    idx = train_lib.batch_indices(step, steps_per_epoch, len(dataset.train_labels), cfg.batch_size, cfg.seed + 7)
    s = batch_stats(jnp.asarray(dataset.train_images[idx]))
    total = s if total is None else jax.tree.map(jnp.add, total, s)
  mean = jax.tree.map(lambda v: v / cfg.recalibrate_batches, total)
  return nnx.merge(graphdef, params, mean)


def _start(cfg: Config, dataset: data.Dataset) -> tuple[SteppingModel, budgets_lib.MacModel, int, np.ndarray]:
  """(full network, its MAC model, dense base MACs, budgets in MACs), budgets checked.

  The full network is the widest uniform plan under the top budget (``width x widen``),
  so the top subnet is the whole network even when that leaves part of the top budget
  unused; the top budget is lowered to the network's MACs accordingly.
  """
  k_levels = cfg.num_levels
  mean, std = dataset.channel_stats()
  base = budgets_lib.dense_macs(cfg.model, input_shape=dataset.input_shape, num_classes=dataset.num_classes,
                                width=cfg.width)
  channels = budgets_lib.layer_channels(cfg.model, input_shape=dataset.input_shape,
                                        num_classes=dataset.num_classes, width=cfg.width * cfg.widen)
  model = models.build_model(cfg.model, num_classes=dataset.num_classes, input_shape=dataset.input_shape,
                             num_levels=k_levels, mask_rule=False, mean=mean, std=std, seed=cfg.seed,
                             assignment={n: budgets_lib.level_sizes_for(c, k_levels) for n, c in channels.items()})
  mac_model = budgets_lib.MacModel.of(model)
  widest = mac_model.subnet_macs([budgets_lib.level_sizes_for(c, k_levels) for c in channels.values()])[0]
  top = min(cfg.budgets[-1], widest / base)
  if k_levels > 1 and top <= cfg.budgets[-2]:
    raise ValueError(f'the non-uniform full network (width {cfg.width * cfg.widen:.3f}, {widest:,} MACs = '
                     f'{widest / base:.4f} of the base) is not above budget {k_levels - 2} ({cfg.budgets[-2]}): '
                     'raise widen or lower that budget')
  fractions = tuple(cfg.budgets[:-1]) + (top,)
  targets = budgets_lib.check_budgets(fractions, base, mac_model, list(channels.values()))
  return model, mac_model, base, targets


def check(cfg: Config, dataset: data.Dataset) -> None:
  """Raises if the budgets of ``cfg`` are infeasible for its network; trains nothing."""
  nnx.eval_shape(lambda: _start(cfg, dataset)[0])


def train_nonuniform(cfg: Config, workdir: str, dataset: data.Dataset | None = None) -> dict:
  """Trains and saves the non-uniform subnets in ``workdir`` (standard checkpoint format)."""
  os.makedirs(workdir, exist_ok=True)
  dataset, steps_per_epoch = train_lib.prepare_data(cfg, dataset)
  done = train_lib.finished_run(workdir, cfg, 'nonuniform.json')
  if done is not None:
    return done
  k_levels = cfg.num_levels
  model, mac_model, base, targets = _start(cfg, dataset)
  pre = int(round(cfg.pretrain_epochs * steps_per_epoch))
  total = cfg.num_epochs * steps_per_epoch
  if pre > total:
    raise ValueError(f'pretrain_epochs {cfg.pretrain_epochs} exceed num_epochs {cfg.num_epochs}')
  meta = checkpoint.model_meta(model, cfg.model, dataset.num_classes)
  writer = train_lib.MetricWriter(workdir, fresh=True)
  t0 = time.time()

  model = train_lib.train_phase(model, cfg, dataset, 0, pre, steps_per_epoch, writer, 'full network',
                                levels=(k_levels - 1,))
  levels = construct.assign_levels(surgery.neuron_levels(model), channel_norms(model), mac_model, targets)
  model, meta = surgery.relevel(model, meta, levels)
  print('non-uniform subnets by channel norm: ' + json.dumps(models.assignment_of(model)), flush=True)
  # One optimizer state for all turns (the structure no longer changes); one
  # compiled train step per subnet.
  graphdef, tx, state = train_lib.phase_start(model, cfg, steps_per_epoch, pre)
  step_fns = [train_lib.make_train_step(graphdef, cfg, tx, levels=(k,)) for k in range(k_levels)]
  turns = k_levels * cfg.nonuniform_cycles
  bounds = np.linspace(pre, total, turns + 1).astype(int)
  progress = train_lib.progress_bar(cfg.progress)
  for t in range(turns):
    level = t % k_levels
    if bounds[t + 1] > bounds[t]:
      state = train_lib.run_steps(state, step_fns[level], dataset, cfg, int(bounds[t]), int(bounds[t + 1]),
                                  steps_per_epoch, writer, progress, f'subnet {level} ({t + 1}/{turns})',
                                  levels=(level,))
  model = recalibrate(nnx.merge(graphdef, state.params, state.batch_stats), dataset, cfg)

  test_acc = train_lib.save_final(model, meta, cfg, dataset, workdir, total, steps_per_epoch, writer)
  writer.close()
  seconds = time.time() - t0
  print('non-uniform done: test accuracy per level ' + ' '.join(f'{a:.4f}' for a in test_acc)
        + f', {seconds:.0f} s', flush=True)
  result = {'test_accuracy': [float(a) for a in test_acc], 'seconds': seconds,
            'budget_macs': [float(t) for t in targets], 'base_macs': base,
            'assignment': models.assignment_of(model)}
  with open(os.path.join(workdir, 'nonuniform.json'), 'w') as f:
    json.dump(result, f, indent=2)
  return result
