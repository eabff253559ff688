"""A jaxpr -> ONNX lowering for the operations the step functions use.

``lower(fn, args, input_names, output_names)`` traces ``fn`` once (``jax.make_jaxpr``, the
batch axis may be ``jax.export``'s symbolic ``b``) and writes one ONNX node (or a few)
per jaxpr equation; closed-over arrays (the network's parameters) become initializers.
The set covers what start, step and the direct forward of the zoo's networks trace to:
element-wise arithmetic and comparisons, casts, ``broadcast_in_dim``/``reshape``/
``slice``/``pad``/``concatenate``/``stack``, ``dynamic_update_slice`` at constant offsets
(the cache writes), ``dot_general``, ``conv_general_dilated`` (grouped and dilated),
``reduce_window_max`` (max pooling), ``reduce_sum``/``reduce_max``, ``argmax``, and calls
(``jit``, ``custom_jvp_call``, ``custom_vjp_call``), which are inlined. Anything else raises
``NotImplementedError`` naming the primitive.

Why not an exporter from PyPI: jax2onnx (0.17.1) pins orbax-checkpoint below this project's
pin, and the max pooling it writes is rejected by onnxruntime ("Unsupported pooling size").
The rules are in ``onnx_rules``, the graph under construction in ``onnx_graph``;
``lower_blocks`` passes the caches' buffers in level blocks (``Pieces``), so a step reads
and writes only the blocks it needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np
import onnx
from jax.extend import core as jcore
from onnx import helper

from stepnet_jax.inference.onnx_fuse import fold_channel_affine
from stepnet_jax.inference.onnx_graph import (
  OPSET,
  Graph,
  Pieces,
  is_static,
  onnx_dtype,
  part,
  read_value,
  same_dim,
  static_shape,
  value_info,
)
from stepnet_jax.inference.onnx_rules import ELEMENTWISE, RULES, check_in_bounds, inverse_permutation, iota

__all__ = ['OPSET', 'Lowered', 'lower', 'lower_blocks', 'part_name', 'supported_primitives']

# Calls whose body is inlined: primitive -> the parameter holding the (closed) jaxpr.
_CALLS = {'jit': 'jaxpr', 'pjit': 'jaxpr', 'custom_jvp_call': 'call_jaxpr', 'custom_vjp_call': 'call_jaxpr'}


def supported_primitives() -> tuple[str, ...]:
  """The jaxpr primitives this lowering writes (calls are inlined)."""
  return tuple(sorted(set(RULES) | set(ELEMENTWISE) | set(_CALLS) | {'iota', 'dim_as_value'}))


def _emit(g: Graph, jaxpr: jcore.Jaxpr, consts: Sequence, inputs: Sequence[str]) -> list[str]:
  """Writes ``jaxpr``'s equations; returns the names of its outputs."""
  for var, value in zip(jaxpr.constvars, consts):
    g.bind(var, np.asarray(value))
  for var, atom in zip(jaxpr.invars, inputs):
    g.bind(var, atom)
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    values = [g.value(a) for a in eqn.invars]
    pieced = _in_pieces(g, eqn, values)
    if pieced is not None:
      outs = [pieced]
    elif name in _CALLS:
      inner = eqn.params[_CALLS[name]]
      args = [v if v is not None else _pieces_of(g, a) or g.read(a) for a, v in zip(eqn.invars, values)]
      if isinstance(inner, jcore.ClosedJaxpr):
        outs = _emit(g, inner.jaxpr, inner.consts, args)
      else:
        outs = _emit(g, inner, (), args)
    elif name == 'dim_as_value':  # the symbolic batch size as a number
      dim = eqn.params['dim']
      if str(dim) != 'b':
        raise NotImplementedError(f'dim_as_value of {dim} (only the batch size b is supported)')
      scalar = g.one('Reshape', [g.batch(), g.constant(np.zeros((0,), np.int64))])
      outs = [g.one('Cast', [scalar], to=onnx_dtype(eqn.outvars[0].aval.dtype))]
    elif all(v is not None for v in values) and all(static_shape(v.aval) for v in eqn.outvars):
      # Computed from constants only (masked kernels, folded normalisations, offsets): evaluated now.
      results = eqn.primitive.bind(*values, **eqn.params)
      results = results if eqn.primitive.multiple_results else [results]
      outs = [np.asarray(r) for r in results]
    elif name in ELEMENTWISE:
      outs = [g.one(ELEMENTWISE[name], [g.read(a) for a in eqn.invars])]
    elif name == 'iota':
      outs = [iota(g, eqn)]
    elif name in RULES:
      outs = [RULES[name](g, eqn, *[g.read(a) for a in eqn.invars])]
    else:
      raise NotImplementedError(
        f'no ONNX lowering for the primitive {name!r} (lowered: {", ".join(supported_primitives())})'
      )
    if len(outs) != len(eqn.outvars):
      raise NotImplementedError(f'{name}: {len(eqn.outvars)} outputs, lowered {len(outs)}')
    for var, out in zip(eqn.outvars, outs):
      if not isinstance(var, jcore.DropVar):
        g.bind(var, out)
  return [g.value(a) if g.value(a) is not None else g.pieces[a] if a in g.pieces else g.read(a) for a in jaxpr.outvars]


