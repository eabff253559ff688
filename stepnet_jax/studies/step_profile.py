"""Where a step's time goes, on XLA and on ONNX Runtime: the per-operation profile of each step.

    python -m stepnet_jax.studies.step_profile --networks lenet3c1l \\
        [--run resnet20_constructed=runs/compare_resnet20/steppingnet] --json results/step_profile.json

For each network, runtime and batch size, every graph of a stepping pass (``start``, then
``step1`` ... ``step{K-1}`` on the cache) and the direct top forward (``forward``) is run
``--calls`` times under the runtime's own profiler:

* XLA: ``jax.profiler`` traces each executed operation ("thunk") with its HLO module and
  run; the compiled HLO says what each operation is.
* ONNX Runtime: ``SessionOptions.enable_profiling`` times each node with its ONNX op type
  (the graph as onnxruntime optimised it: its NCHWc convolutions and layout reorders).

Each operation falls in one of five kinds (``KINDS``): ``conv`` (convolutions and matrix
products, with what is fused into them), ``cache_write`` (writing a level's channels into a
cache buffer: XLA's dynamic-update-slice), ``layout`` (onnxruntime's NCHWc reorders and
transposes), ``data_movement`` (slices, concatenations, gathers, copies, reshapes), and
``elementwise`` (the rest: normalisation, activations, pooling, additions). Per graph:

* ``wall_ms``: the median time of the call as the caller sees it (XLA: the jitted call until
  its result is ready; onnxruntime: ``Network.advance`` / ``start`` / ``forward``, host loop
  included);
* ``ops_ms``: the mean time per call of each kind of operation (operations that run at the same
  time on the two cores count separately);
* ``busy_ms``: the median over calls of the time during which at least one operation ran;
* ``outside_ms = wall_ms - busy_ms``: dispatch, argument handling, the runtime's scheduling
  and (onnxruntime) the runner's Python: what no operation accounts for;
* ``unclassified_ms``: traced operations the compiled HLO does not name (0 when every one was
  classified). Loops, branches and calls count through the operations inside them.

The shares are what matter; absolute times need a quiet machine. Two limits, seen on the
2-core CPU: XLA:CPU's unfused ``conv_general_dilated`` thunks appear in the trace only as
their launch, so their work lands in ``outside_ms`` (the conv column undercounts such graphs);
and onnxruntime's profiler costs more per node than the runner's Python, so its
``outside_ms`` comes out negative and means nothing.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import glob
import gzip
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from stepnet_jax import cli
from stepnet_jax.core.stepping import DIRECT_FORWARD
from stepnet_jax.inference import export
from stepnet_jax.inference.stepper import Stepper
from stepnet_jax.studies import deploy_time

KINDS = ('conv', 'cache_write', 'layout', 'data_movement', 'elementwise')
CONTROL = 'control'  # a loop, branch or call: its own time is its nested operations', traced on their own
_CONTROL_OPCODES = {'while', 'conditional', 'call'}

# HLO opcodes that only move or reinterpret data.
_MOVING_OPCODES = {
  'slice',
  'dynamic-slice',
  'concatenate',
  'copy',
  'bitcast',
  'reshape',
  'transpose',
  'broadcast',
  'gather',
  'pad',
  'tuple',
  'get-tuple-element',
  'parameter',
  'constant',
  'iota',
  'convert',
}
# ONNX op types (as onnxruntime runs them) by kind; any other op type is elementwise.
_ONNX_KINDS = {
  'conv': {'Conv', 'FusedConv', 'MatMul', 'Gemm', 'FusedMatMul', 'Einsum', 'QLinearConv', 'ConvInteger'},
  'layout': {'ReorderInput', 'ReorderOutput', 'Transpose'},
  'data_movement': {
    'Slice',
    'Concat',
    'Split',
    'Gather',
    'GatherND',
    'GatherElements',
    'Identity',
    'Reshape',
    'Squeeze',
    'Unsqueeze',
    'Expand',
    'Pad',
    'Cast',
    'Flatten',
  },
}


def hlo_op_kinds(hlo_text: str) -> dict[str, str]:
  """Each instruction of the compiled module (of every computation, so the operations inside
  loops and branches too) -> its kind, from what it and any computation it calls contain;
  loops, branches and calls themselves are ``CONTROL``."""
  bodies: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    header = re.match(r'^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$', line)
    if header and not line.startswith(' '):
      current = header.group(2)
      bodies[current] = []
      if header.group(1):
        entry = current
    elif line.strip() == '}':
      current = None
    elif current is not None:
      bodies[current].append(line)
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')

  def opcodes(name: str, seen: set) -> set[str]:
    found = set()
    for line in bodies.get(name, []):
      op = re.search(r'=\s*[^=]*?\s([a-z][\w\-]*)\(', line)
      if op:
        found.add(op.group(1))
      for called in _called(line):
        if called not in seen:
          seen.add(called)
          found |= opcodes(called, seen)
    return found

  kinds = {}
  for body in bodies.values():  # instruction names are unique in a module: the ops inside loops and branches too
    for line in body:
      name = re.match(r'\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=', line)
      if name:
        ops = _instruction_opcodes(line, opcodes)
        kinds[name.group(1)] = CONTROL if ops & _CONTROL_OPCODES else _kind_of(ops)
  return kinds


def _instruction_opcodes(line: str, opcodes: Callable[[str, set], set[str]]) -> set[str]:
  op = re.search(r'=\s*[^=]*?\s([a-z][\w\-]*)\(', line)
  found = {op.group(1)} if op else set()
  for called in _called(line):
    found |= opcodes(called, {called})
  return found


def _called(line: str) -> list[str]:
  """The computations an HLO instruction calls (every branch of a conditional)."""
  names = []
  for group in re.findall(r'(?:calls|to_apply|body|condition|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)', line):
    names += re.findall(r'%?([\w.\-]+)', group.strip('{}'))
  return names


def _kind_of(ops: set[str]) -> str:
  if ops & {'convolution', 'dot'}:
    return 'conv'
  if ops & {'dynamic-update-slice', 'scatter'}:
    return 'cache_write'
  if 'transpose' in ops and ops <= _MOVING_OPCODES | {'fusion'}:
    return 'layout' if ops - {'fusion', 'parameter', 'bitcast', 'transpose'} == set() else 'data_movement'
  if ops <= _MOVING_OPCODES | {'fusion'}:
    return 'data_movement'
  return 'elementwise'


def onnx_kind(op_type: str) -> str:
  """The kind of an ONNX op type as onnxruntime runs it."""
  for kind, types in _ONNX_KINDS.items():
    if op_type in types:
      return kind
  return 'elementwise'


def _busy(intervals: list[tuple[float, float]]) -> float:
  """The length of the union of (start, end) intervals."""
  total, end = 0.0, -np.inf
  for a, b in sorted(intervals):
    if b > end:
      total += b - max(a, end)
      end = b
  return total


def _summary(walls: list[float], runs: list[list[tuple[str, str, float, float]]]) -> dict:
  """One graph's row from the caller's wall times (s) and each run's (kind, op, start, end) in us."""
  kinds, ops = collections.Counter(), collections.Counter()
  runs = [[e for e in run if e[0] != CONTROL] for run in runs]  # counted through what they contain
  for run in runs:
    for kind, op, a, b in run:
      kinds[kind] += (b - a) / 1e3 / len(runs)
      ops[op] += (b - a) / 1e3 / len(runs)
  busy = float(np.median([_busy([(a, b) for _, _, a, b in run]) for run in runs])) / 1e3
  wall = float(np.median(walls)) * 1e3
  return {
    'wall_ms': wall,
    'busy_ms': busy,
    'outside_ms': wall - busy,
    'ops_ms': {k: kinds[k] for k in KINDS},
    'unclassified_ms': kinds['unclassified'],
    'top_ops_ms': {op: t for op, t in ops.most_common(6)},
  }


