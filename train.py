"""Train a stepping network: python train.py --config configs/NAME.py --workdir DIR.

Every config field can be overridden, e.g. --config.train.num_epochs=2 (fields and
defaults: stepnet_jax/config.py). ``--config.method`` picks plain joint training of a
given assignment (a workdir that already holds checkpoints resumes from the latest
one), SteppingNet construction under MAC budgets, or the non-uniform baseline (these
two start over unless the workdir holds their finished run).
"""

from absl import flags, logging
from ml_collections import config_flags

from stepnet_jax import cli
from stepnet_jax import config as config_lib
from stepnet_jax.data import sharding
from stepnet_jax.methods import trainers
from stepnet_jax.training import loop, run

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
_RESTORE_PREVIOUS = flags.DEFINE_bool(
  'restore_previous',
  False,
  'If the newest checkpoint cannot be read, resume from the newest one that can '
  '(the unreadable ones are moved to WORKDIR/unreadable_checkpoints, never deleted).',
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  cfg = trainers.validate(config_lib.from_dict(_CONFIG.value))
  sharding.initialize()
  print(f'data parallel: {sharding.describe()}', flush=True)
  try:
    result = trainers.train(cfg, _WORKDIR.value, restore_previous=_RESTORE_PREVIOUS.value)
    run.check_learned(result, cfg)  # a run that ended at chance is a failure, not "done"
  except loop.Preempted as stopped:
    cli.exit_with(
      f'{stopped}: python train.py --config ... --workdir {_WORKDIR.value} (same settings)',
      stopped.exit_status,
      stdout=True,
    )
  except Exception as e:
    message = cli.failure_message(e)
    if message is None:
      raise
    cli.exit_with(message, 1)
  acc = ' '.join(f'{a:.4f}' for a in result['test_accuracy'])
  step = f'step {result["step"]}, ' if 'step' in result else ''
  print(f'done: {step}test accuracy per level {acc}, {result["seconds"]:.0f} s')


if __name__ == '__main__':
  cli.run_app(main, cli.parse_flags_with_hints)
