"""Which neuron groups each linear layer reads and writes: the network as construction sees it.

A *group* is a set of neurons that share one level assignment: a name of the model's
``assignment`` (a chain layer's output; a residual stream that the stem and every block of
a stage write; a block's inner channels). Construction scores, moves and removes neurons
per group, so a stream channel moves in every block at once and the identity shortcut keeps
``level(i) <= level(o)``.

Each linear layer is one ``Link``: it reads group ``source`` (None: the image channels)
and writes group ``target``. A *depthwise* link reads only the same-index channel of its
source, which is its own group, so its output channel has its input channel's level. The
units list their links (``unit.links``); ``links_of`` walks a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from stepnet_jax.config import SettingsError

# Where a linear layer sits in the model's state: ('units', 3) for a chain unit,
# ('units', 3, 'conv1') for a layer inside a block.
Path = tuple


@dataclasses.dataclass(frozen=True)
class Link:
  """One linear layer: reads group ``source`` (None = the image channels), writes ``target``.

  ``factor`` is its MACs per kept (input, output) channel pair (kernel area x output
  positions; positions for a dense layer), ``triangular`` whether it keeps only Any-Width
  Networks' triangle inside a level block, ``depthwise`` whether each output channel reads
  only its own input channel (then ``source == target``). ``image_factor`` (0: the same as
  ``factor``) leaves out the kernel taps that read zero padding, as XLA's cost analysis does.
  """

  path: Path
  source: str | None
  target: str
  factor: int
  triangular: bool = False
  depthwise: bool = False
  image_factor: int = 0


@dataclasses.dataclass(frozen=True)
class Wiring:
  """A model's links in forward order, its groups (the assignment's names, in order) and the
  group the exits' classifier reads."""

  links: tuple[Link, ...]
  groups: tuple[str, ...]
  head_source: str

  def writers(self, group: str) -> tuple[Link, ...]:
    """The links that write ``group`` (a stream: the stem and every block of its stage)."""
    return tuple(link for link in self.links if link.target == group)

  def readers(self, group: str) -> tuple[Link, ...]:
    """The links that read ``group`` (depthwise links, which write it too, included)."""
    return tuple(link for link in self.links if link.source == group)


class NotWired(SettingsError):
  """A unit that does not list its links, or links that contradict each other: construction
  cannot re-level the network (a command ends on this one-line message)."""


def links_of(units: Sequence, groups: Sequence[str], input_shape: Sequence[int]) -> Wiring:
  """The ``Wiring`` of a stack of units (``SteppingModel.units``) over inputs of
  ``input_shape``; each unit lists its own links (``unit.links(path, source, shape)``)."""
  links, source, shape = [], None, tuple(input_shape)
  for i, unit in enumerate(units):
    if not hasattr(unit, 'links'):
      raise NotWired(f'unit {i} is a {type(unit).__name__}, which does not list the groups its layers read and write')
    unit_links, source, shape = unit.links(('units', i), source, shape)
    links.extend(unit_links)
  unknown = {g for link in links for g in (link.source, link.target) if g is not None} - set(groups)
  if unknown:
    raise NotWired(f'layers write groups {sorted(unknown)} that the level assignment does not name')
  return Wiring(tuple(links), tuple(groups), source)
