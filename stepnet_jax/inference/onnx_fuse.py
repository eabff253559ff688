"""Folding a per-channel affine map into the convolution or product before it, in a lowered ONNX graph.

A convolution followed by a normalisation in inference form, ``(conv(x) - mean) * scale +
shift``, lowers to Conv, a Transpose back to NHWC and one Sub, Mul and Add over the whole
activation. onnxruntime fuses a Conv with the bias and activation right after it, but not
across the Transpose nor a Sub, so each of those nodes was a full pass over memory (a third
of LeNet-3C1L's step time at batch 256 on onnxruntime). ``fold_channel_affine`` rewrites

* ``Conv -> Transpose -> (Add | Sub | Mul | Div by a per-channel constant)+`` as one Conv with
  scaled weights and a bias, then the Transpose;
* ``Einsum(x, constant) -> (the same)+``, where the channel is an axis of the constant only
  (the first layer's tap product), as an Einsum with scaled weights and one Add;

the same values up to float rounding.
"""

from __future__ import annotations

import collections
from collections.abc import Collection

import numpy as np
import onnx
from onnx import numpy_helper

_AFFINE = ('Add', 'Sub', 'Mul', 'Div')


def _per_channel(value: np.ndarray, rank: int, axis: int, channels: int) -> np.ndarray | None:
  """``value`` as a [channels] vector when it broadcasts over a rank-``rank`` tensor along
  ``axis`` only (a scalar, or 1s everywhere but ``axis``); else None."""
  if value.ndim > rank or not np.issubdtype(value.dtype, np.floating):
    return None
  shape = (1,) * (rank - value.ndim) + value.shape
  if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
    return None
  return np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float32)


def _affine_chain(value: str, consumers, consts, outputs, rank: int, axis: int, channels: int):
  """The Add/Sub/Mul/Div nodes by per-channel constants that follow ``value`` one after the
  other, and what they compute: (nodes, the last value, scale, shift) with last = value *
  scale + shift along ``axis``."""
  scale, shift = np.ones(channels, np.float32), np.zeros(channels, np.float32)
  chain = []
  while value not in outputs and len(consumers[value]) == 1 and consumers[value][0].op_type in _AFFINE:
    node = consumers[value][0]
    other = node.input[1] if node.input[0] == value else node.input[0]
    c = _per_channel(numpy_helper.to_array(consts[other]), rank, axis, channels) if other in consts else None
    if c is None or node.input[0] == node.input[1] or (node.op_type == 'Div' and node.input[0] != value):
      break
    if node.op_type == 'Add':
      shift = shift + c
    elif node.op_type == 'Mul':
      scale, shift = scale * c, shift * c
    elif node.op_type == 'Div':
      scale, shift = scale / c, shift / c
    elif node.input[0] == value:  # Sub: value - c
      shift = shift - c
    else:  # Sub: c - value
      scale, shift = -scale, c - shift
    chain.append(node)
    value = node.output[0]
  return chain, value, scale, shift


def _einsum_channel(node: onnx.NodeProto, consts) -> tuple[int, int, int, int] | None:
  """For ``Einsum(x, w)`` or ``Einsum(w, x)`` with ``w`` constant and an output axis that is
  an axis of ``w`` alone: (w's input position, that axis in w, in the output, output rank)."""
  if len(node.input) != 2:
    return None
  equation = next(a.s for a in node.attribute if a.name == 'equation').decode().replace(' ', '')
  if '->' not in equation or '.' in equation:
    return None
  ins, out = equation.split('->')
  subs = ins.split(',')
  for position in (1, 0):
    if node.input[position] not in consts or node.input[1 - position] in consts:
      continue
    for axis, letter in enumerate(out):
      if subs[position].count(letter) == 1 and letter not in subs[1 - position]:
        return position, subs[position].index(letter), axis, len(out)
  return None


def _scaled(weight: np.ndarray, scale: np.ndarray, axis: int, name: str) -> onnx.TensorProto:
  shape = [1] * weight.ndim
  shape[axis] = -1
  return numpy_helper.from_array((weight * scale.reshape(shape)).astype(weight.dtype), name)


def fold_channel_affine(
  nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto], outputs: Collection[str]
) -> list[onnx.NodeProto]:
  """The nodes with every per-channel affine chain after a Conv or constant-weight Einsum
  folded into it (new initializers are appended to ``initializers``). ``outputs``: the graph's
  output values, which keep their names and are never folded away from the middle of a chain."""
  consts = {t.name: t for t in initializers}
  consumers = collections.defaultdict(list)
  for node in nodes:
    for name in node.input:
      consumers[name].append(node)
  removed: set[int] = set()
  replaced: dict[int, onnx.NodeProto] = {}
  for node in nodes:
    if node.op_type == 'Conv' and node.input[1] in consts and (len(node.input) < 3 or node.input[2] in consts):
      after = consumers[node.output[0]]
      if len(after) != 1 or after[0].op_type != 'Transpose' or node.output[0] in outputs:
        continue
      transpose = after[0]
      perm = list(next(a.ints for a in transpose.attribute if a.name == 'perm'))
      weight = numpy_helper.to_array(consts[node.input[1]])
      chain, value, scale, shift = _affine_chain(
        transpose.output[0], consumers, consts, outputs, len(perm), perm.index(1), weight.shape[0]
      )
      if not chain:
        continue
      bias = numpy_helper.to_array(consts[node.input[2]]) if len(node.input) > 2 else np.zeros_like(scale)
      folded_w = _scaled(weight, scale, 0, f'{node.output[0]}_w')
      folded_b = numpy_helper.from_array((bias * scale + shift).astype(weight.dtype), f'{node.output[0]}_b')
      initializers += [folded_w, folded_b]
      x = node.input[0]
      del node.input[:]
      node.input.extend([x, folded_w.name, folded_b.name])
      transpose.output[0] = value  # the chain's result keeps its name (it may be a graph output)
      removed |= {id(n) for n in chain}
    elif node.op_type == 'Einsum' and (found := _einsum_channel(node, consts)) is not None:
      position, weight_axis, axis, rank = found
      weight = numpy_helper.to_array(consts[node.input[position]])
      if node.output[0] in outputs:
        continue
      chain, value, scale, shift = _affine_chain(
        node.output[0], consumers, consts, outputs, rank, axis, weight.shape[weight_axis]
      )
      if len(chain) < 2 and not (chain and chain[0].op_type in ('Mul', 'Div')):
        continue  # one Add or Sub: nothing to save
      folded_w = _scaled(weight, scale, weight_axis, f'{node.output[0]}_w')
      initializers.append(folded_w)
      node.input[position] = folded_w.name
      if not np.any(shift):  # a scale only: the product itself gives the chain's result
        node.output[0] = value
        removed |= {id(n) for n in chain}
        continue
      shape = [1] * rank
      shape[axis] = -1
      folded_b = numpy_helper.from_array(shift.reshape(shape).astype(weight.dtype), f'{node.output[0]}_b')
      initializers.append(folded_b)
      removed |= {id(n) for n in chain[:-1]}
      replaced[id(chain[-1])] = onnx.helper.make_node('Add', [node.output[0], folded_b.name], [value])
  return [replaced.get(id(n), n) for n in nodes if id(n) not in removed]
