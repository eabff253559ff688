"""Model zoo: level-structured MLP, LeNet-3C1L, LeNet-5, VGG-16 (CIFAR), ResNet-20 and MobileNetV2 (CIFAR).

A model is built from a name, a width multiplier and a *level assignment*: a plain
mapping ``layer name -> level sizes`` (see ``levels.py``). Layers the assignment does
not name are split into contiguous blocks at the cumulative ``level_widths``
(default: evenly spaced). An assigned layer's sizes also fix its channel count, so
construction code may widen or prune a layer by assigning it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepnet_jax.config import INITS, SettingsError
from stepnet_jax.core import levels as lv
from stepnet_jax.core.layers import Head, InvertedResidual, LevelConv, LevelDense, ResidualBlock
from stepnet_jax.core.levels import Connectivity, LevelSizes
from stepnet_jax.core.model import SteppingModel
from stepnet_jax.registry import Registry

Assignment = Mapping[str, Sequence[int]]


@dataclasses.dataclass
class Builder:
  """Collects units while tracking level sizes and the activation shape."""

  num_levels: int
  width: float
  level_widths: tuple[float, ...]
  assignment: Assignment
  triangular: bool
  mask_rule: bool
  switchable_bn: bool
  rngs: nnx.Rngs
  shape: tuple[int, ...]
  exit_heads: str = 'shared'
  units: list = dataclasses.field(default_factory=list)
  names: list = dataclasses.field(default_factory=list)
  resolved: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.sizes = lv.level0_sizes(self.shape[-1], self.num_levels)
    self.is_input = True

  def level_sizes(self, name: str, base_channels: int) -> LevelSizes:
    """Sizes of layer ``name`` (``base_channels`` at width 1.0)."""
    if name in self.resolved:
      return self.resolved[name]
    if name in self.assignment:
      sizes = tuple(int(s) for s in self.assignment[name])
    else:
      channels = max(1, lv.round_half_up(base_channels * self.width))
      sizes = lv.sizes_from_widths(channels, self.level_widths)
      empty = [k for k, size in enumerate(sizes) if size == 0]
      if empty:  # an empty level would repeat the exit below it: a subnet that adds nothing
        raise SettingsError(
          f'layer {name} has {channels} channels: too few for {len(sizes)} levels at widths '
          f'{tuple(round(w, 4) for w in self.level_widths)} (level(s) {empty} would be empty); use fewer levels '
          '(model.num_levels) or a wider network (model.width), or give the layer an assignment'
        )
    lv.check_level_count(sizes, self.num_levels, name)
    if sum(sizes) == 0:
      raise SettingsError(f'layer {name} has no channels')
    self.resolved[name] = sizes
    return sizes

  def connectivity(self, out_sizes: LevelSizes) -> Connectivity:
    """The connectivity from the current activation to a layer of ``out_sizes`` (the mask rule, triangles)."""
    # The image channels are plain inputs: the per-channel triangle applies between hidden layers.
    return Connectivity(self.sizes, out_sizes, self.triangular and not self.is_input, self.mask_rule)

  @property
  def spatial(self) -> int:
    """Positions of the current activation (1 for a vector)."""
    return self.shape[0] * self.shape[1] if len(self.shape) == 3 else 1

  def add(self, name: str, unit, out_sizes: LevelSizes) -> None:
    """Appends ``unit`` (any level-structured unit) named ``name``; its output has ``out_sizes``."""
    _, self.shape = unit.delta_macs(self.shape)
    self.units.append(unit)
    self.names.append(name)
    self.sizes, self.is_input = out_sizes, False

  def conv(self, name, channels, kernel, **kw) -> None:
    """Appends conv -> BN -> ReLU [-> max-pool]: ``channels`` at width 1, a ``kernel`` x ``kernel`` kernel;
    ``kw``: ``stride``, ``padding`` ('SAME' or 'VALID'), ``pool``, ``relu`` (``layers.LevelConv``)."""
    out = self.level_sizes(name, channels)
    self.add(
      name,
      LevelConv(self.connectivity(out), kernel, switchable_bn=self.switchable_bn, group=name, rngs=self.rngs, **kw),
      out,
    )

  def dense(self, name, channels) -> None:
    """Appends dense -> BN -> ReLU over the current activation (every position): ``channels`` at width 1."""
    out = self.level_sizes(name, channels)
    self.add(
      name,
      LevelDense(self.connectivity(out), self.spatial, switchable_bn=self.switchable_bn, group=name, rngs=self.rngs),
      out,
    )

  def head(self, num_classes: int, pool: str = 'flatten') -> Head:
    """The exits' classifier over the current activation; ``pool='avg'`` averages it over space first."""
    return Head(self.sizes, num_classes, self.spatial, pool=pool, exit_heads=self.exit_heads, rngs=self.rngs)


