"""A run in a workdir: resumable joint training (``train_and_evaluate``), the shared start
and end of multi-phase runs (``PhasedRun``: construction, non-uniform), and the one check
of whether a workdir's run may be continued or reused under a config (``check_workdir``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
import optax
from flax import nnx

from stepnet_jax import config as config_lib
from stepnet_jax.config import Config, SettingsError
from stepnet_jax.core import stepping
from stepnet_jax.core.model import SteppingModel
from stepnet_jax.data import datasets, feed, sharding
from stepnet_jax.inference import evaluation, restore
from stepnet_jax.models import structure, zoo
from stepnet_jax.training import checkpoints, loop, losses, optim
from stepnet_jax.training import step as step_lib

# Settings a resumed joint run may change: more epochs continue training.
RESUMABLE_KEYS = ('train.num_epochs',)


class WorkdirBusy(RuntimeError):
  """Another process is training in the workdir."""


@contextlib.contextmanager
def lock_workdir(workdir: str) -> Iterator[None]:
  """Holds an exclusive lock on the workdir while a run trains in it: a second process
  (another ``train.py`` on the same directory) is refused instead of interleaving
  checkpoints. The lock is ``flock`` on the directory itself, so nothing is written into it
  and the kernel releases it when the process ends, however it ends; a directory created
  for the lock is removed again if the run stops before writing into it. The first host
  locks; the others share its directory or have their own."""
  if jax.process_index() != 0:
    yield
    return
  created = not os.path.isdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  fd, locked = os.open(workdir, os.O_RDONLY), False
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      locked = True
    except BlockingIOError:
      raise WorkdirBusy(
        f'another process is training in {workdir} (it holds the workdir lock); wait for it to '
        'finish or stop it, or use another --workdir'
      ) from None
    except OSError as e:  # e.g. a network filesystem without flock on directories
      print(f'warning: cannot lock {workdir} ({e}); nothing stops a second trainer there', flush=True)
    claim_workdir(workdir)
    yield
  finally:
    if created and locked and os.listdir(workdir) == [restore.RUN_MARKER]:  # stopped before training: no trace
      os.remove(os.path.join(workdir, restore.RUN_MARKER))
      os.rmdir(workdir)
    os.close(fd)  # closing releases the lock


def claim_workdir(workdir: str) -> None:
  """Makes ``workdir`` recognisably a run before anything else is written into it: an empty
  folder gets the run marker (``restore.RUN_MARKER``); a run's folder (the marker, or a run
  written before it) is kept as it is; any other folder is refused, naming what it holds,
  so a user's own files are never overwritten or deleted."""
  marker = os.path.join(workdir, restore.RUN_MARKER)
  if os.path.isfile(marker):
    return
  held = sorted(os.listdir(workdir))
  if held and not restore.is_run(workdir):
    shown = ', '.join(held[:8]) + (f' and {len(held) - 8} more' if len(held) > 8 else '')
    raise SettingsError(
      f'{workdir} is not empty and is not a stepnet_jax run (no {restore.RUN_MARKER}): it holds {shown}. '
      'Nothing was written; use a new or empty --workdir'
    )
  with open(marker, 'w') as f:
    json.dump({'stepnet_jax_run': 1, 'note': 'this folder is a stepnet_jax training run'}, f)


def prepare_splits(
  cfg: Config, dataset: datasets.Dataset | None = None
) -> tuple[datasets.Dataset, tuple[np.ndarray, np.ndarray] | None, int]:
  """The config's dataset (loaded unless given), subset as configured, without its validation
  examples; those examples ((images, labels), or None without ``datasets.validation_examples``);
  and steps per epoch. The global batch must split over the devices (checked first: before
  loading or compiling anything)."""
  sharding.check_batch_size(cfg.train.batch_size)
  if dataset is None:
    dataset = datasets.load_for(cfg.data)  # loaded and padded to data.pad_to
  dataset = datasets.subset(dataset, cfg.data.train_subset, cfg.data.test_subset, cfg.seed)
  validation = None
  if cfg.data.validation_examples:
    whole = dataset
    dataset, held = datasets.split_validation(whole, cfg.data.validation_examples, cfg.seed)
    validation = whole.train_images[held], whole.train_labels[held]
  steps_per_epoch = len(dataset.train_labels) // cfg.train.batch_size
  if steps_per_epoch == 0:
    raise SettingsError(f'batch_size {cfg.train.batch_size} exceeds the {len(dataset.train_labels)} training images')
  return dataset, validation, steps_per_epoch


