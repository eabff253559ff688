"""Anytime inference on Fashion-MNIST: stopping policies on SteppingNet, AWN and the cascade.

  python -m stepnet_jax.adaptive --config configs/adaptive_fashion_mnist.py --workdir runs/adaptive
  python -m stepnet_jax.adaptive --config configs/adaptive_fashion_mnist.py --workdir /tmp/adaptive --quick

The networks are the comparison's (configs/compare_fashion_mnist.py: LeNet-3C1L, 3 epochs,
the same budgets), trained without a validation split of 5,000 training images on which
the thresholds' operating points are chosen and the selection module is trained (one
module per MAC price lambda). Results: see the README's anytime section.
"""

import os

import ml_collections

from stepnet_jax.config import load_file


def get_config():
  c = load_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'compare_fashion_mnist.py'))
  c.common.data.validation_examples = 5000
  c.families = ('steppingnet', 'awn', 'cascade')
  c.heuristics = ml_collections.ConfigDict(
    {'steppingnet': ('confidence', 'entropy'), 'awn': ('confidence',), 'cascade': ('confidence',)}
  )
  c.knobs = ml_collections.ConfigDict(
    {
      'confidence': (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999),
      'entropy': (2.0, 1.5, 1.2, 1.0, 0.8, 0.6, 0.45, 0.3, 0.2, 0.12, 0.07, 0.04, 0.02, 0.01),
    }
  )
  c.lambdas = (0.0, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 0.8)
  # Guan et al.'s joint training as rows of their own (`--config.joint_families=steppingnet,cascade`):
  # the selection module and the network fine-tuned together at each lambda.
  c.joint_families = ()
  c.tolerance = 0.003  # "within 0.3 point of the top exit", judged on the validation split
  # Where the selection modules are fitted: 'held' (half the validation split; the other half
  # chooses) or 'train' (policy_fit_examples of the networks' training images; the whole
  # validation split chooses). See AdaptiveConfig.policy_fit for when 'train' is sound.
  c.policy_fit = 'held'
  c.policy_fit_examples = 20000
  c.quick.common.data = ml_collections.ConfigDict(dict(train_subset=640, test_subset=300, validation_examples=128))
  c.quick.common.selection = ml_collections.ConfigDict(dict(epochs=3, batch_size=64))
  c.quick.knobs = ml_collections.ConfigDict(dict(confidence=(0.3, 0.6, 0.9), entropy=(1.5, 0.5)))
  c.quick.lambdas = (0.0, 0.5)
  return c
