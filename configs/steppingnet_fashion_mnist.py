"""SteppingNet construction on Fashion-MNIST: LeNet-3C1L widened 2x, 6 levels under MAC budgets.

  python train.py --config configs/steppingnet_fashion_mnist.py --workdir runs/steppingnet
  python evaluate.py --workdir runs/steppingnet

The budgets are the comparison's (configs/compare_fashion_mnist.py): AWN's four width
points on its sqrt(2)-widened LeNet-3C1L plus 0.15 and 0.42, as fractions of the dense
32-filter network's 7,146,624 MACs. This is the `steppingnet` run of
`python -m stepnet_jax.compare --config configs/compare_fashion_mnist.py`; its measured
accuracies are in the README's comparison section.
"""
from stepnet_jax.config import base_config


def get_config():
  c = base_config()
  c.method = 'steppingnet'
  c.model = 'lenet3c1l'
  c.width = 1.0
  c.num_levels = 6
  c.budgets = (0.072262, 0.15, 0.282091, 0.42, 0.594515, 1.0218)
  c.widen = 2.0
  c.importance = 'taylor'
  c.allocation = 'uniform'
  c.construct_rounds = 4
  c.pretrain_epochs = 0.25
  c.round_epochs = 0.0625
  c.finetune_distill_weight = 0.0
  c.num_epochs = 3
  c.batch_size = 128
  c.learning_rate = 2e-3
  c.schedule = 'cosine'
  return c
