"""Sequences with proximity resemblance, made from real images: synthetic motion over a still.

ProgressiveNN (Suzuki et al.) adjusts its bit precision frame by frame on sequential data
whose consecutive frames resemble each other. No such dataset ships offline here, so a
sequence is one real test image under a smooth random drift of translation, rotation and
brightness: frame t is the image warped by the drift's state at t, and every frame keeps the
image's label. The drift of each quantity is a damped random walk: its velocity is
``smoothness * velocity + (1 - smoothness) * noise``, its position is clipped to the range.
Everything is seeded (``make_sequences(..., seed)`` returns the same frames every time).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Motion:
  """How a sequence drifts: ``frames`` per sequence; the largest shift (pixels), rotation
  (degrees) and brightness change (a fraction of the pixel values); ``smoothness`` in [0, 1):
  how much of its velocity a quantity keeps from frame to frame; ``step``: the noise's scale
  per frame as a fraction of each range."""

  frames: int = 16
  max_shift: float = 3.0
  max_angle: float = 15.0
  max_brightness: float = 0.25
  smoothness: float = 0.8
  step: float = 0.5

  def __post_init__(self):
    if self.frames < 1:
      raise ValueError(f'frames must be at least 1, got {self.frames}')
    if not 0 <= self.smoothness < 1:
      raise ValueError(f'smoothness must be in [0, 1), got {self.smoothness}')
    if min(self.max_shift, self.max_angle, self.max_brightness, self.step) < 0:
      raise ValueError('the motion ranges and step must be non-negative')


@dataclasses.dataclass(frozen=True)
class Sequences:
  """``frames`` uint8 [S, T, H, W, C]; ``labels`` [S] (every frame's); ``source`` [S]: each
  sequence's image index; ``motion`` float32 [S, T, 4]: (dx, dy, degrees, brightness) per frame."""

  frames: np.ndarray
  labels: np.ndarray
  source: np.ndarray
  motion: np.ndarray


def drift(count: int, motion: Motion, rng: np.random.RandomState) -> np.ndarray:
  """[count, frames, 4] (dx, dy, degrees, brightness): a damped random walk from rest at 0."""
  limits = np.asarray([motion.max_shift, motion.max_shift, motion.max_angle, motion.max_brightness], np.float64)
  position = np.zeros((count, 4))
  velocity = np.zeros((count, 4))
  out = np.zeros((count, motion.frames, 4))
  for t in range(1, motion.frames):
    noise = rng.normal(size=(count, 4)) * motion.step * limits
    velocity = motion.smoothness * velocity + (1 - motion.smoothness) * noise
    position = np.clip(position + velocity, -limits, limits)
    out[:, t] = position
  return out.astype(np.float32)


def warp(images: np.ndarray, params: np.ndarray) -> np.ndarray:
  """Each image [F, H, W, C] moved by its (dx, dy, degrees, brightness) [F, 4]: rotated about
  its centre, shifted (bilinear sampling, zeros outside), pixel values scaled by 1 +
  brightness; uint8 out."""
  f, h, w, _ = images.shape
  dx, dy, degrees, brightness = (params[:, i, None, None].astype(np.float64) for i in range(4))
  theta = np.deg2rad(degrees)
  yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing='ij')
  cy, cx = (h - 1) / 2, (w - 1) / 2
  # the source pixel of each output pixel: undo the shift, then the rotation
  ry, rx = yy[None] - dy - cy, xx[None] - dx - cx
  sy = np.cos(theta) * ry + np.sin(theta) * rx + cy
  sx = -np.sin(theta) * ry + np.cos(theta) * rx + cx
  y0, x0 = np.floor(sy).astype(np.int64), np.floor(sx).astype(np.int64)
  wy, wx = sy - y0, sx - x0
  source = images.astype(np.float64)
  frame = np.arange(f)[:, None, None]
  out = np.zeros(images.shape, np.float64)
  for oy, ox, weight in ((0, 0, (1 - wy) * (1 - wx)), (0, 1, (1 - wy) * wx), (1, 0, wy * (1 - wx)), (1, 1, wy * wx)):
    y, x = y0 + oy, x0 + ox
    inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
    picked = source[frame, np.clip(y, 0, h - 1), np.clip(x, 0, w - 1)]
    out += (weight * inside)[..., None] * picked
  out *= (1 + brightness)[..., None]
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def make_sequences(images: np.ndarray, labels: np.ndarray, count: int, motion: Motion, seed: int) -> Sequences:
  """``count`` sequences of ``motion.frames`` frames, each from a distinct image of ``images``
  (uint8 [N, H, W, C], drawn without replacement by ``seed``) under its own drift."""
  images, labels = np.asarray(images), np.asarray(labels)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f'expected uint8 images [N, H, W, C], got {images.dtype} {images.shape}')
  if not 0 < count <= len(images):
    raise ValueError(f'count must be in 1..{len(images)} (one image per sequence), got {count}')
  rng = np.random.RandomState(seed)
  source = rng.choice(len(images), count, replace=False)
  params = drift(count, motion, rng)
  stills = np.repeat(images[source], motion.frames, axis=0)
  frames = warp(stills, params.reshape(-1, 4)).reshape((count, motion.frames) + images.shape[1:])
  return Sequences(frames, labels[source], source, params)
