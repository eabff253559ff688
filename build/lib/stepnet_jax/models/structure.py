"""The structure record a checkpoint keeps (``model_meta``: architecture, level assignment,
normalisation, options) and the model it describes (``build_from_meta``), with defaults for
keys older checkpoints lack."""

from __future__ import annotations

from stepnet_jax.core.model import SteppingModel
from stepnet_jax.models import zoo


def model_meta(model: SteppingModel, name: str, num_classes: int) -> dict:
  """JSON-able description that ``build_from_meta`` turns back into the same structure."""
  return {
    'model': name,
    'num_classes': num_classes,
    'input_shape': list(model.input_shape),
    'num_levels': model.num_levels,
    'triangular': any(getattr(u, 'conn', None) is not None and u.conn.triangular for u in model.units),
    'mask_rule': model.mask_rule,
    'switchable_bn': model.switchable_bn,
    'exit_heads': 'private' if model.head.private else 'shared',
    'assignment': zoo.assignment_of(model),
    'mean': list(model.mean),
    'std': list(model.std),
  }


# Model-meta keys added after checkpoints were first written, and what their absence meant.
MODEL_META_DEFAULTS = {'mask_rule': True, 'exit_heads': 'shared'}


def with_defaults(meta: dict) -> dict:
  """``meta`` with the keys an older checkpoint lacks filled in as their absence meant
  (before ``switchable_bn`` was stored, a model had a BN per subnet exactly without the rule)."""
  meta = {**MODEL_META_DEFAULTS, **meta}
  meta.setdefault('switchable_bn', not meta['mask_rule'])
  return meta


def same_model(a: dict, b: dict) -> bool:
  """Whether two ``model_meta`` describe the same structure (a key an older checkpoint
  lacks counts as its default)."""
  return with_defaults(a) == with_defaults(b)


def build_from_meta(meta: dict, seed: int = 0) -> SteppingModel:
  """A freshly initialised model of the structure ``model_meta`` describes."""
  meta = with_defaults(meta)
  return zoo.build_model(
    meta['model'],
    num_classes=meta['num_classes'],
    input_shape=meta['input_shape'],
    num_levels=meta['num_levels'],
    assignment=meta['assignment'],
    triangular=meta['triangular'],
    mask_rule=meta['mask_rule'],
    switchable_bn=meta['switchable_bn'],
    exit_heads=meta['exit_heads'],
    mean=meta['mean'],
    std=meta['std'],
    seed=seed,
  )
