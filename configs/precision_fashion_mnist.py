"""Precision study on Fashion-MNIST: class-based per-neuron weight bits (Sun et al.) against
uniform, magnitude and random bits at the same MAC-weighted mean, after the same
quantization-aware fine-tune.

  python -m stepnet_jax.precision --config configs/precision_fashion_mnist.py --workdir runs/precision
  python -m stepnet_jax.precision --config configs/precision_fashion_mnist.py --workdir /tmp/precision --quick

The float network is the default main job's (LeNet-3C1L, 4 levels, 3 epochs), trained
without 5,000 held-out training images on which the bits are searched. Results: see the
README's precision section.
"""

import os

import ml_collections

from stepnet_jax.config import load_file


def get_config():
  c = ml_collections.ConfigDict()
  c.common = load_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'lenet3c1l_fashion_mnist.py'))
  c.common.data.validation_examples = 5000
  c.precision = ml_collections.ConfigDict(
    dict(
      budgets=(2.0, 3.0, 4.0),  # MAC-weighted mean weight bits of the hidden neurons
      min_bits=1,
      max_bits=8,  # each neuron's range
      head_bits=8,  # the classifier is not searched (0.1% of the MACs)
      act_bits=8,  # hidden activations, unsigned, clips calibrated on training images
      slopes=(1.0, 2.0, 4.0, 8.0),  # bits = clip(round(offset + slope * score)), offset fit to the budget
      calibration_images=1000,
      importance_examples=2000,
      finetune_epochs=1.0,
      finetune_learning_rate=2e-4,
      finetune_seeds=(0, 1, 2),  # each assignment fine-tuned with these seed offsets; accuracy = mean
      search_finetune_epochs=0.25,  # each searched candidate is ranked after this short fine-tune (0: without)
      search_rank_by='loss',  # candidates ranked by the top exit's validation 'loss' or 'accuracy'
      # ProgressiveNN: N bitwise-binary planes from one quantization-aware run, BN
      # statistics re-estimated per plane count; 0 planes skips it (and the staircases)
      progressive_planes=8,
      progressive_epochs=1.0,
      progressive_learning_rate=2e-4,
      progressive_bn_batches=50,
      progressive_bn_affine_steps=100,  # BN scale and bias also trained per plane count (Adam, all else frozen); 0: statistics only
      progressive_bn_affine_learning_rate=1e-3,
      # the fewest bits per method within 0.5 point of float on validation (no fine-tune), budgets bisected
      min_bits_tolerance=0.005,
      min_bits_step=0.25,
      min_bits_finetune=True,
    )
  )
  c.quick = ml_collections.ConfigDict(
    dict(
      common=dict(
        model=dict(width=0.25),
        data=dict(train_subset=640, test_subset=300, validation_examples=128),
        train=dict(num_epochs=1, batch_size=64, eval_batch_size=300, progress=False),
      ),
      precision=dict(
        budgets=(2.0, 4.0),
        slopes=(1.0, 4.0),
        calibration_images=128,
        importance_examples=300,
        finetune_epochs=0.5,
        finetune_seeds=(0,),
        search_finetune_epochs=0.0,
        progressive_epochs=0.5,
        progressive_bn_batches=5,
        progressive_bn_affine_steps=5,
        min_bits_step=1.0,
        min_bits_finetune=False,
      ),
    )
  )
  return c