# name -> (builder, num_classes) -> head: adds the model's units to the builder.
MODELS: Registry[Callable[[Builder, int], Head]] = Registry('model')


@MODELS.register('mlp')
def _mlp(b: Builder, num_classes: int) -> Head:
  b.dense('fc1', 256)
  b.dense('fc2', 256)
  return b.head(num_classes)


@MODELS.register('lenet3c1l')
def _lenet3c1l(b: Builder, num_classes: int) -> Head:
  """conv3x3-conv3x3-pool-conv5x5-pool-linear, 32 filters (Any-Width Networks' LeNet)."""
  b.conv('conv1', 32, 3, padding='VALID')
  b.conv('conv2', 32, 3, padding='VALID', pool=2)
  b.conv('conv3', 32, 5, padding='VALID', pool=2)
  return b.head(num_classes)


@MODELS.register('lenet5')
def _lenet5(b: Builder, num_classes: int) -> Head:
  """LeNet-5 with BN; 28x28 inputs are padded so the maps match the 32x32 original."""
  b.conv('conv1', 6, 5, padding='SAME' if b.shape[0] == 28 else 'VALID', pool=2)
  b.conv('conv2', 16, 5, padding='VALID', pool=2)
  b.dense('fc1', 120)
  b.dense('fc2', 84)
  return b.head(num_classes)


VGG16_PLAN = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M')


@MODELS.register('vgg16')
def _vgg16(b: Builder, num_classes: int) -> Head:
  """CIFAR VGG-16 with BN: 13 conv3x3 layers, 5 max-pools, one linear classifier."""
  if b.shape[0] < 32:
    raise SettingsError('vgg16 needs inputs of at least 32x32 (five 2x2 poolings)')
  plan = list(VGG16_PLAN)
  for i, c in enumerate(plan):
    if c == 'M':
      continue
    pool = 2 if i + 1 < len(plan) and plan[i + 1] == 'M' else 0
    b.conv(f'conv{sum(1 for p in plan[: i + 1] if p != "M")}', c, 3, pool=pool)
  return b.head(num_classes)


@MODELS.register('resnet20')
def _resnet20(b: Builder, num_classes: int) -> Head:
  """CIFAR ResNet-20: stem, 3 stages x 3 basic blocks (16/32/64 channels), avg-pool, linear.

  Each stage's residual stream has one level assignment ("stageN") shared by all its
  blocks; the stem writes the first stream. Block inner layers are "stageN.blockM.mid".
  """
  stream = b.level_sizes('stage1', 16)
  stem = LevelConv(
    b.connectivity(stream), 3, padding='SAME', switchable_bn=b.switchable_bn, group='stage1', rngs=b.rngs
  )
  b.add('stem', stem, stream)
  for s, channels in enumerate((16, 32, 64)):
    out = b.level_sizes(f'stage{s + 1}', channels)  # stage1: the stem's stream
    for m in range(3):
      stride = 2 if s > 0 and m == 0 else 1
      mid = b.level_sizes(f'stage{s + 1}.block{m}.mid', channels)
      unit = ResidualBlock(
        b.sizes,
        mid,
        out,
        stride=stride,
        triangular=b.triangular,
        mask_rule=b.mask_rule,
        switchable_bn=b.switchable_bn,
        groups=(f'stage{s + 1}.block{m}.mid', f'stage{s + 1}'),
        rngs=b.rngs,
      )
      b.add(f'stage{s + 1}.block{m}', unit, out)
  return b.head(num_classes, pool='avg')


