"""CIFAR ResNet-20, 4 levels (one level per channel along each residual stream), on CIFAR-10.

  pip install -e ".[tfds]"
  python train.py --config configs/resnet20_cifar10.py --workdir runs/resnet20_cifar10
  python evaluate.py --workdir runs/resnet20_cifar10

Expected: about 90% top-exit test accuracy on a GPU in 160 epochs (dense ResNet-20:
91.3%, He et al.); lower exits trade accuracy for MACs. Not measured on the
development machine (no internet, CPU only).
"""
from stepnet_jax.config import base_config


def get_config():
  c = base_config()
  c.dataset = 'cifar10'
  c.model = 'resnet20'
  c.width = 1.5        # widen to win back connections the mask rule removes
  c.num_levels = 4
  c.augment = True
  c.optimizer = 'sgd'
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.weight_decay = 1e-4
  c.schedule = 'cosine'
  c.num_epochs = 160
  c.batch_size = 128
  c.distill_weight = 1.0
  return c
