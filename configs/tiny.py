"""Tiny config used by the tests: LeNet-3C1L at width 0.25 on a Fashion-MNIST subset.

  python train.py --config configs/tiny.py --workdir /tmp/tiny

Runs in well under a minute on 2 CPU cores; only checks that the pipeline learns
(every exit well above the 10% chance level).
"""

from stepnet_jax.config import base_config


def get_config():
  c = base_config()
  c.model.name = 'lenet3c1l'
  c.model.width = 0.25
  c.model.num_levels = 3
  c.data.train_subset = 2048
  c.data.test_subset = 1000
  c.train.num_epochs = 2
  c.train.batch_size = 64
  c.train.eval_batch_size = 500
  c.train.log_every_steps = 8
  c.optim.learning_rate = 3e-3
  return c
