"""Where a trained stepping network's anytime time goes, on this machine (batch 256).

    python scripts/profile_levels.py WORKDIR [BATCH]

Prints, with the tap-product convolution (``layers.conv_by_taps``) for narrow
one-channel-input blocks off (the library convolution everywhere) and on
(``layers.TAPS_MAX_CHANNELS``, the default): the direct
top-level forwards, each step's latency, and per conv unit its level-0 block against
the whole layer (ms, MACs, GFLOP/s). Then, per level, the compact strategy's step of the
first 256 / 64 rows three ways: gathering whole cache rows and scattering them back (the
generic ``anytime`` path), the row-restricted step (``SteppingModel.step(..., rows)``,
the default for stepping networks), and a plain step of a batch that size (no gather).
Test images of Fashion-MNIST (Debian's dataset-fashion-mnist).
"""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import stepnet_jax
from stepnet_jax.core import layers
from stepnet_jax.data import datasets
from stepnet_jax.inference.timing import median_seconds, step_latencies


def main(workdir: str, batch: int = 256) -> None:
  x = jnp.asarray(datasets.load_dataset('idx:' + datasets.FASHION_MNIST_DIR).test_images[:batch])
  for label, rule in (
    ('library convolution everywhere', {}),
    ('tap products for narrow blocks (default)', dict(layers.TAPS_MAX_CHANNELS)),
  ):
    with layers.conv_rule(rule):
      net = stepnet_jax.load(workdir)  # fresh jitted functions, traced under this rule
      model = nnx.merge(net.graphdef, net.variables)
      top = net.num_levels - 1
      masked = median_seconds(lambda x: net.functions.forward(net.variables, x, top), x)
      blocked = median_seconds(lambda x: net.functions.forward_blocked(net.variables, x, top), x)
      steps = step_latencies(net, np.asarray(x))
      print(
        f'{label}: direct top forward masked {1e3 * masked:.1f} ms, level blocks {1e3 * blocked:.1f} ms; steps '
        + ', '.join(f'{1e3 * s:.1f}' for s in steps)
        + f' ms (sum {1e3 * sum(steps):.1f})',
        flush=True,
      )
      feats, macs = model.normalize(x), model.delta_macs()
      for i, unit in enumerate(model.units):
        inputs, feats = feats, unit(feats, top)
        if not isinstance(unit, layers.LevelConv):
          continue
        t0 = median_seconds(jax.jit(lambda f, u=unit: u.block(f, 0)), inputs)
        tt = median_seconds(jax.jit(lambda f, u=unit: u(f, top)), inputs)
        m0, mt = macs[i, 0] * batch, macs[i].sum() * batch
        print(
          f'  {model.unit_names[i]:>6}: level-0 block {1e3 * t0:6.2f} ms ({m0 / 1e6:7.1f} MMAC, '
          f'{2 * m0 / t0 / 1e9:5.1f} GFLOP/s); whole layer {1e3 * tt:6.2f} ms ({mt / 1e6:7.1f} MMAC, '
          f'{2 * mt / tt / 1e9:5.1f} GFLOP/s)',
          flush=True,
        )
  program = net.program
  generic = dataclasses.replace(program, step_rows=None)
  carry = jax.jit(program.start)(net.variables, x)
  print(f'cache: {sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(carry)) / 1e6:.1f} MB')
  for k in range(1, net.num_levels):
    parts = []
    for size in (batch, batch // 4):
      rows = jnp.arange(size)

      def whole_rows(c, k=k, rows=rows):
        sub = generic.step(net.variables, jax.tree.map(lambda a: a[rows], c), k)
        return jax.tree.map(lambda a, s: a.at[rows].set(s, unique_indices=True), c, sub)

      def row_step(c, k=k, rows=rows):
        return program.step_rows(net.variables, c, k, rows)

      def plain(c, k=k, size=size):
        return program.step(net.variables, jax.tree.map(lambda a: a[:size], c), k)

      tw, tr, tp = (median_seconds(jax.jit(f), carry, repeats=10) for f in (whole_rows, row_step, plain))
      parts.append(f'{size} rows: whole rows {1e3 * tw:.1f}, row step {1e3 * tr:.1f}, plain step {1e3 * tp:.1f} ms')
    print(f'level {k}: ' + '; '.join(parts), flush=True)


if __name__ == '__main__':
  main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
