"""Checkpoint retention (the newest and the best), the validation metric that ranks them, the
workdir lock, the divergence guard, and malformed configs refused before anything is written."""

import json
import os

import numpy as np
import pytest
from flax import nnx

import stepnet_jax
from stepnet_jax import config
from stepnet_jax.data import datasets
from stepnet_jax.inference import restore
from stepnet_jax.methods import trainers
from stepnet_jax.models import zoo
from stepnet_jax.training import checkpoints, loop, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digits_config(**kw):
  return config.from_dict(
    {
      'data.name': 'digits',
      'model.name': 'mlp',
      'model.width': 0.125,
      'model.num_levels': 2,
      'train.num_epochs': 3,
      'train.batch_size': 64,
      'optim.learning_rate': 3e-3,
      'train.progress': False,
      'train.log_every_steps': 5,
      **kw,
    }
  )


def _model_state():
  model = zoo.build_model('mlp', num_classes=10, input_shape=(8, 8, 1), num_levels=2, width=0.125)
  _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return params, stats


@pytest.mark.parametrize('validation', [True, False])
def test_retention_keeps_the_newest_and_the_best(tmp_path, validation):
  """Keep 2: the two newest and the best survive, ranked by validation accuracy when the run
  has a split (mid-epoch saves without it are kept only while recent), else by the smoothed
  training loss of every save, so the best before a collapse is kept without a split too."""
  params, stats = _model_state()
  mngr = checkpoints.manager(str(tmp_path), keep=2)
  accuracy = {1: 0.5, 2: 0.9, 3: None, 4: 0.6, 5: 0.7, 6: None}  # None: a mid-epoch save
  loss = {1: 1.2, 2: 0.4, 3: 0.5, 4: 2.3, 5: 2.3, 6: 2.4}  # learned, then collapsed to ln(10)
  for step in accuracy:
    metrics = (
      checkpoints.save_metrics(accuracy[step], None) if validation else checkpoints.save_metrics(None, loss[step])
    )
    checkpoints.save(mngr, step, params, stats, {'step': step, 'config': {}, 'model_meta': {}}, metrics=metrics)
  assert checkpoints.kept_best(mngr).startswith(
    'kept: checkpoint 2 (' + ('validation accuracy 90.00%' if validation else 'smoothed training loss 0.4')
  )
  mngr.close()
  assert restore.all_steps(str(tmp_path)) == [6, 5, 2]
  assert restore.best_step(str(tmp_path)) == (2 if validation else None)  # evaluate.py --best: validation only
  assert restore.restore_meta(str(tmp_path), 2)['step'] == 2
  with pytest.raises(ValueError, match='would delete every checkpoint'):
    checkpoints.manager(str(tmp_path), keep=0)


