"""Train a stepping network: python train.py --config configs/NAME.py --workdir DIR.

Every config field can be overridden, e.g. --config.num_epochs=2. A workdir that
already holds checkpoints resumes from the latest one.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from stepnet_jax import config as config_lib
from stepnet_jax import train_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  cfg = config_lib.from_dict(_CONFIG.value)
  result = train_lib.train_and_evaluate(cfg, _WORKDIR.value)
  acc = ' '.join(f'{a:.4f}' for a in result['test_accuracy'])
  print(f'done: step {result["step"]}, test accuracy per level {acc}, {result["seconds"]:.0f} s')


if __name__ == '__main__':
  app.run(main)
