"""MAC budgets: fast subnet MAC counts from per-level neuron counts, feasibility checks,
and sizing plain networks to a budget.

Construction moves single neurons between levels and re-counts MACs after every move,
so it needs MACs as a function of the level counts of its neuron groups alone
(``core.wiring``: a chain layer's neurons, a residual stream, a block's inner channels).
With the mask rule, output neuron o of layer l reads every input neuron of level <=
level(o), so with ``n`` the counts per level of the group l writes and ``A`` the
cumulative counts of the group it reads,

    MACs_l(subnet k) = f_l * sum_{j <= k} n[j] * A[j],

where ``f_l`` is the layer's MACs per kept (input, output) channel pair (kernel area x
output positions, or spatial positions for a dense layer). A triangular layer keeps
``sum_o ceil((o + 1) a / b)`` of the ``a x b`` pairs inside a level block instead of
all; a depthwise layer (each channel reads its own input channel) ``N(k)`` pairs. Without
the mask rule the subnet is the dense prefix: ``f_l * N(k) * A(k)``. The head adds
``f_head * N_last(k)``. A residual stream's identity shortcut adds, it multiplies nothing.
These formulas are a second path to the MACs the layers count from their masks
(``SteppingModel.delta_macs``); the tests check they agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
from flax import nnx

from stepnet_jax.config import SettingsError
from stepnet_jax.core import wiring
from stepnet_jax.core.model import SteppingModel
from stepnet_jax.models import zoo


def triangle_pairs(a: int, b: int) -> int:
  """Kept pairs of a triangular a-input, b-output level block: sum_o ceil((o + 1) a / b)."""
  if a == 0 or b == 0:
    return 0
  o = np.arange(1, b + 1, dtype=np.int64)
  return int(((o * a + b - 1) // b).sum())


@dataclasses.dataclass(frozen=True)
class MacModel:
  """MAC geometry of a model over its neuron groups (``core.wiring``): per linear layer, the
  groups it reads and writes and its MACs per kept connection.

  ``names`` are the groups (a chain layer's neurons; a residual stream; a block's inner
  channels), the unit of construction's counts. A ``triangular`` link keeps only the
  Any-Width-Networks triangle inside each level block; a ``depthwise`` link one pair per channel.
  """

  names: tuple[str, ...]
  links: tuple[wiring.Link, ...]
  head_source: str
  head_factor: int
  input_channels: int
  mask_rule: bool = True
  private_heads: bool = False

  @classmethod
  def of(cls, model: SteppingModel) -> MacModel:
    """The MAC geometry of a built model (raises ``wiring.NotWired`` for a unit that does not
    list its links)."""
    w = model.wiring()
    return cls(
      w.groups,
      w.links,
      w.head_source,
      model.head.spatial * model.head.num_classes,
      model.input_shape[-1],
      model.mask_rule,
      model.head.private,
    )

  def without_padding(self) -> MacModel:
    """The same model counting only the kernel taps that read the input, not its zero padding
    (``Link.image_factor``): the MACs XLA's cost analysis counts, for FLOP audits."""
    links = tuple(dataclasses.replace(link, factor=link.image_factor or link.factor) for link in self.links)
    return dataclasses.replace(self, links=links)

  def subnet_macs(self, counts: Sequence[np.ndarray]) -> np.ndarray:
    """Cumulative MACs of subnets 0..K-1 given each group's neurons per level (in ``names``
    order): int64 [K]."""
    by_group = {name: np.asarray(c, np.int64) for name, c in zip(self.names, counts)}
    k = len(counts[0])
    image = np.zeros(k, np.int64)
    image[0] = self.input_channels
    total = np.zeros(k, np.int64)
    for link in self.links:
      prev = image if link.source is None else by_group[link.source]
      n = by_group[link.target]
      a_cum, n_cum = np.cumsum(prev), np.cumsum(n)
      if link.depthwise:  # channel c reads its own input channel only, at its own level
        pairs = n_cum
      elif not self.mask_rule:
        pairs = n_cum * a_cum
      else:
        lower = n * (a_cum - prev)  # every input of a lower level
        own = (
          np.array([triangle_pairs(int(x), int(y)) for x, y in zip(prev, n)], np.int64) if link.triangular else n * prev
        )  # inputs of the same level
        pairs = np.cumsum(lower + own)
      total += link.factor * pairs
    # The shared head reads each level's features once; exit k's private head all of levels <= k,
    # and a stepped subnet k has run the private heads of every exit up to k.
    last = by_group[self.head_source]
    head_inputs = np.cumsum(np.cumsum(last)) if self.private_heads else np.cumsum(last)
    return total + self.head_factor * head_inputs

  def counts_of(self, levels: Mapping[str, np.ndarray], num_levels: int) -> list[np.ndarray]:
    """Per-group neurons per level from per-neuron levels (-1 = removed, not counted)."""
    return [np.bincount(np.asarray(levels[n])[np.asarray(levels[n]) >= 0], minlength=num_levels) for n in self.names]