@contextlib.contextmanager
def _jax_trace() -> Iterator[list]:
  """Collects the executed operations of XLA:CPU while the block runs: yields a list that
  holds (module, run id, op name, start us, end us) afterwards."""
  events: list = []
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    try:
      yield events
    finally:
      jax.profiler.stop_trace()
    files = glob.glob(os.path.join(d, '**', '*.json.gz'), recursive=True)
    if not files:
      raise RuntimeError('jax.profiler wrote no trace: cannot profile XLA here')
    with gzip.open(files[0]) as f:
      trace = json.load(f)
  for e in trace['traceEvents'] if isinstance(trace, dict) else trace:
    args = e.get('args') or {}
    if e.get('ph') == 'X' and 'hlo_op' in args and 'run_id' in args:
      events.append((args['hlo_module'], args['run_id'], args['hlo_op'], e['ts'], e['ts'] + e['dur']))


def profile_xla(net: Stepper, x: jax.Array, calls: int) -> dict[str, dict]:
  """Each graph's row on XLA: start (as ``restart`` on a cache), the steps and the direct forward."""
  fns, v, top = net.functions, net.variables, net.num_levels - 1
  direct = fns.forward if DIRECT_FORWARD.get(jax.default_backend(), 'masked') == 'masked' else fns.forward_blocked
  cache = fns.start(v, x)
  kinds = {'start': hlo_op_kinds(fns.restart.lower(v, cache, x).compile().as_text())}
  shapes = jax.eval_shape(fns.start, v, x)  # each step compiles for the cache one level below
  for k in range(1, net.num_levels):
    kinds[f'step{k}'] = hlo_op_kinds(fns.levels[k].lower(v, shapes).compile().as_text())
    shapes = jax.eval_shape(fns.levels[k], v, shapes)
  kinds['forward'] = hlo_op_kinds(direct.lower(v, x, level=top).compile().as_text())
  for k in range(1, net.num_levels):
    cache = fns.levels[k](v, cache)
  labels = ['start'] + [f'step{k}' for k in range(1, net.num_levels)] + ['forward']
  walls = {label: [] for label in labels}
  for _ in range(2):  # warm up
    cache = jax.block_until_ready(fns.restart(v, cache, x))
    for k in range(1, net.num_levels):
      cache = jax.block_until_ready(fns.levels[k](v, cache))
    jax.block_until_ready(direct(v, x, top))
  with _jax_trace() as events:
    for _ in range(calls):
      t = time.perf_counter()
      cache = jax.block_until_ready(fns.restart(v, cache, x))
      walls['start'].append(time.perf_counter() - t)
      for k in range(1, net.num_levels):
        t = time.perf_counter()
        cache = jax.block_until_ready(fns.levels[k](v, cache))
        walls[f'step{k}'].append(time.perf_counter() - t)
      t = time.perf_counter()
      jax.block_until_ready(direct(v, x, top))
      walls['forward'].append(time.perf_counter() - t)
  runs = collections.defaultdict(list)
  for module, run_id, op, a, b in events:
    runs[(module, run_id)].append((op, a, b))
  ordered = sorted(runs.values(), key=lambda r: min(a for _, a, _ in r))
  if len(ordered) != calls * len(labels):
    raise RuntimeError(f'the trace holds {len(ordered)} executions, expected {calls * len(labels)}')
  per_label = {label: [] for label in labels}
  for i, run in enumerate(ordered):
    label = labels[i % len(labels)]
    per_label[label].append([(kinds[label].get(op, 'unclassified'), op, a, b) for op, a, b in run])
  return {label: _summary(walls[label], per_label[label]) for label in labels}


