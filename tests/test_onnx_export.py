"""The ONNX export: each lowered primitive against JAX, and exported networks run by
onnxruntime in a process that imports neither JAX nor the library."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testlib

ort = pytest.importorskip('onnxruntime')
onnx = pytest.importorskip('onnx')

from stepnet_jax.core import layers  # noqa: E402
from stepnet_jax.inference import export, onnx_lowering, policies  # noqa: E402
from stepnet_jax.inference.stepper import Stepper  # noqa: E402

(B,) = jax.export.symbolic_shape('b')
RNG = np.random.RandomState(0)


def _conv(x, w, **kw):
  return jax.lax.conv_general_dilated(x, w, dimension_numbers=('NHWC', 'HWIO', 'NHWC'), **kw)


def _pool(x):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (0, 1), (0, 0)))


W = RNG.randn(3, 3, 4, 6).astype(np.float32)
WG = RNG.randn(3, 3, 2, 6).astype(np.float32)
M = RNG.randn(5, 7).astype(np.float32)
HELPER = jax.jit(lambda v: v * 2.0 + 1.0)
MU, SCALE, SHIFT = (RNG.randn(6).astype(np.float32) for _ in range(3))


def _conv_affine(x):
  """A convolution, a normalisation in inference form and a ReLU: folded into one Conv."""
  return jax.nn.relu((_conv(x, W, window_strides=(1, 1), padding='SAME') - MU) * SCALE + SHIFT)


def _product_affine(x):
  """A product with constant weights (the first layer's tap product), then the same map."""
  return jax.nn.relu((jnp.einsum('bitc,tco->bio', x, W[0, :2]) - MU) / SCALE + SHIFT)


def _conv_affine_unfoldable(x):
  """Constant minus the convolution, over a per-channel divisor; a value read twice and a
  constant that varies along a spatial axis end the fold where they appear."""
  y = (MU - _conv(x, W, window_strides=(1, 1), padding='VALID')) / (SCALE + 3.0)
  return y * np.arange(1.0, 6.0, dtype=np.float32)[:, None, None] + y, y


# name -> (function, batched argument shapes [without the batch axis], dtype)
CASES = {
  'conv_strided_padded': (lambda x: _conv(x, W, window_strides=(2, 1), padding=((1, 1), (0, 2))), [(7, 6, 4)], 'f'),
  'conv_grouped_dilated': (
    lambda x: _conv(x, WG, window_strides=(1, 1), padding='SAME', rhs_dilation=(2, 1), feature_group_count=2),
    [(7, 6, 4)],
    'f',
  ),
  'max_pool_padded': (_pool, [(7, 6, 4)], 'f'),
  'matmul_and_bias': (lambda x: jax.nn.relu(x @ M + 1.0), [(5,)], 'f'),
  'einsum_batched': (lambda x, y: jnp.einsum('bij,bjk->bik', x, y), [(3, 4), (4, 2)], 'f'),
  'update_slice_two_axes': (
    lambda x, u: jax.lax.dynamic_update_slice(x, u, (0, 2, 1)),
    [(6, 5), (3, 2)],
    'f',
  ),
  'pad_and_crop': (lambda x: jax.lax.pad(x, 0.5, ((0, 0, 0), (2, -1, 0), (-1, 3, 0))), [(4, 5)], 'f'),
  'strided_slice': (lambda x: x[:, 1:6:2, ::3], [(7, 8)], 'f'),
  'known_offset_take': (lambda x: jax.lax.dynamic_slice_in_dim(x, jnp.int32(2), 3, axis=1), [(7, 2)], 'f'),
  'round_even_and_away': (
    lambda x: jnp.round(x * 4) + jax.lax.round(x * 4, jax.lax.RoundingMethod.AWAY_FROM_ZERO),
    [(9,)],
    'f',
  ),
  'clip_where_compare': (lambda x: jnp.where(x > 0.1, jnp.clip(x, -0.5, 0.5), x**3), [(9,)], 'f'),
  'reductions_argmax_cast': (
    lambda x: (x.sum(-1), x.max(1), jnp.argmax(x, -1), (x > 0).astype(jnp.int32).sum(-1)),
    [(4, 6)],
    'f',
  ),
  'stack_transpose_reshape': (lambda x: jnp.stack([x, -x], 2).transpose(0, 2, 1).reshape(x.shape[0], -1), [(5,)], 'f'),
  'batch_as_value': (lambda x: x / x.shape[0] + jnp.zeros((x.shape[0], 1), x.dtype), [(3,)], 'f'),
  'softmax_entropy': (lambda x: -(jax.nn.softmax(x) * jax.nn.log_softmax(x)).sum(-1), [(6,)], 'f'),
  'uint8_normalise': (lambda x: (x.astype(jnp.float32) / 255.0 - 0.3) * jax.lax.rsqrt(jnp.float32(0.2)), [(4,)], 'u8'),
  # One jitted helper inlined twice, on a constant and on the input: each call binds its own values.
  'one_helper_on_a_constant_and_an_input': (lambda x: x * HELPER(jnp.float32(2.0)) + HELPER(x.sum()), [(3,)], 'f'),
  'conv_channel_affine_relu': (_conv_affine, [(5, 6, 4)], 'f'),
  'conv_affine_partly_foldable': (_conv_affine_unfoldable, [(7, 6, 4)], 'f'),
  'product_channel_affine_relu': (_product_affine, [(3, 2, 4)], 'f'),
  'conv_by_taps_same': (lambda x: layers.conv_by_taps(x, W[:, :, :1], 2, 'SAME'), [(6, 5, 1)], 'f'),
}


def _run(model, arrays):
  session = ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])
  return session.run(None, {f'x{i}': a for i, a in enumerate(arrays)})


