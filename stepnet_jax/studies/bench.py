"""Benchmark of the three costs that make a stepping network worth having.

    python -m stepnet_jax.bench [--model=lenet3c1l] [--levels=4] [--batch=256] [--json=FILE]

Measured side by side, in one run, on the machine at hand:
 (a) joint K-exit train step / single-exit train step of the same network (target <= 1.15),
     both built by ``training.step.make_train_step``: in time (and the joint step's
     images/s) and in compiled FLOPs;
 (b) sum over k of step-k latency / fastest direct top-level forward, with both the
     masked full-width and the level-block forward reported (target <= 1.15);
 (c) per level, XLA cost-analysis FLOPs of the compiled step / (2 x delta MACs x batch)
     (target 0.9..1.2): the compiled step k really does only level k's work;
 (d) the latency of each level block of the costliest conv layer against the whole layer;
 (e) the first conv layer (it reads the image: one to three channels), each level block and
     the whole layer, as the library convolution and as the tap product ``layers.conv_by_taps``
     (which ``layers.TAPS_MAX_CHANNELS`` picks per backend for narrow blocks).
"""

from __future__ import annotations

import functools
import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from stepnet_jax import cli
from stepnet_jax import config as config_lib
from stepnet_jax.core import layers, stepping
from stepnet_jax.data import feed
from stepnet_jax.inference import timing
from stepnet_jax.inference.stepper import Stepper
from stepnet_jax.inference.timing import median_seconds
from stepnet_jax.models import budgets, zoo
from stepnet_jax.training import losses, optim
from stepnet_jax.training import step as step_lib


def compiled_flops(fn, *args) -> float:
  """FLOPs XLA's cost analysis reports for ``fn(*args)`` once compiled."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost['flops'])


def valid_tap_macs(model) -> np.ndarray:
  """Delta MACs per level without the kernel taps that land on SAME padding: [K].

  The library counts kernel_size^2 taps per output pixel (the usual convention);
  XLA's cost analysis counts only taps on real inputs, which is less for SAME-padded
  convolutions on small feature maps (``MacModel.without_padding``, every layer of every
  unit, residual and depthwise ones included).
  """
  mac_model = budgets.MacModel.of(model).without_padding()
  assignment = dict(model.assignment)
  return np.diff(mac_model.subnet_macs([assignment[g] for g in mac_model.names]), prepend=0)


def step_flops(graphdef, variables, x, num_levels: int) -> list[float]:
  """XLA's compiled FLOPs of each step (level 0 from images ``x``, then k from level k-1's
  cache), through the pure non-donating step functions (the same computation)."""
  caches = [stepping.start(graphdef, variables, x)]
  for k in range(1, num_levels - 1):
    caches.append(stepping.step(graphdef, variables, caches[-1], k))
  flops = [compiled_flops(functools.partial(stepping.start, graphdef), variables, x)]
  return flops + [
    compiled_flops(functools.partial(stepping.step, graphdef, level=k), variables, caches[k - 1])
    for k in range(1, num_levels)
  ]


def conv_block_costs(model, x, top: int, repeats: int) -> dict:
  """Latency of each level block of the model's costliest conv layer, and of the whole layer.

  Outputs are reduced to a scalar inside the jit, so only the convolution is timed.
  """
  layer_macs = model.delta_macs().sum(axis=1)[:-1]
  convs = [i for i, u in enumerate(model.units) if isinstance(u, layers.LevelConv)]
  if not convs:
    return {}
  i = max(convs, key=lambda j: layer_macs[j])
  unit = model.units[i]
  features = model.normalize(x)
  for u in model.units[:i]:
    features = u(features, top)
  blocks = [
    median_seconds(jax.jit(lambda f, k=k: unit.block(f, k).sum()), features, repeats=repeats) for k in range(top + 1)
  ]
  whole = median_seconds(jax.jit(lambda f: unit(f, top).sum()), features, repeats=repeats)
  return {'layer': model.unit_names[i], 'block_ms': [1e3 * t for t in blocks], 'whole_layer_ms': 1e3 * whole}


def first_conv_costs(model, x, top: int, repeats: int) -> dict:
  """Latency of each level block of the model's first conv layer (and of the whole layer) as
  the library convolution and as the tap product, whatever the backend's default is."""
  unit = model.units[0]
  if not isinstance(unit, layers.LevelConv):
    return {}
  features = model.normalize(x)
  out = {'layer': model.unit_names[0], 'in_channels': int(features.shape[-1])}
  for name, limit in (('library', (0, 0)), ('taps', (features.shape[-1], unit.kernel.shape[-1]))):
    with layers.conv_rule({jax.default_backend(): limit}):
      out[f'{name}_block_ms'] = [
        1e3 * median_seconds(jax.jit(lambda f, k=k: unit.block(f, k).sum()), features, repeats=repeats)
        for k in range(top + 1)
      ]
      out[f'{name}_whole_ms'] = 1e3 * median_seconds(jax.jit(lambda f: unit(f, top).sum()), features, repeats=repeats)
  return out


