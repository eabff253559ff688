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
  c.data.name = 'cifar10'
  c.data.augment = True
  c.model.name = 'resnet20'
  c.model.width = 1.5  # widen to win back connections the mask rule removes
  c.model.num_levels = 4
  c.optim.name = 'sgd'
  c.optim.learning_rate = 0.1
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.schedule = 'cosine'
  c.train.num_epochs = 160
  c.train.batch_size = 128
  c.loss.distill_weight = 1.0
  return c
