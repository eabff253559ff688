"""Weighted multi-exit loss with optional distillation from the top exit."""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax


def multi_exit_loss(logits: jax.Array, labels: jax.Array, exit_weights: Sequence[float],
                    distill_weight: float = 0.0, temperature: float = 1.0
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Loss over all exits of one forward pass.

  loss = sum_k w_k CE_k / sum_k w_k
         + distill_weight * mean_{k<K-1} T^2 KL(softmax(z_top / T) || softmax(z_k / T))

  The teacher (top exit) is held fixed in the distillation term (stop-gradient), so
  it only pulls the lower exits towards the top one.

  Args:
    logits: [K, B, classes].
    labels: int [B].
    exit_weights: K non-negative weights (static).
  Returns:
    (scalar loss, {'ce': [K] per-exit cross-entropy, 'distill': scalar}).
  """
  k = logits.shape[0]
  w = jnp.asarray(exit_weights, jnp.float32)
  if w.shape != (k,):
    raise ValueError(f'{len(exit_weights)} exit weights for {k} exits')
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels[None, :]).mean(axis=1)  # [K]
  loss = jnp.sum(w * ce) / jnp.sum(w)
  distill = jnp.zeros((), jnp.float32)
  if distill_weight and k > 1:
    t = float(temperature)
    teacher = jax.nn.log_softmax(jax.lax.stop_gradient(logits[-1]) / t)
    student = jax.nn.log_softmax(logits[:-1] / t)
    kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1).mean(axis=-1)  # [K-1]
    distill = (t * t) * kl.mean()
    loss = loss + distill_weight * distill
  return loss, {'ce': ce, 'distill': distill}
