"""SteppingNet against AWN, slimmable, non-uniform (single-path) and independent networks on Fashion-MNIST.

  python -m stepnet_jax.compare --config configs/compare_fashion_mnist.py --workdir runs/compare
  python -m stepnet_jax.compare --config configs/compare_fashion_mnist.py --workdir /tmp/cmp --quick

LeNet-3C1L (32 filters = 7,146,624 MACs dense); budgets are AWN's four width points on
its sqrt(2)-widened triangular network plus 0.15 and 0.42. Every method trains for
`common.train.num_epochs` epochs with the same optimiser (Adam, cosine) and batch size;
`--config.recipe=NAME` trains every method on another recipe of `compare.RECIPES`
(`published`: Any-Width Networks' SGD on the summed subnet losses; `sgd_cosine_1e-4`,
`sgd_cosine_5e-4`; each with `_torch`, PyTorch's default initialisation, as AWN's code
has it), and `--config.awn.recipe=published` (or `published_torch`, AWN's published setting
in full) gives AWN alone its SGD recipe. 3 epochs for every
method keep the full run within 90 minutes on 2 CPU cores (measured: 70.6 min). Expected
and measured results: see the README's comparison section.
"""

import math

import ml_collections

from stepnet_jax.config import base_config


def get_config():
  c = ml_collections.ConfigDict()
  c.common = base_config()
  c.common.model.name = 'lenet3c1l'
  c.common.model.width = 1.0
  c.common.train.num_epochs = 3
  c.common.train.batch_size = 128
  c.common.train.log_every_steps = 50
  c.common.optim.learning_rate = 2e-3
  c.common.optim.schedule = 'cosine'
  # Also available (compare.ENTRIES): 'awn_sandwich' (AWN trained with the sandwich rule),
  # 'multipath' (Yang & Fan's multi-path subnets: one full training per budget), 'steppingnet_tri'.
  c.methods = ('steppingnet', 'awn', 'slimmable', 'singlepath', 'independent')
  c.extra_budgets = (0.15, 0.42)
  # () trains each method once (common.seed); --config.seeds=0,1,2 once per seed, in
  # WORKDIR/seedS, with mean and standard deviation per level in WORKDIR/compare.json.
  c.seeds = ()
  c.recipe = 'common'  # the recipe every method trains on: compare.RECIPES ('common' = the common section as set here)
  # --config.recipes=common,published_torch,...: the comparison once per recipe on the
  # validation split (common.data.validation_examples), in WORKDIR/recipe_NAME, and
  # WORKDIR/recipes.json naming the one with the best mean validation accuracy.
  c.recipes = ''  # text, split at commas (an empty tuple here would take only quoted names)
  c.ledger = ''  # --config.ledger=results/ledger: reuse and record finished methods' results (studies/ledger.py)
  c.awn_reference = ''  # a compare.json whose AWN levels SteppingNet is also judged against (compare.md's targets)
  c.awn = ml_collections.ConfigDict(
    dict(widen=math.sqrt(2), widths=(0.25, 0.5, 0.75, 1.0), recipe='common', sandwich_widths=2)
  )
  # A method's section overrides `common` for that method (nested like `common`).
  # SteppingNet's own structural choices (picked on a validation split: README, "How the
  # SteppingNet settings were chosen"): one classifier per exit, the equal layer shares
  # of each level topped up with whatever neurons still fit its budget, and a supernet
  # three times as wide as the base to choose the neurons from.
  # loss.exit_weights: one weight per budget (() = 1 for every exit).
  c.steppingnet = ml_collections.ConfigDict(
    dict(
      model=dict(exit_heads='private'),
      loss=dict(exit_weights=()),
      construction=dict(
        widen=3.0,
        importance='taylor',
        importance_examples=512,
        class_threshold=0.5,
        allocation='uniform_fill',
        rank_per_mac=False,
        rounds=4,
        pretrain_epochs=0.25,
        round_epochs=0.0625,
        finetune_distill_weight=0.0,
      ),
    )
  )
  # Yang & Fan's non-uniform subnets (singlepath, multipath): the background network trains
  # alone for half an epoch; single-path then carves its five smaller subnets out at epochs
  # 0.5, 0.75, 1.0, 1.25 and 1.5 (the default schedule: evenly up to half the run);
  # multi-path prunes each run's background once, at 0.5, except the top budget's run,
  # whose background already fits its budget (a plain training).
  c.nonuniform = ml_collections.ConfigDict(
    dict(construction=dict(pretrain_epochs=0.5), baseline=dict(generation_epochs=(), recalibrate_batches=50))
  )
  # --quick: a few minutes on 2 CPU cores, for CI (checks the pipeline, not the numbers).
  # Its fields override the ones above (sections merge field by field).
  c.quick = ml_collections.ConfigDict(
    dict(
      common=dict(
        model=dict(width=0.25),
        data=dict(train_subset=512, test_subset=300),
        train=dict(num_epochs=2, batch_size=64, eval_batch_size=300, progress=False),
      ),
      extra_budgets=(),
      steppingnet=dict(
        construction=dict(widen=2.0, rounds=2, pretrain_epochs=0.5, round_epochs=0.5, importance_examples=128)
      ),
      nonuniform=dict(construction=dict(pretrain_epochs=0.5), baseline=dict(recalibrate_batches=5)),
    )
  )
  return c
