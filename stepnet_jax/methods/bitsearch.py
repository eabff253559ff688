"""Per-neuron bit widths under an average-bit budget, from an importance score.

Class-based quantization (Sun et al., DATE 2023) gives more important neurons more bits;
the paper does not publish its search. Here every method shares one search and differs
only in its score (``SCORES``): ``class`` (for how many classes a neuron matters, the
construction's class-based importance), ``magnitude`` (the L1 norm of the neuron's
kernel column, over its layer's mean) and ``random``.

The search: with the score z scaled to [0, 1], ``bits = clip(round(offset + slope * z),
min_bits, max_bits)``. For each slope of a small grid, the largest offset whose
MAC-weighted mean bits fit the budget is found by bisection, and the candidates are
ranked on the validation split by ``rank_by``: the top exit's cross-entropy (``loss``,
the default: a continuous score, steadier than the accuracy when candidates differ by
a few tenths of a point) or its ``accuracy``. Slope 0 would be uniform bits (the
``uniform`` baseline) and the default grid starts at 1; at an even whole-bit budget,
though, slope 1 fits as uniform bits too (at offset budget - 0.5 every z in [0, 1]
rounds to the budget, numpy rounding halves to even), so the search can find that no
shaping beats uniform; the record marks such candidates. The map is
non-decreasing in the score, so a more important neuron never gets fewer bits. The
classifier (head) is not searched: it keeps ``head_bits`` for every method (it holds
about 0.1% of the MACs) and is left out of the average.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from stepnet_jax.core.model import SteppingModel
from stepnet_jax.methods import importance as importance_lib
from stepnet_jax.models import quantized, surgery
from stepnet_jax.registry import Registry


def bits_for(
  z: Mapping[str, np.ndarray], offset: float, slope: float, min_bits: int, max_bits: int
) -> dict[str, np.ndarray]:
  """Per layer, ``clip(round(offset + slope * z), min_bits, max_bits)`` for the scaled scores ``z``."""
  return {k: np.clip(np.round(offset + slope * v), min_bits, max_bits).astype(np.int64) for k, v in z.items()}


def fit_offset(
  z: Mapping[str, np.ndarray],
  macs: Mapping[str, np.ndarray],
  budget: float,
  slope: float,
  min_bits: int,
  max_bits: int,
  iterations: int = 60,
) -> dict[str, np.ndarray] | None:
  """The bits of the largest offset whose MAC-weighted mean fits ``budget`` (None if even
  the smallest does not)."""
  lo, hi = min_bits - slope - 1.0, max_bits + 1.0
  if quantized.mean_bits(bits_for(z, lo, slope, min_bits, max_bits), macs) > budget + 1e-9:
    return None
  for _ in range(iterations):
    mid = 0.5 * (lo + hi)
    if quantized.mean_bits(bits_for(z, mid, slope, min_bits, max_bits), macs) <= budget + 1e-9:
      lo = mid
    else:
      hi = mid
  return bits_for(z, lo, slope, min_bits, max_bits)


def scaled(scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Scores over all neurons mapped to [0, 1] (min -> 0, max -> 1)."""
  allv = np.concatenate([np.asarray(v, np.float64) for v in scores.values()])
  lo, span = allv.min(), allv.max() - allv.min()
  return {k: (np.asarray(v, np.float64) - lo) / span if span > 0 else np.zeros(len(v)) for k, v in scores.items()}


RANK_BY = {'loss': -1.0, 'accuracy': 1.0}  # validation metric -> sign (higher signed value wins)


def search(
  model: SteppingModel,
  scores: Mapping[str, np.ndarray],
  budget: float,
  validate: Callable[[dict[str, tuple[int, ...]]], Mapping[str, float]],
  *,
  min_bits: int = 1,
  max_bits: int = 8,
  head_bits: int = 8,
  slopes: Sequence[float] = (1.0, 2.0, 4.0, 8.0),
  rank_by: str = 'loss',
) -> tuple[dict[str, tuple[int, ...]], dict]:
  """(weight bits of every layer, a record of the search) for the best slope on validation.

  ``validate(weight_bits)`` returns the top exit's validation metrics (at least the
  ``rank_by`` one: ``loss``, lower is better, or ``accuracy``); every metric it returns
  is recorded per candidate.
  """
  if rank_by not in RANK_BY:
    raise ValueError(f'rank_by must be one of {sorted(RANK_BY)}, got {rank_by!r}')
  macs = quantized.hidden_neuron_macs(model)
  z = scaled(scores)
  head = (int(head_bits),) * model.head.kernel.shape[-1]
  best, tried = None, []
  for slope in slopes:
    bits = fit_offset(z, macs, budget, slope, min_bits, max_bits)
    if bits is None:
      continue
    weight_bits = {**{k: tuple(int(b) for b in v) for k, v in bits.items()}, 'head': head}
    metrics = {k: float(v) for k, v in validate(weight_bits).items()}
    if rank_by not in metrics:
      raise ValueError(f'validate returned {sorted(metrics)}, without the ranking metric {rank_by!r}')
    tried.append(
      {
        'slope': float(slope),
        'mean_bits': quantized.mean_bits(bits, macs),
        'uniform': len(set(np.concatenate(list(bits.values())).tolist())) == 1,
        **{f'validation_{k}': v for k, v in metrics.items()},
      }
    )
    signed = RANK_BY[rank_by] * metrics[rank_by]
    if best is None or signed > best[0]:
      best = (signed, weight_bits, slope)
  if best is None:
    raise ValueError(f'no bit assignment within [{min_bits}, {max_bits}] fits a mean of {budget} bits')
  return best[1], {'slope': best[2], 'rank_by': rank_by, 'tried': tried}