def _window(eqn, values, p: Pieces) -> tuple[int, int] | None:
  """``[a, b)`` when ``eqn`` reads that contiguous range of ``p`` along its axis and every
  other axis whole (a slice, or a dynamic slice or gather at a known offset); else None."""
  name, rank = eqn.primitive.name, len(p.shape)
  if name == 'slice':
    lo, hi, strides = eqn.params['start_indices'], eqn.params['limit_indices'], eqn.params['strides']
    if strides is not None and any(s != 1 for s in strides):
      return None
    sizes = [hi[a] - lo[a] if is_static(hi[a]) else hi[a] for a in range(rank)]
    starts = [int(lo[a]) if is_static(lo[a]) else None for a in range(rank)]
  elif name == 'dynamic_slice' and all(v is not None for v in values[1:]):
    starts, sizes = [int(v) for v in values[1:]], list(eqn.params['slice_sizes'])
  elif name == 'gather' and values[1] is not None and values[1].ndim == 1:
    dn = eqn.params['dimension_numbers']
    if dn.collapsed_slice_dims or dn.operand_batching_dims or tuple(dn.offset_dims) != tuple(range(rank)):
      return None
    starts = [0] * rank
    for axis, start in zip(dn.start_index_map, values[1]):
      starts[axis] = int(start)
    sizes = list(eqn.params['slice_sizes'])
    check_in_bounds(eqn, starts, p.shape, sizes)
  else:
    return None
  for a in range(rank):
    if a != p.axis and not (starts[a] == 0 and same_dim(sizes[a], p.shape[a])):
      return None
  n, size = int(p.shape[p.axis]), int(sizes[p.axis])
  a = min(max(starts[p.axis], 0), n - size)  # JAX clamps the start
  return a, a + size


def _pieces_of(g: Graph, atom) -> Pieces | None:
  return None if isinstance(atom, jcore.Literal) else g.pieces.get(atom)


def _in_pieces(g: Graph, eqn, values) -> Pieces | None:
  """The result of ``eqn`` kept in pieces, or None when it is lowered as usual: a fill
  broadcast (the zeros of a new cache), a block written along the pieces' axis, a slice
  along it."""
  name, out = eqn.primitive.name, eqn.outvars[0]
  if name == 'broadcast_in_dim' and values[0] is not None and values[0].ndim == 0 and out.aval.shape:
    if static_shape(out.aval):
      return None  # folded into a constant
    shape = tuple(out.aval.shape)
    axis = len(shape) - 1
    if not is_static(shape[axis]):
      return None
    return Pieces(axis, shape, out.aval.dtype, ((0, int(shape[axis]), values[0].item()),))
  if name == 'dynamic_update_slice' and all(v is not None for v in values[2:]):
    x, u = eqn.invars[0], eqn.invars[1]
    shape, ushape = x.aval.shape, u.aval.shape
    differ = [a for a, (n, m) in enumerate(zip(shape, ushape)) if not same_dim(n, m)]
    if len(differ) != 1:
      return None
    (axis,) = differ
    start = int(values[2 + axis])
    size, n = int(ushape[axis]), int(shape[axis])
    start = min(max(start, 0), n - size)
    if any(int(values[2 + a]) != 0 for a in range(len(shape)) if a != axis):
      return None
    p = _pieces_of(g, x)
    if p is None or p.axis != axis:
      p = Pieces(axis, tuple(shape), x.aval.dtype, ((0, n, (g.read(x), 0)),))
      g.extent[p.parts[0][2][0]] = n
    new = g.read(u)
    g.extent.setdefault(new, size)
    parts = p.cut(0, start) + ((start, start + size, (new, start)),) + p.cut(start + size, n)
    return Pieces(axis, tuple(shape), x.aval.dtype, parts)
  p = _pieces_of(g, eqn.invars[0]) if eqn.invars else None
  if p is not None:
    window = _window(eqn, values, p)
    if window is None:
      return None
    a, b = window
    parts = tuple(
      (x - a, y - a, src if not isinstance(src, tuple) else (src[0], src[1] - a)) for x, y, src in p.cut(a, b)
    )
    shape = list(p.shape)
    shape[p.axis] = b - a
    return Pieces(p.axis, tuple(shape), p.dtype, parts)
  return None


