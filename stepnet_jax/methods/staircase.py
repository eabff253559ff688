"""Level x precision stepping: the bit-op cost of every step between (level, planes) states
of one network (``PlaneCosts``), the path a staircase takes through them (``staircase_path``:
levels only, bits only, greedy by validation accuracy gained per bit-op, or ``optimal``: the
best of every monotone path by exact search) and the cumulative bit-ops and accuracy along it
(``walk``)."""

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


KINDS = ('combined', 'optimal', 'levels_only', 'bits_only')


def staircase_path(kind: str, accuracy: np.ndarray | None, costs: PlaneCosts) -> list[tuple[int, int]]:
  """The states (level, planes) a staircase visits, first to last.

  ``levels_only``: every level at N planes; ``bits_only``: the top level, plane by plane;
  ``combined``: from (0, 1), at each state the level or plane step with the most
  validation accuracy gained per bit-op (``accuracy`` [K, N], planes 1..N), up to (K-1, N);
  ``optimal``: ``optimal_path`` on ``accuracy``.
  """
  top, n = costs.num_levels - 1, costs.n
  if kind == 'optimal':
    return optimal_path(accuracy, costs)[0]
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


def walk(
  path: Sequence[tuple[int, int]], costs: PlaneCosts, accuracy: np.ndarray, validation: np.ndarray | None = None
) -> list[dict]:
  """``[{"state", "bitops" (cumulative), "accuracy"[, "validation_accuracy"]}]`` along
  ``path`` (its first state reached by a direct forward); ``accuracy`` and ``validation``
  are [K, N] grids."""
  spent, out = costs.direct(*path[0]), []
  for i, (k, b) in enumerate(path):
    if i:
      spent += costs.step(path[i - 1], (k, b))
    point = {'state': [int(k), int(b)], 'bitops': int(spent), 'accuracy': float(accuracy[k, b - 1])}
    if validation is not None:
      point['validation_accuracy'] = float(validation[k, b - 1])
    out.append(point)
  return out


def monotone_paths(num_levels: int, n: int) -> list[list[tuple[int, int]]]:
  """Every staircase through the grid: any first state (a direct forward), then one level or
  one plane up at a time, stopping at any state (where more levels or planes no longer pay)."""
  top = num_levels - 1

  def tails(k: int, b: int) -> list[list[tuple[int, int]]]:
    nxt = [(k + 1, b)] * (k < top) + [(k, b + 1)] * (b < n)
    return [[(k, b)]] + [[(k, b)] + t for s in nxt for t in tails(*s)]

  return [p for k in range(num_levels) for b in range(1, n + 1) for p in tails(k, b)]


def accuracy_at(points: Sequence[dict], bitops: float, key: str = 'accuracy') -> float:
  """A staircase's accuracy once ``bitops`` are spent: its last state within them (0 before the first)."""
  reached = [p[key] for p in points if p['bitops'] <= bitops]
  return reached[-1] if reached else 0.0


def area(points: Sequence[dict], horizon: float, key: str = 'accuracy') -> float:
  """The area under accuracy against cumulative bit-ops from 0 to ``horizon``, over ``horizon``
  (the mean accuracy a budget drawn uniformly in [0, horizon] buys)."""
  edges = sorted({0.0, float(horizon)} | {float(p['bitops']) for p in points if p['bitops'] < horizon})
  return sum(accuracy_at(points, a, key) * (b - a) for a, b in zip(edges, edges[1:])) / horizon


def shortfall(points: Sequence[dict], others: Sequence[Sequence[dict]], key: str = 'accuracy') -> float:
  """How far ``points`` falls below the best of ``others`` at its worst budget (0: never below)."""
  budgets = {p['bitops'] for q in [points, *others] for p in q}
  return max(0.0, *(accuracy_at(q, c, key) - accuracy_at(points, c, key) for q in others for c in budgets))


def optimal_path(accuracy: np.ndarray, costs: PlaneCosts, decimals: int = 6) -> tuple[list[tuple[int, int]], dict]:
  """(the path, a record): exact search over ``monotone_paths`` on the ``accuracy`` grid
  (the validation split's). The criterion: the smallest ``shortfall`` below the levels-only
  and bits-only staircases at any budget (0 where some path is never below both), then the
  largest ``area`` up to the bit-ops of the top level's direct N-plane forward (the
  levels-only staircase's total). A path may stop before (K-1, N): where more planes lower
  the accuracy, stopping is the only way to stay above a baseline that reaches the better
  state. ``decimals``: shortfalls are compared rounded (float noise is not a difference)."""
  top, n = costs.num_levels - 1, costs.n
  horizon = costs.direct(top, n)
  baselines = [walk(staircase_path(kind, None, costs), costs, accuracy) for kind in ('levels_only', 'bits_only')]
  best, count, widest = None, 0, None
  for path in monotone_paths(costs.num_levels, n):
    points = walk(path, costs, accuracy)
    key = (-round(shortfall(points, baselines), decimals), area(points, horizon))
    count += 1
    if best is None or key > best[0]:
      best = (key, path)
    if widest is None or key[1] > widest[0][1]:
      widest = (key, path)
  record = {
    'paths_searched': count,
    'criterion': 'smallest shortfall below levels_only and bits_only at any budget, then the largest area under '
    "accuracy vs cumulative bit-ops up to the top level's direct N-plane forward",
    'horizon_bitops': int(horizon),
    'shortfall': -best[0][0],
    'area': best[0][1],
    'largest_area_of_any_path': {
      'path': [list(s) for s in widest[1]],
      'area': widest[0][1],
      'shortfall': -widest[0][0],
    },
    'baseline_areas': {kind: area(points, horizon) for kind, points in zip(('levels_only', 'bits_only'), baselines)},
  }
  return best[1], record
