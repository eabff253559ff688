"""The peer methods as options of the shared machinery: slimmable prefix subnets with a
private BN per width (not reusable), AWN's triangular widths, non-uniform subnets."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import testlib
from flax import nnx

import stepnet_jax
from stepnet_jax import config
from stepnet_jax.core import levels
from stepnet_jax.data import datasets
from stepnet_jax.inference.stepper import Stepper
from stepnet_jax.methods import construct, nonuniform, trainers
from stepnet_jax.models import budgets, structure, surgery, zoo
from stepnet_jax.studies import compare, compare_report
from stepnet_jax.training import losses, optim, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compare_config():
  return config.load_file(os.path.join(REPO, 'configs', 'compare_fashion_mnist.py'))


SLIM = {'conv1': (3, 2, 4), 'conv2': (2, 3, 3), 'conv3': (4, 1, 2)}


def _slimmable(seed=0):
  return testlib.random_model(
    'lenet3c1l', seed, num_levels=3, assignment=SLIM, mask_rule=False, mean=(0.3,), std=(0.3,)
  )


def _plain_prefix(slim, level):
  """A plain single-level network holding subnet ``level``'s prefix weights and private BN."""
  ends = {n: levels.end(s, level) for n, s in SLIM.items()}
  plain = testlib.fast_model(
    'lenet3c1l', 9, num_levels=1, assignment={n: [c] for n, c in ends.items()}, mean=(0.3,), std=(0.3,)
  )
  c_in = 1
  for su, pu, n in zip(slim.units, plain.units, ('conv1', 'conv2', 'conv3')):
    pu.kernel[...] = su.kernel[...][..., :c_in, : ends[n]]
    bn = su.bn.per_level[level]
    for attr in ('scale', 'bias', 'mean', 'var'):
      getattr(pu.bn, attr)[...] = getattr(bn, attr)[...]
    c_in = ends[n]
  plain.head.kernel[...] = slim.head.kernel[...][:, :c_in]
  plain.head.bias[...] = slim.head.bias[...]
  return plain


def test_slimmable_subnets_are_dense_prefixes_with_private_bn():
  slim = _slimmable()
  for u in slim.units:
    assert u.conn.mask.all(), 'no mask rule: every connection inside the prefix is kept'
    assert len(u.bn.per_level) == 3
  x = jnp.asarray(testlib.images(testlib.MNIST_SHAPE, batch=4))
  for lvl in range(3):
    plain = _plain_prefix(slim, lvl)
    testlib.assert_close(slim(x, lvl), plain(x))
    testlib.assert_close(slim.exits(x, train=True, levels=(lvl,))[0], nnx.clone(plain)(x, train=True))


def test_slimmable_macs_and_recompute_flag():
  slim = _slimmable()
  net = Stepper(slim)
  assert not net.reusable
  ends = [{n: levels.end(s, k) for n, s in SLIM.items()} for k in range(3)]
  expected = [
    9 * 1 * e['conv1'] * 26 * 26
    + 9 * e['conv1'] * e['conv2'] * 24 * 24
    + 25 * e['conv2'] * e['conv3'] * 8 * 8
    + e['conv3'] * 16 * 10
    for e in ends
  ]
  assert net.level_macs == tuple(expected)
  assert net.macs_to_reach == tuple(np.cumsum(expected))
  with pytest.raises(ValueError, match='cannot be stepped'):
    net.start(jnp.zeros((1, 28, 28, 1), jnp.uint8))