def prepare_data(cfg: Config, dataset: datasets.Dataset | None = None) -> tuple[datasets.Dataset, int]:
  """``prepare_splits`` without the validation examples: (training data, steps per epoch)."""
  dataset, _, steps_per_epoch = prepare_splits(cfg, dataset)
  return dataset, steps_per_epoch


def build_model(cfg: Config, dataset: datasets.Dataset) -> SteppingModel:
  """The config's model for the dataset's images and classes, normalised by its statistics."""
  mean, std = dataset.channel_stats()
  m = cfg.model
  return zoo.build_model(
    m.name,
    num_classes=dataset.num_classes,
    input_shape=dataset.input_shape,
    num_levels=m.num_levels,
    width=m.width,
    level_widths=m.level_widths or None,
    assignment=m.assignment_dict(),
    triangular=m.triangular,
    mask_rule=m.mask_rule,
    switchable_bn=m.switchable_bn(),
    exit_heads=m.exit_heads,
    mean=mean,
    std=std,
    init=m.init,
    seed=cfg.seed,
  )


def run_meta(cfg: Config, model_meta: dict, dataset: datasets.Dataset, steps_per_epoch: int) -> dict:
  """The checkpoint meta and ``config.json`` of a run."""
  return {
    'config': cfg.to_dict(),
    'model_meta': model_meta,
    'dataset': dataset.name,
    'steps_per_epoch': steps_per_epoch,
  }


def check_workdir(
  workdir: str, cfg: Config, *, may_change: Sequence[str] = (), model_meta: dict | None = None, step: int | None = None
) -> dict | None:
  """The meta of the run left in ``workdir`` if ``cfg`` may continue or reuse it; None if none is there.

  Its saved config must equal ``cfg`` (reporting keys aside; configs saved by older
  versions are converted) except the dotted keys ``may_change``, and, given
  ``model_meta``, it must hold that model. Otherwise ValueError naming what differs;
  nothing in the workdir is touched.
  """
  if restore.latest_step(workdir) is None:
    return None
  saved = restore.restore_meta(workdir, step)
  differ = [k for k in config_lib.differing_keys(saved['config'], cfg) if k not in may_change]
  if differ:
    raise SettingsError(
      f'{workdir} holds a run with other settings ({", ".join(differ)}); use a new --workdir or delete it'
    )
  if model_meta is not None and not structure.same_model(saved['model_meta'], model_meta):
    raise SettingsError(f'{workdir} holds a checkpoint of a different model; use a new --workdir')
  return saved


def config_train_step(
  graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: Config, objective: losses.Objective | None = None
):
  """``step.make_train_step`` with the config's objective (unless given), seed and augmentation."""
  return step_lib.make_train_step(
    graphdef, tx, objective or losses.objective_for(cfg), seed=cfg.seed, augment_images=cfg.data.augment
  )


def training_batches(
  cfg: Config, dataset: datasets.Dataset, first: int, last: int, steps_per_epoch: int
) -> Iterator[feed.Batch]:
  """The run's batches of global steps ``[first, last)``: ``feed.training_batches`` with the
  config's batch size and seed."""
  return feed.training_batches(
    dataset.train_images, dataset.train_labels, cfg.train.batch_size, cfg.seed, first, last, steps_per_epoch
  )


