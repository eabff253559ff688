"""The benchmark runs end to end on a tiny model and reports what it claims; deploy_time's
rows combine and are written as documented."""

import json

import numpy as np
import pytest

from stepnet_jax.studies import bench
from stepnet_jax.studies.deploy_time import RATIOS, combine_processes, write_rows


def test_bench_runs_and_counts_only_each_levels_work():
  taps_rule = dict(bench.layers.TAPS_MAX_CHANNELS)
  r = bench.run('lenet3c1l', num_levels=3, batch=4, train_batch=4, width=0.5, repeats=1)
  assert len(r['stepping']['step_ms']) == 3
  assert np.isclose(r['stepping']['sum_steps_ms'], sum(r['stepping']['step_ms']))
  fastest = min(r['stepping']['masked_forward_ms'], r['stepping']['blocked_forward_ms'])
  assert np.isclose(r['stepping']['ratio'], r['stepping']['sum_steps_ms'] / fastest)
  # Each compiled step's FLOPs are its own level's multiply-adds, within the README's target
  # 0.9 .. 1.2 (BN, ReLU and pooling add a little; observed 1.11 / 1.04 / 1.03 here).
  assert all(0.9 <= x <= 1.2 for x in r['flops']['ratio']), r['flops']['ratio']
  assert r['train']['flops_ratio'] <= 1.15, r['train']  # joint vs single-exit train step
  assert r['flops']['masked_top_forward_ratio_to_kept'] > 1.0  # the masked forward computes the zeros
  assert len(r['conv_layer']['block_ms']) == 3
  assert r['train']['images_per_sec'] > 0
  report = bench.format_report(r)
  assert all(f'L{k} ' in report for k in range(3)) and '(d) conv2' in report and '(e) conv1' in report
  assert len(r['first_conv']['taps_block_ms']) == len(r['first_conv']['library_block_ms']) == 3
  assert bench.layers.TAPS_MAX_CHANNELS == taps_rule  # the timing put the default back


def test_valid_tap_macs_match_a_convolution_of_ones():
  """Taps on real inputs, counted by convolving an all-ones image with an all-ones
  kernel (SAME zero padding contributes nothing), times the layer's connections."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from stepnet_jax.core import layers
  from stepnet_jax.models import zoo

  model = nnx.eval_shape(
    lambda: zoo.build_model('vgg16', num_classes=10, input_shape=(32, 32, 3), num_levels=1, width=0.0625)
  )
  expected, shape = 0, (32, 32, 3)
  for unit in model.units:
    macs, out_shape = unit.delta_macs(shape)
    if isinstance(unit, layers.LevelConv):
      k = unit.kernel_size
      taps = jax.lax.conv_general_dilated(
        jnp.ones((1, shape[0], shape[1], 1)),
        jnp.ones((k, k, 1, 1)),
        (unit.stride, unit.stride),
        unit.padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      )
      expected += float(taps.sum()) * int(unit.conn.kept_connections().sum())
    else:
      expected += float(macs.sum())
    shape = out_shape
  expected += float(model.delta_macs()[-1].sum())  # the head
  got = bench.valid_tap_macs(model)
  assert np.isclose(got.sum(), expected) and got.sum() < model.delta_macs().sum()


def test_bench_command_line(tmp_path):
  """python -m stepnet_jax.bench takes absl flags (the README's spelling) and writes its JSON;
  importing the module defines no flags."""
  import json
  import os
  import subprocess
  import sys

  from absl import flags

  assert 'json' not in flags.FLAGS and 'model' not in flags.FLAGS
  out = tmp_path / 'bench.json'
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'stepnet_jax.studies.bench',
      '--model',
      'mlp',
      '--levels',
      '2',
      '--width',
      '0.25',
      '--batch',
      '2',
      '--train_batch',
      '2',
      '--repeats',
      '1',
      f'--json={out}',
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  r = json.loads(out.read_text())
  assert r['model'] == 'mlp' and r['num_levels'] == 2 and len(r['stepping']['step_ms']) == 2


def test_a_command_without_a_config_ends_a_failure_in_one_line(tmp_path):
  """The commands with flags of their own (the benchmarks, the sequence replay: one entry point,
  cli.run_command) end a run that is not there as train.py does: status 1 and the one-line
  message naming the fix, no traceback."""
  import os
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get('PYTHONPATH', ''))
  args = ['stepnet_jax.studies.sequences', '--workdir', 'no_such_run', '--json', 'x.json']
  proc = subprocess.run(
    [sys.executable, '-m', *args], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
  )
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(f'error: no checkpoint in {tmp_path / "no_such_run"}'), (
    proc.stderr[-2000:]
  )
  assert not (tmp_path / 'x.json').exists()


def test_timings_from_several_processes_combine_into_medians_with_their_range():
  """deploy_time --processes: one row per network, runtime and batch, each ratio the median
  of the processes' values, with [min, max]; a row missing from a process is refused."""
  rng = np.random.RandomState(0)

  def row(runtime, batch):
    return {'network': 'n', 'runtime': runtime, 'batch': batch, 'level0_mac_fraction': 0.1} | {
      k: float(rng.rand()) for k in RATIOS
    }

  runs = [[row('xla', 1), row('onnxruntime', 1)] for _ in range(5)]
  combined = combine_processes(runs)
  assert [(r['runtime'], r['processes']) for r in combined] == [('xla', 5), ('onnxruntime', 5)]
  for i, r in enumerate(combined):
    for key in RATIOS:
      values = sorted(run[i][key] for run in runs)
      assert r[key] == values[2] and r[f'{key}_range'] == [values[0], values[-1]]
  with pytest.raises(ValueError, match='in 1 of 2 runs'):
    combine_processes([[row('xla', 1)], [row('xla', 256)]])


def test_written_timing_rows_replace_their_own_group_and_keep_the_others(tmp_path):
  """deploy_time.write_rows: new rows replace every old row of their network, runtime and batch
  (all its graphs, e.g. a step that a network with fewer levels no longer has); rows of
  another runtime or batch stay; the file is sorted by network, batch (largest first) and
  runtime, a group's rows in the order given."""
  path = str(tmp_path / 'rows.json')

  def rows(runtime, batch, graphs, tag):
    return [{'network': 'n', 'runtime': runtime, 'batch': batch, 'graph': g, 'tag': tag} for g in graphs]

  old = rows('onnxruntime', 1, ['start', 'step1', 'step2', 'forward'], 'old') + rows('xla', 1, ['start'], 'old')
  old += rows('xla', 256, ['start'], 'old')
  write_rows(path, old, lambda rs: '')
  write_rows(path, rows('onnxruntime', 1, ['start', 'step1', 'forward'], 'new'), lambda rs: '')
  with open(path) as fh:
    got = [(r['runtime'], r['batch'], r['graph'], r['tag']) for r in json.load(fh)['runs']]
  assert got == [
    ('xla', 256, 'start', 'old'),
    ('xla', 1, 'start', 'old'),
    ('onnxruntime', 1, 'start', 'new'),
    ('onnxruntime', 1, 'step1', 'new'),
    ('onnxruntime', 1, 'forward', 'new'),
  ]
