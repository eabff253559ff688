"""Quantization core: per-neuron weight bits, uniform activation bits, bit-op accounting.

* Weights: symmetric, per output neuron / filter (the kernel's last axis), each neuron
  with its own bit width ``b``: ``q = clip(round(w / s), -(2^(b-1) - 1), 2^(b-1) - 1)``
  with ``s = max|w| / (2^(b-1) - 1)`` over the neuron's whole kernel column (so a
  neuron's quantized weights are the same in every subnet that contains it, and the
  level invariant survives quantization). ``b = 1`` is binary: ``sign(w) * mean|w|``.
  ``b >= FLOAT_BITS`` leaves the neuron in float.
* Activations: the output of every hidden unit (after ReLU and pooling, i.e. what the
  next layer reads) is quantized unsigned to ``act_bits`` on ``[0, clip]``, with one
  ``clip`` per layer calibrated on training images (``calibrate_clips``). The image is
  read as the 8-bit data it is (``INPUT_BITS``). A neuron's value is the same in every
  subnet up to float rounding (a level block and a wider prefix may sum in another
  order), so with activation quantization a value on a rounding tie can land one grid
  step apart between stepping and the direct forward.
* Fine-tuning: ``ste=True`` gives the straight-through estimator (forward quantized,
  gradient of the identity; for activations, zero outside ``[0, clip]``).
* Cost: bit-operations = MACs x weight bits x activation bits, per layer and level,
  counted exactly like the MACs (``bitops``).

A ``Precision`` is plain data (JSON-able) stored beside the level assignment in a run's
``model_meta``; ``apply(model, precision)`` gives the quantized model every other part
of the library (forward, stepping, anytime) runs unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepnet_jax.core import layers
from stepnet_jax.core.model import SteppingModel
from stepnet_jax.core.quantizers import FLOAT_BITS, bwb_kernel, quantize_activation, quantize_kernel  # noqa: F401

INPUT_BITS = 8  # the images are 8-bit data


@dataclasses.dataclass(frozen=True)
class Precision:
  """Bit widths of a model, as plain data.

  ``weight_bits``: layer name -> per-output-neuron bits (every linear layer and the head,
  in the layer's stored channel order); ``act_bits``: bits of every hidden activation
  (``FLOAT_BITS`` = float); ``act_clips``: layer name -> clip of its output activation.
  ``bwb_bits`` = N > 0 switches the weights to ProgressiveNN's bitwise-binary scheme: N
  planes of digits +-1, of which each neuron uses its first ``weight_bits`` (bit-serial
  inference after that many planes; ``quantizers.bwb_kernel``).
  """

  weight_bits: Mapping[str, tuple[int, ...]]
  act_bits: int = 8
  act_clips: Mapping[str, float] | None = None
  bwb_bits: int = 0

  def to_json(self) -> dict[str, Any]:
    """Plain JSON-able data (what a checkpoint records)."""
    return {
      'weight_bits': {k: [int(b) for b in v] for k, v in self.weight_bits.items()},
      'act_bits': int(self.act_bits),
      'act_clips': None if self.act_clips is None else {k: float(v) for k, v in self.act_clips.items()},
      'bwb_bits': int(self.bwb_bits),
    }

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> Precision:
    """The ``Precision`` that ``to_json`` wrote."""
    clips = d.get('act_clips')
    return cls(
      {k: tuple(int(b) for b in v) for k, v in d['weight_bits'].items()},
      int(d.get('act_bits', 8)),
      None if clips is None else {k: float(v) for k, v in clips.items()},
      int(d.get('bwb_bits', 0)),
    )


def linear_layers(model: SteppingModel) -> dict[str, nnx.Module]:
  """Layer name -> module holding a ``kernel`` whose last axis is the output neurons."""
  out = {}
  for name, unit in zip(model.unit_names, model.units):
    if not isinstance(unit, (layers.LevelConv, layers.LevelDense)):
      raise ValueError(f'quantization supports conv and dense chains; layer {name!r} is a {type(unit).__name__}')
    out[name] = unit
  out['head'] = model.head
  return out


def uniform_bits(model: SteppingModel, bits: int) -> dict[str, tuple[int, ...]]:
  """Every neuron of every layer at ``bits`` bits."""
  return {name: (int(bits),) * layer.kernel.shape[-1] for name, layer in linear_layers(model).items()}


def check_bits(model: SteppingModel, weight_bits: Mapping[str, Sequence[int]], bwb_bits: int = 0) -> None:
  """Raises a ValueError naming the layer when ``weight_bits`` does not fit ``model`` (or,
  for bitwise-binary weights, uses more than ``bwb_bits`` planes)."""
  found = linear_layers(model)
  unknown = sorted(set(weight_bits) - set(found))
  if unknown:
    raise ValueError(f'bits for unknown layers {unknown}; the model has {sorted(found)}')
  for name, layer in found.items():
    if name not in weight_bits:
      raise ValueError(f'no weight bits for layer {name!r}')
    b = np.asarray(weight_bits[name])
    if b.shape != (layer.kernel.shape[-1],):
      raise ValueError(f'layer {name!r} has {layer.kernel.shape[-1]} neurons, got {b.shape[0] if b.ndim else 0} bits')
    if (b < 1).any():
      raise ValueError(f'layer {name!r}: weight bits must be >= 1, got {b.min()}')
    if bwb_bits and (b > bwb_bits).any():
      raise ValueError(f'layer {name!r}: {b.max()} bit-planes asked of {bwb_bits}-plane bitwise-binary weights')


def kept_mask(layer: nnx.Module) -> np.ndarray | None:
  """The layer's static connection mask shaped to broadcast against its kernel (None: all kept)."""
  if getattr(layer, 'private', False):  # private exit heads: exit k reads only levels <= k
    return layer.exit_mask()
  conn = getattr(layer, 'conn', None)
  return None if conn is None or conn.mask.all() else conn.mask.astype(np.float32)


def quantized_kernels(
  model: SteppingModel, weight_bits: Mapping[str, Sequence[int]], ste: bool = False, bwb_bits: int = 0
) -> dict[str, jax.Array]:
  """Layer name -> its fake-quantized kernel (statistics over the kept connections only:
  masked weights are never used, and may still hold their initial values); with
  ``bwb_bits`` = N, bitwise-binary N-plane weights truncated to ``weight_bits`` planes."""
  if bwb_bits:
    return {
      name: bwb_kernel(layer.kernel[...], bwb_bits, jnp.asarray(weight_bits[name]), ste, kept_mask(layer))
      for name, layer in linear_layers(model).items()
    }
  return {
    name: quantize_kernel(layer.kernel[...], jnp.asarray(weight_bits[name]), ste, kept_mask(layer))
    for name, layer in linear_layers(model).items()
  }


def set_kernels(model: SteppingModel, kernels: Mapping[str, jax.Array]) -> None:
  """Writes ``kernels`` (layer name -> array) into ``model`` in place."""
  for name, layer in linear_layers(model).items():
    layer.kernel[...] = kernels[name]


def set_activation_quantization(
  model: SteppingModel, act_bits: int, clips: Mapping[str, float] | None, ste: bool = False
) -> None:
  """Makes every hidden unit quantize its output (static: part of the model's structure);
  ``act_bits >= FLOAT_BITS`` or ``clips=None`` turns it off."""
  for name, unit in zip(model.unit_names, model.units):
    if act_bits >= FLOAT_BITS or clips is None:
      unit.act_quant = None
      continue
    if not unit.relu:
      raise ValueError(f'layer {name!r} has no ReLU: unsigned activation quantization needs one')
    unit.act_quant = (int(act_bits), float(clips[name]), bool(ste))


def calibrate_clips(model: SteppingModel, images: np.ndarray, quantile: float = 1.0) -> dict[str, float]:
  """Per hidden layer, the ``quantile`` of its (float) output activations over ``images``
  (eval mode, full width): the clip of its activation quantizer."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def outputs(state, x):
    m = nnx.merge(graphdef, state)
    h, out = m.normalize(x), []
    for unit in m.units:
      h = unit(h, m.top)
      out.append(h.reshape(-1))
    return out

  acts = outputs(state, jnp.asarray(images))
  clips = {
    name: float(np.quantile(np.asarray(a), quantile)) if quantile < 1 else float(np.asarray(a).max())
    for name, a in zip(model.unit_names, acts)
  }
  return {name: max(c, 1e-6) for name, c in clips.items()}  # a silent layer still gets a valid grid


def apply(model: SteppingModel, precision: Precision) -> SteppingModel:
  """A copy of ``model`` with quantized kernels and quantized hidden activations."""
  check_bits(model, precision.weight_bits, precision.bwb_bits)
  if precision.act_bits < FLOAT_BITS and precision.act_clips is None:
    raise ValueError('activation quantization needs act_clips (quant.calibrate_clips)')
  graphdef, state = nnx.split(model)
  q = nnx.merge(graphdef, state, copy=True)
  set_kernels(q, quantized_kernels(q, precision.weight_bits, bwb_bits=precision.bwb_bits))
  set_activation_quantization(q, precision.act_bits, precision.act_clips)
  return q


def neuron_macs(model: SteppingModel) -> dict[str, np.ndarray]:
  """MACs per input of every output neuron of every layer (head: per class) in the top
  subnet: its kept input connections x kernel taps x output positions."""
  out, shape = {}, model.input_shape
  for name, unit in zip(model.unit_names, model.units):
    macs, next_shape = unit.delta_macs(shape)
    kept = unit.conn.kept_connections()
    per_connection = int(macs.sum() // kept.sum()) if kept.sum() else 0
    out[name] = unit.conn.mask.sum(axis=0).astype(np.int64) * per_connection
    shape = next_shape
  head = model.head
  out['head'] = np.full(head.num_classes, head.spatial * int(head.level_inputs().sum()), np.int64)
  return out


def hidden_neuron_macs(model: SteppingModel) -> dict[str, np.ndarray]:
  """``neuron_macs`` without the head: the neurons whose bits are searched and averaged."""
  return {k: v for k, v in neuron_macs(model).items() if k != 'head'}


def bitops(
  model: SteppingModel, weight_bits: Mapping[str, Sequence[int]], act_bits: int, input_bits: int = INPUT_BITS
) -> np.ndarray:
  """Exact bit-operations per input of each level's new connections, int64 [layers, K]:
  for every connection, its MACs x its output neuron's weight bits x the bits of the
  activation it reads (the image: ``input_bits``; hidden activations: ``act_bits``)."""
  check_bits(model, weight_bits)
  rows, shape, in_bits = [], model.input_shape, input_bits
  for name, unit in zip(model.unit_names + ('head',), list(model.units) + [model.head]):
    macs, out_shape = unit.delta_macs(shape)
    bits = np.asarray(weight_bits[name], np.int64)
    if name == 'head':
      spatial = unit.spatial
      per_level = spatial * unit.level_inputs() * int(bits.sum())
    else:
      conn = unit.conn
      kept = conn.kept_connections()
      per_connection = int(macs.sum() // kept.sum()) if kept.sum() else 0  # taps x output positions (conv)
      subnet = [0]
      for k in range(conn.num_levels):
        ein, eout = (int(np.sum(conn.in_sizes[: k + 1])), int(np.sum(conn.out_sizes[: k + 1])))
        fan_in = conn.mask[:ein, :eout].sum(axis=0)  # kept inputs per output
        subnet.append(int((fan_in * bits[:eout]).sum()) * per_connection)
      per_level = np.diff(np.asarray(subnet, np.int64))
    rows.append(per_level * in_bits)
    shape, in_bits = out_shape, act_bits
  return np.stack(rows).astype(np.int64)


def bitops_to_reach(model: SteppingModel, weight_bits: Mapping[str, Sequence[int]], act_bits: int) -> np.ndarray:
  """Bit-ops per input spent to have level k's answer, counted like ``macs_to_reach``
  (a model without reuse pays for every subnet up to k)."""
  reach = np.cumsum(bitops(model, weight_bits, act_bits).sum(axis=0))
  return reach if model.reusable else np.cumsum(reach)


def mean_bits(bits: Mapping[str, Sequence[int]], macs: Mapping[str, np.ndarray]) -> float:
  """Weight bits averaged over the MACs of the layers in ``macs`` (layer -> MACs per neuron,
  ``neuron_macs``): expensive neurons count more."""
  total = sum(float(m.sum()) for m in macs.values())
  return sum(float((np.asarray(bits[k]) * m).sum()) for k, m in macs.items()) / total


def mac_weighted_bits(model: SteppingModel, weight_bits: Mapping[str, Sequence[int]]) -> float:
  """Average weight bits over all MACs of the top subnet, the head included."""
  return mean_bits(weight_bits, neuron_macs(model))


def describe(model: SteppingModel, precision: Precision) -> str:
  """Per layer: neurons, bit range and MAC-weighted mean weight bits; then bit-ops per level."""
  lines = [f'{"layer":>8} {"neurons":>8} {"bits min..max":>14} {"mean bits":>10}']
  for name, macs in neuron_macs(model).items():
    bits = precision.weight_bits[name]
    lines.append(
      f'{name:>8} {len(bits):>8} {min(bits):>7}..{max(bits):<6} '
      f'{mean_bits({name: bits}, {name: macs}) if macs.sum() else 0.0:>10.2f}'
    )
  act = 'float' if precision.act_bits >= FLOAT_BITS else f'{precision.act_bits} bits'
  lines.append(
    f'activations: {act}; MAC-weighted mean weight bits {mac_weighted_bits(model, precision.weight_bits):.2f}'
  )
  ops = bitops_to_reach(model, precision.weight_bits, precision.act_bits)
  lines.append('bit-ops per input to reach each level: ' + ', '.join(f'L{k} {b:,}' for k, b in enumerate(ops)))
  return '\n'.join(lines)


def load_bits(spec: str, model: SteppingModel) -> dict[str, tuple[int, ...]]:
  """Weight bits from a command-line spec: an integer (every neuron) or a JSON file holding
  ``{layer: [bits per neuron]}`` or a ``Precision`` (its ``weight_bits``)."""
  import json

  if spec.strip().isdigit():
    return uniform_bits(model, int(spec))
  with open(spec) as f:
    d = json.load(f)
  bits = {k: tuple(int(b) for b in v) for k, v in d.get('weight_bits', d).items()}
  check_bits(model, bits)
  return bits


def quantization_aware(objective: Callable, precision: Precision) -> Callable:
  """The training objective ``objective`` on the quantized network (straight-through
  estimators for weights and activations): the gradients reach the float weights the
  optimizer keeps, the forward sees what inference will compute. It rewrites the model
  it is given (the train step hands it a fresh copy per step)."""

  def wrapped(model: SteppingModel, batch, rng):
    set_kernels(model, quantized_kernels(model, precision.weight_bits, ste=True, bwb_bits=precision.bwb_bits))
    set_activation_quantization(model, precision.act_bits, precision.act_clips, ste=True)
    return objective(model, batch, rng)

  return wrapped
