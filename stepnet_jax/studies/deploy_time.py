"""Wall time of stepping where it is deployed: XLA, ONNX Runtime and LiteRT, side by side.

    python -m stepnet_jax.studies.deploy_time --json results/bench_anytime_time.json \\
        [--networks lenet3c1l,vgg16,mobilenetv2] [--run resnet20=runs/compare_resnet20/steppingnet] \\
        [--batches 1 --processes 5]

Per network, runtime ('xla': the library's jitted functions; 'onnxruntime': the graphs of
``export.save(format='onnx')`` run by ``anytime_onnx.Network``, CPU execution provider;
with ``--runtimes onnxruntime,litert`` also 'litert': ``export.save(format='tflite',
batch=B)`` per batch size, run by ``anytime_litert.Network`` on all cores) and
batch (``--batches``, 256 and 1), in one process, every timed function of a runtime taking
turns round by round with the others of that runtime (so a slow spell of the machine hits
them alike; onnxruntime's idle threads sleep instead of spinning), medians over the rounds. Before
timing, onnxruntime's logits must equal the library's and both runtimes must stop each
input at the same level.

* ``steps_over_direct``: the K step times (start, then each step on the cache) summed, over
  the direct top forward (XLA: the faster of its masked and level-block forwards);
* ``level0_over_top``: the start step's time over the direct top forward, beside
  ``level0_mac_fraction``, level 0's MACs over the top's;
* ``anytime_over_direct``: the anytime program (XLA: the compiled program, called bare, the
  faster of its two strategies; ONNX Runtime: ``Network.predict``, each step on the inputs still
  going) at an exit mix of ``anytime_mac_fraction`` of the top's MACs on average, over the
  direct top forward. The mix is given by per-input MAC budgets (``MacBudget`` with one
  budget per input, ``exit_mix``): equal shares of the inputs stop at each level, moved down
  to level 0 until the average is at most half the top's MACs; at batch 1 each level's time
  is weighted by its share. Trained and untrained weights are timed alike.

Each runtime's functions take turns among themselves, one runtime after another: with all
runtimes taking turns together, onnxruntime's short batch-1 calls ran slower after XLA's and
the batch-1 ratios moved by up to +-0.3 between runs on a 2-core machine. ``--processes N``
times in N fresh processes, one after another, and records each ratio's median over them
with its range (``--batches 1 --processes 5`` is the batch-1 protocol of results/bench_log.md).

Networks named with ``--networks`` are built untrained (timing does not depend on the
weights); ``--run NAME=WORKDIR`` times a trained run (e.g. a constructed ResNet-20).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import stepnet_jax
from stepnet_jax import cli
from stepnet_jax.core import anytime
from stepnet_jax.inference import export, policies
from stepnet_jax.inference.stepper import Stepper
from stepnet_jax.models import zoo

# name -> (zoo model, input shape): the untrained networks timed by default.
NETWORKS = {
  'lenet3c1l': ('lenet3c1l', (28, 28, 1)),
  'resnet20': ('resnet20', (32, 32, 1)),
  'vgg16': ('vgg16', (32, 32, 3)),
  'mobilenetv2': ('mobilenetv2', (32, 32, 1)),
}
BATCHES = (256, 1)


MIX_BATCH = 256  # the batch-1 runs weight each level as this batch's mix does


def exit_mix(batch: int, macs_to_reach, fraction: float = 0.5) -> np.ndarray:
  """Each input's exit level: equal shares at every level (input i at i mod K), then inputs
  moved from the highest levels to level 0 until the average MACs are at most ``fraction``
  of the top's."""
  macs = np.asarray(macs_to_reach, np.float64)
  if macs[0] > fraction * macs[-1]:
    raise ValueError(f'level 0 alone costs {macs[0] / macs[-1]:.2f} of the top: no mix spends at most {fraction}')
  exits = np.arange(batch) % len(macs)
  for i in np.argsort(-exits, kind='stable'):
    if macs[exits].mean() <= fraction * macs[-1]:
      break
    exits[i] = 0
  return exits


