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


def test_operations_inside_loops_and_branches_are_classified_and_the_loops_are_control():
  w = jnp.ones((3, 3, 2, 2))

  def fn(x, flag):
    conv = lambda v: jax.lax.conv_general_dilated(v, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))  # noqa: E731
    y = jax.lax.cond(flag, conv, lambda v: jnp.sin(v) * 2.0, x)
    return jax.lax.fori_loop(0, 3, lambda i, v: conv(v) + 1.0, y)

  text = jax.jit(fn).lower(jnp.ones((2, 5, 5, 2)), True).compile().as_text()
  kinds = step_profile.hlo_op_kinds(text)
  assert step_profile.CONTROL in kinds.values()  # the loop and the branch
  loops = [name for name, kind in kinds.items() if kind == step_profile.CONTROL]
  assert all(any(op in name for op in ('while', 'conditional', 'call', 'cond')) for name in loops), loops
  assert list(kinds.values()).count('conv') >= 2  # a convolution in a branch and one in the loop body
