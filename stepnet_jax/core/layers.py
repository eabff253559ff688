"""Level-structured layers (Flax NNX).

Every layer exposes three computations over the same parameters:

* ``__call__(x, level, train)``: the *prefix* forward of subnet ``level``. ``x`` holds
  the input channels of levels <= ``level``; the kernel slice is multiplied by the
  static connection mask where the mask is not all ones. At the top level this is the
  full-width masked layer used for one-pass multi-exit training.
* ``step(cache, x, level, rows=None)``: eval-mode computation of only the level-``level``
  output channels from the inputs of levels <= ``level``, written into the layer's cache
  buffers (of the batch rows ``rows`` only, when given). Its cost is the delta MACs of
  that level.
* ``delta_macs(in_shape)``: exact MACs of each level's new connections.

Channel axes are last (NHWC for images, [B, C] for vectors).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepnet_jax.core import levels as lv
from stepnet_jax.core.levels import Connectivity
from stepnet_jax.core.quantizers import quantize_activation
from stepnet_jax.core.wiring import Link, NotWired

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def write_block(buffer: jax.Array, block: jax.Array, offset: int, rows: jax.Array | None = None) -> jax.Array:
  """Write ``block`` into the channel axis of ``buffer`` at a static offset; with ``rows``
  (distinct batch indices, one per row of ``block``) only into those rows."""
  if block.shape[-1] == 0:
    return buffer
  if rows is None:
    return jax.lax.dynamic_update_slice_in_dim(buffer, block.astype(buffer.dtype), offset, axis=-1)
  return buffer.at[rows, ..., offset : offset + block.shape[-1]].set(block.astype(buffer.dtype), unique_indices=True)


def take_rows(buffer: jax.Array, rows: jax.Array | None, lo: int = 0, hi: int | None = None) -> jax.Array:
  """Channels [lo, hi) of ``buffer``, of the batch rows ``rows`` (all rows when None).

  Stepping only some inputs reads just the channels a level needs, not whole cache rows.
  """
  # lax.slice_in_dim, not indexing: it stays a slice under a symbolic batch size (jax2tf)
  x = jax.lax.slice_in_dim(buffer, lo, buffer.shape[-1] if hi is None else hi, axis=-1)
  return x if rows is None else x[rows]


def conv_output_size(size: int, kernel: int, stride: int, padding: str) -> int:
  """Output length along one spatial axis of a convolution: ``padding`` 'SAME' or 'VALID'."""
  if padding == 'SAME':
    return -(-size // stride)
  return (size - kernel) // stride + 1


def image_taps(size: int, kernel: int, stride: int, padding: str) -> int:
  """Kernel taps that land on the input rather than its zero padding, summed over the output
  positions along one spatial axis (XLA's cost analysis counts only these; the MAC count,
  ``kernel x outputs``, counts every tap)."""
  out = conv_output_size(size, kernel, stride, padding)
  low = max((out - 1) * stride + kernel - size, 0) // 2 if padding == 'SAME' else 0
  first = np.arange(out)[:, None] * stride - low + np.arange(kernel)[None, :]
  return int(((first >= 0) & (first < size)).sum())


# Eval-mode convolutions with at most (in, out) channels run as ``conv_by_taps`` (one
# matrix product over explicit taps), per backend. XLA:CPU's convolution of a one-channel
# input (a grayscale image's first layer and its narrow level blocks) costs about the same
# whatever its output channels: the anytime study's level-0 conv1 block (7 channels) took
# 5.1 ms at batch 256, 2.4 ms as taps. Wider outputs, two or more input channels and
# training keep the library convolution (as fast or faster there). A sum of per-tap
# broadcast products was faster still (0.4 ms), but XLA fused that loop into each of its
# consumers and computed it twice (compiled FLOPs 1.25x the MACs at level 0), so it is not
# used. Measurements: README, "Where the anytime time goes"; ``scripts/profile_levels.py``;
# ``python -m stepnet_jax.bench`` section (e). GPU/TPU: the library convolution.
TAPS_MAX_CHANNELS = {'cpu': (1, 16)}


@contextlib.contextmanager
def conv_rule(rule: dict[str, tuple[int, int]]):
  """Within the block, ``TAPS_MAX_CHANNELS`` is ``rule`` (read when functions trace; build
  fresh jitted functions inside); the default is restored after."""
  saved = dict(TAPS_MAX_CHANNELS)
  TAPS_MAX_CHANNELS.clear()
  TAPS_MAX_CHANNELS.update(rule)
  try:
    yield
  finally:
    TAPS_MAX_CHANNELS.clear()
    TAPS_MAX_CHANNELS.update(saved)


def conv_by_taps(x: jax.Array, w: jax.Array, stride: int, padding: str) -> jax.Array:
  """NHWC x HWIO convolution as one matrix product over explicit taps: the kh*kw shifted
  (strided) views of ``x`` stacked on a new axis, contracted with the kernel over
  (tap, input channel). Cheap when the input has few channels (the patches are small)."""
  kh, kw = w.shape[:2]
  if padding == 'SAME':
    pads = []
    for size, k in ((x.shape[1], kh), (x.shape[2], kw)):
      total = max((conv_output_size(size, k, stride, 'SAME') - 1) * stride + k - size, 0)
      pads.append((total // 2, total - total // 2))
    x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  h = conv_output_size(x.shape[1], kh, stride, 'VALID')
  wd = conv_output_size(x.shape[2], kw, stride, 'VALID')
  patches = jnp.stack(
    [
      # lax.slice, not indexing: it stays a slice under a symbolic batch size (jax2tf, export)
      jax.lax.slice(
        x,
        (0, dy, dx, 0),
        (x.shape[0], dy + (h - 1) * stride + 1, dx + (wd - 1) * stride + 1, x.shape[3]),
        (1, stride, stride, 1),
      )
      for dy in range(kh)
      for dx in range(kw)
    ],
    axis=-2,
  )  # [B, h, w, taps, C_in]
  return jnp.einsum('bhwtc,tco->bhwo', patches, w.reshape(kh * kw, w.shape[2], w.shape[3]))


def _contract(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """[B, S, I] x [S, I, O] -> [B, O], summed over S and I, as one matrix product of the
  flattened features: the same sum as ``einsum('bsi,sio->bo')``, written so that TFLite's
  converter computes it right under a symbolic batch size (its two-axis contraction does not)."""
  s, i, o = kernel.shape  # explicit sizes: a level may hold no features (then -1 would be ambiguous)
  return x.reshape(x.shape[0], s * i) @ kernel.reshape(s * i, o)


class BatchNorm(nnx.Module):
  """Per-channel batch norm whose statistics can be read for any channel slice.

  A channel's value is the same in every subnet that contains it, so one set of
  statistics is exact for all subnets: no switchable / per-width BN is needed.
  """

  def __init__(self, channels: int):
    self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((channels,), jnp.float32))

  def __call__(self, y: jax.Array, lo: int, hi: int, train: bool, level: int | None = None) -> jax.Array:
    del level  # shared by every subnet
    axes = tuple(range(y.ndim - 1))
    if train:
      mean = y.mean(axes)
      var = jnp.maximum((y * y).mean(axes) - mean * mean, 0.0)
      m = BN_MOMENTUM
      self.mean[lo:hi] = m * self.mean[lo:hi] + (1 - m) * jax.lax.stop_gradient(mean)
      self.var[lo:hi] = m * self.var[lo:hi] + (1 - m) * jax.lax.stop_gradient(var)
    else:
      mean, var = self.mean[lo:hi], self.var[lo:hi]
    inv = jax.lax.rsqrt(var + BN_EPSILON) * self.scale[lo:hi]
    return (y - mean) * inv + self.bias[lo:hi]


class SwitchableBatchNorm(nnx.Module):
  """One private BatchNorm per subnet, for non-reusable (slimmable-style) layers.

  Without the mask rule a channel's value changes with the subnet, so subnet k keeps
  its own statistics and affine parameters for its first end(k) channels (Yu et al.).
  """

  def __init__(self, sizes: Sequence[int]):
    self.per_level = nnx.List([BatchNorm(lv.end(tuple(sizes), k)) for k in range(len(sizes))])

  def __call__(self, y: jax.Array, lo: int, hi: int, train: bool, level: int | None = None) -> jax.Array:
    if level is None:
      raise ValueError('per-subnet batch norm needs the subnet level')
    return self.per_level[level](y, lo, hi, train)


def make_batch_norm(conn: Connectivity, switchable: bool) -> nnx.Module:
  """The BatchNorm of a layer: one shared by every subnet, or one per subnet when ``switchable``."""
  return SwitchableBatchNorm(conn.out_sizes) if switchable else BatchNorm(sum(conn.out_sizes))


class _LinearUnit(nnx.Module):
  """Shared machinery: masked kernel slices, BN, ReLU, and per-level stepping."""

  conn: Connectivity
  relu: bool
  # (bits, clip, straight-through) of the output activation's quantizer, or None (float);
  # static, set by ``quant.set_activation_quantization``.
  act_quant: tuple[int, float, bool] | None = None
  # The neuron group (a name of the model's level assignment) this layer writes: ``wiring``.
  group: str | None = None

  def linear(self, x: jax.Array, w: jax.Array, train: bool) -> jax.Array:
    """The layer's linear op (convolution or matmul) of ``x`` with the kernel slice ``w``."""
    raise NotImplementedError

  def _post(self, y: jax.Array) -> jax.Array:
    return y

  def _sliced_kernel(self, in_hi: int, out_lo: int, out_hi: int, mask: np.ndarray | None) -> jax.Array:
    w = self.kernel[..., :in_hi, out_lo:out_hi]
    if mask is not None:
      w = w * jnp.asarray(mask, w.dtype)
    return w

  def _apply(self, x: jax.Array, out_lo: int, out_hi: int, mask, train: bool, level: int) -> jax.Array:
    in_hi = x.shape[-1]
    y = self.linear(x, self._sliced_kernel(in_hi, out_lo, out_hi, mask), train)
    return self.finish(y, out_lo, out_hi, train, level)

  def finish(self, y: jax.Array, out_lo: int, out_hi: int, train: bool, level: int) -> jax.Array:
    """Everything after the linear op (BN, ReLU, pooling, activation quantizer) for the
    pre-activations ``y`` of output channels ``out_lo:out_hi`` (bit-serial inference
    accumulates ``y`` itself)."""
    y = self.bn(y, out_lo, out_hi, train, level)
    if self.relu:
      y = jax.nn.relu(y)
    y = self._post(y)
    if self.act_quant is not None:
      y = quantize_activation(y, *self.act_quant)
    return y

  def __call__(self, x: jax.Array, level: int, train: bool = False) -> jax.Array:
    """Prefix forward of subnet ``level``: all output channels of levels <= ``level``."""
    c = self.conn
    if x.shape[-1] != lv.end(c.in_sizes, level):
      raise ValueError(f'expected {lv.end(c.in_sizes, level)} input channels at level {level}, got {x.shape[-1]}')
    return self._apply(x, 0, lv.end(c.out_sizes, level), c.prefix_mask(level), train, level)

  def block(self, x: jax.Array, level: int, rows: jax.Array | None = None) -> jax.Array:
    """Eval-mode output channels of exactly level ``level`` (the delta of that level), of the
    batch rows ``rows`` of ``x`` (all when None)."""
    c = self.conn
    if not c.mask_rule:
      raise ValueError('a layer without the mask rule has no reusable level blocks')
    lo, hi = lv.start(c.out_sizes, level), lv.end(c.out_sizes, level)
    x = take_rows(x, rows, 0, lv.end(c.in_sizes, level))
    return self._apply(x, lo, hi, c.block_mask(level), False, level)

  def step(self, cache: jax.Array, x: jax.Array, level: int, rows: jax.Array | None = None) -> jax.Array:
    """Update this unit's output buffer with its level-``level`` channels (of ``rows`` only,
    when given)."""
    if lv.end(self.conn.out_sizes, level) == lv.start(self.conn.out_sizes, level):
      return cache
    return write_block(cache, self.block(x, level, rows), lv.start(self.conn.out_sizes, level), rows)

  def output(self, cache: jax.Array) -> jax.Array:
    return cache

  def cache_like(self, x: jax.Array) -> jax.Array:
    return self(x, self.conn.num_levels - 1)

  def macs_per_pair(self, in_shape: Sequence[int]) -> int:
    """MACs per input of one kept (input, output) channel pair."""
    raise NotImplementedError

  def image_macs_per_pair(self, in_shape: Sequence[int]) -> int:
    """``macs_per_pair`` without the kernel taps that read zero padding (``image_taps``)."""
    return self.macs_per_pair(in_shape)

  def links(self, path: tuple, source: str | None, in_shape: Sequence[int]) -> tuple[tuple[Link, ...], str, tuple]:
    """(this layer's link from group ``source`` to its ``group``, the group it writes, its output shape)."""
    if self.group is None:
      raise NotWired(f'the layer at {path} was built without the name of the group it writes')
    link = Link(path, source, self.group, self.macs_per_pair(in_shape), self.conn.triangular)
    link = dataclasses.replace(link, image_factor=self.image_macs_per_pair(in_shape))
    return (link,), self.group, self.delta_macs(in_shape)[1]

  def gated(self, x: jax.Array, level: int, gate) -> jax.Array:
    """The prefix forward with the output passed through ``gate(group, activation)`` (importance
    reads the gradient of a multiplicative gate on every group a layer writes)."""
    return gate(self.group, self(x, level))


