"""One ONNX rule per jaxpr primitive: ``RULES[name](graph, eqn, *input names) -> output
name``, and ``ELEMENTWISE``: the primitives that are one ONNX node of the same arity.

Layouts: JAX's convolutions here are NHWC; ONNX's are NCHW, so each convolution and pooling
is wrapped in transposes (onnxruntime cancels those it can between neighbours).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from jax.extend import core as jcore

from stepnet_jax.inference.onnx_graph import INT64_MAX, Graph, is_static, onnx_dtype, same_dim

# Element-wise primitives that are one ONNX node of the same arity.
ELEMENTWISE = {
  'add': 'Add',
  'sub': 'Sub',
  'mul': 'Mul',
  'div': 'Div',
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


def _broadcast_in_dim(g: Graph, eqn, x: str) -> str:
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


def _slice(g: Graph, eqn, x: str) -> str:
  p = eqn.params
  shape = eqn.invars[0].aval.shape
  axes, starts, ends, steps = [], [], [], []
  for axis, (lo, hi) in enumerate(zip(p['start_indices'], p['limit_indices'])):
    step = 1 if p['strides'] is None else p['strides'][axis]
    full = is_static(lo) and lo == 0 and same_dim(hi, shape[axis]) and step == 1
    if full:
      continue
    if not (is_static(lo) and is_static(step)):
      raise NotImplementedError('slice with a symbolic start or stride')
    axes.append(axis)
    starts.append(int(lo))
    if not is_static(hi) and not same_dim(hi, shape[axis]):
      raise NotImplementedError(f'slice to {hi} on a symbolic axis (only to its end)')
    ends.append(int(hi) if is_static(hi) else INT64_MAX)
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


def _update_slice(g: Graph, x: str, shape: Sequence, update: str, ushape: Sequence, starts: Sequence[int]) -> str:
  """``x`` with ``update`` written at ``starts``: concatenations of the untouched parts."""
  for axis, (n, u, s) in enumerate(zip(shape, ushape, starts)):
    if same_dim(u, n):
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


def _dynamic_update_slice(g: Graph, eqn, x: str, update: str, *indices) -> str:
  starts = [_static_index(a) for a in eqn.invars[2:]]
  shape, ushape = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  for axis, (n, u, s) in enumerate(zip(shape, ushape, starts)):
    if not (is_static(n) and is_static(u)) and not (same_dim(u, n) and s == 0):
      raise NotImplementedError(f'dynamic_update_slice along the symbolic axis {axis}')
    if is_static(n) and is_static(u) and not 0 <= s <= n - u:
      raise NotImplementedError('dynamic_update_slice offsets that JAX would clamp')
  return _update_slice(g, x, shape, update, ushape, starts)


def _constant_slice(g: Graph, eqn, x: str, starts: Sequence[int], sizes: Sequence) -> str:
  """``x[starts : starts + sizes]`` with JAX's clamping of the starts into range."""
  shape = eqn.invars[0].aval.shape
  axes, lo, hi = [], [], []
  for axis, (n, s, size) in enumerate(zip(shape, starts, sizes)):
    if same_dim(n, size):
      continue
    if not (is_static(n) and is_static(size)):
      raise NotImplementedError('a dynamic slice along the symbolic axis')
    s = min(max(int(s), 0), int(n) - int(size))
    axes.append(axis)
    lo.append(s)
    hi.append(s + int(size))
  if not axes:
    return g.one('Identity', [x])
  return g.one('Slice', [x, g.constant(lo, np.int64), g.constant(hi, np.int64), g.constant(axes, np.int64)])


def _dynamic_slice(g: Graph, eqn, x: str, *indices: str) -> str:
  starts = [g.value(a) for a in eqn.invars[1:]]
  if any(v is None for v in starts):
    raise NotImplementedError('dynamic_slice at a traced offset (only offsets known when lowering)')
  return _constant_slice(g, eqn, x, [int(v) for v in starts], eqn.params['slice_sizes'])


