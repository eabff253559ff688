"""Joint training of all levels: one full-width pass, every exit, one optimizer step.

Because hidden activations do not depend on the subnet, the K exits are the cumulative
sums of per-level head contributions of a single forward pass; the weighted multi-exit
loss therefore costs about one forward + backward of the full network.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from stepnet_jax import checkpoint, data, losses, models, stepping
from stepnet_jax import levels as lv
from stepnet_jax import config as config_lib
from stepnet_jax.config import Config
from stepnet_jax.model import SteppingModel


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def build_model_for(cfg: Config, dataset: data.Dataset) -> SteppingModel:
  mean, std = dataset.channel_stats()
  return models.build_model(
      cfg.model, num_classes=dataset.num_classes, input_shape=dataset.input_shape,
      num_levels=cfg.num_levels, width=cfg.width, level_widths=cfg.level_widths or None,
      assignment=cfg.assignment_dict(), triangular=cfg.triangular,
      mask_rule=cfg.mask_rule, mean=mean, std=std, seed=cfg.seed)


def learning_rate_schedule(cfg: Config, steps_per_epoch: int, step_offset: int = 0) -> optax.Schedule:
  """The config's schedule over ``num_epochs``; ``step_offset`` shifts it for a phase
  whose optimizer starts counting at 0 in the middle of training (construction)."""
  if step_offset:
    base = learning_rate_schedule(cfg, steps_per_epoch)
    return lambda count: base(count + step_offset)
  total = max(1, cfg.num_epochs * steps_per_epoch)
  warmup = int(cfg.warmup_epochs * steps_per_epoch)
  if cfg.schedule == 'cosine':
    main = optax.cosine_decay_schedule(cfg.learning_rate, max(1, total - warmup))
  elif cfg.schedule == 'step':
    main = optax.piecewise_constant_schedule(
        cfg.learning_rate, {int(f * total) - warmup: 0.1 for f in cfg.step_decay_at})
  else:
    main = optax.constant_schedule(cfg.learning_rate)
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), main], [warmup])


def make_optimizer(cfg: Config, steps_per_epoch: int, step_offset: int = 0) -> optax.GradientTransformation:
  lr = learning_rate_schedule(cfg, steps_per_epoch, step_offset)
  if cfg.optimizer == 'sgd':
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.sgd(lr, momentum=cfg.momentum, nesterov=False))
  if cfg.optimizer == 'adamw':
    return optax.adamw(lr, weight_decay=cfg.weight_decay)
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.adam(lr))


def augment(images: jax.Array, key: jax.Array, pad: int = 4) -> jax.Array:
  """Random crop after zero padding by ``pad`` and random horizontal flip. [B, H, W, C]."""
  b, h, w, _ = images.shape
  k1, k2, k3 = jax.random.split(key, 3)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = jax.random.randint(k1, (b,), 0, 2 * pad + 1)
  dx = jax.random.randint(k2, (b,), 0, 2 * pad + 1)
  crop = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (h, w, im.shape[-1])))
  out = crop(padded, dy, dx)
  flip = jax.random.bernoulli(k3, 0.5, (b, 1, 1, 1))
  return jnp.where(flip, out[:, :, ::-1], out)


def make_train_step(graphdef: nnx.GraphDef, cfg: Config, tx: optax.GradientTransformation,
                    levels: tuple[int, ...] | None = None):
  """Jitted ``(state, images, labels) -> (state, metrics)``; state is donated.

  ``levels`` (static) restricts the loss to those exits (default: all K, weighted by
  ``cfg.exit_weights``); the non-uniform baseline trains one sampled subnet per epoch.
  Metrics' ``accuracy`` has one entry per trained exit.
  """
  levels = tuple(range(cfg.num_levels)) if levels is None else tuple(levels)
  weights = tuple(cfg.weights[k] for k in levels)

  def loss_fn(params, batch_stats, images, labels, key):
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    if cfg.sandwich_widths:
      # AWN's sandwich rule: the smallest and the largest subnet plus random widths.
      smallest, widest = lv.end(model.head.in_sizes, 0), sum(model.head.in_sizes)
      widths = jax.random.randint(key, (cfg.sandwich_widths,), smallest, widest + 1)
      logits, random_logits = model.sandwich_exits(images, widths, train=True)
      trained = jnp.concatenate([logits[:1], random_logits, logits[-1:]])
      loss, aux = losses.multi_exit_loss(trained, labels, (1.0,) * (cfg.sandwich_widths + 2),
                                         cfg.distill_weight, cfg.distill_temperature)
    else:
      logits = model.exits(images, train=True, levels=levels)  # [len(levels), B, classes]
      loss, aux = losses.multi_exit_loss(logits, labels, weights, cfg.distill_weight, cfg.distill_temperature)
    new_stats = nnx.state(model, nnx.BatchStat)
    return loss, (logits, aux, new_stats)

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state: TrainState, images, labels):
    if cfg.augment:
      images = augment(images, jax.random.fold_in(jax.random.key(cfg.seed), state.step))
    key = jax.random.fold_in(jax.random.key(cfg.seed + 1), state.step)
    (loss, (logits, aux, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, images, labels, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    accuracy = (logits.argmax(-1) == labels[None]).mean(axis=1)  # [K]
    metrics = {'loss': loss, 'ce': aux['ce'], 'distill': aux['distill'], 'accuracy': accuracy}
    return TrainState(state.step + 1, params, new_stats, opt_state), metrics

  return train_step


def exit_accuracy(exits_fn, variables, images: np.ndarray, labels: np.ndarray,
                  batch_size: int = 1000) -> np.ndarray:
  """Eval-mode accuracy of every exit over a dataset split: [K].

  ``exits_fn(variables, x) -> [K, B, classes]`` is a jitted ``stepping.exits``; the last
  batch is padded so it compiles for one shape.
  """
  correct = None
  for i in range(0, len(labels), batch_size):
    x, y = images[i:i + batch_size], labels[i:i + batch_size]
    n = len(y)
    if n < batch_size and i:  # pad the last batch: one compiled shape
      x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
    pred = np.asarray(exits_fn(variables, jnp.asarray(x)).argmax(-1))[:, :n]
    c = (pred == y[None]).sum(axis=1)
    correct = c if correct is None else correct + c
  return correct / len(labels)


# Settings a resumed joint run may change: more epochs continue training.
RESUMABLE_KEYS = ('num_epochs',)


class MetricWriter:
  """Scalars to TensorBoard event files (tensorboardX) and to metrics.jsonl.

  ``fresh=True`` starts both anew (a run that restarts from scratch); otherwise they
  continue (a resumed run).
  """

  def __init__(self, workdir: str, fresh: bool = False):
    from tensorboardX import SummaryWriter
    tb_dir = os.path.join(workdir, 'tensorboard')
    if fresh and os.path.isdir(tb_dir):
      shutil.rmtree(tb_dir)
    self.tb = SummaryWriter(tb_dir)
    self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'w' if fresh else 'a')

  def write(self, step: int, scalars: dict[str, float]) -> None:
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    self.jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self.jsonl.flush()

  def close(self) -> None:
    self.tb.close()
    self.jsonl.close()


def _per_level(prefix: str, values) -> dict[str, float]:
  return {f'{prefix}/level{k}': float(v) for k, v in enumerate(values)}


def batch_indices(step: int, steps_per_epoch: int, n_train: int, batch_size: int, seed: int) -> np.ndarray:
  """Training examples of global step ``step``: a slice of its epoch's seeded permutation."""
  epoch, i = divmod(step, steps_per_epoch)
  return np.sort(_epoch_order(seed + epoch, n_train)[i * batch_size:(i + 1) * batch_size])


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, n_train: int) -> np.ndarray:
  return np.random.RandomState(seed).permutation(n_train)