@pytest.mark.parametrize('name', sorted(CASES))
def test_each_lowered_operation_matches_jax_at_a_symbolic_batch(name):
  fn, shapes, kind = CASES[name]
  dtype = np.uint8 if kind == 'u8' else np.float32
  specs = [jax.ShapeDtypeStruct((B,) + s, dtype) for s in shapes]
  out = jax.eval_shape(fn, *specs)
  outs = out if isinstance(out, tuple) else (out,)
  model = onnx_lowering.lower(fn, specs, [f'x{i}' for i in range(len(specs))], [f'y{i}' for i in range(len(outs))])
  for batch in (1, 3):  # one graph serves every batch size
    if kind == 'u8':
      arrays = [RNG.randint(0, 256, (batch,) + s).astype(np.uint8) for s in shapes]
    else:
      arrays = [RNG.randn(batch, *s).astype(np.float32) for s in shapes]
    want = fn(*[jnp.asarray(a) for a in arrays])
    want = want if isinstance(want, tuple) else (want,)
    got = _run(model, arrays)
    for g, w in zip(got, want):
      w = np.asarray(w)
      assert g.shape == w.shape and g.dtype == w.dtype, name
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_a_per_channel_affine_map_after_a_convolution_is_folded_into_it():
  """(The values are checked by the operation cases above.) Sub, Mul, Div and Add leave the
  graph after a convolution; after a product with constant weights one Add is left."""
  model = onnx_lowering.lower(_conv_affine, [jax.ShapeDtypeStruct((B, 5, 6, 4), np.float32)], ['x'], ['y'])
  ops = [n.op_type for n in model.graph.node]
  assert ops.count('Conv') == 1 and 'Relu' in ops and not {'Sub', 'Mul', 'Add'} & set(ops), ops
  partly = onnx_lowering.lower(
    _conv_affine_unfoldable, [jax.ShapeDtypeStruct((B, 7, 6, 4), np.float32)], ['x'], ['y', 'z']
  )
  ops = [n.op_type for n in partly.graph.node]
  assert not {'Sub', 'Div'} & set(ops) and ops.count('Mul') == 1 and ops.count('Add') == 1, ops
  product = onnx_lowering.lower(_product_affine, [jax.ShapeDtypeStruct((B, 3, 2, 4), np.float32)], ['x'], ['y'])
  assert [n.op_type for n in product.graph.node] == ['Einsum', 'Add', 'Relu']


