"""Nothing lost on a crash: real ``train.py`` processes killed with SIGKILL at arbitrary
points (mid-epoch, possibly mid-save) or stopped with SIGTERM, then restarted with the
same command, end with bit-identical parameters to an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import stepnet_jax
from stepnet_jax.inference import restore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'tiny.py')
# 640 digits / 64 = 10 steps per epoch, 2 epochs, a checkpoint every 3 steps.
ARGS = [
  '--config.data.name=digits',
  '--config.model.name=mlp',
  '--config.model.width=0.125',
  '--config.data.train_subset=640',
  '--config.data.test_subset=200',
  '--config.train.num_epochs=2',
  '--config.train.checkpoint_every_steps=3',
  '--config.train.progress=False',
  '--config.train.log_every_steps=1',
]
ENV = dict(
  os.environ,
  JAX_PLATFORMS='cpu',
  JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
)


def _command(workdir):
  return [sys.executable, os.path.join(REPO, 'train.py'), f'--config={TINY}', f'--workdir={workdir}', *ARGS]


def _finish(workdir) -> subprocess.CompletedProcess:
  done = subprocess.run(_command(workdir), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


# Runs train.py (argv[1:]) with hooks set by environment variables:
# STEP_SLEEP: seconds of sleep after each train step (a tiny run would finish before a
#   polling test can signal it; the sleep changes no number);
# KILL_AT: orbax's atomic rename (the last act of a save) is replaced by SIGKILL for that
#   step's checkpoint: the process dies with it fully written to its temporary directory
#   but not committed.
_DRIVER = """
import os, runpy, signal, sys, time
from orbax.checkpoint._src.path import atomicity
from stepnet_jax.training import step
commit, make = atomicity.AtomicRenameTemporaryPath.finalize, step.make_train_step
async def finalize(self, *args, **kwargs):
  if self.get_final().name == os.environ.get('KILL_AT'):
    os.kill(os.getpid(), signal.SIGKILL)
  return await commit(self, *args, **kwargs)
def slow(*args, **kwargs):
  train_step = make(*args, **kwargs)
  def stepped(*a):
    out = train_step(*a)
    time.sleep(float(os.environ.get('STEP_SLEEP', 0)))
    return out
  return stepped
atomicity.AtomicRenameTemporaryPath.finalize, step.make_train_step = finalize, slow
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def _driven(workdir, **env) -> list:
  return [sys.executable, '-c', _DRIVER, *_command(workdir)[1:]], dict(ENV, **env)


def _signal_when(command, env, ready, sig: int) -> subprocess.CompletedProcess:
  """Runs ``command`` and sends ``sig`` as soon as ``ready()`` holds."""
  proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  try:
    while time.time() < deadline and proc.poll() is None:
      if ready():
        proc.send_signal(sig)
        break
      time.sleep(0.02)
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _interrupt(workdir, after_step: int, sig: int) -> subprocess.CompletedProcess:
  """Starts the command (each step slowed to 50 ms) and sends ``sig`` once a checkpoint past
  ``after_step`` exists."""

  def ready():
    root = restore.checkpoint_dir(workdir)
    steps = [int(d) for d in os.listdir(root) if d.isdigit()] if os.path.isdir(root) else []
    return bool(steps) and max(steps) > after_step

  return _signal_when(*_driven(workdir, STEP_SLEEP='0.05'), ready, sig)


def _leaves(workdir):
  return [np.asarray(x) for x in jax.tree.leaves(stepnet_jax.load(str(workdir)).variables)]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('reliability') / 'whole'
  _finish(workdir)
  return _leaves(workdir)


def test_sigkill_twice_then_restart_gives_bit_identical_parameters(tmp_path, uninterrupted):
  workdir = tmp_path / 'killed'
  first = _interrupt(workdir, 3, signal.SIGKILL)  # during epoch 1
  assert first.returncode == -signal.SIGKILL
  second = _interrupt(workdir, 12, signal.SIGKILL)  # during epoch 2, after resuming mid-epoch 1
  assert second.returncode == -signal.SIGKILL
  assert 'Resuming from step' in second.stdout
  _finish(workdir)
  for a, b in zip(uninterrupted, _leaves(workdir)):
    np.testing.assert_array_equal(a, b)


def test_sigterm_saves_the_current_step_and_says_how_to_resume(tmp_path, uninterrupted):
  workdir = tmp_path / 'stopped'
  stopped = _interrupt(workdir, 4, signal.SIGTERM)
  assert stopped.returncode == 143, stopped.stderr[-2000:]
  step = int(stopped.stdout.split('SIGTERM at step ')[1].split(':')[0])
  assert restore.latest_step(str(workdir)) == step  # saved where it stopped, not at the last multiple of 3
  assert 'run the same command to resume' in stopped.stdout
  resumed = _finish(workdir)
  assert f'Resuming from step {step} ' in resumed.stdout
  for a, b in zip(uninterrupted, _leaves(workdir)):
    np.testing.assert_array_equal(a, b)


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_and_resumes_bit_identical(tmp_path, uninterrupted):
  workdir = tmp_path / 'killed_saving'
  command, env = _driven(workdir, KILL_AT='6')
  killed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  leftovers = os.listdir(restore.checkpoint_dir(workdir))
  assert any(name.startswith('6') and 'tmp' in name for name in leftovers), leftovers  # step 6 half-saved
  assert restore.all_steps(str(workdir)) == [3]  # the previous checkpoint is the newest one
  restore.restore_meta(str(workdir))  # and it reads
  resumed = _finish(workdir)
  assert 'Resuming from step 3 ' in resumed.stdout
  for a, b in zip(uninterrupted, _leaves(workdir)):
    np.testing.assert_array_equal(a, b)