def test_per_subnet_batch_norm_keeps_the_rule_and_gives_each_subnet_its_statistics():
  """model.batch_norm='per_subnet' on a mask-rule model (the shared-BN diagnostic): subnet
  k equals the reusable shared-BN network with the same kernels and subnet k's private BN
  values, in eval and train mode; it recomputes, so it is not reusable."""
  with testlib.numpy_initializers(3):
    per = zoo.build_model(
      'lenet3c1l',
      num_classes=10,
      input_shape=testlib.MNIST_SHAPE,
      num_levels=3,
      assignment=SLIM,
      mask_rule=True,
      switchable_bn=True,
      exit_heads='private',
      mean=(0.3,),
      std=(0.3,),
    )
    shared = zoo.build_model(
      'lenet3c1l',
      num_classes=10,
      input_shape=testlib.MNIST_SHAPE,
      num_levels=3,
      assignment=SLIM,
      exit_heads='private',
      mean=(0.3,),
      std=(0.3,),
    )
  per = testlib.randomize(per, 5)
  assert (per.mask_rule, per.switchable_bn, per.reusable) == (True, True, False)
  x = jnp.asarray(testlib.images(testlib.MNIST_SHAPE, batch=6))
  for k in range(3):
    for su, pu in zip(shared.units, per.units):
      np.testing.assert_array_equal(su.conn.mask, pu.conn.mask)  # the rule's connectivity
      su.kernel[...] = pu.kernel[...]
      end = levels.end(su.conn.out_sizes, k)
      for attr in ('scale', 'bias', 'mean', 'var'):
        getattr(su.bn, attr)[:end] = getattr(pu.bn.per_level[k], attr)[...]
    shared.head.kernel[...], shared.head.bias[...] = per.head.kernel[...], per.head.bias[...]
    testlib.assert_close(per.exits(x)[k], shared.exits(x)[k])
    testlib.assert_close(per.exits(x, train=True)[k], nnx.clone(shared).exits(x, train=True)[k])
  assert Stepper(per).macs_to_reach == tuple(np.cumsum(Stepper(shared).level_macs))
  meta = structure.model_meta(per, 'lenet3c1l', 10)
  assert structure.build_from_meta(meta).switchable_bn and structure.same_model(
    structure.model_meta(structure.build_from_meta(meta), 'lenet3c1l', 10), meta
  )
  old = {k: v for k, v in structure.model_meta(shared, 'lenet3c1l', 10).items() if k != 'switchable_bn'}
  assert not structure.build_from_meta(old).switchable_bn  # a checkpoint from before the key: shared BN
  with pytest.raises(ValueError, match='option of method joint'):
    trainers.validate(
      config.from_dict(
        {'method': 'steppingnet', 'model.batch_norm': 'per_subnet', 'construction.budgets': (0.2, 0.4, 0.6, 0.8)}
      )
    )


def test_awn_config_reproduces_the_published_width_macs():
  cc = compare_config()
  awn = compare.awn_config(compare.resolve(cc)).model
  model = nnx.eval_shape(
    lambda: zoo.build_model(
      awn.name,
      num_classes=10,
      input_shape=testlib.MNIST_SHAPE,
      num_levels=awn.num_levels,
      width=awn.width,
      level_widths=awn.level_widths,
      triangular=awn.triangular,
    )
  )
  assert dict(model.assignment)['conv2'] == (11, 12, 11, 11)  # 45 filters at 0.25/0.5/0.75/1
  assert [u.conn.triangular for u in model.units] == [False, True, True]
  # Any-Width Networks' figures: about 0.52 / 2.02 / 4.25 / 7.30 M MACs
  np.testing.assert_allclose(np.cumsum(model.delta_macs().sum(0)) / 1e6, [0.52, 2.02, 4.25, 7.30], atol=0.005)


def test_awn_published_recipe_takes_the_steps_of_awns_summed_width_losses():
  """AWN's code adds the K widths' gradients (one backward pass each) and runs torch's SGD:
  v <- 0.9 v + (g_sum + 5e-4 w), w <- w - 0.01 v. The published recipe's loss must be the SUM
  of the widths' cross-entropies and its optimiser those steps, both written out in numpy."""
  raw = compare_config()
  raw.awn.recipe = 'published'
  cfg = compare.awn_config(compare.resolve(raw))
  rng = np.random.RandomState(0)
  logits, labels = rng.normal(size=(4, 8, 10)).astype(np.float32), rng.randint(0, 10, 8)
  loss, _ = losses.multi_exit_loss(
    jnp.asarray(logits), jnp.asarray(labels), cfg.exit_weights, reduction=cfg.loss.exit_reduction
  )
  log_z = np.log(np.exp(logits).sum(-1))
  per_width = (log_z - np.take_along_axis(logits, labels[None, :, None], -1)[..., 0]).mean(-1)
  np.testing.assert_allclose(float(loss), per_width.sum(), rtol=1e-5)
  tx = optim.make_optimizer(cfg, steps_per_epoch=100)
  w = rng.normal(size=5).astype(np.float32)
  state, params, v, ref = tx.init(jnp.asarray(w)), jnp.asarray(w), np.zeros(5, np.float32), w.copy()
  for _ in range(3):
    grads = rng.normal(size=(4, 5)).astype(np.float32)  # each width's gradient
    updates, state = tx.update(jnp.asarray(grads.sum(0)), state, params)
    params = params + updates
    v = 0.9 * v + (grads.sum(0) + 5e-4 * ref)
    ref = ref - 0.01 * v
  np.testing.assert_allclose(np.asarray(params), ref, rtol=1e-5, atol=1e-6)


