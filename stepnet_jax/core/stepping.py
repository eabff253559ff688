"""Pure, jittable functions of (variables, ...) for inference, and their jitted forms.

``graphdef`` is the static structure of a ``SteppingModel`` (from ``nnx.split``);
``variables`` is its state (parameters and batch statistics), a plain pytree. Level
arguments are static Python ints: one compilation per level.

Two ways to compute subnet k directly:
* ``forward``: the masked prefix (every layer's first end(k) channels, kernel times
  the static mask). Few, large ops; includes the masked-out zeros.
* ``forward_blocked``: steps 0..k fused in one function; exactly the kept MACs, in
  more, smaller ops.
``DIRECT_FORWARD`` picks one per backend; ``python -m stepnet_jax.bench`` measures both.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from stepnet_jax.core import anytime
from stepnet_jax.core.model import StepCache, SteppingModel

# Which direct forward ``forward_fastest`` uses per backend. CPU: measured by
# ``python -m stepnet_jax.bench`` at batch 256: masked for LeNet-3C1L (42 vs 143 ms),
# though level-block wins on VGG-16 (2.1 vs 6.1 s); see the README's benchmark.
# GPU/TPU: not measured yet; masked (fewer, larger ops) until someone does.
DIRECT_FORWARD = {'cpu': 'masked', 'gpu': 'masked', 'tpu': 'masked'}


def split(model: SteppingModel) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, variables) of a model; variables hold parameters and batch statistics."""
  return nnx.split(model)


def _model(graphdef: nnx.GraphDef, variables: nnx.State) -> SteppingModel:
  return nnx.merge(graphdef, variables, copy=True)


def forward(graphdef, variables, x: jax.Array, level: int) -> jax.Array:
  """Masked-prefix logits of subnet ``level``: [B, classes]."""
  return _model(graphdef, variables)(x, level)


def forward_blocked(graphdef, variables, x: jax.Array, level: int) -> jax.Array:
  """Logits of subnet ``level`` computed level block by level block (steps 0..level)."""
  model = _model(graphdef, variables)
  cache = model.start(x)
  for k in range(1, level + 1):
    cache = model.step(cache, k)
  return cache.logits


def exits(graphdef, variables, x: jax.Array) -> jax.Array:
  """Eval-mode logits of every exit from one pass: [K, B, classes]."""
  return _model(graphdef, variables).exits(x)


@functools.lru_cache(maxsize=32)
def jitted_exits(graphdef: nnx.GraphDef) -> Callable:
  """``exits`` jitted for one structure: ``(variables, x) -> [K, B, classes]``.

  Cached by the (hashable) graphdef, so every evaluation of a structure (training's
  epoch ends, the precision study's candidates, a ``Stepper``) shares one compilation
  per input shape.
  """
  return jax.jit(functools.partial(exits, graphdef))


def start(graphdef, variables, x: jax.Array) -> StepCache:
  """Run level 0 on raw images; returns the cache (``cache.level == 0``)."""
  return _model(graphdef, variables).start(x)


def restart(graphdef, variables, cache: StepCache, x: jax.Array) -> StepCache:
  """Level 0 of new images, reusing an old cache's buffers (no fresh allocation when donated).

  Stale channels of higher levels are never read: step k reads only channels of
  levels <= k, all rewritten for the new images by steps 0..k.
  """
  model = _model(graphdef, variables)
  fresh = StepCache(inputs=model.normalize(x), units=cache.units, logits=jnp.zeros_like(cache.logits), level=-1)
  return model.step(fresh, 0)


def step(graphdef, variables, cache: StepCache, level: int) -> StepCache:
  """Run level ``level`` (= cache.level + 1) reading the cached lower levels."""
  return _model(graphdef, variables).step(cache, level)


def advance(graphdef, variables, cache: StepCache) -> StepCache:
  """Run the next level of ``cache``."""
  return step(graphdef, variables, cache, cache.level + 1)


def program(graphdef, variables) -> anytime.Program:
  """The anytime program of a model: stepping with reuse, or recomputing each subnet."""
  model = nnx.merge(graphdef, variables)  # static structure only (works while tracing)
  if model.reusable:
    return anytime.stepping_program(graphdef, model.num_levels, model.macs_to_reach())
  forwards = [functools.partial(forward, graphdef, level=k) for k in range(model.num_levels)]
  return anytime.recompute_program(forwards, model.macs_to_reach())


def predict(graphdef, variables, x: jax.Array, policy, strategy: str | None = None) -> anytime.Prediction:
  """Each input's answer under a stopping ``policy`` (``stepnet_jax.policies``) from one
  program: ``Prediction(logits, exit_level, macs)`` (see ``anytime.predict``)."""
  return anytime.predict(program(graphdef, variables), variables, x, policy, strategy=strategy)


@dataclasses.dataclass(frozen=True)
class StepFunctions:
  """Jitted functions for one model structure.

  ``levels[0](variables, x)`` starts; ``levels[k](variables, cache)`` for k >= 1 steps.
  ``advance`` dispatches on the (static) ``cache.level``, compiling once per level.
  The stepping functions *donate* the cache they are given: its buffers are reused
  for the result (no new allocation, no copy), and the old cache must not be used
  afterwards. ``restart(variables, cache, x)`` runs level 0 of new images in an old
  cache's buffers.
  """

  num_levels: int
  start: Callable
  restart: Callable
  advance: Callable
  levels: tuple[Callable, ...]
  forward: Callable  # (variables, x, level) masked prefix
  forward_blocked: Callable  # (variables, x, level) level blocks
  exits: Callable  # (variables, x) -> [K, B, classes]

  def forward_fastest(self, variables, x, level):
    """Subnet ``level``'s logits by the direct forward ``DIRECT_FORWARD`` picks for this backend."""
    kind = DIRECT_FORWARD.get(jax.default_backend(), 'masked')
    return (self.forward if kind == 'masked' else self.forward_blocked)(variables, x, level)


def make_step_functions(graphdef: nnx.GraphDef, num_levels: int) -> StepFunctions:
  """Builds the jitted functions for ``graphdef`` (variables stay an argument)."""
  start_fn = jax.jit(functools.partial(start, graphdef))
  levels = [start_fn] + [
    jax.jit(functools.partial(step, graphdef, level=k), donate_argnums=1) for k in range(1, num_levels)
  ]
  return StepFunctions(
    num_levels=num_levels,
    start=start_fn,
    restart=jax.jit(functools.partial(restart, graphdef), donate_argnums=1),
    advance=jax.jit(functools.partial(advance, graphdef), donate_argnums=1),
    levels=tuple(levels),
    forward=jax.jit(functools.partial(forward, graphdef), static_argnames='level'),
    forward_blocked=jax.jit(functools.partial(forward_blocked, graphdef), static_argnames='level'),
    exits=jitted_exits(graphdef),
  )
