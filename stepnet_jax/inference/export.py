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
      assert int(cache[0]) >= 0                 # the level reached; -1: a step was skipped or repeated
      answer = np.asarray(cache[-1]).argmax(-1)

The cache is a flat tuple of arrays: first the level it holds (an int32 scalar), last the
logits [B, classes]. Step k works only on a cache of level k - 1: given any other, it
returns level -1 and NaN logits (and so does every step after it), since a compiled module
cannot raise; ``Runner`` runs the modules and raises instead. The batch size is symbolic.
Modules are serialized for CPU and CUDA (``platforms``): jax lowers for a platform without
its hardware, so a model trained here runs on a GPU host.

``save(net, DIR, format='onnx')`` writes the same functions as ONNX graphs for ONNX Runtime
(``start.onnx``, ``step1.onnx`` ..., and ``forward0.onnx`` ... the direct forward of each
level), lowered by ``onnx_lowering``, with the cache as named inputs and outputs; it
copies the runner ``device_runner.py`` as ``anytime_onnx.py`` (numpy and onnxruntime only: ``Network``, the stopping
policies, ``predict``) beside them, and with ``selector=`` a ``policies.Learned`` module's
weights as ``selector.npz``. Needs the ``onnx`` extra: ``pip install 'stepnet_jax[onnx]'``.

``save(net, DIR, format='tflite')`` writes them as one LiteRT (TFLite) model,
``model.tflite``, with a signature each (``start``, ``step1`` ..., ``forward0`` ...),
converted through jax2tf for batches of exactly B images (``batch=B``, default 1; ``batch='any'``:
any size, much slower to run), each reading and writing the cache by name, and copies the
same runner as ``anytime_litert.py``
(numpy and ai-edge-litert only). Needs the ``litert`` extra: ``pip install 'stepnet_jax[litert]'``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stepnet_jax.core import stepping
from stepnet_jax.core.model import StepCache
from stepnet_jax.inference.stepper import Stepper

PLATFORMS = ('cpu', 'cuda')


def _flat(cache: StepCache, level: jax.Array) -> tuple[jax.Array, ...]:
  """(level, inputs, every unit buffer..., logits)."""
  return (level, cache.inputs, *jax.tree.leaves(cache.units), cache.logits)


def _checked_step(graphdef, variables, unflat, k: int):
  """Step k on a flat cache; a cache of another level than k - 1 gives level -1 and NaN logits."""

  def step(level, *arrays):
    out = stepping.step(graphdef, variables, unflat(arrays, k - 1), k)
    ok = level == k - 1
    out = out.replace(logits=jnp.where(ok, out.logits, jnp.nan))
    return _flat(out, jnp.where(ok, jnp.int32(k), jnp.int32(-1)))

  return step


def _chain_shapes(net: Stepper, batch) -> tuple[jax.ShapeDtypeStruct, tuple, Callable]:
  """What every export traces, at ``batch`` images (a number or a symbolic size): the
  images' shape, the flat cache's shapes (``_flat``: level first) and ``unflat(arrays,
  level)``, the ``StepCache`` of a flat cache's arrays without the level."""
  images = jax.ShapeDtypeStruct((batch,) + tuple(net.input_shape), np.uint8)
  cache = jax.eval_shape(lambda x: stepping.start(net.graphdef, net.variables, x), images)
  units_def = jax.tree.structure(cache.units)

  def unflat(arrays, level):
    return StepCache(arrays[0], jax.tree.unflatten(units_def, arrays[1:-1]), arrays[-1], level=level)

  return images, _flat(cache, jax.ShapeDtypeStruct((), jnp.int32)), unflat


FORMATS = ('jax', 'onnx', 'tflite')