def cpu_name() -> str:
  """The processor's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return f'{line.split(":", 1)[1].strip()} ({os.cpu_count()} cores)'
  except OSError:
    pass
  return f'{platform.processor() or platform.machine()} ({os.cpu_count()} cores)'


def _interleaved(fns: dict[str, Callable[[], list[float] | None]], rounds: int, warmup: int = 2) -> dict:
  """Median seconds of each function, calling them in turn round by round. A function that
  returns a list of per-part seconds (the steps) has each part's median recorded too."""
  seconds: dict[str, list] = {name: [] for name in fns}
  for r in range(warmup + rounds):
    for name, fn in fns.items():
      t = time.perf_counter()
      parts = fn()
      total = time.perf_counter() - t
      if r >= warmup:
        seconds[name].append(parts if parts is not None else total)
  return {
    name: (np.median(np.asarray(s), axis=0).tolist() if isinstance(s[0], list) else float(np.median(s)))
    for name, s in seconds.items()
  }


def _interleaved_by_runtime(fns: dict[str, Callable], rounds: int) -> dict:
  """``_interleaved`` within each runtime (names ``RUNTIME_part``), one runtime after another:
  a runtime's ratios come from calls that took turns with each other only, so another
  runtime's threads and caches do not slow its short batch-1 calls."""
  out = {}
  for runtime in ('xla', *DEVICE_RUNTIMES):
    group = {n: f for n, f in fns.items() if n.startswith(f'{runtime}_')}
    if group:
      out.update(_interleaved(group, rounds))
  if set(out) != set(fns):
    raise ValueError(f'timed functions of no known runtime: {sorted(set(fns) - set(out))}')
  return out


def _waited(fn: Callable, *args, **kwargs) -> Callable[[], None]:
  """``fn(*args, **kwargs)`` as a timed call: it returns once the result is computed."""

  def call() -> None:
    jax.block_until_ready(fn(*args, **kwargs))

  return call


def _xla_functions(net: Stepper, x: jax.Array, budgets: np.ndarray) -> dict[str, Callable]:
  fns, v, top = net.functions, net.variables, net.num_levels - 1
  cache = {'c': fns.start(v, x)}
  for k in range(1, net.num_levels):
    cache['c'] = fns.levels[k](v, cache['c'])
  policy = policies.MacBudget(jnp.asarray(budgets, jnp.float32), tuple(net.macs_to_reach))

  def steps() -> list[float]:
    t = [time.perf_counter()]
    cache['c'] = jax.block_until_ready(fns.restart(v, cache['c'], x))
    t.append(time.perf_counter())
    for k in range(1, net.num_levels):
      cache['c'] = jax.block_until_ready(fns.levels[k](v, cache['c']))
      t.append(time.perf_counter())
    return np.diff(t).tolist()

  return {
    'direct_masked': _waited(fns.forward, v, x, top),
    'direct_blocked': _waited(fns.forward_blocked, v, x, top),
    'steps': steps,
    'anytime_masked': _waited(anytime.make_predict(net.program, 'masked'), v, x, policy),
    'anytime_compact': _waited(anytime.make_predict(net.program, 'compact'), v, x, policy),
  }


def _runner_module(directory: str, file: str):
  """The runner an export copied into ``directory`` (``anytime_onnx.py``, ``anytime_litert.py``),
  imported as its own module."""
  spec = importlib.util.spec_from_file_location(f'{file[:-3]}_{abs(hash(directory))}', f'{directory}/{file}')
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while it loads
  spec.loader.exec_module(module)
  return module


def _device_functions(device, ax, x: np.ndarray, budgets: np.ndarray) -> dict[str, Callable]:
  top = device.num_levels - 1
  policy = ax.MacBudget(budgets, device.macs_to_reach)

  def steps() -> list[float]:
    t = [time.perf_counter()]
    cache = device.start(x)
    t.append(time.perf_counter())
    for _ in range(1, device.num_levels):
      cache = device.advance(cache)
      t.append(time.perf_counter())
    return np.diff(t).tolist()

  return {
    'direct': _waited(device.forward, x, top),
    'steps': steps,
    'anytime': _waited(device.predict, x, policy),
  }


