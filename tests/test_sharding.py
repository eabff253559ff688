"""Data parallelism on simulated CPU devices (``--xla_force_host_platform_device_count``),
each device count in its own process: a 4-device train step (and importance scores, whose
batches are padded) equals the 1-device one on the same global batch, a short run and its
evaluation agree, and a checkpoint written on 4 devices restores on 1 and on 2.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
import stepnet_jax
from stepnet_jax import cli
from stepnet_jax import config
from stepnet_jax.data import datasets
from stepnet_jax.data import feed
from stepnet_jax.training import losses
from stepnet_jax.data import sharding
from stepnet_jax.training import optim, run
from stepnet_jax.training import step as step_lib

mode, workdir = sys.argv[1], sys.argv[2]
out = {'devices': jax.device_count(), 'mesh': sharding.describe()}
cfg = config.from_dict({'data': {'name': 'digits', 'train_subset': 512, 'test_subset': 202},
                        'model': {'name': 'mlp', 'width': 0.125, 'num_levels': 3},
                        'train': {'num_epochs': 2, 'batch_size': 64, 'eval_batch_size': 100, 'progress': False},
                        'optim': {'name': 'sgd', 'learning_rate': 0.1}})   # Adam's first step is sign(g): too touchy
if mode == 'train':
  # One step from the same initial state on the same global batch.
  dataset, steps = run.prepare_data(cfg)
  model = run.build_model(cfg, dataset)
  # Importance scores: class batches of ~51 and a last Taylor batch of 12 do not split over
  # 4 devices, so they are padded (and the padding must not count).
  from stepnet_jax.methods import importance
  x, y = dataset.train_images[:412], dataset.train_labels[:412]
  scores = {m: importance.importance(model, x, y, method=m, weights=(1.0, 1.0, 1.0), num_classes=10,
                                        batch_size=100) for m in ('taylor', 'class')}
  np.savez(workdir + '.importance.npz', **{f'{m}/{k}': v for m, s in scores.items() for k, v in s.items()})
  tx = optim.make_optimizer(cfg, steps)
  graphdef, state = step_lib.init_state(model, tx)
  batch = next(feed.device_batches(dataset.train_images, dataset.train_labels, [np.arange(64)]))
  out['batch_shards'] = len(batch.images.sharding.device_set)
  state, metrics = run.config_train_step(graphdef, tx, cfg)(state, batch)
  out['state_devices'] = len(jax.tree.leaves(state.params)[0].sharding.device_set)
  np.savez(workdir + '.step.npz', *[np.asarray(a) for a in jax.tree.leaves(state)])
  out['loss'] = float(metrics['loss'])
  # A short run, evaluated (the test split of 202 is not a multiple of 4: padding).
  out['result'] = run.train_and_evaluate(cfg, workdir)
else:
  net = stepnet_jax.load(workdir)
  dataset, _ = run.prepare_data(cfg)
  from stepnet_jax.inference import evaluation
  from stepnet_jax.studies import reports
  out['accuracy'] = evaluation.exit_accuracy(net.functions.exits, net.variables, dataset.test_images,
                                             dataset.test_labels, 100).tolist()
  np.savez(workdir + f'.restored{jax.device_count()}.npz', *[np.asarray(a) for a in jax.tree.leaves(net.variables)])
print('RESULT ' + json.dumps(out))
"""


# Subprocesses share this session's compilation cache (see conftest.py).
ENV = {
  **os.environ,
  'JAX_PLATFORMS': 'cpu',
  'JAX_COMPILATION_CACHE_DIR': jax.config.jax_compilation_cache_dir,
  'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
}


def _with_devices(devices: int) -> dict:
  """ENV with ``devices`` simulated CPU devices, appended to the session's XLA_FLAGS."""
  return {**ENV, 'XLA_FLAGS': f'{ENV.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={devices}'}


def _run(devices: int, *args: str) -> dict:
  env = _with_devices(devices)
  proc = subprocess.run(
    [sys.executable, '-c', SCRIPT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT ') :])


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('sharding')
  four = _run(4, 'train', str(root / 'four'))
  one = _run(1, 'train', str(root / 'one'))
  return root, four, one


def test_four_devices_compute_the_one_device_step(runs):
  root, four, one = runs
  assert four['devices'] == 4 and one['devices'] == 1
  assert 'data=4' in four['mesh']
  assert four['batch_shards'] == 4 and four['state_devices'] == 4  # batch split, state replicated
  a, b = np.load(root / 'four.step.npz'), np.load(root / 'one.step.npz')
  assert a.files == b.files
  for k in a.files:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert abs(four['loss'] - one['loss']) < 1e-5
  a, b = np.load(root / 'four.importance.npz'), np.load(root / 'one.importance.npz')
  assert a.files == b.files and any(k.startswith('class/') for k in a.files)
  for k in a.files:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_a_short_run_and_its_evaluation_agree(runs):
  _, four, one = runs
  np.testing.assert_allclose(four['result']['test_accuracy'], one['result']['test_accuracy'], atol=1 / 202 + 1e-9)


@pytest.mark.parametrize('devices', [1, 2])
def test_a_four_device_checkpoint_restores_on_fewer(runs, devices):
  root, four, _ = runs
  restored = _run(devices, 'restore', str(root / 'four'))
  assert restored['accuracy'] == four['result']['test_accuracy']


def test_a_batch_that_does_not_split_is_refused_before_anything_runs():
  proc = subprocess.run(
    [
      sys.executable,
      '-c',
      'from stepnet_jax import config; from stepnet_jax.training import run; '
      'run.prepare_data(config.from_dict({"data": {"name": "digits"}, "train": {"batch_size": 30}}))',
    ],
    env=_with_devices(4),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode != 0
  assert 'train.batch_size=30 does not divide by the 4 devices' in proc.stderr


def test_two_hosts_train_what_one_host_trains(tmp_path, runs):
  """Two processes on this machine joined by ``jax.distributed`` (each host reads its half
  of every batch; only the first writes metrics and descriptions, both share the
  checkpoint) end with the test accuracies of the one-process run of the same settings."""
  import socket

  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  _, _, one = runs
  args = [
    'train.py',
    '--config',
    'configs/tiny.py',
    '--workdir',
    str(tmp_path / 'two'),  # the SCRIPT's settings
    '--config.data.name=digits',
    '--config.data.train_subset=512',
    '--config.data.test_subset=202',
    '--config.model.name=mlp',
    '--config.model.width=0.125',
    '--config.train.num_epochs=2',
    '--config.train.batch_size=64',
    '--config.train.eval_batch_size=100',
    '--config.train.progress=False',
    '--config.optim.name=sgd',
    '--config.optim.learning_rate=0.1',
  ]
  env = {**ENV, 'JAX_COORDINATOR_ADDRESS': f'localhost:{port}', 'JAX_NUM_PROCESSES': '2'}
  hosts = [
    subprocess.Popen(
      [sys.executable, *args],
      cwd=REPO,
      text=True,
      env={**env, 'JAX_PROCESS_ID': str(i)},
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
    )
    for i in range(2)
  ]
  try:
    outs = [h.communicate(timeout=200) for h in hosts]
  finally:
    for h in hosts:
      h.kill()
  assert all(h.returncode == 0 for h in hosts), outs[0][1][-3000:]
  assert '2 cpu device(s) on 2 host(s)' in outs[0][0]
  expected = 'test accuracy per level ' + ' '.join(f'{a:.4f}' for a in one['result']['test_accuracy'])
  for out, _ in outs:
    assert expected in [ln for ln in out.splitlines() if ln.startswith('done:')][-1], (out[-500:], expected)