class LevelConv(_LinearUnit):
  """conv -> BN -> [ReLU] -> [max-pool], kernel [kh, kw, C_in, C_out] (HWIO)."""

  def __init__(
    self,
    conn: Connectivity,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: str = 'SAME',
    pool: int = 0,
    relu: bool = True,
    switchable_bn: bool = False,
    group: str | None = None,
    rngs: nnx.Rngs,
  ):
    self.conn, self.kernel_size, self.stride, self.padding = conn, kernel_size, stride, padding
    self.pool, self.relu, self.group = pool, relu, group
    cin, cout = sum(conn.in_sizes), sum(conn.out_sizes)
    init = jax.nn.initializers.he_normal()
    self.kernel = nnx.Param(init(rngs.params(), (kernel_size, kernel_size, cin, cout), jnp.float32))
    self.bn = make_batch_norm(conn, switchable_bn)

  def linear(self, x, w, train):
    """The convolution of ``x`` with kernel (slice) ``w``; in eval mode a block within ``TAPS_MAX_CHANNELS`` as a tap
    product."""
    if 0 in w.shape[-2:]:  # an empty level block: nothing to compute
      return jnp.zeros(self._out_shape(x.shape) + (w.shape[-1],), x.dtype)
    max_in, max_out = TAPS_MAX_CHANNELS.get(jax.default_backend(), (0, 0))
    if not train and w.shape[-2] <= max_in and w.shape[-1] <= max_out:
      return conv_by_taps(x, w, self.stride, self.padding)
    return jax.lax.conv_general_dilated(
      x, w, (self.stride, self.stride), self.padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )

  def _out_shape(self, shape):
    h = conv_output_size(shape[1], self.kernel_size, self.stride, self.padding)
    w = conv_output_size(shape[2], self.kernel_size, self.stride, self.padding)
    return (shape[0], h, w)

  def _post(self, y):
    if self.pool:
      p = self.pool
      y = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, p, p, 1), (1, p, p, 1), 'VALID')
    return y

  def macs_per_pair(self, in_shape: Sequence[int]) -> int:
    """Kernel area x output positions: the MACs of one kept (input, output) channel pair."""
    _, h, w = self._out_shape((1,) + tuple(in_shape[:2]))
    return self.kernel_size**2 * h * w

  def image_macs_per_pair(self, in_shape: Sequence[int]) -> int:
    """The taps of one kept channel pair that read the input, not its padding, over all outputs."""
    k, s, p = self.kernel_size, self.stride, self.padding
    return image_taps(int(in_shape[0]), k, s, p) * image_taps(int(in_shape[1]), k, s, p)

  def delta_macs(self, in_shape: Sequence[int]) -> tuple[np.ndarray, tuple[int, ...]]:
    """(MACs per level, output shape [H, W, C]) for an input of shape [H, W, C]."""
    _, h, w = self._out_shape((1,) + tuple(in_shape[:2]))
    macs = self.conn.kept_connections() * self.macs_per_pair(in_shape)
    if self.pool:
      h, w = h // self.pool, w // self.pool
    return macs, (h, w, sum(self.conn.out_sizes))


