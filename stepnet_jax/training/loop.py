"""The training loop: feed batches to a train step, log metrics, checkpoint mid-epoch and on
SIGTERM / Ctrl-C, stop on a non-finite loss."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import jax
import numpy as np

from stepnet_jax.config import Config, TrainConfig
from stepnet_jax.data.feed import Batch
from stepnet_jax.training.step import TrainState


class MetricWriter:
  """Scalars to TensorBoard event files (tensorboardX) and to metrics.jsonl.

  ``fresh=True`` starts both anew (a run that restarts from scratch: its event files are
  removed, other files in ``tensorboard/`` are left alone); otherwise they
  continue (a resumed run). Only the first host writes (the others would race on the
  same files); elsewhere it is a no-op.
  """

  def __init__(self, workdir: str, fresh: bool = False):
    self.tb = self.jsonl = None
    if jax.process_index() != 0:
      return
    from tensorboardX import SummaryWriter

    tb_dir = os.path.join(workdir, 'tensorboard')
    if fresh and os.path.isdir(tb_dir):  # only the event files a run wrote: nothing else is ours to delete
      for name in os.listdir(tb_dir):
        if name.startswith('events.out.tfevents.'):
          os.remove(os.path.join(tb_dir, name))
    self.tb = SummaryWriter(tb_dir)
    self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'w' if fresh else 'a')

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """Writes ``scalars`` at ``step`` to TensorBoard and ``metrics.jsonl`` (first host only)."""
    if self.tb is None:
      return
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    self.jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self.jsonl.flush()

  def close(self) -> None:
    """Closes the files."""
    if self.tb is not None:
      self.tb.close()
      self.jsonl.close()


class MetricRows:
  """A writer that keeps what the loop logs in memory: ``rows``, one dict per write
  (``step`` and the scalars), e.g. one per logged window of ``run_steps``."""

  def __init__(self):
    self.rows: list[dict[str, float]] = []

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """Appends ``{'step': step, **scalars}``."""
    self.rows.append({'step': step, **scalars})

  def close(self) -> None:
    """Nothing to close."""


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


class Preempted(Exception):
  """Training stopped by SIGTERM or Ctrl-C at ``step``: after saving a checkpoint there
  (``saved``), or without one (a loop run without a checkpoint function)."""

  def __init__(self, step: int, signal_name: str, saved: bool = True):
    what = (
      'checkpoint saved; run the same command to resume'
      if saved
      else 'nothing saved: the same command goes on from the last checkpoint, or starts over if there is none'
    )
    super().__init__(f'{signal_name} at step {step}: {what}')
    self.step, self.signal_name, self.saved = step, signal_name, saved

  @property
  def exit_status(self) -> int:
    """The shell's status for a command ended by this signal: 130 (Ctrl-C), 143 (SIGTERM)."""
    return 130 if self.signal_name == 'SIGINT' else 143


class StopRequests:
  """SIGTERM / SIGINT handlers, while entered, that only record the request (the loop saves,
  then stops); a second Ctrl-C interrupts at once. Outside the main thread: no handlers."""

  def __init__(self):
    self.signal_name = None

  def __enter__(self):
    self.previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self.previous[sig] = signal.signal(sig, self._record)
    return self

  def _record(self, signum, frame):
    del frame
    if self.signal_name == 'SIGINT' and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the save
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)


def check_finite(window: Sequence[dict], last_step: int) -> None:
  """FloatingPointError naming the first step of ``window`` (the metrics of the steps ending
  at ``last_step``) whose loss is not finite, and the exits whose loss went bad."""
  for i, metrics in enumerate(window):
    if np.isfinite(metrics['loss']):
      continue
    step = last_step - len(window) + i + 1
    ce = np.asarray(metrics.get('ce', []))
    bad = [int(k) for k in np.flatnonzero(~np.isfinite(ce))]
    where = f'exit(s) {bad} have a non-finite cross-entropy' if bad else "the exits' losses are finite"
    raise FloatingPointError(
      f'loss became {metrics["loss"]} at step {step}: {where}. Training stopped; the last '
      'checkpoint (written before this) is untouched and is what a resume starts from.'
    )


class Diverged(RuntimeError):
  """The loss stayed far above its best for many steps (a finite divergence)."""


