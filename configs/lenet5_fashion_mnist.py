"""LeNet-5 (with BN), 4 levels, on Fashion-MNIST (Debian's IDX files).

  python train.py --config configs/lenet5_fashion_mnist.py --workdir runs/lenet5_fmnist
  python evaluate.py --workdir runs/lenet5_fmnist

Expected: top exit about 89% test accuracy in a few minutes on 2 CPU cores
(the README records the measured numbers).
"""
from stepnet_jax.config import base_config


def get_config():
  c = base_config()
  c.model = 'lenet5'
  c.width = 2.0        # 12/32 filters, 240/168 units: the mask rule removes ~40% of connections
  c.num_levels = 4
  c.num_epochs = 8
  c.batch_size = 128
  c.learning_rate = 2e-3
  return c
