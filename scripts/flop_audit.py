"""Compiled FLOPs of each step against 2 x that level's delta MACs: does step k compute only level k?

  python scripts/flop_audit.py --workdir runs/compare_resnet20/steppingnet   # a trained network
  python scripts/flop_audit.py --model resnet20 --input_shape 32,32,1 --width 1.5 --levels 4

Without ``--workdir`` the network is built untrained with random uneven level sizes per
neuron group (as construction leaves them; ``--seed``). Each step is lowered and compiled
at batch 1 (XLA:CPU may lower a batched convolution to a loop whose body its cost analysis
counts once) and XLA's cost analysis is read. XLA does not count the kernel taps that read
only zero padding, while the MAC count (k^2 x output positions per connection) does, so on
small feature maps the ratio falls below 1 by that share; batch norms, ReLUs and adds push
it above 1 on narrow levels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

import stepnet_jax
from stepnet_jax.core import stepping
from stepnet_jax.models import zoo
from stepnet_jax.studies import bench

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained run to audit (its newest checkpoint).')
_MODEL = flags.DEFINE_string('model', 'resnet20', 'Without --workdir: a name in models.MODELS.')
_INPUT = flags.DEFINE_list('input_shape', ['32', '32', '1'], 'Without --workdir: H,W,C.')
_WIDTH = flags.DEFINE_float('width', 1.0, 'Without --workdir: channel multiplier.')
_LEVELS = flags.DEFINE_integer('levels', 4, 'Without --workdir: levels.')
_SEED = flags.DEFINE_integer('seed', 0, 'Without --workdir: the random level sizes.')


def random_levels(name: str, input_shape, width: float, levels: int, seed: int) -> nnx.Module:
  """``name`` at ``width`` with each group's channels cut into ``levels`` random non-empty levels."""
  plain = nnx.eval_shape(
    lambda: zoo.build_model(name, num_classes=10, input_shape=input_shape, num_levels=1, width=width)
  )
  rng = np.random.RandomState(seed)
  assignment = {}
  for group, (channels,) in plain.assignment:
    if channels < levels:
      raise app.UsageError(f'group {group} has {channels} channels, fewer than {levels} levels')
    cuts = np.sort(rng.choice(np.arange(1, channels), levels - 1, replace=False))
    assignment[group] = [int(n) for n in np.diff(np.concatenate([[0], cuts, [channels]]))]
  return zoo.build_model(name, num_classes=10, input_shape=input_shape, num_levels=levels, assignment=assignment)


def audit(graphdef, variables, input_shape, num_levels: int, delta_macs, unpadded) -> list[dict]:
  """Per level: delta MACs, compiled FLOPs / 2 and their ratios to both MAC counts (batch 1)."""
  x = jnp.zeros((1,) + tuple(input_shape), jnp.uint8)
  rows = []
  for k, flops in enumerate(bench.step_flops(graphdef, variables, x, num_levels)):
    half = flops / 2
    rows.append(
      {
        'level': k,
        'delta_macs': int(delta_macs[k]),
        'half_flops': half,
        'ratio': half / delta_macs[k],
        'ratio_unpadded': half / unpadded[k],
      }
    )
  return rows


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  if _WORKDIR.value:
    net = stepnet_jax.load(_WORKDIR.value)
    model = nnx.merge(net.graphdef, net.variables)
    graphdef, variables, shape, levels = net.graphdef, net.variables, net.input_shape, net.num_levels
    delta, what = np.asarray(net.delta_macs), _WORKDIR.value
  else:
    shape = tuple(int(s) for s in _INPUT.value)
    model = random_levels(_MODEL.value, shape, _WIDTH.value, _LEVELS.value, _SEED.value)
    graphdef, variables = stepping.split(model)
    levels, delta = model.num_levels, model.delta_macs().sum(0)
    what = f'{_MODEL.value} width {_WIDTH.value} on {shape}, random levels {dict(model.assignment)}'
  print(what)
  print('level | delta MACs | compiled FLOPs / 2 | ratio | ratio to the MACs without padding taps')
  for r in audit(graphdef, variables, shape, levels, delta, bench.valid_tap_macs(model)):
    print(f'{r["level"]} | {r["delta_macs"]:,} | {r["half_flops"]:,.0f} | {r["ratio"]:.3f} | {r["ratio_unpadded"]:.3f}')
  print(f'backend {jax.default_backend()}')


if __name__ == '__main__':
  app.run(main)
