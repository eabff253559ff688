"""SteppingNet's constructed 20-epoch structure trained from scratch with method joint (the
README's "Where the top's 0.45 point goes"): the comparison's common recipe, 20 epochs.

  python train.py --config configs/structure_fashion_mnist.py --workdir runs/structure_shared
  python train.py --config configs/structure_fashion_mnist.py --workdir runs/structure_top \
      --config.loss.exit_weights=0,0,0,0,0,1
  python train.py --config configs/structure_fashion_mnist.py:per_subnet --workdir runs/structure_per_subnet

The optional argument is ``model.batch_norm`` (default 'shared': the reusable network;
'per_subnet' gives every subnet its own BatchNorm and recomputes each one).
"""

from stepnet_jax.config import base_config

# Neurons per level of conv1 / conv2 / conv3 after construction in
# `python -m stepnet_jax.compare --config configs/compare_fashion_mnist.py --config.common.train.num_epochs=20`
# (seed 0, full training set).
ASSIGNMENT = '{"conv1": [8, 7, 5, 7, 7, 8], "conv2": [8, 5, 7, 5, 5, 11], "conv3": [10, 6, 5, 6, 7, 9]}'


def get_config(batch_norm: str = 'shared'):
  c = base_config()
  c.method = 'joint'
  c.model.name = 'lenet3c1l'
  c.model.num_levels = 6
  c.model.exit_heads = 'private'
  c.model.assignment = ASSIGNMENT
  c.model.batch_norm = batch_norm or 'shared'
  c.train.num_epochs = 20
  c.train.batch_size = 128
  c.train.log_every_steps = 50
  c.optim.learning_rate = 2e-3
  c.optim.schedule = 'cosine'
  return c
