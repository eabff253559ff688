"""End-to-end: short real training runs, checkpoints, resuming, and the two scripts."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stepnet_jax
from stepnet_jax import checkpoint, config, data, train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'tiny.py')

pytestmark = pytest.mark.slow


def tiny_config(**overrides):
  spec = importlib.util.spec_from_file_location('tiny_config', TINY)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.progress = False
  for k, v in overrides.items():
    setattr(c, k, v)
  return config.from_dict(c)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory, fashion_mnist):
  cfg = tiny_config()
  assert (cfg.model, cfg.width, cfg.num_levels, cfg.train_subset, cfg.num_epochs) == ('lenet3c1l', 0.25, 3, 2048, 2)
  workdir = str(tmp_path_factory.mktemp('tiny'))
  result = train_lib.train_and_evaluate(cfg, workdir, dataset=fashion_mnist)
  return cfg, workdir, result


def test_tiny_run_learns_every_exit(tiny_run):
  cfg, _, result = tiny_run
  assert result['step'] == 2 * (2048 // cfg.batch_size)
  acc = result['test_accuracy']
  assert len(acc) == 3
  assert min(acc) > 0.4, acc                       # chance is 0.1
  for lo, hi in zip(acc, acc[1:]):
    assert hi >= lo - 0.02, acc                     # bigger subnets are not worse


def test_checkpoint_round_trip(tiny_run, fashion_mnist):
  """The restored network reproduces the accuracy the trainer measured on its in-memory state."""
  cfg, workdir, result = tiny_run
  net = stepnet_jax.load(workdir)
  assert net.num_levels == 3
  assert config.from_dict(net.meta['config']) == cfg
  test = data.subset(fashion_mnist, cfg.train_subset, cfg.test_subset, cfg.seed)
  assert len(test.test_labels) == 1000
  correct = np.zeros(3)
  for i in range(0, 1000, 500):
    pred = np.asarray(net.exits(jnp.asarray(test.test_images[i:i + 500]))).argmax(-1)
    correct += (pred == test.test_labels[i:i + 500][None]).sum(axis=1)
  np.testing.assert_allclose(correct / 1000, result['test_accuracy'], atol=1e-9)
  # Stepping the restored network gives the same logits as its one-pass exits.
  x = jnp.asarray(test.test_images[:8])
  exits = np.asarray(net.exits(x))
  cache = net.start(x)
  for k in range(3):
    if k:
      cache = net.advance(cache)
    np.testing.assert_allclose(cache.logits, exits[k], rtol=1e-5, atol=1e-4)
  # MACs of the restored structure match the trained one's assignment.
  sizes = dict(net.meta['model_meta']['assignment'])
  assert sum(sizes['conv1']) == 8 and len(sizes['conv3']) == 3


def _digits_config(**kw):
  c = config.base_config()
  c.update(dict(dataset='digits', model='mlp', width=0.25, num_levels=2, num_epochs=2, batch_size=64,
                learning_rate=3e-3, progress=False, log_every_steps=5))
  c.update(kw)
  return config.from_dict(c)


class _Interrupt(Exception):
  pass


def test_resume_continues_exactly(tmp_path, monkeypatch):
  """Interrupted after epoch 1, then restarted: identical to an uninterrupted run."""
  digits = data.load_digits()
  cfg = _digits_config()
  spe = len(digits.train_labels) // cfg.batch_size

  ref = train_lib.train_and_evaluate(cfg, str(tmp_path / 'ref'), dataset=digits)
  assert ref['step'] == 2 * spe
  assert min(ref['test_accuracy']) > 0.5

  workdir = str(tmp_path / 'resumed')
  real_save = checkpoint.save

  def save_then_crash(*args, **kwargs):
    real_save(*args, **kwargs)
    raise _Interrupt
  monkeypatch.setattr(checkpoint, 'save', save_then_crash)
  with pytest.raises(_Interrupt):
    train_lib.train_and_evaluate(cfg, workdir, dataset=digits)
  monkeypatch.setattr(checkpoint, 'save', real_save)
  assert checkpoint.latest_step(workdir) == spe

  resumed = train_lib.train_and_evaluate(cfg, workdir, dataset=digits)
  assert resumed['step'] == 2 * spe
  assert resumed['test_accuracy'] == ref['test_accuracy']
  a, b = stepnet_jax.load(str(tmp_path / 'ref')), stepnet_jax.load(workdir)
  for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  # Both checkpoints are kept; the epoch-1 one still restores.
  assert sorted(int(d) for d in os.listdir(checkpoint.checkpoint_dir(workdir)) if d.isdigit()) == [spe, 2 * spe]
  assert stepnet_jax.load(workdir, step=spe).num_levels == 2
  # metrics.jsonl continues: train steps increase across the restart, epochs 1 then 2.
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  steps = [r['step'] for r in rows if 'train/loss' in r]
  assert steps == sorted(set(steps)) and steps[0] <= spe < steps[-1] == 2 * spe
  assert [r['epoch'] for r in rows if 'epoch' in r] == [1, 2]


def test_resume_with_more_epochs(tmp_path):
  """Run 1 epoch, then ask for 2 in the same workdir: training continues from step spe."""
  digits = data.subset(data.load_digits(), train=640)
  workdir = str(tmp_path / 'run')
  first = train_lib.train_and_evaluate(_digits_config(num_epochs=1), workdir, dataset=digits)
  spe = 640 // 64
  assert first['step'] == spe
  second = train_lib.train_and_evaluate(_digits_config(num_epochs=2), workdir, dataset=digits)
  assert second['step'] == 2 * spe
  assert checkpoint.latest_step(workdir) == 2 * spe
  assert os.path.isdir(os.path.join(checkpoint.checkpoint_dir(workdir), str(spe)))
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  steps = [r['step'] for r in rows if 'train/loss' in r]
  assert steps == sorted(set(steps)) and steps[-1] == 2 * spe and min(steps) <= spe
  # A finished run restarted with the same config trains nothing more and reports the same accuracy.
  again = train_lib.train_and_evaluate(_digits_config(num_epochs=2), workdir, dataset=digits)
  assert again['step'] == 2 * spe and again['test_accuracy'] == second['test_accuracy']
  # Training time adds up over the sessions: each checkpoint holds the time so far.
  first_saved = checkpoint.restore_meta(workdir, spe)['train_seconds']
  second_saved = checkpoint.restore_meta(workdir, 2 * spe)['train_seconds']
  assert 0 < first_saved <= first['seconds'] and first_saved < second_saved <= second['seconds']
  assert second_saved <= again['seconds'] < second_saved + 60


@pytest.fixture(scope='module')
def one_epoch_digits_run(tmp_path_factory):
  """A finished 1-epoch run on 128 digits; tests copy its workdir before touching it."""
  digits = data.subset(data.load_digits(), train=128)
  workdir = str(tmp_path_factory.mktemp('digits_run'))
  train_lib.train_and_evaluate(_digits_config(num_epochs=1), workdir, dataset=digits)
  return digits, workdir


def test_resume_refuses_a_different_model(tmp_path, one_epoch_digits_run):
  digits, original = one_epoch_digits_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(original, workdir)
  with pytest.raises(ValueError):
    train_lib.train_and_evaluate(_digits_config(num_epochs=2, width=0.5), workdir, dataset=digits)
  assert checkpoint.latest_step(workdir) == 128 // 64


def test_resume_refuses_other_settings(tmp_path, one_epoch_digits_run):
  """Only num_epochs may change on resume; anything else names the differing keys."""
  digits, original = one_epoch_digits_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(original, workdir)
  with pytest.raises(ValueError, match='learning_rate, seed'):
    train_lib.train_and_evaluate(_digits_config(num_epochs=2, learning_rate=0.5, seed=3), workdir, dataset=digits)
  assert checkpoint.latest_step(workdir) == 128 // 64


def test_compare_refuses_a_left_run_of_other_settings(tmp_path, one_epoch_digits_run):
  """The comparison checks a method's leftover (e.g. interrupted) runs before training any."""
  from stepnet_jax import compare
  digits, original = one_epoch_digits_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(original, workdir)
  compare._refuse_other_settings(workdir, _digits_config(num_epochs=1))   # same: fine
  compare._refuse_other_settings(str(tmp_path / 'empty'), _digits_config(num_epochs=9))
  with pytest.raises(ValueError, match='num_epochs'):
    compare._refuse_other_settings(workdir, _digits_config(num_epochs=2))