def run_steps(state: TrainState, train_step, dataset: data.Dataset, cfg: Config, first: int, last: int,
              steps_per_epoch: int, writer: MetricWriter | None, progress, desc: str,
              levels: tuple[int, ...] | None = None) -> TrainState:
  """Runs global steps ``[first, last)``, logging every ``cfg.log_every_steps`` and at the end.

  ``state.step`` must equal ``first``; batches depend only on the global step and the
  seed, so a run split into pieces (resumed, or in construction phases) sees the same
  data. ``levels`` names the exits ``train_step`` trains (default all), for the logs.
  """
  n_train = len(dataset.train_labels)
  levels = tuple(range(cfg.num_levels)) if levels is None else levels
  bar = progress(total=last - first, initial=0, desc=desc)
  window_t, window_n, window_metrics = time.time(), 0, []
  for step in range(first, last):
    idx = batch_indices(step, steps_per_epoch, n_train, cfg.batch_size, cfg.seed)
    state, metrics = train_step(state, jnp.asarray(dataset.train_images[idx]), jnp.asarray(dataset.train_labels[idx]))
    window_n += len(idx)
    window_metrics.append(metrics)
    if (step + 1) % cfg.log_every_steps == 0 or step == last - 1:
      m = jax.device_get(window_metrics)
      if not np.isfinite(m[-1]['loss']):
        raise FloatingPointError(f'loss became {m[-1]["loss"]} at step {step + 1}')
      loss = float(np.mean([x['loss'] for x in m]))
      acc = np.mean([x['accuracy'] for x in m], axis=0)
      ips = window_n / max(time.time() - window_t, 1e-9)
      if writer is not None:
        writer.write(step + 1, {'train/loss': loss, 'train/images_per_sec': ips,
                                **{f'train/accuracy/level{k}': float(a) for k, a in zip(levels, acc)}})
      bar.set_postfix_str(f'loss {loss:.3f} acc ' + '/'.join(f'{a:.2f}' for a in acc) + f' {ips:.0f} img/s')
      window_t, window_n, window_metrics = time.time(), 0, []
    bar.update(1)
  bar.close()
  return state


