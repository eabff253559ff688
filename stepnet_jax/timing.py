"""Wall-clock timing of jitted functions (compile excluded, result awaited)."""
from __future__ import annotations

import time
from collections.abc import Callable

import jax
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