def test_torch_init_draws_pytorch_default_kernels_from_the_config():
  """``model.init='torch'`` draws every kernel and the classifier's bias as PyTorch does for
  AWN's LeNet (uniform in +-1/sqrt(fan_in), fan_in = C_in k k for a conv and the flattened
  features for the linear, counted here from the architecture), keeps a private head's
  masked entries at zero, and reaches the model from the config."""
  x = np.asarray(testlib.images(testlib.MNIST_SHAPE, batch=8))  # a Dataset holds numpy arrays
  dataset = datasets.Dataset('toy', x, np.arange(8, dtype=np.int32) % 10, x, np.zeros(8, np.int32), 10)
  cfg = config.from_dict({'model.width': 2**0.5, 'model.init': 'torch', 'model.exit_heads': 'private'})
  model = run.build_model(cfg, dataset)
  fan_in = {'conv1': 1 * 3 * 3, 'conv2': 45 * 3 * 3, 'conv3': 45 * 5 * 5}
  for name, unit in zip(model.unit_names, model.units, strict=True):
    w = np.asarray(unit.kernel[...])
    bound = fan_in[name] ** -0.5
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound, name
    np.testing.assert_allclose(w.std(), bound / 3**0.5, rtol=0.1, err_msg=name)
  head_bound = (45 * 4 * 4) ** -0.5  # 45 channels of a 4x4 map into the linear classifier
  kernel, bias = np.asarray(model.head.kernel[...]), np.asarray(model.head.bias[...])
  kept = np.broadcast_to(model.head.exit_mask(), kernel.shape) > 0
  assert np.all(kernel[~kept] == 0)
  assert np.abs(kernel[kept]).max() <= head_bound and np.abs(kernel[kept]).max() > 0.95 * head_bound
  assert np.abs(bias).max() <= head_bound and np.unique(bias).size == bias.size
  he = run.build_model(cfg.replace(**{'model.init': 'he'}), dataset)  # He normal: std sqrt(2 / fan_in)
  np.testing.assert_allclose(np.asarray(he.units[2].kernel[...]).std(), (2 / fan_in['conv3']) ** 0.5, rtol=0.1)
  with pytest.raises(config.SettingsError, match='model.init'):
    cfg.replace(**{'model.init': 'xavier'})


def test_width_for_budget_is_the_widest_fitting_plan():
  base = budgets.dense_macs('lenet3c1l', input_shape=testlib.MNIST_SHAPE, num_classes=10)
  assert base == 7_146_624
  for frac in (0.07, 0.3, 1.0):
    w, macs = budgets.width_for_budget('lenet3c1l', frac * base, input_shape=testlib.MNIST_SHAPE, num_classes=10)
    ch = budgets.layer_channels('lenet3c1l', input_shape=testlib.MNIST_SHAPE, num_classes=10, width=w)
    c = ch['conv2']
    assert set(ch.values()) == {c}

    def dense(c):
      return 9 * c * 676 + 9 * c * c * 576 + 25 * c * c * 64 + c * 160

    assert macs == dense(c) <= frac * base < dense(c + 1)


def _lenet_without_rule(sizes: tuple[int, ...], seed: int):
  """LeNet-3C1L, one batch norm per subnet, every layer with level sizes ``sizes``."""
  return testlib.fast_model(
    'lenet3c1l', seed, num_levels=len(sizes), mask_rule=False, assignment={n: sizes for n in testlib.LENET3}
  )


def test_channel_norm_levels_are_nested_prefixes_within_budget():
  k = 3
  model = _lenet_without_rule(levels.level0_sizes(10, k), 3)
  norms = nonuniform.channel_norms(model)
  for n, u in zip(model.unit_names, model.units):
    w = np.abs(np.asarray(u.kernel[...])).reshape(-1, 10).sum(0)
    np.testing.assert_allclose(norms[n], w / w.mean(), rtol=1e-6)
  mm = budgets.MacModel.of(model)
  full = mm.subnet_macs([levels.level0_sizes(10, k)] * 3)[0]
  targets = np.array([0.1, 0.4, 1.0]) * full
  new = construct.assign_levels(surgery.neuron_levels(model), norms, mm, targets)
  rebuilt, _ = surgery.relevel(model, checkpoint_meta(model), new)
  macs = np.cumsum(rebuilt.delta_macs().sum(0))
  assert np.all(macs <= targets)
  for n in testlib.LENET3:  # within a layer, a kept lower-level channel never has a smaller norm
    for a in range(k):
      for b in range(a + 1, k):
        if np.any(new[n] == a) and np.any(new[n] == b):
          assert norms[n][new[n] == a].min() >= norms[n][new[n] == b].max()