def _row(network: str, runtime: str, batch: int, m: dict, level_macs, fraction: float, extra: dict) -> dict:
  direct = m['direct']
  return {
    'network': network,
    'runtime': runtime,
    'batch': batch,
    'steps_over_direct': sum(m['steps']) / direct,
    'level0_over_top': m['steps'][0] / direct,
    'level0_mac_fraction': level_macs[0] / level_macs[-1],
    'anytime_over_direct': m['anytime'] / direct,
    'anytime_mac_fraction': fraction,
    'direct_ms': 1e3 * direct,
    'step_ms': [1e3 * s for s in m['steps']],
    'anytime_ms': 1e3 * m['anytime'],
    **extra,
    'cpu': cpu_name(),
    'date': datetime.date.today().isoformat(),
  }


def agreement(net: Stepper, device, images: np.ndarray, runtime: str = 'onnx') -> dict:
  """How far a device runtime's logits are from the library's on ``images``, at every level,
  by stepping and by the direct forwards: the largest absolute difference (keys named after
  ``runtime``) and the largest logit; raises if they differ beyond float32 rounding."""
  exits = np.asarray(net.exits(jnp.asarray(images)))
  cache, steps = device.start(images), []
  for level in range(net.num_levels):
    if level:
      cache = device.advance(cache)
    steps.append(cache['logits'])
  forwards = [device.forward(images, level) for level in range(net.num_levels)]
  out = {
    f'{runtime}_steps_max_abs_error': float(np.abs(np.stack(steps) - exits).max()),
    f'{runtime}_forwards_max_abs_error': float(np.abs(np.stack(forwards) - exits).max()),
    'max_abs_logit': float(np.abs(exits).max()),
  }
  tolerance = 1e-4 * max(1.0, out['max_abs_logit'])
  if max(out[f'{runtime}_steps_max_abs_error'], out[f'{runtime}_forwards_max_abs_error']) > tolerance:
    raise AssertionError(f'{runtime} and the library disagree: {out}; the timings would compare different work')
  return out


DEVICE_RUNTIMES = ('onnxruntime', 'litert')


