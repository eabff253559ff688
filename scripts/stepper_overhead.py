"""The library's own cost per call: ``Stepper`` methods against the bare jitted functions.

    python scripts/stepper_overhead.py [MODEL] [BATCH]

Untrained ``MODEL`` (default lenet3c1l, 28x28x1, 4 levels) at ``BATCH`` (default 1): the
median microseconds of ``Stepper.start``, ``Stepper.advance`` (level 0 to 1) and
``Stepper.predict`` (Confidence 0.9, masked strategy), each beside the jitted function it
calls (``StepFunctions.start`` / ``levels[1]``, ``anytime.make_predict``), three rounds.
The difference is the Python each method adds: argument checks, pytree handling.
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from stepnet_jax.core import anytime
from stepnet_jax.inference import policies
from stepnet_jax.inference.stepper import Stepper
from stepnet_jax.models import zoo

SHAPES = {'lenet3c1l': (28, 28, 1), 'resnet20': (32, 32, 1), 'vgg16': (32, 32, 3), 'mobilenetv2': (32, 32, 1)}


def median_us(fn, calls: int = 300) -> float:
  """Median microseconds of ``fn()`` (result awaited) after 20 warm-up calls."""
  for _ in range(20):
    jax.block_until_ready(fn())
  times = []
  for _ in range(calls):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return 1e6 * float(np.median(times))


def main(model: str = 'lenet3c1l', batch: int = 1) -> None:
  shape = SHAPES[model]
  net = Stepper(zoo.build_model(model, num_classes=10, input_shape=shape, num_levels=4))
  x = jnp.asarray(np.random.RandomState(0).randint(0, 256, (batch,) + shape).astype(np.uint8))
  fns, v = net.functions, net.variables
  policy = policies.Confidence(0.9)
  bare_predict = anytime.make_predict(net.program, 'masked')
  pairs = {
    'start': (lambda: net.start(x), lambda: fns.start(v, x)),
    'start + advance': (lambda: net.advance(net.start(x)), lambda: fns.levels[1](v, fns.start(v, x))),
    'predict': (lambda: net.predict(x, policy, 'masked'), lambda: bare_predict(v, x, policy)),
  }
  for name, (method, bare) in pairs.items():
    rounds = [(median_us(method), median_us(bare)) for _ in range(3)]
    m, b = np.median(np.asarray(rounds), axis=0)
    print(f'{name:16s} Stepper {m:8.1f} us   bare jit {b:8.1f} us   difference {m - b:+7.1f} us')


if __name__ == '__main__':
  main(*(sys.argv[1:2] or ['lenet3c1l']), *(int(a) for a in sys.argv[2:3]))
