"""Writing a run's checkpoints and its description (``config.json``); reading back a train state.

The layout is the one ``inference/restore.py`` reads: items ``model`` (``restore.model_item``),
``train`` (optimizer state and step; absent from a final save of a multi-phase run)
and the JSON ``meta``.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from stepnet_jax.inference import restore
from stepnet_jax.training.step import TrainState

# The metric evaluate.py --best ranks checkpoints by: the top exit's accuracy on the
# validation split (``data.validation_examples``).
BEST_METRIC = 'validation_accuracy'
# What retention keeps the best checkpoint by (higher is better): the validation accuracy
# when the run has a split, else minus the top exit's smoothed training cross-entropy at the
# save, so a known-good checkpoint survives a collapse without a validation split too.
KEEP_SCORE = 'keep_score'


def save_metrics(validation_accuracy: float | None, smoothed_train_loss: float | None) -> dict[str, float] | None:
  """The metrics a save records: ``BEST_METRIC`` and ``KEEP_SCORE`` from the validation
  accuracy if there is one, else ``train_loss`` and ``KEEP_SCORE`` from the smoothed
  training loss; None when there is neither (kept only while recent)."""
  if validation_accuracy is not None:
    return {BEST_METRIC: float(validation_accuracy), KEEP_SCORE: float(validation_accuracy)}
  if smoothed_train_loss is not None:
    return {'train_loss': float(smoothed_train_loss), KEEP_SCORE: -float(smoothed_train_loss)}
  return None


def kept_best(mngr: ocp.CheckpointManager) -> str:
  """Which checkpoint retention keeps as the best, with what it was kept for, in words."""
  mngr.wait_until_finished()
  step = mngr.best_step()
  if step is None:
    return 'no checkpoint recorded a score; the newest ones are kept'
  m = mngr.metrics(step) or {}
  why = (
    f'validation accuracy {m[BEST_METRIC]:.2%}' if BEST_METRIC in m else f'smoothed training loss {m["train_loss"]:.4g}'
  )
  return f'kept: checkpoint {step} ({why}), the best so far (evaluate.py --step {step} evaluates it)'


class _NoMetricsNote(logging.Filter):
  """Drops orbax's warning for a save without metrics: mid-epoch checkpoints have no
  validation accuracy by design (they are kept while recent)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'did not provide metrics' not in record.getMessage()


logging.getLogger('absl').addFilter(_NoMetricsNote())


def manager(workdir: str, keep: int = 2) -> ocp.CheckpointManager:
  """Orbax manager of a run's checkpoints. Saves are asynchronous (training goes on while
  the bytes are written; a step directory gets its name only once complete). Retention
  keeps the ``keep`` newest and the best by ``KEEP_SCORE`` (saves without one, e.g.
  mid-epoch saves of a run with a validation split, are kept only while recent)."""
  if keep < 1:
    raise ValueError(f'keep_checkpoints must be >= 1 (0 would delete every checkpoint), got {keep}')
  # Checkpoints from before KEEP_SCORE ranked by their validation accuracy, if any.
  score = lambda metrics: metrics.get(KEEP_SCORE, metrics.get(BEST_METRIC, float('-inf')))
  retention = ocp.checkpoint_managers.AnyPreservationPolicy(
    [
      ocp.checkpoint_managers.LatestN(n=keep),
      ocp.checkpoint_managers.BestN(get_metric_fn=score, reverse=False, n=1, keep_checkpoints_without_metrics=False),
    ]
  )
  return ocp.CheckpointManager(
    restore.checkpoint_dir(workdir),
    options=ocp.CheckpointManagerOptions(
      best_fn=score, best_mode='max', preservation_policy=retention, enable_async_checkpointing=True, create=True
    ),
  )


def save(
  mngr: ocp.CheckpointManager,
  step: int,
  params: nnx.State,
  batch_stats: nnx.State,
  meta: dict,
  state: TrainState | None = None,
  metrics: dict[str, float] | None = None,
) -> None:
  """Starts saving the model (and, given ``state``, its optimizer state and step) with ``meta``
  and ``metrics`` (e.g. ``{BEST_METRIC: accuracy}``). Returns once the arrays are copied off the
  devices; ``mngr.wait_until_finished()`` waits for the files (the next save waits too)."""
  trees = {'model': restore.model_item(params, batch_stats)}
  if state is not None:
    trees['train'] = {'opt_state': state.opt_state, 'step': state.step}
  meta = {**meta, 'checksums': {name: restore.checksums(tree) for name, tree in trees.items()}}  # checked at restore
  items = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
  if not mngr.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items), metrics=metrics):
    raise RuntimeError(
      f'checkpoint {step} in {mngr.directory} was not written (orbax skips a step it already '
      'holds or one below its newest)'
    )


def save_final(
  workdir: str,
  keep: int,
  step: int,
  params: nnx.State,
  batch_stats: nnx.State,
  meta: dict,
  state: TrainState | None = None,
) -> None:
  """A checkpoint written before returning: model-only for a finished run, or with the
  optimizer state of ``state`` (a phase boundary that continues with it)."""
  mngr = manager(workdir, keep)
  save(mngr, step, params, batch_stats, meta, state)
  mngr.wait_until_finished()
  mngr.close()


def restore_state(workdir: str, state: TrainState, step: int) -> TrainState:
  """The train state of checkpoint ``step``, shaped like ``state`` (whose buffers are refilled)."""
  restore.restore_model_item(workdir, state.params, state.batch_stats, step)
  t = restore.restore_item(workdir, 'train', {'opt_state': state.opt_state, 'step': state.step}, step)
  return TrainState(jnp.asarray(t['step'], jnp.int32), state.params, state.batch_stats, t['opt_state'])


def write_description(workdir: str, meta: dict) -> None:
  """``config.json``: the run's config, model structure and dataset, for people and tools
  (written by the first host only)."""
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(meta, f, indent=2)


def set_aside(workdir: str, steps, into: str | None = None) -> None:
  """Moves the checkpoints ``steps`` to ``WORKDIR/unreadable_checkpoints`` (or ``into``; first
  host only): kept for inspection, and out of the manager's way (it never writes a step
  below its newest)."""
  if jax.process_index() != 0:
    return
  target = into or os.path.join(workdir, 'unreadable_checkpoints')
  os.makedirs(target, exist_ok=True)
  for step in steps:
    name, copy = str(step), 1
    while os.path.exists(os.path.join(target, name)):  # set aside before (a second --restore_previous)
      name, copy = f'{step}.{copy}', copy + 1
    os.replace(os.path.join(restore.checkpoint_dir(workdir), str(step)), os.path.join(target, name))
    print(f'moved unreadable checkpoint {step} to {os.path.join(target, name)}', flush=True)
