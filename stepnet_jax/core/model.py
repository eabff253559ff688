"""SteppingModel: a stack of level-structured units with a shared additive head.

Hidden activations never depend on the subnet (a neuron reads only neurons of its own
or lower levels), so a single full-width pass yields every exit, and stepping from
level k-1 to k only computes the level-k channels of each unit.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from stepnet_jax.core import wiring
from stepnet_jax.core.layers import Head


@struct.dataclass
class StepCache:
  """Everything stepping needs: fixed-shape buffers, so each level compiles once.

  Attributes:
    inputs: normalised input images [B, H, W, C].
    units: one entry per unit: its full-width output buffer (and inner buffers),
      filled up to channel ``end(level)``; the rest is still zero.
    logits: logits of subnet ``level`` [B, classes].
    level: the last level computed (static; -1 before the first step).
    owner: the ``Stepper`` that made it (static; 0 for caches made by the pure functions),
      so a cache is never advanced by another network whose buffers happen to fit.
  """

  inputs: jax.Array
  units: tuple
  logits: jax.Array
  level: int = struct.field(pytree_node=False, default=-1)
  owner: int = struct.field(pytree_node=False, default=0)


class SteppingModel(nnx.Module):
  """Level-structured network; see the module docstring.

  Inputs are images as stored in the dataset ([B, H, W, C], uint8 in [0, 255] or
  float in [0, 1]); normalisation with the dataset's mean/std happens inside.
  """

  def __init__(
    self,
    units: Sequence[nnx.Module],
    unit_names: Sequence[str],
    head: Head,
    *,
    input_shape: tuple[int, int, int],
    num_levels: int,
    mean: Sequence[float],
    std: Sequence[float],
    assignment: dict[str, tuple[int, ...]] | None = None,
    mask_rule: bool = True,
    switchable_bn: bool = False,
  ):
    if len(units) != len(unit_names):
      raise ValueError('one name per unit')
    self.units = nnx.List(list(units))
    self.unit_names = tuple(unit_names)
    self.head = head
    self.input_shape = tuple(int(s) for s in input_shape)
    self.num_levels = int(num_levels)
    self.mean = tuple(float(m) for m in mean)
    self.std = tuple(float(s) for s in std)
    # (layer name, level sizes) pairs: the plain data that rebuilds this structure.
    self.assignment = tuple((k, tuple(v)) for k, v in (assignment or {}).items())
    # mask_rule: connections only from lower-or-equal levels. switchable_bn: one batch norm
    # per subnet (``models.build_model`` decides its default).
    self.mask_rule = bool(mask_rule)
    self.switchable_bn = bool(switchable_bn)
    # Reusable: a neuron's value is the same in every subnet, so one pass gives every exit and
    # a step computes only the new level. Without the rule, or with a batch norm per subnet,
    # each subnet is recomputed from scratch.
    self.reusable = self.mask_rule and not self.switchable_bn

  @property
  def top(self) -> int:
    """The index of the top level, K - 1."""
    return self.num_levels - 1

  def _check_level(self, level: int) -> int:
    level = self.top if level is None else int(level)
    if not 0 <= level < self.num_levels:
      raise ValueError(f'level must be in [0, {self.num_levels}), got {level}')
    return level

  def normalize(self, x: jax.Array) -> jax.Array:
    """uint8 [0, 255] or float [0, 1] images -> standardised float32."""
    scale = 1.0 / 255.0 if x.dtype == jnp.uint8 else 1.0
    x = x.astype(jnp.float32) * scale
    return (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)

  def features(self, x: jax.Array, level: int, train: bool = False) -> jax.Array:
    """Last hidden features of subnet ``level`` (x already normalised)."""
    for unit in self.units:
      x = unit(x, level, train)
    return x

  def __call__(self, x: jax.Array, level: int | None = None, train: bool = False) -> jax.Array:
    """Direct (masked-prefix) forward of subnet ``level``: logits [B, classes]."""
    level = self._check_level(level)
    if train and level != self.top and self.reusable:
      raise ValueError('train mode runs the full network; use exits() for the lower levels')
    return self.head(self.features(self.normalize(x), level, train), level)

  def exits(self, x: jax.Array, train: bool = False, levels: Sequence[int] | None = None) -> jax.Array:
    """Logits of the exits ``levels`` (default all): [len(levels), B, classes].

    A reusable model gets every exit from one full-width pass. A non-reusable
    (slimmable-style) model runs one forward pass per requested subnet.
    """
    levels = tuple(range(self.num_levels)) if levels is None else tuple(self._check_level(k) for k in levels)
    x = self.normalize(x)
    if self.reusable:
      all_exits = self.head.exits(self.features(x, self.top, train))
      return all_exits if levels == tuple(range(self.num_levels)) else all_exits[jnp.asarray(levels)]
    return jnp.stack([self.head(self.features(x, k, train), k) for k in levels])

  def sandwich_exits(self, x: jax.Array, widths: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """(all K exits, logits of subnets keeping the first ``widths[r]`` last-layer features).

    With triangular masks between layers of equal level sizes (Any-Width Networks'
    LeNet) every channel reads only channels of lower index, so the first m channels
    of every layer form a subnet and its logits come from the same full-width pass.
    """
    if not self.reusable:
      raise ValueError('random-width exits need a reusable (mask-rule) model')
    feats = self.features(self.normalize(x), self.top, train)
    return self.head.exits(feats), self.head.prefix_logits(feats, widths)

  # ---------------------------------------------------------------- stepping
  def _cache_like(self, x):
    caches = []
    for unit in self.units:
      c = unit.cache_like(x)
      caches.append(c)
      x = unit.output(c)
    return tuple(caches)

  def init_cache(self, x: jax.Array) -> StepCache:
    """Zero buffers for a batch of (raw) images; nothing computed yet (level -1)."""
    x = self.normalize(x)
    shapes = jax.eval_shape(self._cache_like, x)
    units = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    logits = jnp.zeros((x.shape[0], self.head.num_classes), jnp.float32)
    return StepCache(inputs=x, units=units, logits=logits, level=-1)

  def step(self, cache: StepCache, level: int, rows: jax.Array | None = None) -> StepCache:
    """Compute level ``level`` (must be ``cache.level + 1``) from the cached lower levels.

    ``rows`` (distinct batch indices, optional) restricts the step to those inputs: each
    unit reads only their rows and the channels the level needs, and writes back only the
    new level's channels (anytime inference's compact strategy). The other rows are left
    as they were, so the returned cache is mixed-level (its ``level`` is that of the
    stepped rows); the compact strategy never steps it without ``rows`` afterwards.
    """
    level = self._check_level(level)
    if not self.reusable:
      raise ValueError(
        'this model has no mask rule (slimmable-style): its subnets cannot be stepped; '
        'use forward(x, level), which recomputes the subnet'
      )
    if cache.level != level - 1:
      raise ValueError(f'cache holds level {cache.level}; cannot step to level {level}')
    x = cache.inputs
    new_units = []
    for unit, c in zip(self.units, cache.units):
      c = unit.step(c, x, level, rows)
      new_units.append(c)
      x = unit.output(c)
    logits = self.head.step_logits(cache.logits, x, level, rows)
    return StepCache(inputs=cache.inputs, units=tuple(new_units), logits=logits, level=level)

  def start(self, x: jax.Array) -> StepCache:
    """Run level 0 on raw images and return the cache."""
    return self.step(self.init_cache(x), 0)

  # ---------------------------------------------------------------- accounting
  @property
  def layer_names(self) -> tuple[str, ...]:
    """The hidden units' names and 'head', in order: the rows of ``delta_macs``."""
    return self.unit_names + ('head',)

  def macs_to_reach(self) -> tuple[int, ...]:
    """MACs per input spent to have level k's answer after levels 0..k-1: the cumulative
    level MACs for a reusable model, the running sum of every subnet's MACs for a model
    that recomputes each subnet (no mask rule)."""
    level_macs = np.cumsum(self.delta_macs().sum(axis=0))
    return tuple(int(m) for m in (level_macs if self.reusable else np.cumsum(level_macs)))

  def wiring(self) -> wiring.Wiring:
    """Which neuron groups (the assignment's names) each linear layer reads and writes
    (``core.wiring``): what construction re-levels."""
    return wiring.links_of(self.units, [name for name, _ in self.assignment], self.input_shape)

  def delta_macs(self) -> np.ndarray:
    """Exact MACs per input of each level's new connections: int64 [layers, K]."""
    shape = self.input_shape
    rows = []
    for unit in list(self.units) + [self.head]:
      macs, shape = unit.delta_macs(shape)
      rows.append(macs)
    return np.stack(rows).astype(np.int64)
