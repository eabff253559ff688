"""The train step: one factory for every trainer, parameterised by an objective.

``make_train_step(graphdef, tx, objective)`` returns the jitted
``(state, batch) -> (state, metrics)``; what it minimises is the objective's business
(``losses.py``: all exits jointly, the AWN sandwich rule, one subnet, a single exit).
Because hidden activations do not depend on the subnet, the joint objective gets
all K exits from one full-width pass: it costs about one forward + backward.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from stepnet_jax import seeds
from stepnet_jax.data import sharding
from stepnet_jax.data.feed import Batch
from stepnet_jax.training.losses import Objective


@struct.dataclass
class TrainState:
  """What a train step carries: the global step, parameters, BN statistics and optimizer state."""

  step: jax.Array  # int32 scalar: global optimizer steps so far
  params: Any  # nnx.State of nnx.Param
  batch_stats: Any  # nnx.State of nnx.BatchStat (running BN statistics)
  opt_state: Any


def init_state(model: nnx.Module, tx: optax.GradientTransformation, step: int = 0) -> tuple[nnx.GraphDef, TrainState]:
  """(graphdef, a state at global step ``step`` with fresh optimizer moments), replicated on
  the mesh as the train step returns it: a state placed otherwise would make the step's
  second call see new input types and compile the step a second time."""
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  state = TrainState(jnp.asarray(step, jnp.int32), params, stats, tx.init(params))
  return graphdef, jax.device_put(state, sharding.replicated())


def augment(images: jax.Array, key: jax.Array, pad: int = 4) -> jax.Array:
  """Random crop after zero padding by ``pad`` and random horizontal flip. [B, H, W, C]."""
  b, h, w, _ = images.shape
  k1, k2, k3 = jax.random.split(key, 3)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = jax.random.randint(k1, (b,), 0, 2 * pad + 1)
  dx = jax.random.randint(k2, (b,), 0, 2 * pad + 1)
  crop = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (h, w, im.shape[-1])))
  out = crop(padded, dy, dx)
  flip = jax.random.bernoulli(k3, 0.5, (b, 1, 1, 1))
  return jnp.where(flip, out[:, :, ::-1], out)


def make_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  objective: Objective,
  *,
  seed: int = 0,
  augment_images: bool = False,
):
  """Jitted ``(state, batch) -> (state, metrics)``; the state is donated. Data parallel over
  ``sharding.mesh()``: the batch sharded along its leading axis, state and metrics replicated.

  The objective gets the train-mode model and a key ``fold_in(key(seed + Stream.TRAIN_STEP_KEY), step)``;
  with ``augment_images`` the batch is first randomly cropped and flipped with
  ``fold_in(key(seed), step)``. Metrics: ``loss``, the ``accuracy`` of each exit in
  the objective's ``logits`` [exits], and the objective's other aux entries.
  """

  def loss_fn(params, batch_stats, batch: Batch, rng):
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    loss, aux = objective(model, batch, rng)
    return loss, (aux, nnx.state(model, nnx.BatchStat))

  replicated = sharding.replicated()

  @functools.partial(
    jax.jit,
    donate_argnums=0,
    in_shardings=(replicated, sharding.batch_sharding()),
    out_shardings=(replicated, replicated),
  )
  def train_step(state: TrainState, batch: Batch):
    if augment_images:
      batch = batch.replace(images=augment(batch.images, jax.random.fold_in(jax.random.key(seed), state.step)))
    rng = jax.random.fold_in(jax.random.key(seeds.seed_for(seed, seeds.Stream.TRAIN_STEP_KEY)), state.step)
    (loss, (aux, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.batch_stats, batch, rng
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    aux = dict(aux)
    logits = aux.pop('logits')
    metrics = {'loss': loss, 'accuracy': (logits.argmax(-1) == batch.labels[None]).mean(axis=1), **aux}
    return TrainState(state.step + 1, params, new_stats, opt_state), metrics

  return train_step