# (expansion ratio t, channels c, blocks n, first block's stride s) per stage: MobileNetV2's
# bottleneck settings, with stage 2's stride 1 for 32x32 inputs.
MOBILENETV2_STAGES = (
  (1, 16, 1, 1),
  (6, 24, 2, 1),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
)


@MODELS.register('mobilenetv2')
def _mobilenetv2(b: Builder, num_classes: int) -> Head:
  """CIFAR MobileNetV2 (Sandler et al. 2018) for 32x32 inputs: a 3x3 stem of 32 channels, 17
  inverted-residual blocks in 7 stages, a 1x1 conv to 1280 channels, avg-pool, linear.

  As in the common CIFAR ports, the stem and stage 2 have stride 1 where the ImageNet
  network has 2 (three downsamplings: 32 -> 16 -> 8 -> 4). Every layer, the last conv
  included, scales with the width multiplier, with no rounding to multiples of 8.
  Groups: "stem" (the stem's output, which stage 1's expansion-free block filters
  depthwise), "stageS" (the stream of stage S, written by its first block and added into
  by the others), "stageS.blockM.expand" (a block's expansion channels, which its depthwise
  conv reads and writes) and "last".
  """
  b.conv('stem', 32, 3)
  stream, channels = 'stem', 32
  for s, (t, c, n, stride) in enumerate(MOBILENETV2_STAGES, start=1):
    out = b.level_sizes(f'stage{s}', c)
    for m in range(n):
      name = f'stage{s}.block{m}'
      mid = stream if t == 1 else f'{name}.expand'
      unit = InvertedResidual(
        b.sizes,
        None if t == 1 else b.level_sizes(mid, channels * t),
        out,
        stride=stride if m == 0 else 1,
        residual=m > 0,
        triangular=b.triangular,
        mask_rule=b.mask_rule,
        switchable_bn=b.switchable_bn,
        groups=(mid, f'stage{s}'),
        rngs=b.rngs,
      )
      b.add(name, unit, out)
      stream, channels = f'stage{s}', c
  b.conv('last', 1280, 1)
  return b.head(num_classes, pool='avg')


