"""SteppingNet against AWN, AWN-sandwich, slimmable and independent ResNet-20s, at 32x32.

  python -m stepnet_jax.compare --config configs/compare_resnet20_fmnist32.py --workdir runs/compare_resnet20
  python -m stepnet_jax.compare --config configs/compare_resnet20_fmnist32.py --workdir /tmp/cmp --quick

Fashion-MNIST zero-padded to 32x32 (``data.pad_to``): no 32x32 natural-image set is
offline on the development machine. On a machine with internet,
``--config.common.data.name=cifar10`` runs the same comparison on CIFAR-10 through TFDS
(``--config.common.data.pad_to=0``; mock-tested only here).

CIFAR ResNet-20 at width 1 (16/32/64 channels: 40.55 M MACs on 32x32x1). The budgets are
AWN's four width points on its sqrt(2)-widened triangular network. Every method trains for
3 epochs with the same optimiser (Adam, cosine), batch size and data (the fairness rule of
the Fashion-MNIST comparison). SteppingNet's supernet is the base widened 1.5x (2.25x its
MACs) with 2 construction rounds: chosen so one seed fits in about 3 hours on 2 CPU cores
(ResNet-20 trains at about 180 images/s there). Results: results/compare_resnet20_fmnist32.*.
"""

import math

import ml_collections

from stepnet_jax.config import base_config


def get_config():
  c = ml_collections.ConfigDict()
  c.common = base_config()
  c.common.data.pad_to = 32
  c.common.model.name = 'resnet20'
  c.common.model.width = 1.0
  c.common.train.num_epochs = 3
  c.common.train.batch_size = 128
  c.common.train.log_every_steps = 50
  c.common.optim.learning_rate = 2e-3
  c.common.optim.schedule = 'cosine'
  c.methods = ('steppingnet', 'awn', 'awn_sandwich', 'slimmable', 'independent')
  c.extra_budgets = ()
  c.seeds = ()
  c.recipe = 'common'  # compare.RECIPES, as in configs/compare_fashion_mnist.py
  c.recipes = ''  # --config.recipes=a,b: one comparison per recipe on the validation split
  c.ledger = ''  # --config.ledger=results/ledger: reuse and record finished methods' results (studies/ledger.py)
  c.awn_reference = ''  # a compare.json whose AWN levels SteppingNet is also judged against (compare.md's targets)
  c.awn = ml_collections.ConfigDict(
    dict(widen=math.sqrt(2), widths=(0.25, 0.5, 0.75, 1.0), recipe='common', sandwich_widths=2)
  )
  # SteppingNet's structural choices as in the Fashion-MNIST comparison (one classifier per
  # exit, equal group shares topped up to each budget), with a narrower supernet and fewer
  # rounds for the time budget.
  c.steppingnet = ml_collections.ConfigDict(
    dict(
      model=dict(exit_heads='private'),
      loss=dict(exit_weights=()),
      construction=dict(
        widen=1.5,
        importance='taylor',
        importance_examples=512,
        class_threshold=0.5,
        allocation='uniform_fill',
        rank_per_mac=False,
        rounds=2,
        pretrain_epochs=0.5,
        round_epochs=0.25,
        finetune_distill_weight=0.0,
      ),
    )
  )
  # --quick: minutes on 2 CPU cores (checks the pipeline, not the numbers).
  c.quick = ml_collections.ConfigDict(
    dict(
      common=dict(
        model=dict(width=0.25),
        data=dict(train_subset=512, test_subset=300),
        train=dict(num_epochs=2, batch_size=64, eval_batch_size=300, progress=False),
      ),
      steppingnet=dict(construction=dict(rounds=1, pretrain_epochs=0.5, round_epochs=0.5, importance_examples=128)),
    )
  )
  return c
