"""The training loop: feed batches to a train step, log metrics, stop on a non-finite loss."""
from __future__ import annotations

import functools
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from stepnet_jax import data, feed
from stepnet_jax.config import Config
from stepnet_jax.training.step import TrainState


class MetricWriter:
  """Scalars to TensorBoard event files (tensorboardX) and to metrics.jsonl.

  ``fresh=True`` starts both anew (a run that restarts from scratch); otherwise they
  continue (a resumed run). Only the first host writes (the others would race on the
  same files); elsewhere it is a no-op.
  """

  def __init__(self, workdir: str, fresh: bool = False):
    self.tb = self.jsonl = None
    if jax.process_index() != 0:
      return
    from tensorboardX import SummaryWriter
    tb_dir = os.path.join(workdir, 'tensorboard')
    if fresh and os.path.isdir(tb_dir):
      shutil.rmtree(tb_dir)
    self.tb = SummaryWriter(tb_dir)
    self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'w' if fresh else 'a')

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if self.tb is None:
      return
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    self.jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self.jsonl.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
      self.jsonl.close()


def per_level(prefix: str, values: Sequence[float], levels: Sequence[int] | None = None) -> dict[str, float]:
  """{'PREFIX/levelK': value} for each level (default 0, 1, ...)."""
  levels = range(len(values)) if levels is None else levels
  return {f'{prefix}/level{k}': float(v) for k, v in zip(levels, values)}


class _QuietBar:
  def __init__(self, total, initial, desc):
    pass

  def set_postfix_str(self, s):
    pass

  def update(self, n):
    pass

  def close(self):
    pass


def progress_bar(enabled: bool) -> Callable:
  """tqdm (``train.progress``) or a bar that shows nothing."""
  if enabled:
    from tqdm.auto import tqdm
    return functools.partial(tqdm, dynamic_ncols=True, leave=True)
  return _QuietBar


def run_steps(state: TrainState, train_step, dataset: data.Dataset, cfg: Config, *, first: int, last: int,
              steps_per_epoch: int, writer: MetricWriter | None, desc: str,
              levels: Sequence[int] | None = None) -> TrainState:
  """Runs global steps ``[first, last)``, logging every ``train.log_every_steps`` and at the end.

  ``state.step`` must equal ``first``; batches depend only on the global step and the
  seed (``feed.training_indices``), so a run split into pieces (resumed, or in
  construction phases) sees the same data. ``levels`` names the exits whose accuracy
  ``train_step`` reports (default 0, 1, ...), for the logs. A non-finite loss raises.
  """
  batch_size, log_every = cfg.train.batch_size, cfg.train.log_every_steps
  progress = progress_bar(cfg.train.progress)
  bar = progress(total=last - first, initial=0, desc=desc)
  indices = feed.training_indices(first, last, steps_per_epoch, len(dataset.train_labels), batch_size, cfg.seed)
  batches = feed.device_batches(dataset.train_images, dataset.train_labels, indices)
  window_t, window_n, window_metrics = time.time(), 0, []
  for step, batch in zip(range(first, last), batches):
    state, metrics = train_step(state, batch)
    window_n += batch.count
    window_metrics.append(metrics)
    if (step + 1) % log_every == 0 or step == last - 1:
      m = jax.device_get(window_metrics)
      if not np.isfinite(m[-1]['loss']):
        raise FloatingPointError(f'loss became {m[-1]["loss"]} at step {step + 1}')
      loss = float(np.mean([x['loss'] for x in m]))
      acc = np.mean([x['accuracy'] for x in m], axis=0)
      ips = window_n / max(time.time() - window_t, 1e-9)
      if writer is not None:
        writer.write(step + 1, {'train/loss': loss, 'train/images_per_sec': ips,
                                **per_level('train/accuracy', acc, levels)})
      bar.set_postfix_str(f'loss {loss:.3f} acc ' + '/'.join(f'{a:.2f}' for a in acc) + f' {ips:.0f} img/s')
      window_t, window_n, window_metrics = time.time(), 0, []
    bar.update(1)
  bar.close()
  return state