class NotLearned(RuntimeError):
  """Training ended with the top exit within ``CHANCE_MARGIN`` of chance: it learned nothing."""


# A run whose final top-exit accuracy is at most chance (1 / classes) plus this is a failure,
# judged once it has trained at least JUDGE_AFTER_STEPS steps (a shorter one may not have
# learned yet: tests and smoke runs train a handful of steps).
CHANCE_MARGIN = 0.03
JUDGE_AFTER_STEPS = 50


def check_learned(accuracy: float, measured_on: str, num_classes: int, learning_rate: float) -> None:
  """``NotLearned`` if ``accuracy`` (the top exit's, on ``measured_on``) is within
  ``CHANCE_MARGIN`` of chance: a learning rate so high that the loss went back to (or never
  left) ln(classes), which the divergence guard cannot tell from a slow start, or a run
  shorter than the guard's window."""
  chance = 1.0 / num_classes
  if accuracy <= chance + CHANCE_MARGIN:
    raise NotLearned(
      f"training ended at chance: the top exit's {measured_on} accuracy is {accuracy:.2%} (chance "
      f'{chance:.2%}; a run at most {CHANCE_MARGIN:.0%} above it has learned nothing). The checkpoints are kept. '
      f'Lower the learning rate (--config.optim.learning_rate, now {learning_rate:g}).'
    )


class DivergenceGuard:
  """Raises ``Diverged`` when the smoothed loss (an exponential average over about 20 steps)
  stays above ``factor`` x a reference for ``steps`` steps in a row (``steps=0``: never).

  The loop feeds it the top trained exit's cross-entropy (every objective trains that exit
  on the labels; a distillation term may grow as the teacher sharpens, so the total loss
  is not watched). The reference is the lower of its best value so far and ``chance``, the
  cross-entropy of a uniform guess (ln of the class count), but at least ``chance / 10``
  (near zero, a loss that triples is noise, not divergence). It catches what the non-finite
  check cannot: a learning rate so high that the loss stays finite, far above chance from the first step or back at chance after
  training had learned. Surgery between phases raises the loss for a while; each
  ``run_steps`` call starts a new guard.
  """

  def __init__(self, steps: int, factor: float, chance: float, smoothing: float = 0.05, warmup: int = 20):
    self.steps, self.factor, self.smoothing, self.warmup = steps, factor, smoothing, warmup
    self.average, self.best, self.seen, self.above = None, float(chance), 0, 0
    self.floor = 0.1 * float(chance)
    self.last_accuracy = None  # per exit, of the last logged window (run_steps sets it)

  @property
  def threshold(self) -> float:
    """The smoothed loss above which a step counts towards divergence."""
    return self.factor * max(self.best, self.floor)

  def update(self, losses: Sequence[float], last_step: int) -> None:
    """Takes the losses of the steps ending at ``last_step``. The smoothed loss is kept
    whether or not the guard is on (checkpoint retention ranks saves by it)."""
    for loss in losses:
      self.average = loss if self.average is None else (1 - self.smoothing) * self.average + self.smoothing * loss
      self.seen += 1
      if self.seen < self.warmup:
        continue
      self.best = min(self.best, self.average)
      self.above = self.above + 1 if self.average > self.threshold else 0
    if self.steps and self.above >= self.steps:
      raise Diverged(
        f"training diverged: at step {last_step} the top exit's cross-entropy (smoothed "
        f'{self.average:.4g}) has stayed above {self.factor:g} x min(its best, chance level) = '
        f'{self.threshold:.4g} for {self.above} steps. Stopped (lower the learning rate?); '
        '--config.train.divergence_steps=0 turns this check off.'
      )


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """What ``run_steps`` reads besides its batches: the log and checkpoint cadence, the progress
  bar and the divergence guard (``num_classes`` sets its chance level). The defaults are
  ``TrainConfig``'s; ``from_config`` takes a config's."""

  log_every_steps: int = TrainConfig.log_every_steps
  checkpoint_every_steps: int = TrainConfig.checkpoint_every_steps  # with a checkpoint function
  progress: bool = TrainConfig.progress
  divergence_steps: int = TrainConfig.divergence_steps  # 0: no divergence guard
  divergence_factor: float = TrainConfig.divergence_factor
  num_classes: int = 10

  @classmethod
  def from_config(cls, cfg: Config, num_classes: int) -> LoopSettings:
    """The settings of ``cfg.train`` for data of ``num_classes`` classes."""
    t = cfg.train
    return cls(
      log_every_steps=t.log_every_steps,
      checkpoint_every_steps=t.checkpoint_every_steps,
      progress=t.progress,
      divergence_steps=t.divergence_steps,
      divergence_factor=t.divergence_factor,
      num_classes=num_classes,
    )

  def divergence_guard(self) -> DivergenceGuard:
    """A new guard with these settings (its chance level: ln of the class count)."""
    return DivergenceGuard(self.divergence_steps, self.divergence_factor, float(np.log(self.num_classes)))


