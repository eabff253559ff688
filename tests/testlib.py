"""Shared helpers for the stepnet_jax tests.

Everything "expected" in this file is computed independently of the library: level
arrays and connection masks are rebuilt from plain level sizes with Python loops, and
the level sizes of random assignments come from numpy RandomState, not from the
library's own splitting code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepnet_jax.core import layers
from stepnet_jax.models import zoo

# --------------------------------------------------------------------------- levels


def level_array(sizes) -> np.ndarray:
  """Per-channel level of a layer stored sorted by level, built with a loop."""
  out = []
  for lvl, n in enumerate(sizes):
    out.extend([lvl] * int(n))
  return np.asarray(out, np.int64)


def block_start(sizes, level) -> int:
  return int(sum(sizes[:level]))


def block_end(sizes, level) -> int:
  return int(sum(sizes[: level + 1]))


def brute_mask(in_sizes, out_sizes, triangular=False) -> np.ndarray:
  """[C_in, C_out] kept connections by an explicit double loop over (i, o)."""
  lin, lout = level_array(in_sizes), level_array(out_sizes)
  mask = np.zeros((len(lin), len(lout)), bool)
  for i in range(len(lin)):
    for o in range(len(lout)):
      li, lo = lin[i], lout[o]
      if li < lo:
        mask[i, o] = True
      elif li == lo:
        if not triangular:
          mask[i, o] = True
        else:
          a, b = in_sizes[li], out_sizes[lo]
          ii = i - block_start(in_sizes, li)
          oo = o - block_start(out_sizes, lo)
          mask[i, o] = ii * b < (oo + 1) * a
  return mask


# --------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class Spec:
  """A model to build for the per-model tests."""

  id: str
  name: str
  input_shape: tuple
  num_levels: int
  width: float = 1.0
  assignment: tuple = ()  # ((layer, sizes), ...)
  triangular: bool = False
  num_classes: int = 10

  def build(self, seed=0, mean=None, std=None, fast_init=True):
    with numpy_initializers(seed) if fast_init else contextlib.nullcontext():
      return zoo.build_model(
        self.name,
        num_classes=self.num_classes,
        input_shape=self.input_shape,
        num_levels=self.num_levels,
        width=self.width,
        assignment=dict(self.assignment) or None,
        triangular=self.triangular,
        mean=mean,
        std=std,
        seed=seed,
      )


@contextlib.contextmanager
def numpy_initializers(seed=0):
  """Draw initial kernels with numpy instead of jax.random while building test models.

  On CPU, every new kernel shape costs an XLA compilation of the truncated-normal
  sampler (seconds each on a loaded 2-core machine), which would dominate the suite.
  The tests never depend on the initial distribution; training tests use the real one.
  """
  rng = np.random.RandomState(seed)

  def make(gain):
    def factory(*args, **kwargs):
      def init(key, shape, dtype=jnp.float32):
        fan_in = int(np.prod(shape[:-1]))
        return jnp.asarray(rng.normal(0.0, np.sqrt(gain / max(fan_in, 1)), shape), dtype)

      return init

    return factory

  inits = jax.nn.initializers
  saved = inits.he_normal, inits.lecun_normal
  inits.he_normal, inits.lecun_normal = make(2.0), make(1.0)
  try:
    yield
  finally:
    inits.he_normal, inits.lecun_normal = saved


@functools.cache
def built_model(spec_id: str):
  """A randomised (non-identity BN) model per spec, shared by the test modules: do not mutate."""
  spec = SPEC_BY_ID[spec_id]
  c = spec.input_shape[-1]
  mean = tuple(float(v) for v in np.linspace(0.2, 0.5, c))
  std = tuple(float(v) for v in np.linspace(0.2, 0.4, c))
  return randomize(spec.build(seed=1, mean=mean, std=std), seed=2)


def random_sizes(
  rng: np.random.RandomState, num_levels: int, low: int, high: int, allow_zero: bool = True
) -> tuple[int, ...]:
  lo = 0 if allow_zero else 1
  while True:
    sizes = tuple(int(s) for s in rng.randint(lo, high + 1, size=num_levels))
    if sum(sizes) >= low:
      return sizes


def random_assignment(layer_names, num_levels, seed, low=3, high=4, allow_zero=False):
  rng = np.random.RandomState(seed)
  return tuple((n, random_sizes(rng, num_levels, low, high, allow_zero)) for n in layer_names)


LENET3 = ('conv1', 'conv2', 'conv3')
LENET5 = ('conv1', 'conv2', 'fc1', 'fc2')
VGG = tuple(f'conv{i}' for i in range(1, 14))
RESNET = ('stage1', 'stage2', 'stage3') + tuple(f'stage{s}.block{m}.mid' for s in (1, 2, 3) for m in range(3))

MNIST_SHAPE = (28, 28, 1)
CIFAR_SHAPE = (32, 32, 3)

SPECS = [
  Spec('mlp', 'mlp', MNIST_SHAPE, 3, assignment=random_assignment(('fc1', 'fc2'), 3, seed=1)),
  Spec('mlp_tri', 'mlp', MNIST_SHAPE, 3, triangular=True, assignment=(('fc1', (3, 5, 2)), ('fc2', (4, 3, 5)))),
  Spec('lenet3c1l', 'lenet3c1l', MNIST_SHAPE, 4, assignment=random_assignment(LENET3, 4, seed=2)),
  Spec(
    'lenet3c1l_tri',
    'lenet3c1l',
    MNIST_SHAPE,
    3,
    triangular=True,
    assignment=(('conv1', (3, 5, 2)), ('conv2', (4, 2, 5)), ('conv3', (2, 6, 3))),
  ),
  # Empty level blocks (zero-sized levels) in several layers.
  Spec(
    'lenet5_empty',
    'lenet5',
    MNIST_SHAPE,
    3,
    assignment=(('conv1', (2, 0, 2)), ('conv2', (3, 2, 0)), ('fc1', (0, 4, 3)), ('fc2', (3, 2, 3))),
  ),
  Spec('vgg16_tri', 'vgg16', CIFAR_SHAPE, 3, triangular=True, assignment=random_assignment(VGG, 3, seed=4, high=3)),
  Spec('resnet20', 'resnet20', CIFAR_SHAPE, 3, assignment=random_assignment(RESNET, 3, seed=5, high=3)),
  Spec('resnet20_width', 'resnet20', CIFAR_SHAPE, 3, width=0.25),
]
# Specs for the heavier per-model checks (the default even split of resnet20 is covered elsewhere).
MASK_SPEC_IDS = ['mlp', 'mlp_tri', 'lenet3c1l', 'lenet3c1l_tri', 'lenet5_empty', 'vgg16_tri', 'resnet20']
SPEC_IDS = [s.id for s in SPECS]
SPEC_BY_ID = {s.id: s for s in SPECS}


def randomize(model, seed: int = 0):
  """Random BN statistics / affine parameters and head bias, so BN is not the identity.

  Batch statistics are replaced through ``nnx.state(model, nnx.BatchStat)`` and
  ``nnx.update``: means ~ N(0, 0.3), variances ~ U(0.5, 2) (positive).
  """
  rng = np.random.RandomState(seed)

  def draw(path, v):
    keys = [getattr(p, 'key', getattr(p, 'name', None)) for p in path]
    if 'var' in keys:
      return jnp.asarray(rng.uniform(0.5, 2.0, v.shape), jnp.float32)
    if 'mean' in keys:
      return jnp.asarray(rng.normal(0.0, 0.3, v.shape), jnp.float32)
    raise AssertionError(f'unexpected batch statistic {path}')

  stats = jax.tree_util.tree_map_with_path(draw, nnx.state(model, nnx.BatchStat))
  nnx.update(model, stats)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, layers.BatchNorm):
      n = node.scale[...].shape
      node.scale[...] = jnp.asarray(rng.uniform(0.7, 1.3, n), jnp.float32)
      node.bias[...] = jnp.asarray(rng.normal(0.0, 0.2, n), jnp.float32)
    if isinstance(node, layers.Head):
      node.bias[...] = jnp.asarray(rng.normal(0.0, 0.5, node.bias[...].shape), jnp.float32)
  return model


def fast_model(name: str, seed: int = 0, *, input_shape=None, num_classes: int = 10, **kwargs):
  """``zoo.build_model(name, ...)`` with ``numpy_initializers(seed)`` and ``seed`` (input
  shape: MNIST's unless given); the other keywords go to ``build_model``."""
  with numpy_initializers(seed):
    return zoo.build_model(name, num_classes=num_classes, input_shape=input_shape or MNIST_SHAPE, seed=seed, **kwargs)


def random_model(name: str, seed: int = 0, **kwargs):
  """``fast_model`` with random BN and head bias (``randomize(model, seed)``): BN is not the identity."""
  return randomize(fast_model(name, seed, **kwargs), seed)


def linear_units(model):
  """(name, LevelConv/LevelDense, triangular_expected) for every linear sub-unit of a model.

  Whether a unit should be triangular is decided here from the position of the unit
  (the image-reading first layer never is), not from the library's metadata.
  """
  out = []
  for idx, (name, unit) in enumerate(zip(model.unit_names, model.units)):
    if isinstance(unit, layers.ResidualBlock):
      out.append((f'{name}.conv1', unit.conv1, idx > 0))
      out.append((f'{name}.conv2', unit.conv2, True))
      if unit.shortcut is not None:
        out.append((f'{name}.shortcut', unit.shortcut, idx > 0))
    else:
      out.append((name, unit, idx > 0))
  return out


def images(shape, batch=4, seed=0, dtype=np.uint8):
  rng = np.random.RandomState(seed)
  x = rng.randint(0, 256, size=(batch,) + tuple(shape))
  return jnp.asarray(x.astype(np.uint8)) if dtype == np.uint8 else jnp.asarray(x / 255.0, jnp.float32)


def assert_close(actual, expected, rtol=1e-5, atol=1e-4, err_msg=''):
  """``chex.assert_trees_all_close`` of two arrays or trees of arrays (same structure and shapes),
  in float64, with each leaf's atol scaled by the magnitude of its expected leaf (deep nets, random BN)."""

  def close(a, e):
    e = np.asarray(e, np.float64)
    scale = max(1.0, float(np.abs(e).max()) if e.size else 1.0)
    chex.assert_trees_all_close(np.asarray(a, np.float64), e, rtol=rtol, atol=atol * scale, custom_message=err_msg)

  chex.assert_trees_all_equal_structs(actual, expected)
  jax.tree.map(close, actual, expected)


def traced_at_most(fn, key, n=1, name=None):
  """``fn`` with a ``chex.assert_max_traces(n)`` counter of its own per ``key(*args, **kwargs)``
  (a level, a batch size, a strategy): tracing it more than ``n`` times for one key raises an
  AssertionError. ``.traced`` holds the keys it was called with. Wrap a pure function before it
  is jitted (e.g. monkeypatch the library's module attribute); call ``chex.clear_trace_counter()``
  first, since chex's counters are global.
  """
  name = name or fn.__name__
  counted = {}

  @functools.wraps(fn)
  def dispatch(*args, **kwargs):
    k = key(*args, **kwargs)
    if k not in counted:

      def once(*args, **kwargs):
        return fn(*args, **kwargs)

      once.__name__ = f'{name}{k}'  # chex tells counters apart by the function's name and source
      counted[k] = chex.assert_max_traces(once, n=n)
    return counted[k](*args, **kwargs)

  dispatch.traced = counted
  return dispatch


def unit_outputs(model, xn, level):
  """Outputs of every unit of the prefix forward of subnet ``level`` (xn normalised)."""
  outs = []
  for unit in model.units:
    xn = unit(xn, level)
    outs.append(xn)
  return outs


def poison(model, cache, level: int):
  """``cache`` with every buffer's channels of levels above ``level`` set to NaN (-1: all)."""

  def nan_above(buf, sizes):
    return buf.at[..., block_end(sizes, level) if level >= 0 else 0 :].set(jnp.nan)

  units = []
  for unit, c in zip(model.units, cache.units):
    if isinstance(unit, layers.ResidualBlock):
      units.append((nan_above(c[0], unit.conv1.conn.out_sizes), nan_above(c[1], unit.conn.out_sizes)))
    else:
      units.append(nan_above(c, unit.conn.out_sizes))
  return cache.replace(units=tuple(units))


def unit_buffer(unit_cache):
  """A unit's output buffer in a StepCache entry (ResidualBlock caches (inner, output))."""
  return unit_cache[1] if isinstance(unit_cache, tuple) else unit_cache


@functools.cache
def bundle(spec_id: str):
  """Every way the library computes subnets of ``built_model(spec_id)``, from ONE jit.

  Compiling each jitted function separately costs seconds per function on a loaded
  2-core CPU; nesting the library's jitted StepFunctions inside one outer jit traces
  exactly the same code but compiles once. Keys (lists are indexed by level):
    prefix_units[k]: unit outputs of the prefix forward at level k;
    forward[k], blocked[k]: StepFunctions.forward / forward_blocked logits;
    step_logits[k], step_units[k]: the cache after level 0 (restarted in an all-NaN cache)
      and k advances;
    step_levels[k]: its (static) level; exits: [K, B, classes].
  The separately compiled functions are exercised in test_incremental / test_api.
  """
  from stepnet_jax.core import stepping

  spec = SPEC_BY_ID[spec_id]
  model = built_model(spec_id)
  graphdef, variables = stepping.split(model)
  fns = stepping.make_step_functions(graphdef, spec.num_levels)
  x = images(spec.input_shape, batch=4, seed=11)
  k_levels = spec.num_levels
  step_levels = []

  @jax.jit
  def everything(v, x):
    m = nnx.merge(graphdef, v, copy=True)
    xn = m.normalize(x)
    out = {
      'prefix_units': [unit_outputs(m, xn, k) for k in range(k_levels)],
      'forward': [fns.forward(v, x, level=k) for k in range(k_levels)],
      'blocked': [fns.forward_blocked(v, x, level=k) for k in range(k_levels)],
      'exits': fns.exits(v, x),
      'step_logits': [],
      'step_units': [],
    }
    # Level 0 of x in the buffers of a cache that is all NaN: a step reading a channel it
    # has not computed (past end(level), or stale) makes NaN logits.
    cache = fns.restart(v, poison(m, fns.start(v, x), -1), x)
    for k in range(k_levels):
      if k:
        cache = fns.advance(v, cache)
      step_levels.append(cache.level)
      out['step_logits'].append(cache.logits)
      out['step_units'].append([unit_buffer(c) for c in cache.units])
    return out

  out = jax.device_get(everything(variables, x))
  out.update(x=x, step_levels=step_levels, graphdef=graphdef, variables=variables, functions=fns)
  return out


def step_each_alone(net, x, policy):
  """Reference: each input stepped alone (batch 1) with start/advance, the policy asked in Python."""
  logits, levels = [], []
  for i in range(x.shape[0]):
    xi = x[i : i + 1]
    state = policy.init(1, net.functions.exits(net.variables, xi).shape[-1])
    if net.reusable:
      cache = net.start(xi)
      out = cache.logits
    else:
      out = net.forward(xi, 0)
    level = 0
    while True:
      stop, state = policy.stop(out, jnp.int32(level), state)
      if bool(stop[0]) or level == net.num_levels - 1:
        break
      level += 1
      if net.reusable:
        cache = net.advance(cache)
        out = cache.logits
      else:
        out = net.forward(xi, level)
    logits.append(np.asarray(out[0]))
    levels.append(level)
  return np.stack(logits), np.asarray(levels)


# --------------------------------------------------------------------------- exports


def export_networks(rng: np.random.RandomState) -> dict:
  """Untrained tiny networks for the device exports, as Steppers: LeNet-3C1L, a ResNet-20
  and a quantized LeNet (4-bit weights, 6-bit activations, clips calibrated on ``rng``'s images)."""
  from stepnet_jax.inference.stepper import Stepper
  from stepnet_jax.models import quantized

  nets = {}
  for name, shape, width in (('lenet3c1l', (28, 28, 1), 0.5), ('resnet20', (32, 32, 1), 0.25)):
    nets[name] = zoo.build_model(name, num_classes=10, input_shape=shape, num_levels=4, width=width, seed=1)
  lenet = nets['lenet3c1l']
  images = rng.randint(0, 256, (32, 28, 28, 1)).astype(np.uint8)
  precision = quantized.Precision(
    quantized.uniform_bits(lenet, 4), act_bits=6, act_clips=quantized.calibrate_clips(lenet, images)
  )
  nets['quantized_lenet'] = quantized.apply(lenet, precision)
  return {name: Stepper(m) for name, m in nets.items()}


def run_on_device(tmp_path, script: str, directories: dict) -> dict:
  """Runs ``script`` (which prints one JSON line, with 'imported': the modules of jax,
  jaxlib, flax, tensorflow or stepnet_jax it imported) on the exports ``directories`` (name
  -> path) in a fresh Python without PYTHONPATH, as a device would; returns the rest of its
  output after checking it ran and imported none of them."""
  import json
  import os
  import subprocess
  import sys

  path = tmp_path / 'device.py'
  path.write_text(script)
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  done = subprocess.run(
    [sys.executable, str(path), json.dumps(directories)], capture_output=True, text=True, cwd=str(tmp_path), env=env
  )
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  assert out.pop('imported') == []
  return out


def assert_device_logits(name: str, got: dict, quantized_share: float) -> None:
  """The device's per-input logit errors (``got['steps']``, ``got['forwards']``, over
  levels) are within float32 rounding of the logits' scale (``got['scale']``); for a
  quantized network (name 'quantized...') in at least ``quantized_share`` of the inputs,
  since where the runtimes' sums straddle a rounding boundary an activation lands one grid
  step apart (models/quantized.py), and within 5% of the scale everywhere."""
  tol = 1e-4 * max(1.0, got['scale'])
  for path in ('steps', 'forwards'):
    errors = np.asarray(got[path])
    if name.startswith('quantized'):
      assert np.mean(errors <= tol) >= quantized_share and errors.max() <= 0.05 * got['scale'], (name, path, errors)
    else:
      assert errors.max() <= tol, (name, path, errors)


def device_script(module: str, body: str) -> str:
  """A script for ``run_on_device``: for each export it imports the copied runner
  ``module`` as ``ax``, loads ``net`` and ``ref`` (reference.npz: 'images', the library's
  'exits' [levels, B, classes]), steps and runs the direct forwards on ``x`` (the first
  ``net.batch`` images: all when the export takes any batch) and records their per-input
  errors in ``out[name]``; then runs ``body`` (indented as the loop's body)."""
  return f"""
import json, sys
import numpy as np
out = {{}}
for name, d in json.loads(sys.argv[1]).items():
  sys.path.insert(0, d)
  import {module} as ax
  net = ax.Network(d)
  ref = np.load(d + '/reference.npz')
  x = ref['images'][:net.batch]
  cache = net.start(x)
  steps = [cache['logits']]
  for k in range(1, net.num_levels):
    cache = net.advance(cache)
    steps.append(cache['logits'])
  forwards = [net.forward(x, k) for k in range(net.num_levels)]
  err = lambda got: np.abs(np.stack(got) - ref['exits'][:, :net.batch]).max(-1).max(0)  # per input, over levels
  out[name] = {{'steps': err(steps).tolist(), 'forwards': err(forwards).tolist(), 'scale': float(np.abs(ref['exits']).max())}}
{body}  sys.path.remove(d)
  del sys.modules['{module}']
out['imported'] = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'tensorflow', 'stepnet_jax'))
print(json.dumps(out))
"""