def exit_evaluator(
  graphdef: nnx.GraphDef, dataset: datasets.Dataset, cfg: Config, split: tuple[np.ndarray, np.ndarray] | None = None
) -> Callable[..., np.ndarray]:
  """``variables -> [K]`` accuracy of every exit on the test split (or on ``split``: images,
  labels), the exits compiled once."""
  exits = stepping.jitted_exits(graphdef)
  images, labels = split if split is not None else (dataset.test_images, dataset.test_labels)
  return lambda variables: evaluation.exit_accuracy(exits, variables, images, labels, cfg.train.eval_batch_size)


def train_and_evaluate(
  cfg: Config, workdir: str, dataset: datasets.Dataset | None = None, *, restore_previous: bool = False
) -> dict:
  """Trains ``cfg`` in ``workdir`` (resuming from its last checkpoint) and evaluates every exit.

  A resumed run must have the same settings, except ``train.num_epochs`` (raising it
  trains on; the schedule then spans the new length). An unreadable newest checkpoint is
  an error naming it (``restore.CheckpointError``); with ``restore_previous`` the run
  resumes from the newest readable one instead, and the unreadable ones are moved to
  ``WORKDIR/unreadable_checkpoints`` (kept, out of the checkpoint manager's way). Returns
  a dict with the final per-level test accuracy, the step, and ``seconds``: the training
  time of all sessions of the run (saved with every checkpoint).
  """
  dataset, validation, steps_per_epoch = prepare_splits(cfg, dataset)
  model = build_model(cfg, dataset)
  meta = run_meta(cfg, structure.model_meta(model, cfg.model.name, dataset.num_classes), dataset, steps_per_epoch)
  tx = optim.make_optimizer(cfg, steps_per_epoch)
  graphdef, state = step_lib.init_state(model, tx)
  saved, start, unreadable = None, None, []
  for step in restore.all_steps(workdir):
    try:
      saved = check_workdir(workdir, cfg, may_change=RESUMABLE_KEYS, model_meta=meta['model_meta'], step=step)
      state = checkpoints.restore_state(workdir, state, step)
      start = step
      break
    except restore.CheckpointError as e:
      if not restore_previous:
        raise
      print(f'{e}\n-> trying the previous checkpoint', flush=True)
      unreadable.append(step)
  total = steps_per_epoch * cfg.train.num_epochs
  if start is not None and start > total:
    raise SettingsError(
      f'{workdir} holds a run trained to step {start} ({start / steps_per_epoch:g} epochs); '
      f'train.num_epochs={cfg.train.num_epochs} ends at step {total}. Ask for at least '
      f'{-(-start // steps_per_epoch)} epochs (more trains on), or use another --workdir'
    )
  sharding.barrier(f'checked {workdir}')
  os.makedirs(workdir, exist_ok=True)
  if unreadable:
    checkpoints.set_aside(workdir, unreadable)
    sharding.barrier(f'set aside in {workdir}')
  prior_seconds = 0.0
  if saved is not None:
    prior_seconds = float(saved.get('train_seconds', 0.0))
    print(f'Resuming from step {start} of {total} in {workdir}', flush=True)
  elif unreadable:
    print(f'no readable checkpoint in {workdir}: starting over', flush=True)
  checkpoints.write_description(workdir, meta)
  return _train_epochs(cfg, workdir, dataset, steps_per_epoch, graphdef, tx, state, meta, prior_seconds, validation)


