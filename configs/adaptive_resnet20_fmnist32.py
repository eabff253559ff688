"""Anytime inference at 32x32: stopping policies on a constructed ResNet-20, AWN and the cascade.

  python -m stepnet_jax.adaptive --config configs/adaptive_resnet20_fmnist32.py --workdir runs/adaptive_resnet20 \
    --config.networks=runs/compare_resnet20
  python -m stepnet_jax.adaptive --config configs/adaptive_resnet20_fmnist32.py --workdir /tmp/adaptive --quick

The networks are the 32x32 comparison's (configs/compare_resnet20_fmnist32.py: ResNet-20 on
Fashion-MNIST zero-padded to 32x32, 3 epochs, the same budgets), trained on every training
image: ``networks`` reads a finished comparison's runs where they are (without it the study
trains its own in --workdir). A ResNet-20 takes hours to train on a CPU, so instead of a
validation split carved from the training images (the 28x28 study's choice), 5,000 of the
10,000 test images fit the selection module (REINFORCE, on one half) and choose every
operating point (the other half); every reported accuracy is on the other 5,000 test images.
``--config.common.data.name=cifar10 --config.common.data.pad_to=0`` runs it on CIFAR-10
through TFDS on a machine with internet. Results: results/anytime_resnet20_fmnist32.*.
"""

import os

import ml_collections

from stepnet_jax.config import load_file


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))
  c = load_file(os.path.join(here, 'adaptive_fashion_mnist.py'))
  compare = load_file(os.path.join(here, 'compare_resnet20_fmnist32.py'))
  for key in ('common', 'awn', 'steppingnet', 'extra_budgets'):
    c[key] = compare[key]
  c.common.data.validation_examples = 0
  c.policy_split = 'test'
  c.policy_examples = 5000
  c.networks = ''
  c.quick.policy_examples = 128
  c.quick.common.data.validation_examples = 0
  c.quick.common.model = ml_collections.ConfigDict(dict(width=0.25))
  c.quick.common.train = ml_collections.ConfigDict(
    dict(num_epochs=2, batch_size=64, eval_batch_size=300, progress=False)
  )
  c.quick.steppingnet = compare.quick.steppingnet
  return c
