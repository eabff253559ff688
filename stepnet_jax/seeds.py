"""Named seed streams: every purpose that draws random numbers from a run's ``seed``.

A purpose's seed is ``seed + its offset`` (``seed_for``). The offsets are the values the
code has always used, so runs, checkpoints and recorded results stay bit-identical; what
changed is that each is named and documented once, here, instead of written as a bare
number at its call site. Offsets are far apart so that the streams of seeds 0..99 never
meet (``CONSTRUCTION_ROUND`` adds the round index, at most a few dozen).
"""

from __future__ import annotations

import enum


class Stream(enum.IntEnum):
  """Offsets from a run's seed, one per purpose."""

  TRAIN_STEP_KEY = 1  # the per-step key an objective receives (training.step.make_train_step)
  BN_RECALIBRATION_ORDER = 7  # which training batches re-estimate BN statistics (methods.nonuniform)
  SELECTOR_TRAINING = 17  # the REINFORCE selection module's train step (methods.selection)
  QUANTIZED_FINETUNE = 29  # quantization-aware fine-tunes of the precision study (studies.precision)
  BN_AFFINE_RETRAINING = 31  # BN scale/bias retrained per plane count (methods.progressive)
  VALIDATION_HALVES = 777  # the stopping study's split of the held-out images in two (studies.stopping)
  POLICY_TEST_SPLIT = 888  # which test images fit the stopping study's policies (policy_split='test')
  POLICY_FIT_SUBSET = 2000  # which training images fit the stopping study's selection modules (policy_fit='train')
  CONSTRUCTION_ROUND = 1000  # + round: importance examples of each construction round (methods.construct)
  VALIDATION_SPLIT = 12345  # which training images are held out for validation (data.datasets)


def seed_for(seed: int, stream: Stream, index: int = 0) -> int:
  """The integer seed of ``stream`` (its ``index``-th draw, e.g. a construction round) for a
  run seeded with ``seed``."""
  return int(seed) + int(stream) + int(index)
