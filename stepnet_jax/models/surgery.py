"""Re-levelling a trained network: new per-neuron levels, trained weights carried over.

Construction moves neurons between levels and prunes them; the non-uniform baseline
reorders channels by norm. Both give every hidden neuron a new level (or -1 to remove
it). Neurons are re-levelled per *group* (``core.wiring``): a chain layer's outputs, a
residual stream (written by the stem and every block of its stage, so a stream channel
moves in all of them at once), a block's inner channels. ``relevel`` sorts each group's
neurons by their new level (stable, so the order inside a level is kept), gathers every
layer's kernel along the permutations of the groups it reads and writes, its batch norm
and the head along the same, and rebuilds the model with the new level sizes.

Weights the old mask had switched off are zeroed before the move, so a connection the
new levels allow for the first time starts at 0 and the network's function changes
only where connections are removed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepnet_jax.config import SettingsError
from stepnet_jax.core import levels as lv
from stepnet_jax.core.layers import LevelConv, LevelDense, SwitchableBatchNorm
from stepnet_jax.core.model import SteppingModel
from stepnet_jax.models import structure

REMOVED = -1


def check_chain(model: SteppingModel, what: str = 'this method') -> None:
  """Raises ``SettingsError`` unless the model is a plain chain of conv / dense units (what the
  non-uniform baseline's filter norms and the per-layer bit searches read)."""
  for name, unit in zip(model.unit_names, model.units):
    if not isinstance(unit, (LevelConv, LevelDense)):
      raise SettingsError(
        f'{name} is a {type(unit).__name__}; {what} supports plain chains of conv and dense layers '
        '(mlp, lenet3c1l, lenet5, vgg16), not residual or inverted-residual networks'
      )


def neuron_levels(model: SteppingModel) -> dict[str, np.ndarray]:
  """Current per-neuron level of every neuron group (the assignment's names, ``core.wiring``)."""
  model.wiring()  # raises for a unit that does not list its links
  return {name: lv.levels_of(sizes) for name, sizes in model.assignment}


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
  bn_from: Sequence[int] | None = None,
) -> tuple[SteppingModel, dict]:
  """Rebuilds ``model`` with per-neuron levels ``new_levels[group]`` (-1 removes a neuron).

  Args:
    model: a trained model whose units list their links (chains, residual networks).
    model_meta: its ``structure.model_meta`` (architecture, normalisation, ...).
    new_levels: for every neuron group (``neuron_levels``' keys), one level per current neuron.
    num_levels: level count of the new model (default: unchanged).
    mask_rule: of the new model (default: unchanged; a new value also gives the new model
      the batch norm that goes with it: one per subnet exactly without the rule). A
      per-subnet batch norm new to the model starts from the old model's top-level statistics.
    bn_from: with per-subnet batch norm in both models, for each new subnet the old subnet
      whose batch norm it starts from (default, and from a shared batch norm: the old top). The old
      subnet must hold every neuron of the new one; the non-uniform baseline keeps each
      trained subnet's own statistics this way while it carves out the next.
  Returns:
    (new model carrying the trained weights, its model_meta).
  """
  wiring = model.wiring()
  num_levels = model.num_levels if num_levels is None else int(num_levels)
  switchable_bn = model.switchable_bn if mask_rule is None else not mask_rule
  mask_rule = model.mask_rule if mask_rule is None else bool(mask_rule)
  missing = set(wiring.groups) - set(new_levels)
  if missing:
    raise ValueError(f'new levels missing for groups {sorted(missing)}')
  sizes, index = {}, {None: np.arange(model.input_shape[-1])}
  for name, old_sizes in model.assignment:
    lvls = np.asarray(new_levels[name])
    if lvls.shape != (sum(old_sizes),):
      raise ValueError(f'{name}: {lvls.shape[0]} levels for {sum(old_sizes)} neurons')
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
  for link in wiring.links:
    layer, new_layer = _at(model, link.path), _at(new_model, link.path)
    src, dst = _at(old, link.path), _at(new, link.path)
    out_idx = index[link.target]
    if link.depthwise:  # [kh, kw, 1, C]: channel c reads its own input channel, which moves with it
      dst['kernel'] = np.asarray(src['kernel'])[..., out_idx]
    else:
      kernel = np.asarray(src['kernel']) * layer.conn.mask  # switched-off weights start at 0 if re-enabled
      dst['kernel'] = kernel[..., index[link.source], :][..., out_idx]
    dst['bn'] = _relevel_bn(src['bn'], out_idx, new_layer.bn, sizes[link.target], bn_from)
  head_idx = index[wiring.head_source]
  new['head']['kernel'] = np.take(np.asarray(old['head']['kernel']), head_idx, axis=-2)  # [(K,) S, C, classes]
  if new_model.head.private:  # a feature that moved above level k leaves exit k's classifier
    new['head']['kernel'] = new['head']['kernel'] * new_model.head.exit_mask()
  new['head']['bias'] = np.asarray(old['head']['bias'])
  state = nnx.state(new_model)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, new))
  nnx.update(new_model, state)
  return new_model, meta


def _at(tree, path: tuple):
  """The entry at ``path`` (``core.wiring.Path``) of a model (attributes, list indices) or of
  its pure-dict state (keys)."""
  for key in path:
    tree = tree[key] if isinstance(tree, dict) else (tree[key] if isinstance(key, int) else getattr(tree, key))
  return tree


def _relevel_bn(
  src: dict, out_idx: np.ndarray, new_bn: nnx.Module, new_sizes, bn_from: Sequence[int] | None = None
) -> dict:
  """Batch-norm entries of the kept neurons in their new order (per subnet if switchable;
  subnet k's from the old subnet ``bn_from[k]``, by default the old top)."""
  top = src['per_level'][max(src['per_level'])] if 'per_level' in src else src
  if not isinstance(new_bn, SwitchableBatchNorm):
    return _take_bn(top, out_idx)
  per_level = {}
  for k in range(len(new_sizes)):
    idx = out_idx[: lv.end(tuple(new_sizes), k)]
    old = top if bn_from is None or 'per_level' not in src else src['per_level'][bn_from[k]]
    if idx.size and int(idx.max()) >= len(next(iter(old.values()))):
      raise ValueError(f'new subnet {k} keeps neurons outside old subnet {bn_from[k]}, whose batch norm it was to take')
    per_level[k] = _take_bn(old, idx)
  return {'per_level': per_level}