def _time_train_step(step, state, batch, repeats):
  holder = {'state': state}

  def run():
    holder['state'], metrics = step(holder['state'], batch)
    return metrics['loss']

  return median_seconds(run, repeats=repeats)


def train_step_costs(model, train_batch: int, input_shape, repeats: int, rng: np.random.RandomState) -> dict:
  """(a): the joint K-exit train step against the same network trained on its top exit alone,
  both from ``make_train_step``: median ms, and the compiled steps' FLOPs."""
  cfg = config_lib.from_dict({'model.num_levels': model.num_levels, 'train.batch_size': train_batch})
  tx = optim.make_optimizer(cfg, 100)
  graphdef, _ = step_lib.init_state(model, tx)
  x = rng.randint(0, 256, (train_batch,) + tuple(input_shape)).astype(np.uint8)
  y = rng.randint(0, 10, (train_batch,)).astype(np.int32)
  batch = next(feed.device_batches(x, y, [np.arange(train_batch)]))
  out = {}
  for name, objective in (('joint', losses.objective_for(cfg)), ('single_exit', losses.single_exit())):
    step = step_lib.make_train_step(graphdef, tx, objective)
    fresh = lambda: jax.tree.map(jnp.copy, step_lib.init_state(model, tx)[1])  # the step donates it
    out[f'{name}_flops'] = compiled_flops(step, fresh(), batch)
    out[f'{name}_step_ms'] = 1e3 * _time_train_step(step, fresh(), batch, repeats)
  return out


