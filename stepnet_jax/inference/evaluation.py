"""Per-level evaluation: accuracy of every exit, MACs, delta MACs and measured step latency."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stepnet_jax.data import feed, sharding
from stepnet_jax.inference import timing
from stepnet_jax.inference.stepper import Stepper


def accumulate(
  fn: Callable[[feed.Batch], Any],
  images: np.ndarray,
  labels: np.ndarray,
  batch_size: int = 1000,
  *,
  axis: int = -1,
  concatenate: bool = False,
) -> Any:
  """``fn(batch)`` over a split in evaluation batches, the padding cut off: the one evaluation loop.

  ``feed.evaluation_batches`` pads the last batch to the first's size (one compiled
  shape). ``fn`` returns a pytree of arrays whose axis ``axis`` runs over the batch's
  examples; each leaf comes to the host, is cut to the real examples, and is summed
  over them (floating leaves in float64; the sums added batch by batch) or, with
  ``concatenate``, joined batch after batch (one entry per example). None for an empty split.
  """
  total, parts = None, []
  for batch in feed.evaluation_batches(images, labels, batch_size):
    out = jax.tree.map(lambda x: _real(sharding.to_host(x), batch.count, axis), fn(batch))
    if concatenate:
      parts.append(out)
      continue
    sums = jax.tree.map(lambda x: _promote(x).sum(axis=axis), out)
    total = sums if total is None else jax.tree.map(operator.add, total, sums)
  if concatenate:
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=axis), *parts) if parts else None
  return total


def _real(x: np.ndarray, count: int, axis: int) -> np.ndarray:
  """``x`` cut to its first ``count`` entries along ``axis`` (the batch's real examples)."""
  index = [slice(None)] * x.ndim
  index[axis] = slice(0, count)
  return x[tuple(index)]


def _promote(x: np.ndarray) -> np.ndarray:
  return x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x


def exit_metrics(
  exits_fn, variables, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000, loss: bool = True
) -> dict[str, np.ndarray]:
  """Eval-mode accuracy (and with ``loss`` mean cross-entropy) of every exit over a split:
  {'accuracy': [K], 'loss': [K]}.

  ``exits_fn(variables, x) -> [K, B, classes]`` is a jitted ``stepping.exits``
  (``stepping.jitted_exits``); the padding of the last batch is not counted
  (``accumulate``). Only [K, B] hits (and per-example log-likelihoods) leave the device.
  The loss is a lower-variance ranking signal than the accuracy when candidates are close.
  """

  def per_batch(batch: feed.Batch) -> dict[str, jax.Array]:
    logits = exits_fn(variables, batch.images)  # [K, B, C] on device
    out = {'correct': logits.argmax(-1) == batch.labels[None]}  # [K, B]
    if loss:
      log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      out['log_p'] = jnp.take_along_axis(log_p, batch.labels[None, :, None].astype(jnp.int32), axis=-1)[..., 0]
    return out

  sums = accumulate(per_batch, images, labels, batch_size, axis=1)
  out = {'accuracy': sums['correct'] / len(labels)}
  if loss:
    out['loss'] = -sums['log_p'] / len(labels)
  return out


def exit_hits(exits_fn, variables, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> np.ndarray:
  """Whether every exit gets every example right: bool [K, N], the per-example counts behind
  ``exit_accuracy`` (for paired comparisons of two networks on the same images)."""

  def per_batch(batch: feed.Batch) -> jax.Array:
    return exits_fn(variables, batch.images).argmax(-1) == batch.labels[None]  # [K, B]

  return accumulate(per_batch, images, labels, batch_size, axis=1, concatenate=True)


def exit_accuracy(exits_fn, variables, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> np.ndarray:
  """Eval-mode accuracy of every exit over a dataset split: [K] (see ``exit_metrics``)."""
  return exit_metrics(exits_fn, variables, images, labels, batch_size, loss=False)['accuracy']


def evaluate_levels(
  stepper: Stepper,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  batch_size: int = 1000,
  latency_batch: int = 1,
  latency_repeats: int = 20,
) -> list[dict]:
  """One row per level: level, macs, delta_macs, macs_to_reach, accuracy, latency_ms.

  ``latency_ms`` is the cost of getting level k's answer after level k-1's: one step
  for a reusable model, a whole subnet forward for a recomputing one.
  """
  acc = exit_accuracy(stepper.functions.exits, stepper.variables, images, labels, batch_size)
  lat = timing.step_latencies(stepper, images[:latency_batch], latency_repeats)
  return [
    {
      'level': k,
      'macs': stepper.level_macs[k],
      'delta_macs': stepper.delta_macs[k],
      'macs_to_reach': stepper.macs_to_reach[k],
      'accuracy': float(acc[k]),
      'latency_ms': 1e3 * lat[k],
    }
    for k in range(stepper.num_levels)
  ]


def format_table(rows: list[dict], latency_batch: int) -> str:
  """The rows of ``evaluate_levels`` as a text table: level, MACs, delta MACs, accuracy, step latency."""
  head = f'{"level":>5} {"MACs":>12} {"delta MACs":>12} {"accuracy":>9} {f"step ms (B={latency_batch})":>16}'
  lines = [head, '-' * len(head)]
  for r in rows:
    lines.append(
      f'{r["level"]:>5} {r["macs"]:>12,} {r["delta_macs"]:>12,} {r["accuracy"]:>9.4f} {r["latency_ms"]:>16.3f}'
    )
  return '\n'.join(lines)


def format_layer_macs(stepper: Stepper) -> str:
  """Delta MACs per image of every layer at every level, with the totals."""
  k = stepper.num_levels
  head = f'{"layer":<18}' + ''.join(f'{f"delta L{j}":>12}' for j in range(k)) + f'{"all levels":>13}'
  lines = [head, '-' * len(head)]
  rows = list(zip(stepper.layer_names, stepper.layer_delta_macs)) + [('total', stepper.layer_delta_macs.sum(0))]
  for name, macs in rows:
    lines.append(f'{name:<18}' + ''.join(f'{int(m):>12,}' for m in macs) + f'{int(sum(macs)):>13,}')
  return '\n'.join(lines)
