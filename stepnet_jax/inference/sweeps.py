"""A stopping policy measured over a dataset through the compiled anytime program: accuracy,
average MACs spent per input and where inputs stop (``evaluate_policy``), a policy's knob
swept (``sweep``) and the sweep as a table (``format_sweep``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from stepnet_jax.core.anytime import Prediction
from stepnet_jax.data import feed
from stepnet_jax.inference import evaluation, policies


def exit_statistics(prediction: Prediction, labels: np.ndarray, num_levels: int) -> dict[str, Any]:
  """Accuracy, average MACs per input and the fraction of inputs stopping at each level."""
  exit_level = np.asarray(prediction.exit_level)
  return {
    'accuracy': float((np.asarray(prediction.logits).argmax(-1) == labels).mean()),
    'avg_macs': float(np.asarray(prediction.macs, np.float64).mean()),
    'exit_fraction': [float(f) for f in np.bincount(exit_level, minlength=num_levels) / len(exit_level)],
  }


def evaluate_policy(
  predict_fn: Callable,
  variables,
  policy,
  images: np.ndarray,
  labels: np.ndarray,
  num_levels: int,
  batch_size: int = 1000,
) -> dict[str, Any]:
  """``exit_statistics`` of ``policy`` over a split, through the feed (the last batch padded
  to one compiled shape; its padding dropped: ``evaluation.accumulate``). A NaN knob is a
  ValueError (``policies.check_knobs``), not a row of nonsense."""
  policies.check_knobs(policy)

  def per_batch(batch: feed.Batch) -> Prediction:
    valid = np.arange(batch.images.shape[0]) < batch.count  # the padding stops at once
    return Prediction(*predict_fn(variables, batch.images, policy, valid))

  merged = evaluation.accumulate(per_batch, images, labels, batch_size, axis=0, concatenate=True)
  return exit_statistics(merged, labels, num_levels)


def sweep(
  predict_fn: Callable,
  variables,
  num_levels: int,
  make_policy: Callable[[float], Any],
  knobs: Sequence[float],
  images: np.ndarray,
  labels: np.ndarray,
) -> list[dict[str, Any]]:
  """One point per knob (``{'knob', 'accuracy', 'avg_macs', 'exit_fraction'}``) of the policy
  ``make_policy(knob)`` over a split; the knobs are traced, so the program compiles once."""
  return [
    {'knob': float(k), **evaluate_policy(predict_fn, variables, make_policy(k), images, labels, num_levels)}
    for k in knobs
  ]


def format_sweep(points: Sequence[dict[str, Any]], top_macs: int) -> str:
  """A policy sweep as a table: knob, average MACs (and share of the top level's), accuracy, exits."""
  head = f'{"knob":>10} {"avg MACs":>12} {"of top":>7} {"accuracy":>9}  exits per level'
  lines = [head, '-' * len(head)]
  for p in points:
    lines.append(
      f'{p["knob"]:>10.4g} {p["avg_macs"]:>12,.0f} {p["avg_macs"] / top_macs:>7.1%} {p["accuracy"]:>9.4f}  '
      + ' '.join(f'{f:.2f}' for f in p['exit_fraction'])
    )
  return '\n'.join(lines)