def check_in_bounds(eqn, starts: Sequence[int], shape: Sequence, sizes: Sequence) -> None:
  """NotImplementedError for a gather that fills out-of-bounds reads (JAX's 'fill' mode, e.g.
  ``jnp.take``) at a start that JAX would otherwise clamp: a slice cannot fill."""
  if 'FILL' not in str(eqn.params.get('mode', '')):
    return
  for n, start, size in zip(shape, starts, sizes):
    if is_static(n) and is_static(size) and not 0 <= start <= int(n) - int(size):
      raise NotImplementedError('gather with out-of-bounds indices filled')


def _gather(g: Graph, eqn, x: str, indices: str) -> str:
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
    check_in_bounds(eqn, starts, shape, sizes)
    y = _constant_slice(g, eqn, x, starts, sizes)
    return g.one('Squeeze', [y, g.constant(list(dropped), np.int64)]) if dropped else y
  axes = tuple(dn.start_index_map)
  first, grid = axes[0] if axes else 0, index.shape[:-1]
  if (
    axes != dropped
    or axes != tuple(range(first, first + len(axes)))
    or any(not same_dim(sizes[a], 1) or not is_static(shape[a]) for a in axes)
    or any(not same_dim(sizes[a], shape[a]) for a in range(rank) if a not in axes)
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


def _dot_general(g: Graph, eqn, lhs: str, rhs: str) -> str:
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


def inverse_permutation(perm: Sequence[int]) -> list[int]:
  """The permutation that undoes ``perm``."""
  inv = [0] * len(perm)
  for i, p in enumerate(perm):
    inv[p] = i
  return inv


def _conv(g: Graph, eqn, lhs: str, rhs: str) -> str:
  p = eqn.params
  if any(d != 1 for d in p['lhs_dilation']) or p['batch_group_count'] != 1:
    raise NotImplementedError('convolution with input dilation or batch groups')
  dn = p['dimension_numbers']
  pads = [int(lo) for lo, _ in p['padding']] + [int(hi) for _, hi in p['padding']]
  if min(pads) < 0:
    raise NotImplementedError('convolution with negative padding')
  x = g.one('Transpose', [lhs], perm=list(dn.lhs_spec))  # -> N, C, spatial
  kernel_value = g.value(eqn.invars[1])
  if kernel_value is not None:  # a constant kernel is stored O, I, spatial (onnx_fuse folds into it)
    w = g.constant(np.transpose(kernel_value, list(dn.rhs_spec)))
  else:
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
  return g.one('Transpose', [y], perm=inverse_permutation(dn.out_spec))


def _max(g: Graph, eqn, a: str, b: str) -> str:
  """Max; against a constant zero, Relu (which onnxruntime fuses into the convolution before it)."""
  for i, other in ((0, b), (1, a)):
    value = g.value(eqn.invars[i])
    if value is not None and np.issubdtype(value.dtype, np.floating) and not np.any(value):
      if tuple(eqn.outvars[0].aval.shape) == tuple(eqn.invars[1 - i].aval.shape):
        return g.one('Relu', [other])
  return g.one('Max', [a, b])


def _max_pool(g: Graph, eqn, x: str) -> str:
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
  return g.one('Transpose', [y], perm=inverse_permutation(perm))


def _reduce(op: str) -> Callable:
  def rule(g: Graph, eqn, x: str) -> str:
    return g.one(op, [x, g.constant(list(eqn.params['axes']), np.int64)], keepdims=0, noop_with_empty_axes=1)

  return rule


def _argmax(g: Graph, eqn, x: str) -> str:
  (axis,) = eqn.params['axes']
  y = g.one('ArgMax', [x], axis=int(axis), keepdims=0, select_last_index=0)
  return g.one('Cast', [y], to=onnx_dtype(eqn.params['index_dtype']))


def _convert(g: Graph, eqn, x: str) -> str:
  return g.one('Cast', [x], to=onnx_dtype(eqn.params['new_dtype']))


def _reshape(g: Graph, eqn, x: str) -> str:
  if eqn.params.get('dimensions') is not None:
    raise NotImplementedError('reshape with a dimension order')
  return g.one('Reshape', [x, g.shape(eqn.params['new_sizes'])])


def _squeeze(g: Graph, eqn, x: str) -> str:
  return g.one('Squeeze', [x, g.constant(list(eqn.params['dimensions']), np.int64)])


def _expand_dims(g: Graph, eqn, x: str) -> str:
  return g.one('Unsqueeze', [x, g.constant(list(eqn.params['dimensions']), np.int64)])


def _transpose(g: Graph, eqn, x: str) -> str:
  return g.one('Transpose', [x], perm=[int(p) for p in eqn.params['permutation']])


def _concatenate(g: Graph, eqn, *xs: str) -> str:
  return g.one('Concat', list(xs), axis=int(eqn.params['dimension']))


def _stack(g: Graph, eqn, *xs: str) -> str:
  axis = g.constant([int(eqn.params['axis'])], np.int64)
  return g.one('Concat', [g.one('Unsqueeze', [x, axis]) for x in xs], axis=int(eqn.params['axis']))


def _pad(g: Graph, eqn, x: str, value: str) -> str:
  config = eqn.params['padding_config']
  if any(interior != 0 for _, _, interior in config):
    raise NotImplementedError('pad with interior padding')
  pads = [int(lo) for lo, _, _ in config] + [int(hi) for _, hi, _ in config]
  return g.one('Pad', [x, g.constant(pads, np.int64), value], mode='constant')


def _select_n(g: Graph, eqn, which: str, *cases: str) -> str:
  if len(cases) != 2 or np.dtype(eqn.invars[0].aval.dtype) != np.bool_:
    raise NotImplementedError('select_n with more than two cases')
  return g.one('Where', [which, cases[1], cases[0]])


def _clamp(g: Graph, eqn, lo: str, x: str, hi: str) -> str:
  return g.one('Min', [g.one('Max', [x, lo]), hi])


def _rsqrt(g: Graph, eqn, x: str) -> str:
  return g.one('Reciprocal', [g.one('Sqrt', [x])])


def _ne(g: Graph, eqn, a: str, b: str) -> str:
  return g.one('Not', [g.one('Equal', [a, b])])


def _integer_pow(g: Graph, eqn, x: str) -> str:
  y = eqn.params['y']
  exponent = g.constant(np.asarray(y, dtype=eqn.invars[0].aval.dtype))
  return g.one('Pow', [x, exponent])


def _round(g: Graph, eqn, x: str) -> str:
  if int(eqn.params['rounding_method']) == 1:  # to nearest even, as ONNX's Round
    return g.one('Round', [x])
  half = g.constant(np.asarray(0.5, dtype=eqn.invars[0].aval.dtype))  # half away from zero
  return g.one('Mul', [g.one('Sign', [x]), g.one('Floor', [g.one('Add', [g.one('Abs', [x]), half])])])


def iota(g: Graph, eqn) -> str:
  """``iota`` of a static shape, as a constant."""
  p = eqn.params
  shape, dim = p['shape'], p['dimension']
  if not all(is_static(d) for d in shape):
    raise NotImplementedError('iota with a symbolic shape')
  ramp = np.arange(shape[dim], dtype=p['dtype']).reshape([-1 if i == dim else 1 for i in range(len(shape))])
  return g.constant(np.broadcast_to(ramp, shape).copy())


RULES: dict[str, Callable] = {
  'broadcast_in_dim': _broadcast_in_dim,
  'slice': _slice,
  'dynamic_update_slice': _dynamic_update_slice,
  'dynamic_slice': _dynamic_slice,
  'gather': _gather,
  'dot_general': _dot_general,
  'conv_general_dilated': _conv,
  'reduce_window_max': _max_pool,
  'max': _max,
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
