"""Reading a run's checkpoints: its recorded structure, its meta and its trained variables.

A checkpoint (``WORKDIR/checkpoints/STEP``, written by ``training/checkpoints.py``)
holds the item ``model`` (parameters and batch statistics as plain nested dicts, see
``model_item``), for a training run also ``train`` (optimizer state and step), and
``meta``: JSON with everything needed to rebuild the model's structure (``model_meta``:
architecture, level assignment, normalisation, and for a quantized run its ``precision``,
see ``quantized.Precision``) and the run's config. Inference needs
only this module; nothing here writes.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from stepnet_jax.core.model import SteppingModel
from stepnet_jax.data import sharding
from stepnet_jax.models import quantized
from stepnet_jax.models.structure import build_from_meta


class NoCheckpoint(FileNotFoundError):
  """A workdir that holds no checkpoint (nothing trained there yet)."""


class CheckpointError(ValueError):
  """A checkpoint that exists but cannot be read (truncated, corrupted, incompatible)."""


# What a run writes in its workdir: a folder named here, or a file named here, belongs to the
# run (``training/``), and nothing else may write inside it.
RUN_MARKER = 'stepnet_run.json'  # written first into a new workdir: "this folder is a run"
RUN_FOLDERS = ('checkpoints', 'phases', 'tensorboard', 'unreadable_checkpoints')
RUN_FILES = (RUN_MARKER, 'config.json', 'metrics.jsonl')


def is_run(directory: str) -> bool:
  """Whether ``directory`` is a run's workdir: it holds the run marker, or (runs written
  before the marker) a ``checkpoints`` or ``phases`` folder."""
  return os.path.isfile(os.path.join(directory, RUN_MARKER)) or any(
    os.path.isdir(os.path.join(directory, name)) for name in ('checkpoints', 'phases')
  )


def check_output_path(path: str) -> None:
  """ValueError if writing ``path`` would write into a run: inside one of its folders
  (``WORKDIR/checkpoints/...``), or over one of its files (``WORKDIR/config.json``)."""
  path = os.path.abspath(path)
  child, parent = path, os.path.dirname(path)
  while parent != child:
    name = os.path.basename(child)
    owned = name in RUN_FOLDERS or (child == path and name in RUN_FILES)
    if owned and is_run(parent):
      raise ValueError(f'{path} is inside the run {parent} ({name} belongs to it): write it somewhere else')
    child, parent = parent, os.path.dirname(parent)


def checkpoint_dir(workdir: str) -> str:
  """The folder of a workdir's checkpoints (absolute)."""
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


# Where a finished save keeps its metrics (orbax's ``CheckpointManager.save(metrics=...)``), in its step folder.
METRICS_FILE = os.path.join('metrics', 'metrics')


def all_steps(workdir: str) -> list[int]:
  """Every checkpoint's step, newest first. Read from the directory listing: orbax gives a
  step directory its name only once the save is complete, and a listing does not fail when
  a trainer beside the reader deletes old steps meanwhile (a manager's scan can)."""
  try:
    names = os.listdir(checkpoint_dir(workdir))
  except FileNotFoundError:
    return []
  return sorted((int(name) for name in names if name.isdigit()), reverse=True)


def latest_step(workdir: str) -> int | None:
  """The newest checkpoint's step, or None when the workdir holds none."""
  steps = all_steps(workdir)
  return steps[0] if steps else None


def best_step(workdir: str, metric: str = 'validation_accuracy') -> int | None:
  """The step of the checkpoint with the highest ``metric`` (recorded by runs with a
  validation split, ``data.validation_examples``), or None when no checkpoint has it.

  Reads each listed step's own metrics file (``METRICS_FILE``)
  rather than scanning with a manager, so a trainer deleting old steps beside this reader
  only removes candidates, never fails the call."""
  scored = []
  for step in all_steps(workdir):
    path = os.path.join(checkpoint_dir(workdir), str(step), METRICS_FILE)
    try:
      with open(path) as f:
        score = json.load(f).get(metric)
    except (OSError, ValueError):  # deleted meanwhile, or cut short: not a candidate
      continue
    if score is not None:
      scored.append((score, step))
  return max(scored)[1] if scored else None  # ties: the later step


def _read(workdir: str, step: int, args: ocp.args.Composite) -> Any:
  """Checkpoint ``step`` of ``workdir`` read with ``args``; any failure is a ``CheckpointError`` naming its path."""
  path = os.path.join(checkpoint_dir(workdir), str(step))
  try:  # the step's directory alone: a manager would scan every step, which a trainer may be deleting
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
      return checkpointer.restore(path, args=args)
  except Exception as e:  # orbax raises many kinds for a damaged checkpoint
    raise CheckpointError(
      f'checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:300]}); it may be '
      'truncated or corrupted. Nothing was deleted; train.py --restore_previous resumes from '
      'the newest readable checkpoint instead'
    ) from e


def _step(workdir: str, step: int | None) -> int:
  if step is None:
    step = latest_step(workdir)
  if step is None:
    raise NoCheckpoint(
      f'no checkpoint in {checkpoint_dir(workdir)}; train first with '
      f'python train.py --config configs/NAME.py --workdir {workdir}'
    )
  return step


