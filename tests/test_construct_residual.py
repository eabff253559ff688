"""SteppingNet construction on a residual network (ResNet-20): levels per stream, MACs from
level counts, re-levelling trained weights, stream importance against finite differences,
and a construction that meets its budgets, steps exactly and resumes bit-identical."""

from __future__ import annotations

import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import testlib
from flax import nnx

import stepnet_jax
from stepnet_jax import config
from stepnet_jax.data import datasets
from stepnet_jax.methods import construct, importance, nonuniform
from stepnet_jax.models import budgets, structure, surgery, zoo
from stepnet_jax.studies import bench
from stepnet_jax.training import run

SHAPE = (8, 8, 1)  # the digits' size: three stages at 8x8, 4x4, 2x2
SHAPE_PADDED = (16, 16, 1)  # the construction's digits (data.pad_to=16)
STREAMS = ('stage1', 'stage2', 'stage3')


def _tiny_resnet(assignment, num_levels=3, seed=0):
  return testlib.random_model('resnet20', seed, input_shape=SHAPE, num_levels=num_levels, assignment=assignment)


def _groups_by_hand(unit_name: str, part: str) -> tuple[str | None, str]:
  """(group read, group written) of a ResNet-20 layer, from the architecture: the stem writes
  stage 1's stream; a block reads the stream it is in (a stage's first block: the previous
  stage's), its conv1 writes its inner channels, its conv2 and shortcut its stage's stream."""
  if unit_name == 'stem':
    return None, 'stage1'
  stage, block = int(unit_name[5]), int(unit_name.split('block')[1])
  stream_in = f'stage{stage - 1}' if block == 0 and stage > 1 else f'stage{stage}'
  mid = f'{unit_name}.mid'
  return {'conv1': (stream_in, mid), 'conv2': (mid, f'stage{stage}'), 'shortcut': (stream_in, f'stage{stage}')}[part]


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_mac_model_matches_layer_counts(seed):
  """MACs from the groups' level counts equal the layers' own mask-based counts, for random
  assignments with empty levels."""
  assignment = dict(testlib.random_assignment(testlib.RESNET, 3, seed=seed, low=1, high=5, allow_zero=True))
  model = nnx.eval_shape(
    lambda: zoo.build_model('resnet20', num_classes=10, input_shape=SHAPE, num_levels=3, assignment=assignment)
  )
  mm = budgets.MacModel.of(model)
  assert set(mm.names) == set(testlib.RESNET)
  np.testing.assert_array_equal(mm.subnet_macs([assignment[n] for n in mm.names]), np.cumsum(model.delta_macs().sum(0)))


def test_wiring_names_the_groups_each_layer_reads_and_writes():
  model = nnx.eval_shape(
    lambda: zoo.build_model('resnet20', num_classes=10, input_shape=SHAPE, num_levels=2, width=0.25)
  )
  wiring = model.wiring()
  got = {link.path: (link.source, link.target) for link in wiring.links}
  expected = {}
  for i, (name, unit) in enumerate(zip(model.unit_names, model.units)):
    if name == 'stem':
      expected[('units', i)] = _groups_by_hand(name, '')
      continue
    for part in ('conv1', 'conv2', 'shortcut'):
      if getattr(unit, part) is not None:
        expected[('units', i, part)] = _groups_by_hand(name, part)
  assert got == expected
  assert wiring.head_source == 'stage3'
  assert {link.path for link in wiring.writers('stage2')} == {
    p for p, (_, target) in expected.items() if target == 'stage2'
  }


def _reference(model, new):
  """The old model with every connection the new levels forbid (or that touches a removed
  neuron) set to zero by hand, layer by layer from ``_groups_by_hand``."""
  ref = nnx.clone(model)
  old = surgery.neuron_levels(model)
  image = np.zeros(model.input_shape[-1], np.int64)
  for name, unit in zip(ref.unit_names, ref.units):
    parts = [('', unit)] if name == 'stem' else [(p, getattr(unit, p)) for p in ('conv1', 'conv2', 'shortcut')]
    for part, layer in parts:
      if layer is None:
        continue
      source, target = _groups_by_hand(name, part)
      src_levels = image if source is None else new[source]
      i, o = np.asarray(src_levels)[:, None], np.asarray(new[target])[None, :]
      cut = (i == surgery.REMOVED) | (o == surgery.REMOVED) | (i > o)  # [inputs, outputs]
      layer.kernel[...] = jnp.asarray(np.asarray(layer.kernel[...]) * layer.conn.mask * ~cut)
  head = np.asarray(ref.head.kernel[...]).copy()
  head[:, new['stage3'] == surgery.REMOVED] = 0.0
  ref.head.kernel[...] = jnp.asarray(head)
  assert all(len(old[g]) == len(new[g]) for g in old)
  return ref


