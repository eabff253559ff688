"""ProgressiveNN (Suzuki et al.) on the level machinery, and level x precision stepping.

* Bitwise-binary (BWB) weights: every weight is ``scale * sum_j d_j 2^(N-1-j)`` with
  digits d_j in {-1, +1}, most significant plane first (``quantizers.bitplanes``); one
  training run at N planes (``quantized.quantization_aware`` with ``precision_at(N)``) gives
  the one parameter set every plane count uses.
* Accumulative bit-serial (ABS) inference (``bit_serial_exits``): the first layer adds
  plane b's partial sums to the cached sums of planes 1..b-1, so its step costs one
  1-bit plane. A new plane changes the first layer's output, so every later layer reads
  new inputs and is recomputed with its b-plane weights; that is what a plane step costs
  (``PlaneCosts``), not b/N of a forward.
* BN retraining (``retrain_bn``): BatchNorm statistics re-estimated on training images
  for every plane count, optionally BN's affine parameters trained per plane count too;
  the convolution and classifier weights are shared.
* Level x precision: a state (level k, planes b) is reached by level steps (exact reuse,
  only level k+1's connections at b planes) and plane steps (the recomputation above, on
  the subnet of levels <= k). ``staircase`` picks steps greedily by validation accuracy
  gained per bit-op.
* Class-based planes (``class_ladder``): rung b of the plane ladder need not give every
  neuron b planes. Class-based quantization's map from class importance to bits, fit to
  a MAC-weighted mean of b planes, gives each neuron its own count at every rung; counts
  never fall from one rung to the next, so a plane step still only adds planes (the
  first layer accumulates each neuron's new planes; later layers recompute at the rung's
  counts). Rung 1 is every neuron at 1 plane, rung N every neuron at N.

Bit-operations are MACs x weight bits x activation bits (``quantized.bitops``); a bit-plane
is a 1-bit weight.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stepnet_jax import seeds
from stepnet_jax.config import Config
from stepnet_jax.core import layers
from stepnet_jax.core.model import SteppingModel
from stepnet_jax.core.quantizers import bitplanes, plane_weights
from stepnet_jax.data import datasets, feed
from stepnet_jax.inference import evaluation, restore
from stepnet_jax.methods import bitsearch, nonuniform
from stepnet_jax.models import quantized
from stepnet_jax.training import fit, loop, losses, optim

# Weight bits (here: bitwise-binary planes) of every neuron of every layer, head included.
Bits = dict[str, tuple[int, ...]]


def precision_at(model: SteppingModel, planes: int, n: int, act_bits: int, clips) -> quantized.Precision:
  """Every neuron using its first ``planes`` of ``n`` bitwise-binary planes."""
  if not 1 <= planes <= n:
    raise ValueError(f'planes must be in 1..{n}, got {planes}')
  return quantized.Precision(quantized.uniform_bits(model, planes), act_bits, clips, bwb_bits=n)


def load_planes(directory: str) -> list[SteppingModel]:
  """The bitwise-binary network a precision study saved (``DIR/progressive``) at every plane
  count b = 1..N, each with the BN statistics (and, when they were retrained, BN's scale and
  bias) saved for b in ``bn_stats_per_planes.npz``."""
  model, meta = restore.load_variables(directory, apply_precision=False)
  precision = quantized.Precision.from_json(meta['model_meta']['precision'])
  if not precision.bwb_bits:
    raise ValueError(f'{directory} holds no bitwise-binary network (its precision has no bwb_bits)')
  path = os.path.join(directory, 'bn_stats_per_planes.npz')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing: the BN statistics per plane count are saved beside the network')
  n = precision.bwb_bits
  out = []
  with np.load(path) as stats:
    for b in range(1, n + 1):
      q = quantized.apply(model, precision_at(model, b, n, precision.act_bits, precision.act_clips))
      keys = [k for k in stats.files if k.startswith(f'planes{b}/')]
      if not keys:
        raise ValueError(f'{path} holds no statistics for {b} planes')
      for key in keys:
        module, names = q, key.split('/')[1:]
        for name in names[:-1]:
          module = module[int(name)] if name.isdigit() else getattr(module, name)
        getattr(module, names[-1])[...] = stats[key]
      out.append(q)
  return out


def uniform_ladder(model: SteppingModel, n: int) -> list[Bits]:
  """Rung b (b = 1..n): every neuron at b planes."""
  return [quantized.uniform_bits(model, b) for b in range(1, n + 1)]


def class_ladder(model: SteppingModel, score: dict[str, np.ndarray], n: int, slope: float) -> list[Bits]:
  """Rung b (b = 1..n): hidden neurons at ``bitsearch.bits_for(score, offset_b, slope)``
  planes, offset_b the largest whose MAC-weighted mean fits b planes (``bitsearch.fit_offset``);
  the head (not searched, as in class-based quantization) at b planes. ``score`` maps each
  hidden layer to its neurons' importance (``bitsearch.SCORES``). A neuron's count never
  decreases from rung to rung, so rungs form a plane ladder (checked)."""
  z = bitsearch.scaled({k: v for k, v in score.items() if k != 'head'})
  macs = quantized.hidden_neuron_macs(model)
  ladder = []
  for b in range(1, n + 1):
    bits = bitsearch.fit_offset(z, macs, float(b), slope, 1, n)
    ladder.append(
      {**{k: tuple(int(x) for x in v) for k, v in bits.items()}, 'head': (b,) * model.head.kernel.shape[-1]}
    )
  check_ladder(model, ladder, n)
  return ladder


def check_ladder(model: SteppingModel, ladder: Sequence[Bits], n: int) -> None:
  """Raises a ValueError unless ``ladder`` has n rungs of valid plane counts (1..n) that
  never decrease for any neuron, starting with every neuron at 1 plane."""
  if len(ladder) != n:
    raise ValueError(f'a ladder of {n} planes needs {n} rungs, got {len(ladder)}')
  for rung in ladder:
    quantized.check_bits(model, rung, n)
  if any(np.any(np.asarray(v) != 1) for v in ladder[0].values()):
    raise ValueError('rung 1 must hold every neuron at 1 plane (bit-serial inference starts from one plane)')
  for b, (low, high) in enumerate(zip(ladder, ladder[1:]), start=1):
    for name in low:
      if np.any(np.asarray(high[name]) < np.asarray(low[name])):
        raise ValueError(f'layer {name!r} loses planes from rung {b} to rung {b + 1}: a plane step only adds planes')


def retrain_bn(model: SteppingModel, dataset: datasets.Dataset, cfg: Config, batches: int) -> SteppingModel:
  """``model`` (already quantized) with its BN statistics re-estimated over ``batches``
  training batches; parameters untouched."""
  return nonuniform.recalibrate(model, dataset, cfg.replace(**{'baseline.recalibrate_batches': int(batches)}))


def _bn_affine(names: tuple) -> bool:
  """Is this parameter (``optim.param_names``) a BatchNorm scale or bias?"""
  return 'bn' in names and names[-1] in ('scale', 'bias')


def retrain_bn_at(
  model: SteppingModel,
  precision: quantized.Precision,
  dataset: datasets.Dataset,
  cfg: Config,
  batches: int,
  affine_steps: int = 0,
  learning_rate: float = 1e-3,
) -> SteppingModel:
  """``model`` (float) quantized at ``precision`` with its BN retrained: with ``affine_steps``
  BN's scale and bias are first trained for that many steps through the quantization-aware
  objective (straight-through, Adam at ``learning_rate``, every kernel and the classifier
  frozen: the paper's optional affine retraining); then the statistics are re-estimated
  (``retrain_bn``)."""
  affine_steps = int(affine_steps)
  if affine_steps:
    model, _ = fit.fit(
      model,
      optim.train_only(optax.adam(learning_rate), _bn_affine),
      quantized.quantization_aware(losses.objective_for(cfg), precision),
      feed.training_batches(
        dataset.train_images, dataset.train_labels, cfg.train.batch_size, cfg.seed, 0, affine_steps
      ),
      affine_steps,
      seed=seeds.seed_for(cfg.seed, seeds.Stream.BN_AFFINE_RETRAINING),
      settings=dataclasses.replace(loop.LoopSettings.from_config(cfg, dataset.num_classes), progress=False),
      desc='BN affine',
    )
  return retrain_bn(quantized.apply(model, precision), dataset, cfg, batches)


def _first_unit(model: SteppingModel) -> layers._LinearUnit:
  first = model.units[0]
  if not isinstance(first, (layers.LevelConv, layers.LevelDense)):
    raise ValueError(f'bit-serial inference needs a conv or dense first layer, got {type(first).__name__}')
  return first


@functools.lru_cache(maxsize=4)
def _bit_serial_fn(graphdef, n: int):
  @jax.jit
  def run(first_kernel, first_planes, states, images):
    acc, out, used = None, [], jnp.zeros((n, first_kernel.shape[-1]), bool)
    for state, planes in zip(states, first_planes):
      m = nnx.merge(graphdef, state)
      first = _first_unit(m)
      if acc is None:
        x = m.normalize(images)
        mask = quantized.kept_mask(first)
        keep = 1.0 if mask is None else jnp.asarray(mask)
        digits, scale = bitplanes(first_kernel * keep, n)
        acc = jnp.zeros((), jnp.float32)
      now = jnp.arange(n)[:, None] < planes[None, :]  # [n, C_out] planes in use
      place = jnp.where(now & ~used, plane_weights(n, n)[:, None], 0.0)  # the planes this step adds
      added = jnp.sum(digits * place.reshape((n,) + (1,) * (digits.ndim - 2) + (-1,)), axis=0)
      acc = acc + first.linear(x, added * keep, False)  # their partial sums
      used = now
      h = first.finish(scale * acc, 0, first.kernel.shape[-1], False, m.top)
      for unit in m.units[1:]:
        h = unit(h, m.top)  # recomputed at b planes
      out.append(m.head.exits(h))
    return jnp.stack(out)

  return run


def bit_serial_exits(
  first_kernel: jax.Array,
  models: Sequence[SteppingModel],
  images: jax.Array,
  n: int,
  first_planes: Sequence[Sequence[int]] | None = None,
) -> jax.Array:
  """All exits after each of ``len(models)`` plane steps of ABS inference: [b, K, B, classes].

  ``models[b-1]`` is the network at rung b of an ``n``-plane ladder (``quantized.apply`` with
  that rung's planes, with its own BN statistics); ``first_kernel`` is the first layer's
  float kernel, whose planes the first layer accumulates step by step: at rung b each of
  its neurons adds the planes it gained (``first_planes[b-1]``, its plane count per
  neuron at rung b; default b for every neuron). Equals each model's direct forward (to
  float rounding; exactly on integer-valued data, see the tests).
  """
  if len(models) > n:
    raise ValueError(f'{len(models)} plane steps asked of {n}-plane weights')
  width = int(np.shape(first_kernel)[-1])
  if first_planes is None:
    first_planes = [[b] * width for b in range(1, len(models) + 1)]
  first_planes = np.asarray(first_planes, np.int32)
  if first_planes.shape != (len(models), width) or np.any(np.diff(first_planes, axis=0) < 0):
    raise ValueError(
      f'first_planes must be non-decreasing plane counts [{len(models)}, {width}], got shape {first_planes.shape}'
    )
  graphdef = nnx.graphdef(models[0])
  states = [nnx.state(m) for m in models]
  return _bit_serial_fn(graphdef, int(n))(jnp.asarray(first_kernel), jnp.asarray(first_planes), states, images)


def bit_serial_accuracy(
  first_kernel: jax.Array,
  models: Sequence[SteppingModel],
  images: np.ndarray,
  labels: np.ndarray,
  n: int,
  batch_size: int = 1000,
  first_planes: Sequence[Sequence[int]] | None = None,
) -> np.ndarray:
  """Accuracy of every exit after every plane step of ABS inference: [b, K]
  (``first_planes`` as in ``bit_serial_exits``)."""

  def hits(batch: feed.Batch) -> jax.Array:
    return bit_serial_exits(first_kernel, models, batch.images, n, first_planes).argmax(-1) == batch.labels  # [b, K, B]

  return evaluation.accumulate(hits, images, labels, batch_size) / len(labels)