def data_parallel_costs(
  model_name: str, num_levels: int, width: float, train_batch: int, input_shape, repeats: int, device_counts
) -> list[dict]:
  """(f): the joint train step data parallel over 1, 2, 4, ... simulated CPU devices, each
  count in a fresh process (``--xla_force_host_platform_device_count``). The simulated
  devices share this machine's cores: this measures the overhead of sharding, not a speedup."""
  import subprocess
  import sys

  out = []
  for d in device_counts:
    # Appended, so flags the caller set (e.g. the test suite's optimisation level) still apply.
    flags = f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={int(d)}'.strip()
    env = {**os.environ, 'XLA_FLAGS': flags}
    cmd = [
      sys.executable,
      '-m',
      'stepnet_jax.studies.bench',
      '--train_only',
      f'--model={model_name}',
      f'--levels={num_levels}',
      f'--width={width}',
      f'--train_batch={train_batch}',
      f'--repeats={repeats}',
      '--input_shape=' + ','.join(map(str, input_shape)),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    out.append(
      {'devices': int(d), 'step_ms': r['joint_step_ms'], 'images_per_sec': 1e3 * train_batch / r['joint_step_ms']}
    )
  return out


def run(
  model_name: str = 'lenet3c1l',
  num_levels: int = 4,
  batch: int = 256,
  train_batch: int = 128,
  width: float = 1.0,
  input_shape=(28, 28, 1),
  repeats: int = 10,
) -> dict:
  """Measures (a) to (e) for one model and returns the report (JSON-able)."""
  rng = np.random.RandomState(0)
  model = zoo.build_model(model_name, num_classes=10, input_shape=input_shape, num_levels=num_levels, width=width)
  delta = model.delta_macs().sum(axis=0)

  # (a) training cost.
  train = train_step_costs(model, train_batch, input_shape, repeats, rng)

  # (b) stepping latency against direct top-level forwards.
  net = Stepper(model)
  graphdef, variables, fns = net.graphdef, net.variables, net.functions
  x = jnp.asarray(rng.randint(0, 256, (batch,) + tuple(input_shape)), jnp.uint8)
  step_s = timing.step_latencies(net, np.asarray(x), repeats=repeats)
  top = num_levels - 1
  t_masked = median_seconds(functools.partial(fns.forward, level=top), variables, x, repeats=repeats)
  t_blocked = median_seconds(functools.partial(fns.forward_blocked, level=top), variables, x, repeats=repeats)

  # (c) what the compiled steps compute.
  flops = step_flops(graphdef, variables, x, num_levels)
  flops_masked_top = compiled_flops(functools.partial(stepping.forward, graphdef, level=top), variables, x)
  valid = valid_tap_macs(model)

  # (d) where (b) comes from: the costliest conv layer, each level block against the whole layer.
  conv_layer = conv_block_costs(model, x, top, repeats)
  # (e) the narrow-input first layer, both convolution formulations.
  first_conv = first_conv_costs(model, x, top, repeats)

  fastest = min(t_masked, t_blocked)
  return {
    'machine': {
      'backend': jax.default_backend(),
      'devices': str(jax.devices()),
      'processor': platform.processor() or platform.machine(),
      'jax': jax.__version__,
    },
    'model': model_name,
    'width': width,
    'num_levels': num_levels,
    'input_shape': list(input_shape),
    'train': {
      'batch': train_batch,
      **train,
      'ratio': train['joint_step_ms'] / train['single_exit_step_ms'],
      'flops_ratio': train['joint_flops'] / train['single_exit_flops'],
      'images_per_sec': 1e3 * train_batch / train['joint_step_ms'],
      'target': '<= 1.15',
    },
    'stepping': {
      'batch': batch,
      'step_ms': [1e3 * s for s in step_s],
      'sum_steps_ms': 1e3 * sum(step_s),
      'masked_forward_ms': 1e3 * t_masked,
      'blocked_forward_ms': 1e3 * t_blocked,
      'fastest_forward': 'masked' if t_masked <= t_blocked else 'blocked',
      'ratio': sum(step_s) / fastest,
      'target': '<= 1.15',
    },
    'flops': {
      'delta_macs': [int(d) for d in delta],
      'step_flops': flops,
      'ratio': [f / (2.0 * d * batch) for f, d in zip(flops, delta)],
      'ratio_to_valid_taps': [f / (2.0 * v * batch) for f, v in zip(flops, valid)],
      'masked_top_forward_ratio_to_kept': flops_masked_top / (2.0 * delta.sum() * batch),
      'target': '0.9 .. 1.2',
    },
    'conv_layer': conv_layer,
    'first_conv': first_conv,
  }


def format_report(r: dict) -> str:
  """The report of ``run`` as text."""
  t, s, f = r['train'], r['stepping'], r['flops']
  lines = [
    f'{r["model"]} width {r["width"]}, {r["num_levels"]} levels, input {r["input_shape"]}, '
    f'{r["machine"]["backend"]} ({r["machine"]["processor"]}), jax {r["machine"]["jax"]}',
    f'(a) train step, batch {t["batch"]}: joint {t["joint_step_ms"]:.1f} ms ({t["images_per_sec"]:.0f} img/s), '
    f'single exit {t["single_exit_step_ms"]:.1f} ms, ratio {t["ratio"]:.3f} (target {t["target"]}); '
    f'compiled FLOPs ratio {t["flops_ratio"]:.3f}',
    f'(b) batch {s["batch"]}: steps '
    + ' + '.join(f'{m:.2f}' for m in s['step_ms'])
    + f' = {s["sum_steps_ms"]:.2f} ms; direct top forward masked {s["masked_forward_ms"]:.2f} ms, '
    f'level-block {s["blocked_forward_ms"]:.2f} ms; ratio to fastest ({s["fastest_forward"]}) '
    f'{s["ratio"]:.3f} (target {s["target"]})',
    '(c) compiled step FLOPs / (2 x delta MACs x batch): '
    + ', '.join(f'L{k} {x:.3f}' for k, x in enumerate(f['ratio']))
    + f' (target {f["target"]}); without the taps on SAME padding: '
    + ', '.join(f'{x:.3f}' for x in f['ratio_to_valid_taps'])
    + f'; masked top forward does {f["masked_top_forward_ratio_to_kept"]:.2f}x the kept work',
  ]
  c = r.get('conv_layer')
  if c:
    lines.append(
      f'(d) {c["layer"]}: level blocks '
      + ', '.join(f'{m:.1f}' for m in c['block_ms'])
      + f' ms vs the whole layer {c["whole_layer_ms"]:.1f} ms (batch {s["batch"]})'
    )
  e = r.get('first_conv')
  if e:
    lines.append(
      f'(e) {e["layer"]} ({e["in_channels"]} input channels), library convolution / tap product: level blocks '
      + ', '.join(f'{a:.2f} / {b:.2f}' for a, b in zip(e['library_block_ms'], e['taps_block_ms']))
      + f' ms; whole layer {e["library_whole_ms"]:.2f} / {e["taps_whole_ms"]:.2f} ms'
    )
  dp = r.get('data_parallel')
  if dp:
    lines.append(
      f'(f) data-parallel train step, batch {t["batch"]}, simulated CPU devices sharing the same cores: '
      + ', '.join(f'{p["devices"]} device(s) {p["images_per_sec"]:.0f} img/s' for p in dp)
    )
  return '\n'.join(lines)


def _define_flags() -> None:
  """The command's flags (defined only when run as the command: importing the module defines none)."""
  flags.DEFINE_string('model', 'lenet3c1l', 'A name in models.MODELS.')
  flags.DEFINE_integer('levels', 4, 'Levels of equal width.')
  flags.DEFINE_float('width', 1.0, 'Channel multiplier.')
  flags.DEFINE_integer('batch', 256, 'Batch of the stepping and forward timings (b)-(d).')
  flags.DEFINE_integer('train_batch', 128, 'Batch of the train steps (a).')
  flags.DEFINE_list('input_shape', ['28', '28', '1'], 'H,W,C of the (random) images.')
  flags.DEFINE_integer('repeats', 10, 'Timed calls per measurement (median reported).')
  flags.DEFINE_string('json', None, 'Also write the results to this JSON file.')
  flags.DEFINE_list(
    'devices',
    [],
    '(f): also time the data-parallel train step on these numbers of simulated '
    'CPU devices (e.g. 1,2,4), each in its own process.',
  )
  flags.DEFINE_bool('train_only', False, 'Only (a), printed as JSON (what (f) runs per device count).')


def main(argv) -> None:
  """The command: runs the benchmark with the flags, prints the report, writes ``--json``."""
  del argv
  f = flags.FLAGS
  shape = tuple(int(s) for s in f.input_shape)
  if f.train_only:
    model = zoo.build_model(f.model, num_classes=10, input_shape=shape, num_levels=f.levels, width=f.width)
    print(json.dumps(train_step_costs(model, f.train_batch, shape, f.repeats, np.random.RandomState(0))))
    return
  r = run(f.model, f.levels, f.batch, f.train_batch, f.width, shape, f.repeats)
  if f.devices:
    r['data_parallel'] = data_parallel_costs(f.model, f.levels, f.width, f.train_batch, shape, f.repeats, f.devices)
  print(format_report(r))
  if f.json:
    with open(f.json, 'w') as out:
      json.dump(r, out, indent=2)
    print(f'wrote {f.json}')


def command() -> None:
  """``python -m stepnet_jax.bench [--model ... --json FILE]``."""
  cli.run_command(__name__, _define_flags, main)


if __name__ == '__main__':
  command()
