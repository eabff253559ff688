"""End-to-end: short real training runs, checkpoints, resuming, and the two scripts."""

import dataclasses
import errno
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
from stepnet_jax import cli, config, registry
from stepnet_jax.data import datasets
from stepnet_jax.inference import restore
from stepnet_jax.methods import trainers
from stepnet_jax.training import loop, optim, run
from stepnet_jax.training import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'tiny.py')

pytestmark = pytest.mark.slow


def tiny_config(**overrides):
  c = config.load_file(TINY)
  c.train.progress = False
  return config.from_dict(config.merge(c.to_dict(), config.nest(overrides)))


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory, fashion_mnist):
  cfg = tiny_config()
  m = cfg.model
  assert (m.name, m.width, m.num_levels, cfg.data.train_subset, cfg.train.num_epochs) == ('lenet3c1l', 0.25, 3, 2048, 2)
  workdir = str(tmp_path_factory.mktemp('tiny'))
  result = run.train_and_evaluate(cfg, workdir, dataset=fashion_mnist)
  return cfg, workdir, result


def test_tiny_run_learns_every_exit(tiny_run):
  cfg, _, result = tiny_run
  assert result['step'] == 2 * (2048 // cfg.train.batch_size)
  acc = result['test_accuracy']
  assert len(acc) == 3
  # Observed 0.555 / 0.646 / 0.680 (chance 0.1); floors a few points below, exits increasing.
  assert np.all(np.asarray(acc) >= [0.52, 0.61, 0.65]), acc
  assert acc[0] < acc[1] < acc[2], acc


def test_checkpoint_round_trip(tiny_run, fashion_mnist):
  """The restored network reproduces the accuracy the trainer measured on its in-memory state."""
  cfg, workdir, result = tiny_run
  net = stepnet_jax.load(workdir)
  assert net.num_levels == 3
  assert config.from_saved(net.meta['config']) == cfg
  test = datasets.subset(fashion_mnist, cfg.data.train_subset, cfg.data.test_subset, cfg.seed)
  assert len(test.test_labels) == 1000
  correct = np.zeros(3)
  for i in range(0, 1000, 500):
    pred = np.asarray(net.exits(jnp.asarray(test.test_images[i : i + 500]))).argmax(-1)
    correct += (pred == test.test_labels[i : i + 500][None]).sum(axis=1)
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
  """A 2-level MLP on the digits; ``kw`` overrides dotted keys (``**{'model.width': 0.5}``)."""
  return config.from_dict(
    {
      'data.name': 'digits',
      'model.name': 'mlp',
      'model.width': 0.25,
      'model.num_levels': 2,
      'train.num_epochs': 2,
      'train.batch_size': 64,
      'optim.learning_rate': 3e-3,
      'train.progress': False,
      'train.log_every_steps': 5,
      **kw,
    }
  )


class _Interrupt(Exception):
  pass


def test_resume_continues_exactly(tmp_path, monkeypatch):
  """Interrupted after epoch 1, then restarted: identical to an uninterrupted run."""
  digits = datasets.load_digits()
  cfg = _digits_config()
  spe = len(digits.train_labels) // cfg.train.batch_size

  ref = run.train_and_evaluate(cfg, str(tmp_path / 'ref'), dataset=digits)
  assert ref['step'] == 2 * spe
  acc = ref['test_accuracy']  # observed 0.797 / 0.889
  assert acc[0] >= 0.75 and acc[1] >= 0.85 and acc[0] < acc[1], acc

  workdir = str(tmp_path / 'resumed')
  real_save = run.checkpoints.save

  def save_then_crash(*args, **kwargs):
    real_save(*args, **kwargs)
    raise _Interrupt

  monkeypatch.setattr(run.checkpoints, 'save', save_then_crash)
  with pytest.raises(_Interrupt):
    run.train_and_evaluate(cfg, workdir, dataset=digits)
  monkeypatch.setattr(run.checkpoints, 'save', real_save)
  assert restore.latest_step(workdir) == spe

  resumed = run.train_and_evaluate(cfg, workdir, dataset=digits)
  assert resumed['step'] == 2 * spe
  assert resumed['test_accuracy'] == ref['test_accuracy']
  a, b = stepnet_jax.load(str(tmp_path / 'ref')), stepnet_jax.load(workdir)
  for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  # Both checkpoints are kept; the epoch-1 one still restores.
  assert sorted(int(d) for d in os.listdir(restore.checkpoint_dir(workdir)) if d.isdigit()) == [spe, 2 * spe]
  assert stepnet_jax.load(workdir, step=spe).num_levels == 2
  # metrics.jsonl continues: train steps increase across the restart, epochs 1 then 2.
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  steps = [r['step'] for r in rows if 'train/loss' in r]
  assert steps == sorted(set(steps)) and steps[0] <= spe < steps[-1] == 2 * spe
  assert [r['epoch'] for r in rows if 'epoch' in r] == [1, 2]


def test_resume_with_more_epochs(tmp_path):
  """Run 1 epoch, then ask for 2 in the same workdir: training continues from step spe."""
  digits = datasets.subset(datasets.load_digits(), train=640)
  workdir = str(tmp_path / 'run')
  first = run.train_and_evaluate(_digits_config(**{'train.num_epochs': 1}), workdir, dataset=digits)
  spe = 640 // 64
  assert first['step'] == spe
  second = run.train_and_evaluate(_digits_config(**{'train.num_epochs': 2}), workdir, dataset=digits)
  assert second['step'] == 2 * spe
  assert restore.latest_step(workdir) == 2 * spe
  assert os.path.isdir(os.path.join(restore.checkpoint_dir(workdir), str(spe)))
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  steps = [r['step'] for r in rows if 'train/loss' in r]
  assert steps == sorted(set(steps)) and steps[-1] == 2 * spe and min(steps) <= spe
  # A finished run restarted with the same config trains nothing more and reports the same accuracy.
  again = run.train_and_evaluate(_digits_config(**{'train.num_epochs': 2}), workdir, dataset=digits)
  assert again['step'] == 2 * spe and again['test_accuracy'] == second['test_accuracy']
  # Training time adds up over the sessions: each checkpoint holds the time so far.
  first_saved = restore.restore_meta(workdir, spe)['train_seconds']
  second_saved = restore.restore_meta(workdir, 2 * spe)['train_seconds']
  assert 0 < first_saved <= first['seconds'] and first_saved < second_saved <= second['seconds']
  assert second_saved <= again['seconds'] < second_saved + 60


@pytest.fixture(scope='module')
def one_epoch_digits_run(tmp_path_factory):
  """A finished 1-epoch run on 128 digits; tests copy its workdir before touching it."""
  digits = datasets.subset(datasets.load_digits(), train=128)
  workdir = str(tmp_path_factory.mktemp('digits_run'))
  run.train_and_evaluate(_digits_config(**{'train.num_epochs': 1}), workdir, dataset=digits)
  return digits, workdir


def test_resume_refuses_a_different_model(tmp_path, one_epoch_digits_run):
  digits, original = one_epoch_digits_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(original, workdir)
  with pytest.raises(ValueError):
    run.train_and_evaluate(_digits_config(**{'train.num_epochs': 2, 'model.width': 0.5}), workdir, dataset=digits)
  assert restore.latest_step(workdir) == 128 // 64


def test_resume_refuses_other_settings(tmp_path, one_epoch_digits_run):
  """Only num_epochs may change on resume; anything else names the differing keys."""
  digits, original = one_epoch_digits_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(original, workdir)
  with pytest.raises(ValueError, match='learning_rate, seed'):
    run.train_and_evaluate(
      _digits_config(**{'train.num_epochs': 2, 'optim.learning_rate': 0.5, 'seed': 3}), workdir, dataset=digits
    )
  assert restore.latest_step(workdir) == 128 // 64


def test_check_workdir_names_what_differs_and_allows_only_what_it_is_told(tmp_path, one_epoch_digits_run):
  """The one compatibility check: other settings are named; ``may_change`` keys pass."""
  digits, original = one_epoch_digits_run
  assert run.check_workdir(original, _digits_config(**{'train.num_epochs': 1}))['steps_per_epoch'] == 2
  assert run.check_workdir(str(tmp_path / 'empty'), _digits_config(**{'train.num_epochs': 9})) is None
  assert run.check_workdir(original, _digits_config(**{'train.progress': True, 'train.num_epochs': 1}))  # reporting
  with pytest.raises(ValueError, match=r'other settings \(train.num_epochs\)'):
    run.check_workdir(original, _digits_config(**{'train.num_epochs': 2}))
  assert run.check_workdir(original, _digits_config(**{'train.num_epochs': 2}), may_change=run.RESUMABLE_KEYS)
  with pytest.raises(ValueError, match=r'other settings \(model.width, optim.learning_rate\)'):
    run.check_workdir(
      original, _digits_config(**{'model.width': 0.5, 'optim.learning_rate': 1.0}), may_change=run.RESUMABLE_KEYS
    )


@pytest.mark.parametrize('damage', ['truncated', 'flipped', 'swapped'])
def test_an_unreadable_checkpoint_is_named_and_the_previous_one_used_on_request(tmp_path, capsys, damage):
  """A newest checkpoint whose array files were cut short, had bytes flipped, or hold valid
  arrays that are not the ones saved with its meta (bit rot that decodes: orbax reads it
  without complaint, the checksums recorded at save catch it): an error naming it, for a
  load and for a resume, nothing deleted; with ``restore_previous`` the run resumes from
  the one before and trains on."""
  digits = datasets.load_digits()
  cfg = _digits_config()
  spe = len(digits.train_labels) // cfg.train.batch_size
  workdir = str(tmp_path / 'run')
  run.train_and_evaluate(cfg, workdir, dataset=digits)
  newest = os.path.join(restore.checkpoint_dir(workdir), str(2 * spe))
  data = [
    os.path.join(root, name)
    for root, _, files in os.walk(os.path.join(newest, 'model'))
    for name in files
    if root.endswith('d') and os.path.getsize(os.path.join(root, name)) > 8
  ]
  if damage == 'truncated':
    for path in data:
      os.truncate(path, os.path.getsize(path) // 2)  # a save cut short
  elif damage == 'flipped':  # bit rot in the largest data file (the kernels)
    path = max(data, key=os.path.getsize)
    content = bytearray(open(path, 'rb').read())
    for offset in (len(content) // 3, len(content) // 2, 2 * len(content) // 3):
      content[offset] ^= 0x55
    open(path, 'wb').write(bytes(content))
  else:  # the epoch-1 meta (and its checksums) beside the epoch-2 arrays
    shutil.rmtree(os.path.join(newest, 'meta'))
    shutil.copytree(os.path.join(restore.checkpoint_dir(workdir), str(spe), 'meta'), os.path.join(newest, 'meta'))
  message = (
    f'checkpoint {newest} '
    + {
      'truncated': 'cannot be read',
      'flipped': '(cannot be read|is corrupted)',  # which one depends on where the flips land
      'swapped': 'is corrupted: the model arrays',
    }[damage]
  )
  with pytest.raises(restore.CheckpointError, match=message):
    stepnet_jax.load(workdir)
  longer = cfg.replace(**{'train.num_epochs': 3})
  with pytest.raises(restore.CheckpointError, match=message):
    run.train_and_evaluate(longer, workdir, dataset=digits)
  assert restore.all_steps(workdir) == [2 * spe, spe]  # nothing deleted
  capsys.readouterr()
  out = run.train_and_evaluate(longer, workdir, dataset=digits, restore_previous=True)
  assert f'Resuming from step {spe} ' in capsys.readouterr().out
  assert out['step'] == 3 * spe
  assert os.path.isdir(os.path.join(workdir, 'unreadable_checkpoints', str(2 * spe)))  # kept aside


def test_setting_aside_a_step_twice_keeps_both(tmp_path):
  """A second --restore_previous that sets aside the same step again (the run wrote it again,
  unreadable again) keeps both copies instead of failing with 'Directory not empty'."""
  from stepnet_jax.training import checkpoints

  workdir = str(tmp_path)
  for content in ('first', 'second'):
    os.makedirs(os.path.join(restore.checkpoint_dir(workdir), '8'))
    with open(os.path.join(restore.checkpoint_dir(workdir), '8', 'x'), 'w') as f:
      f.write(content)
    checkpoints.set_aside(workdir, [8])
  aside = os.path.join(workdir, 'unreadable_checkpoints')
  assert sorted(os.listdir(aside)) == ['8', '8.1']
  assert [open(os.path.join(aside, n, 'x')).read() for n in ('8', '8.1')] == ['first', 'second']


def test_train_and_evaluate_scripts(tmp_path):
  workdir = str(tmp_path / 'run')
  env = dict(
    os.environ,
    PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
    # share this session's compilation cache (see conftest.py)
    JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
  )

  def command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
      [sys.executable, *args], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600
    )

  train = command(
    os.path.join(REPO, 'train.py'),
    f'--config={TINY}',
    f'--workdir={workdir}',
    '--config.data.train_subset=512',
    '--config.data.test_subset=200',
    '--config.train.num_epochs=1',
    '--config.train.progress=False',
  )
  assert train.returncode == 0, train.stderr[-3000:]
  assert 'done: step 8' in train.stdout
  old = command(os.path.join(REPO, 'train.py'), f'--config={TINY}', f'--workdir={workdir}', '--config.num_epochs=1')
  assert old.returncode != 0 and 'is now spelled --config.train.num_epochs=1' in old.stderr, old.stderr[-2000:]
  out_json, plot = str(tmp_path / 'levels.json'), str(tmp_path / 'levels.png')
  ev = command(
    os.path.join(REPO, 'evaluate.py'),
    f'--workdir={workdir}',
    f'--json={out_json}',
    f'--plot={plot}',
    '--test_subset=200',
    '--batch_size=100',
    '--latency_repeats=2',
    '--policy=confidence',
    '--knobs=0.0,2.0',
  )
  assert ev.returncode == 0, ev.stderr[-3000:]
  # The policy sweep: threshold 0 stops every input at level 0, 2 (never reached) at the top.
  sweep = ev.stdout[ev.stdout.index('policy confidence') :].splitlines()
  assert sweep[3].split()[-3:] == ['1.00', '0.00', '0.00'] and sweep[4].split()[-3:] == ['0.00', '0.00', '1.00']
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
  # Quantized evaluation: 4-bit weights and 8-bit activations on 8-bit images cost 32 bit-ops per MAC.
  quantized = command(
    os.path.join(REPO, 'evaluate.py'),
    f'--workdir={workdir}',
    f'--json={out_json}',
    '--test_subset=200',
    '--batch_size=100',
    '--latency_repeats=1',
    '--bits=4',
    '--act_bits=8',
    '--calibration_images=200',
    '--step=8',
  )
  assert quantized.returncode == 0, quantized.stderr[-3000:]
  assert f'checkpoint 8 of {workdir}' in quantized.stdout
  assert 'MAC-weighted mean weight bits 4.00' in quantized.stdout, quantized.stdout[-2000:]
  with open(out_json) as f:
    result = json.load(f)
  assert result['precision']['act_bits'] == 8
  assert [r['bitops_to_reach'] for r in result['levels']] == [32 * r['macs'] for r in result['levels']]
  # A usage error: a latency batch of 0 (a run without a validation split has no --best:
  # restore.best_step is None, tests/test_checkpoints.py).
  bad = command(os.path.join(REPO, 'evaluate.py'), f'--workdir={workdir}', '--latency_batch=0')
  assert bad.returncode != 0 and 'must be >= 1, got 0' in bad.stderr, bad.stderr[-2000:]
  # Usage errors, before anything is loaded: a NaN knob (it printed a 'nan' operating point),
  # a latency batch larger than the images it would time (it was labelled B=1000000), and an
  # output inside a run (it overwrote a checkpoint's metadata).
  meta = os.path.join(workdir, 'checkpoints', str(restore.latest_step(workdir)), 'meta', 'metadata')
  for args, message in (
    ([f'--json={meta}'], f'--json: {meta} is inside the run {workdir} (checkpoints belongs to it)'),
    ([f'--plot={os.path.join(workdir, "config.json")}'], 'config.json belongs to it'),
    (
      ['--policy=confidence', '--knobs=0.9,nan'],
      "--knobs takes numbers (thresholds, or MAC budgets for macs), got 'nan'",
    ),
    (['--latency_batch=1000000', '--test_subset=50'], '--latency_batch 1000000 is more than the 50 test images'),
  ):
    bad = command(os.path.join(REPO, 'evaluate.py'), f'--workdir={workdir}', *args)
    assert bad.returncode != 0 and message in bad.stderr, bad.stderr[-2000:]
  # Metadata that is valid JSON but not a checkpoint's: resuming fails with the project's
  # message as the last line of the output (not orbax's shutdown noise after it), status 1.
  newest = restore.latest_step(workdir)
  with open(os.path.join(workdir, 'checkpoints', str(newest), 'meta', 'metadata'), 'w') as f:
    json.dump({'written': 'by something else'}, f)
  resume = command(
    os.path.join(REPO, 'train.py'),
    f'--config={TINY}',
    f'--workdir={workdir}',
    '--config.data.train_subset=512',
    '--config.data.test_subset=200',
    '--config.train.num_epochs=2',
    '--config.train.progress=False',
  )
  last = resume.stderr.strip().splitlines()[-1]
  assert resume.returncode == 1 and last.startswith(f'error: checkpoint {workdir}/checkpoints/{newest} has metadata'), (
    resume.stderr[-2000:]
  )


def test_refused_resume_leaves_the_run_description_alone(tmp_path, one_epoch_digits_run):
  """A resume refused because the model differs must not overwrite the run's config.json."""
  digits, original = one_epoch_digits_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(original, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    before = json.load(f)
  with pytest.raises(ValueError):
    run.train_and_evaluate(_digits_config(**{'train.num_epochs': 2, 'model.width': 0.5}), workdir, dataset=digits)
  with open(os.path.join(workdir, 'config.json')) as f:
    after = json.load(f)
  assert after['model_meta'] == before['model_meta'], 'config.json now describes a model that is not in the checkpoint'
  assert after == before


# ------------------------------------------------------------------ pieces of the trainer (no training)


@pytest.mark.parametrize(
  'overrides,message',
  [
    ({'model.num_levels': 0}, 'num_levels must be >= 1'),
    ({'loss.exit_weights': (1.0, 1.0)}, 'exit_weights has 2 entries for 3 levels'),
    ({'loss.exit_weights': (0.0, 0.0, 0.0)}, 'positive sum'),
    ({'loss.exit_weights': (1.0, -1.0, 1.0)}, 'non-negative'),
    ({'model.level_widths': (0.5, 1.0)}, 'level_widths has 2 entries'),
    ({'model.name': 'resnet99'}, "unknown model 'resnet99'; choose from mlp, lenet3c1l, lenet5, vgg16, resnet20"),
    ({'method': 'magic'}, "unknown method 'magic'; choose from joint, steppingnet, nonuniform"),
    ({'optim.name': 'lion'}, "unknown optimizer 'lion'; choose from adam, adamw, sgd"),
    ({'optim.schedule': 'linear'}, "unknown schedule 'linear'; choose from cosine, step, constant"),
    ({'loss.objective': 'hinge'}, "unknown objective 'hinge'; choose from multi_exit, sandwich"),
    ({'loss.objective': 'sandwich'}, 'needs model.triangular=True'),
    ({'no_such_key': 1}, r"unknown config keys: \['no_such_key'\]"),
    ({'model.no_such_key': 1}, r"unknown config keys: \['model.no_such_key'\]"),
    ({'num_epochs': 3}, r"unknown config keys: \['num_epochs'\]"),  # the flat spelling of older versions
    ({'train.batch_size': 0}, 'train.batch_size must be >= 1'),
    ({'train.num_epochs': 0}, 'train.num_epochs must be >= 1'),
    ({'optim.learning_rate': -0.1}, 'optim.learning_rate must be > 0'),
    ({'model.width': 0.0}, 'model.width must be > 0'),
    ({'data.train_subset': -5}, 'data.train_subset must be >= 0'),
    ({'train.log_every_steps': 0}, 'train.log_every_steps must be >= 1'),
    ({'train.eval_batch_size': 0}, 'train.eval_batch_size must be >= 1'),
    ({'train.keep_checkpoints': 0}, 'train.keep_checkpoints must be >= 1'),
    ({'optim.momentum': 1.0}, 'optim.momentum must be < 1'),
    ({'loss.distill_temperature': 0.0}, 'distill_temperature must be > 0'),
    ({'model.level_widths': (0.5, 0.4, 1.0)}, 'level_widths must be positive and strictly increasing'),
    ({'model.level_widths': (0.5, 0.75, 1.5)}, 'the last must be <= 1'),
    ({'method': 'steppingnet', 'construction.budgets': (0.1, 0.6, 0.3)}, 'budgets must be positive and strictly'),
    ({'construction.widen': 0.0}, 'construction.widen must be > 0'),
    ({'construction.rounds': 0}, 'construction.rounds must be >= 1'),
    ({'construction.pretrain_epochs': -0.5}, 'pretrain_epochs must be >= 0'),
    ({'construction.importance_examples': 0}, 'importance_examples must be >= 1'),
    ({'construction.importance': 'random'}, "unknown importance 'random'"),
    ({'construction.allocation': 'greedy'}, "unknown construction.allocation 'greedy'"),
    ({'baseline.generation_epochs': (1.0, 0.5)}, 'generation_epochs must be positive and must not decrease'),
    ({'baseline.generation_epochs': (0.0,)}, 'generation_epochs must be positive and must not decrease'),
    ({'baseline.recalibrate_batches': -1}, 'recalibrate_batches must be >= 0'),
    ({'loss.sandwich_widths': -1}, 'sandwich_widths must be >= 0'),
    ({'construction.class_threshold': -1.0}, 'class_threshold must be >= 0'),
    ({'method': 'steppingnet', 'construction.budgets': (0.1, 0.3)}, 'needs one budget per level: 2 budgets, 3'),
    (
      {'method': 'nonuniform', 'construction.budgets': (0.1, 0.3, 0.6), 'loss.exit_weights': (1.0, 0.0, 1.0)},
      'every exit weight must be positive',
    ),
    ({'selection.baseline': 'learned'}, "unknown selection.baseline 'learned'"),
    ({'loss.distill_mode': 'mix'}, "unknown loss.distill_mode 'mix'; choose one of add, replace"),
    ({'data.validation_examples': -1}, 'validation_examples must be >= 0'),
    ({'seed': -1}, 'seed must be >= 0, got -1'),  # numpy's RandomState failed late on it
    (
      {
        'method': 'steppingnet',
        'construction.budgets': (0.1, 0.3, 0.6),
        'construction.allocation': 'uniform',
        'construction.rank_per_mac': True,
      },
      'do not combine',
    ),
  ],
)
def test_config_validation(overrides, message):
  """Each bad setting is refused (a ``SettingsError``, or ``UnknownName`` for a misspelt name):
  the commands end on its one line."""
  with pytest.raises((config.SettingsError, registry.UnknownName), match=message) as refused:
    trainers.validate(config.from_dict({'model.num_levels': 3, **overrides}))
  assert cli.failure_message(refused.value) == f'error: {refused.value}'


def test_levels_that_would_be_empty_are_refused_before_anything_is_written(tmp_path):
  """16 levels of LeNet-3C1L at width 0.25 (8 channels in conv1) would leave levels empty,
  each repeating the exit below it: refused naming the layer and its channel count, and the
  workdir is left as it was (not created)."""
  cfg = tiny_config(**{'model.num_levels': 16, 'data.name': 'digits'})
  workdir = tmp_path / 'run'
  with pytest.raises(config.SettingsError, match=r'layer conv1 has 8 channels: too few for 16 levels') as refused:
    trainers.train(cfg, str(workdir))
  assert not workdir.exists()
  assert cli.failure_message(refused.value) is not None  # a one-line end of train.py, no traceback


@pytest.mark.parametrize('method', ['joint', 'steppingnet'])
def test_a_folder_that_is_not_a_run_is_never_written_into(tmp_path, method):
  """A non-empty folder without the run marker (a user's config.json, a tensorboard/ folder
  with their file) is refused before anything is written, naming what it holds; the files
  are left byte for byte."""
  workdir = tmp_path / 'mine'
  (workdir / 'tensorboard').mkdir(parents=True)
  (workdir / 'config.json').write_text('{"mine": true}')
  (workdir / 'tensorboard' / 'notes.txt').write_text('keep me')
  overrides = {'data.name': 'digits', 'model.name': 'mlp', 'model.width': 0.125, 'method': method}
  if method == 'steppingnet':
    overrides['construction.budgets'] = (0.2, 0.5, 0.9)
  refusal = r'mine is not empty and is not a stepnet_jax run .*config.json, tensorboard'
  with pytest.raises(config.SettingsError, match=refusal) as refused:
    trainers.train(tiny_config(**overrides), str(workdir))
  assert cli.failure_message(refused.value) is not None  # a one-line end of train.py, no traceback
  assert sorted(p.name for p in workdir.rglob('*')) == ['config.json', 'notes.txt', 'tensorboard']
  assert (workdir / 'config.json').read_text() == '{"mine": true}'


@pytest.fixture
def small_disk(tmp_path):
  """A 256 KiB tmpfs mounted at ``tmp_path/disk``: a disk that really fills (mounting needs root;
  skipped where it is not allowed)."""
  disk = tmp_path / 'disk'
  disk.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=256k', 'tmpfs', str(disk)], capture_output=True)
  if mounted.returncode != 0:
    pytest.skip(f'cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}')
  yield disk
  subprocess.run(['umount', '-l', str(disk)], check=False)


def test_a_full_disk_says_so_and_the_same_command_resumes_once_space_is_freed(small_disk):
  """Training into a disk that fills during a checkpoint write (tensorstore reports it as a
  ValueError, orbax's finalize as an OSError) ends on the one-line "disk is full" message; once
  the disk has room, the same call trains to the end."""
  cfg = tiny_config(**{'data.name': 'digits', 'model.name': 'mlp'})
  workdir = str(small_disk / 'run')
  with pytest.raises(Exception) as full:
    trainers.train(cfg, workdir)
  message = cli.failure_message(full.value) or ''
  assert message.startswith('error: the disk is full (') and 'tensorstore_spec' not in message, repr(full.value)
  subprocess.run(['mount', '-o', 'remount,size=64m', str(small_disk)], check=True)
  result = trainers.train(cfg, workdir)
  assert result['step'] == cfg.train.num_epochs * run.prepare_data(cfg)[1]
  assert min(result['test_accuracy']) > 0.3


def test_only_a_full_disk_is_reported_as_one():
  """ENOSPC, or tensorstore's RESOURCE_EXHAUSTED write error, anywhere in the chain of causes is
  a full disk; the same words in another error, or a context hidden by ``from None``, are not."""
  full = OSError(errno.ENOSPC, 'No space left on device', '/w/ckpt')
  tensorstore = ValueError(
    'RESOURCE_EXHAUSTED: Failed writing: "/w/d/1": No space left on device [os_error_code=\'28\']'
  )
  try:
    raise RuntimeError('save failed') from tensorstore
  except RuntimeError as e:
    caused = e
  try:
    try:
      raise full
    except OSError:
      raise KeyError('a bug while cleaning up') from None
  except KeyError as e:
    hidden = e
  assert cli.failure_message(full).startswith('error: the disk is full ([Errno 28]')
  assert cli.failure_message(caused) == (
    'error: the disk is full (RESOURCE_EXHAUSTED: Failed writing: "/w/d/1": No space left on device); '
    'free space and run the same command again to resume'
  )
  assert cli.failure_message(hidden) is None
  assert cli.failure_message(RuntimeError('log line: No space left on device')) is None


def test_a_fresh_start_deletes_only_the_event_files_it_wrote(tmp_path):
  """Restarting a run's metrics from scratch (a phased run that starts over) removes the
  run's TensorBoard event files, never another file in its tensorboard/ folder."""
  writer = loop.MetricWriter(str(tmp_path))
  writer.write(1, {'x': 1.0})
  writer.close()
  (tmp_path / 'tensorboard' / 'notes.txt').write_text('keep me')
  loop.MetricWriter(str(tmp_path), fresh=True).close()
  names = sorted(p.name for p in (tmp_path / 'tensorboard').iterdir())
  assert 'notes.txt' in names and len([n for n in names if n.startswith('events.out.tfevents.')]) == 1
  assert (tmp_path / 'metrics.jsonl').read_text() == ''


def test_config_parses_sequences_and_assignment(tmp_path):
  p = tmp_path / 'a.json'
  p.write_text('{"conv1": [1, 2]}')
  c = config.from_dict(
    {
      'model.num_levels': 2,
      'model.level_widths': '(0.25, 1.0)',
      'loss.exit_weights': [1, 2],
      'model.assignment': str(p),
    }
  )
  assert c.model.level_widths == (0.25, 1.0) and c.exit_weights == (1.0, 2.0)
  assert c.model.assignment_dict() == {'conv1': [1, 2]}
  assert config.from_dict({'model.num_levels': 3}).exit_weights == (1.0, 1.0, 1.0)
  c = config.from_dict({'model': {'num_levels': 2, 'assignment': '{"fc1": [3, 4]}'}})  # nested works too
  assert c.model.assignment_dict() == {'fc1': [3, 4]}
  assert c.replace(**{'model.width': 0.5}).model == dataclasses.replace(c.model, width=0.5)
  with pytest.raises(ValueError, match='level_widths'):
    c.replace(**{'model.level_widths': (1.0,)})  # replace validates


def test_every_field_is_declared_once_and_overridable():
  """base_config() is generated from the dataclasses: the same keys, the same defaults."""
  flat = config.flatten(config.base_config().to_dict())
  assert flat == config.flatten(config.Config().to_dict())
  assert config.flat_paths()['batch_size'] == 'train.batch_size'  # not selection.batch_size
  assert config.from_dict(config.base_config()) == config.Config()


# The config.json configs/tiny.py wrote before the config had sections (copied from a run of
# that version, with --config.progress=False).
FLAT_TINY = {
  'dataset': 'idx:/usr/share/datasets/fashion-mnist',
  'data_dir': '',
  'train_subset': 2048,
  'test_subset': 1000,
  'augment': False,
  'model': 'lenet3c1l',
  'width': 0.25,
  'num_levels': 3,
  'level_widths': [],
  'triangular': False,
  'mask_rule': True,
  'sandwich_widths': 0,
  'assignment': '',
  'method': 'joint',
  'budgets': [],
  'widen': 2.0,
  'importance': 'taylor',
  'importance_examples': 512,
  'class_threshold': 0.5,
  'allocation': 'global',
  'rank_per_mac': False,
  'construct_rounds': 4,
  'pretrain_epochs': 1.0,
  'round_epochs': 0.25,
  'finetune_distill_weight': 0.0,
  'nonuniform_cycles': 2,
  'recalibrate_batches': 50,
  'exit_weights': [],
  'distill_weight': 0.0,
  'distill_temperature': 4.0,
  'optimizer': 'adam',
  'learning_rate': 0.003,
  'momentum': 0.9,
  'weight_decay': 0.0,
  'schedule': 'cosine',
  'step_decay_at': [0.5, 0.75],
  'warmup_epochs': 0.0,
  'num_epochs': 2,
  'batch_size': 64,
  'seed': 0,
  'eval_batch_size': 500,
  'log_every_steps': 8,
  'keep_checkpoints': 2,
  'progress': False,
}


COMPARE_ROOTS = ('common', 'steppingnet', 'nonuniform')


@pytest.mark.parametrize(
  'arg,roots,new',
  [
    ('--config.num_epochs=2', ('',), '--config.train.num_epochs=2'),
    ('--config.model=mlp', ('',), '--config.model.name=mlp'),
    ('--config.construct_rounds=3', ('',), '--config.construction.rounds=3'),
    ('--config.common.widen=3.0', COMPARE_ROOTS, '--config.common.construction.widen=3.0'),
    ('--config.steppingnet.importance=class', COMPARE_ROOTS, '--config.steppingnet.construction.importance=class'),
    ('--config.awn.widen=2', COMPARE_ROOTS, None),  # the comparison's own AWN section
    ('--config.common.widen=3.0', ('',), None),
    ('--config.train.num_epochs=2', ('',), None),
    ('--config.model.width=0.5', ('',), None),
    ('--config.seed=1', ('',), None),
    ('--config.method=joint', ('',), None),
    ('--workdir=x', ('',), None),
    ('--config.methods=awn', COMPARE_ROOTS, None),
  ],
)
def test_flat_command_line_overrides_get_their_new_spelling(arg, roots, new):
  assert cli.renamed_override(arg, roots) == new


@pytest.mark.parametrize(
  'arg,roots,hint',
  [
    ('--config.train.num_epoch=1', ('',), 'did you mean train.num_epochs'),
    ('--config.nosuchkey=1', ('',), 'nosuchkey is not a config key; every field'),
    ('--config.common.optim.learning_rat=0.1', COMPARE_ROOTS, 'did you mean common.optim.learning_rate'),
    ('--config.train.num_epochs=1', ('',), None),
    ('--config.train=x', ('',), None),
    ('--config.awn.widen=2', COMPARE_ROOTS, None),
    ('--workdir=x', ('',), None),
  ],
)
def test_unknown_command_line_keys_get_the_closest_fields(arg, roots, hint):
  got = cli.unknown_override(arg, roots)
  assert (got is None) if hint is None else hint in got, got


def test_flat_configs_of_earlier_versions_load():
  assert config.from_saved(FLAT_TINY) == tiny_config()
  assert config.differing_keys(FLAT_TINY, tiny_config()) == []
  assert config.differing_keys(FLAT_TINY, tiny_config(**{'optim.learning_rate': 0.1})) == ['optim.learning_rate']
  sandwich = config.from_saved(dict(FLAT_TINY, triangular=True, sandwich_widths=3))
  assert (sandwich.loss.objective, sandwich.loss.sandwich_widths) == ('sandwich', 3)
  with pytest.raises(ValueError, match='another version'):
    config.from_saved(dict(FLAT_TINY, no_such_key=1))


def _flat(nested: dict) -> dict:
  """A saved nested config in the flat format of earlier versions (FLAT_TINY's keys)."""
  renamed = {
    'model.name': 'model',
    'data.name': 'dataset',
    'optim.name': 'optimizer',
    'construction.rounds': 'construct_rounds',
  }
  later = (
    'loss.objective',
    'loss.sandwich_widths',
    'data.validation_examples',  # keys the flat era lacked
    'train.checkpoint_every_steps',
    'train.divergence_steps',
    'train.divergence_factor',
    'loss.distill_mode',
    'model.exit_heads',
    'loss.label_smoothing',
    'model.batch_norm',
    'data.pad_to',
    'baseline.generation_epochs',
    'model.init',
    'loss.exit_reduction',
  )
  flat = {
    renamed.get(k, k.rsplit('.', 1)[-1]): v
    for k, v in config.flatten(nested).items()
    if k not in later and not k.startswith('selection.')
  }
  flat['sandwich_widths'] = 0
  flat['nonuniform_cycles'] = 2  # a retired key, dropped on reading
  assert set(flat) == set(FLAT_TINY)
  return flat


def test_the_retired_turns_setting_is_dropped_on_reading_and_keeps_a_nonuniform_run_from_reuse():
  """Runs of the previous version saved ``baseline.nonuniform_cycles`` (the turn-based
  non-uniform trainer): such a config still reads, a joint run of it is the same settings,
  and a non-uniform one is not (its network was trained another way)."""
  for method, extra in (('joint', {}), ('nonuniform', {'construction.budgets': (0.2, 0.5, 1.0)})):
    cfg = config.from_dict({'method': method, **extra})
    saved = cfg.to_dict()
    saved['baseline'] = {**saved['baseline'], 'nonuniform_cycles': 2}
    assert config.from_saved(saved) == cfg
    expected = ['baseline.nonuniform_cycles (the retired turn-based trainer)'] if method == 'nonuniform' else []
    assert config.differing_keys(saved, cfg) == expected


def test_a_workdir_of_an_earlier_version_loads_and_resumes(tmp_path, one_epoch_digits_run):
  """A checkpoint whose meta holds a flat config (as earlier versions wrote it) loads, and a
  run asking for more epochs resumes from it."""
  digits, original = one_epoch_digits_run
  workdir = str(tmp_path / 'old')
  shutil.copytree(original, workdir)
  patched = 0
  for root, _, files in os.walk(os.path.join(workdir, 'checkpoints')):
    for name in files:
      path = os.path.join(root, name)
      try:
        with open(path) as f:
          meta = json.load(f)
      except (UnicodeDecodeError, json.JSONDecodeError):
        continue
      if isinstance(meta, dict) and isinstance(meta.get('config'), dict):
        meta['config'] = _flat(meta['config'])
        with open(path, 'w') as f:
          json.dump(meta, f)
        patched += 1
  assert patched == 1
  assert isinstance(restore.restore_meta(workdir)['config']['model'], str)
  assert stepnet_jax.load(workdir).num_levels == 2
  resumed = run.train_and_evaluate(_digits_config(**{'train.num_epochs': 2}), workdir, dataset=digits)
  assert resumed['step'] == 2 * (128 // 64)
  with pytest.raises(ValueError, match=r'other settings \(seed\)'):
    run.train_and_evaluate(_digits_config(**{'train.num_epochs': 3, 'seed': 1}), workdir, dataset=digits)


def test_learning_rate_schedules():
  spe, lr = 10, 0.5
  cos = optim.learning_rate_schedule(config.from_dict({'optim.learning_rate': lr, 'train.num_epochs': 4}), spe)
  for t in (0, 7, 20, 39, 40):
    np.testing.assert_allclose(float(cos(t)), lr * 0.5 * (1 + np.cos(np.pi * min(t, 40) / 40)), rtol=1e-5, atol=1e-7)
  warm = optim.learning_rate_schedule(
    config.from_dict({'optim.learning_rate': lr, 'train.num_epochs': 4, 'optim.warmup_epochs': 1.0}), spe
  )
  np.testing.assert_allclose([float(warm(t)) for t in (0, 5)], [0.0, lr / 2], rtol=1e-5)
  for t in (10, 25, 40):
    np.testing.assert_allclose(float(warm(t)), lr * 0.5 * (1 + np.cos(np.pi * (t - 10) / 30)), rtol=1e-5, atol=1e-7)
  step = optim.learning_rate_schedule(
    config.from_dict(
      {'optim.learning_rate': lr, 'train.num_epochs': 4, 'optim.schedule': 'step', 'optim.step_decay_at': (0.5, 0.75)}
    ),
    spe,
  )
  np.testing.assert_allclose(
    [float(step(t)) for t in (0, 19, 21, 29, 31, 39)], [lr, lr, lr * 0.1, lr * 0.1, lr * 0.01, lr * 0.01], rtol=1e-5
  )


def test_augment_is_a_shifted_possibly_flipped_crop():
  rng = np.random.RandomState(0)
  n = 32
  x = rng.randint(1, 256, (n, 8, 7, 2)).astype(np.uint8)
  out = np.asarray(step_lib.augment(jnp.asarray(x), jax.random.key(3), pad=2))
  assert out.shape == x.shape and out.dtype == x.dtype
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  flips, shifts = 0, set()
  for i in range(n):
    candidates = []
    for dy in range(5):
      for dx in range(5):
        crop = padded[i, dy : dy + 8, dx : dx + 7]
        candidates += [(crop, False, (dy, dx)), (crop[:, ::-1], True, (dy, dx))]
    matches = [(f, s) for c, f, s in candidates if np.array_equal(c, out[i])]
    assert matches, f'image {i} is not a crop of the padded input'
    flips += matches[0][0]
    shifts.add(matches[0][1])
  assert 4 <= flips <= n - 4  # about half are flipped
  assert len(shifts) >= 8  # offsets vary
