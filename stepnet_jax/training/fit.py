"""Fit: train a model for a number of steps on a batch iterator, the one train-a-thing call.

``fit(model, tx, objective, batches, steps, seed=...)`` builds the train state and the
train step (``step.make_train_step``), runs ``loop.run_steps`` and returns the trained
model and the loop's logged metrics. It is what the short trainings beside a run use:
the precision study's quantization-aware fine-tune, ProgressiveNN's BN affine
retraining and the selection module's REINFORCE training. A whole run (epochs,
checkpoints, resumption) is ``run.train_and_evaluate`` / ``run.PhasedRun``.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from stepnet_jax.data.feed import Batch
from stepnet_jax.training import loop
from stepnet_jax.training import step as step_lib
from stepnet_jax.training.losses import Objective


def fit(
  model: nnx.Module,
  tx: optax.GradientTransformation,
  objective: Objective,
  batches: Iterable[Batch],
  steps: int,
  *,
  seed: int,
  augment_images: bool = False,
  settings: loop.LoopSettings | None = None,
  desc: str = 'fit',
) -> tuple[nnx.Module, list[dict[str, float]]]:
  """Trains a copy of ``model`` for ``steps`` steps of ``tx`` on ``objective``; returns the
  trained model and the loop's metrics, one row per logged window (``step``,
  ``train/loss``, ``train/accuracy/levelK``, ``train/images_per_sec``).

  ``model`` keeps its arrays (the train step donates the state it is given, so the state
  starts from copies). ``batches`` gives one batch per step (e.g.
  ``feed.training_batches``); ``seed`` seeds the train step's random keys (and the
  augmentation, with ``augment_images``: ``step.make_train_step``). ``settings``: the
  loop's log cadence, progress bar and divergence guard (default ``LoopSettings()``).
  The optimizer starts with fresh moments at step 0.
  """
  graphdef, state = step_lib.init_state(model, tx)
  state = jax.tree.map(jnp.copy, state)  # the step donates its state; ``model`` keeps its own arrays
  train_step = step_lib.make_train_step(graphdef, tx, objective, seed=seed, augment_images=augment_images)
  rows = loop.MetricRows()
  state = loop.run_steps(
    state, train_step, batches, settings or loop.LoopSettings(), first=0, last=steps, writer=rows, desc=desc
  )
  return nnx.merge(graphdef, state.params, state.batch_stats), rows.rows