def test_channels_first_blocks_pass_through_move_and_compute_like_jax():
  """Image-shaped blocks travel NCHW: a block passed through untouched is not an output, a
  block copied to another position comes out as a new NCHW block, and a value computed from a
  block read by an operation comes out whole (NHWC), all as JAX computes them."""

  def fn(a, b):
    moved = jax.lax.dynamic_update_slice(jnp.zeros_like(b), a[..., :2], (0, 0, 0, 2))
    return a, moved, b * 2.0

  shape = (B, 3, 3, 4)
  low = onnx_lowering.lower_blocks(
    fn,
    [jax.ShapeDtypeStruct(shape, np.float32)] * 2,
    ['a', 'b'],
    ['a', 'moved', 'b'],
    input_blocks={'a': [(0, 2), (2, 4)], 'b': [(0, 4)]},
    block_outputs=['a', 'moved', 'b'],
    renamed_outputs={'b': 'next_b'},
    channels_first=True,
  )
  a, b = RNG.randn(2, 3, 3, 4).astype(np.float32), RNG.randn(2, 3, 3, 4).astype(np.float32)
  nchw = lambda x: np.transpose(x, (0, 3, 1, 2))  # noqa: E731
  feeds = {'a.0_2': nchw(a[..., :2]), 'a.2_4': nchw(a[..., 2:]), 'b.0_4': nchw(b)}
  session = ort.InferenceSession(low.model.SerializeToString(), providers=['CPUExecutionProvider'])
  names = [o.name for o in session.get_outputs()]
  got = dict(zip(names, session.run(None, {k: v for k, v in feeds.items() if k in low.inputs})))
  assert not any(n.startswith('a.') for n in names)  # a's blocks came through unchanged: not outputs
  np.testing.assert_allclose(got['moved.2_4'], nchw(a[..., :2]), rtol=0, atol=0)
  np.testing.assert_allclose(got['next_b'], b * 2.0, rtol=1e-6)  # computed whole: a whole NHWC output


@pytest.mark.parametrize(
  'fn, match',
  [
    (lambda x: jnp.sort(x, -1), "'sort'"),
    (lambda x: x[:-1], 'symbolic axis'),  # to b - 1: not the axis's end
    (lambda x: jnp.take(x, 9, axis=1), 'out-of-bounds'),  # JAX fills with NaN; a slice cannot
  ],
)
def test_what_cannot_be_lowered_exactly_is_refused_by_name(fn, match):
  with pytest.raises(NotImplementedError, match=match):
    onnx_lowering.lower(fn, [jax.ShapeDtypeStruct((B, 5), np.float32)], ['x'], ['y'])


def test_the_runners_mac_budget_decides_as_the_librarys_past_float32_precision():
  """MAC counts above 2^24 and one budget per input: the numpy policy compares in float32,
  as the library does, so both stop the same inputs (the runner's state carries the budgets)."""
  from stepnet_jax.inference import device_runner

  macs = (5, 78_643_204, 100_000_001, 200_000_000)
  budgets = np.asarray([4, 5, 78_643_203, 78_643_204, 78_643_205, 100_000_000, 2e8, 3e8], np.float64)
  logits = np.zeros((len(budgets), 10), np.float32)
  library = policies.MacBudget(jnp.asarray(budgets, jnp.float32), macs)
  runner = device_runner.MacBudget(budgets, macs)
  for level in range(3):
    want = np.asarray(library.stop(jnp.asarray(logits), jnp.int32(level), ())[0])
    got, state = runner.stop(logits, level, None)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(state, budgets.astype(np.float32))