def prepare_data(cfg: Config, dataset: data.Dataset | None = None) -> tuple[data.Dataset, int]:
  """The config's dataset (loaded unless given), subset as configured, and steps per epoch."""
  if dataset is None:
    dataset = data.load_dataset(cfg.dataset, cfg.data_dir or None)
  dataset = data.subset(dataset, cfg.train_subset, cfg.test_subset, cfg.seed)
  steps_per_epoch = len(dataset.train_labels) // cfg.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'batch_size {cfg.batch_size} exceeds the {len(dataset.train_labels)} training images')
  return dataset, steps_per_epoch


def phase_start(model: SteppingModel, cfg: Config, steps_per_epoch: int,
                first: int) -> tuple[nnx.GraphDef, optax.GradientTransformation, TrainState]:
  """(graphdef, optimizer, state) for training ``model`` from global step ``first`` with
  fresh optimizer moments; the learning rate follows the config's schedule at the global step."""
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  tx = make_optimizer(cfg, steps_per_epoch, step_offset=first)
  return graphdef, tx, TrainState(jnp.asarray(first, jnp.int32), params, stats, tx.init(params))


def train_phase(model: SteppingModel, cfg: Config, dataset: data.Dataset, first: int, last: int,
                steps_per_epoch: int, writer: MetricWriter | None, desc: str,
                levels: tuple[int, ...] | None = None) -> SteppingModel:
  """Trains ``model`` for global steps ``[first, last)`` with a fresh optimizer state.

  For multi-phase methods whose structure changes between phases: the learning rate
  follows the config's schedule at the global step, the optimizer moments restart.
  """
  graphdef, tx, state = phase_start(model, cfg, steps_per_epoch, first)
  step_fn = make_train_step(graphdef, cfg, tx, levels=levels)
  state = run_steps(state, step_fn, dataset, cfg, first, last, steps_per_epoch, writer,
                    progress_bar(cfg.progress), desc, levels=levels)
  return nnx.merge(graphdef, state.params, state.batch_stats)


def save_final(model: SteppingModel, model_meta: dict, cfg: Config, dataset: data.Dataset, workdir: str,
               step: int, steps_per_epoch: int, writer: MetricWriter | None = None) -> np.ndarray:
  """Evaluates every exit on the test split and saves the model as a standard checkpoint.

  The checkpoint (model item and meta, no optimizer state) loads with
  ``stepnet_jax.load`` and ``evaluate.py`` like any training run.
  """
  exits = jax.jit(functools.partial(stepping.exits, nnx.graphdef(model)))
  test_acc = exit_accuracy(exits, nnx.state(model), dataset.test_images, dataset.test_labels, cfg.eval_batch_size)
  _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  meta = {'config': cfg.to_dict(), 'model_meta': model_meta, 'dataset': dataset.name,
          'steps_per_epoch': steps_per_epoch}
  checkpoint.save(checkpoint.manager(workdir, cfg.keep_checkpoints), step, {
      'model': {'params': nnx.to_pure_dict(params), 'batch_stats': nnx.to_pure_dict(stats)}}, meta)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(meta, f, indent=2)
  if writer is not None:
    writer.write(step, _per_level('test/accuracy', test_acc))
  return test_acc


def finished_run(workdir: str, cfg: Config, result_name: str) -> dict | None:
  """The saved result of a finished multi-phase run of ``cfg`` in ``workdir``, if any.

  Multi-phase methods (construction, non-uniform) cannot resume mid-way: they start
  over, but a run that finished is returned as it is. A workdir holding a checkpoint
  of other settings is an error.
  """
  if checkpoint.latest_step(workdir) is None:
    return None
  saved = checkpoint.restore_meta(workdir)
  path = os.path.join(workdir, result_name)
  differ = config_lib.differing_keys(saved['config'], cfg)
  if differ:
    raise ValueError(f'{workdir} already holds a checkpoint of a run with other settings '
                     f'({", ".join(differ)}); use a new --workdir')
  if not os.path.exists(path):
    raise ValueError(f'{workdir} holds the final checkpoint of a run of these settings that stopped before '
                     f'writing {result_name}; delete {workdir} to run it again')
  with open(path) as f:
    result = json.load(f)
  print(f'{workdir}: finished run found, not retraining', flush=True)
  return result


