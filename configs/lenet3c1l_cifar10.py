"""LeNet-3C1L (32 filters), 4 levels, on CIFAR-10 (TFDS; needs a machine that can download).

  pip install -e ".[tfds]"   # TensorFlow, to prepare the TFDS dataset once
  python train.py --config configs/lenet3c1l_cifar10.py --workdir runs/lenet3c1l_cifar10
  python evaluate.py --workdir runs/lenet3c1l_cifar10

Expected: roughly 65-70% top-exit test accuracy (Any-Width Networks report about 70%
for the dense LeNet). Not measured on the development machine, which has no internet.
"""

from stepnet_jax.config import base_config


def get_config():
  c = base_config()
  c.data.name = 'cifar10'
  c.data.augment = True
  c.model.name = 'lenet3c1l'
  c.model.num_levels = 4
  c.model.level_widths = (0.25, 0.5, 0.75, 1.0)
  c.train.num_epochs = 60
  c.train.batch_size = 128
  c.optim.learning_rate = 2e-3
  return c
