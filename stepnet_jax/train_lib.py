"""Joint training of all levels: one full-width pass, every exit, one optimizer step.

Because hidden activations do not depend on the subnet, the K exits are the cumulative
sums of per-level head contributions of a single forward pass; the weighted multi-exit
loss therefore costs about one forward + backward of the full network.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from stepnet_jax import checkpoint, data, losses, models, stepping
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


def learning_rate_schedule(cfg: Config, steps_per_epoch: int) -> optax.Schedule:
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


def make_optimizer(cfg: Config, steps_per_epoch: int) -> optax.GradientTransformation:
  lr = learning_rate_schedule(cfg, steps_per_epoch)
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

  def loss_fn(params, batch_stats, images, labels):
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    logits = model.exits(images, train=True, levels=levels)  # [len(levels), B, classes]
    loss, aux = losses.multi_exit_loss(logits, labels, weights, cfg.distill_weight, cfg.distill_temperature)
    new_stats = nnx.state(model, nnx.BatchStat)
    return loss, (logits, aux, new_stats)

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state: TrainState, images, labels):
    if cfg.augment:
      images = augment(images, jax.random.fold_in(jax.random.key(cfg.seed), state.step))
    (loss, (logits, aux, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, images, labels)
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


class MetricWriter:
  """Scalars to TensorBoard event files (tensorboardX) and to metrics.jsonl."""

  def __init__(self, workdir: str):
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

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


def train_and_evaluate(cfg: Config, workdir: str, dataset: data.Dataset | None = None) -> dict:
  """Trains ``cfg`` in ``workdir`` (resuming from its last checkpoint) and evaluates every exit.

  Returns a dict with the final per-level test accuracy, the step and the wall time.
  """
  os.makedirs(workdir, exist_ok=True)
  if dataset is None:
    dataset = data.load_dataset(cfg.dataset, cfg.data_dir or None)
  dataset = data.subset(dataset, cfg.train_subset, cfg.test_subset, cfg.seed)
  n_train = len(dataset.train_labels)
  steps_per_epoch = n_train // cfg.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'batch_size {cfg.batch_size} exceeds the {n_train} training images')
  total_steps = steps_per_epoch * cfg.num_epochs

  model = build_model_for(cfg, dataset)
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  tx = make_optimizer(cfg, steps_per_epoch)
  state = TrainState(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params))
  meta = {'config': cfg.to_dict(), 'model_meta': checkpoint.model_meta(model, cfg.model, dataset.num_classes),
          'dataset': dataset.name, 'steps_per_epoch': steps_per_epoch}
  mngr = checkpoint.manager(workdir, cfg.keep_checkpoints)
  start = mngr.latest_step()
  if start is not None:
    saved = checkpoint.restore_meta(workdir, start)
    if saved['model_meta'] != meta['model_meta']:
      raise ValueError(f'{workdir} holds a checkpoint of a different model; use a new --workdir')
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
        'train': {'opt_state': s.opt_state, 'step': s.step}}, meta)

  def evaluate(s: TrainState) -> np.ndarray:
    variables = nnx.merge_state(s.params, s.batch_stats)
    return exit_accuracy(exits_fn, variables, dataset.test_images, dataset.test_labels, cfg.eval_batch_size)

  progress = _progress_bar(cfg.progress)
  for epoch in range(step // steps_per_epoch, cfg.num_epochs):
    order = np.random.RandomState(cfg.seed + epoch).permutation(n_train)
    first = step - epoch * steps_per_epoch
    bar = progress(total=steps_per_epoch, initial=first, desc=f'epoch {epoch + 1}/{cfg.num_epochs}')
    window_t, window_n, window_metrics = time.time(), 0, []
    for i in range(first, steps_per_epoch):
      idx = np.sort(order[i * cfg.batch_size:(i + 1) * cfg.batch_size])
      state, metrics = train_step(state, jnp.asarray(dataset.train_images[idx]),
                                  jnp.asarray(dataset.train_labels[idx]))
      step += 1
      window_n += cfg.batch_size
      window_metrics.append(metrics)
      if step % cfg.log_every_steps == 0 or i == steps_per_epoch - 1:
        m = jax.device_get(window_metrics)
        if not np.isfinite(m[-1]['loss']):
          raise FloatingPointError(f'loss became {m[-1]["loss"]} at step {step}')
        loss = float(np.mean([x['loss'] for x in m]))
        acc = np.mean([x['accuracy'] for x in m], axis=0)
        ips = window_n / max(time.time() - window_t, 1e-9)
        scalars = {'train/loss': loss, 'train/images_per_sec': ips, **_per_level('train/accuracy', acc)}
        writer.write(step, scalars)
        bar.set_postfix_str(f'loss {loss:.3f} acc ' + '/'.join(f'{a:.2f}' for a in acc) + f' {ips:.0f} img/s')
        window_t, window_n, window_metrics = time.time(), 0, []
      bar.update(1)
    bar.close()
    test_acc = evaluate(state)
    writer.write(step, {'epoch': epoch + 1, **_per_level('test/accuracy', test_acc)})
    print(f'epoch {epoch + 1}: test accuracy per level ' + ' '.join(f'{a:.4f}' for a in test_acc), flush=True)
    save(state)
  if test_acc is None:  # nothing left to train: report the restored state
    test_acc = evaluate(state)
  writer.close()
  return {'step': step, 'test_accuracy': [float(a) for a in test_acc], 'seconds': time.time() - t_start,
          'levels': cfg.num_levels}


def _progress_bar(enabled: bool):
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