def save(
  net: Stepper,
  directory: str,
  platforms: Sequence[str] = PLATFORMS,
  format: str = 'jax',
  selector=None,
  batch: int | str | None = None,
) -> dict:
  """Writes the start and step modules of a reusable ``net`` and the manifest; returns the manifest.

  ``format``: 'jax' (serialized ``jax.export`` modules for ``platforms``), 'onnx' (ONNX
  graphs and a numpy/onnxruntime runner) or 'tflite' (one LiteRT model for batches of exactly
  ``batch`` images, default 1, or for any batch size with ``batch='any'``, and a numpy/LiteRT
  runner; the fixed batch is what runs fast: see ``_save_tflite``). ``selector``: a
  ``policies.Learned`` to ship beside ONNX or LiteRT graphs.
  """
  if format not in FORMATS:
    raise ValueError(f'unknown export format {format!r}; choose from {", ".join(FORMATS)}')
  if not net.reusable:
    raise ValueError('only a reusable network steps; a recomputing one has nothing to carry between levels')
  if selector is not None and selector.num_levels != net.num_levels:  # before anything is written
    raise ValueError(f'the selector was made for {selector.num_levels} levels; this network has {net.num_levels}')
  if batch is not None and format != 'tflite':
    raise ValueError(f"batch= fixes a LiteRT model's batch size (format='tflite'); {format} graphs take any batch")
  if format == 'onnx':
    return _save_onnx(net, directory, selector)
  if format == 'tflite':
    return _save_tflite(net, directory, selector, 1 if batch is None else batch)
  if selector is not None:
    raise ValueError("selector= ships a learned policy beside ONNX or LiteRT graphs (format='onnx' or 'tflite')")
  graphdef, variables = net.graphdef, net.variables
  images, flat_shapes, unflat = _chain_shapes(net, jax.export.symbolic_shape('b')[0])
  os.makedirs(directory, exist_ok=True)
  modules = {
    'start.bin': jax.export.export(
      jax.jit(lambda x: _flat(stepping.start(graphdef, variables, x), jnp.int32(0))), platforms=tuple(platforms)
    )(images)
  }
  for k in range(1, net.num_levels):
    fn = jax.jit(_checked_step(graphdef, variables, unflat, k))
    modules[f'step{k}.bin'] = jax.export.export(fn, platforms=tuple(platforms))(*flat_shapes)
  for name, exported in modules.items():
    with open(os.path.join(directory, name), 'wb') as f:
      f.write(exported.serialize())
  manifest = {
    'num_levels': net.num_levels,
    'level_macs': list(net.level_macs),
    'input_shape': list(net.input_shape),
    'input_dtype': 'uint8',
    'start': 'start.bin',
    'steps': [f'step{k}.bin' for k in range(1, net.num_levels)],
    'platforms': list(platforms),
    'cache_arrays': len(flat_shapes),
    'cache_layout': 'level (int32 scalar), inputs, unit buffers..., logits [B, classes]',
  }
  with open(os.path.join(directory, 'manifest.json'), 'w') as f:
    json.dump(manifest, f, indent=2)
  return manifest


def cache_names(net: Stepper) -> list[str]:
  """The names of the flat cache's arrays: level, inputs, one per unit buffer (the unit's
  name, with an index when it keeps several), logits."""
  images = jax.ShapeDtypeStruct((1,) + tuple(net.input_shape), np.uint8)
  cache = jax.eval_shape(lambda x: stepping.start(net.graphdef, net.variables, x), images)
  names = []
  for unit, buffers in zip(net.unit_names, cache.units):
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(buffers)[0]]
    for path in paths:
      suffix = re.sub(r'[^0-9A-Za-z]+', '_', path).strip('_')
      names.append(re.sub(r'[^0-9A-Za-z]+', '_', unit) + (f'_{suffix}' if suffix else ''))
  return ['level', 'inputs', *names, 'logits']


# Cache entries every graph of the chain writes and the runner keeps, read or not.
ALWAYS_KEPT = ('level', 'logits')


def _drop_unread_outputs(graphs: dict, outputs: dict, lowered: dict, chain: list[str]) -> dict[str, set]:
  """Cuts each graph of ``chain`` (start, step1, ...) down to the outputs a later graph reads
  (and the level and logits), last graph first, and records what is left in ``lowered``;
  returns traced output -> its blocks (lo, hi) still written ((None, None): whole). ``outputs``: each graph's output name ->
  (traced output, lo, hi), as ``onnx_lowering.Lowered`` gives it.

  A block only its own step's layers read (e.g. a depthwise layer's input, read channel by
  channel at its own level) is then never written to the cache, nor copied by the runner.
  """
  from stepnet_jax.inference import onnx_graph

  read_later: set[str] = set()
  kept_blocks: dict[str, set] = {}
  for file in reversed(chain):
    keep = set()
    for target, (traced, lo, hi) in outputs[file].items():
      name = target[len('next_') :] if target.startswith('next_') else target
      if name in read_later or name in ALWAYS_KEPT:
        keep.add(target)
        kept_blocks.setdefault(traced, set()).add((lo, hi))  # (None, None): the whole value
    onnx_graph.keep_outputs(graphs[file], keep)
    lowered[file] = {
      'inputs': [i.name for i in graphs[file].graph.input],
      'outputs': sorted(o.name for o in graphs[file].graph.output),
    }
    read_later.update(lowered[file]['inputs'])
  return kept_blocks


def _kept(written: list | None, kept: set) -> list | None:
  """A buffer's entry of the manifest's ``cache_blocks``: None if held whole, else its blocks
  that stay in the cache."""
  if written is None:
    return None if (None, None) in kept else []
  return [block for block in written if tuple(block) in kept]