PHASED = {
  # Construction: pretrain to step 5, rounds to steps 8 and 11, fine-tune to 20; stopped in round 1.
  'construction': (
    [
      '--config.method=steppingnet',
      '--config.construction.budgets=0.2,0.5,1.0',
      '--config.construction.rounds=2',
      '--config.construction.pretrain_epochs=0.5',
      '--config.construction.round_epochs=0.3',
      '--config.construction.importance_examples=64',
    ],
    1,
    5,
  ),
  # Non-uniform (single-path) on the 2x-widened background network: trained alone to step 5,
  # where the top subnet is pruned out of it, subnet 1 carved out at step 8 and subnet 0 at
  # step 10 (epochs 0.5, 0.75, 1.0); stopped in the last phase, after phase checkpoint 3.
  'non-uniform': (
    [
      '--config.method=nonuniform',
      '--config.construction.budgets=0.2,0.5,1.0',
      '--config.construction.pretrain_epochs=0.5',
      '--config.baseline.recalibrate_batches=2',
    ],
    3,
    10,
  ),
}


@pytest.mark.parametrize('method', sorted(PHASED))
def test_a_phased_run_stopped_mid_phase_goes_on_from_where_it_stopped_bit_identical(tmp_path, method):
  """Methods trained in phases of different structure are checkpointed at phase ends and, at
  SIGTERM, inside a phase. SIGTERM exits 143 saying so; the same command goes on from the
  step it stopped at (the last phase end, then the checkpoint inside the phase) and ends
  with the parameters of an uninterrupted run, bit for bit."""
  extra, phase, phase_end = PHASED[method]  # the phase checkpoint to wait for, and its global step
  whole, stopped = tmp_path / 'whole', tmp_path / 'stopped'
  done = subprocess.run(_command(whole) + extra, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  command, env = _driven(stopped, STEP_SLEEP='0.1')
  committed = stopped / 'phases' / 'checkpoints' / str(phase)  # then the run is in the next phase
  proc = _signal_when(command + extra, env, committed.exists, signal.SIGTERM)
  out, err = proc.stdout, proc.stderr
  assert proc.returncode == 143, err[-2000:]
  stopped_at = int(out.split('SIGTERM at step ')[1].split(':')[0])
  assert 'checkpoint saved' in out, out[-2000:]
  again = subprocess.run(_command(stopped) + extra, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-2000:]
  resumed_at = int(again.stdout.split('resuming from the phase checkpoint at step ')[1].split()[0])
  assert resumed_at >= phase_end and f'{method} done' in again.stdout
  # Mostly the signal lands inside the next phase, saved there; on a loaded machine it may
  # land as that phase ends, and the phase checkpoint it writes is where the rerun goes on.
  inside = f') from step {stopped_at}' in again.stdout and 'going on inside the phase (' in again.stdout
  assert inside or resumed_at == stopped_at, (stopped_at, again.stdout[-2000:])
  assert not (stopped / 'phases').exists()  # superseded by the final checkpoint
  for a, b in zip(_leaves(whole), _leaves(stopped)):
    np.testing.assert_array_equal(a, b)


def test_study_command_stopped_by_a_signal_ends_with_its_message_and_status(capsys):
  """A study command (compare, adaptive, precision) whose training is stopped prints the
  one-line resume message and exits with 143 (SIGTERM) or 130 (Ctrl-C), not a traceback."""
  from stepnet_jax import cli
  from stepnet_jax.training import loop

  def stopped(signal_name):
    def main(argv):
      raise loop.Preempted(12, signal_name)

    return main

  for signal_name, status in (('SIGTERM', 143), ('SIGINT', 130)):
    with pytest.raises(SystemExit) as ended:
      cli._stop_quietly(stopped(signal_name), ['prog'])
    assert ended.value.code == status
    err = capsys.readouterr().err
    assert f'{signal_name} at step 12: checkpoint saved; run the same command to resume' in err
    assert 'Traceback' not in err
  assert cli._stop_quietly(lambda argv: 'done', ['prog']) == 'done'  # a normal run is untouched


def test_a_reader_beside_a_trainer_always_gets_the_newest_complete_checkpoint(tmp_path):
  """A dashboard or a second shell loads a run while it trains: the trainer saves every step
  and keeps one checkpoint, so the newest one is often rotated away mid-read. Every load
  must succeed (it used to fail about one time in five, advising recovery for a healthy run)."""
  workdir = tmp_path / 'run'
  command, env = _driven(workdir, STEP_SLEEP='0.02')
  command += ['--config.train.checkpoint_every_steps=1', '--config.train.keep_checkpoints=1']
  command += ['--config.train.num_epochs=3']
  proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  loads, failures = 0, []
  try:
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
      if restore.latest_step(str(workdir)) is None:
        time.sleep(0.05)
        continue
      try:
        stepnet_jax.load(str(workdir))
        loads += 1
      except Exception as e:  # noqa: BLE001 (any failure counts)
        failures.append(f'{type(e).__name__}: {e}'[:300])
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-2000:]
  assert not failures, failures[:3]
  assert loads >= 5, loads