HOST_CHECK = testlib.device_script(
  'anytime_onnx',
  """
  out[name]['selector'] = net.selector_path is not None
  try:
    net.advance(cache)
  except ValueError as e:
    out[name]['repeated'] = str(e)
  if 'policy_logits' in ref:  # the numpy policies on the library's logits, and predict end to end
    logits, stops = ref['policy_logits'], {}
    for level in range(net.num_levels - 1):
      for policy in ('confidence', 'margin', 'entropy', 'macs'):
        p = {'confidence': ax.Confidence(float(ref['confidence'])), 'margin': ax.Margin(float(ref['margin'])),
             'entropy': ax.Entropy(float(ref['entropy'])), 'macs': ax.MacBudget(float(ref['budget']), net.macs_to_reach)}[policy]
        stops[f'{policy}{level}'] = p.stop(logits[level], level, None)[0].tolist()
    learned, state = ax.Learned(d + '/selector.npz'), None
    for level in range(net.num_levels - 1):
      stop, state = learned.stop(logits[level], level, state)
      stops[f'learned{level}'] = stop.tolist()
    out[name]['stops'] = stops
    for policy in (ax.Confidence(float(ref['network_confidence'])), learned):
      pred = net.predict(x, policy)
      out[name][type(policy).__name__] = [pred.exit_level.tolist(), pred.macs.tolist(),
        float(np.abs(pred.logits - ref['exits'][pred.exit_level, np.arange(len(x))]).max())]
""",
)


def _between(values: np.ndarray, q: float) -> float:
  """A threshold halfway between two neighbouring sorted values near quantile ``q`` (no ties)."""
  v = np.sort(np.ravel(values))
  i = int(q * (len(v) - 1))
  return float((v[i] + v[i + 1]) / 2)


def _policy_reference(net: Stepper, exits: np.ndarray, selector) -> tuple[dict, dict]:
  """(knobs and logits saved for the host, the library's stop decisions on those logits)."""
  logits = (RNG.randn(net.num_levels, 40, 10) * 2).astype(np.float32)
  probs = np.asarray(jax.nn.softmax(logits[0]))
  top2 = np.sort(probs, -1)[:, -2:]
  knobs = {
    'confidence': _between(probs.max(-1), 0.5),
    'margin': _between(top2[:, 1] - top2[:, 0], 0.5),
    'entropy': _between(-(probs * np.log(probs)).sum(-1), 0.5),
    'budget': float(np.mean(net.macs_to_reach[1:3])),
    'policy_logits': logits,
  }
  library = {
    'confidence': policies.Confidence(knobs['confidence']),
    'margin': policies.Margin(knobs['margin']),
    'entropy': policies.Entropy(knobs['entropy']),
    'macs': policies.MacBudget(knobs['budget'], tuple(net.macs_to_reach)),
  }
  stops = {}
  for level in range(net.num_levels - 1):
    for name, p in library.items():
      stops[f'{name}{level}'] = np.asarray(p.stop(jnp.asarray(logits[level]), jnp.int32(level), ())[0]).tolist()
  state = selector.init(40, 10)
  for level in range(net.num_levels - 1):
    stop, state = selector.stop(jnp.asarray(logits[level]), jnp.int32(level), state)
    stops[f'learned{level}'] = np.asarray(stop).tolist()
  return knobs, stops