def _save_onnx(net: Stepper, directory: str, selector) -> dict:
  """The ONNX graphs of ``net``'s start, steps and direct forwards, the runner and the manifest.

  The cache travels in blocks: each unit buffer as the level blocks written so far
  (``onnx_lowering.part_name``: ``<buffer>.<lo>_<hi>`` channels), so step k reads the lower
  levels' blocks and writes only its own, copying no buffer; a block no later step reads is
  not written at all (``_drop_unread_outputs``).
  """
  try:
    from stepnet_jax.inference import onnx_lowering
  except ImportError as e:  # onnx is an optional dependency
    raise ImportError(f"format='onnx' needs the onnx package: pip install 'stepnet_jax[onnx]' ({e})") from e
  graphdef, variables = net.graphdef, net.variables
  images, flat_shapes, unflat = _chain_shapes(net, jax.export.symbolic_shape('b')[0])
  names = cache_names(net)
  buffers = names[1:-1]
  os.makedirs(directory, exist_ok=True)
  blocks: dict[str, list | None] = {b: [] for b in buffers}  # the blocks written so far (None: held whole)
  graphs, outputs, lowered = {}, {}, {}

  def add(file: str, low) -> None:
    graphs[file], outputs[file] = low.model, low.outputs
    for traced, lo, hi in low.outputs.values():
      if traced not in buffers:
        continue
      if lo is None:
        blocks[traced] = None
        continue
      held = blocks[traced] or []
      if any(a < hi and lo < b for a, b in held):  # a step rewriting part of a lower level's block
        raise NotImplementedError(f'{file} rewrites channels {lo}..{hi - 1} of {traced}, written by a lower level')
      blocks[traced] = [*held, (lo, hi)]

  add(
    'start.onnx',
    onnx_lowering.lower_blocks(
      lambda x: _flat(stepping.start(graphdef, variables, x), jnp.int32(0)),
      [images],
      ['images'],
      names,
      'start',
      block_outputs=buffers,
      channels_first=True,
    ),
  )
  for k in range(1, net.num_levels):
    add(
      f'step{k}.onnx',
      onnx_lowering.lower_blocks(
        _checked_step(graphdef, variables, unflat, k),
        flat_shapes,
        names,
        names,
        f'step{k}',
        input_blocks={b: v for b, v in blocks.items() if v is not None},
        block_outputs=buffers,
        channels_first=True,
      ),
    )
  kept_blocks = _drop_unread_outputs(
    graphs, outputs, lowered, ['start.onnx'] + [f'step{k}.onnx' for k in range(1, net.num_levels)]
  )
  for k in range(net.num_levels):
    graphs[f'forward{k}.onnx'] = onnx_lowering.lower(
      lambda x, k=k: stepping.forward(graphdef, variables, x, k), [images], ['images'], ['logits'], f'forward{k}'
    )
  for name, graph in graphs.items():
    with open(os.path.join(directory, name), 'wb') as f:
      f.write(graph.SerializeToString())
  manifest = {
    **_device_files(net, directory, 'onnx', selector),
    'cache': names,
    'cache_blocks': {b: _kept(v, kept_blocks.get(b, set())) for b, v in blocks.items()},
    'graphs': lowered,
    'cache_layout': "a dict of named arrays: 'level' (int32 scalar), 'inputs', each unit buffer as the level "
    "blocks a later step reads (cache_blocks) '<buffer>.<lo>_<hi>' (channels lo..hi-1; a block of an image-shaped "
    'buffer is NCHW: [B, channels, H, W]), '
    "'logits' [B, classes]. A graph reads the names it declares and "
    "writes new blocks, 'logits' and 'next_level'; level -1 and NaN logits: a step was given another level's cache",
    'opset': onnx_lowering.OPSET,
  }
  with open(os.path.join(directory, 'manifest.json'), 'w') as f:
    json.dump(manifest, f, indent=2)
  return manifest


RUNNERS = {'onnx': 'anytime_onnx.py', 'tflite': 'anytime_litert.py'}


def _device_files(net: Stepper, directory: str, format: str, selector) -> dict:
  """Copies the numpy runner (``device_runner.py``, as ``RUNNERS[format]``) and the
  ``selector``'s weights into ``directory``; returns the manifest entries every device
  format shares (the graphs are named ``start``, ``stepK`` and ``forwardK``: ONNX files
  with the suffix ``.onnx``, signatures of LiteRT's one model file)."""
  suffix = '.onnx' if format == 'onnx' else ''
  shutil.copyfile(os.path.join(os.path.dirname(__file__), 'device_runner.py'), os.path.join(directory, RUNNERS[format]))
  if selector is not None:  # its number of levels is checked by save, before anything is written
    np.savez(
      os.path.join(directory, 'selector.npz'),
      **{k: np.asarray(v, np.float32) for k, v in selector.params.items()},
      num_levels=selector.num_levels,
      history=selector.history,
      threshold=float(selector.threshold),
    )
  return {
    'format': format,
    'num_levels': net.num_levels,
    'level_macs': list(net.level_macs),
    'macs_to_reach': [int(m) for m in net.macs_to_reach],
    'input_shape': list(net.input_shape),
    'input_dtype': 'uint8',
    # ONNX: one graph file each; LiteRT: one signature each of the one model file
    'start': 'start' + suffix,
    'steps': [f'step{k}{suffix}' for k in range(1, net.num_levels)],
    'forwards': [f'forward{k}{suffix}' for k in range(net.num_levels)],
    'runner': RUNNERS[format],
    'selector': 'selector.npz' if selector is not None else None,
  }


