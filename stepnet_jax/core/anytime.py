"""One compiled anytime program: step a batch up the levels until a policy stops every input.

``predict(program, variables, x, policy)`` is a single XLA program: level 0, then for
each level k a ``lax.cond`` on "some input still running" that steps to level k and asks
the policy which inputs stop. No host round trip between levels; a level nobody needs
is never run (its cond takes the identity branch, and so does every later one). It
returns ``Prediction(logits, exit_level, macs)``: each input's answer, the level it
stopped at, and the MACs spent on it.

Why a chain of two-way conds and not a ``lax.while_loop`` with a ``lax.switch`` over
(level, bucket): XLA updates the cache in place inside a two-way cond whose other branch
is the identity, but copied whole cache buffers in the branches of the many-way switch.
On the width-4 LeNet-3C1L (a 144 MB cache at batch 256) the optimized program held 21
buffer copies (masked) and 146 (compact) with the switch, 3 and 8 with the conds.

A ``Program`` says how to answer at level 0 and how to go one level up:
``stepping_program`` reuses everything lower levels computed (SteppingNet, AWN);
``recompute_program`` runs a fresh forward per level (slimmable and non-uniform
subnets, and the cascade of independent networks of Guan et al.), so its MACs to
reach level k are the sum of every level up to k.

Two batch strategies (``STRATEGIES``):
* ``'masked'``: each level's step runs on the whole batch; finished inputs keep their answer;
* ``'compact'``: the inputs still running are gathered into the smallest of a few
  fixed bucket sizes (B, 3B/4, B/2, ..., 1 with halfway sizes down to 64 rows: ``bucket_sizes``) before the step and scattered back, so
  later levels cost what the remaining inputs cost (one compiled cond per level and
  bucket); at batch 1 it is the masked program (nothing to compact). A program with
  ``step_rows`` (stepping networks) reads only the channels the level needs of those
  rows and writes back only the new level's channels.
Both give each input exactly what stepping it alone gives (a test checks it).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from stepnet_jax.core.model import StepCache

STRATEGIES = ('masked', 'compact')
# The strategy ``predict`` uses when none is given, per backend. CPU: measured with
# ``python -m stepnet_jax.adaptive --timing`` (README, 2 cores, batch 256): the study's
# SteppingNet, compact 144.2 vs masked 166.9 ms (learned policy, 52.0% of the top MACs),
# 111.4 vs 188.4 ms (confidence, 46.5%); at width 4, 429.6 vs 656.0 ms (learned, 54.9%).
# GPU and TPU: not measured; compact until someone does.
DEFAULT_STRATEGY = {'cpu': 'compact', 'gpu': 'compact', 'tpu': 'compact'}


class Prediction(NamedTuple):
  """What ``predict`` returns per input: its answer (``logits``), the level it stopped at and the
  MACs spent on it."""

  logits: jax.Array  # [B, classes]: each input's answer at its exit level
  exit_level: jax.Array  # int32 [B]
  macs: jax.Array  # int32 [B]: MACs spent on each input


@dataclasses.dataclass(frozen=True)
class Program:
  """A stepped computation (static: hashable, fixed per model).

  ``start(variables, x) -> carry`` and ``step(variables, carry, k) -> carry`` (k >= 1,
  static) are pure; every leaf of ``carry`` has the batch as leading axis and keeps its
  shape from level to level; ``logits(carry)`` is the current answer [B, classes].
  ``macs_to_reach[k]``: MACs per input spent to have level k's answer.
  ``step_rows(variables, carry, k, rows) -> carry`` (optional) steps only the batch rows
  ``rows`` (distinct indices) and leaves the others as they were; the compact strategy
  uses it. Without it, compact gathers whole carry rows, steps them and scatters them back.
  """

  num_levels: int
  macs_to_reach: tuple[int, ...]
  start: Callable[[Any, jax.Array], Any]
  step: Callable[[Any, Any, int], Any]
  logits: Callable[[Any], jax.Array]
  step_rows: Callable[[Any, Any, int, jax.Array], Any] | None = None

  def __post_init__(self):
    if len(self.macs_to_reach) != self.num_levels:
      raise ValueError(f'{len(self.macs_to_reach)} MAC counts for {self.num_levels} levels')
    if self.macs_to_reach and self.macs_to_reach[-1] >= 2**31:
      raise ValueError('MACs per input beyond int32')


def stepping_program(graphdef: nnx.GraphDef, num_levels: int, macs_to_reach: Sequence[int]) -> Program:
  """A reusable stepping network: the carry is the step cache (inputs, unit buffers, logits)."""

  def start(variables, x):
    c = nnx.merge(graphdef, variables, copy=True).start(x)
    return c.inputs, c.units, c.logits

  def step_rows(variables, carry, k, rows):
    inputs, units, logits = carry
    c = nnx.merge(graphdef, variables, copy=True).step(StepCache(inputs, units, logits, level=k - 1), k, rows)
    return c.inputs, c.units, c.logits

  return Program(
    num_levels,
    tuple(int(m) for m in macs_to_reach),
    start,
    lambda variables, carry, k: step_rows(variables, carry, k, None),
    lambda carry: carry[2],
    step_rows,
  )


def recompute_program(
  forwards: Sequence[Callable[[Any, jax.Array], jax.Array]], macs_to_reach: Sequence[int]
) -> Program:
  """Levels that share nothing: level k is ``forwards[k](variables, x)`` from scratch.

  The carry is (raw images, current logits).
  """
  forwards = tuple(forwards)
  return Program(
    len(forwards),
    tuple(int(m) for m in macs_to_reach),
    lambda v, x: (x, forwards[0](v, x)),
    lambda v, carry, k: (carry[0], forwards[k](v, carry[0])),
    lambda carry: carry[1],
  )


MIDPOINT_ROWS = 64  # buckets of at least this many rows also get the size halfway to the next


def bucket_sizes(batch: int, factor: int = 2) -> tuple[int, ...]:
  """B, ceil(B / f), ceil(B / f^2), ..., 1: the batch sizes the compact strategy steps at,
  with the size halfway between two neighbours added where both have at least
  ``MIDPOINT_ROWS`` rows (at B = 256: 256, 192, 128, 96, 64, 32, ...; at B = 128: 128, 96, 64,
  32, ...). Rows beyond the inputs still going are computed for nothing: with f = 2 the
  halfway sizes bound that waste by a third of the bucket instead of a half, where a step's
  time follows its rows, at one more compiled branch per level and size; below 64 rows a
  step's fixed cost dominates and the branch does not pay."""
  sizes = [batch]
  while sizes[-1] > 1:
    sizes.append(max(1, -(-sizes[-1] // factor)))
  with_midpoints = []
  for big, small in zip(sizes, sizes[1:] + [0]):
    with_midpoints.append(big)
    if small >= MIDPOINT_ROWS and big - small > 1:
      with_midpoints.append((big + small) // 2)
  return tuple(with_midpoints)


def _step(program: Program, variables, carry, k: int, rows: jax.Array | None, size: int, batch: int):
  """Level ``k`` for the batch rows ``rows[:size]`` (the whole batch when ``size == batch``)."""
  if size == batch:  # the whole batch: a plain step, no gathers
    return program.step(variables, carry, k)
  rows = rows[:size]
  if program.step_rows is not None:
    return program.step_rows(variables, carry, k, rows)
  sub = program.step(variables, jax.tree.map(lambda a: a[rows], carry), k)
  return jax.tree.map(lambda a, s: a.at[rows].set(s, unique_indices=True), carry, sub)


def predict(
  program: Program,
  variables,
  x: jax.Array,
  policy,
  valid: jax.Array | None = None,
  *,
  strategy: str | None = None,
  bucket_factor: int = 2,
) -> Prediction:
  """Each input's answer under ``policy`` from ONE program (jit it, or use ``make_predict``).

  ``valid`` (bool [B], optional) marks the real inputs of a padded batch: the others stop
  at level 0 and never keep a level running. ``strategy``: default ``default_strategy()``.
  """
  strategy = strategy or default_strategy()
  if strategy not in STRATEGIES:
    raise ValueError(f'unknown strategy {strategy!r}; choose from {", ".join(STRATEGIES)}')
  check_policy_fits(program, policy)
  top = program.num_levels - 1
  carry = program.start(variables, x)
  logits = program.logits(carry)
  batch, num_classes = logits.shape
  stop, pstate = policy.stop(logits, jnp.int32(0), policy.init(batch, num_classes))
  if batch == 1:
    strategy = 'masked'  # nothing to compact: skip the gathers and scatters
  active = ~stop if valid is None else ~stop & valid
  sizes = bucket_sizes(batch, bucket_factor) if strategy == 'compact' else (batch,)
  size_array = jnp.asarray(sizes, jnp.int32)
  state = (carry, logits, active, jnp.zeros((batch,), jnp.int32), pstate)

  def level_up(state, k):
    carry, out, active, exit_level, pstate = state
    if len(sizes) == 1:
      carry = _step(program, variables, carry, k, None, batch, batch)
    else:
      rows = jnp.argsort((~active).astype(jnp.int32), stable=True)  # the running inputs first
      which = (size_array >= active.sum()).sum() - 1  # the smallest bucket that holds them
      for j, size in enumerate(sizes):  # two-way conds, not one switch: see the module docstring
        carry = jax.lax.cond(
          which == j,
          functools.partial(_step, program, variables, k=k, rows=rows, size=size, batch=batch),
          lambda c: c,
          carry,
        )
    logits = program.logits(carry)
    stop, pstate = policy.stop(logits, jnp.int32(k), pstate)
    out = jnp.where(active[:, None], logits, out)
    exit_level = jnp.where(active, k, exit_level)
    active = active & ~stop & (k < top)
    return carry, out, active, exit_level, pstate

  for k in range(1, top + 1):  # a level nobody needs is skipped by its cond
    state = jax.lax.cond(state[2].any(), functools.partial(level_up, k=k), lambda s: s, state)
  _, out, _, exit_level, _ = state
  macs = jnp.asarray(program.macs_to_reach, jnp.int32)[exit_level]
  return Prediction(out, exit_level, macs)


def check_policy_fits(program: Program, policy) -> None:
  """ValueError unless the static facts a policy holds about a network are this program's:
  a MAC table (``MacBudget.macs_to_reach``) must be the program's ``macs_to_reach`` (another
  network's table, or one with a level too few, would make it stop at the wrong MACs), and a
  level count (``Learned.num_levels``) the program's."""
  table = getattr(policy, 'macs_to_reach', None)
  if table is not None and tuple(int(m) for m in table) != program.macs_to_reach:
    raise ValueError(
      f"{type(policy).__name__}.macs_to_reach {tuple(table)} is not this network's {program.macs_to_reach} "
      f'({program.num_levels} levels): build the policy from the same network (Stepper.macs_to_reach)'
    )
  levels = getattr(policy, 'num_levels', None)
  if levels is not None and int(levels) != program.num_levels:
    raise ValueError(
      f'this {type(policy).__name__} policy was made for {levels} levels; the network has {program.num_levels}'
    )


@functools.lru_cache(maxsize=64)
def make_predict(program: Program, strategy: str | None = None, bucket_factor: int = 2) -> Callable:
  """Jitted ``(variables, x, policy, valid=None) -> Prediction``, one per (program, strategy):
  it compiles once per batch shape and policy kind (a policy's knobs are traced)."""
  return jax.jit(
    functools.partial(predict, program, strategy=strategy or default_strategy(), bucket_factor=bucket_factor)
  )


def default_strategy() -> str:
  """The batch strategy ``predict`` uses when none is given: ``DEFAULT_STRATEGY`` of this backend ('masked' for one it
  does not list)."""
  return DEFAULT_STRATEGY.get(jax.default_backend(), 'masked')
