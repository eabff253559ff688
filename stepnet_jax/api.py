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

import jax
import numpy as np

from stepnet_jax import restore, stepping
from stepnet_jax.model import StepCache, SteppingModel


class Stepper:
  """A trained stepping network with its jitted per-level functions."""

  def __init__(self, model: SteppingModel, meta: dict | None = None):
    self.meta = meta or {}
    self.graphdef, self.variables = stepping.split(model)
    self.num_levels = model.num_levels
    self.reusable = model.reusable
    self.layer_names = model.layer_names
    self.layer_delta_macs = model.delta_macs()   # [layers, K]
    self.functions = stepping.make_step_functions(self.graphdef, self.num_levels)

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

  @property
  def macs_to_reach(self) -> tuple[int, ...]:
    """MACs per input spent to get level k's answer after levels 0..k-1.

    Equal to ``level_macs`` for a reusable model; the running sum of every subnet's
    MACs for a non-reusable (slimmable-style) one, which recomputes each subnet.
    """
    macs = self.level_macs
    return macs if self.reusable else tuple(int(m) for m in np.cumsum(macs))

  def forward(self, x: jax.Array, level: int) -> jax.Array:
    """Direct logits of subnet ``level`` [B, classes] (the faster variant on this backend)."""
    return self.functions.forward_fastest(self.variables, x, level)

  def exits(self, x: jax.Array) -> jax.Array:
    """Logits of all exits from one pass: [K, B, classes]."""
    return self.functions.exits(self.variables, x)

  def start(self, x: jax.Array) -> StepCache:
    """Runs level 0 on raw images; returns the cache (``.logits``, ``.level == 0``)."""
    return self.functions.start(self.variables, x)

  def restart(self, cache: StepCache, x: jax.Array) -> StepCache:
    """Level 0 of new images in the buffers of an old cache (which is consumed)."""
    return self.functions.restart(self.variables, cache, x)

  def advance(self, cache: StepCache) -> StepCache:
    """Runs the next level, reading everything the lower levels computed.

    The given cache is consumed (its buffers are reused for the result); read what
    you need from it, e.g. ``np.asarray(cache.logits)``, before advancing.
    """
    if cache.level >= self.num_levels - 1:
      raise ValueError(f'cache is already at the top level {cache.level}')
    return self.functions.advance(self.variables, cache)


def load(workdir: str, step: int | None = None) -> Stepper:
  """Loads the latest (or given) checkpoint of a training run."""
  model, meta = restore.load_variables(workdir, step)
  return Stepper(model, meta)
