"""The step profiler's bookkeeping: busy time as a union of intervals, and each compiled
operation's kind read from the HLO."""

import jax
import jax.numpy as jnp
import numpy as np

from stepnet_jax.studies import step_profile


def test_busy_time_is_the_union_of_the_operations_intervals():
  rng = np.random.RandomState(0)
  for _ in range(20):
    starts = rng.randint(0, 50, 6)
    intervals = [(int(a), int(a + rng.randint(0, 20))) for a in starts]
    covered = {t for a, b in intervals for t in range(a, b)}  # brute force on the integer grid
    assert step_profile._busy(intervals) == len(covered)


def test_each_compiled_operation_gets_its_kind_from_the_hlo():
  """A convolution, an in-place channel write, a slice and an addition, compiled by XLA:
  each instruction the executable runs is classified by what it computes."""
  w = jnp.ones((3, 3, 2, 4))

  def fn(x, cache):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    cache = jax.lax.dynamic_update_slice(cache, y, (0, 0, 0, 4))
    return cache, cache[..., :3] + 1.0

  x, cache = jnp.ones((2, 5, 5, 2)), jnp.zeros((2, 5, 5, 8))
  text = jax.jit(fn, donate_argnums=1).lower(x, cache).compile().as_text()
  kinds = step_profile.hlo_op_kinds(text)
  # the conv, the update, the slice-and-add fusion; parameters and constants move no data but count there
  assert set(kinds.values()) == {'conv', 'cache_write', 'elementwise', 'data_movement'}, kinds
  assert step_profile.onnx_kind('FusedConv') == 'conv' and step_profile.onnx_kind('ReorderInput') == 'layout'
  assert step_profile.onnx_kind('Concat') == 'data_movement' and step_profile.onnx_kind('Relu') == 'elementwise'
