"""ProgressiveNN (Suzuki et al.) on the level machinery, and level x precision stepping.

* Bitwise-binary (BWB) weights: every weight is ``scale * sum_j d_j 2^(N-1-j)`` with
  digits d_j in {-1, +1}, most significant plane first (``quantizers.bitplanes``); one
  training run at N planes (``quant.quantization_aware`` with ``precision_at(N)``) gives
  the one parameter set every plane count uses.
* Accumulative bit-serial (ABS) inference (``bit_serial_exits``): the first layer adds
  plane b's partial sums to the cached sums of planes 1..b-1, so its step costs one
  1-bit plane. A new plane changes the first layer's output, so every later layer reads
  new inputs and is recomputed with its b-plane weights; that is what a plane step costs
  (``PlaneCosts``), not b/N of a forward.
* BN retraining (``retrain_bn``): BatchNorm statistics re-estimated on training images
  for every plane count; the weights are shared.
* Level x precision: a state (level k, planes b) is reached by level steps (exact reuse,
  only level k+1's connections at b planes) and plane steps (the recomputation above, on
  the subnet of levels <= k). ``staircase`` picks steps greedily by validation accuracy
  gained per bit-op.

Bit-operations are MACs x weight bits x activation bits (``quant.bitops``); a bit-plane
is a 1-bit weight.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepnet_jax import data, feed, layers, nonuniform, quant
from stepnet_jax.config import Config
from stepnet_jax.model import SteppingModel
from stepnet_jax.quantizers import bitplanes


def precision_at(model: SteppingModel, planes: int, n: int, act_bits: int, clips) -> quant.Precision:
  """Every neuron using its first ``planes`` of ``n`` bitwise-binary planes."""
  if not 1 <= planes <= n:
    raise ValueError(f'planes must be in 1..{n}, got {planes}')
  return quant.Precision(quant.uniform_bits(model, planes), act_bits, clips, bwb_bits=n)


def retrain_bn(model: SteppingModel, dataset: data.Dataset, cfg: Config, batches: int) -> SteppingModel:
  """``model`` (already quantized) with its BN statistics re-estimated over ``batches``
  training batches; parameters untouched."""
  return nonuniform.recalibrate(model, dataset, cfg.replace(**{'baseline.recalibrate_batches': int(batches)}))


def _first_unit(model: SteppingModel) -> layers._LinearUnit:
  first = model.units[0]
  if not isinstance(first, (layers.LevelConv, layers.LevelDense)):
    raise ValueError(f'bit-serial inference needs a conv or dense first layer, got {type(first).__name__}')
  return first


@functools.lru_cache(maxsize=4)
def _bit_serial_fn(graphdef, n: int):
  @jax.jit
  def run(first_kernel, states, images):
    acc, out = None, []
    for b, state in enumerate(states, start=1):
      m = nnx.merge(graphdef, state)
      first = _first_unit(m)
      if acc is None:
        x = m.normalize(images)
        mask = quant.kept_mask(first)
        keep = 1.0 if mask is None else jnp.asarray(mask)
        digits, scale = bitplanes(first_kernel * keep, n)
        acc = jnp.zeros((), jnp.float32)
      acc = acc + 2.0 ** (n - b) * first.linear(x, digits[b - 1] * keep, False)     # plane b's partial sums
      h = first.finish(scale * acc, 0, first.kernel.shape[-1], False, m.top)
      for unit in m.units[1:]:
        h = unit(h, m.top)                                                         # recomputed at b planes
      out.append(m.head.exits(h))
    return jnp.stack(out)

  return run


def bit_serial_exits(first_kernel: jax.Array, models: Sequence[SteppingModel], images: jax.Array,
                     n: int) -> jax.Array:
  """All exits after each of ``len(models)`` plane steps of ABS inference: [b, K, B, classes].

  ``models[b-1]`` is the network at b of ``n`` planes (``quant.apply(model,
  precision_at(b))``, with its own BN statistics); ``first_kernel`` is the first layer's
  float kernel, whose planes the first layer accumulates one per step. Equals each
  model's direct forward (to float rounding; exactly on integer-valued data, see the tests).
  """
  if len(models) > n:
    raise ValueError(f'{len(models)} plane steps asked of {n}-plane weights')
  graphdef = nnx.graphdef(models[0])
  states = [nnx.state(m) for m in models]
  return _bit_serial_fn(graphdef, int(n))(jnp.asarray(first_kernel), states, images)


@dataclasses.dataclass(frozen=True)
class PlaneCosts:
  """Bit-ops per input of every step between (level, planes) states of one network.

  ``ops[b]`` [layers, K] is ``quant.bitops`` with every neuron at b planes (row 0 the
  first layer, the last row the head)."""
  ops: np.ndarray          # [N + 1, layers, K], ops[0] = 0
  num_levels: int
  n: int

  @classmethod
  def of(cls, model: SteppingModel, n: int, act_bits: int) -> PlaneCosts:
    zero = np.zeros_like(quant.bitops(model, quant.uniform_bits(model, 1), act_bits))
    ops = [zero] + [quant.bitops(model, quant.uniform_bits(model, b), act_bits) for b in range(1, n + 1)]
    return cls(np.stack(ops), model.num_levels, n)

  def direct(self, level: int, planes: int) -> int:
    """A forward of subnet ``level`` at ``planes`` planes from scratch."""
    return int(self.ops[planes][:, :level + 1].sum())

  def level_step(self, level: int, planes: int) -> int:
    """(level, planes) -> (level + 1, planes): only the new level's connections."""
    return int(self.ops[planes][:, level + 1].sum())

  def plane_step(self, level: int, planes: int) -> int:
    """(level, planes) -> (level, planes + 1): one 1-bit plane of the first layer's
    connections (accumulated), then every later layer of the subnet recomputed."""
    return int(self.ops[1][0, :level + 1].sum() + self.ops[planes + 1][1:, :level + 1].sum())

  def step(self, state: tuple[int, int], to: tuple[int, int]) -> int:
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


def bit_serial_accuracy(first_kernel: jax.Array, models: Sequence[SteppingModel], images: np.ndarray,
                        labels: np.ndarray, n: int, batch_size: int = 1000) -> np.ndarray:
  """Accuracy of every exit after every plane step of ABS inference: [b, K]."""
  correct, seen = 0, 0
  for batch in feed.evaluation_batches(images, labels, batch_size):
    pred = np.asarray(bit_serial_exits(first_kernel, models, batch.images, n).argmax(-1))[..., :batch.count]
    correct = correct + (pred == labels[None, None, seen:seen + batch.count]).sum(axis=-1)
    seen += batch.count
  return correct / len(labels)