def build_model(
  name: str,
  *,
  num_classes: int,
  input_shape: Sequence[int],
  num_levels: int,
  width: float = 1.0,
  level_widths: Sequence[float] | None = None,
  assignment: Assignment | None = None,
  triangular: bool = False,
  mask_rule: bool = True,
  switchable_bn: bool | None = None,
  exit_heads: str = 'shared',
  mean: Sequence[float] | None = None,
  std: Sequence[float] | None = None,
  init: str = 'he',
  seed: int = 0,
) -> SteppingModel:
  """Builds a level-structured model with freshly initialised parameters.

  Args:
    name: a name in ``MODELS``.
    num_classes: classifier outputs.
    input_shape: [H, W, C] of one image.
    num_levels: K, the number of nested subnets / exits.
    width: channel multiplier applied to every layer not named in ``assignment``.
    level_widths: cumulative fraction of each layer's channels in subnets 0..K-1
      (default evenly spaced (k+1)/K).
    assignment: explicit level sizes per layer name; overrides width for that layer.
    triangular: Any-Width-Networks per-channel triangular masks inside level blocks.
    mask_rule: False builds slimmable-style prefix subnets: every connection among a
      subnet's channels is kept and each subnet has a private BatchNorm, so a wider
      subnet recomputes everything (not reusable).
    switchable_bn: one BatchNorm per subnet; None = exactly when ``mask_rule`` is False.
      With the mask rule it keeps the rule's connectivity but gives every subnet its own
      statistics and affine parameters, so neuron values differ between subnets and the
      model recomputes each subnet (a diagnostic of what shared BN costs, not a stepping net).
    mean: per-channel mean subtracted from the [0, 1] inputs (default 0).
    std: per-channel standard deviation the inputs are divided by (default 1).
    init: ``'he'`` (He-normal hidden kernels, LeCun-normal classifier, zero bias) or
      ``'torch'`` (PyTorch's default initialisation: ``torch_init``).
    seed: the parameters' random initialisation.
  """
  architecture = MODELS.get(name)
  if init not in INITS:
    raise SettingsError(f'unknown init {init!r}; choose one of {", ".join(INITS)}')
  if num_levels < 1:
    raise SettingsError('num_levels must be >= 1')
  level_widths = tuple(level_widths) if level_widths else lv.even_widths(num_levels)
  if len(level_widths) != num_levels:
    raise SettingsError(f'{len(level_widths)} level_widths for {num_levels} levels')
  assignment = dict(assignment or {})
  input_shape = tuple(int(s) for s in input_shape)
  if triangular and not mask_rule:
    raise SettingsError('triangular masks need the mask rule')
  if exit_heads == 'private' and not mask_rule:
    raise SettingsError('private exit heads need the mask rule (their MACs are counted as stepping pays them)')
  switchable_bn = (not mask_rule) if switchable_bn is None else bool(switchable_bn)
  b = Builder(
    num_levels,
    float(width),
    level_widths,
    assignment,
    triangular,
    mask_rule,
    switchable_bn,
    nnx.Rngs(seed),
    input_shape,
    exit_heads,
  )
  head = architecture(b, num_classes)
  unknown = set(assignment) - set(b.resolved)
  if unknown:
    raise SettingsError(f'assignment names layers that {name} does not have: {sorted(unknown)}')
  channels = input_shape[-1]
  model = SteppingModel(
    b.units,
    b.names,
    head,
    input_shape=input_shape,
    num_levels=num_levels,
    mean=mean or (0.0,) * channels,
    std=std or (1.0,) * channels,
    assignment=b.resolved,
    mask_rule=mask_rule,
    switchable_bn=switchable_bn,
  )
  if init == 'torch':
    torch_init(model, seed)
  return model


def torch_init(model: SteppingModel, seed: int) -> None:
  """Re-draws ``model``'s kernels in place as PyTorch initialises ``Conv2d`` and ``Linear``:
  uniform in +-1/sqrt(fan_in), fan_in = every kernel axis but the output's (a private
  head's exit axis aside); the classifier's bias likewise, batch norm unchanged.

  Any-Width Networks' LeNet keeps this initialisation (its ``reset_parameters`` is never
  called), one difference between its code and the project's AWN: the convolutions'
  weights are 2.4x smaller than He-normal ones, which under SGD with weight decay and batch
  norm changes the effective learning rate (what it changes is measured in
  results/compare_log.md, "Reproducing AWN's published 20-epoch number").
  """
  key = jax.random.key(seed)
  modules = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module) and hasattr(m, 'kernel')]
  for i, module in enumerate(modules):
    shape = module.kernel.shape
    private_head = isinstance(module, Head) and module.private
    bound = 1.0 / float(np.sqrt(np.prod(shape[1 if private_head else 0 : -1])))
    kernel_key, bias_key = jax.random.split(jax.random.fold_in(key, i))
    kernel = jax.random.uniform(kernel_key, shape, jnp.float32, -bound, bound)
    if isinstance(module, Head):
      if private_head:
        kernel = kernel * jnp.asarray(module.exit_mask())
      module.bias[...] = jax.random.uniform(bias_key, module.bias.shape, jnp.float32, -bound, bound)
    module.kernel[...] = kernel


def assignment_of(model: SteppingModel) -> dict[str, list[int]]:
  """The level assignment of a built model, as plain JSON-able data."""
  return {name: list(sizes) for name, sizes in model.assignment}
