"""Wall-clock timing of jitted functions and of stepping (compile excluded, results awaited)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def median_seconds(fn: Callable, *args, repeats: int = 20, warmup: int = 2) -> float:
  """Median wall time of ``fn(*args)`` over ``repeats`` calls after ``warmup`` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def step_latencies(stepper, images: np.ndarray, repeats: int = 20) -> list[float]:
  """Median seconds of each step of a ``Stepper`` when stepping a batch from level 0 to the top.

  Timed as a user steps: ``restart`` (level 0 of new images in the previous cache's
  buffers, normalisation included), then ``advance`` to each level, waiting for each
  result. Compilation and the first allocation of the cache are excluded.
  """
  x = jnp.asarray(images)
  if not stepper.reusable:
    return _recompute_latencies(stepper, x, repeats)
  fns, v = stepper.functions, stepper.variables
  cache = fns.start(v, x)
  for k in range(1, stepper.num_levels):  # compile every level
    cache = fns.levels[k](v, cache)
  times = []
  for r in range(repeats + 2):
    t = [time.perf_counter()]
    cache = jax.block_until_ready(fns.restart(v, cache, x))
    t.append(time.perf_counter())
    for k in range(1, stepper.num_levels):
      cache = jax.block_until_ready(fns.levels[k](v, cache))
      t.append(time.perf_counter())
    if r >= 2:  # warm-up rounds
      times.append(np.diff(t))
  return [float(s) for s in np.median(np.asarray(times), axis=0)]


def _recompute_latencies(stepper, x: jax.Array, repeats: int) -> list[float]:
  """Per-level seconds of a non-reusable model: each level is a direct forward of its subnet."""
  out = []
  for k in range(stepper.num_levels):
    out.append(median_seconds(functools.partial(stepper.forward, x, k), repeats=repeats))
  return out
