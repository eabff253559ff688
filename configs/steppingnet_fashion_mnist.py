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
  c.model.name = 'lenet3c1l'
  c.model.width = 1.0
  c.model.num_levels = 6
  c.construction.budgets = (0.072262, 0.15, 0.282091, 0.42, 0.594515, 1.0218)
  c.construction.widen = 2.0
  c.construction.importance = 'taylor'
  c.construction.allocation = 'uniform'
  c.construction.rounds = 4
  c.construction.pretrain_epochs = 0.25
  c.construction.round_epochs = 0.0625
  c.construction.finetune_distill_weight = 0.0
  c.train.num_epochs = 3
  c.train.batch_size = 128
  c.optim.learning_rate = 2e-3
  c.optim.schedule = 'cosine'
  return c