def test_the_validation_accuracy_that_ranks_checkpoints_is_the_top_exits(tmp_path):
  """Each kept checkpoint's recorded metric equals the top exit's accuracy on the held-out
  images, recomputed from the loaded checkpoint on the split rebuilt by hand."""
  cfg = _digits_config(**{'data.validation_examples': 300, 'train.keep_checkpoints': 1})
  run.train_and_evaluate(cfg, str(tmp_path))
  full = datasets.load_digits()
  held = np.sort(np.random.RandomState(cfg.seed + 12345).permutation(len(full.train_labels))[:300])
  x, y = full.train_images[held], full.train_labels[held]
  steps = restore.all_steps(str(tmp_path))
  best = restore.best_step(str(tmp_path))
  assert steps[0] == 3 * ((len(full.train_labels) - 300) // 64) and best in steps and len(steps) <= 2
  recorded = checkpoints.manager(str(tmp_path), keep=1).metrics(best)[checkpoints.BEST_METRIC]
  net = stepnet_jax.load(str(tmp_path), best)
  assert recorded == pytest.approx(float((np.asarray(net.forward(x, 1)).argmax(-1) == y).mean()))


def test_a_second_trainer_in_the_same_workdir_is_refused(tmp_path):
  workdir = str(tmp_path / 'run')
  with run.lock_workdir(workdir):  # as another train.py would hold it
    with pytest.raises(run.WorkdirBusy, match='another process is training in'):
      trainers.train(_digits_config(), workdir)
    assert os.listdir(workdir) == [restore.RUN_MARKER]  # the holder's marker; the refused one wrote nothing
  assert not os.path.exists(workdir)  # the directory made for the lock is gone again
  with run.lock_workdir(workdir):  # released: taken again
    pass
  fresh = str(tmp_path / 'fresh')  # made for A's lock: B's refusal must not remove it
  with run.lock_workdir(fresh):
    with pytest.raises(run.WorkdirBusy):
      with run.lock_workdir(fresh):
        pass
    assert os.path.isdir(fresh)
  missing = str(tmp_path / 'missing_dataset')  # refused before writing: no directory is left
  with pytest.raises(datasets.DatasetError):
    trainers.train(_digits_config(**{'data.name': f'idx:{tmp_path}/nowhere'}), missing)
  assert not os.path.exists(missing)


def test_resuming_with_fewer_epochs_than_trained_is_refused_untouched(tmp_path):
  digits = datasets.subset(datasets.load_digits(), train=128)
  cfg = _digits_config(**{'train.num_epochs': 2})
  run.train_and_evaluate(cfg, str(tmp_path), dataset=digits)
  before = {name: os.path.getmtime(tmp_path / name) for name in ('config.json', 'metrics.jsonl')}
  with pytest.raises(ValueError, match=r'trained to step 4 \(2 epochs\); train.num_epochs=1 ends at step 2'):
    run.train_and_evaluate(cfg.replace(**{'train.num_epochs': 1}), str(tmp_path), dataset=digits)
  assert before == {name: os.path.getmtime(tmp_path / name) for name in before}
  assert restore.all_steps(str(tmp_path)) == [4, 2]


def test_sigterm_at_an_epochs_last_step_evaluates_and_ranks_that_epoch(tmp_path, monkeypatch, capsys):
  """A stop request arriving during the last step of epoch 1 lets the epoch end as usual
  (evaluated, saved with its validation accuracy), then stops before epoch 2. The epoch's
  progress line shows the validation accuracy the run is ranked by, then the test accuracy."""
  import signal

  cfg = _digits_config(**{'data.validation_examples': 300, 'train.num_epochs': 2})
  steps_per_epoch = (len(datasets.load_digits().train_labels) - 300) // 64
  make = run.config_train_step

  def signalling(*args, **kwargs):
    train_step = make(*args, **kwargs)

    def stepped(state, batch):
      if int(state.step) == steps_per_epoch - 1:
        os.kill(os.getpid(), signal.SIGTERM)  # recorded by the loop's handler, not fatal
      return train_step(state, batch)

    return stepped

  monkeypatch.setattr(run, 'config_train_step', signalling)
  with pytest.raises(loop.Preempted) as stopped:
    run.train_and_evaluate(cfg, str(tmp_path))
  assert stopped.value.step == steps_per_epoch and stopped.value.signal_name == 'SIGTERM'
  assert restore.all_steps(str(tmp_path)) == [steps_per_epoch]
  assert restore.best_step(str(tmp_path)) == steps_per_epoch  # ranked: its validation accuracy was saved
  logged = [json.loads(ln) for ln in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  epoch = next(entry for entry in logged if entry.get('epoch') == 1)
  levels = cfg.model.num_levels
  shown = [f'{epoch[f"{split}/accuracy/level{k}"]:.4f}' for split in ('validation', 'test') for k in range(levels)]
  line = f'epoch 1: validation accuracy per level {" ".join(shown[:levels])}; test {" ".join(shown[levels:])}'
  assert line in capsys.readouterr().out.splitlines()


def test_distillation_replacing_the_labels_does_not_look_like_divergence(tmp_path):
  """In-place distillation: the KL terms grow as the top exit sharpens, so the total loss
  rises while training is healthy; the guard watches the top exit's cross-entropy. (Watching
  the total loss, this run was stopped at step 215.)"""
  cfg = _digits_config(
    **{
      'model.num_levels': 4,
      'loss.distill_mode': 'replace',
      'loss.distill_temperature': 4.0,
      'optim.learning_rate': 3e-3,
      'train.num_epochs': 12,
      'train.divergence_steps': 40,
    }
  )
  result = run.train_and_evaluate(cfg, str(tmp_path))
  assert result['test_accuracy'][-1] > 0.8


def test_divergence_guard_on_loss_curves():
  """A healthy noisy curve (down to near zero) never trips it; back at chance, or far above
  chance from the start, trips it after ``steps`` steps (plus the average's lag)."""
  rng = np.random.RandomState(0)
  t = np.arange(3000)
  healthy = 2.3 * np.exp(-t / 150) + 0.01 + 0.02 * rng.rand(len(t)) * (1 + np.sin(t / 7))
  relapse = np.where(t < 1000, healthy, 2.3 + 0.1 * rng.randn(len(t)))
  exploding = 1e4 / (1 + t / 50.0)
  for curve, trips in ((healthy, None), (relapse, (1200, 1300)), (exploding, (200, 250))):
    guard, tripped = loop.DivergenceGuard(200, 3.0, chance=np.log(10)), None
    try:
      for end in range(10, len(t) + 1, 10):  # fed in windows, as the loop logs
        guard.update(curve[end - 10 : end], end)
    except loop.Diverged as e:
      tripped = end
      assert 'training diverged' in str(e)
    assert (tripped is None) if trips is None else trips[0] <= tripped <= trips[1], tripped
  off = loop.DivergenceGuard(0, 3.0, chance=np.log(10))
  off.update(list(exploding), len(exploding))  # steps=0 never checks


def test_a_finite_divergence_stops_training(tmp_path):
  with pytest.raises(loop.Diverged, match=r'training diverged.* kept: checkpoint \d+ \(smoothed training loss'):
    run.train_and_evaluate(
      _digits_config(**{'optim.learning_rate': 1e6, 'train.num_epochs': 6, 'train.divergence_steps': 40}), str(tmp_path)
    )


def test_a_run_that_ends_at_chance_fails_saying_so(tmp_path, fashion_mnist):
  """configs/tiny.py at a learning rate of 1e6 for its 64 steps (shorter than the divergence
  guard's window): the top exit ends at chance (10.7% in the last logged window here). The
  run's result says so and ``run.check_learned`` (what train.py ends on, status 1) fails
  naming the learning rate; the checkpoints are kept.
  Measured on validation when the run has a split (here: the check's threshold itself)."""
  tiny = config.load_file(os.path.join(REPO, 'configs', 'tiny.py')).to_dict()
  cfg = config.from_dict(config.merge(tiny, config.nest({'optim.learning_rate': 1e6, 'train.progress': False})))
  message = r"ended at chance: the top exit's training \(last logged window's\) accuracy is .*now 1e\+06"
  result = run.train_and_evaluate(cfg, str(tmp_path / 'run'), dataset=fashion_mnist)
  with pytest.raises(loop.NotLearned, match=message):
    run.check_learned(result, cfg)
  assert restore.latest_step(str(tmp_path / 'run')) == 64
  chance = 1 / 10
  loop.check_learned(chance + loop.CHANCE_MARGIN + 1e-9, 'validation', 10, 1e-3)  # just above: learned
  with pytest.raises(loop.NotLearned, match='validation accuracy is 13.00%'):
    loop.check_learned(chance + loop.CHANCE_MARGIN, 'validation', 10, 1e-3)


GOOD = {
  'train.batch_size': 64,
  'optim.learning_rate': 1e-3,
  'model.width': 0.5,
  'train.num_epochs': 2,
  'loss.exit_weights': (1.0, 1.0, 1.0),
  'construction.budgets': (0.1, 0.3, 0.6),
  'train.progress': False,
}
BAD_VALUES = [-1, 0, -0.5, float('nan'), 'abc', True, 2.5, (), (1.0,), None, [0.3, 0.1, 0.2]]


def test_malformed_configs_are_refused_with_the_documented_errors(tmp_path):
  """Seeded fuzz: a valid config with one field replaced by a bad value, or an unknown key,
  is a ValueError or TypeError from ``config.from_dict`` (before anything is built or
  written), and a value accepted is really valid (it survives a second validation)."""
  rng = np.random.RandomState(0)
  refused = 0
  for _ in range(120):
    key = list(GOOD)[rng.randint(len(GOOD))]
    value = BAD_VALUES[rng.randint(len(BAD_VALUES))]
    overrides = {'model.num_levels': 3, 'method': 'steppingnet', **GOOD, key: value}
    if rng.rand() < 0.1:
      overrides[f'train.no_such_key_{rng.randint(9)}'] = 1
    try:
      cfg = config.from_dict(overrides)
    except (ValueError, TypeError) as e:
      assert str(e), overrides
      refused += 1
      continue
    assert config.from_dict(cfg.to_dict()) == cfg
  assert refused > 80
  assert not os.listdir(tmp_path)