def time_network(
  name: str, net: Stepper, rounds: int, batches=BATCHES, seed: int = 0, runtimes: tuple[str, ...] = ('onnxruntime',)
) -> list[dict]:
  """The rows of one network: XLA and each device runtime of ``runtimes`` ('onnxruntime',
  'litert': a LiteRT export per batch size, run on all cores) at each batch size."""
  unknown = set(runtimes) - set(DEVICE_RUNTIMES)
  if unknown:
    raise ValueError(f'unknown runtimes {sorted(unknown)}; choose from {", ".join(DEVICE_RUNTIMES)}')
  level_macs = [int(m) for m in net.level_macs]
  rng = np.random.RandomState(seed)
  rows = []
  with tempfile.TemporaryDirectory() as d:
    checks, devices = {}, {}
    if 'onnxruntime' in runtimes:
      export.save(net, f'{d}/onnx', format='onnx')
      ax = _runner_module(f'{d}/onnx', 'anytime_onnx.py')
      devices['onnxruntime'] = (ax.Network(f'{d}/onnx', spinning=False), ax)
      checks['onnxruntime'] = agreement(
        net, devices['onnxruntime'][0], rng.randint(0, 256, (16,) + tuple(net.input_shape)).astype(np.uint8)
      )
    for batch in batches:
      images = rng.randint(0, 256, (batch,) + tuple(net.input_shape)).astype(np.uint8)
      if 'litert' in runtimes:  # a LiteRT model's batch is fixed when it is converted
        export.save(net, f'{d}/litert{batch}', format='tflite', batch=batch)
        ax = _runner_module(f'{d}/litert{batch}', 'anytime_litert.py')
        devices['litert'] = (ax.Network(f'{d}/litert{batch}', threads=os.cpu_count()), ax)
        checks['litert'] = agreement(net, devices['litert'][0], images, 'litert')
      exits = exit_mix(MIX_BATCH, net.macs_to_reach)
      budgets = np.asarray(net.macs_to_reach, np.float64)[exits[:batch]]
      fraction = float(np.mean(np.asarray(net.macs_to_reach)[exits]) / net.macs_to_reach[-1])
      x = jnp.asarray(images)
      fns = {f'xla_{k}': f for k, f in _xla_functions(net, x, budgets).items()}
      policy = policies.MacBudget(jnp.asarray(budgets, jnp.float32), tuple(net.macs_to_reach))
      xla_exits = np.asarray(net.predict(x, policy).exit_level)
      for runtime, (device, ax) in devices.items():
        fns.update({f'{runtime}_{k}': f for k, f in _device_functions(device, ax, images, budgets).items()})
        if not np.array_equal(
          xla_exits, device.predict(images, ax.MacBudget(budgets, device.macs_to_reach)).exit_level
        ):
          raise AssertionError(
            f'XLA and {runtime} stop inputs at different levels: their anytime times would compare other work'
          )
      m = _interleaved_by_runtime(fns, rounds)
      if batch == 1:  # one input stops at one level: each level's time, weighted as the mix
        m.update(_batch1_anytime(net, devices, x, images, rounds, np.bincount(exits, minlength=net.num_levels)))
      direct = min(m['xla_direct_masked'], m['xla_direct_blocked'])
      faster = min(('masked', 'compact'), key=lambda s: m[f'xla_anytime_{s}'])
      rows.append(
        _row(
          name,
          'xla',
          batch,
          {'direct': direct, 'steps': m['xla_steps'], 'anytime': m[f'xla_anytime_{faster}']},
          level_macs,
          fraction,
          {
            'direct_forward': 'masked' if m['xla_direct_masked'] <= m['xla_direct_blocked'] else 'blocked',
            'anytime_strategy': faster,
          },
        )
      )
      for runtime in devices:
        device_m = {part: m[f'{runtime}_{part}'] for part in ('direct', 'steps', 'anytime')}
        rows.append(_row(name, runtime, batch, device_m, level_macs, fraction, checks[runtime]))
      for row in rows[-1 - len(devices) :]:
        print(
          f'{name:>12} {row["runtime"]:>11} batch {batch:>3}: steps/direct {row["steps_over_direct"]:.2f}  '
          f'level0/top {row["level0_over_top"]:.2f} (MACs {row["level0_mac_fraction"]:.2f})  '
          f'anytime/direct {row["anytime_over_direct"]:.2f} (MACs {row["anytime_mac_fraction"]:.2f})  '
          f'direct {row["direct_ms"]:.2f} ms',
          flush=True,
        )
  return rows


def _batch1_anytime(
  net: Stepper, devices: dict, x: jax.Array, images: np.ndarray, rounds: int, counts: np.ndarray
) -> dict:
  """Batch 1: the anytime program's time with the input stopping at each level, averaged
  with the mix's share of each level (``counts``); ``devices``: runtime -> (network, runner module)."""
  out = {'xla_anytime_masked': [], 'xla_anytime_compact': [], **{f'{r}_anytime': [] for r in devices}}
  for level in range(net.num_levels):
    budget = np.asarray([net.macs_to_reach[level]], np.float64)
    xla = _xla_functions(net, x, budget)
    fns = {'xla_anytime_masked': xla['anytime_masked'], 'xla_anytime_compact': xla['anytime_compact']}
    for runtime, (device, ax) in devices.items():
      fns[f'{runtime}_anytime'] = _device_functions(device, ax, images, budget)['anytime']
    for name, s in _interleaved_by_runtime(fns, rounds).items():
      out[name].append(s)
  return {name: float(np.average(s, weights=counts)) for name, s in out.items()}