def profile_onnxruntime(directory: str, images: np.ndarray, calls: int) -> dict[str, dict]:
  """Each graph's row on onnxruntime: a profiling copy of the runner's sessions."""
  ax = deploy_time._runner_module(directory, 'anytime_onnx.py')
  device = ax.Network(directory, spinning=False)
  with tempfile.TemporaryDirectory() as d:
    import onnxruntime as ort  # noqa: PLC0415 (the onnx extra)

    options = ort.SessionOptions()
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(d, 'profile')
    manifest = device.manifest
    sessions = {
      'start': ort.InferenceSession(os.path.join(directory, manifest['start']), options),
      **{
        f'step{k + 1}': ort.InferenceSession(os.path.join(directory, name), options)
        for k, name in enumerate(manifest['steps'])
      },
      'forward': ort.InferenceSession(os.path.join(directory, manifest['forwards'][-1]), options),
    }
    top = device.num_levels - 1
    walls = {label: [] for label in sessions}
    for r in range(calls + 2):  # the runner's wall times, then the profiled sessions' runs
      t = time.perf_counter()
      cache = device.start(images)
      wall = [time.perf_counter() - t]
      for _ in range(top):
        t = time.perf_counter()
        cache = device.advance(cache)
        wall.append(time.perf_counter() - t)
      t = time.perf_counter()
      device.forward(images, top)
      wall.append(time.perf_counter() - t)
      if r >= 2:
        for label, w in zip(walls, wall):
          walls[label].append(w)
    profiled_runs = {}
    cache = device.start(images)  # step k's inputs: the cache of level k - 1, advanced as the steps come
    for label, session in sessions.items():
      if label.startswith('step'):
        feeds = {i.name: cache[i.name] for i in session.get_inputs()}
        cache = device.advance(cache)
      else:
        feeds = {'images': images}
      for _ in range(2):
        session.run(None, feeds)
      for _ in range(calls):
        session.run(None, feeds)
      path = session.end_profiling()
      with open(path) as f:
        events = json.load(f)
      profiled_runs[label] = _onnx_runs(events, calls)
  return {label: _summary(walls[label], profiled_runs[label]) for label in sessions}