@dataclasses.dataclass
class Lowered:
  """An ONNX model and how its inputs and outputs map onto the traced function's.

  ``inputs``: the graph's input names (unused ones dropped); ``outputs``: output name ->
  ``(traced output name, lo, hi)``: the range ``[lo, hi)`` of the traced output it holds
  along its pieces' axis (``None, None`` for the whole value).
  """

  model: onnx.ModelProto
  inputs: list[str]
  outputs: dict[str, tuple[str, int | None, int | None]]


def lower(
  fn: Callable,
  args: Sequence[jax.ShapeDtypeStruct],
  input_names: Sequence[str],
  output_names: Sequence[str],
  graph_name: str = 'stepnet',
) -> onnx.ModelProto:
  """The ONNX model of ``fn(*args)`` (flat arrays in, a flat tuple of arrays out).

  ``args`` may carry ``jax.export``'s symbolic batch size ``b`` on an axis; the ONNX
  inputs and outputs then have a dynamic ``batch`` dimension there.
  """
  return lower_blocks(fn, args, input_names, output_names, graph_name).model


def part_name(name: str, lo: int, hi: int) -> str:
  """The ONNX name of the block ``[lo, hi)`` of the value ``name``."""
  return f'{name}.{lo}_{hi}'


_TO_NCHW = (0, 3, 1, 2)  # NHWC -> NCHW


