"""Deployment artifacts: each level of a trained network as a serialized ``jax.export`` module.

``save(net, DIR)`` writes ``start.bin`` (raw images -> cache), ``step1.bin`` ..
``step{K-1}.bin`` (cache -> cache, the next level) with the parameters baked in, and
``manifest.json``. A device needs only jax and numpy to run them, not this library:

    import json, jax, numpy as np
    d = 'DIR'
    m = json.load(open(f'{d}/manifest.json'))
    load = lambda name: jax.export.deserialize(bytearray(open(f'{d}/{name}', 'rb').read()))
    start, steps = load(m['start']), [load(name) for name in m['steps']]
    cache = start.call(images)                  # uint8 [B, H, W, C], any batch size
    answer = np.asarray(cache[-1]).argmax(-1)   # level 0
    for step in steps:                          # pay for the next level only if needed
      cache = step.call(*cache)                 # reuses everything the lower levels computed
      answer = np.asarray(cache[-1]).argmax(-1)

The cache is a flat tuple of arrays whose last element is the logits [B, classes]. The
batch size is symbolic. Modules are serialized for CPU and CUDA (``platforms``): jax
lowers for a platform without its hardware, so a model trained here runs on a GPU host.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import numpy as np

from stepnet_jax.core import stepping
from stepnet_jax.core.model import StepCache
from stepnet_jax.inference.stepper import Stepper

PLATFORMS = ('cpu', 'cuda')


def _flat(cache: StepCache) -> tuple[jax.Array, ...]:
  """(inputs, every unit buffer..., logits)."""
  return (cache.inputs, *jax.tree.leaves(cache.units), cache.logits)


def save(net: Stepper, directory: str, platforms: Sequence[str] = PLATFORMS) -> dict:
  """Writes the start and step modules of a reusable ``net`` and the manifest; returns the manifest."""
  if not net.reusable:
    raise ValueError('only a reusable network steps; a recomputing one has nothing to carry between levels')
  graphdef, variables = net.graphdef, net.variables
  input_shape = net.input_shape
  (batch,) = jax.export.symbolic_shape('b')
  images = jax.ShapeDtypeStruct((batch,) + input_shape, np.uint8)
  cache = jax.eval_shape(lambda x: stepping.start(graphdef, variables, x), images)
  units_def = jax.tree.structure(cache.units)

  def unflat(arrays, level):
    return StepCache(arrays[0], jax.tree.unflatten(units_def, arrays[1:-1]), arrays[-1], level=level)

  os.makedirs(directory, exist_ok=True)
  modules = {
    'start.bin': jax.export.export(
      jax.jit(lambda x: _flat(stepping.start(graphdef, variables, x))), platforms=tuple(platforms)
    )(images)
  }
  flat_shapes = _flat(cache)
  for k in range(1, net.num_levels):
    fn = jax.jit(lambda *arrays, k=k: _flat(stepping.step(graphdef, variables, unflat(arrays, k - 1), k)))
    modules[f'step{k}.bin'] = jax.export.export(fn, platforms=tuple(platforms))(*flat_shapes)
  for name, exported in modules.items():
    with open(os.path.join(directory, name), 'wb') as f:
      f.write(exported.serialize())
  manifest = {
    'num_levels': net.num_levels,
    'level_macs': list(net.level_macs),
    'input_shape': list(input_shape),
    'input_dtype': 'uint8',
    'start': 'start.bin',
    'steps': [f'step{k}.bin' for k in range(1, net.num_levels)],
    'platforms': list(platforms),
    'cache_arrays': len(flat_shapes),
  }
  with open(os.path.join(directory, 'manifest.json'), 'w') as f:
    json.dump(manifest, f, indent=2)
  return manifest