def _onnx_runs(events: list[dict], calls: int) -> list[list[tuple[str, str, float, float]]]:
  """The last ``calls`` model runs of an onnxruntime profile, each as its nodes' (kind, op type, start, end)."""
  runs = sorted((e['ts'], e['ts'] + e['dur']) for e in events if e.get('name') == 'model_run')[-calls:]
  nodes = [e for e in events if e.get('cat') == 'Node' and e.get('name', '').endswith('_kernel_time')]
  out = []
  for a, b in runs:
    out.append(
      [
        (onnx_kind(e['args'].get('op_name', '')), e['args'].get('op_name', ''), e['ts'], e['ts'] + e['dur'])
        for e in nodes
        if a <= e['ts'] and e['ts'] + e['dur'] <= b
      ]
    )
  return out


def profile_network(name: str, net: Stepper, batches, calls: int, seed: int = 0) -> list[dict]:
  """The rows of one network: both runtimes at each batch size, a row per graph."""
  rng = np.random.RandomState(seed)
  rows = []
  cpu, date = deploy_time.cpu_name(), datetime.date.today().isoformat()
  labels = ['start'] + [f'step{k}' for k in range(1, net.num_levels)]
  with tempfile.TemporaryDirectory() as d:
    export.save(net, d, format='onnx')
    for batch in batches:
      images = rng.randint(0, 256, (batch,) + tuple(net.input_shape)).astype(np.uint8)
      for runtime, graphs in (
        ('xla', profile_xla(net, jnp.asarray(images), calls)),
        ('onnxruntime', profile_onnxruntime(d, images, calls)),
      ):
        for graph, row in graphs.items():
          macs = batch * (sum(net.delta_macs) if graph == 'forward' else net.delta_macs[labels.index(graph)])
          rows.append(
            {
              'network': name,
              'runtime': runtime,
              'batch': batch,
              'graph': graph,
              'macs': int(macs),
              **row,
              'conv_gmacs_per_s': macs / row['ops_ms']['conv'] / 1e6 if row['ops_ms']['conv'] else None,
              'cpu': cpu,
              'date': date,
            }
          )
  return rows


def format_markdown(rows: list[dict]) -> str:
  """A table: per network, runtime, batch and graph, the wall time and where it went."""
  lines = [
    '| network | runtime | batch | graph | MMACs | wall ms | ' + ' | '.join(KINDS) + ' | outside ops | conv GMAC/s |',
    '|---|---|---|---|---|---|' + '---|' * (len(KINDS) + 2),
  ]
  for r in rows:
    kinds = ' | '.join(f'{r["ops_ms"][k]:.2f}' for k in KINDS)
    rate = '-' if r['conv_gmacs_per_s'] is None else f'{r["conv_gmacs_per_s"]:.1f}'
    lines.append(
      f'| {r["network"]} | {r["runtime"]} | {r["batch"]} | {r["graph"]} | {r["macs"] / 1e6:.1f} | '
      f'{r["wall_ms"]:.2f} | {kinds} | {r["outside_ms"]:.2f} | {rate} |'
    )
  return '\n'.join(lines) + '\n'


def _define_flags() -> None:
  flags.DEFINE_list('networks', ['lenet3c1l'], f'Untrained networks to profile: {", ".join(deploy_time.NETWORKS)}.')
  flags.DEFINE_multi_string('run', [], 'NAME=WORKDIR: also profile the trained run in WORKDIR under NAME.')
  flags.DEFINE_integer('levels', 4, 'Levels of the untrained networks.')
  flags.DEFINE_list('batches', ['256', '1'], 'Batch sizes.')
  flags.DEFINE_integer('calls', 10, 'Profiled calls of each graph.')
  flags.DEFINE_string(
    'json',
    None,
    'Write {"runs": [...]} here and a table beside it (.md); rows of another network, runtime or batch kept.',
  )


def main(argv) -> None:
  """The command: profiles every network, prints the table and each graph's costliest operations, writes ``--json``."""
  del argv
  f = flags.FLAGS
  rows = []
  for name, make in deploy_time.networks(f.networks, f.run, f.levels).items():
    rows += profile_network(name, make(), [int(b) for b in f.batches], f.calls)
  print(format_markdown(rows))
  for r in rows:
    top = ', '.join(f'{op} {t:.2f}' for op, t in r['top_ops_ms'].items())
    print(f'{r["network"]} {r["runtime"]} {r["batch"]} {r["graph"]}: {top}')
  if f.json:
    deploy_time.write_rows(f.json, rows, format_markdown)


def command() -> None:
  """``python -m stepnet_jax.studies.step_profile [--networks ...] [--run NAME=WORKDIR] --json FILE``."""
  cli.run_command(__name__, _define_flags, main)


if __name__ == '__main__':
  command()
