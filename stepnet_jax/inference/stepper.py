"""High-level handle: ``stepnet_jax.load(workdir)`` -> ``Stepper``.

    net = stepnet_jax.load('runs/lenet3c1l_fmnist')
    cache = net.start(images)            # level 0: cheap first answer
    if cache.logits.max(-1) ... < threshold:
      cache = net.advance(cache)         # pays only the level-1 MACs

``advance`` consumes the cache it is given (its buffers are donated to the result).
``start``/``advance`` take raw images as stored in the dataset (uint8); they are
jitted internally and may also be wrapped by ``jax.jit``, ``jax.vmap`` or
``jax.export`` from outside. The pure functions of (variables, ...) they call live in
``stepnet_jax.stepping`` for JAX code that wants to compose them itself.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from stepnet_jax.core import anytime, stepping
from stepnet_jax.core.model import StepCache, SteppingModel
from stepnet_jax.inference import policies, restore, timing

_TOKENS = itertools.count(1)


@jax.jit
def _unit_range(x: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(x) & (x >= 0) & (x <= 1))


def _in_unit_range(x) -> bool:
  """Whether every value of a float image batch is finite and in [0, 1]."""
  if isinstance(x, np.ndarray):
    return bool(np.isfinite(x).all() and x.min(initial=0) >= 0 and x.max(initial=0) <= 1)
  return bool(_unit_range(x))


class Stepper:
  """A trained stepping network with its jitted per-level functions."""

  def __init__(self, model: SteppingModel, meta: dict | None = None):
    self.meta = meta or {}
    self.graphdef, self.variables = stepping.split(model)
    self.num_levels = model.num_levels
    self.input_shape = tuple(model.input_shape)  # [H, W, C] of one image
    self.reusable = model.reusable
    self.layer_names = model.layer_names
    self.unit_names = model.unit_names  # one per entry of a cache's ``units``
    self.layer_delta_macs = model.delta_macs()  # [layers, K]
    # MACs per input spent to get level k's answer after levels 0..k-1: ``level_macs`` for a
    # reusable model; the running sum of every subnet's MACs for one that recomputes them.
    self.macs_to_reach = model.macs_to_reach()
    self.functions = stepping.make_step_functions(self.graphdef, self.num_levels)
    self._predict: dict[str, Callable] = {}
    self._latency_ms: dict[tuple, list[float]] = {}
    self._cache_shapes: dict[int, list[tuple[int, ...]]] = {}
    self._token = next(_TOKENS)  # tags the caches this network makes

  def check_images(self, x) -> None:
    """Raises a ValueError / TypeError saying what was expected when ``x`` is not a batch of
    this network's images: [B, H, W, C] uint8 (as stored) or float32 in [0, 1]."""
    shape, dtype = getattr(x, 'shape', None), getattr(x, 'dtype', None)
    if shape is None or dtype is None:
      raise TypeError(
        f'expected an array of images [B, {", ".join(map(str, self.input_shape))}], got {type(x).__name__}'
      )
    if len(shape) != 4:
      raise ValueError(
        f'expected images of rank 4 [B, {", ".join(map(str, self.input_shape))}], got shape {tuple(shape)}'
        + (' (add a batch axis: x[None])' if tuple(shape) == self.input_shape else '')
      )
    if tuple(shape[1:]) != self.input_shape:
      raise ValueError(
        f'expected images of shape [B, {", ".join(map(str, self.input_shape))}] (H, W, C), got {tuple(shape)}'
      )
    if np.dtype(dtype) not in (np.uint8, np.float32):
      raise TypeError(
        f'expected uint8 images (0..255, as stored) or float32 in [0, 1], got {np.dtype(dtype)}'
        + (' (convert 0..255 integers with x.astype(np.uint8))' if np.issubdtype(dtype, np.integer) else '')
      )
    if np.dtype(dtype) == np.float32 and not isinstance(x, jax.core.Tracer) and not _in_unit_range(x):
      raise ValueError(
        'float32 images must be finite and in [0, 1] (uint8 images are 0..255); got values outside '
        '(divide 0..255 floats by 255, or pass uint8)'
      )

  def check_level(self, level: int) -> None:
    """Raises a TypeError / ValueError unless ``level`` is a Python int in 0..K-1."""
    if isinstance(level, (bool, np.bool_)) or not isinstance(level, (int, np.integer)):
      raise TypeError(
        f'level must be a Python int in 0..{self.num_levels - 1} (it selects a compiled program), '
        f'got {type(level).__name__} {level!r}' + (' (use int(level))' if hasattr(level, 'shape') else '')
      )
    if not 0 <= level < self.num_levels:
      raise ValueError(f'level must be an int in 0..{self.num_levels - 1}, got {level!r}')

  def check_cache(self, cache) -> None:
    """Raises a ValueError when ``cache`` is not a step cache of this network (another model,
    a corrupted tree) or its level is the top already."""
    if not isinstance(cache, StepCache):
      raise TypeError(f'expected a StepCache from start/advance, got {type(cache).__name__}')
    if cache.owner not in (0, self._token):
      raise ValueError(
        'this cache was made by another network (another Stepper): its buffers hold that '
        "network's activations; start a new one with this network's start()"
      )
    batch = cache.logits.shape[0]
    if batch not in self._cache_shapes:  # traced once per batch size
      expected = jax.eval_shape(
        self.functions.start, self.variables, jax.ShapeDtypeStruct((batch,) + self.input_shape, np.uint8)
      )
      self._cache_shapes[batch] = [tuple(a.shape) for a in jax.tree.leaves(expected)]
    got, want = [tuple(a.shape) for a in jax.tree.leaves(cache)], self._cache_shapes[batch]
    if got != want:
      raise ValueError(
        f'this cache was not made by this network (buffer shapes {got} where its start gives {want} '
        f'for a batch of {batch})'
      )
    if not 0 <= cache.level < self.num_levels:
      raise ValueError(f'cache level {cache.level} outside 0..{self.num_levels - 1}')

  @property
  def delta_macs(self) -> tuple[int, ...]:
    """MACs per input that step k adds (only the connections into level-k neurons).

    For a non-reusable model this is only the growth of the subnet; reaching level k
    costs its whole subnet again (see ``macs_to_reach``).
    """
    return tuple(int(m) for m in self.layer_delta_macs.sum(axis=0))

  @property
  def level_macs(self) -> tuple[int, ...]:
    """Cumulative MACs per input of subnets 0..K-1."""
    return tuple(int(m) for m in np.cumsum(self.delta_macs))

  def forward(self, x: jax.Array, level: int) -> jax.Array:
    """Direct logits of subnet ``level`` [B, classes] (the faster variant on this backend)."""
    self.check_images(x)
    self.check_level(level)
    return self.functions.forward_fastest(self.variables, x, level)

  def exits(self, x: jax.Array) -> jax.Array:
    """Logits of all exits from one pass: [K, B, classes]."""
    self.check_images(x)
    return self.functions.exits(self.variables, x)

  def start(self, x: jax.Array) -> StepCache:
    """Runs level 0 on raw images; returns the cache (``.logits``, ``.level == 0``)."""
    self.check_images(x)
    return self.functions.start(self.variables, x).replace(owner=self._token)

  def restart(self, cache: StepCache, x: jax.Array) -> StepCache:
    """Level 0 of new images in the buffers of an old cache (which is consumed)."""
    self.check_images(x)
    self.check_cache(cache)
    if x.shape[0] != cache.logits.shape[0]:
      raise ValueError(f"restart needs images of the cache's batch size {cache.logits.shape[0]}, got {x.shape[0]}")
    return self.functions.restart(self.variables, cache.replace(owner=0), x).replace(owner=self._token)

  def advance(self, cache: StepCache) -> StepCache:
    """Runs the next level, reading everything the lower levels computed.

    The given cache is consumed (its buffers are reused for the result); read what
    you need from it, e.g. ``np.asarray(cache.logits)``, before advancing.
    """
    self.check_cache(cache)
    if cache.level >= self.num_levels - 1:
      raise ValueError(f'cache is already at the top level {cache.level}')
    return self.functions.advance(self.variables, cache.replace(owner=0)).replace(owner=self._token)

  @functools.cached_property
  def program(self) -> anytime.Program:
    """The anytime program of this network: stepping with reuse, or recomputing each subnet.
    Built once: its structure and MAC table do not depend on the parameters' values (rebuilt
    per call, it cost 0.9 ms of Python per ``predict`` of LeNet at batch 1, more than the
    compiled program's 0.7 ms)."""
    return stepping.program(self.graphdef, self.variables)

  def predict(self, x: jax.Array, policy, strategy: str | None = None) -> anytime.Prediction:
    """Each input's answer under ``policy`` (``stepnet_jax.policies``) from one compiled program:
    ``Prediction(logits [B, classes], exit_level [B], macs [B])``. ``strategy``: 'masked' or
    'compact' (default: the faster one measured on this backend)."""
    self.check_images(x)
    if not (callable(getattr(policy, 'stop', None)) and callable(getattr(policy, 'init', None))):
      raise TypeError(f'expected a policy with init and stop (stepnet_jax.policies), got {type(policy).__name__}')
    policies.check_knobs(policy)
    anytime.check_policy_fits(self.program, policy)  # before tracing: a clear error, not a traced one
    strategy = strategy or anytime.default_strategy()
    if strategy not in anytime.STRATEGIES:
      raise ValueError(f'unknown strategy {strategy!r}; choose from {", ".join(anytime.STRATEGIES)}')
    if strategy not in self._predict:
      self._predict[strategy] = anytime.make_predict(self.program, strategy)
    return self._predict[strategy](self.variables, x, policy)

  def step_latency_ms(self, x: jax.Array, repeats: int = 5) -> list[float]:
    """Measured milliseconds of each step at ``x``'s batch shape (median; measured once per shape)."""
    key = tuple(x.shape) + (str(x.dtype),)
    if key not in self._latency_ms:
      self._latency_ms[key] = [1e3 * t for t in timing.step_latencies(self, x, repeats)]
    return self._latency_ms[key]

  def run_until(self, x: jax.Array, deadline_ms: float) -> StepCache:
    """Steps while the time spent plus the next step's measured latency fits ``deadline_ms``.

    Level 0 always runs. The latencies are measured once per batch shape (the first call
    at a new shape spends time measuring them, outside the deadline).
    """
    if not self.reusable:
      raise ValueError('run_until steps a reusable network; this one recomputes every subnet (use predict)')
    if isinstance(deadline_ms, bool) or not isinstance(deadline_ms, (int, float, np.number)) or np.isnan(deadline_ms):
      raise ValueError(f'deadline_ms must be a number of milliseconds, got {deadline_ms!r}')
    latency = self.step_latency_ms(x)
    t0 = time.perf_counter()
    cache = jax.block_until_ready(self.start(x))
    while cache.level < self.num_levels - 1:
      spent = 1e3 * (time.perf_counter() - t0)
      if spent + latency[cache.level + 1] > deadline_ms:
        break
      cache = jax.block_until_ready(self.advance(cache))
    return cache


def load(workdir: str, step: int | None = None) -> Stepper:
  """Loads the latest (or given) checkpoint of a training run."""
  model, meta = restore.load_variables(workdir, step)
  return Stepper(model, meta)