def restore_meta(workdir: str, step: int | None = None) -> dict:
  """The JSON meta of the latest (or given) checkpoint. Meta that is valid JSON but lacks what
  every checkpoint records (``config``, ``model_meta``) is a ``CheckpointError`` like
  unreadable bytes, so readers and ``--restore_previous`` treat it alike."""
  step = _step(workdir, step)
  meta = _read(workdir, step, ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  missing = [k for k in ('config', 'model_meta') if not isinstance((meta or {}).get(k), dict)]
  if not isinstance(meta, dict) or missing:
    path = os.path.join(checkpoint_dir(workdir), str(step))
    raise CheckpointError(
      f'checkpoint {path} has metadata without {", ".join(missing) or "a JSON object"}: damaged or written by '
      'something else. Nothing was deleted; train.py --restore_previous resumes from the newest readable '
      'checkpoint instead'
    )
  return dict(meta)


def checksums(tree: Any) -> dict[str, str]:
  """CRC-32 of every array of ``tree`` (its bytes, dtype and shape), keyed by its path:
  recorded in a checkpoint's meta at save, compared at restore (``restore_item``), so a
  flipped byte in the array files is an error, not a silently different network."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:  # replicated over hosts: a local copy
      leaf = leaf.addressable_shards[0].data
    array = np.ascontiguousarray(jax.device_get(leaf))
    crc = zlib.crc32(f'{array.dtype.str}{array.shape}'.encode())
    out[jax.tree_util.keystr(path)] = f'{zlib.crc32(array.view(np.uint8).reshape(-1), crc):08x}'
  return out


def restore_item(workdir: str, name: str, target: Any, step: int | None = None) -> Any:
  """Restores item ``name`` shaped like ``target`` (arrays or ShapeDtypeStructs), replicated
  over this process's mesh (whatever the device count it was saved from). Its arrays are
  checked against the checksums the save recorded (checkpoints written before checksums
  existed have none): a mismatch is a ``CheckpointError`` naming the checkpoint."""
  step = _step(workdir, step)
  replicated = sharding.replicated()
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), target)
  read = _read(
    workdir, step, ocp.args.Composite(meta=ocp.args.JsonRestore(), **{name: ocp.args.StandardRestore(abstract)})
  )
  expected = (read['meta'] or {}).get('checksums', {}).get(name)
  if expected is not None:
    bad = sorted(k for k, v in checksums(read[name]).items() if expected.get(k) != v)
    if bad or set(expected) != set(checksums(read[name])):
      path = os.path.join(checkpoint_dir(workdir), str(step))
      raise CheckpointError(
        f'checkpoint {path} is corrupted: the {name} arrays {bad[:3] or "(their set)"} do not match the checksums '
        'recorded when it was saved. Nothing was deleted; train.py --restore_previous resumes from the newest '
        'readable checkpoint instead'
      )
  return read[name]


def model_item(params: nnx.State, batch_stats: nnx.State) -> dict:
  """The checkpoint item ``model``: parameters and batch statistics as plain nested dicts."""
  return {'params': nnx.to_pure_dict(params), 'batch_stats': nnx.to_pure_dict(batch_stats)}


def restore_model_item(workdir: str, params: nnx.State, batch_stats: nnx.State, step: int | None = None) -> None:
  """Fills ``params`` and ``batch_stats`` (in place) from the checkpoint's ``model`` item."""
  restored = restore_item(workdir, 'model', model_item(params, batch_stats), step)
  nnx.replace_by_pure_dict(params, restored['params'])
  nnx.replace_by_pure_dict(batch_stats, restored['batch_stats'])


def load_variables(workdir: str, step: int | None = None, apply_precision: bool = True) -> tuple[SteppingModel, dict]:
  """The model of a run with its trained parameters and batch statistics, and its meta.
  A quantized run (its meta records a precision) comes quantized unless ``apply_precision``
  is False (then with the float weights its optimizer kept, e.g. to fine-tune further).

  Without ``step``: the newest checkpoint, read as one (meta and arrays of the same step).
  A run may be training beside the reader, its checkpoint manager deleting old steps as it
  saves new ones: a newest checkpoint that disappears or is superseded while it is being
  read is not an error, the then newest is read instead; one that stays and stays
  unreadable is (``CheckpointError``)."""
  if step is not None:
    return _load_step(workdir, step, apply_precision)
  for _ in range(_READ_ATTEMPTS - 1):
    newest = _step(workdir, None)
    try:
      return _load_step(workdir, newest, apply_precision)
    except CheckpointError:
      if os.path.isdir(os.path.join(checkpoint_dir(workdir), str(newest))) and latest_step(workdir) == newest:
        raise  # still there and still the newest: it is the checkpoint, not the timing
  return _load_step(workdir, _step(workdir, None), apply_precision)


# Reads of the newest checkpoint tried while a trainer beside the reader keeps rotating it away.
_READ_ATTEMPTS = 10


def _load_step(workdir: str, step: int, apply_precision: bool) -> tuple[SteppingModel, dict]:
  meta = restore_meta(workdir, step)
  model = nnx.eval_shape(lambda: build_from_meta(meta['model_meta']))  # shapes only: no init compute
  _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  restore_model_item(workdir, params, stats, step)
  nnx.update(model, params, stats)
  if apply_precision and meta['model_meta'].get('precision'):  # a quantized run: its bits beside the levels
    model = quantized.apply(model, quantized.Precision.from_json(meta['model_meta']['precision']))
  return model, meta