def _save_tflite(net: Stepper, directory: str, selector, batch: int | str) -> dict:
  """One LiteRT model with a signature for each of ``net``'s start, steps and direct
  forwards, for batches of exactly ``batch`` images or for any batch size (``batch='any'``);
  the runner and the manifest.

  A fixed batch is what runs fast: the model for any batch size computes the same logits,
  but LiteRT runs it far slower (LeNet-3C1L's direct forward at batch 256: 1418 ms against
  21 ms at a fixed batch, in one check on the 2-core development machine under load).

  The signatures read and write the cache by name (``cache_names``); unlike the ONNX
  graphs, a step reads the whole cache and writes every buffer back whole (its own level's
  channels filled in).
  """
  from stepnet_jax.inference import litert_convert

  if batch != 'any' and not (isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1):
    raise ValueError(f"batch must be a positive number of images or 'any', got {batch!r}")
  graphdef, variables = net.graphdef, net.variables
  # traced at a batch of 1 when 'any' (litert_convert makes the batch axis symbolic)
  images, flat_shapes, unflat = _chain_shapes(net, 1 if batch == 'any' else batch)
  names = cache_names(net)
  functions = {
    'start': (lambda x: _flat(stepping.start(graphdef, variables, x), jnp.int32(0)), [images], ['images'], names)
  }
  for k in range(1, net.num_levels):
    functions[f'step{k}'] = (_checked_step(graphdef, variables, unflat, k), flat_shapes, names, names)
  for k in range(net.num_levels):
    functions[f'forward{k}'] = (
      lambda x, k=k: (stepping.forward(graphdef, variables, x, k),),
      [images],
      ['images'],
      ['logits'],
    )
  model = litert_convert.convert(functions, any_batch=batch == 'any')
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'model.tflite'), 'wb') as f:
    f.write(model)
  manifest = {
    **_device_files(net, directory, 'tflite', selector),
    'model': 'model.tflite',
    'batch': None if batch == 'any' else batch,
    'cache': names,
    'cache_layout': "a dict of named arrays: 'level' (int32 scalar), 'inputs', each unit buffer whole "
    "(NHWC for an image-shaped one), 'logits' [B, classes]; every signature of the model "
    "reads and writes these names; level -1 and NaN logits: a step was given another level's cache",
  }
  with open(os.path.join(directory, 'manifest.json'), 'w') as f:
    json.dump(manifest, f, indent=2)
  return manifest


class Runner:
  """The modules ``save`` wrote, run with jax and numpy only: ``start(images)`` gives the
  level-0 cache, ``advance(cache)`` the next level; a cache of another level than the step
  expects (a skipped or repeated step, or one a failed step poisoned) raises ValueError."""

  def __init__(self, directory: str):
    with open(os.path.join(directory, 'manifest.json')) as f:
      self.manifest = json.load(f)

    def load(name: str) -> jax.export.Exported:
      with open(os.path.join(directory, name), 'rb') as f:
        return jax.export.deserialize(bytearray(f.read()))

    self._start = load(self.manifest['start'])
    self._steps = [load(name) for name in self.manifest['steps']]

  @property
  def num_levels(self) -> int:
    """K, from the manifest."""
    return int(self.manifest['num_levels'])

  def start(self, images: np.ndarray) -> tuple:
    """The level-0 cache of uint8 images [B, H, W, C] (a flat tuple: level, ..., logits)."""
    return self._start.call(images)

  def advance(self, cache: tuple) -> tuple:
    """The next level from ``cache``."""
    return self.step(cache, int(cache[0]) + 1)

  def step(self, cache: tuple, level: int) -> tuple:
    """Level ``level`` from a cache of level ``level - 1``."""
    held = int(cache[0])
    if held != level - 1 or not 1 <= level < self.num_levels:
      raise ValueError(
        f'step {level} needs the cache of level {level - 1}; this cache holds level {held} '
        f'({self.num_levels} levels; -1: an earlier step was given the wrong cache)'
      )
    return self._steps[level - 1].call(*cache)