def test_exported_networks_match_the_library_in_a_process_without_jax(tmp_path):
  """LeNet-3C1L, ResNet-20 and a quantized LeNet exported to ONNX: onnxruntime, from a
  Python that never imports jax or stepnet_jax, gives the library's logits at every level
  by stepping and by the direct forwards; the numpy policies make the library's decisions."""
  directories, expected = {}, {}
  for name, net in testlib.export_networks(RNG).items():
    d = directories[name] = str(tmp_path / name)
    selector = policies.Learned(
      policies.init_selector(jax.random.key(3), 10, net.num_levels) | {'w2': jnp.asarray(RNG.randn(32), jnp.float32)},
      num_levels=net.num_levels,
    )
    manifest = export.save(net, d, format='onnx', selector=selector if name == 'lenet3c1l' else None)
    assert manifest['cache'][0] == 'level' and manifest['cache'][-1] == 'logits'
    assert manifest['macs_to_reach'] == list(net.macs_to_reach)
    step1 = onnx.load(f'{d}/step1.onnx').graph
    image_blocks = 0
    for value in [*step1.input, *step1.output]:  # image-shaped cache blocks travel NCHW: [B, channels, H, W]
      dims = [dim.dim_value for dim in value.type.tensor_type.shape.dim]
      if len(dims) == 4 and '.' in value.name:
        lo, hi = (int(v) for v in value.name.rsplit('.', 1)[1].split('_'))
        assert dims[1] == hi - lo and dims[2] == dims[3] > 1, (value.name, dims)
        image_blocks += 1
    assert image_blocks > 0
    # The cache is what later graphs read: each graph reads only what the earlier ones wrote
    # (or the images), and writes nothing, the level and logits aside, that no later one reads.
    chain = [onnx.load(f'{d}/{f}').graph for f in [manifest['start'], *manifest['steps']]]
    reads = [{v.name for v in g.input} for g in chain]
    written = set()
    for i, g in enumerate(chain):
      assert reads[i] <= written | {'images'}, (name, i, sorted(reads[i] - written))
      writes = {o.name.removeprefix('next_') for o in g.output}
      assert writes - {'level', 'logits'} <= set().union(*reads[i + 1 :]), (name, i)
      written |= writes
    assert {o.name for o in chain[-1].output} == {'next_level', 'next_logits'}
    x = RNG.randint(0, 256, (24,) + net.input_shape).astype(np.uint8)
    exits = np.asarray(net.exits(x))
    knobs = {}
    if name == 'lenet3c1l':
      knobs, stops = _policy_reference(net, exits, selector)
      knobs['network_confidence'] = _between(np.asarray(jax.nn.softmax(exits[0])).max(-1), 0.5)
      confidence = policies.Confidence(knobs['network_confidence'])
      expected[name] = (
        stops,
        {
          p: np.asarray(net.predict(x, q).exit_level).tolist()
          for p, q in (('Confidence', confidence), ('Learned', selector))
        },
        manifest,
      )
    np.savez(f'{d}/reference.npz', images=x, exits=exits, **knobs)
  out = testlib.run_on_device(tmp_path, HOST_CHECK, directories)
  for name, got in out.items():
    assert 'cannot advance a cache of level 3' in got['repeated']
    assert got['selector'] == (name == 'lenet3c1l')  # only the export given selector= ships one
    testlib.assert_device_logits(name, got, quantized_share=0.75)
  stops, exits, manifest = expected['lenet3c1l']
  got = out['lenet3c1l']
  assert got['stops'] == stops
  assert any(any(v) for v in stops.values()) and not all(all(v) for v in stops.values())
  for policy, levels in exits.items():
    onnx_levels, macs, logits_error = got[policy]
    assert onnx_levels == levels, policy
    assert macs == [manifest['macs_to_reach'][lv] for lv in levels]
    assert logits_error <= 1e-4 * max(1.0, got['scale'])
  assert len(set(exits['Confidence'])) > 1  # the threshold splits the batch


@pytest.mark.parametrize('macs', [(1, 4, 9, 16), (1, 2, 3, 100), (2, 3, 5, 6)])
def test_the_timing_exit_mix_spends_at_most_half_the_top_macs(macs):
  """deploy_time's exit mix: equal shares at each level while that spends at most half the
  top's MACs on average; otherwise inputs moved down to level 0 until it does, no more."""
  from stepnet_jax.studies.deploy_time import exit_mix

  exits = exit_mix(256, macs)
  mean = np.mean(np.asarray(macs)[exits])
  assert mean <= 0.5 * macs[-1]
  if np.mean(macs) <= 0.5 * macs[-1]:
    assert (np.bincount(exits, minlength=4) == 64).all()
  else:  # one input fewer moved down would spend more than half
    assert mean + (macs[-1] - macs[0]) / 256 > 0.5 * macs[-1]
  with pytest.raises(ValueError, match='level 0 alone'):
    exit_mix(8, (10, 11, 12, 13))
