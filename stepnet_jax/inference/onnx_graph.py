"""The ONNX graph being written by ``onnx_lowering``: nodes, initializers, the names of
jaxpr values, the symbolic batch size, and values kept in pieces (``Pieces``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from jax.extend import core as jcore
from onnx import helper, numpy_helper

OPSET = 18
INT64_MAX = np.iinfo(np.int64).max


def onnx_dtype(dtype) -> int:
  """The ONNX element type of a numpy dtype."""
  return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def is_static(d) -> bool:
  """Whether a dimension is a number (not the symbolic batch size)."""
  return isinstance(d, (int, np.integer))


def same_dim(a, b) -> bool:
  """Whether two dimensions (ints or symbolic) are equal."""
  if is_static(a) and is_static(b):
    return int(a) == int(b)
  return not is_static(a) and not is_static(b) and str(a) == str(b)


@dataclasses.dataclass(frozen=True)
class Pieces:
  """A value held in pieces along one axis, never assembled unless an operation needs it
  whole: the caches' full-width buffers, whose level blocks are written one step at a time.

  ``parts``: contiguous ``(lo, hi, source)`` covering ``[0, shape[axis])``; a source is a
  fill value (a float: the zeros of levels not computed yet) or ``(name, base)``, an ONNX
  value whose index 0 on ``axis`` is position ``base`` of the whole.
  """

  axis: int
  shape: tuple
  dtype: Any
  parts: tuple

  def cut(self, lo: int, hi: int) -> tuple:
    """The parts inside ``[lo, hi)``, clipped to it."""
    out = []
    for a, b, src in self.parts:
      a, b = max(a, lo), min(b, hi)
      if a < b:
        out.append((a, b, src))
    return tuple(out)


class Graph:
  """The nodes, initializers and names of the graph being written."""

  def __init__(self, batch_source: tuple[str, int] | None):
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []
    self.names: dict[Any, str] = {}  # jaxpr Var -> ONNX value name
    self.known: dict[Any, np.ndarray] = {}  # jaxpr Var -> its value, when it does not depend on an input
    self.pieces: dict[Any, Pieces] = {}  # jaxpr Var -> its parts, while it is kept in pieces
    self.extent: dict[str, Any] = {}  # ONNX name of a part -> its length along the pieces' axis
    self._count = 0
    self._batch_source = batch_source  # (graph input, axis) holding the symbolic batch size
    self._batch: str | None = None
    self._consts: dict[tuple, str] = {}

  def fresh(self, hint: str = 'v') -> str:
    """A name not used yet."""
    self._count += 1
    return f'{hint}_{self._count}'

  def node(self, op: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1, **attrs) -> list[str]:
    """Adds one node; returns its output names."""
    outs = [self.fresh(op.lower()) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
    self.nodes.append(helper.make_node(op, list(inputs), outs, **attrs))
    return outs

  def one(self, op: str, inputs: Sequence[str], **attrs) -> str:
    """Adds a node with one output; returns its name."""
    return self.node(op, inputs, 1, **attrs)[0]

  def constant(self, value, dtype=None) -> str:
    """An initializer holding ``value`` (small ones shared by value)."""
    array = np.asarray(value, dtype=dtype)
    key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 64 else None
    if key is not None and key in self._consts:
      return self._consts[key]
    name = self.fresh('const')
    self.initializers.append(numpy_helper.from_array(array, name))
    if key is not None:
      self._consts[key] = name
    return name

  def batch(self) -> str:
    """A 1-element int64 tensor holding the batch size (read once from the input's shape)."""
    if self._batch_source is None:
      raise NotImplementedError('a symbolic dimension appears, but no input carries the batch axis')
    if self._batch is None:
      source, axis = self._batch_source
      shape = self.one('Shape', [source])
      self._batch = self.one('Slice', [shape, self.constant([axis], np.int64), self.constant([axis + 1], np.int64)])
    return self._batch

  def shape(self, dims: Sequence) -> str:
    """An int64 shape tensor for ``dims`` (ints or the symbolic batch size)."""
    if all(is_static(d) for d in dims):
      return self.constant([int(d) for d in dims], np.int64)
    parts = []
    for d in dims:
      if is_static(d):
        parts.append(self.constant([int(d)], np.int64))
      elif str(d) == 'b':
        parts.append(self.batch())
      else:
        raise NotImplementedError(f'symbolic dimension {d} (only the batch size b is supported)')
    return self.one('Concat', parts, axis=0)

  def bind(self, var, out) -> None:
    """Records what ``var`` holds: an ONNX name, pieces or a known value. An inlined call's
    jaxpr is the same object each time it is called, so a variable is bound once per call."""
    self.names.pop(var, None)
    self.pieces.pop(var, None)
    self.known.pop(var, None)
    if isinstance(out, str):
      self.names[var] = out
    elif isinstance(out, Pieces):
      self.pieces[var] = out
    else:
      self.known[var] = out

  def value(self, atom) -> np.ndarray | None:
    """The value of a literal or of a variable computed from constants only; else None."""
    if isinstance(atom, jcore.Literal):
      return np.asarray(atom.val, dtype=atom.aval.dtype)
    return self.known.get(atom)

  def read(self, atom) -> str:
    """The ONNX name of a jaxpr variable or literal (an initializer for a known value; a
    value in pieces is assembled)."""
    if isinstance(atom, jcore.Literal):
      return self.constant(self.value(atom))
    if atom not in self.names and atom in self.pieces:
      self.names[atom] = assemble(self, self.pieces[atom])
    if atom not in self.names:
      if atom not in self.known:
        raise KeyError(f'{atom} is neither an input nor computed yet')
      self.names[atom] = self.constant(self.known[atom])
    return self.names[atom]


def static_shape(aval) -> bool:
  """Whether every dimension of ``aval`` is a number."""
  return all(is_static(d) for d in aval.shape)


def part(g: Graph, p: Pieces, lo: int, hi: int, src) -> str:
  """The ONNX value of ``[lo, hi)`` of one part of ``p``."""
  shape = list(p.shape)
  shape[p.axis] = hi - lo
  if not isinstance(src, tuple):  # a fill
    return g.one('Expand', [g.constant(np.asarray(src, dtype=p.dtype)), g.shape(shape)])
  name, base = src
  if lo - base == 0 and same_dim(g.extent.get(name), hi - lo):
    return name
  starts, ends, axes = (
    g.constant([lo - base], np.int64),
    g.constant([hi - base], np.int64),
    g.constant([p.axis], np.int64),
  )
  out = g.one('Slice', [name, starts, ends, axes])
  g.extent[out] = hi - lo
  return out


def assemble(g: Graph, p: Pieces) -> str:
  """``p`` as one ONNX value: its parts concatenated."""
  names = [part(g, p, lo, hi, src) for lo, hi, src in p.parts]
  return names[0] if len(names) == 1 else g.one('Concat', names, axis=p.axis)


def read_value(g: Graph, out) -> str:
  """The ONNX name of an output of ``_emit``: a name, a known value or pieces."""
  if isinstance(out, str):
    return out
  if isinstance(out, Pieces):
    return assemble(g, out)
  return g.constant(out)


def value_info(name: str, shape, dtype) -> onnx.ValueInfoProto:
  """A graph input or output: its name, element type and shape (``batch`` for the symbolic size)."""
  dims = [int(d) if is_static(d) else 'batch' for d in shape]
  return helper.make_tensor_value_info(name, onnx_dtype(dtype), dims)


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
  """The names a node's subgraphs (If, Loop, Scan bodies) read, outer-scope values among them."""
  names: set[str] = set()
  for attr in node.attribute:
    for body in [attr.g] if attr.HasField('g') else list(attr.graphs):
      for inner in body.node:
        names.update(inner.input)
        names.update(_subgraph_reads(inner))
  return names


def keep_outputs(model: onnx.ModelProto, outputs: set[str]) -> None:
  """Cuts ``model`` down, in place, to the graph outputs named in ``outputs`` and what they
  need: the nodes that compute them, the inputs and initializers those read."""
  graph = model.graph
  kept = [o for o in graph.output if o.name in outputs]
  live = {o.name for o in kept}
  nodes = []
  for node in reversed(graph.node):
    if any(name in live for name in node.output):
      nodes.append(node)
      live.update(node.input)
      live.update(_subgraph_reads(node))
  nodes.reverse()
  parts = {
    'output': kept,
    'node': nodes,
    'input': [i for i in graph.input if i.name in live],
    'initializer': [t for t in graph.initializer if t.name in live],
    'value_info': [v for v in graph.value_info if v.name in live],
  }
  for field, values in parts.items():
    values = list(values)
    graph.ClearField(field)
    getattr(graph, field).extend(values)
  onnx.checker.check_model(model)