class LevelDense(_LinearUnit):
  """dense -> BN -> [ReLU] on flattened input; kernel [S, C_in, C_out].

  S is the number of spatial positions of the input (1 for vectors), so a dense
  layer reading a conv feature map still slices levels on its channel axis.
  """

  def __init__(
    self,
    conn: Connectivity,
    spatial: int,
    *,
    relu: bool = True,
    switchable_bn: bool = False,
    group: str | None = None,
    rngs: nnx.Rngs,
  ):
    self.conn, self.spatial, self.relu, self.group = conn, spatial, relu, group
    cin, cout = sum(conn.in_sizes), sum(conn.out_sizes)
    init = jax.nn.initializers.he_normal()
    self.kernel = nnx.Param(init(rngs.params(), (spatial, cin, cout), jnp.float32))
    self.bn = make_batch_norm(conn, switchable_bn)

  def linear(self, x, w, train):
    """``x`` (flattened to [B, positions, C_in]) times kernel (slice) ``w`` [positions, C_in, C_out]."""
    del train
    if 0 in w.shape[-2:]:
      return jnp.zeros((x.shape[0], w.shape[-1]), x.dtype)
    x = x.reshape(x.shape[0], self.spatial, x.shape[-1])
    return _contract(x, w)

  def macs_per_pair(self, in_shape: Sequence[int]) -> int:
    """The input's positions: the MACs of one kept (input, output) channel pair."""
    del in_shape
    return self.spatial

  def delta_macs(self, in_shape):
    """MACs per input of each level's kept connections, and the output shape."""
    return self.conn.kept_connections() * self.spatial, (sum(self.conn.out_sizes),)


