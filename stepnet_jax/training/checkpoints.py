"""Writing a run's checkpoints and its description (``config.json``); reading back a train state.

The layout is the one ``restore.py`` reads: items ``model`` (``restore.model_item``),
``train`` (optimizer state and step; absent from a final save of a multi-phase run)
and the JSON ``meta``.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from stepnet_jax import restore
from stepnet_jax.training.step import TrainState


def manager(workdir: str, keep: int = 2) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      restore.checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def save(mngr: ocp.CheckpointManager, step: int, params: nnx.State, batch_stats: nnx.State, meta: dict,
         state: TrainState | None = None) -> None:
  """Saves the model (and, given ``state``, its optimizer state and step) with ``meta``; blocks until written."""
  items = {'model': ocp.args.StandardSave(restore.model_item(params, batch_stats))}
  if state is not None:
    items['train'] = ocp.args.StandardSave({'opt_state': state.opt_state, 'step': state.step})
  mngr.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items))
  mngr.wait_until_finished()


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


def set_aside(workdir: str, steps) -> None:
  """Moves the checkpoints ``steps`` to ``WORKDIR/unreadable_checkpoints`` (first host only):
  kept for inspection, and out of the manager's way (it never writes a step below its newest)."""
  if jax.process_index() != 0:
    return
  target = os.path.join(workdir, 'unreadable_checkpoints')
  os.makedirs(target, exist_ok=True)
  for step in steps:
    os.replace(os.path.join(restore.checkpoint_dir(workdir), str(step)), os.path.join(target, str(step)))
    print(f'moved unreadable checkpoint {step} to {target}', flush=True)
