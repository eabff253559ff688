"""Guan et al.'s cascade: independent networks as the levels of one model, each level
recomputing from the input (nothing is reused), so the anytime program and the selection
module treat it like a stepping network."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class Cascade(nnx.Module):
  """Independent networks as the levels of one model (Guan et al.'s cascade): level k is
  network k's answer, computed from scratch."""

  def __init__(self, nets: Sequence[nnx.Module]):
    self.nets = nnx.List(list(nets))

  def exits(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Every network's logits: [K, B, classes]."""
    return jnp.stack([net(x, train=train) for net in self.nets])  # [K, B, classes]
