"""Default main job: LeNet-3C1L (32 filters), 4 levels, on Fashion-MNIST (Debian's IDX files).

  python train.py --config configs/lenet3c1l_fashion_mnist.py --workdir runs/lenet3c1l_fmnist
  python evaluate.py --workdir runs/lenet3c1l_fmnist

Expected: top exit >= 88% test accuracy, exits increasing with level, in under 15
minutes on 2 CPU cores. Measured (bash scripts/main.sh, 2 CPU cores, AMD EPYC, 2026-11-25):
85.82 / 88.92 / 89.64 / 90.16% for levels 0-3 at 0.48 / 1.40 / 2.75 / 4.54 M MACs, 145 s
of training (an Intel Xeon gave 85.83 / 88.74 / 89.72 / 90.10% in 296 s).
"""

from stepnet_jax.config import base_config


def get_config():
  c = base_config()
  c.model.name = 'lenet3c1l'
  c.model.width = 1.0
  c.model.num_levels = 4
  c.model.level_widths = (0.25, 0.5, 0.75, 1.0)
  c.loss.exit_weights = (1.0, 1.0, 1.0, 1.0)
  c.train.num_epochs = 3
  c.train.batch_size = 128
  c.train.log_every_steps = 50
  c.optim.learning_rate = 2e-3
  c.optim.schedule = 'cosine'
  return c
