"""Fake quantizers (pure functions): per-neuron symmetric weights, unsigned activations.

Used by the layers (activation quantization in the forward) and by ``quant`` (weights,
bit widths, bit-op accounting); see ``quant`` for the scheme.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FLOAT_BITS = 32  # a neuron with this many bits (or more) keeps float weights


def _kept(w: jax.Array, mask: jax.Array | None) -> jax.Array:
  """The kept-connection mask (1 = kept) as ``w``'s shape and dtype; all ones without a mask."""
  return jnp.ones_like(w) if mask is None else jnp.broadcast_to(jnp.asarray(mask, w.dtype), w.shape)


def quantize_kernel(w: jax.Array, bits: jax.Array, ste: bool = False, mask: jax.Array | None = None) -> jax.Array:
  """Per-output-neuron symmetric fake quantization of ``w`` [..., C_out] to ``bits`` [C_out]
  bits (traced: one compilation serves every bit assignment). ``b = 1``: sign(w) * mean|w|;
  ``b >= 2``: round(w / s) clipped to +-(2^(b-1) - 1), s = max|w| / (2^(b-1) - 1) over the
  neuron's whole kernel column; ``b >= FLOAT_BITS``: unchanged. ``mask`` (broadcastable to
  ``w``; 1 = kept connection) limits the statistics to the kept weights and zeroes the others."""
  bits = jnp.asarray(bits, jnp.int32)
  axes = tuple(range(w.ndim - 1))
  keep = _kept(w, mask)
  w = w * keep
  top = jnp.exp2(bits.astype(jnp.float32) - 1.0) - 1.0  # 2^(b-1) - 1 (0 for b = 1)
  amax = jnp.max(jnp.abs(w), axis=axes)
  scale = jnp.where(amax > 0, amax / jnp.maximum(top, 1.0), 1.0)
  multi = jnp.clip(jnp.round(w / scale), -top, top) * scale
  mean = jnp.sum(jnp.abs(w), axis=axes) / jnp.maximum(jnp.sum(keep, axis=axes), 1.0)
  binary = jnp.where(w >= 0, 1.0, -1.0) * mean * keep
  q = jnp.where(bits >= FLOAT_BITS, w, jnp.where(bits == 1, binary, multi))
  return w + jax.lax.stop_gradient(q - w) if ste else q


def quantize_activation(y: jax.Array, bits: int, clip: float, ste: bool = False) -> jax.Array:
  """Unsigned uniform fake quantization of ``y`` to ``bits`` bits on [0, clip]; with ``ste``
  the gradient is the identity strictly inside (0, clip) and zero elsewhere, the boundaries
  included (stated, not left to how a compiler resolves ``clip``'s ties)."""
  step = clip / (2**bits - 1)
  q = jnp.round(jnp.clip(y, 0.0, clip) / step) * step
  if not ste:
    return q
  inside = (y > 0) & (y < clip)
  return jax.lax.stop_gradient(q) + jnp.where(inside, y - jax.lax.stop_gradient(y), 0.0)


def bitplanes(w: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """Bitwise-binary (BWB) decomposition of ``w`` [..., C_out] into ``n`` planes, most
  significant first: ``w ~ scale * sum_j d_j 2^(n-1-j)``, d_j in {-1, +1} ([n, ...]),
  ``scale`` [C_out] = max|w| / (2^n - 1) per output neuron. The represented values are
  the 2^n odd multiples of ``scale`` in [-max|w|, max|w|] (ProgressiveNN, Suzuki et al.)."""
  top = 2**n - 1
  axes = tuple(range(w.ndim - 1))
  amax = jnp.max(jnp.abs(w), axis=axes)
  scale = jnp.where(amax > 0, amax / top, 1.0)
  u = jnp.clip(jnp.round((w / scale + top) / 2), 0, top).astype(jnp.int32)  # q = 2u - top, u in [0, 2^n - 1]
  digits = jnp.stack([2 * ((u >> (n - 1 - j)) & 1) - 1 for j in range(n)]).astype(w.dtype)
  return digits, scale


def plane_weights(n: int, planes: int) -> jax.Array:
  """Place values 2^(n-1-j) of the first ``planes`` planes (float32)."""
  return jnp.asarray([2.0 ** (n - 1 - j) for j in range(planes)], jnp.float32)


def bwb_kernel(
  w: jax.Array, n: int, planes: int | jax.Array | None = None, ste: bool = False, mask: jax.Array | None = None
) -> jax.Array:
  """``w`` [..., C_out] quantized to ``n`` BWB planes and truncated to the first ``planes``
  (an int, or one count per output neuron [C_out]; default all): the weights a bit-serial
  layer uses after ``planes`` steps. ``mask`` (1 = kept connection) limits the scale's
  statistics to the kept weights and zeroes the others (BWB itself has no zero)."""
  keep = _kept(w, mask)
  digits, scale = bitplanes(w * keep, n)
  planes = n if planes is None else planes
  used = jnp.arange(n)[:, None] < jnp.reshape(jnp.asarray(planes), (1, -1))  # [n, 1 or C_out]
  place = jnp.where(used, plane_weights(n, n)[:, None], 0.0)  # [n, 1 or C_out]
  q = jnp.sum(digits * place.reshape((n,) + (1,) * (w.ndim - 1) + (-1,)), axis=0) * scale * keep
  return w + jax.lax.stop_gradient(q - w) if ste else q