def checkpoint_meta(model):
  from stepnet_jax.models import structure

  return structure.model_meta(model, 'lenet3c1l', 10)


def test_carve_moves_the_least_norm_level0_neurons_until_the_subnet_fits():
  """One generation's properties: among the level-0 neurons, subnet s keeps the highest-norm
  ones of each layer and fits its budget, and no moved neuron fits back; neurons above level
  0 stay where they were; carving the top (of an all-level-0 background) removes neurons."""
  k = 3
  model = _lenet_without_rule((7, 0, 3), 5)
  mm = budgets.MacModel.of(model)
  current = surgery.neuron_levels(model)
  norms = {n: np.random.RandomState(i).permutation(10).astype(float) for i, n in enumerate(testlib.LENET3)}
  level0 = [np.array([7, 0, 0]) for _ in testlib.LENET3]
  target = 0.5 * mm.subnet_macs(level0)[0]
  new = nonuniform.carve(current, norms, mm, 0, target, k - 1)
  for n in testlib.LENET3:
    assert np.all(new[n][current[n] == 2] == 2)  # neurons of the top level are not touched
    assert set(np.unique(new[n][current[n] == 0])) <= {0, 1}
    kept, moved = norms[n][new[n] == 0], norms[n][(current[n] == 0) & (new[n] == 1)]
    if kept.size and moved.size:
      assert kept.min() > moved.max()
  counts = [np.array([np.sum(new[n] == 0), 0, 0]) for n in testlib.LENET3]
  assert mm.subnet_macs(counts)[0] <= target
  # Not one moved neuron fits back (the greedy fill leaves no slack a whole neuron could use).
  for li, n in enumerate(testlib.LENET3):
    if np.any((current[n] == 0) & (new[n] == 1)):
      more = [c.copy() for c in counts]
      more[li][0] += 1
      assert mm.subnet_macs(more)[0] > target
  background = _lenet_without_rule((10, 0, 0), 5)
  top = nonuniform.carve(
    surgery.neuron_levels(background), norms, mm, k - 1, 0.5 * mm.subnet_macs([np.array([10, 0, 0])] * 3)[0], k - 1
  )
  assert all(set(np.unique(top[n])) <= {0, surgery.REMOVED} for n in testlib.LENET3)
  assert any(np.any(top[n] == surgery.REMOVED) for n in testlib.LENET3)


def test_relevel_starts_each_subnet_batch_norm_from_the_one_named():
  model = testlib.random_model(
    'mlp',
    6,
    input_shape=(8, 8, 1),
    num_levels=3,
    mask_rule=False,
    width=0.25,
    assignment={'fc1': (4, 2, 2), 'fc2': (4, 2, 2)},
  )
  old = nnx.to_pure_dict(nnx.state(model))
  current = surgery.neuron_levels(model)
  new_levels = {n: np.where(np.arange(8) >= 2, current[n], 1) for n in current}  # neurons 0, 1 up to level 1
  new_levels = {n: np.where(np.arange(8) == 3, 1, v) for n, v in new_levels.items()}
  rebuilt, _ = surgery.relevel(model, structure.model_meta(model, 'mlp', 10), new_levels, bn_from=[1, 1, 2])
  got = nnx.to_pure_dict(nnx.state(rebuilt))
  for i, n in enumerate(('fc1', 'fc2')):
    lv_new = new_levels[n]
    order = np.argsort(lv_new, kind='stable')  # the new layout: by level, stable
    for k, source in enumerate((1, 1, 2)):
      members = order[: int(np.sum(lv_new <= k))]
      for field, value in got['units'][i]['bn']['per_level'][k].items():
        want = np.asarray(old['units'][i]['bn']['per_level'][source][field])[members]
        np.testing.assert_array_equal(np.asarray(value), want)
  with pytest.raises(ValueError, match='outside old subnet 0'):
    surgery.relevel(model, structure.model_meta(model, 'mlp', 10), new_levels, bn_from=[0, 0, 2])


