"""Level x precision stepping: the bit-op cost of every step between (level, planes) states
of one network (``PlaneCosts``), the path a staircase takes through them (``staircase_path``:
levels only, bits only, or greedy by validation accuracy gained per bit-op) and the
cumulative bit-ops and accuracy along it (``walk``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from stepnet_jax.core.model import SteppingModel
from stepnet_jax.methods.progressive import Bits, check_ladder, uniform_ladder
from stepnet_jax.models import quantized


@dataclasses.dataclass(frozen=True)
class PlaneCosts:
  """Bit-ops per input of every step between (level, rung) states of one network.

  ``ops[b]`` [layers, K] is ``quantized.bitops`` at rung b of the plane ladder (row 0 the
  first layer, the last row the head); bit-ops are linear in each neuron's planes, so
  ``ops[b + 1][0] - ops[b][0]`` is what the first layer's added planes cost."""

  ops: np.ndarray  # [N + 1, layers, K], ops[0] = 0
  num_levels: int
  n: int

  @classmethod
  def of(cls, model: SteppingModel, n: int, act_bits: int, ladder: Sequence[Bits] | None = None) -> PlaneCosts:
    """Costs on ``ladder`` (``uniform_ladder`` by default: rung b = b planes everywhere)."""
    ladder = uniform_ladder(model, n) if ladder is None else ladder
    check_ladder(model, ladder, n)
    ops = [quantized.bitops(model, rung, act_bits) for rung in ladder]
    return cls(np.stack([np.zeros_like(ops[0])] + ops), model.num_levels, n)

  def direct(self, level: int, planes: int) -> int:
    """A forward of subnet ``level`` at ``planes`` planes from scratch."""
    return int(self.ops[planes][:, : level + 1].sum())

  def level_step(self, level: int, planes: int) -> int:
    """(level, planes) -> (level + 1, planes): only the new level's connections."""
    return int(self.ops[planes][:, level + 1].sum())

  def plane_step(self, level: int, planes: int) -> int:
    """(level, rung b) -> (level, rung b + 1): the planes the first layer's neurons gain
    (accumulated: one 1-bit plane each on the uniform ladder), then every later layer of
    the subnet recomputed at rung b + 1."""
    first = self.ops[planes + 1][0, : level + 1] - self.ops[planes][0, : level + 1]
    return int(first.sum() + self.ops[planes + 1][1:, : level + 1].sum())

  def step(self, state: tuple[int, int], to: tuple[int, int]) -> int:
    """Bit-ops of the single step ``state`` -> ``to`` (one level up or one rung up); ValueError otherwise."""
    (k, b), (k2, b2) = state, to
    if (k2, b2) == (k + 1, b):
      return self.level_step(k, b)
    if (k2, b2) == (k, b + 1):
      return self.plane_step(k, b)
    raise ValueError(f'no single step from {state} to {to}')


def staircase_path(kind: str, accuracy: np.ndarray | None, costs: PlaneCosts) -> list[tuple[int, int]]:
  """The states (level, planes) a staircase visits, first to last.

  ``levels_only``: every level at N planes; ``bits_only``: the top level, plane by plane;
  ``combined``: from (0, 1), at each state the level or plane step with the most
  validation accuracy gained per bit-op (``accuracy`` [K, N], planes 1..N), up to (K-1, N).
  """
  top, n = costs.num_levels - 1, costs.n
  if kind == 'levels_only':
    return [(k, n) for k in range(top + 1)]
  if kind == 'bits_only':
    return [(top, b) for b in range(1, n + 1)]
  if kind != 'combined':
    raise ValueError(f'unknown staircase {kind!r}')
  state, path = (0, 1), [(0, 1)]
  while state != (top, n):
    k, b = state
    options = [s for s in ((k + 1, b), (k, b + 1)) if s[0] <= top and s[1] <= n]
    state = max(options, key=lambda s: (accuracy[s[0], s[1] - 1] - accuracy[k, b - 1]) / costs.step((k, b), s))
    path.append(state)
  return path


def walk(path: Sequence[tuple[int, int]], costs: PlaneCosts, accuracy: np.ndarray) -> list[dict]:
  """``[{"state", "bitops" (cumulative), "accuracy"}]`` along ``path`` (its first state
  reached by a direct forward)."""
  spent, out = costs.direct(*path[0]), []
  for i, (k, b) in enumerate(path):
    if i:
      spent += costs.step(path[i - 1], (k, b))
    out.append({'state': [int(k), int(b)], 'bitops': int(spent), 'accuracy': float(accuracy[k, b - 1])})
  return out