def train_and_evaluate(cfg: Config, workdir: str, dataset: data.Dataset | None = None) -> dict:
  """Trains ``cfg`` in ``workdir`` (resuming from its last checkpoint) and evaluates every exit.

  A resumed run must have the same settings, except ``num_epochs`` (raising it trains
  on; the schedule then spans the new length). Returns a dict with the final
  per-level test accuracy, the step, and ``seconds``: the training time of all
  sessions of the run (saved with every checkpoint).
  """
  os.makedirs(workdir, exist_ok=True)
  dataset, steps_per_epoch = prepare_data(cfg, dataset)
  total_steps = steps_per_epoch * cfg.num_epochs

  model = build_model_for(cfg, dataset)
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  tx = make_optimizer(cfg, steps_per_epoch)
  state = TrainState(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params))
  meta = {'config': cfg.to_dict(), 'model_meta': checkpoint.model_meta(model, cfg.model, dataset.num_classes),
          'dataset': dataset.name, 'steps_per_epoch': steps_per_epoch}
  mngr = checkpoint.manager(workdir, cfg.keep_checkpoints)
  start = mngr.latest_step()
  prior_seconds = 0.0
  if start is not None:
    saved = checkpoint.restore_meta(workdir, start)
    if saved['model_meta'] != meta['model_meta']:
      raise ValueError(f'{workdir} holds a checkpoint of a different model; use a new --workdir')
    differ = [k for k in config_lib.differing_keys(saved['config'], cfg) if k not in RESUMABLE_KEYS]
    if differ:
      raise ValueError(f'{workdir} holds a checkpoint trained with other settings ({", ".join(differ)}); '
                       'use a new --workdir')
    prior_seconds = float(saved.get('train_seconds', 0.0))
    m = checkpoint.restore_item(workdir, 'model', {'params': nnx.to_pure_dict(params),
                                                   'batch_stats': nnx.to_pure_dict(batch_stats)}, start)
    t = checkpoint.restore_item(workdir, 'train', {'opt_state': state.opt_state, 'step': state.step}, start)
    nnx.replace_by_pure_dict(params, m['params'])
    nnx.replace_by_pure_dict(batch_stats, m['batch_stats'])
    state = TrainState(jnp.asarray(t['step'], jnp.int32), params, batch_stats, t['opt_state'])
    print(f'Resuming from step {start} of {total_steps} in {workdir}', flush=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(meta, f, indent=2)
  step = int(state.step)

  train_step = make_train_step(graphdef, cfg, tx)
  exits_fn = jax.jit(functools.partial(stepping.exits, graphdef))
  writer = MetricWriter(workdir)
  t_start = time.time()
  test_acc = None

  def save(s: TrainState) -> None:
    checkpoint.save(mngr, int(s.step), {
        'model': {'params': nnx.to_pure_dict(s.params), 'batch_stats': nnx.to_pure_dict(s.batch_stats)},
        'train': {'opt_state': s.opt_state, 'step': s.step}},
        {**meta, 'train_seconds': prior_seconds + time.time() - t_start})

  def evaluate(s: TrainState) -> np.ndarray:
    variables = nnx.merge_state(s.params, s.batch_stats)
    return exit_accuracy(exits_fn, variables, dataset.test_images, dataset.test_labels, cfg.eval_batch_size)

  progress = progress_bar(cfg.progress)
  for epoch in range(step // steps_per_epoch, cfg.num_epochs):
    state = run_steps(state, train_step, dataset, cfg, step, (epoch + 1) * steps_per_epoch, steps_per_epoch,
                      writer, progress, f'epoch {epoch + 1}/{cfg.num_epochs}')
    step = int(state.step)
    test_acc = evaluate(state)
    writer.write(step, {'epoch': epoch + 1, **_per_level('test/accuracy', test_acc)})
    print(f'epoch {epoch + 1}: test accuracy per level ' + ' '.join(f'{a:.4f}' for a in test_acc), flush=True)
    save(state)
  if test_acc is None:  # nothing left to train: report the restored state
    test_acc = evaluate(state)
  writer.close()
  return {'step': step, 'test_accuracy': [float(a) for a in test_acc],
          'seconds': prior_seconds + time.time() - t_start, 'levels': cfg.num_levels}


def progress_bar(enabled: bool):
  if enabled:
    from tqdm.auto import tqdm
    return functools.partial(tqdm, dynamic_ncols=True, leave=True)

  class _Quiet:
    def __init__(self, total, initial, desc):
      pass

    def set_postfix_str(self, s):
      pass

    def update(self, n):
      pass

    def close(self):
      pass

  return _Quiet
