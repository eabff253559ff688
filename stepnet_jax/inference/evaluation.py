"""Per-level evaluation: accuracy of every exit, MACs, delta MACs and measured step latency."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from stepnet_jax.data import feed, sharding
from stepnet_jax.inference import timing
from stepnet_jax.inference.stepper import Stepper


def exit_metrics(
  exits_fn, variables, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000, loss: bool = True
) -> dict[str, np.ndarray]:
  """Eval-mode accuracy (and with ``loss`` mean cross-entropy) of every exit over a split:
  {'accuracy': [K], 'loss': [K]}.

  ``exits_fn(variables, x) -> [K, B, classes]`` is a jitted ``stepping.exits``; the
  feed pads the last batch (one compiled shape) and its padding is not counted. Only
  [K, B] predictions (and per-example losses) leave the device. The loss is a
  lower-variance ranking signal than the accuracy when candidates are close.
  """
  correct, nll, seen = 0, 0.0, 0
  for batch in feed.evaluation_batches(images, labels, batch_size):
    logits = exits_fn(variables, batch.images)  # [K, B, C] on device
    pred = sharding.to_host(logits.argmax(-1))[:, : batch.count]  # [K, count]
    correct = correct + (pred == labels[None, seen : seen + batch.count]).sum(axis=1)
    if loss:
      log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      picked = jnp.take_along_axis(log_p, batch.labels[None, :, None].astype(jnp.int32), axis=-1)[..., 0]
      nll = nll - sharding.to_host(picked)[:, : batch.count].astype(np.float64).sum(axis=1)
    seen += batch.count
  out = {'accuracy': correct / len(labels)}
  if loss:
    out['loss'] = nll / len(labels)
  return out


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
