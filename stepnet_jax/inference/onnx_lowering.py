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
Layouts: JAX's convolutions here are NHWC; ONNX's are NCHW, so each convolution and pooling
is wrapped in transposes, which onnxruntime's layout optimizer cancels between neighbours.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import onnx
from jax.extend import core as jcore
from onnx import helper, numpy_helper

OPSET = 18
INT64_MAX = np.iinfo(np.int64).max

# Element-wise primitives that are one ONNX node of the same arity.
_ELEMENTWISE = {
  'add': 'Add',
  'sub': 'Sub',
  'mul': 'Mul',
  'div': 'Div',
  'max': 'Max',
  'min': 'Min',
  'pow': 'Pow',
  'neg': 'Neg',
  'abs': 'Abs',
  'exp': 'Exp',
  'log': 'Log',
  'sqrt': 'Sqrt',
  'tanh': 'Tanh',
  'logistic': 'Sigmoid',
  'floor': 'Floor',
  'ceil': 'Ceil',
  'sign': 'Sign',
  'erf': 'Erf',
  'eq': 'Equal',
  'lt': 'Less',
  'le': 'LessOrEqual',
  'gt': 'Greater',
  'ge': 'GreaterOrEqual',
  'and': 'And',
  'or': 'Or',
  'not': 'Not',
  'copy': 'Identity',
  'copy_p': 'Identity',
  'reduce_precision': 'Identity',
  'stop_gradient': 'Identity',
}
# Calls whose body is inlined: primitive -> the parameter holding the (closed) jaxpr.
_CALLS = {'jit': 'jaxpr', 'pjit': 'jaxpr', 'custom_jvp_call': 'call_jaxpr', 'custom_vjp_call': 'call_jaxpr'}


def onnx_dtype(dtype) -> int:
  """The ONNX element type of a numpy dtype."""
  return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _is_static(d) -> bool:
  return isinstance(d, (int, np.integer))


def _same(a, b) -> bool:
  """Whether two dimensions (ints or symbolic) are equal."""
  if _is_static(a) and _is_static(b):
    return int(a) == int(b)
  return not _is_static(a) and not _is_static(b) and str(a) == str(b)