def test_train_and_evaluate_scripts(tmp_path):
  workdir = str(tmp_path / 'run')
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
             # share this session's compilation cache (see conftest.py)
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  train = subprocess.run(
      [sys.executable, os.path.join(REPO, 'train.py'), f'--config={TINY}', f'--workdir={workdir}',
       '--config.train_subset=512', '--config.test_subset=200', '--config.num_epochs=1',
       '--config.progress=False'], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
  assert train.returncode == 0, train.stderr[-3000:]
  assert 'done: step 8' in train.stdout
  out_json, plot = str(tmp_path / 'levels.json'), str(tmp_path / 'levels.png')
  ev = subprocess.run(
      [sys.executable, os.path.join(REPO, 'evaluate.py'), f'--workdir={workdir}', f'--json={out_json}',
       f'--plot={plot}', '--test_subset=200', '--batch_size=100', '--latency_repeats=2'],
      cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
  assert ev.returncode == 0, ev.stderr[-3000:]
  with open(out_json) as f:
    result = json.load(f)
  rows = result['levels']
  assert [r['level'] for r in rows] == [0, 1, 2]
  for r in rows:
    assert set(r) >= {'level', 'macs', 'delta_macs', 'accuracy', 'latency_ms'}
    assert 0.0 <= r['accuracy'] <= 1.0 and r['latency_ms'] > 0 and r['delta_macs'] > 0
  np.testing.assert_array_equal([r['macs'] for r in rows], np.cumsum([r['delta_macs'] for r in rows]))
  with open(plot, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_refused_resume_leaves_the_run_description_alone(tmp_path, one_epoch_digits_run):
  """A resume refused because the model differs must not overwrite the run's config.json."""
  digits, original = one_epoch_digits_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(original, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    before = json.load(f)
  with pytest.raises(ValueError):
    train_lib.train_and_evaluate(_digits_config(num_epochs=2, width=0.5), workdir, dataset=digits)
  with open(os.path.join(workdir, 'config.json')) as f:
    after = json.load(f)
  assert after['model_meta'] == before['model_meta'], \
      'config.json now describes a model that is not in the checkpoint'
  assert after == before


# ------------------------------------------------------------------ pieces of the trainer (no training)


@pytest.mark.parametrize('overrides', [
    dict(num_levels=0), dict(exit_weights=(1.0, 1.0)), dict(exit_weights=(0.0, 0.0, 0.0)),
    dict(exit_weights=(1.0, -1.0, 1.0)), dict(level_widths=(0.5, 1.0)), dict(optimizer='lion'),
    dict(schedule='linear'), dict(batch_size=0), dict(num_epochs=-1), dict(no_such_key=1),
    dict(widen=0.0), dict(construct_rounds=0), dict(pretrain_epochs=-0.5), dict(importance_examples=0),
    dict(nonuniform_cycles=0), dict(recalibrate_batches=-1), dict(sandwich_widths=-1), dict(class_threshold=-1.0),
    dict(method='steppingnet', budgets=(0.1, 0.3, 0.6), allocation='uniform', rank_per_mac=True),
])
def test_config_validation(overrides):
  c = dict(config.base_config().to_dict(), num_levels=3)
  c.update(overrides)
  with pytest.raises(ValueError):
    config.from_dict(c)


def test_config_parses_sequences_and_assignment(tmp_path):
  p = tmp_path / 'a.json'
  p.write_text('{"conv1": [1, 2]}')
  c = config.from_dict(dict(num_levels=2, level_widths='(0.25, 1.0)', exit_weights=[1, 2], assignment=str(p)))
  assert c.level_widths == (0.25, 1.0) and c.exit_weights == (1.0, 2.0)
  assert c.assignment_dict() == {'conv1': [1, 2]}
  assert config.from_dict(dict(num_levels=3)).weights == (1.0, 1.0, 1.0)
  c = config.from_dict(dict(num_levels=2, assignment='{"fc1": [3, 4]}'))
  assert c.assignment_dict() == {'fc1': [3, 4]}


def test_learning_rate_schedules():
  spe, lr = 10, 0.5
  cos = train_lib.learning_rate_schedule(config.from_dict(dict(learning_rate=lr, num_epochs=4)), spe)
  for t in (0, 7, 20, 39, 40):
    np.testing.assert_allclose(float(cos(t)), lr * 0.5 * (1 + np.cos(np.pi * min(t, 40) / 40)), rtol=1e-5, atol=1e-7)
  warm = train_lib.learning_rate_schedule(
      config.from_dict(dict(learning_rate=lr, num_epochs=4, warmup_epochs=1.0)), spe)
  np.testing.assert_allclose([float(warm(t)) for t in (0, 5)], [0.0, lr / 2], rtol=1e-5)
  for t in (10, 25, 40):
    np.testing.assert_allclose(float(warm(t)), lr * 0.5 * (1 + np.cos(np.pi * (t - 10) / 30)), rtol=1e-5, atol=1e-7)
  step = train_lib.learning_rate_schedule(
      config.from_dict(dict(learning_rate=lr, num_epochs=4, schedule='step', step_decay_at=(0.5, 0.75))), spe)
  np.testing.assert_allclose([float(step(t)) for t in (0, 19, 21, 29, 31, 39)],
                             [lr, lr, lr * 0.1, lr * 0.1, lr * 0.01, lr * 0.01], rtol=1e-5)


def test_augment_is_a_shifted_possibly_flipped_crop():
  rng = np.random.RandomState(0)
  n = 32
  x = rng.randint(1, 256, (n, 8, 7, 2)).astype(np.uint8)
  out = np.asarray(train_lib.augment(jnp.asarray(x), jax.random.key(3), pad=2))
  assert out.shape == x.shape and out.dtype == x.dtype
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  flips, shifts = 0, set()
  for i in range(n):
    candidates = []
    for dy in range(5):
      for dx in range(5):
        crop = padded[i, dy:dy + 8, dx:dx + 7]
        candidates += [(crop, False, (dy, dx)), (crop[:, ::-1], True, (dy, dx))]
    matches = [(f, s) for c, f, s in candidates if np.array_equal(c, out[i])]
    assert matches, f'image {i} is not a crop of the padded input'
    flips += matches[0][0]
    shifts.add(matches[0][1])
  assert 4 <= flips <= n - 4          # about half are flipped
  assert len(shifts) >= 8             # offsets vary