def minimum_bits(
  model: SteppingModel,
  scores: Mapping[str, np.ndarray] | None,
  validate: Callable[[dict[str, tuple[int, ...]]], Mapping[str, float]],
  target_accuracy: float,
  *,
  min_bits: int = 1,
  max_bits: int = 8,
  head_bits: int = 8,
  slopes: Sequence[float] = (1.0, 2.0, 4.0, 8.0),
  step: float = 0.25,
) -> tuple[dict[str, tuple[int, ...]] | None, dict]:
  """(the fewest bits found whose top-exit validation accuracy is at least ``target_accuracy``,
  a record), the question of class-based quantization: how few bits keep the accuracy.

  With ``scores``, mean-bit budgets on a grid of ``step`` from ``min_bits`` to ``max_bits``
  are bisected (the accuracy taken to rise with the budget; every budget tried is recorded):
  at each, ``search`` ranks its candidates by validation accuracy, and the budget passes when
  the best reaches the target. Without ``scores``, uniform bits: the smallest whole width that
  passes, tried upwards. (None, record) when even ``max_bits`` does not pass."""
  head = (int(head_bits),) * model.head.kernel.shape[-1]
  tried = []

  def passes(budget: float):
    if scores is None:
      weight_bits = {**quantized.uniform_bits(model, int(budget)), 'head': head}
      accuracy = float(validate(weight_bits)['accuracy'])
    else:
      weight_bits, record = search(
        model,
        scores,
        budget,
        validate,
        min_bits=min_bits,
        max_bits=max_bits,
        head_bits=head_bits,
        slopes=slopes,
        rank_by='accuracy',
      )
      accuracy = max(t['validation_accuracy'] for t in record['tried'])
    tried.append({'budget': float(budget), 'validation_accuracy': accuracy})
    return (weight_bits, accuracy) if accuracy >= target_accuracy else None

  found = None
  if scores is None:
    for bits in range(min_bits, max_bits + 1):
      if (found := passes(bits)) is not None:
        break
  else:
    grid = np.arange(min_bits, max_bits, step)
    grid = np.append(grid[grid < max_bits - 1e-9], max_bits)  # max_bits itself even when step does not divide the range
    lo, hi = -1, len(grid) - 1  # grid[hi] passes (once checked); grid[lo] does not
    found = passes(grid[hi])
    while found is not None and hi - lo > 1:
      mid = (lo + hi) // 2
      if (at_mid := passes(grid[mid])) is not None:
        hi, found = mid, at_mid
      else:
        lo = mid
  record = {'target_validation_accuracy': float(target_accuracy), 'tried': tried}
  if found is None:
    return None, record
  return found[0], {**record, 'validation_accuracy': found[1]}


# name -> (model, images, labels, num_classes, seed) -> {hidden layer: score per neuron}
SCORES: Registry[Callable[..., dict[str, np.ndarray]]] = Registry('bit-width score')


@SCORES.register('class')
def _class_score(model, images, labels, num_classes, seed):
  del seed
  return importance_lib.importance(
    model, images, labels, method='class', weights=(1.0,) * model.num_levels, num_classes=num_classes
  )


@SCORES.register('magnitude')
def _magnitude_score(model, images, labels, num_classes, seed):
  del images, labels, num_classes, seed
  surgery.check_chain(model, 'the magnitude score')
  out = {}
  for name, unit in zip(model.unit_names, model.units):
    w = np.asarray(unit.kernel[...]) * unit.conn.mask  # the kept connections only
    k = np.abs(w).reshape(-1, unit.kernel.shape[-1]).sum(0)
    out[name] = k / k.mean()
  return out


@SCORES.register('random')
def _random_score(model, images, labels, num_classes, seed):
  del images, labels, num_classes
  surgery.check_chain(model, 'the random score')
  rng = np.random.RandomState(seed)
  return {name: rng.uniform(size=unit.kernel.shape[-1]) for name, unit in zip(model.unit_names, model.units)}