def test_relevel_moves_a_stream_channel_in_every_block_at_once():
  """Moving stream and inner channels up and removing a channel of the last stream equals
  the old network with the connections the new levels forbid cut by hand (stepping a
  constructed ResNet: ``test_construction_meets_budgets_and_steps_exactly``)."""
  assignment = dict(testlib.random_assignment(testlib.RESNET, 3, seed=4, low=2, high=3))
  model = _tiny_resnet(assignment)
  levels = surgery.neuron_levels(model)
  new = {g: v.copy() for g, v in levels.items()}
  for g in ('stage1', 'stage2', 'stage2.block1.mid', 'stage3.block0.mid'):
    i = int(np.nonzero(levels[g] < 2)[0][-1])
    new[g][i] += 1
  new['stage3'][int(np.nonzero(levels['stage3'] == 2)[0][0])] = surgery.REMOVED
  meta = structure.model_meta(model, 'resnet20', 10)
  rebuilt, rebuilt_meta = surgery.relevel(model, meta, new)
  assert sum(rebuilt_meta['assignment']['stage3']) == len(levels['stage3']) - 1
  x = jnp.asarray(testlib.images(SHAPE, batch=3))
  testlib.assert_close(rebuilt(x), _reference(model, new)(x))


def _loss(model, x, y, weights, gate):
  h = model.normalize(x)
  for unit in model.units:
    h = unit.gated(h, model.top, gate)
  ce = optax.softmax_cross_entropy_with_integer_labels(model.head.exits(h), y[None, :])
  return np.asarray((jnp.asarray(weights)[:, None] * ce).sum(0), np.float64)  # [B]


@pytest.mark.parametrize('group,channel', [('stage2', 1), ('stage1', 0), ('stage3.block1.mid', 2)])
def test_stream_importance_is_the_loss_change_of_scaling_the_channel_in_every_block(group, channel):
  """The Taylor score of a stream channel is mean_b |dL_b/d eps| for scaling that channel by
  (1 + eps) at every write of the stream at once (the stem or the stage's first block, and
  every block after it), by central finite differences."""
  model = _tiny_resnet(dict(testlib.random_assignment(testlib.RESNET, 3, seed=2, low=2, high=3)))
  x = testlib.images(SHAPE, batch=5, seed=3)
  y = np.arange(5) % 10
  weights = (1.0, 1.5, 2.0)
  got = importance.taylor_scores(model, x, y, weights)[list(model.wiring().groups).index(group)]
  eps, losses = 1e-3, []
  for sign in (1.0, -1.0):
    scale = jnp.ones(len(surgery.neuron_levels(model)[group])).at[channel].set(1.0 + sign * eps)
    losses.append(_loss(model, jnp.asarray(x), jnp.asarray(y), weights, lambda g, a: a * scale if g == group else a))
  fd = (losses[0] - losses[1]) / (2 * eps)
  np.testing.assert_allclose(got[channel], np.abs(fd).mean(), rtol=2e-2, atol=1e-6)


def _config(**overrides):
  return config.from_dict(
    {
      'method': 'steppingnet',
      'data.name': 'digits',
      'data.pad_to': 16,  # stage 3 at 4x4: at 2x2 XLA drops the 3x3 taps that read only padding
      'data.train_subset': 512,
      'model.name': 'resnet20',
      'model.width': 0.25,
      'model.num_levels': 3,
      'construction.budgets': (0.2, 0.5, 0.9),
      'construction.widen': 1.5,
      'train.num_epochs': 2,
      'train.batch_size': 64,
      'optim.learning_rate': 3e-3,
      'construction.pretrain_epochs': 0.5,
      'construction.round_epochs': 0.5,
      'construction.rounds': 1,
      'construction.importance_examples': 64,
      'train.progress': False,
      **overrides,
    }
  )