def test_nonuniform_single_path_and_multi_path(tmp_path, monkeypatch):
  """Single-path: the background alone, then each generation adds the subnet it carved out
  to the ones trained; multi-path (one level, a budget below the background) prunes once."""
  ds = datasets.load_dataset('digits')
  common = {
    'method': 'nonuniform',
    'data.name': 'digits',
    'model.name': 'mlp',
    'model.width': 0.25,
    'construction.widen': 1.0,
    'train.num_epochs': 3,
    'train.batch_size': 64,
    'optim.learning_rate': 3e-3,
    'construction.pretrain_epochs': 1.0,
    'baseline.recalibrate_batches': 5,
    'train.progress': False,
  }
  cfg = config.from_dict(
    {**common, 'model.num_levels': 3, 'construction.budgets': (0.2, 0.5, 1.0), 'baseline.generation_epochs': (1.0, 2.0)}
  )
  trained, bn_from = [], []
  real, relevel = losses.subnets_for, surgery.relevel
  monkeypatch.setattr(losses, 'subnets_for', lambda c, levels: trained.append(tuple(levels)) or real(c, levels))
  monkeypatch.setattr(surgery, 'relevel', lambda *a, **k: bn_from.append(k['bn_from']) or relevel(*a, **k))
  result = nonuniform.train_nonuniform(cfg, str(tmp_path / 'single'), ds)
  assert trained == [(2,), (1, 2), (0, 1, 2)]
  # Subnet 1 (and 0 with it) starts from the top's batch norm; then subnet 0 from subnet 1's.
  assert bn_from == [[2, 2, 2], [1, 1, 2]]
  assert result['generation_epochs'] == [1.0, 2.0]
  net = stepnet_jax.load(str(tmp_path / 'single'))
  assert not net.reusable
  assert np.all(np.asarray(net.level_macs) <= np.asarray(result['budget_macs']))
  assert net.macs_to_reach == tuple(np.cumsum(net.level_macs))
  acc = result['test_accuracy']
  assert acc[2] > 0.8 and acc[0] < acc[2], acc  # chance is 0.1
  trained.clear()
  bn_from.clear()
  multi = config.from_dict({**common, 'model.num_levels': 1, 'construction.budgets': (0.3,)})
  one = nonuniform.train_nonuniform(multi, str(tmp_path / 'multi'), ds)
  assert trained == [(0,), (0,)] and bn_from == [[0]]  # the background, then its pruned subnet
  assert (
    one['level_macs'][0]
    <= one['budget_macs'][0]
    < budgets.dense_macs('mlp', input_shape=(8, 8, 1), num_classes=10, width=0.25)
  )
  with pytest.raises(ValueError, match='gives 1 epochs; these budgets carve 2'):
    nonuniform.check(cfg.replace(**{'baseline.generation_epochs': (1.0,)}), ds)
  with pytest.raises(ValueError, match=r'inside \(0, train.num_epochs=3\)'):
    nonuniform.check(cfg.replace(**{'baseline.generation_epochs': (1.0, 3.0)}), ds)


def test_sandwich_random_width_is_a_subnet_of_the_full_pass():
  """AWN-style triangular layers of equal sizes: the first m channels of every layer
  never read channels >= m, so their logits ignore whatever the other channels do."""
  sizes = (3, 3, 2)
  model = testlib.random_model(
    'lenet3c1l',
    4,
    num_levels=3,
    triangular=True,
    assignment={n: sizes for n in testlib.LENET3},
    mean=(0.3,),
    std=(0.3,),
  )
  x = jnp.asarray(testlib.images(testlib.MNIST_SHAPE, batch=3))
  for m in (1, 4, 5, 8):
    _, got = model.sandwich_exits(x, jnp.asarray([m]))
    feats = model.features(model.normalize(x), 2)
    by_hand = jnp.einsum('bsc,sco->bo', feats[..., :m].reshape(3, -1, m), model.head.kernel[...][:, :m])
    testlib.assert_close(got[0], by_hand + model.head.bias[...])
    scrambled = nnx.clone(model)
    for u in scrambled.units:  # change every weight into channels >= m
      k = np.asarray(u.kernel[...]).copy()
      k[..., m:] = np.random.RandomState(m).normal(size=k[..., m:].shape)
      u.kernel[...] = jnp.asarray(k)
    testlib.assert_close(scrambled.sandwich_exits(x, jnp.asarray([m]))[1][0], got[0])