def format_markdown(rows: list[dict]) -> str:
  """The rows as a Markdown table, one line per network, runtime and batch size."""
  lines = [
    '| network | runtime | batch | direct top, ms | steps / direct | level 0 / top (MACs) | anytime / direct (MACs) |',
    '|---|---|---|---|---|---|---|',
  ]

  def value(r: dict, key: str) -> str:  # with its range over processes, where timed in several
    lo_hi = r.get(f'{key}_range')
    return f'{r[key]:.2f}' + (f' [{lo_hi[0]:.2f}-{lo_hi[1]:.2f}]' if lo_hi else '')

  for r in rows:
    lines.append(
      f'| {r["network"]} | {r["runtime"]} | {r["batch"]} | {value(r, "direct_ms")} | {value(r, "steps_over_direct")} | '
      f'{value(r, "level0_over_top")} ({r["level0_mac_fraction"]:.2f}) | '
      f'{value(r, "anytime_over_direct")} ({r["anytime_mac_fraction"]:.2f}) |'
    )
  if any('processes' in r for r in rows):
    lines.append(
      '\n[low-high]: the range over the fresh processes a row was timed in (`processes` in the JSON); the value '
      'is their median. A row without one was timed in one process.'
    )
  return '\n'.join(lines) + '\n'


RATIOS = ('steps_over_direct', 'level0_over_top', 'anytime_over_direct', 'direct_ms', 'anytime_ms')


def combine_processes(runs: list[list[dict]]) -> list[dict]:
  """The rows of several processes' runs as one row per network, runtime and batch: each of
  ``RATIOS`` their median over the processes, with its ``_range`` ([min, max]) and the
  per-process values beside it; the other fields are the first process's."""
  grouped: dict[tuple, list[dict]] = {}
  for rows in runs:
    for row in rows:
      grouped.setdefault((row['network'], row['runtime'], row['batch']), []).append(row)
  combined = []
  for rows in grouped.values():
    if len(rows) != len(runs):
      raise ValueError(
        f'{rows[0]["network"]} {rows[0]["runtime"]} batch {rows[0]["batch"]}: in {len(rows)} of {len(runs)} runs'
      )
    row = dict(rows[0], processes=len(rows))
    for key in RATIOS:
      values = [r[key] for r in rows]
      row[key] = float(np.median(values))
      row[f'{key}_range'] = [min(values), max(values)]
      row[f'{key}_per_process'] = values
    combined.append(row)
  return combined


def _in_processes(count: int, argv: list[str]) -> list[dict]:
  """This command run ``count`` times, one fresh process after another, with ``argv`` (its
  flags but ``--json`` and ``--processes``); their rows combined by ``combine_processes``."""
  runs = []
  with tempfile.TemporaryDirectory() as d:
    for i in range(count):
      out = f'{d}/run{i}.json'
      print(f'process {i + 1} of {count}', flush=True)
      command = [sys.executable, '-m', 'stepnet_jax.studies.deploy_time', *argv, '--processes=1', f'--json={out}']
      subprocess.run(command, check=True)
      with open(out) as fh:
        runs.append(json.load(fh)['runs'])
  return combine_processes(runs)


def _define_flags() -> None:
  """The command's flags (defined only when run as the command)."""
  flags.DEFINE_list('networks', list(NETWORKS), f'Untrained networks to time: {", ".join(NETWORKS)}.')
  flags.DEFINE_multi_string('run', [], 'NAME=WORKDIR: also time the trained run in WORKDIR under NAME.')
  flags.DEFINE_integer('levels', 4, 'Levels of the untrained networks.')
  flags.DEFINE_list(
    'runtimes',
    ['onnxruntime'],
    f'Device runtimes timed beside XLA: {", ".join(DEVICE_RUNTIMES)} (litert needs TensorFlow).',
  )
  flags.DEFINE_integer('rounds', 10, 'Timed rounds at batch 256 (batch 1: 5x as many).')
  flags.DEFINE_list('batches', [str(b) for b in BATCHES], 'Batch sizes to time.')
  flags.DEFINE_integer(
    'processes',
    1,
    'Time in this many fresh processes, one after another, and record the median of each ratio '
    'with its range: batch-1 ratios move between processes by more than within one.',
  )
  flags.DEFINE_string(
    'json',
    None,
    'Write {"runs": [...]} to this file and a table beside it (.md); rows of another network, runtime or batch are kept.',
  )