class ResidualBlock(nnx.Module):
  """CIFAR ResNet basic block whose residual stream keeps one level per channel.

  out = ReLU(BN(conv2(ReLU(BN(conv1(x))))) + shortcut(x)). The identity shortcut adds
  channel o of x to channel o of the output, which has the same level; a projection
  shortcut (1x1 conv + BN, used when the shape changes) obeys the mask rule.
  The cache holds the inner activation and the block output.
  """

  def __init__(
    self,
    in_sizes,
    mid_sizes,
    out_sizes,
    *,
    stride: int,
    triangular: bool = False,
    mask_rule: bool = True,
    switchable_bn: bool = False,
    groups: tuple[str, str] | None = None,
    rngs: nnx.Rngs,
  ):
    def conn(a, b):
      return Connectivity(tuple(a), tuple(b), triangular, mask_rule)

    mid_group, out_group = groups or (None, None)
    kw = dict(switchable_bn=switchable_bn, rngs=rngs)
    self.conv1 = LevelConv(conn(in_sizes, mid_sizes), 3, stride=stride, group=mid_group, **kw)
    self.conv2 = LevelConv(conn(mid_sizes, out_sizes), 3, relu=False, group=out_group, **kw)
    self.identity = stride == 1 and tuple(in_sizes) == tuple(out_sizes)
    self.shortcut = (
      None
      if self.identity
      else LevelConv(conn(in_sizes, out_sizes), 1, stride=stride, relu=False, group=out_group, **kw)
    )
    self.conn = conn(in_sizes, out_sizes)

  def __call__(self, x, level, train=False):
    h = self.conv1(x, level, train)
    y = self.conv2(h, level, train)
    s = x if self.identity else self.shortcut(x, level, train)
    return jax.nn.relu(y + s)

  def cache_like(self, x):
    """Full-width buffers shaped like this block's cache for input ``x``: (inner activation, block output)."""
    top = self.conn.num_levels - 1
    return (self.conv1(x, top), self(x, top))

  def step(self, cache, x, level, rows=None):
    """Computes the level-``level`` channels of both convolutions (and the shortcut) into the cache."""
    h_buf, out_buf = cache
    h_buf = self.conv1.step(h_buf, x, level, rows)
    lo, hi = lv.start(self.conn.out_sizes, level), lv.end(self.conn.out_sizes, level)
    if hi == lo:
      return h_buf, out_buf
    y = self.conv2.block(h_buf, level, rows)
    s = take_rows(x, rows, lo, hi) if self.identity else self.shortcut.block(x, level, rows)
    return h_buf, write_block(out_buf, jax.nn.relu(y + s), lo, rows)

  def output(self, cache):
    """The block output held in a cache (what the next unit reads)."""
    return cache[1]

  def links(self, path, source, in_shape):
    """conv1 (the stream ``source`` -> the inner group), conv2 (inner -> the output stream) and
    a projection shortcut (``source`` -> the output stream); the identity shortcut adds a stream
    into itself, so it needs ``source`` to be the stream the block writes."""
    first, mid, mid_shape = self.conv1.links(path + ('conv1',), source, in_shape)
    second, out, out_shape = self.conv2.links(path + ('conv2',), mid, mid_shape)
    if self.identity:
      if source != out:
        raise NotWired(f'the identity shortcut at {path} adds group {source!r} into group {out!r}')
      return first + second, out, out_shape
    return first + second + self.shortcut.links(path + ('shortcut',), source, in_shape)[0], out, out_shape

  def gated(self, x, level, gate):
    """The block with its inner activation and its output gated (``_LinearUnit.gated``)."""
    h = self.conv1.gated(x, level, gate)
    s = x if self.identity else self.shortcut(x, level)
    return gate(self.conv2.group, jax.nn.relu(self.conv2(h, level) + s))

  def delta_macs(self, in_shape):
    """MACs per input of each level, both convolutions and a projection shortcut, and the output shape."""
    m1, mid_shape = self.conv1.delta_macs(in_shape)
    m2, out_shape = self.conv2.delta_macs(mid_shape)
    m = m1 + m2
    if not self.identity:
      m = m + self.shortcut.delta_macs(in_shape)[0]
    return m, out_shape


