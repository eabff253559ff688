"""MobileNetV2 (inverted residuals, depthwise convolutions) as a stepping network: stepping
equals the direct forward and the exits, exit k ignores every higher-level parameter, a
depthwise level block is a plain depthwise convolution, MACs by hand, re-levelling moves a
depthwise kernel column with its channel, and construction meets MAC targets.

Everything expected is derived here from the architecture (``STAGES``, ``_layers_by_hand``)
and plain numpy, not from the library's wiring or masks. One tiny model (16x16x1 inputs,
3 levels, a random uneven assignment with empty levels) is shared through module fixtures.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testlib
from flax import nnx

from stepnet_jax.core import layers
from stepnet_jax.core.wiring import NotWired
from stepnet_jax.methods import construct, importance
from stepnet_jax.models import budgets, quantized, structure, surgery, zoo

SHAPE = (16, 16, 1)  # stages at 16, 16, 16, 8, 4, 4, 2, 2
K = 3
# MobileNetV2's (t, c, n, s) per stage, with stage 2's stride 1 for 32x32 inputs.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _blocks():
  """(unit name, t, stride, stream read, group the depthwise filters, stream written) per block."""
  out, stream = [], 'stem'
  for s, (t, _, n, stride) in enumerate(STAGES, start=1):
    for m in range(n):
      name = f'stage{s}.block{m}'
      out.append((name, t, stride if m == 0 else 1, stream, stream if t == 1 else f'{name}.expand', f'stage{s}'))
      stream = f'stage{s}'
  return out


BLOCKS = _blocks()
GROUPS = ('stem', 'last') + tuple(f'stage{s}' for s in range(1, 8)) + tuple(b[4] for b in BLOCKS if b[1] > 1)


def _layers_by_hand(unit_name: str) -> list[tuple[str | None, str | None, str, bool]]:
  """(part, group read, group written, depthwise) of every linear layer of a unit."""
  if unit_name == 'stem':
    return [(None, None, 'stem', False)]
  if unit_name == 'last':
    return [(None, 'stage7', 'last', False)]
  _, t, _, stream_in, mid, out = next(b for b in BLOCKS if b[0] == unit_name)
  parts = [('expand', stream_in, mid, False)] if t > 1 else []
  return parts + [('depthwise', mid, mid, True), ('project', mid, out, False)]


def _assignment(seed: int) -> dict[str, tuple[int, ...]]:
  """Uneven random sizes: 1-3 level-0 channels, 0-3 at the other levels (some empty), one
  expansion group without level-0 channels, and a top-level channel in 'last'."""
  rng = np.random.RandomState(seed)
  out = {g: (int(rng.randint(1, 4)),) + tuple(int(v) for v in rng.randint(0, 4, K - 1)) for g in GROUPS}
  out['stage4.block2.expand'] = (0, 2, 1)
  out['last'] = out['last'][:2] + (2,)
  assert sum(0 in sizes[1:] for sizes in out.values()) >= 3
  return out


def _build(assignment, seed=0, randomize=True, **kw):
  model = testlib.fast_model('mobilenetv2', seed, input_shape=SHAPE, num_levels=K, assignment=assignment, **kw)
  return testlib.randomize(model, seed + 1) if randomize else model


X = testlib.images(SHAPE, batch=3, seed=7)
ROWS = jnp.asarray([2, 0])


@pytest.fixture(scope='module')
def model():
  return _build(_assignment(0))


@pytest.fixture(scope='module')
def program(model):
  """One jit of every computation of the model's subnets, for any parameters of its structure:
  direct forwards, exits, every unit's full-width output, stepping from an all-NaN cache, a
  step of some rows and the gated forward with identity gates."""
  graphdef = nnx.graphdef(model)

  @jax.jit
  def everything(state, x):
    m = nnx.merge(graphdef, state)
    cache = m.init_cache(x)
    cache = cache.replace(units=jax.tree.map(lambda b: jnp.full_like(b, jnp.nan), cache.units))
    stepped, level0 = [], None
    for k in range(K):
      cache = m.step(cache, k)
      stepped.append(cache.logits)
      level0 = cache if k == 0 else level0
    h = m.normalize(x)
    for unit in m.units:
      h = unit.gated(h, m.top, lambda group, a: a)
    return {
      'direct': jnp.stack([m(x, k) for k in range(K)]),
      'exits': m.exits(x),
      'units': testlib.unit_outputs(m, m.normalize(x), m.top),
      'stepped': jnp.stack(stepped),
      'rows': m.step(level0, 1, ROWS).logits[ROWS],
      'gated': m.head.exits(h),
    }

  return lambda state: jax.device_get(everything(state, X))


@pytest.fixture(scope='module')
def computed(model, program):
  return program(nnx.state(model))


def _check_stepping(out):
  assert np.isfinite(out['stepped']).all()
  testlib.assert_close(out['stepped'], out['direct'])
  testlib.assert_close(out['exits'], out['direct'])
  testlib.assert_close(out['rows'], out['direct'][1][np.asarray(ROWS)])
  testlib.assert_close(out['gated'], out['exits'])


def test_stepping_equals_the_direct_forward_and_the_exits(computed):
  """Level k stepped from caches holding NaN wherever a channel is not computed yet equals
  the direct forward of subnet k and exit k of the one full-width pass; so does a step of
  some rows, and the forward through identity gates (importance's) gives the exits."""
  _check_stepping(computed)


def test_wiring_names_the_groups_of_every_layer(model):
  """Each layer's (read, written, depthwise) groups, the identity adds and the gated writes,
  against the architecture."""
  wiring = model.wiring()
  got = {link.path: (link.source, link.target, link.depthwise) for link in wiring.links}
  expected, writes = {}, []
  for i, name in enumerate(model.unit_names):
    for part, source, target, depthwise in _layers_by_hand(name):
      expected[('units', i) if part is None else ('units', i, part)] = (source, target, depthwise)
      writes.append(target)
  assert got == expected
  assert wiring.head_source == 'last' and set(wiring.groups) == set(GROUPS)
  for name, unit in zip(model.unit_names, model.units):
    if isinstance(unit, layers.InvertedResidual):
      block = next(b for b in BLOCKS if b[0] == name)
      assert unit.residual == (block[3] == block[5]), name  # a stage's later blocks add into its stream
  recorded = [group for group, _ in importance._writes(model, X)]  # the gates importance places
  assert recorded == writes  # every layer's output is gated once (a block's last: after the add)


def test_exit_k_ignores_every_higher_level_parameter(model, computed, program):
  """Brute-force independence: perturbing every parameter of a channel above level k (kernels,
  also the masked entries from higher-level inputs into lower-level outputs, BN and head rows)
  leaves exits 0..k and every unit's output channels of levels <= k unchanged (and changes
  channels above)."""
  base_exits, base_units = computed['exits'], computed['units']
  levels = {g: testlib.level_array(s) for g, s in _assignment(0).items()}
  written = [_layers_by_hand(name)[-1][2] for name in model.unit_names]  # the group each unit outputs
  image = np.zeros(SHAPE[-1], np.int64)
  rng = np.random.RandomState(3)
  for k in range(K - 1):
    pure = nnx.to_pure_dict(nnx.state(model))
    for i, name in enumerate(model.unit_names):
      for part, source, target, depthwise in _layers_by_hand(name):
        entry = pure['units'][i] if part is None else pure['units'][i][part]
        lout = levels[target]
        w = np.asarray(entry['kernel']).copy()
        if depthwise:
          sel = np.broadcast_to(lout > k, w.shape)
        else:
          lin = image if source is None else levels[source]
          sel = np.broadcast_to((lin[:, None] > k) | (lout[None, :] > k), w.shape)
        entry['kernel'] = np.where(sel, w + rng.normal(0, 1, w.shape), w)
        for key, v in entry['bn'].items():
          v = np.asarray(v)
          noise = rng.uniform(1.5, 3.0, v.shape) if key == 'var' else rng.normal(0, 1, v.shape)
          entry['bn'][key] = np.where(lout > k, v * noise if key == 'var' else v + noise, v)
    head = np.asarray(pure['head']['kernel']).copy()
    head[:, levels['last'] > k] += rng.normal(0, 1, head[:, levels['last'] > k].shape)
    pure['head']['kernel'] = head
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    out = program(state)
    _check_stepping(out)
    got_exits, got_units = out['exits'], out['units']
    testlib.assert_close(got_exits[: k + 1], base_exits[: k + 1], err_msg=f'exits <= {k}')
    changed = 0.0
    for name, group, got, base in zip(model.unit_names, written, got_units, base_units):
      low = levels[group] <= k
      testlib.assert_close(got[..., low], base[..., low], err_msg=f'{name}: channels of levels <= {k}')
      changed = max(changed, float(np.abs(got[..., ~low] - base[..., ~low]).max(initial=0.0)))
    assert changed > 1e-2, 'the perturbation did not reach the higher-level channels'


def _depthwise_by_hand(x: np.ndarray, kernel: np.ndarray, stride: int) -> np.ndarray:
  """SAME-padded depthwise convolution with loops over taps: channel c of the output sums the
  k x k window of channel c of ``x`` (padding split as XLA does, the extra after)."""
  b, h, w, c = x.shape
  kh = kernel.shape[0]
  ho, wo = -(-h // stride), -(-w // stride)
  pad_h, pad_w = max((ho - 1) * stride + kh - h, 0), max((wo - 1) * stride + kh - w, 0)
  xp = np.zeros((b, h + pad_h, w + pad_w, c))
  xp[:, pad_h // 2 : pad_h // 2 + h, pad_w // 2 : pad_w // 2 + w] = x
  out = np.zeros((b, ho, wo, c))
  for i in range(ho):
    for j in range(wo):
      for dy in range(kh):
        for dx in range(kh):
          out[:, i, j, :] += xp[:, i * stride + dy, j * stride + dx, :] * kernel[dy, dx, 0, :]
  return out


@pytest.mark.parametrize('unit_name', ['stage1.block0', 'stage3.block0', 'stage6.block1'])
def test_depthwise_level_block_is_a_plain_depthwise_conv(model, unit_name):
  """block(level) equals the level's channels of a depthwise conv of the whole input (then
  BN, ReLU), computed by hand, while every other input channel is NaN; the prefix forward
  equals the first end(level) channels; a block of some rows equals those rows."""
  unit = model.units[model.unit_names.index(unit_name)]
  dw = unit.depthwise
  sizes = _assignment(0)[next(b for b in BLOCKS if b[0] == unit_name)[4]]
  assert dw.sizes == sizes
  x = np.random.RandomState(1).normal(size=(2, 8, 8, sum(sizes)))
  bn = {k: np.asarray(getattr(dw.bn, k)[...], np.float64) for k in ('scale', 'bias', 'mean', 'var')}
  y = _depthwise_by_hand(x, np.asarray(dw.kernel[...], np.float64), dw.stride)
  ref = np.maximum((y - bn['mean']) / np.sqrt(bn['var'] + layers.BN_EPSILON) * bn['scale'] + bn['bias'], 0.0)
  bounds = [(testlib.block_start(sizes, k), testlib.block_end(sizes, k)) for k in range(K)]
  poisoned = []
  for lo, hi in bounds:
    p = np.full_like(x, np.nan)
    p[..., lo:hi] = x[..., lo:hi]
    poisoned.append(jnp.asarray(p, jnp.float32))

  @jax.jit
  def run(x, poisoned):
    rows = jnp.asarray([1])
    return [(dw.block(poisoned[k], k), dw(x[..., :hi], k), dw.block(x, k, rows)) for k, (_, hi) in enumerate(bounds)]

  for k, (block, prefix, some_rows) in enumerate(run(jnp.asarray(x, jnp.float32), poisoned)):
    lo, hi = bounds[k]
    testlib.assert_close(block, ref[..., lo:hi])
    testlib.assert_close(prefix, ref[..., :hi])
    testlib.assert_close(some_rows, ref[[1], ..., lo:hi])
    assert dw.delta_macs((8, 8, sum(sizes)))[0][k] == sizes[k] * 9 * ref.shape[1] * ref.shape[2]


def _macs_by_hand(assignment, shape) -> np.ndarray:
  """Per level k, the MACs of level k's connections, layer by layer from the architecture: a
  conv's level-k outputs read every input of level <= k; a depthwise channel its own."""
  n = {g: np.asarray(s, np.int64) for g, s in assignment.items()}
  cum = {g: np.cumsum(v) for g, v in n.items()}
  image = np.zeros(len(n['stem']), np.int64)  # the image channels are level 0
  image[0] = shape[-1]
  h = shape[0]
  total = 9 * h * h * n['stem'] * np.cumsum(image)  # the stem: 3x3, stride 1
  for _, t, stride, stream_in, mid, out in BLOCKS:
    if t > 1:
      total = total + h * h * n[mid] * cum[stream_in]  # expand 1x1
    h = -(-h // stride)
    total = total + 9 * h * h * n[mid]  # depthwise 3x3
    total = total + h * h * n[out] * cum[mid]  # project 1x1
  total = total + h * h * n['last'] * cum['stage7']
  return total + 10 * n['last']  # the shared head after the average pool


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_macs_from_level_counts_and_by_hand(seed):
  """MacModel's subnet MACs from the groups' level counts equal the cumulative delta MACs the
  layers count, and both equal the architecture's count by hand, for random assignments."""
  assignment = dict(testlib.random_assignment(GROUPS, K, seed=seed, low=1, high=4, allow_zero=True))
  model = nnx.eval_shape(
    lambda: zoo.build_model('mobilenetv2', num_classes=10, input_shape=SHAPE, num_levels=K, assignment=assignment)
  )
  mm = budgets.MacModel.of(model)
  delta = model.delta_macs()
  np.testing.assert_array_equal(mm.subnet_macs([assignment[g] for g in mm.names]), np.cumsum(delta.sum(0)))
  np.testing.assert_array_equal(delta.sum(0), _macs_by_hand(assignment, SHAPE))
  row = model.layer_names.index('stage3.block0')  # 16x16 -> 8x8, stride 2, with expansion
  n_in, n_exp, n_out = (np.asarray(assignment[g]) for g in ('stage2', 'stage3.block0.expand', 'stage3'))
  by_hand = 256 * n_exp * np.cumsum(n_in) + 9 * 64 * n_exp + 64 * n_out * np.cumsum(n_exp)
  np.testing.assert_array_equal(delta[row], by_hand)


@pytest.mark.parametrize('channels', [1, 3])
def test_full_width_macs_by_hand(channels):
  """The whole network's MACs on 32x32 images at widths 1 and 0.5 (one level), by hand."""
  expected = {(1.0, 1): 87_386_624, (1.0, 3): 87_976_448, (0.5, 1): 23_393_536, (0.5, 3): 23_688_448}
  for width in (1.0, 0.5):
    model = nnx.eval_shape(
      lambda w=width: zoo.build_model(
        'mobilenetv2', num_classes=10, input_shape=(32, 32, channels), num_levels=1, width=w
      )
    )

    def scaled(base, w=width):
      return (int(np.floor(base * w + 0.5)),)

    sizes, prev = {'stem': scaled(32), 'last': scaled(1280)}, 32
    for s, (t, c, n, _) in enumerate(STAGES, start=1):
      sizes[f'stage{s}'] = scaled(c)
      for m in range(n):
        if t > 1:
          sizes[f'stage{s}.block{m}.expand'] = scaled(prev * t)  # t x the block's input channels at width 1
        prev = c
    by_hand = int(_macs_by_hand(sizes, (32, 32, channels))[0])
    assert int(model.delta_macs().sum()) == by_hand == expected[width, channels]


def test_relevel_moves_stream_and_expansion_channels_and_their_depthwise_columns(model, program):
  """Moving a stem, a stream and an expansion channel up a level and removing a top-level
  channel of 'last' equals the old network with the connections the new levels forbid cut
  by hand; the depthwise kernel column of a moved channel moves with it."""
  old = {g: testlib.level_array(s) for g, s in _assignment(0).items()}
  new = {g: v.copy() for g, v in old.items()}
  moved = {}
  for g in ('stem', 'stage3', 'stage4.block1.expand'):
    sizes = _assignment(0)[g]
    level = next(k for k in range(K - 1) if sizes[k] >= 2)  # its position changes: a level's first of 2+
    i = testlib.block_start(sizes, level)
    new[g][i] = level + 1
    moved[g] = (i, testlib.block_end(sizes, level) - 1)  # stable order: first of the next level
  new['last'][int(np.nonzero(old['last'] == K - 1)[0][0])] = surgery.REMOVED
  rebuilt, meta = surgery.relevel(model, structure.model_meta(model, 'mobilenetv2', 10), new)
  assert sum(meta['assignment']['last']) == len(old['last']) - 1

  ref = nnx.clone(model)
  image = np.zeros(SHAPE[-1], np.int64)
  for name, unit in zip(ref.unit_names, ref.units):
    for part, source, target, depthwise in _layers_by_hand(name):
      layer = unit if part is None else getattr(unit, part)
      w = np.asarray(layer.kernel[...])
      if depthwise:  # channel c reads channel c: nothing is forbidden, a removed channel goes
        w = w * (new[target] != surgery.REMOVED)
      else:
        src_old = image if source is None else old[source]
        src_new = image if source is None else new[source]
        i, o = src_new[:, None], new[target][None, :]
        cut = (i == surgery.REMOVED) | (o == surgery.REMOVED) | (i > o)
        mask = testlib.brute_mask(np.bincount(src_old, minlength=K), np.bincount(old[target], minlength=K))
        w = w * mask * ~cut
      layer.kernel[...] = jnp.asarray(w)
  head = np.asarray(ref.head.kernel[...]).copy()
  head[:, new['last'] == surgery.REMOVED] = 0.0
  ref.head.kernel[...] = jnp.asarray(head)
  graphdef, state = nnx.split(rebuilt)
  top = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, X)
  testlib.assert_close(top, program(nnx.state(ref))['direct'][-1])

  for g, unit_name in (('stem', 'stage1.block0'), ('stage4.block1.expand', 'stage4.block1')):
    i, j = moved[g]
    assert i != j
    index = model.unit_names.index(unit_name)
    np.testing.assert_array_equal(
      np.asarray(rebuilt.units[index].depthwise.kernel[...])[..., j],
      np.asarray(model.units[index].depthwise.kernel[...])[..., i],
    )


def test_construction_assigns_levels_within_mac_targets():
  """assign_levels with random importance, then relevel, from every neuron at level 0: the
  re-levelled model's own MAC counts meet every target, neurons only move up and every group
  keeps a level-0 neuron."""
  rng = np.random.RandomState(5)
  start = {g: (int(rng.randint(3, 7)), 0, 0) for g in GROUPS}
  model = _build(start, randomize=False)
  mm = budgets.MacModel.of(model)
  full = mm.subnet_macs([start[g] for g in mm.names])[0]
  targets = budgets.check_budgets((0.25, 0.5, 0.8), full, mm, [sum(start[g]) for g in mm.names])  # feasible
  scores = {g: rng.uniform(size=sum(s)) for g, s in start.items()}
  levels = surgery.neuron_levels(model)
  new = construct.assign_levels(levels, scores, mm, targets)
  rebuilt, _ = surgery.relevel(model, structure.model_meta(model, 'mobilenetv2', 10), new)
  macs = np.cumsum(rebuilt.delta_macs().sum(0))
  assert np.all(macs <= targets), (macs, targets)
  np.testing.assert_array_equal(macs, mm.subnet_macs(mm.counts_of(new, K)))
  np.testing.assert_array_equal(macs, np.cumsum(_macs_by_hand(dict(rebuilt.assignment), SHAPE)))
  for g in GROUPS:
    assert np.all((new[g] >= levels[g]) | (new[g] == surgery.REMOVED)) and np.sum(new[g] == 0) >= 1, g


def test_unwired_and_inconsistent_blocks_are_refused():
  """A depthwise layer reading another group, an identity add between different sizes, and
  quantization (conv and dense chains only) raise clear errors."""
  rngs = nnx.Rngs(0)
  dw = layers.DepthwiseConv((2, 1), group='a', rngs=rngs)
  with pytest.raises(NotWired, match="reads group 'b'"):
    dw.links(('x',), 'b', (4, 4, 3))
  with pytest.raises(NotWired, match='without the name'):
    layers.DepthwiseConv((2, 1), rngs=rngs).links(('x',), 'a', (4, 4, 3))
  with pytest.raises(ValueError, match='identity add'):
    layers.InvertedResidual((2, 1), (4, 4), (1, 2), stride=1, residual=True, rngs=rngs)
  model = nnx.eval_shape(lambda: _build(_assignment(0), randomize=False))
  with pytest.raises(ValueError, match='InvertedResidual'):
    quantized.uniform_bits(model, 4)