def dense_macs(model_name: str, *, input_shape: Sequence[int], num_classes: int, width: float = 1.0) -> int:
  """MACs of a plain single-level network at ``width`` (every connection kept)."""
  model = nnx.eval_shape(
    lambda: zoo.build_model(model_name, num_classes=num_classes, input_shape=input_shape, num_levels=1, width=width)
  )
  return int(model.delta_macs().sum())


def layer_channels(model_name: str, *, input_shape: Sequence[int], num_classes: int, width: float) -> dict[str, int]:
  """Channels of every hidden layer of ``model_name`` at ``width``."""
  model = nnx.eval_shape(
    lambda: zoo.build_model(model_name, num_classes=num_classes, input_shape=input_shape, num_levels=1, width=width)
  )
  return {name: int(sum(sizes)) for name, sizes in model.assignment}


def width_for_budget(
  model_name: str, budget_macs: float, *, input_shape: Sequence[int], num_classes: int, max_width: float = 8.0
) -> tuple[float, int]:
  """Largest uniform width (to 1/1000) whose dense network fits ``budget_macs``: (width, MACs).

  Widths map to channels by rounding, so the search is over the distinct channel
  plans; the result is the widest plan whose MACs do not exceed the budget.
  """

  def macs(w):
    return dense_macs(model_name, input_shape=input_shape, num_classes=num_classes, width=w)

  lo, hi = 1e-3, max_width
  if macs(lo) > budget_macs:
    raise SettingsError(
      f'{budget_macs:,.0f} MACs is below the smallest {model_name} (one channel per layer, {macs(lo):,} MACs)'
    )
  if macs(hi) <= budget_macs:
    raise SettingsError(f'{budget_macs:,.0f} MACs is above {model_name} at width {max_width} ({macs(hi):,} MACs)')
  for _ in range(40):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if macs(mid) <= budget_macs else (lo, mid)
  w = float(np.floor(lo * 1000) / 1000)
  if macs(w) != macs(lo):  # rounding down crossed a channel step: keep the exact width
    w = lo
  return w, macs(w)


def check_budgets(budgets: Sequence[float], base_macs: int, mac_model: MacModel, channels: Sequence[int]) -> np.ndarray:
  """Validates cumulative budgets (fractions of ``base_macs``); returns them in MACs.

  Rejects budgets that do not increase strictly, a level-0 budget below one neuron per
  layer, and a top budget above the widened network (all its neurons in every subnet).
  """
  b = np.asarray(budgets, np.float64)
  if b.ndim != 1 or len(b) < 1:
    raise SettingsError('give one budget per level')
  if np.any(b <= 0) or np.any(np.diff(b) <= 0):
    raise SettingsError(f'budgets must be positive and strictly increasing, got {tuple(budgets)}')
  k = len(b)
  macs = b * base_macs
  one = [np.eye(k, dtype=np.int64)[0] for _ in channels]
  smallest = int(mac_model.subnet_macs(one)[0])
  if macs[0] < smallest:
    raise SettingsError(
      f'level-0 budget {b[0]:.4f} x {base_macs:,} = {macs[0]:,.0f} MACs is below the smallest '
      f'possible subnet (one neuron per layer: {smallest:,} MACs = {smallest / base_macs:.4f})'
    )
  full = [np.eye(k, dtype=np.int64)[0] * c for c in channels]
  widest = int(mac_model.subnet_macs(full)[0])
  if macs[-1] > widest:
    raise SettingsError(
      f'top budget {b[-1]:.4f} x {base_macs:,} = {macs[-1]:,.0f} MACs exceeds the widened network '
      f'({widest:,} MACs = {widest / base_macs:.4f}); widen it more or lower the budget'
    )
  return macs
