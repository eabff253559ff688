"""Fake quantizers (pure functions): per-neuron symmetric weights, unsigned activations.

Used by the layers (activation quantization in the forward) and by ``quant`` (weights,
bit widths, bit-op accounting); see ``quant`` for the scheme.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

FLOAT_BITS = 32       # a neuron with this many bits (or more) keeps float weights


def quantize_kernel(w: jax.Array, bits: jax.Array, ste: bool = False) -> jax.Array:
  """Per-output-neuron symmetric fake quantization of ``w`` [..., C_out] to ``bits`` [C_out]
  bits (traced: one compilation serves every bit assignment). ``b = 1``: sign(w) * mean|w|;
  ``b >= 2``: round(w / s) clipped to +-(2^(b-1) - 1), s = max|w| / (2^(b-1) - 1) over the
  neuron's whole kernel column; ``b >= FLOAT_BITS``: unchanged."""
  bits = jnp.asarray(bits, jnp.int32)
  axes = tuple(range(w.ndim - 1))
  top = jnp.exp2(bits.astype(jnp.float32) - 1.0) - 1.0                     # 2^(b-1) - 1 (0 for b = 1)
  amax = jnp.max(jnp.abs(w), axis=axes)
  scale = jnp.where(amax > 0, amax / jnp.maximum(top, 1.0), 1.0)
  multi = jnp.clip(jnp.round(w / scale), -top, top) * scale
  binary = jnp.where(w >= 0, 1.0, -1.0) * jnp.mean(jnp.abs(w), axis=axes)
  q = jnp.where(bits >= FLOAT_BITS, w, jnp.where(bits == 1, binary, multi))
  return w + jax.lax.stop_gradient(q - w) if ste else q


def quantize_activation(y: jax.Array, bits: int, clip: float, ste: bool = False) -> jax.Array:
  """Unsigned uniform fake quantization of ``y`` to ``bits`` bits on [0, clip]; with ``ste``
  the gradient is the identity inside [0, clip] and zero outside."""
  step = clip / (2 ** bits - 1)
  clipped = jnp.clip(y, 0.0, clip)
  q = jnp.round(clipped / step) * step
  return clipped + jax.lax.stop_gradient(q - clipped) if ste else q