class DepthwiseConv(nnx.Module):
  """Depthwise k x k conv -> BN -> [ReLU], SAME padding; kernel [k, k, 1, C] (HWIO, one filter per channel).

  Output channel c reads only input channel c, so it has that channel's level: input and
  output are one neuron group with one set of level ``sizes``, the mask rule needs no mask,
  and the delta of level k reads only the level-k input channels. Its one connection per
  channel also lies inside Any-Width Networks' triangle, so ``triangular`` changes nothing
  here. Without the mask rule a subnet is its first end(k) channels (with ``switchable_bn``,
  a BN per subnet). The activation is ReLU, as in every other layer of the zoo, rather than
  MobileNetV2's ReLU6 (a bound for low-precision inference; either steps the same).
  """

  def __init__(
    self,
    sizes: Sequence[int],
    kernel_size: int = 3,
    *,
    stride: int = 1,
    relu: bool = True,
    mask_rule: bool = True,
    switchable_bn: bool = False,
    group: str | None = None,
    rngs: nnx.Rngs,
  ):
    self.sizes, self.kernel_size, self.stride = tuple(int(s) for s in sizes), kernel_size, stride
    self.relu, self.mask_rule, self.group = relu, mask_rule, group
    channels = sum(self.sizes)
    init = jax.nn.initializers.he_normal()  # fan-in: the k x k taps of one channel
    self.kernel = nnx.Param(init(rngs.params(), (kernel_size, kernel_size, 1, channels), jnp.float32))
    self.bn = SwitchableBatchNorm(self.sizes) if switchable_bn else BatchNorm(channels)

  @property
  def num_levels(self) -> int:
    """K, the number of levels."""
    return len(self.sizes)

  def _out_hw(self, h: int, w: int) -> tuple[int, int]:
    k, s = self.kernel_size, self.stride
    return conv_output_size(h, k, s, 'SAME'), conv_output_size(w, k, s, 'SAME')

  def _apply(self, x: jax.Array, lo: int, hi: int, train: bool, level: int) -> jax.Array:
    """Channels ``lo:hi`` from the same input channels ``x`` (exactly hi - lo of them)."""
    if hi == lo:
      return jnp.zeros((x.shape[0],) + self._out_hw(*x.shape[1:3]) + (0,), x.dtype)
    y = jax.lax.conv_general_dilated(
      x,
      self.kernel[..., lo:hi],
      (self.stride, self.stride),
      'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=hi - lo,
    )
    y = self.bn(y, lo, hi, train, level)
    return jax.nn.relu(y) if self.relu else y

  def __call__(self, x: jax.Array, level: int, train: bool = False) -> jax.Array:
    """Prefix forward of subnet ``level``: channels [0, end(level)) from the same input channels."""
    hi = lv.end(self.sizes, level)
    if x.shape[-1] != hi:
      raise ValueError(f'expected {hi} input channels at level {level}, got {x.shape[-1]}')
    return self._apply(x, 0, hi, train, level)

  def block(self, x: jax.Array, level: int, rows: jax.Array | None = None) -> jax.Array:
    """Eval-mode channels of exactly level ``level``, from the level-``level`` input channels
    alone (of the batch rows ``rows`` of ``x``, all when None)."""
    if not self.mask_rule:
      raise ValueError('a layer without the mask rule has no reusable level blocks')
    lo, hi = lv.start(self.sizes, level), lv.end(self.sizes, level)
    return self._apply(take_rows(x, rows, lo, hi), lo, hi, False, level)

  def step(self, cache: jax.Array, x: jax.Array, level: int, rows: jax.Array | None = None) -> jax.Array:
    """Update the output buffer with the level-``level`` channels (of ``rows`` only, when given)."""
    lo, hi = lv.start(self.sizes, level), lv.end(self.sizes, level)
    if hi == lo:
      return cache
    return write_block(cache, self.block(x, level, rows), lo, rows)

  def output(self, cache: jax.Array) -> jax.Array:
    """The output buffer held in a cache (the layer caches nothing else)."""
    return cache

  def cache_like(self, x: jax.Array) -> jax.Array:
    """A full-width output buffer for input ``x``."""
    return self(x, self.num_levels - 1)

  def macs_per_pair(self, in_shape: Sequence[int]) -> int:
    """Kernel area x output positions: the MACs of one channel (its only input-output pair)."""
    h, w = self._out_hw(*in_shape[:2])
    return self.kernel_size**2 * h * w

  def image_macs_per_pair(self, in_shape: Sequence[int]) -> int:
    """The taps of one channel that read the input, not its padding, over all outputs."""
    k, s = self.kernel_size, self.stride
    return image_taps(int(in_shape[0]), k, s, 'SAME') * image_taps(int(in_shape[1]), k, s, 'SAME')

  def delta_macs(self, in_shape: Sequence[int]) -> tuple[np.ndarray, tuple[int, ...]]:
    """(MACs per level: sizes[k] x k^2 x output positions, output shape [H, W, C]) for an input [H, W, C]."""
    if in_shape[-1] != sum(self.sizes):
      raise ValueError(f'a depthwise layer of {sum(self.sizes)} channels given {in_shape[-1]} input channels')
    h, w = self._out_hw(*in_shape[:2])
    return np.asarray(self.sizes, np.int64) * self.macs_per_pair(in_shape), (h, w, sum(self.sizes))

  def links(self, path: tuple, source: str | None, in_shape: Sequence[int]) -> tuple[tuple[Link, ...], str, tuple]:
    """One depthwise link from its group to itself; it must read the group it was built for."""
    if self.group is None:
      raise NotWired(f'the depthwise layer at {path} was built without the name of its group')
    if source != self.group:
      raise NotWired(f'the depthwise layer at {path} of group {self.group!r} reads group {source!r}')
    link = Link(
      path,
      source,
      self.group,
      self.macs_per_pair(in_shape),
      depthwise=True,
      image_factor=self.image_macs_per_pair(in_shape),
    )
    return (link,), self.group, self.delta_macs(in_shape)[1]

  def gated(self, x: jax.Array, level: int, gate) -> jax.Array:
    """The prefix forward with the output passed through ``gate(group, activation)``."""
    return gate(self.group, self(x, level))


