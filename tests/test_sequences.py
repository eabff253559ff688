"""Sequences of moving real images: seeded, label-preserving, smooth, and warped as an
independent computation says (integer shifts against np.roll with zero fill)."""

import numpy as np
import pytest

from stepnet_jax.data import datasets, sequences


@pytest.fixture(scope='module')
def digits():
  d = datasets.load_digits()
  return d.test_images, d.test_labels


def test_sequences_are_seeded_and_keep_each_images_label(digits):
  images, labels = digits
  motion = sequences.Motion(frames=6, max_shift=1.5, max_angle=10.0)
  a = sequences.make_sequences(images, labels, 20, motion, seed=3)
  b = sequences.make_sequences(images, labels, 20, motion, seed=3)
  c = sequences.make_sequences(images, labels, 20, motion, seed=4)
  assert a.frames.shape == (20, 6) + images.shape[1:] and a.frames.dtype == np.uint8
  np.testing.assert_array_equal(a.frames, b.frames)
  assert not np.array_equal(a.frames, c.frames)
  np.testing.assert_array_equal(a.labels, labels[a.source])
  assert len(set(a.source.tolist())) == 20  # one image per sequence
  np.testing.assert_array_equal(a.frames[:, 0], images[a.source])  # the drift starts at rest
  assert np.all(np.abs(a.motion[..., :2]) <= 1.5) and np.all(np.abs(a.motion[..., 2]) <= 10.0)


def test_consecutive_frames_resemble_each_other_more_than_other_sequences(digits):
  images, labels = digits
  s = sequences.make_sequences(images, labels, 30, sequences.Motion(frames=8), seed=0)
  f = s.frames.astype(np.float64)
  consecutive = np.abs(f[:, 1:] - f[:, :-1]).mean()
  across = np.abs(f[1:] - f[:-1]).mean()  # the same frame index, neighbouring sequences
  assert consecutive < 0.5 * across


def test_integer_shifts_are_rolls_with_zeros_brought_in(digits):
  images, _ = digits
  x = images[:4]
  params = np.asarray([[2, 0, 0, 0], [0, -1, 0, 0], [-3, 1, 0, 0], [0, 0, 0, 0.5]], np.float32)
  got = sequences.warp(x, params)
  for i, (dx, dy, _, gain) in enumerate(params):
    want = np.roll(x[i].astype(np.float64), (int(dy), int(dx)), axis=(0, 1))
    if dy > 0:
      want[: int(dy)] = 0
    if dy < 0:
      want[int(dy) :] = 0
    if dx > 0:
      want[:, : int(dx)] = 0
    if dx < 0:
      want[:, int(dx) :] = 0
    np.testing.assert_array_equal(got[i], np.clip(np.round(want * (1 + gain)), 0, 255).astype(np.uint8))


def test_a_half_turn_of_a_square_image_reverses_both_axes(digits):
  images, _ = digits
  got = sequences.warp(images[:2], np.asarray([[0, 0, 180, 0]] * 2, np.float32))
  np.testing.assert_array_equal(got, images[:2, ::-1, ::-1])


def test_bad_requests_are_refused(digits):
  images, labels = digits
  with pytest.raises(ValueError, match='one image per sequence'):
    sequences.make_sequences(images, labels, len(images) + 1, sequences.Motion(), 0)
  with pytest.raises(ValueError, match='smoothness'):
    sequences.Motion(smoothness=1.0)
  with pytest.raises(ValueError, match='uint8'):
    sequences.make_sequences(images.astype(np.float32), labels, 3, sequences.Motion(), 0)


def test_each_policy_replays_as_a_frame_by_frame_loop_would():
  """The vectorised replay against a plain loop over sequences and frames."""
  from stepnet_jax.studies import sequences as study

  rng = np.random.RandomState(1)
  confidence = rng.uniform(size=(4, 7, 9))
  for policy, offset in (('per_frame', None), ('start_at_previous', 0), ('start_below_previous', -1)):
    got = study.replay(confidence, policy, 0.6)
    for s in range(7):
      start = 0
      for t in range(9):
        k = next((k for k in range(start, 4) if confidence[k, s, t] >= 0.6), 3)
        assert got[s, t] == k, (policy, s, t)
        start = 0 if offset is None else min(max(k + offset, 0), 3)
  with pytest.raises(ValueError, match='unknown policy'):
    study.replay(confidence, 'oracle', 0.5)


def test_the_plane_controller_replays_as_a_frame_by_frame_loop_would():
  from stepnet_jax.studies import sequences as study

  rng = np.random.RandomState(2)
  confidence = rng.uniform(size=(5, 6, 10))
  got = study.replay_planes(confidence, 0.4, 0.8, start=3)
  for s in range(6):
    b = 3
    for t in range(10):
      assert got[s, t] == b
      c = confidence[b - 1, s, t]
      b = min(max(b + (c < 0.4) - (c >= 0.8), 1), 5)
  # The controller is chosen on the first half only: the most accurate there within the target.
  labels = rng.randint(0, 3, 6)
  logits = rng.normal(size=(5, 6, 10, 3))
  logits[4, np.arange(6), :, labels] += 10.0  # 5 planes: always right
  out = study.planes_study(logits, labels, targets=(2.0, 3.0))
  assert out['fixed_accuracy']['report'][-1] == 1.0
  for c in out['comparison']:
    fits = [q for q in out['controller_points'] if q['choose_mean_planes'] <= c['target_mean_planes']]
    chosen = next(q for q in fits if {k: q[k] for k in ('low', 'high', 'start')} == c['controller'])
    assert chosen['choose_accuracy'] == max(q['choose_accuracy'] for q in fits)
    assert c['accuracy'] == chosen['report_accuracy'] and c['mean_planes'] == chosen['report_mean_planes']
    own = [q for q in out['within_frame_points'] if q['choose_mean_planes'] <= c['target_mean_planes']]
    if own:  # within the frame: the frame's own confidence, a threshold chosen the same way
      pick = max(own, key=lambda q: q['choose_accuracy'])
      assert c['within_frame']['threshold'] == pick['threshold']
  z = logits - logits.max(-1, keepdims=True)
  sure = (np.exp(z) / np.exp(z).sum(-1, keepdims=True)).max(-1) >= 0.9  # [5, 6, 10]
  first = np.where(sure.any(0), sure.argmax(0) + 1, 5)  # the first plane count that is sure, by hand
  q = next(q for q in out['within_frame_points'] if q['threshold'] == 0.9)
  assert q['report_mean_planes'] == pytest.approx(first[3:].mean())