def networks(names: list[str], runs: list[str], levels: int) -> dict[str, Callable[[], Stepper]]:
  """name -> a function building the network: untrained ``NETWORKS`` by name, and trained runs
  given as ``NAME=WORKDIR``."""
  nets = {}
  for name in names:
    if name not in NETWORKS:
      raise ValueError(f'unknown network {name!r}; choose from {", ".join(NETWORKS)}')
    model, shape = NETWORKS[name]
    nets[name] = lambda model=model, shape=shape: Stepper(
      zoo.build_model(model, num_classes=10, input_shape=shape, num_levels=levels)
    )
  for spec in runs:
    name, _, workdir = spec.partition('=')
    if not workdir:
      raise ValueError(f'--run takes NAME=WORKDIR, got {spec!r}')
    nets[name] = lambda workdir=workdir: stepnet_jax.load(workdir)
  return nets


def write_rows(path: str, rows: list[dict], markdown: Callable[[list[dict]], str]) -> None:
  """``{"runs": rows}`` to ``path`` and its table beside it (.md). ``rows`` replace every row
  already there of the same network, runtime and batch (all its graphs, for step_profile);
  the others are kept (another runtime's too: ``--runtimes`` leaves the rows of the runtimes
  it does not time). Rows sorted by network, batch (largest first) and runtime, a group's
  rows in the order given."""

  def key(row: dict) -> tuple:
    return row['network'], row['runtime'], row['batch']

  new = {key(r) for r in rows}
  kept = []
  if os.path.exists(path):
    with open(path) as fh:
      kept = [r for r in json.load(fh)['runs'] if key(r) not in new]
  order = {runtime: i for i, runtime in enumerate(('xla', *DEVICE_RUNTIMES))}
  rows = sorted(kept + rows, key=lambda r: (r['network'], -r['batch'], order.get(r['runtime'], len(order))))
  with open(path, 'w') as fh:
    json.dump({'runs': rows}, fh, indent=1)
  table = os.path.splitext(path)[0] + '.md'
  with open(table, 'w') as fh:
    fh.write(markdown(rows))
  print(f'wrote {path} and {table}')


def main(argv) -> None:
  """The command: times every network, prints a line per row, writes ``--json``."""
  del argv
  f = flags.FLAGS
  batches = [int(b) for b in f.batches]
  if len(set(batches)) != len(batches) or min(batches, default=0) < 1:
    raise app.UsageError(f'--batches takes distinct positive batch sizes, got {f.batches}')
  if f.processes < 1:
    raise app.UsageError(f'--processes must be >= 1, got {f.processes}')
  if f.processes > 1:
    argv = [f'--networks={",".join(f.networks)}', f'--levels={f.levels}', f'--runtimes={",".join(f.runtimes)}']
    argv += [f'--rounds={f.rounds}', f'--batches={",".join(f.batches)}', *(f'--run={r}' for r in f.run)]
    rows = _in_processes(f.processes, argv)
    print(format_markdown(rows))
  else:
    rows = []
    for name, make in networks(f.networks, f.run, f.levels).items():
      net = make()
      for batch in batches:
        rounds = f.rounds if batch > 1 else 5 * f.rounds
        rows += time_network(name, net, rounds, batches=(batch,), runtimes=tuple(f.runtimes))
  if f.json:
    write_rows(f.json, rows, format_markdown)


def command() -> None:
  """``python -m stepnet_jax.studies.deploy_time [--networks ...] [--run NAME=WORKDIR] --json FILE``."""
  cli.run_command(__name__, _define_flags, main)


if __name__ == '__main__':
  command()