class InvertedResidual(nnx.Module):
  """MobileNetV2 inverted-residual block (linear bottleneck) whose streams keep one level per channel.

  expand (1x1 conv -> BN -> ReLU, stream -> the block's expansion group; omitted when
  ``exp_sizes`` is None, expansion ratio 1, and then the depthwise reads the stream), a
  depthwise conv -> BN -> ReLU with the block's stride (its group -> itself), project (1x1
  conv -> BN, no ReLU, -> the output stream), and with ``residual`` the identity add of the
  input stream (same group and sizes, stride 1) with no ReLU after. The builder decides
  ``residual`` (a stage's later blocks), not the sizes, which may coincide across streams.
  ``groups``: (the group the depthwise reads and writes, the output stream).
  The cache holds (expansion,) depthwise and output buffers.
  """

  def __init__(
    self,
    in_sizes: Sequence[int],
    exp_sizes: Sequence[int] | None,
    out_sizes: Sequence[int],
    *,
    stride: int,
    residual: bool,
    kernel_size: int = 3,
    triangular: bool = False,
    mask_rule: bool = True,
    switchable_bn: bool = False,
    groups: tuple[str, str] | None = None,
    rngs: nnx.Rngs,
  ):
    def conn(a, b):
      return Connectivity(tuple(a), tuple(b), triangular, mask_rule)

    if residual and (stride != 1 or tuple(in_sizes) != tuple(out_sizes)):
      raise ValueError(f'an identity add needs stride 1 and equal level sizes, got {stride}, {in_sizes} -> {out_sizes}')
    mid_group, out_group = groups or (None, None)
    kw = dict(switchable_bn=switchable_bn, rngs=rngs)
    mid_sizes = tuple(in_sizes) if exp_sizes is None else tuple(exp_sizes)
    self.expand = None if exp_sizes is None else LevelConv(conn(in_sizes, mid_sizes), 1, group=mid_group, **kw)
    self.depthwise = DepthwiseConv(mid_sizes, kernel_size, stride=stride, mask_rule=mask_rule, group=mid_group, **kw)
    self.project = LevelConv(conn(mid_sizes, out_sizes), 1, relu=False, group=out_group, **kw)
    self.residual = bool(residual)
    self.conn = conn(in_sizes, out_sizes)

  def _inner(self, x: jax.Array, level: int, train: bool) -> tuple[jax.Array, jax.Array]:
    h = x if self.expand is None else self.expand(x, level, train)
    return h, self.depthwise(h, level, train)

  def __call__(self, x: jax.Array, level: int, train: bool = False) -> jax.Array:
    y = self.project(self._inner(x, level, train)[1], level, train)
    return y + x if self.residual else y

  def cache_like(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """Full-width buffers shaped like this block's cache for input ``x``: ((expansion,) depthwise, output)."""
    top = self.conn.num_levels - 1
    h, d = self._inner(x, top, False)
    out = self(x, top)
    return (d, out) if self.expand is None else (h, d, out)

  def step(
    self, cache: tuple[jax.Array, ...], x: jax.Array, level: int, rows: jax.Array | None = None
  ) -> tuple[jax.Array, ...]:
    """Computes the level-``level`` channels of expand, depthwise and project (plus the add) into the cache."""
    *inner, out_buf = cache
    h = x
    if self.expand is not None:
      h = self.expand.step(inner[0], x, level, rows)
    d = self.depthwise.step(inner[-1], h, level, rows)
    lo, hi = lv.start(self.conn.out_sizes, level), lv.end(self.conn.out_sizes, level)
    if hi > lo:
      y = self.project.block(d, level, rows)
      if self.residual:
        y = y + take_rows(x, rows, lo, hi)
      out_buf = write_block(out_buf, y, lo, rows)
    return (d, out_buf) if self.expand is None else (h, d, out_buf)

  def output(self, cache: tuple[jax.Array, ...]) -> jax.Array:
    """The block output held in a cache (what the next unit reads)."""
    return cache[-1]

  def links(self, path: tuple, source: str | None, in_shape: Sequence[int]) -> tuple[tuple[Link, ...], str, tuple]:
    """expand (the stream ``source`` -> the expansion group), depthwise (that group -> itself; the
    stream itself without expansion) and project (-> the output stream); the identity add needs
    ``source`` to be the stream the block writes."""
    links, mid, shape = (), source, tuple(in_shape)
    if self.expand is not None:
      links, mid, shape = self.expand.links(path + ('expand',), source, shape)
    dw, mid, shape = self.depthwise.links(path + ('depthwise',), mid, shape)
    proj, out, out_shape = self.project.links(path + ('project',), mid, shape)
    if self.residual and source != out:
      raise NotWired(f'the identity add at {path} adds group {source!r} into group {out!r}')
    return links + dw + proj, out, out_shape

  def gated(self, x: jax.Array, level: int, gate) -> jax.Array:
    """The block with its expansion, depthwise and output activations gated (``_LinearUnit.gated``)."""
    h = x if self.expand is None else self.expand.gated(x, level, gate)
    y = self.project(self.depthwise.gated(h, level, gate), level)
    return gate(self.project.group, y + x if self.residual else y)

  def delta_macs(self, in_shape: Sequence[int]) -> tuple[np.ndarray, tuple[int, ...]]:
    """MACs per input of each level (expand, depthwise, project; the add multiplies nothing), and the output shape."""
    m, shape = np.zeros(self.conn.num_levels, np.int64), tuple(in_shape)
    for layer in (self.expand, self.depthwise, self.project):
      if layer is not None:
        macs, shape = layer.delta_macs(shape)
        m = m + macs
    return m, shape


EXIT_HEADS = ('shared', 'private')


class Head(nnx.Module):
  """The exits' linear classifier over the last hidden features.

  ``exit_heads='shared'``: one additive classifier, logits(k) = bias + sum over the
  features of levels <= k (kernel [S, C, classes]); step k adds the level-k features'
  contribution to the cached logits.
  ``exit_heads='private'``: exit k has its own classifier over all features of levels
  <= k (kernel [K, S, C, classes], the entries of higher-level features held at zero;
  bias [K, classes]). Its outputs are level-k neurons whose inputs all have level <= k,
  so the mask rule holds; step k computes exit k's classifier whole (S x end_k x classes
  MACs) and replaces the cached logits.

  ``pool='avg'`` averages a feature map over space first (ResNet); ``'flatten'``
  keeps every position.
  """

  def __init__(
    self, in_sizes, num_classes: int, spatial: int, *, pool: str = 'flatten', exit_heads: str = 'shared', rngs: nnx.Rngs
  ):
    if exit_heads not in EXIT_HEADS:
      raise ValueError(f'unknown exit_heads {exit_heads!r}; choose one of {", ".join(EXIT_HEADS)}')
    self.in_sizes, self.num_classes, self.pool = tuple(in_sizes), num_classes, pool
    self.private = exit_heads == 'private'
    self.spatial = 1 if pool == 'avg' else spatial
    init = jax.nn.initializers.lecun_normal()
    k, features = len(self.in_sizes), sum(self.in_sizes)
    if self.private:
      kernel = init(rngs.params(), (k, self.spatial, features, num_classes), jnp.float32)
      self.kernel = nnx.Param(kernel * jnp.asarray(self.exit_mask()))
      self.bias = nnx.Param(jnp.zeros((k, num_classes), jnp.float32))
    else:
      self.kernel = nnx.Param(init(rngs.params(), (self.spatial, features, num_classes), jnp.float32))
      self.bias = nnx.Param(jnp.zeros((num_classes,), jnp.float32))

  def exit_mask(self) -> np.ndarray:
    """Private heads: 1 where exit k may read feature c (level(c) <= k), [K, 1, C, 1]."""
    ends = np.asarray([lv.end(self.in_sizes, k) for k in range(len(self.in_sizes))])
    return (np.arange(sum(self.in_sizes))[None, :] < ends[:, None]).astype(np.float32)[:, None, :, None]

  def level_inputs(self) -> np.ndarray:
    """Features the head reads at each level's step: the level's own (shared) or every
    feature of levels <= k (private)."""
    sizes = np.asarray(self.in_sizes, np.int64)
    return np.cumsum(sizes) if self.private else sizes

  def _flat(self, x):
    if self.pool == 'avg' and x.ndim == 4:
      x = x.mean((1, 2))
    return x.reshape(x.shape[0], self.spatial, x.shape[-1])

  def contribution(self, x: jax.Array, level: int, rows: jax.Array | None = None) -> jax.Array:
    """Shared head: logit contribution of the level-``level`` features (no bias), of the
    batch rows ``rows`` (all when None). x: features of levels <= level."""
    lo, hi = lv.start(self.in_sizes, level), lv.end(self.in_sizes, level)
    x = self._flat(take_rows(x, rows, lo, hi))
    return _contract(x, self.kernel[:, lo:hi])

  def step_logits(self, logits: jax.Array, x: jax.Array, level: int, rows: jax.Array | None = None) -> jax.Array:
    """The cached ``logits`` [B, classes] after step ``level`` (of the rows ``rows``, all when
    None), from the features ``x`` of levels <= level: the shared head adds the level's
    contribution, a private head replaces them with exit ``level``'s classifier."""
    if self.private:
      new = self(take_rows(x, rows, 0, lv.end(self.in_sizes, level)), level)
      return new if rows is None else logits.at[rows].set(new, unique_indices=True)
    delta = self.contribution(x, level, rows)
    if level == 0:
      delta = delta + self.bias[...]
    return logits + delta if rows is None else logits.at[rows].add(delta, unique_indices=True)

  def __call__(self, x, level):
    hi = lv.end(self.in_sizes, level)
    if self.private:
      return _contract(self._flat(x[..., :hi]), self.kernel[level, :, :hi]) + self.bias[level]
    return _contract(self._flat(x[..., :hi]), self.kernel[:, :hi]) + self.bias[...]

  def exits(self, x: jax.Array) -> jax.Array:
    """All K exits from full-width features: [K, B, classes] (shared: cumulative over levels)."""
    if self.private:
      kernel = self.kernel[...] * jnp.asarray(self.exit_mask())
      return jnp.einsum('bsc,ksco->kbo', self._flat(x), kernel) + self.bias[...][:, None, :]
    deltas = jnp.stack([self.contribution(x, k) for k in range(len(self.in_sizes))])
    return jnp.cumsum(deltas, axis=0) + self.bias[...]

  def prefix_logits(self, x: jax.Array, counts: jax.Array) -> jax.Array:
    """Logits from only the first ``counts[r]`` features of full-width ``x``: [R, B, classes].

    ``counts`` may be traced (random widths in AWN's sandwich rule). Shared head only.
    """
    if self.private:
      raise ValueError('random-width logits (the sandwich rule) need the shared head: exit_heads=shared')
    per_feature = jnp.einsum('bsc,sco->cbo', self._flat(x), self.kernel[...])
    return jnp.cumsum(per_feature, axis=0)[counts - 1] + self.bias[...]

  def delta_macs(self, in_shape):
    """MACs per input of each level's classifier inputs (features x classes), and the logits' shape."""
    return self.level_inputs() * self.spatial * self.num_classes, (self.num_classes,)
