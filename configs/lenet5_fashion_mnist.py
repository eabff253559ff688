"""LeNet-5 (with BN), 4 levels, on Fashion-MNIST (Debian's IDX files).

  python train.py --config configs/lenet5_fashion_mnist.py --workdir runs/lenet5_fmnist
  python evaluate.py --workdir runs/lenet5_fmnist

Expected: top exit about 91% test accuracy (measured: 88.5 / 90.6 / 91.0 / 91.3% for
levels 0-3 at 0.13 / 0.34 / 0.62 / 0.98 M MACs) in about 8 minutes on 2 CPU cores.
"""

from stepnet_jax.config import base_config


def get_config():
  c = base_config()
  c.model.name = 'lenet5'
  c.model.width = 2.0  # 12/32 filters, 240/168 units: the mask rule removes ~40% of connections
  c.model.num_levels = 4
  c.train.num_epochs = 8
  c.train.batch_size = 128
  c.optim.learning_rate = 2e-3
  return c