class _Graph:
  """The nodes, initializers and names of the graph being written."""

  def __init__(self, batch_source: tuple[str, int] | None):
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []
    self.names: dict[Any, str] = {}  # jaxpr Var -> ONNX value name
    self.known: dict[Any, np.ndarray] = {}  # jaxpr Var -> its value, when it does not depend on an input
    self._count = 0
    self._batch_source = batch_source  # (graph input, axis) holding the symbolic batch size
    self._batch: str | None = None
    self._consts: dict[tuple, str] = {}

  def fresh(self, hint: str = 'v') -> str:
    self._count += 1
    return f'{hint}_{self._count}'

  def node(self, op: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1, **attrs) -> list[str]:
    """Adds one node; returns its output names."""
    outs = [self.fresh(op.lower()) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
    self.nodes.append(helper.make_node(op, list(inputs), outs, **attrs))
    return outs

  def one(self, op: str, inputs: Sequence[str], **attrs) -> str:
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
    if all(_is_static(d) for d in dims):
      return self.constant([int(d) for d in dims], np.int64)
    parts = []
    for d in dims:
      if _is_static(d):
        parts.append(self.constant([int(d)], np.int64))
      elif str(d) == 'b':
        parts.append(self.batch())
      else:
        raise NotImplementedError(f'symbolic dimension {d} (only the batch size b is supported)')
    return self.one('Concat', parts, axis=0)

  def value(self, atom) -> np.ndarray | None:
    """The value of a literal or of a variable computed from constants only; else None."""
    if isinstance(atom, jcore.Literal):
      return np.asarray(atom.val, dtype=atom.aval.dtype)
    return self.known.get(atom)

  def read(self, atom) -> str:
    """The ONNX name of a jaxpr variable or literal (an initializer for a known value)."""
    if isinstance(atom, jcore.Literal):
      return self.constant(self.value(atom))
    if atom not in self.names:
      if atom not in self.known:
        raise KeyError(f'{atom} is neither an input nor computed yet')
      self.names[atom] = self.constant(self.known[atom])
    return self.names[atom]


def _static_shape(aval) -> bool:
  return all(_is_static(d) for d in aval.shape)


def _value_info(name: str, aval) -> onnx.ValueInfoProto:
  dims = [int(d) if _is_static(d) else 'batch' for d in aval.shape]
  return helper.make_tensor_value_info(name, onnx_dtype(aval.dtype), dims)


# ------------------------------------------------------------------ one rule per primitive


def _broadcast_in_dim(g: _Graph, eqn, x: str) -> str:
  shape, dims = eqn.params['shape'], eqn.params['broadcast_dimensions']
  operand = eqn.invars[0].aval.shape
  keep = [1] * len(shape)
  for i, d in enumerate(dims):
    keep[d] = operand[i]
  if tuple(keep) != tuple(operand):
    x = g.one('Reshape', [x, g.shape(keep)])
  if tuple(keep) == tuple(shape):
    return x
  return g.one('Expand', [x, g.shape(shape)])


def _slice(g: _Graph, eqn, x: str) -> str:
  p = eqn.params
  shape = eqn.invars[0].aval.shape
  axes, starts, ends, steps = [], [], [], []
  for axis, (lo, hi) in enumerate(zip(p['start_indices'], p['limit_indices'])):
    step = 1 if p['strides'] is None else p['strides'][axis]
    full = _is_static(lo) and lo == 0 and _same(hi, shape[axis]) and step == 1
    if full:
      continue
    if not (_is_static(lo) and _is_static(step)):
      raise NotImplementedError('slice with a symbolic start or stride')
    axes.append(axis)
    starts.append(int(lo))
    ends.append(int(hi) if _is_static(hi) else INT64_MAX)
    steps.append(int(step))
  if not axes:
    return g.one('Identity', [x])
  return g.one(
    'Slice',
    [
      x,
      g.constant(starts, np.int64),
      g.constant(ends, np.int64),
      g.constant(axes, np.int64),
      g.constant(steps, np.int64),
    ],
  )


def _static_index(atom) -> int:
  if isinstance(atom, jcore.Literal):
    return int(atom.val)
  raise NotImplementedError('dynamic_update_slice at a traced offset (only constant offsets are lowered)')


def _update_slice(g: _Graph, x: str, shape: Sequence, update: str, ushape: Sequence, starts: Sequence[int]) -> str:
  """``x`` with ``update`` written at ``starts``: concatenations of the untouched parts."""
  for axis, (n, u, s) in enumerate(zip(shape, ushape, starts)):
    if _same(u, n):
      continue
    axis_pieces = []

    def part(lo, hi):
      return g.one('Slice', [x, g.constant([lo], np.int64), g.constant([hi], np.int64), g.constant([axis], np.int64)])

    if s > 0:
      axis_pieces.append(part(0, s))
    middle_shape = list(shape)
    middle_shape[axis] = u
    middle = _update_slice(g, part(s, s + u), middle_shape, update, ushape, [*starts[:axis], 0, *starts[axis + 1 :]])
    axis_pieces.append(middle)
    if s + u < n:
      axis_pieces.append(part(s + u, n))
    return g.one('Concat', axis_pieces, axis=axis) if len(axis_pieces) > 1 else axis_pieces[0]
  return update  # the update covers the whole operand


def _dynamic_update_slice(g: _Graph, eqn, x: str, update: str, *indices) -> str:
  starts = [_static_index(a) for a in eqn.invars[2:]]
  shape, ushape = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  for axis, (n, u, s) in enumerate(zip(shape, ushape, starts)):
    if not (_is_static(n) and _is_static(u)) and not (_same(u, n) and s == 0):
      raise NotImplementedError(f'dynamic_update_slice along the symbolic axis {axis}')
    if _is_static(n) and _is_static(u) and not 0 <= s <= n - u:
      raise NotImplementedError('dynamic_update_slice offsets that JAX would clamp')
  return _update_slice(g, x, shape, update, ushape, starts)


def _constant_slice(g: _Graph, eqn, x: str, starts: Sequence[int], sizes: Sequence) -> str:
  """``x[starts : starts + sizes]`` with JAX's clamping of the starts into range."""
  shape = eqn.invars[0].aval.shape
  axes, lo, hi = [], [], []
  for axis, (n, s, size) in enumerate(zip(shape, starts, sizes)):
    if _same(n, size):
      continue
    if not (_is_static(n) and _is_static(size)):
      raise NotImplementedError('a dynamic slice along the symbolic axis')
    s = min(max(int(s), 0), int(n) - int(size))
    axes.append(axis)
    lo.append(s)
    hi.append(s + int(size))
  if not axes:
    return g.one('Identity', [x])
  return g.one('Slice', [x, g.constant(lo, np.int64), g.constant(hi, np.int64), g.constant(axes, np.int64)])


def _dynamic_slice(g: _Graph, eqn, x: str, *indices: str) -> str:
  starts = [g.value(a) for a in eqn.invars[1:]]
  if any(v is None for v in starts):
    raise NotImplementedError('dynamic_slice at a traced offset (only offsets known when lowering)')
  return _constant_slice(g, eqn, x, [int(v) for v in starts], eqn.params['slice_sizes'])


def _gather(g: _Graph, eqn, x: str, indices: str) -> str:
  """Gathers at indices known when lowering (what indexing with known offsets or strides
  traces to): one start per indexed axis is a slice; a grid of starts over contiguous
  indexed axes, each slice of size 1 there, is one ONNX Gather over those axes flattened."""
  dn, shape = eqn.params['dimension_numbers'], eqn.invars[0].aval.shape
  rank, sizes = len(shape), eqn.params['slice_sizes']
  index = g.value(eqn.invars[1])
  dropped = tuple(dn.collapsed_slice_dims)
  if index is None or dn.operand_batching_dims:
    raise NotImplementedError(f'gather at indices computed from the input ({dn})')
  if index.ndim == 1 and tuple(dn.offset_dims) == tuple(range(rank - len(dropped))):
    starts = [0] * rank
    for axis, start in zip(dn.start_index_map, index):
      starts[axis] = int(start)
    y = _constant_slice(g, eqn, x, starts, sizes)
    return g.one('Squeeze', [y, g.constant(list(dropped), np.int64)]) if dropped else y
  axes = tuple(dn.start_index_map)
  first, grid = axes[0] if axes else 0, index.shape[:-1]
  if (
    axes != dropped
    or axes != tuple(range(first, first + len(axes)))
    or any(not _same(sizes[a], 1) or not _is_static(shape[a]) for a in axes)
    or tuple(dn.offset_dims) != tuple(range(first)) + tuple(range(first + len(grid), rank - len(axes) + len(grid)))
  ):
    raise NotImplementedError(f'gather of this form ({dn})')
  extent = [int(shape[a]) for a in axes]
  clamped = np.clip(index, 0, np.asarray(extent) - 1)  # JAX clamps (PROMISE_IN_BOUNDS, CLIP)
  if 'FILL' in str(eqn.params['mode']) and (clamped != index).any():
    raise NotImplementedError('gather with out-of-bounds indices filled')
  flat = np.ravel_multi_index(tuple(np.moveaxis(clamped, -1, 0)), extent).astype(np.int64)
  merged = [*shape[:first], int(np.prod(extent)), *shape[first + len(axes) :]]
  y = g.one('Reshape', [x, g.shape(merged)])
  return g.one('Gather', [y, g.constant(flat)], axis=first)


def _dot_general(g: _Graph, eqn, lhs: str, rhs: str) -> str:
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  lrank, rrank = len(eqn.invars[0].aval.shape), len(eqn.invars[1].aval.shape)
  out_dtype = eqn.outvars[0].aval.dtype
  if not lb and not rb and lrank == 2 and rrank == 2 and tuple(lc) == (1,) and tuple(rc) == (0,):
    y = g.one('MatMul', [lhs, rhs])
  elif not lb and not rb and tuple(lc) == (lrank - 1,) and tuple(rc) == (0,) and rrank <= 2:
    y = g.one('MatMul', [lhs, rhs])
  else:  # the general contraction, spelt as an einsum
    letters = iter('abcdefghijklmnopqrstuvwxyz')
    lsub = [next(letters) for _ in range(lrank)]
    rsub = [None] * rrank
    for i, j in zip(lb, rb):
      rsub[j] = lsub[i]
    for i, j in zip(lc, rc):
      rsub[j] = lsub[i]
    rsub = [s or next(letters) for s in rsub]
    out = [lsub[i] for i in lb]
    out += [s for i, s in enumerate(lsub) if i not in lb and i not in lc]
    out += [s for j, s in enumerate(rsub) if j not in rb and j not in rc]
    y = g.one('Einsum', [lhs, rhs], equation=f'{"".join(lsub)},{"".join(rsub)}->{"".join(out)}')
  if np.dtype(out_dtype) != np.dtype(eqn.invars[0].aval.dtype):
    y = g.one('Cast', [y], to=onnx_dtype(out_dtype))
  return y


def _inverse(perm: Sequence[int]) -> list[int]:
  inv = [0] * len(perm)
  for i, p in enumerate(perm):
    inv[p] = i
  return inv


def _conv(g: _Graph, eqn, lhs: str, rhs: str) -> str:
  p = eqn.params
  if any(d != 1 for d in p['lhs_dilation']) or p['batch_group_count'] != 1:
    raise NotImplementedError('convolution with input dilation or batch groups')
  dn = p['dimension_numbers']
  pads = [int(lo) for lo, _ in p['padding']] + [int(hi) for _, hi in p['padding']]
  if min(pads) < 0:
    raise NotImplementedError('convolution with negative padding')
  x = g.one('Transpose', [lhs], perm=list(dn.lhs_spec))  # -> N, C, spatial
  w = g.one('Transpose', [rhs], perm=list(dn.rhs_spec))  # -> O, I, spatial
  kernel = [int(eqn.invars[1].aval.shape[d]) for d in dn.rhs_spec[2:]]
  y = g.one(
    'Conv',
    [x, w],
    strides=[int(s) for s in p['window_strides']],
    pads=pads,
    dilations=[int(d) for d in p['rhs_dilation']],
    group=int(p['feature_group_count']),
    kernel_shape=kernel,
  )
  return g.one('Transpose', [y], perm=_inverse(dn.out_spec))


def _max_pool(g: _Graph, eqn, x: str) -> str:
  p = eqn.params
  window, strides, padding = p['window_dimensions'], p['window_strides'], p['padding']
  rank = len(window)
  if any(d != 1 for d in p['base_dilation']):
    raise NotImplementedError('max pooling with base dilation')
  pooled = [i for i in range(rank) if window[i] != 1 or strides[i] != 1 or tuple(padding[i]) != (0, 0)]
  if 0 in pooled or not pooled:
    raise NotImplementedError(f'max pooling over axes {pooled} (the batch axis must stay whole)')
  rest = [i for i in range(rank) if i not in pooled]  # batch first, then every unpooled axis
  perm = rest + pooled
  y = g.one('Transpose', [x], perm=perm)
  if len(rest) > 2:  # fold extra unpooled axes into the channel axis
    raise NotImplementedError('max pooling with more than one unpooled non-batch axis')
  if len(rest) == 1:
    y = g.one('Unsqueeze', [y, g.constant([1], np.int64)])
  y = g.one(
    'MaxPool',
    [y],
    kernel_shape=[int(window[i]) for i in pooled],
    strides=[int(strides[i]) for i in pooled],
    pads=[int(padding[i][0]) for i in pooled] + [int(padding[i][1]) for i in pooled],
    dilations=[int(p['window_dilation'][i]) for i in pooled],
  )
  if len(rest) == 1:
    y = g.one('Squeeze', [y, g.constant([1], np.int64)])
  return g.one('Transpose', [y], perm=_inverse(perm))


def _reduce(op: str) -> Callable:
  def rule(g: _Graph, eqn, x: str) -> str:
    return g.one(op, [x, g.constant(list(eqn.params['axes']), np.int64)], keepdims=0)

  return rule


def _argmax(g: _Graph, eqn, x: str) -> str:
  (axis,) = eqn.params['axes']
  y = g.one('ArgMax', [x], axis=int(axis), keepdims=0, select_last_index=0)
  return g.one('Cast', [y], to=onnx_dtype(eqn.params['index_dtype']))


def _convert(g: _Graph, eqn, x: str) -> str:
  return g.one('Cast', [x], to=onnx_dtype(eqn.params['new_dtype']))


def _reshape(g: _Graph, eqn, x: str) -> str:
  if eqn.params.get('dimensions') is not None:
    raise NotImplementedError('reshape with a dimension order')
  return g.one('Reshape', [x, g.shape(eqn.params['new_sizes'])])


def _squeeze(g: _Graph, eqn, x: str) -> str:
  return g.one('Squeeze', [x, g.constant(list(eqn.params['dimensions']), np.int64)])


def _expand_dims(g: _Graph, eqn, x: str) -> str:
  return g.one('Unsqueeze', [x, g.constant(list(eqn.params['dimensions']), np.int64)])


def _transpose(g: _Graph, eqn, x: str) -> str:
  return g.one('Transpose', [x], perm=[int(p) for p in eqn.params['permutation']])


def _concatenate(g: _Graph, eqn, *xs: str) -> str:
  return g.one('Concat', list(xs), axis=int(eqn.params['dimension']))


def _stack(g: _Graph, eqn, *xs: str) -> str:
  axis = g.constant([int(eqn.params['axis'])], np.int64)
  return g.one('Concat', [g.one('Unsqueeze', [x, axis]) for x in xs], axis=int(eqn.params['axis']))


def _pad(g: _Graph, eqn, x: str, value: str) -> str:
  config = eqn.params['padding_config']
  if any(interior != 0 for _, _, interior in config):
    raise NotImplementedError('pad with interior padding')
  pads = [int(lo) for lo, _, _ in config] + [int(hi) for _, hi, _ in config]
  return g.one('Pad', [x, g.constant(pads, np.int64), value], mode='constant')


def _select_n(g: _Graph, eqn, which: str, *cases: str) -> str:
  if len(cases) != 2 or np.dtype(eqn.invars[0].aval.dtype) != np.bool_:
    raise NotImplementedError('select_n with more than two cases')
  return g.one('Where', [which, cases[1], cases[0]])


def _clamp(g: _Graph, eqn, lo: str, x: str, hi: str) -> str:
  return g.one('Min', [g.one('Max', [x, lo]), hi])


def _rsqrt(g: _Graph, eqn, x: str) -> str:
  return g.one('Reciprocal', [g.one('Sqrt', [x])])


def _ne(g: _Graph, eqn, a: str, b: str) -> str:
  return g.one('Not', [g.one('Equal', [a, b])])


def _integer_pow(g: _Graph, eqn, x: str) -> str:
  y = eqn.params['y']
  exponent = g.constant(np.asarray(y, dtype=eqn.invars[0].aval.dtype))
  return g.one('Pow', [x, exponent])


def _round(g: _Graph, eqn, x: str) -> str:
  if int(eqn.params['rounding_method']) == 1:  # to nearest even, as ONNX's Round
    return g.one('Round', [x])
  half = g.constant(np.asarray(0.5, dtype=eqn.invars[0].aval.dtype))  # half away from zero
  return g.one('Mul', [g.one('Sign', [x]), g.one('Floor', [g.one('Add', [g.one('Abs', [x]), half])])])


def _iota(g: _Graph, eqn) -> str:
  p = eqn.params
  shape, dim = p['shape'], p['dimension']
  if not all(_is_static(d) for d in shape):
    raise NotImplementedError('iota with a symbolic shape')
  ramp = np.arange(shape[dim], dtype=p['dtype']).reshape([-1 if i == dim else 1 for i in range(len(shape))])
  return g.constant(np.broadcast_to(ramp, shape).copy())


_RULES: dict[str, Callable] = {
  'broadcast_in_dim': _broadcast_in_dim,
  'slice': _slice,
  'dynamic_update_slice': _dynamic_update_slice,
  'dynamic_slice': _dynamic_slice,
  'gather': _gather,
  'dot_general': _dot_general,
  'conv_general_dilated': _conv,
  'reduce_window_max': _max_pool,
  'reduce_sum': _reduce('ReduceSum'),
  'reduce_max': _reduce('ReduceMax'),
  'reduce_min': _reduce('ReduceMin'),
  'argmax': _argmax,
  'convert_element_type': _convert,
  'reshape': _reshape,
  'squeeze': _squeeze,
  'expand_dims': _expand_dims,
  'transpose': _transpose,
  'concatenate': _concatenate,
  'stack': _stack,
  'pad': _pad,
  'select_n': _select_n,
  'clamp': _clamp,
  'rsqrt': _rsqrt,
  'ne': _ne,
  'integer_pow': _integer_pow,
  'round': _round,
}


def supported_primitives() -> tuple[str, ...]:
  """The jaxpr primitives this lowering writes (calls are inlined)."""
  return tuple(sorted(set(_RULES) | set(_ELEMENTWISE) | set(_CALLS) | {'iota', 'dim_as_value'}))


def _emit(g: _Graph, jaxpr: jcore.Jaxpr, consts: Sequence, inputs: Sequence[str]) -> list[str]:
  """Writes ``jaxpr``'s equations; returns the names of its outputs."""
  for var, value in zip(jaxpr.constvars, consts):
    g.known[var] = np.asarray(value)
  for var, atom in zip(jaxpr.invars, inputs):
    if isinstance(atom, str):
      g.names[var] = atom
    else:  # a known value passed into an inlined call
      g.known[var] = atom
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    values = [g.value(a) for a in eqn.invars]
    if name in _CALLS:
      inner = eqn.params[_CALLS[name]]
      args = [v if v is not None else g.read(a) for a, v in zip(eqn.invars, values)]
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
    elif all(v is not None for v in values) and all(_static_shape(v.aval) for v in eqn.outvars):
      # Computed from constants only (masked kernels, folded normalisations, offsets): evaluated now.
      results = eqn.primitive.bind(*values, **eqn.params)
      results = results if eqn.primitive.multiple_results else [results]
      outs = [np.asarray(r) for r in results]
    elif name in _ELEMENTWISE:
      outs = [g.one(_ELEMENTWISE[name], [g.read(a) for a in eqn.invars])]
    elif name == 'iota':
      outs = [_iota(g, eqn)]
    elif name in _RULES:
      outs = [_RULES[name](g, eqn, *[g.read(a) for a in eqn.invars])]
    else:
      raise NotImplementedError(
        f'no ONNX lowering for the primitive {name!r} (lowered: {", ".join(supported_primitives())})'
      )
    if len(outs) != len(eqn.outvars):
      raise NotImplementedError(f'{name}: {len(eqn.outvars)} outputs, lowered {len(outs)}')
    for var, out in zip(eqn.outvars, outs):
      if isinstance(var, jcore.DropVar):
        continue
      if isinstance(out, str):
        g.names[var] = out
      else:
        g.known[var] = out
  return [g.value(a) if g.value(a) is not None else g.read(a) for a in jaxpr.outvars]


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
  closed = jax.make_jaxpr(fn)(*args)
  jaxpr = closed.jaxpr
  if len(input_names) != len(jaxpr.invars) or len(output_names) != len(jaxpr.outvars):
    raise ValueError(
      f'{len(jaxpr.invars)} inputs and {len(jaxpr.outvars)} outputs traced, '
      f'named {len(input_names)} and {len(output_names)}'
    )
  batch_source = next(
    (
      (name, axis)
      for name, v in zip(input_names, jaxpr.invars)
      for axis, d in enumerate(v.aval.shape)
      if not _is_static(d)
    ),
    None,
  )
  g = _Graph(batch_source)
  outs = [o if isinstance(o, str) else g.constant(o) for o in _emit(g, jaxpr, closed.consts, list(input_names))]
  for out, name in zip(outs, output_names):  # name every output, even one that is an input
    g.nodes.append(helper.make_node('Identity', [out], [name]))
  used = {name for node in g.nodes for name in node.input}
  graph = helper.make_graph(
    g.nodes,
    graph_name,
    [_value_info(n, v.aval) for n, v in zip(input_names, jaxpr.invars)],
    [_value_info(n, v.aval) for n, v in zip(output_names, jaxpr.outvars)],
    initializer=[t for t in g.initializers if t.name in used],
  )
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', OPSET)], producer_name='stepnet_jax')
  model.ir_version = 9  # readable by onnxruntime >= 1.16
  onnx.checker.check_model(model)
  return model