def test_sandwich_train_step_runs():
  from stepnet_jax.data import feed
  from stepnet_jax.training import losses
  from stepnet_jax.training import step as step_lib

  cfg = config.from_dict(
    {
      'model.width': 0.25,
      'model.num_levels': 3,
      'model.triangular': True,
      'loss.objective': 'sandwich',
      'loss.sandwich_widths': 2,
      'train.batch_size': 8,
    }
  )
  model = testlib.fast_model('lenet3c1l', num_levels=3, width=0.25, triangular=True)
  tx = optim.make_optimizer(cfg, 10)
  g, state = step_lib.init_state(model, tx)
  step = step_lib.make_train_step(g, tx, losses.objective_for(cfg))
  batch = feed.Batch(jnp.asarray(testlib.images(testlib.MNIST_SHAPE, batch=8)), jnp.arange(8) % 10, 8)
  state, metrics = step(state, batch)
  assert np.isfinite(float(metrics['loss'])) and metrics['accuracy'].shape == (3,)
  with pytest.raises(ValueError, match='triangular'):
    trainers.validate(config.from_dict({'loss.objective': 'sandwich'}))


def test_recalibrate_averages_each_batchs_statistics():
  """Subnet k's first-layer BN statistics after recalibration == the mean over the
  batches of each batch's mean / variance of the pre-BN activations, computed by hand."""
  ds = datasets.subset(datasets.load_dataset('digits'), train=256)
  sizes = {'fc1': (3, 2, 4), 'fc2': (2, 2, 2)}
  model = testlib.random_model(
    'mlp', 1, input_shape=ds.input_shape, num_levels=3, assignment=sizes, mask_rule=False, mean=(0.3,), std=(0.4,)
  )
  for bn in model.units[0].bn.per_level:  # stale statistics that must not survive
    bn.mean[...] = bn.mean[...] + 5.0
  cfg = config.from_dict(
    {
      'data.name': 'digits',
      'model.name': 'mlp',
      'model.num_levels': 3,
      'train.batch_size': 32,
      'baseline.recalibrate_batches': 3,
    }
  )
  new = nonuniform.recalibrate(model, ds, cfg)
  kernel = np.asarray(model.units[0].kernel[...], np.float64)  # [S, 1, C]
  order = np.random.RandomState(cfg.seed + 7).permutation(256)  # documented: the first epoch of seed + 7
  for k in range(3):
    end = levels.end(sizes['fc1'], k)
    means, variances = [], []
    for step in range(3):
      idx = np.sort(order[32 * step : 32 * (step + 1)])
      x = (ds.train_images[idx].astype(np.float64) / 255.0 - 0.3) / 0.4
      y = x.reshape(len(idx), -1) @ kernel[:, 0, :end]
      means.append(y.mean(0))
      variances.append(y.var(0))
    bn = new.units[0].bn.per_level[k]
    np.testing.assert_allclose(np.asarray(bn.mean[...]), np.mean(means, 0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(bn.var[...]), np.mean(variances, 0), rtol=1e-3, atol=1e-4)


def test_infeasible_budgets_are_caught_before_training():
  ds = datasets.load_dataset('digits')
  common = {
    'data.name': 'digits',
    'model.name': 'mlp',
    'model.width': 0.25,
    'model.num_levels': 2,
    'train.num_epochs': 1,
    'train.batch_size': 32,
  }

  def cfg(method, budgets, widen):
    return config.from_dict({**common, 'method': method, 'construction.budgets': budgets, 'construction.widen': widen})

  too_big = cfg('steppingnet', (0.2, 5.0), 2.0)
  with pytest.raises(ValueError, match='exceeds the widened network'):
    trainers.check(too_big, ds)
  tiny = cfg('nonuniform', (1e-6, 1.0), 1.0)
  with pytest.raises(ValueError, match='one neuron per layer'):
    trainers.check(tiny, ds)
  # The non-uniform full network is the widest plan under the top budget: a top budget
  # at or below the next one after that clamp is named as such.
  clamped = cfg('nonuniform', (0.6, 3.0), 0.5)
  with pytest.raises(ValueError, match='not above budget 0'):
    trainers.check(clamped, ds)
  trainers.check(cfg('steppingnet', (0.2, 1.0), 2.0), ds)


def test_width_for_budget_refuses_budgets_beyond_its_range():
  big = budgets.dense_macs('mlp', input_shape=(8, 8, 1), num_classes=10, width=2.0)
  with pytest.raises(ValueError, match='above mlp at width 2.0'):
    budgets.width_for_budget('mlp', big + 1, input_shape=(8, 8, 1), num_classes=10, max_width=2.0)
  w, macs = budgets.width_for_budget('mlp', big - 1, input_shape=(8, 8, 1), num_classes=10, max_width=2.0)
  assert macs <= big - 1 < budgets.dense_macs('mlp', input_shape=(8, 8, 1), num_classes=10, width=w + 0.01)


def test_compare_targets_check_every_awn_variant_at_equal_or_higher_macs():
  def rows(pairs):
    return {'levels': [{'level': i, 'macs': m, 'accuracy': a} for i, (m, a) in enumerate(pairs)], 'train_seconds': 1.0}

  results = {
    'steppingnet': rows([(100, 0.80), (200, 0.85), (400, 0.90)]),
    'awn': rows([(110, 0.79), (390, 0.84)]),  # SteppingNet at 100 and 200 answer these
    'awn_sandwich': rows([(150, 0.81), (50, 0.5)]),
  }  # 0.80 < 0.81; nothing at or below 50 MACs
  lines = compare_report.targets(results)
  assert 'strictly increasing: yes' in lines[0]
  assert [line.endswith(': met') for line in lines[1:3]] == [True, True]
  assert 'vs AWN sandwich level 0' in lines[3] and lines[3].endswith('NOT met')
  assert 'no SteppingNet level at or below' in lines[4]
  # Levels of a run outside the comparison (AWN on its own recipe) are judged the same way.
  reference = {'AWN of ref.json': rows([(400, 0.91), (399, 0.84)])['levels']}
  judged = compare_report.targets(results, reference)[5:7]  # after the comparison's own AWN variants
  assert judged[0] == '- vs AWN of ref.json level 0: SteppingNet 90.00% at 400 MACs vs 91.00% at 400: NOT met'
  assert judged[1] == '- vs AWN of ref.json level 1: SteppingNet 85.00% at 200 MACs vs 84.00% at 399: met'


def test_an_awn_reference_must_be_a_comparison_with_awn(tmp_path):
  cc = compare_config()
  cc.awn_reference = str(tmp_path / 'missing.json')
  with pytest.raises(ValueError, match='no such file'):
    compare.resolve(cc)
  (tmp_path / 'other.json').write_text(json.dumps({'methods': {'slimmable': {'levels': []}}}))
  cc.awn_reference = str(tmp_path / 'other.json')
  with pytest.raises(ValueError, match='no methods.awn.levels'):
    compare.resolve(cc)


def test_compare_targets_judge_the_gap_to_the_independent_nets_by_its_sign():
  """gap = independent - SteppingNet (points): met up to +1.0, not met above; a SteppingNet
  ahead of the independent net gives a negative gap. Exits must increase strictly."""

  def rows(accs):
    return {
      'levels': [{'level': i, 'macs': 100 * (i + 1), 'accuracy': a} for i, a in enumerate(accs)],
      'train_seconds': 2.0,
    }

  results = {'steppingnet': rows([0.80, 0.85, 0.85]), 'independent': rows([0.82, 0.855, 0.80])}
  lines = compare_report.targets(results)
  assert 'strictly increasing: NO' in lines[0]
  assert 'gap +2.00 pt: NOT met' in lines[1]
  assert 'gap +0.50 pt: met' in lines[2]
  assert 'gap -5.00 pt: met' in lines[3]
  near = {'steppingnet': rows([0.80]), 'independent': rows([0.81003])}  # rounded, +1.003 would read +1.00
  assert 'gap +1.003 pt: NOT met' in compare_report.targets(near)[1]
  assert lines[4].startswith('- training time') and '2 s vs 3 independent networks 2 s' in lines[4]
  assert compare_report.targets({'awn': rows([0.9])}) == []  # nothing to judge without SteppingNet


def test_the_common_recipe_reaches_every_comparison_method():
  """Issue 12's fairness rule: a recipe setting of ``common`` (label smoothing, augmentation,
  optimiser) is in the config of every run of every method, SteppingNet's included."""
  ds = datasets.load_dataset('digits')
  cc = compare_config()
  cc.common.data.name, cc.common.model.name, cc.common.model.width = 'digits', 'mlp', 0.5
  cc.awn.widths, cc.extra_budgets = (0.5, 1.0), ()
  cc.common.loss.label_smoothing, cc.common.data.augment, cc.common.optim.weight_decay = 0.1, True, 1e-4
  setup = compare.Setup.of(compare.resolve(cc), ds)
  for name in compare.ENTRIES.names():
    for cfg in compare.ENTRIES.get(name)(setup):
      assert (cfg.loss.label_smoothing, cfg.data.augment, cfg.optim.weight_decay) == (0.1, True, 1e-4), name
  # A named recipe (compare.RECIPES) reaches every run of every method the same way.
  for recipe, settings in compare.RECIPES.items():
    cc.recipe = recipe
    setup = compare.Setup.of(compare.resolve(cc), ds)
    for name in compare.ENTRIES.names():
      for cfg in compare.ENTRIES.get(name)(setup):
        values = config.flatten(cfg.to_dict())
        assert {k: values[k] for k in settings} == {k: v for k, v in settings.items()}, (recipe, name)


def test_steppingnet_exit_weights_come_from_its_own_section_only():
  """The common exit weights (for another level count) never reach a comparison method;
  SteppingNet's section may set one weight per budget, checked against the level count."""
  ds = datasets.load_dataset('digits')
  cc = compare_config()
  cc.common.data.name, cc.common.model.name, cc.common.model.width = 'digits', 'mlp', 0.5
  cc.awn.widths, cc.extra_budgets = (0.5, 1.0), ()
  cc.common.model.num_levels, cc.common.loss.exit_weights = 3, (1.0, 9.0, 9.0)
  setup = compare.Setup.of(compare.resolve(cc), ds)
  assert len(setup.budgets) == 2
  assert compare.ENTRIES.get('steppingnet')(setup)[0].exit_weights == (1.0, 1.0)
  assert compare.ENTRIES.get('awn')(setup)[0].exit_weights == (1.0, 1.0)
  cc.steppingnet.loss.exit_weights = (1.0, 3.0)
  assert compare.ENTRIES.get('steppingnet')(compare.Setup.of(compare.resolve(cc), ds))[0].exit_weights == (1.0, 3.0)
  assert compare.ENTRIES.get('slimmable')(compare.Setup.of(compare.resolve(cc), ds))[0].exit_weights == (1.0, 1.0)
  cc.steppingnet.loss.exit_weights = (1.0, 2.0, 3.0)
  with pytest.raises(ValueError, match='exit_weights has 3 entries for 2 levels'):
    compare.ENTRIES.get('steppingnet')(compare.Setup.of(compare.resolve(cc), ds))


def test_recipes_run_the_comparison_once_each_and_choose_by_mean_validation_accuracy(tmp_path, monkeypatch):
  """``--config.recipes``: one comparison per recipe (its runs in DIR/recipe_NAME, every
  method on that recipe), and the recipe whose validation accuracy averaged over every
  method's levels is highest is chosen (computed here by hand), whatever the test accuracy."""
  cc = compare_config()
  recipes = ('common', 'published', 'sgd_cosine_1e-4')
  cc.methods, cc.recipes = ('awn', 'independent'), ','.join(recipes)  # text, as on the command line
  cc.common.data.validation_examples = 100
  validation = {  # recipe -> method -> per-level validation accuracy
    'common': {'awn': [0.80, 0.90], 'independent': [0.84, 0.88]},  # mean 0.855
    'published': {'awn': [0.85, 0.91], 'independent': [0.80, 0.86]},  # mean 0.855 - 0.0025
    'sgd_cosine_1e-4': {'awn': [0.70, 0.95], 'independent': [0.90, 0.89]},  # mean 0.86
  }
  seen = []

  def fake(one, workdir, latency_repeats):
    seen.append((one.recipe, one.recipes, workdir))
    return {
      'methods': {
        m: {
          'levels': [
            {'validation_accuracy': a - (0.0025 if one.recipe == 'published' and i else 0), 'accuracy': 1.0}
            for i, a in enumerate(accs)
          ]
        }
        for m, accs in validation[one.recipe].items()
      }
    }

  monkeypatch.setattr(compare, 'compare_resolved', fake)
  out = compare.compare(cc, str(tmp_path))
  assert seen == [(r, (), str(tmp_path / f'recipe_{r}')) for r in recipes]
  means = {r: float(np.mean([a for accs in v.values() for a in accs])) for r, v in validation.items()}
  means['published'] -= 0.0025 / 2
  assert out['chosen'] == 'sgd_cosine_1e-4' == max(means, key=means.get)
  for r, mean in means.items():
    np.testing.assert_allclose(out['recipes'][r]['mean_validation_accuracy'], mean)
    assert out['recipes'][r]['settings'] == compare.RECIPES[r]
  assert json.loads((tmp_path / 'recipes.json').read_text()) == json.loads(json.dumps(out))
  assert 'Chosen: **sgd_cosine_1e-4**' in (tmp_path / 'recipes.md').read_text()
  assert (tmp_path / 'recipes.png').stat().st_size > 0
  cc.awn.recipe = 'published'  # AWN on a recipe of its own would be trained once per recipe alike
  with pytest.raises(ValueError, match='leave recipe and awn.recipe at common'):
    compare.resolve(cc)
