"""Re-levelling a trained network: new per-neuron levels, trained weights carried over.

Construction moves neurons between levels and prunes them; the non-uniform baseline
reorders channels by norm. Both give every hidden neuron a new level (or -1 to remove
it). ``relevel`` sorts each layer's neurons by their new level (stable, so the order
inside a level is kept), gathers the kernels, batch norms and head along the same
permutation, and rebuilds the model with the new level sizes.

Weights the old mask had switched off are zeroed before the move, so a connection the
new levels allow for the first time starts at 0 and the network's function changes
only where connections are removed.

Only plain chains of conv / dense units (mlp, lenet3c1l, lenet5, vgg16) are supported:
a residual stream shares its levels across blocks, which this per-layer view cannot
express.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepnet_jax.core import levels as lv
from stepnet_jax.core.layers import LevelConv, LevelDense, SwitchableBatchNorm
from stepnet_jax.core.model import SteppingModel
from stepnet_jax.models import structure

REMOVED = -1


def check_chain(model: SteppingModel) -> None:
  """Raises unless the model is a plain chain of conv / dense units."""
  for name, unit in zip(model.unit_names, model.units):
    if not isinstance(unit, (LevelConv, LevelDense)):
      raise ValueError(
        f'{name} is a {type(unit).__name__}; level surgery supports plain chains of conv '
        'and dense layers (mlp, lenet3c1l, lenet5, vgg16), not residual networks'
      )


def neuron_levels(model: SteppingModel) -> dict[str, np.ndarray]:
  """Current per-neuron level of every hidden layer."""
  check_chain(model)
  return {name: lv.levels_of(unit.conn.out_sizes) for name, unit in zip(model.unit_names, model.units)}


def _order(new_levels: np.ndarray, num_levels: int) -> tuple[tuple[int, ...], np.ndarray]:
  """(new sizes, indices of the kept neurons in their new order)."""
  new_levels = np.asarray(new_levels)
  kept = np.nonzero(new_levels != REMOVED)[0]
  sizes, order = lv.sizes_from_levels(new_levels[kept].astype(np.int64), num_levels)
  if sum(sizes) == 0:
    raise ValueError('a layer would lose all its neurons')
  return sizes, kept[order]


def _take_bn(bn: dict, idx: np.ndarray) -> dict:
  return {k: np.asarray(v)[idx] for k, v in bn.items()}


def relevel(
  model: SteppingModel,
  model_meta: Mapping,
  new_levels: Mapping[str, Sequence[int]],
  num_levels: int | None = None,
  mask_rule: bool | None = None,
) -> tuple[SteppingModel, dict]:
  """Rebuilds ``model`` with per-neuron levels ``new_levels[layer]`` (-1 removes a neuron).

  Args:
    model: a trained chain model.
    model_meta: its ``structure.model_meta`` (architecture, normalisation, ...).
    new_levels: for every hidden layer, one level per current neuron.
    num_levels: level count of the new model (default: unchanged).
    mask_rule: of the new model (default: unchanged; a new value also gives the new model
      the batch norm that goes with it: one per subnet exactly without the rule). A
      per-subnet batch norm new to the model starts from the old model's top-level statistics.
  Returns:
    (new model carrying the trained weights, its model_meta).
  """
  check_chain(model)
  num_levels = model.num_levels if num_levels is None else int(num_levels)
  switchable_bn = model.switchable_bn if mask_rule is None else not mask_rule
  mask_rule = model.mask_rule if mask_rule is None else bool(mask_rule)
  missing = set(model.unit_names) - set(new_levels)
  if missing:
    raise ValueError(f'new levels missing for layers {sorted(missing)}')
  sizes, index = {}, {}
  for name, unit in zip(model.unit_names, model.units):
    lvls = np.asarray(new_levels[name])
    if lvls.shape != (sum(unit.conn.out_sizes),):
      raise ValueError(f'{name}: {lvls.shape[0]} levels for {sum(unit.conn.out_sizes)} neurons')
    sizes[name], index[name] = _order(lvls, num_levels)

  meta = dict(
    model_meta,
    assignment={k: list(v) for k, v in sizes.items()},
    num_levels=num_levels,
    mask_rule=mask_rule,
    switchable_bn=switchable_bn,
  )
  new_model = nnx.eval_shape(lambda: structure.build_from_meta(meta))
  old = nnx.to_pure_dict(nnx.state(model))
  new = nnx.to_pure_dict(nnx.state(new_model))
  in_idx = np.arange(model.input_shape[-1])
  for i, (name, unit) in enumerate(zip(model.unit_names, model.units)):
    out_idx = index[name]
    src = old['units'][i]
    kernel = np.asarray(src['kernel']) * unit.conn.mask  # switched-off weights start at 0 if re-enabled
    new['units'][i]['kernel'] = kernel[..., in_idx, :][..., out_idx]
    new['units'][i]['bn'] = _relevel_bn(src['bn'], out_idx, new_model.units[i].bn, sizes[name])
    in_idx = out_idx
  new['head']['kernel'] = np.take(np.asarray(old['head']['kernel']), in_idx, axis=-2)  # [(K,) S, C, classes]
  if new_model.head.private:  # a feature that moved above level k leaves exit k's classifier
    new['head']['kernel'] = new['head']['kernel'] * new_model.head.exit_mask()
  new['head']['bias'] = np.asarray(old['head']['bias'])
  state = nnx.state(new_model)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, new))
  nnx.update(new_model, state)
  return new_model, meta


def _relevel_bn(src: dict, out_idx: np.ndarray, new_bn: nnx.Module, new_sizes) -> dict:
  """Batch-norm entries of the kept neurons in their new order (per subnet if switchable)."""
  top = src['per_level'][max(src['per_level'])] if 'per_level' in src else src
  if not isinstance(new_bn, SwitchableBatchNorm):
    return _take_bn(top, out_idx)
  return {'per_level': {k: _take_bn(top, out_idx[: lv.end(tuple(new_sizes), k)]) for k in range(len(new_sizes))}}
