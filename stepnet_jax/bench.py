"""Benchmark of the three costs that make a stepping network worth having.

    python -m stepnet_jax.bench [--model lenet3c1l] [--levels 4] [--batch 256] [--json FILE]

Measured side by side, in one run, on the machine at hand:
 (a) joint K-exit train step / single-exit train step of the same network (target <= 1.15);
 (b) sum over k of step-k latency / fastest direct top-level forward, with both the
     masked full-width and the level-block forward reported (target <= 1.15);
 (c) per level, XLA cost-analysis FLOPs of the compiled step / (2 x delta MACs x batch)
     (target 0.9..1.2): the compiled step k really does only level k's work;
 (d) the latency of each level block of the costliest conv layer against the whole layer.
"""
from __future__ import annotations

import argparse
import functools
import json
import platform

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stepnet_jax import config as config_lib
from stepnet_jax import evaluation, layers, models, stepping, train_lib
from stepnet_jax.api import Stepper
from stepnet_jax.timing import median_seconds


def compiled_flops(fn, *args) -> float:
  """FLOPs XLA's cost analysis reports for ``fn(*args)`` once compiled."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost['flops'])


def valid_tap_macs(model) -> np.ndarray:
  """Delta MACs per level without the kernel taps that land on SAME padding: [K].

  The library counts kernel_size^2 taps per output pixel (the usual convention);
  XLA's cost analysis counts only taps on real inputs, which is less for SAME-padded
  convolutions on small feature maps.
  """
  delta = model.delta_macs().astype(np.float64)
  shape = tuple(model.input_shape)
  for row, unit in enumerate(model.units):
    if isinstance(unit, layers.LevelConv) and unit.padding == 'SAME':
      k, s = unit.kernel_size, unit.stride
      lo = (k - 1) // 2   # XLA's SAME: the extra padding goes after
      per_axis = [sum(min(o * s - lo + k, n) - max(o * s - lo, 0) for o in range(-(-n // s))) / (k * -(-n // s))
                  for n in shape[:2]]
      delta[row] *= per_axis[0] * per_axis[1]
    _, shape = unit.delta_macs(shape)
  return delta.sum(axis=0)


def conv_block_costs(model, x, top: int, repeats: int) -> dict:
  """Latency of each level block of the model's costliest conv layer, and of the whole layer.

  Outputs are reduced to a scalar inside the jit, so only the convolution is timed.
  """
  layer_macs = model.delta_macs().sum(axis=1)[:-1]
  convs = [i for i, u in enumerate(model.units) if isinstance(u, layers.LevelConv)]
  if not convs:
    return {}
  i = max(convs, key=lambda j: layer_macs[j])
  unit = model.units[i]
  features = model.normalize(x)
  for u in model.units[:i]:
    features = u(features, top)
  blocks = [median_seconds(jax.jit(lambda f, k=k: unit.block(f, k).sum()), features, repeats=repeats)
            for k in range(top + 1)]
  whole = median_seconds(jax.jit(lambda f: unit(f, top).sum()), features, repeats=repeats)
  return {'layer': model.unit_names[i], 'block_ms': [1e3 * t for t in blocks], 'whole_layer_ms': 1e3 * whole}


def single_exit_train_step(graphdef, tx):
  """Plain training of the same network: one exit (the top one), one loss."""

  def loss_fn(params, stats, x, y):
    model = nnx.merge(graphdef, params, stats, copy=True)
    logits = model(x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), nnx.state(model, nnx.BatchStat)

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, x, y):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.batch_stats, x, y)
    updates, opt = tx.update(grads, state.opt_state, state.params)
    return train_lib.TrainState(state.step + 1, optax.apply_updates(state.params, updates), stats, opt), loss

  return step


def _time_train_step(step, state, x, y, repeats):
  holder = {'state': state}

  def run():
    holder['state'], out = step(holder['state'], x, y)
    return out

  return median_seconds(run, repeats=repeats)


def run(model_name: str = 'lenet3c1l', num_levels: int = 4, batch: int = 256, train_batch: int = 128,
        width: float = 1.0, input_shape=(28, 28, 1), repeats: int = 10) -> dict:
  rng = np.random.RandomState(0)
  model = models.build_model(model_name, num_classes=10, input_shape=input_shape, num_levels=num_levels,
                             width=width)
  delta = model.delta_macs().sum(axis=0)

  # (a) training cost.
  cfg = config_lib.from_dict({'model': model_name, 'num_levels': num_levels, 'width': width,
                              'batch_size': train_batch})
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  tx = train_lib.make_optimizer(cfg, 100)
  xt = jnp.asarray(rng.randint(0, 256, (train_batch,) + tuple(input_shape)), jnp.uint8)
  yt = jnp.asarray(rng.randint(0, 10, (train_batch,)), jnp.int32)
  fresh = lambda: train_lib.TrainState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params),
                                       jax.tree.map(jnp.copy, stats), tx.init(params))
  t_joint = _time_train_step(train_lib.make_train_step(graphdef, cfg, tx), fresh(), xt, yt, repeats)
  t_single = _time_train_step(single_exit_train_step(graphdef, tx), fresh(), xt, yt, repeats)

  # (b) stepping latency against direct top-level forwards.
  net = Stepper(model)
  graphdef, variables, fns = net.graphdef, net.variables, net.functions
  x = jnp.asarray(rng.randint(0, 256, (batch,) + tuple(input_shape)), jnp.uint8)
  step_s = evaluation.step_latencies(net, np.asarray(x), repeats=repeats)
  top = num_levels - 1
  t_masked = median_seconds(functools.partial(fns.forward, level=top), variables, x, repeats=repeats)
  t_blocked = median_seconds(functools.partial(fns.forward_blocked, level=top), variables, x, repeats=repeats)

  # (c) what the compiled steps compute (pure, non-donating functions: the same computation).
  caches = [stepping.start(graphdef, variables, x)]
  for k in range(1, top):
    caches.append(stepping.step(graphdef, variables, caches[-1], k))
  flops = [compiled_flops(functools.partial(stepping.start, graphdef), variables, x)]
  flops += [compiled_flops(functools.partial(stepping.step, graphdef, level=k), variables, caches[k - 1])
            for k in range(1, num_levels)]
  flops_masked_top = compiled_flops(functools.partial(stepping.forward, graphdef, level=top), variables, x)
  valid = valid_tap_macs(model)

  # (d) where (b) comes from: the costliest conv layer, each level block against the whole layer.
  conv_layer = conv_block_costs(model, x, top, repeats)

  fastest = min(t_masked, t_blocked)
  return {
      'machine': {'backend': jax.default_backend(), 'devices': str(jax.devices()),
                  'processor': platform.processor() or platform.machine(), 'jax': jax.__version__},
      'model': model_name, 'width': width, 'num_levels': num_levels, 'input_shape': list(input_shape),
      'train': {'batch': train_batch, 'joint_step_ms': 1e3 * t_joint, 'single_exit_step_ms': 1e3 * t_single,
                'ratio': t_joint / t_single, 'target': '<= 1.15'},
      'stepping': {'batch': batch, 'step_ms': [1e3 * s for s in step_s], 'sum_steps_ms': 1e3 * sum(step_s),
                   'masked_forward_ms': 1e3 * t_masked, 'blocked_forward_ms': 1e3 * t_blocked,
                   'fastest_forward': 'masked' if t_masked <= t_blocked else 'blocked',
                   'ratio': sum(step_s) / fastest, 'target': '<= 1.15'},
      'flops': {'delta_macs': [int(d) for d in delta], 'step_flops': flops,
                'ratio': [f / (2.0 * d * batch) for f, d in zip(flops, delta)],
                'ratio_to_valid_taps': [f / (2.0 * v * batch) for f, v in zip(flops, valid)],
                'masked_top_forward_ratio_to_kept': flops_masked_top / (2.0 * delta.sum() * batch),
                'target': '0.9 .. 1.2'},
      'conv_layer': conv_layer,
  }


def format_report(r: dict) -> str:
  t, s, f = r['train'], r['stepping'], r['flops']
  lines = [
      f'{r["model"]} width {r["width"]}, {r["num_levels"]} levels, input {r["input_shape"]}, '
      f'{r["machine"]["backend"]} ({r["machine"]["processor"]}), jax {r["machine"]["jax"]}',
      f'(a) train step, batch {t["batch"]}: joint {t["joint_step_ms"]:.1f} ms, single exit '
      f'{t["single_exit_step_ms"]:.1f} ms, ratio {t["ratio"]:.3f} (target {t["target"]})',
      f'(b) batch {s["batch"]}: steps ' + ' + '.join(f'{m:.2f}' for m in s['step_ms']) +
      f' = {s["sum_steps_ms"]:.2f} ms; direct top forward masked {s["masked_forward_ms"]:.2f} ms, '
      f'level-block {s["blocked_forward_ms"]:.2f} ms; ratio to fastest ({s["fastest_forward"]}) '
      f'{s["ratio"]:.3f} (target {s["target"]})',
      '(c) compiled step FLOPs / (2 x delta MACs x batch): ' + ', '.join(f'L{k} {x:.3f}' for k, x in enumerate(f['ratio']))
      + f' (target {f["target"]}); without the taps on SAME padding: '
      + ', '.join(f'{x:.3f}' for x in f['ratio_to_valid_taps'])
      + f'; masked top forward does {f["masked_top_forward_ratio_to_kept"]:.2f}x the kept work',
  ]
  c = r.get('conv_layer')
  if c:
    lines.append(f'(d) {c["layer"]}: level blocks ' + ', '.join(f'{m:.1f}' for m in c['block_ms'])
                 + f' ms vs the whole layer {c["whole_layer_ms"]:.1f} ms (batch {s["batch"]})')
  return '\n'.join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='lenet3c1l')
  p.add_argument('--levels', type=int, default=4)
  p.add_argument('--width', type=float, default=1.0)
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--train_batch', type=int, default=128)
  p.add_argument('--input_shape', default='28,28,1')
  p.add_argument('--repeats', type=int, default=10)
  p.add_argument('--json', default=None)
  a = p.parse_args(argv)
  shape = tuple(int(s) for s in a.input_shape.split(','))
  r = run(a.model, a.levels, a.batch, a.train_batch, a.width, shape, a.repeats)
  print(format_report(r))
  if a.json:
    with open(a.json, 'w') as f:
      json.dump(r, f, indent=2)
    print(f'wrote {a.json}')


if __name__ == '__main__':
  main()
