"""VGG-16 (CIFAR variant, BN), 4 levels, on CIFAR-100 (TFDS; needs a machine that can download).

  pip install -e ".[tfds]"
  python train.py --config configs/vgg16_cifar100.py --workdir runs/vgg16_cifar100
  python evaluate.py --workdir runs/vgg16_cifar100

Expected: about 70% top-exit test accuracy on a GPU in ~200 epochs (a dense CIFAR
VGG-16 reaches ~72%); the mask rule costs some accuracy at equal width. Not measured
on the development machine (no internet, CPU only).
"""

from stepnet_jax.config import base_config


def get_config():
  c = base_config()
  c.data.name = 'cifar100'
  c.data.augment = True
  c.model.name = 'vgg16'
  c.model.num_levels = 4
  c.optim.name = 'sgd'
  c.optim.learning_rate = 0.1
  c.optim.momentum = 0.9
  c.optim.weight_decay = 5e-4
  c.optim.schedule = 'cosine'
  c.train.num_epochs = 200
  c.train.batch_size = 128
  c.loss.distill_weight = 1.0
  return c