def run_steps(
  state: TrainState,
  train_step,
  batches: Iterable[Batch],
  settings: LoopSettings,
  *,
  first: int,
  last: int,
  writer: MetricWriter | MetricRows | None,
  desc: str,
  levels: Sequence[int] | None = None,
  checkpoint: Callable[[TrainState], None] | None = None,
  guard: DivergenceGuard | None = None,
  stop: StopRequests | None = None,
) -> TrainState:
  """Runs global steps ``[first, last)`` on ``batches`` (one per step), logging every
  ``settings.log_every_steps`` and at the end.

  ``state.step`` must equal ``first``. ``batches`` are the steps' batches in order
  (``feed.training_batches``: they depend only on the global step and the seed, so a run
  split into pieces, resumed or in construction phases, sees the same data). ``levels``
  names the exits whose accuracy ``train_step`` reports (default 0, 1, ...), for the logs.
  A non-finite loss (``check_finite``) or a divergence (``guard``, a new one from
  ``settings`` unless given) raises before anything is saved. With ``checkpoint``, the
  state is saved every ``settings.checkpoint_every_steps`` steps, and on SIGTERM / Ctrl-C
  at the current step, after which ``Preempted`` is raised. ``stop``: the caller's entered
  ``StopRequests`` (held for a whole run); without ``checkpoint``, a request raises
  ``Preempted`` (nothing saved) at the next step. A request at the range's last step is
  left to the caller, which ends the range itself (evaluates and saves the epoch, or
  checkpoints the phase) and then stops.
  """
  log_every = settings.log_every_steps
  save_every = settings.checkpoint_every_steps if checkpoint is not None else 0
  progress = progress_bar(settings.progress)
  bar = progress(total=last - first, initial=0, desc=desc)
  window_t, window_n, window_metrics = time.time(), 0, []
  guard = guard or settings.divergence_guard()
  own = StopRequests() if checkpoint is not None and stop is None else contextlib.nullcontext()
  with own as entered:
    stop = stop or entered
    for step, batch in zip(range(first, last), batches):
      state, metrics = train_step(state, batch)
      window_n += batch.count
      window_metrics.append(metrics)
      done = step + 1
      stopping = stop is not None and stop.signal_name is not None
      if stopping and done == last and own is not stop:
        stopping = False  # the caller's stop: it ends the range itself (epoch evaluation, phase save)
      saving = stopping or (save_every and done % save_every == 0 and done < last)
      if done % log_every == 0 or done == last or saving:
        m = jax.device_get(window_metrics)
        check_finite(m, done)
        guard.update([float(np.asarray(x['ce'])[-1]) if 'ce' in x else float(x['loss']) for x in m], done)
        loss = float(np.mean([x['loss'] for x in m]))
        acc = np.mean([x['accuracy'] for x in m], axis=0)
        guard.last_accuracy = acc
        ips = window_n / max(time.time() - window_t, 1e-9)
        if writer is not None:
          writer.write(
            done, {'train/loss': loss, 'train/images_per_sec': ips, **per_level('train/accuracy', acc, levels)}
          )
        bar.set_postfix_str(f'loss {loss:.3f} acc ' + '/'.join(f'{a:.2f}' for a in acc) + f' {ips:.0f} img/s')
        window_t, window_n, window_metrics = time.time(), 0, []
      bar.update(1)
      if saving and checkpoint is not None:
        checkpoint(state)
      if stopping:
        bar.close()
        raise Preempted(done, stop.signal_name, saved=checkpoint is not None)
  bar.close()
  return state