@pytest.fixture(scope='module')
def digits():
  return datasets.pad_dataset(datasets.load_dataset('digits'), 16)


@pytest.fixture(scope='module')
def constructed(tmp_path_factory, digits):
  workdir = tmp_path_factory.mktemp('resnet_construction')
  return construct.construct(_config(), str(workdir), digits), workdir


def _input_size(layer_name: str, image_size: int) -> int:
  """Input height of a ResNet-20 layer (``testlib.linear_units`` names), from the architecture:
  stage s runs at 1/2^(s-1) of the image; a stage's first block reads the stage before it."""
  if layer_name == 'stem':
    return image_size
  stage, block, part = int(layer_name[5]), int(layer_name.split('block')[1][0]), layer_name.split('.')[-1]
  size = image_size >> (stage - 1)
  return 2 * size if block == 0 and stage > 1 and part in ('conv1', 'shortcut') else size


def _valid_taps(layer, size: int) -> float:
  """Kernel taps that read the image rather than its zero padding, summed over the output
  positions: the MACs of one connection as XLA's cost analysis counts them (a SAME 3x3
  convolution at 4x4 reads padding in a third of its taps), by convolving ones with ones."""
  ones = jnp.ones((1, size, size, 1))
  k = layer.kernel_size
  out = jax.lax.conv_general_dilated(
    ones, jnp.ones((k, k, 1, 1)), (layer.stride,) * 2, layer.padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  return float(out.sum())


def test_construction_meets_budgets_and_steps_exactly(constructed, digits):
  """The constructed ResNet meets its budgets, shares one assignment per stream, steps to its
  direct forward's logits, and XLA's compiled step k costs 2 x the MACs of level k's own
  connections, counted without padding taps as XLA counts (batch 1: XLA:CPU may lower a
  batched convolution to a loop whose body its cost analysis counts once)."""
  result, workdir = constructed
  net = stepnet_jax.load(str(workdir))
  macs = np.asarray(net.level_macs)
  np.testing.assert_array_equal(macs, result['level_macs'])
  assert np.all(macs <= np.asarray(result['budget_macs'])) and np.all(np.diff(macs) > 0)
  assignment = net.meta['model_meta']['assignment']
  assert set(assignment) == set(testlib.RESNET)
  for stream in STREAMS[1:]:  # a stage's blocks share one stream: one assignment each
    assert not any(g.startswith(f'{stream}.block') and not g.endswith('.mid') for g in assignment)
  x = jnp.asarray(digits.test_images[:8])
  cache = net.start(x)
  for _ in range(1, net.num_levels):
    cache = net.advance(cache)
  testlib.assert_close(cache.logits, net.forward(x, net.num_levels - 1))
  model = nnx.merge(net.graphdef, net.variables)
  own = sum(
    layer.conn.kept_connections() * _valid_taps(layer, _input_size(name, SHAPE_PADDED[0]))
    for name, layer, _ in testlib.linear_units(model)
  ) + np.asarray(model.head.delta_macs(None)[0])
  np.testing.assert_array_equal(bench.valid_tap_macs(model), own)  # the library's count of the same
  for k, flops in enumerate(bench.step_flops(net.graphdef, net.variables, x[:1], net.num_levels)):
    ratio = flops / (2.0 * own[k])
    # Level 0 also normalises the image and runs every batch norm, ReLU and residual add over
    # blocks of 1-8 channels: about 5 FLOPs per activation against 18 x c_in per MAC output.
    # The cumulative work of levels 0..k would be 2-4x at k >= 1.
    assert 0.95 <= ratio <= (1.6 if k == 0 else 1.15), f'level {k}: compiled FLOPs / (2 x own MACs) = {ratio:.3f}'


def test_construction_stopped_between_and_inside_phases_goes_on_bit_identical(
  constructed, digits, tmp_path, monkeypatch, capsys
):
  """A construction interrupted right after its pretraining's phase checkpoint, run again,
  goes on from that checkpoint (importance, re-levelling); stopped again inside the round's
  retraining, at a checkpoint it saved there, it goes on from that step; it ends with the
  uninterrupted run's parameters."""
  _, whole = constructed
  total = _config().train.num_epochs * 8  # 512 images in batches of 64
  saves = []
  real_save_phase, real_save = run.PhasedRun.save_phase, run.checkpoints.save

  def save_then_stop(self, *args, **kwargs):
    real_save_phase(self, *args, **kwargs)
    saves.append(args[0])
    raise KeyboardInterrupt('stopped after the pretraining')

  monkeypatch.setattr(run.PhasedRun, 'save_phase', save_then_stop)
  with pytest.raises(KeyboardInterrupt):
    construct.construct(_config(), str(tmp_path), digits)
  assert saves == [4]  # 0.5 epochs of 512 images in batches of 64
  assert run.progress_left(str(tmp_path), _config()) == run.Progress(4, total, at_phase_boundary=True)
  monkeypatch.setattr(run.PhasedRun, 'save_phase', real_save_phase)

  def save_inside_then_stop(mngr, step, *args, **kwargs):
    real_save(mngr, step, *args, **kwargs)
    saves.append(step)
    raise KeyboardInterrupt('stopped inside the round')

  # Every 3 steps: the first save inside a phase is at step 6, in the round's retraining [4, 8).
  monkeypatch.setattr(run.checkpoints, 'save', save_inside_then_stop)
  every_3 = _config(**{'train.checkpoint_every_steps': 3})
  with pytest.raises(KeyboardInterrupt):
    construct.construct(every_3, str(tmp_path), digits)
  assert saves == [4, 6]
  assert run.progress_left(str(tmp_path), _config()) == run.Progress(6, total, in_phase=True)
  monkeypatch.setattr(run.checkpoints, 'save', real_save)
  # A checkpoint left inside another phase (here the round's, at step 6, in a workdir without
  # phase checkpoints) is removed, so that the pretraining's save at step 3 is written; an
  # unreadable one is set aside, saying so.
  within = run.within_phase_dir(str(tmp_path))
  for case in ('other_phase', 'unreadable'):
    shutil.copytree(within, run.within_phase_dir(str(tmp_path / case)))
  for meta in glob.glob(
    os.path.join(run.within_phase_dir(str(tmp_path / 'unreadable')), 'checkpoints', '*', 'meta', '*')
  ):
    if os.path.isfile(meta):
      open(meta, 'w').close()
  monkeypatch.setattr(run.PhasedRun, 'save_phase', save_then_stop)
  for case in ('other_phase', 'unreadable'):
    saves.clear()
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
      construct.construct(every_3, str(tmp_path / case), digits)
    assert saves == [4] and not os.path.exists(run.within_phase_dir(str(tmp_path / case)))
    out = capsys.readouterr().out
    assert ('an unreadable checkpoint inside a phase' in out) == (case == 'unreadable')
    kept = tmp_path / case / 'unreadable_checkpoints'  # set aside for inspection, not deleted
    assert (sorted(os.listdir(kept)) if kept.exists() else []) == (['6'] if case == 'unreadable' else [])
  monkeypatch.setattr(run.PhasedRun, 'save_phase', real_save_phase)
  capsys.readouterr()
  construct.construct(every_3, str(tmp_path), digits)
  assert 'going on inside the phase (round 1/1 retrain) from step 6' in capsys.readouterr().out
  final = max(int(p.name) for p in (tmp_path / 'checkpoints').iterdir())
  assert run.progress_left(str(tmp_path), _config()) == run.Progress(final, total)
  assert not (tmp_path / 'phases').exists()
  a = jax.tree.leaves(stepnet_jax.load(str(whole)).variables)
  b = jax.tree.leaves(stepnet_jax.load(str(tmp_path)).variables)
  assert len(a) == len(b)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_the_non_uniform_baseline_refuses_a_residual_network_before_training(digits):
  """Its filter-norm ranking reads one kernel per layer: a ResNet is refused by name, up front."""
  cfg = _config(**{'method': 'nonuniform', 'construction.budgets': (0.2, 0.5, 1.0)})
  with pytest.raises(config.SettingsError, match=r'stage1.block0 is a ResidualBlock; the non-uniform baseline'):
    nonuniform.check(cfg, digits)