def lower_blocks(
  fn: Callable,
  args: Sequence[jax.ShapeDtypeStruct],
  input_names: Sequence[str],
  output_names: Sequence[str],
  graph_name: str = 'stepnet',
  input_blocks: dict[str, list[tuple[int, int]]] | None = None,
  block_outputs: Sequence[str] = (),
  renamed_outputs: dict[str, str] | None = None,
  channels_first: bool = False,
) -> Lowered:
  """``lower`` with values passed in blocks along their last axis, so a step reads and
  writes only the blocks it needs, with no copy of a whole buffer.

  ``input_blocks``: input name -> the blocks ``[lo, hi)`` it is given as (graph inputs named
  ``part_name``; the rest of it is zeros). ``block_outputs``: outputs written as their new
  blocks (each block written by the function that is not one of its inputs' blocks); the
  others are whole values, except an output that is an unchanged input, which is left out.
  ``renamed_outputs``: traced output name -> graph output name; an output that would take
  an input's name is otherwise ``next_`` + the name. Unused inputs are dropped.
  ``channels_first``: the blocks of rank-4 values (NHWC activations) are graph inputs and
  outputs in NCHW, ONNX's convolution layout, so onnxruntime cancels the transposes around each
  convolution instead of converting every block it reads and writes.
  """
  input_blocks = input_blocks or {}
  renamed_outputs = renamed_outputs or {}
  closed = jax.make_jaxpr(fn)(*args)
  jaxpr = closed.jaxpr
  if len(input_names) != len(jaxpr.invars) or len(output_names) != len(jaxpr.outvars):
    raise ValueError(
      f'{len(jaxpr.invars)} inputs and {len(jaxpr.outvars)} outputs traced, '
      f'named {len(input_names)} and {len(output_names)}'
    )
  graph_inputs, atoms = [], []
  moved: list[tuple[str, str]] = []  # (NCHW graph input, its NHWC value) with channels_first
  for name, v in zip(input_names, jaxpr.invars):
    if name not in input_blocks:
      graph_inputs.append((name, v.aval.shape, v.aval.dtype))
      atoms.append(name)
      continue
    shape, axis = tuple(v.aval.shape), len(v.aval.shape) - 1
    parts, at = [], 0
    for lo, hi in sorted(input_blocks[name]):
      if lo > at:
        parts.append((at, lo, 0.0))
      block = part_name(name, lo, hi)
      block_shape = shape[:axis] + (hi - lo,)
      if channels_first and len(shape) == 4:
        moved.append((block, f'{block}.nhwc'))
        parts.append((lo, hi, (f'{block}.nhwc', lo)))
        block_shape = tuple(block_shape[i] for i in _TO_NCHW)
      else:
        parts.append((lo, hi, (block, lo)))
      graph_inputs.append((block, block_shape, v.aval.dtype))
      at = hi
    if at < shape[axis]:
      parts.append((at, int(shape[axis]), 0.0))
    atoms.append(Pieces(axis, shape, v.aval.dtype, tuple(parts)))
  batch_source = next(
    ((name, axis) for name, shape, _ in graph_inputs for axis, d in enumerate(shape) if not is_static(d)), None
  )
  g = Graph(batch_source)
  for name, shape, _ in graph_inputs:
    g.extent[name] = shape[-1] if shape else None
  for block, nhwc in moved:
    g.extent[nhwc] = next(shape[1] for name, shape, _ in graph_inputs if name == block)
  given = {name for name, _, _ in graph_inputs} | {nhwc for _, nhwc in moved}
  passed = {nhwc: block for block, nhwc in moved}  # an input block's value -> its graph input
  outs = _emit(g, jaxpr, closed.consts, atoms)
  emitted: dict[str, tuple] = {}
  out_info = []
  for out, name, var in zip(outs, output_names, jaxpr.outvars):
    if isinstance(out, Pieces) and name in block_outputs and out.axis == len(out.shape) - 1:
      for lo, hi, src in out.parts:
        if not isinstance(src, tuple):
          if src != 0:
            raise NotImplementedError(f'output {name}: a block of {src}, not zeros, left unwritten')
          continue
        if src[0] in given and src[1] == lo and part_name(name, lo, hi) == passed.get(src[0], src[0]):
          continue  # an input block passed through
        value = part(g, out, lo, hi, src)
        block = part_name(name, lo, hi)
        shape = list(out.shape)
        shape[out.axis] = hi - lo
        if channels_first and len(shape) == 4:
          value = g.one('Transpose', [value], perm=list(_TO_NCHW))
          shape = [shape[i] for i in _TO_NCHW]
        emitted[block] = (value, name, lo, hi)
        out_info.append((block, shape, out.dtype))
      continue
    value = read_value(g, out)
    if value == name:
      continue  # an unchanged input
    target = renamed_outputs.get(name, f'next_{name}' if name in given else name)
    emitted[target] = (value, name, None, None)
    out_info.append((target, var.aval.shape, var.aval.dtype))
  read = {name for node in g.nodes for name in node.input} | {value for value, *_ in emitted.values()}
  g.nodes[:0] = [  # each NCHW input block read (by a node or as an output), in NHWC
    helper.make_node('Transpose', [block], [nhwc], perm=inverse_permutation(_TO_NCHW))
    for block, nhwc in moved
    if nhwc in read
  ]
  g.nodes = fold_channel_affine(g.nodes, g.initializers, {value for value, *_ in emitted.values()})
  _name_outputs(g, {target: value for target, (value, *_) in emitted.items()}, given)
  used = {name for node in g.nodes for name in node.input}
  graph = helper.make_graph(
    g.nodes,
    graph_name,
    [value_info(n, shape, dtype) for n, shape, dtype in graph_inputs if n in used],
    [value_info(n, shape, dtype) for n, shape, dtype in out_info],
    initializer=[t for t in g.initializers if t.name in used],
  )
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', OPSET)], producer_name='stepnet_jax')
  model.ir_version = 9  # readable by onnxruntime >= 1.16
  onnx.checker.check_model(model)
  return Lowered(
    model,
    [n for n, _, _ in graph_inputs if n in used],
    {target: (name, lo, hi) for target, (_, name, lo, hi) in emitted.items()},
  )


def _name_outputs(g: Graph, targets: dict[str, str], given: set[str]) -> None:
  """Gives each output value its graph output name: the node that makes it is renamed (no
  copy); an input, an initializer or a value output twice goes through an Identity."""
  producers = {out: node for node in g.nodes for out in node.output}
  renamed: dict[str, str] = {}
  for target, value in targets.items():
    node = producers.get(value)
    if node is None or value in given or value in renamed:
      g.nodes.append(helper.make_node('Identity', [renamed.get(value, value)], [target]))
      continue
    renamed[value] = target
  if renamed:
    for node in g.nodes:
      for i, name in enumerate(node.output):
        if name in renamed:
          node.output[i] = renamed[name]
      for i, name in enumerate(node.input):
        if name in renamed:
          node.input[i] = renamed[name]