def _train_epochs(
  cfg: Config,
  workdir: str,
  dataset: datasets.Dataset,
  steps_per_epoch: int,
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  state: step_lib.TrainState,
  meta: dict,
  prior_seconds: float,
  validation: tuple[np.ndarray, np.ndarray] | None,
) -> dict:
  """The epochs left to train: train, evaluate every exit on the test split (and the top exit's
  validation accuracy), checkpoint. Retention keeps the newest checkpoints and the best one,
  by validation accuracy or, without a split, by the smoothed training loss at the save
  (``checkpoints.save_metrics``), so a run that collapses keeps a known-good checkpoint."""
  train_step = config_train_step(graphdef, tx, cfg)
  evaluate = exit_evaluator(graphdef, dataset, cfg)
  evaluate_validation = exit_evaluator(graphdef, dataset, cfg, split=validation) if validation is not None else None
  mngr = checkpoints.manager(workdir, cfg.train.keep_checkpoints)
  writer = loop.MetricWriter(workdir)
  t_start, step, test_acc = time.time(), int(state.step), None
  first_step = step
  epochs = cfg.train.num_epochs
  settings = loop.LoopSettings.from_config(cfg, dataset.num_classes)
  guard = settings.divergence_guard()  # one for all epochs

  def save(state: step_lib.TrainState, validation_accuracy: float | None = None) -> None:
    # Without a split every save is ranked by the smoothed training loss (mid-epoch ones too).
    smoothed = guard.average if validation is None else None
    metrics = checkpoints.save_metrics(validation_accuracy, smoothed)
    checkpoints.save(
      mngr,
      int(state.step),
      state.params,
      state.batch_stats,
      {**meta, 'train_seconds': prior_seconds + time.time() - t_start},
      state,
      metrics,
    )

  with loop.StopRequests() as stop:  # SIGTERM / Ctrl-C during an epoch's evaluation too
    try:
      for epoch in range(step // steps_per_epoch, epochs):
        last = (epoch + 1) * steps_per_epoch
        state = loop.run_steps(
          state,
          train_step,
          training_batches(cfg, dataset, step, last, steps_per_epoch),
          settings,
          first=step,
          last=last,
          writer=writer,
          desc=f'epoch {epoch + 1}/{epochs}',
          checkpoint=save,
          guard=guard,
          stop=stop,
        )
        step = int(state.step)
        variables = nnx.merge_state(state.params, state.batch_stats)
        test_acc = evaluate(variables)
        scalars, top_validation = {'epoch': epoch + 1, **loop.per_level('test/accuracy', test_acc)}, None
        if evaluate_validation:
          val_acc = evaluate_validation(variables)
          scalars.update(loop.per_level('validation/accuracy', val_acc))
          top_validation = float(val_acc[-1])
        writer.write(step, scalars)
        line = f'epoch {epoch + 1}: test accuracy per level {_per_level(test_acc)}'
        if evaluate_validation:  # a held-out run is judged by these: they come first
          line = f'epoch {epoch + 1}: validation accuracy per level {_per_level(val_acc)}; test {_per_level(test_acc)}'
        print(line, flush=True)
        save(state, top_validation)
        if stop.signal_name is not None and epoch + 1 < epochs:
          raise loop.Preempted(step, stop.signal_name)
    except loop.Diverged as diverged:  # say truthfully which checkpoint is kept
      raise loop.Diverged(f'{diverged} {checkpoints.kept_best(mngr)}') from None
    finally:
      mngr.wait_until_finished()  # nothing is left half-written by an exception either
      mngr.close()
  writer.close()
  if test_acc is None:  # nothing left to train: report the restored state
    test_acc = evaluate(nnx.merge_state(state.params, state.batch_stats))
  result = {
    'step': step,
    'test_accuracy': [float(a) for a in test_acc],
    'seconds': prior_seconds + time.time() - t_start,
    'levels': cfg.model.num_levels,
  }
  if step - first_step >= loop.JUDGE_AFTER_STEPS:  # shorter: it may not have learned yet
    if evaluate_validation is not None:
      result['final_top_accuracy'] = {'accuracy': float(val_acc[-1]), 'measured_on': 'validation'}
    elif guard.last_accuracy is not None:
      result['final_top_accuracy'] = {
        'accuracy': float(guard.last_accuracy[-1]),
        'measured_on': "training (last logged window's)",
      }
  if 'final_top_accuracy' in result:
    result['final_top_accuracy']['num_classes'] = dataset.num_classes
  return result


def _per_level(accuracy) -> str:
  """Accuracies per level as the progress lines print them: '0.9012 0.9123 ...'."""
  return ' '.join(f'{float(a):.4f}' for a in accuracy)


def check_learned(result: dict, cfg: Config) -> None:
  """``loop.NotLearned`` if a run's result (``train_and_evaluate``'s) ended with its top exit
  at chance (``loop.check_learned``): what ``train.py`` ends on with status 1. Studies do
  not judge (their quick smoke networks need not learn)."""
  final = result.get('final_top_accuracy')
  if final is not None:
    loop.check_learned(final['accuracy'], final['measured_on'], final['num_classes'], cfg.optim.learning_rate)


def phase_dir(workdir: str) -> str:
  """Where a run trained in phases keeps its phase-boundary checkpoints: a workdir of its own
  (``WORKDIR/phases/checkpoints/N`` for the N-th phase end; the global step is in the meta,
  ``phase_step``)."""
  return os.path.join(workdir, 'phases')


def within_phase_dir(workdir: str) -> str:
  """Where a run trained in phases keeps the checkpoints it saves inside a phase (every
  ``train.checkpoint_every_steps`` and at SIGTERM / Ctrl-C), so that a long phase (a
  construction's fine-tuning is most of its run) is not trained again from its start:
  ``WORKDIR/phases/within``, emptied at every phase checkpoint and removed with the phase
  checkpoints at the end."""
  return os.path.join(phase_dir(workdir), 'within')


def _remove_dir(path: str) -> None:
  """Removes ``path`` as one step: renamed first, so that an interrupted removal leaves no
  half-deleted checkpoint where a reader looks (first host only)."""
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  doomed = f'{path}.removing'
  shutil.rmtree(doomed, ignore_errors=True)
  os.replace(path, doomed)
  shutil.rmtree(doomed, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class Progress:
  """Where a run left off: its global ``step`` of ``total_steps``, at a checkpoint in its
  workdir, (``at_phase_boundary``) at a phase checkpoint of a run trained in phases, or
  (``in_phase``) at a checkpoint such a run saved inside a phase."""

  step: int
  total_steps: int
  at_phase_boundary: bool = False
  in_phase: bool = False

  def __str__(self) -> str:
    if self.in_phase:
      return f'inside a phase at step {self.step} of {self.total_steps}'
    return f'at {"the phase boundary of " if self.at_phase_boundary else ""}step {self.step} of {self.total_steps}'


def progress_left(workdir: str, cfg: Config) -> Progress | None:
  """Where a run of ``cfg`` left off in ``workdir`` (its newest checkpoint, else, for a run
  trained in phases, its newest checkpoint inside a phase or its last phase boundary), or
  None when nothing is there; a run of other settings raises as ``check_workdir`` does."""
  saved = check_workdir(workdir, cfg)
  if saved is not None:
    return Progress(restore.latest_step(workdir), int(saved['steps_per_epoch']) * cfg.train.num_epochs)
  phase, within = check_workdir(phase_dir(workdir), cfg), check_workdir(within_phase_dir(workdir), cfg)
  boundary = int(phase['phase_step']) if phase is not None else None
  if within is not None:  # one left from before the last phase checkpoint is passed by, as the run does
    step = restore.latest_step(within_phase_dir(workdir))
    if boundary is None or step > boundary:
      return Progress(step, int(within['steps_per_epoch']) * cfg.train.num_epochs, in_phase=True)
  if phase is not None:
    return Progress(boundary, int(phase['steps_per_epoch']) * cfg.train.num_epochs, at_phase_boundary=True)
  return None


@dataclasses.dataclass
class PhasedRun:
  """The shared start and end of a method trained in phases whose structure changes
  between them (construction, non-uniform).

  Use it as a context manager (``with PhasedRun.open(...) as run:``: see ``__enter__``).
  A finished run (its final checkpoint and ``result_name`` written) is reused: ``open``
  sets ``finished`` to its result. Otherwise call ``resume`` (a method that saves phase
  checkpoints), else ``begin`` once every check has passed (nothing is written before);
  then ``train`` per phase (``save_phase`` after each, if the method resumes), and
  ``finish`` at the end, which saves a standard checkpoint that ``stepnet_jax.load`` and
  ``evaluate.py`` read. Inside a phase the train state is checkpointed every
  ``train.checkpoint_every_steps`` and at SIGTERM / Ctrl-C (``within_phase_dir``): a phase
  interrupted mid-way goes on from there once the method, resumed at the phase's start,
  trains it again (``train``), with the result of an uninterrupted run (data order and
  random keys depend only on the seed and the global step). A checkpoint inside a phase the
  run does not go on from (one left from an earlier phase) is removed when the next phase
  starts.
  """

  cfg: Config
  workdir: str
  dataset: datasets.Dataset
  steps_per_epoch: int
  result_name: str
  finished: dict | None = None
  writer: loop.MetricWriter | None = None
  started: float = 0.0
  stop: loop.StopRequests = dataclasses.field(default_factory=loop.StopRequests)
  phases_saved: int = 0  # phase checkpoints are numbered 1, 2, ... (two phases may end at one step)

  def __enter__(self) -> PhasedRun:
    """SIGTERM / Ctrl-C are recorded for the whole run (between phases too) and stop it at the
    next step or phase checkpoint (``loop.Preempted``)."""
    self.stop.__enter__()
    return self

  def __exit__(self, *exc) -> None:
    self.stop.__exit__(*exc)

  @classmethod
  def open(cls, cfg: Config, workdir: str, dataset: datasets.Dataset | None, result_name: str) -> PhasedRun:
    """Prepares the data and checks the workdir; a finished run of these settings sets ``finished``."""
    dataset, steps_per_epoch = prepare_data(cfg, dataset)
    run = cls(cfg, workdir, dataset, steps_per_epoch, result_name)
    saved = check_workdir(workdir, cfg)
    check_workdir(phase_dir(workdir), cfg)  # other settings: refused before anything runs
    run._left_inside()
    sharding.barrier(f'checked {workdir}')
    if saved is not None:
      path = os.path.join(workdir, result_name)
      if not os.path.exists(path):
        raise SettingsError(
          f'{workdir} holds the final checkpoint of a run of these settings that stopped before '
          f'writing {result_name}; delete {workdir} to run it again'
        )
      with open(path) as f:
        run.finished = json.load(f)
      print(f'{workdir}: finished run found, not retraining', flush=True)
    return run

  @property
  def total_steps(self) -> int:
    """Steps of the whole run: ``train.num_epochs`` x steps per epoch."""
    return self.cfg.train.num_epochs * self.steps_per_epoch

  def begin(self) -> None:
    """Starts the clock and the metric files (anew, unless the first phase left a checkpoint
    inside it to go on from)."""
    os.makedirs(self.workdir, exist_ok=True)
    left = self._left_inside()
    self.writer = loop.MetricWriter(self.workdir, fresh=left is None or left['phases_saved'] != 0)
    self.started = time.time()

  def _left_inside(self) -> dict | None:
    """The meta of the checkpoint left inside a phase, or None; an unreadable one (a save cut
    short) is set aside in ``WORKDIR/unreadable_checkpoints`` (``checkpoints.set_aside``,
    which says so): the phase then goes on from an older one, or from its start."""
    for _ in restore.all_steps(self.within_dir):  # at most one set aside per step held
      try:
        return check_workdir(self.within_dir, self.cfg)
      except restore.CheckpointError as e:
        print(f'{self.within_dir}: an unreadable checkpoint inside a phase ({e})', flush=True)
        into = os.path.join(self.workdir, 'unreadable_checkpoints')
        checkpoints.set_aside(self.within_dir, [restore.latest_step(self.within_dir)], into=into)
        sharding.barrier(f'set aside in {self.within_dir}')
    return check_workdir(self.within_dir, self.cfg)  # None once all are set aside; else it says why

  @property
  def phase_dir(self) -> str:
    """Where this run's phase-boundary checkpoints go (``phase_dir``)."""
    return phase_dir(self.workdir)

  @property
  def within_dir(self) -> str:
    """Where this run's checkpoints inside a phase go (``within_phase_dir``)."""
    return within_phase_dir(self.workdir)

  def save_phase(
    self,
    step: int,
    model: SteppingModel | None,
    model_meta: dict,
    progress: dict,
    state: step_lib.TrainState | None = None,
  ) -> None:
    """Checkpoints the end of a phase at global ``step``: the model with its structure, the
    method's JSON ``progress`` (what it needs to go on), the training time so far and, for a
    method whose next phase goes on with the same optimizer, its ``state`` (``restore_state``;
    ``model`` may then be None); otherwise the next phase starts with fresh optimizer moments
    and needs nothing else."""
    if state is not None:
      params, stats = state.params, state.batch_stats
    else:
      _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    meta = {
      **run_meta(self.cfg, model_meta, self.dataset, self.steps_per_epoch),
      'progress': progress,
      'phase_step': step,
      'train_seconds': time.time() - self.started,
    }
    self.phases_saved += 1
    checkpoints.save_final(self.phase_dir, 1, self.phases_saved, params, stats, meta, state)
    _remove_dir(self.within_dir)  # the phase they were inside is done
    sharding.barrier(f'phase {self.phases_saved} saved in {self.phase_dir}')
    if self.stop.signal_name is not None:
      raise loop.Preempted(step, self.stop.signal_name)

  def resume(self) -> tuple[int, SteppingModel, dict, dict] | None:
    """(step, model, model_meta, progress) of the last phase boundary an interrupted run of these
    settings saved (its metric files continue, its clock goes on), or None: call ``begin``.
    A phase checkpoint of other settings is refused like a workdir of another config."""
    saved = check_workdir(self.phase_dir, self.cfg)
    if saved is None:
      return None
    self.phases_saved = restore.latest_step(self.phase_dir)
    model, meta = restore.load_variables(self.phase_dir, self.phases_saved, apply_precision=False)
    step = int(saved['phase_step'])
    self.writer = loop.MetricWriter(self.workdir)
    self.started = time.time() - float(saved['train_seconds'])
    print(f'{self.workdir}: resuming from the phase checkpoint at step {step}', flush=True)
    return step, model, meta['model_meta'], saved['progress']

  def restore_state(self, state: step_lib.TrainState) -> step_lib.TrainState:
    """The train state saved with the phase checkpoint ``resume`` went on from, shaped like ``state``."""
    return checkpoints.restore_state(self.phase_dir, state, self.phases_saved)

  def train(
    self,
    model: SteppingModel,
    first: int,
    last: int,
    desc: str,
    *,
    cfg: Config | None = None,
    objective: losses.Objective | None = None,
    levels: Sequence[int] | None = None,
  ) -> SteppingModel:
    """Trains ``model`` for global steps ``[first, last)`` with fresh optimizer moments; the
    learning rate follows the schedule at the global step. ``cfg`` overrides the run's for this
    phase, ``objective`` its objective (``levels``: the exits the objective reports)."""
    cfg = cfg or self.cfg
    tx = optim.make_optimizer(cfg, self.steps_per_epoch, step_offset=first)
    graphdef, state = step_lib.init_state(model, tx, first)
    model_meta = structure.model_meta(model, self.cfg.model.name, self.dataset.num_classes)
    train_step = config_train_step(graphdef, tx, cfg, objective)
    state = self.run_steps(state, train_step, first, last, desc, model_meta, levels, cfg)
    return nnx.merge(graphdef, state.params, state.batch_stats)

  def run_steps(
    self,
    state: step_lib.TrainState,
    train_step,
    first: int,
    last: int,
    desc: str,
    model_meta: dict,
    levels: Sequence[int] | None = None,
    cfg: Config | None = None,
  ) -> step_lib.TrainState:
    """``loop.run_steps`` of the phase ``[first, last)`` on this run's data and metric files,
    with its config (or ``cfg``), checkpointing inside the phase (``within_phase_dir``) and
    going on from such a checkpoint of this phase (the same bounds after the same phase
    end), if one is there; ``model_meta`` is the phase's model structure."""
    cfg = cfg or self.cfg
    phase = {'phase_first': first, 'phase_last': last, 'phases_saved': self.phases_saved}
    saved, start = self._left_inside(), first
    if saved is not None and any(saved.get(k) != v for k, v in phase.items()):
      _remove_dir(self.within_dir)  # left from another phase: its steps would block this phase's saves
      sharding.barrier(f'removed {self.within_dir}')
      saved = None
    if saved is not None:
      if not structure.same_model(saved['model_meta'], model_meta):
        raise SettingsError(f'{self.within_dir} holds a checkpoint of this phase with another model; delete it')
      start = restore.latest_step(self.within_dir)
      state = checkpoints.restore_state(self.within_dir, state, start)
      self.started = time.time() - float(saved['train_seconds'])
      print(f'{self.workdir}: going on inside the phase ({desc}) from step {start}', flush=True)
    meta = {**run_meta(self.cfg, model_meta, self.dataset, self.steps_per_epoch), **phase}
    mngr = checkpoints.manager(self.within_dir, keep=1)
    settings = loop.LoopSettings.from_config(cfg, self.dataset.num_classes)
    if not settings.checkpoint_every_steps:  # as a joint run: at least at every epoch's end
      settings = dataclasses.replace(settings, checkpoint_every_steps=self.steps_per_epoch)

    def save(state: step_lib.TrainState) -> None:
      checkpoints.save(
        mngr,
        int(state.step),
        state.params,
        state.batch_stats,
        {**meta, 'train_seconds': time.time() - self.started},
        state,
      )

    try:
      return loop.run_steps(
        state,
        train_step,
        training_batches(cfg, self.dataset, start, last, self.steps_per_epoch),
        settings,
        first=start,
        last=last,
        writer=self.writer,
        desc=desc,
        levels=levels,
        checkpoint=save,
        stop=self.stop,
      )
    finally:
      mngr.wait_until_finished()
      mngr.close()

  def finish(self, model: SteppingModel, model_meta: dict, label: str, extra: dict) -> dict:
    """Evaluates every exit, saves the final checkpoint and ``result_name``; returns the result:
    ``test_accuracy``, ``level_macs``, ``seconds`` and ``extra``."""
    cfg, step = self.cfg, self.total_steps
    graphdef, variables = nnx.split(model)
    test_acc = exit_evaluator(graphdef, self.dataset, cfg)(variables)
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    meta = run_meta(cfg, model_meta, self.dataset, self.steps_per_epoch)
    checkpoints.save_final(self.workdir, cfg.train.keep_checkpoints, step, params, stats, meta)
    checkpoints.write_description(self.workdir, meta)
    self.writer.write(step, loop.per_level('test/accuracy', test_acc))
    self.writer.close()
    seconds = time.time() - self.started
    level_macs = [int(m) for m in np.cumsum(model.delta_macs().sum(0))]
    result = {'test_accuracy': [float(a) for a in test_acc], 'level_macs': level_macs, 'seconds': seconds, **extra}
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, self.result_name), 'w') as f:
        json.dump(result, f, indent=2)
      _remove_dir(self.phase_dir)  # the final checkpoint supersedes them
    print(
      f'{label} done: test accuracy per level {_per_level(test_acc)}, MACs '
      + ' '.join(f'{m / 1e6:.3f}M' for m in level_macs)
      + f', {seconds:.0f} s',
      flush=True,
    )
    return result
