"""Anytime inference on sequences: does the previous frame's exit level tell where to start?

    python -m stepnet_jax.studies.sequences --workdir RUN --json results/sequences_fashion_mnist.json

Frames come from ``data.sequences`` (real test images under a smooth synthetic drift; every
frame keeps its image's label). A stepping network's exits are computed once for every
frame; each policy is then replayed exactly on them, frame by frame (for a stepping network,
reaching level k costs ``macs_to_reach[k]`` however it got there):

* ``per_frame``: every frame starts at level 0 and stops at the first exit whose top
  probability reaches the threshold (the top level otherwise), as ``policies.Confidence``;
* ``start_at_previous``: a frame starts where the previous frame stopped (the first frame at
  0) and stops as above from there: it never answers below the previous frame's level;
* ``start_below_previous``: a frame starts one level below where the previous one stopped, so
  a sequence can also come down.

Each threshold gives a point (mean MACs per frame over the top's, accuracy over all frames);
the curves are written to ``--json`` with a plot beside it.

With ``--progressive DIR`` (a precision study's bitwise-binary network), ProgressiveNN's
question too: the top exit at b of N bit-planes for every frame, and a controller that sets
each frame's planes from the previous frame's confidence (``replay_planes``: one plane more
below ``low``, one fewer at ``high`` or above; the first frame at ``start``), against every
frame at a fixed b. The controller's thresholds are chosen on the first half of the sequences
(the most accurate at or under each mean of planes) and reported on the second half, beside
fixed planes at the same mean (between two whole counts: a mix of both, linear), and beside
bit-serial anytime within each frame (planes added until the frame's own confidence reaches a
threshold, chosen the same way).
"""

from __future__ import annotations

import datetime
import json
import os

import numpy as np
from absl import flags
from flax import nnx

import stepnet_jax
from stepnet_jax import cli
from stepnet_jax.core import stepping
from stepnet_jax.data import datasets
from stepnet_jax.data import sequences as sequences_lib
from stepnet_jax.inference import evaluation
from stepnet_jax.methods import progressive

POLICIES = ('per_frame', 'start_at_previous', 'start_below_previous')
_START_OFFSET = {'per_frame': None, 'start_at_previous': 0, 'start_below_previous': -1}


def replay(confidence: np.ndarray, policy: str, threshold: float) -> np.ndarray:
  """Each frame's exit level [S, T] under ``policy`` from the exits' top probabilities
  ``confidence`` [K, S, T]."""
  if policy not in _START_OFFSET:
    raise ValueError(f'unknown policy {policy!r}; choose from {", ".join(POLICIES)}')
  num_levels, count, frames = confidence.shape
  top = num_levels - 1
  sure = confidence >= threshold  # [K, S, T]
  levels = np.arange(num_levels)[:, None]
  exits = np.zeros((count, frames), np.int64)
  start = np.zeros(count, np.int64)
  for t in range(frames):
    if _START_OFFSET[policy] is None:
      start = np.zeros(count, np.int64)
    allowed = sure[:, :, t] & (levels >= start[None])  # [K, S]
    exits[:, t] = np.where(allowed.any(0), allowed.argmax(0), top)
    if _START_OFFSET[policy] is not None:
      start = np.clip(exits[:, t] + _START_OFFSET[policy], 0, top)
  return exits


def replay_planes(confidence: np.ndarray, low: float, high: float, start: int) -> np.ndarray:
  """Each frame's plane count [S, T] (1..N) under the temporal controller, from the top exit's
  confidence at every plane count [N, S, T]: a frame uses the previous frame's count, one
  more if the previous frame's confidence was below ``low``, one fewer if at least ``high``."""
  n, count, frames = confidence.shape
  planes = np.zeros((count, frames), np.int64)
  b = np.full(count, int(start))
  rows = np.arange(count)
  for t in range(frames):
    planes[:, t] = b
    seen = confidence[b - 1, rows, t]
    b = np.clip(b + (seen < low) - (seen >= high), 1, n)
  return planes


PER_FRAME_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999)
CONTROLLER_GRID = [
  (lo, hi) for lo in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95) for hi in (0.8, 0.9, 0.95, 0.98, 0.99, 0.999) if lo < hi
]


def _confidence_and_correct(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The top softmax probability and whether the argmax is the label, for logits [A, S, T, classes]."""
  z = logits - logits.max(-1, keepdims=True)
  confidence = (np.exp(z) / np.exp(z).sum(-1, keepdims=True)).max(-1)
  return confidence, logits.argmax(-1) == labels[None, :, None]


def _on_halves(planes: np.ndarray, correct: np.ndarray, halves: dict[str, slice]) -> dict[str, float]:
  """Mean planes and accuracy of a plane choice [S, T] on each half of the sequences."""
  right = np.take_along_axis(correct, (planes - 1)[None], axis=0)[0]
  return {
    **{f'{part}_mean_planes': float(planes[rows].mean()) for part, rows in halves.items()},
    **{f'{part}_accuracy': float(right[rows].mean()) for part, rows in halves.items()},
  }


def _chosen(points: list[dict], target: float) -> dict | None:
  """The point most accurate on the choosing half within ``target`` mean planes there (None if none fits)."""
  fits = [q for q in points if q['choose_mean_planes'] <= target]
  return max(fits, key=lambda q: q['choose_accuracy']) if fits else None


def planes_study(logits: np.ndarray, labels: np.ndarray, targets=(2.0, 3.0, 4.0)) -> dict:
  """ProgressiveNN on sequences from the top exit's logits at every plane count [N, S, T, classes]
  (``targets``: the mean plane counts the controller is compared at; those above N are skipped)."""
  n, count = logits.shape[:2]
  targets = [t for t in targets if t <= n]
  confidence, correct = _confidence_and_correct(logits, labels)
  halves = {'choose': slice(0, count // 2), 'report': slice(count // 2, count)}
  fixed = {part: correct[:, rows].mean(axis=(1, 2)) for part, rows in halves.items()}  # [N] per part

  def fixed_at(mean: float) -> float:  # fixed planes at a mean between two whole counts: a mix of both
    return float(np.interp(mean, np.arange(1, n + 1), fixed['report']))

  points = [
    {'low': lo, 'high': hi, 'start': start, **_on_halves(replay_planes(confidence, lo, hi, start), correct, halves)}
    for lo, hi in CONTROLLER_GRID
    for start in sorted({1, max(1, n // 2), n})
  ]
  # bit-serial anytime within each frame: planes added until the frame is sure enough
  within = [
    {'threshold': t, **_on_halves(replay(confidence, 'per_frame', t) + 1, correct, halves)}
    for t in PER_FRAME_THRESHOLDS
  ]
  comparison = []
  for target in targets:
    if not 1 <= target <= n:
      raise ValueError(f'target mean planes must be in 1..{n}, got {target}')
    best = _chosen(points, target)
    if best is None:
      continue
    row = {
      'target_mean_planes': target,
      'controller': {k: best[k] for k in ('low', 'high', 'start')},
      'mean_planes': best['report_mean_planes'],
      'accuracy': best['report_accuracy'],
      'fixed_accuracy_at_same_mean': fixed_at(best['report_mean_planes']),
      'fixed_accuracy_at_target': float(fixed['report'][int(target) - 1]) if float(target).is_integer() else None,
    }
    pick = _chosen(within, target)
    if pick is not None:
      row['within_frame'] = {
        'threshold': pick['threshold'],
        'mean_planes': pick['report_mean_planes'],
        'accuracy': pick['report_accuracy'],
        'fixed_accuracy_at_same_mean': fixed_at(pick['report_mean_planes']),
      }
    comparison.append(row)
  return {
    'planes': n,
    'fixed_accuracy': {part: [float(a) for a in acc] for part, acc in fixed.items()},
    'controller_points': points,
    'within_frame_points': within,
    'comparison': comparison,
  }


def curves(logits: np.ndarray, labels: np.ndarray, macs_to_reach, thresholds) -> dict[str, list[dict]]:
  """Per policy, a point per threshold: ``{"threshold", "mac_fraction", "accuracy",
  "mean_level"}`` from the exits' logits [K, S, T, classes] and the labels [S]."""
  confidence, correct = _confidence_and_correct(logits, labels)  # [K, S, T]
  macs = np.asarray(macs_to_reach, np.float64)
  out = {}
  for policy in POLICIES:
    points = []
    for threshold in thresholds:
      exits = replay(confidence, policy, float(threshold))
      right = np.take_along_axis(correct, exits[None], axis=0)[0]
      points.append(
        {
          'threshold': float(threshold),
          'mac_fraction': float(macs[exits].mean() / macs[-1]),
          'accuracy': float(right.mean()),
          'mean_level': float(exits.mean()),
        }
      )
    out[policy] = points
  return out


def _exits(exits_fn, variables, frames: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Every exit's logits [K, S, T, classes] on the frames [S, T, H, W, C] (labels [S]), through
  the library's evaluation loop (one compiled batch shape)."""
  count, length = frames.shape[:2]
  flat = frames.reshape((-1,) + frames.shape[2:])
  logits = evaluation.accumulate(
    lambda batch: exits_fn(variables, batch.images), flat, np.repeat(labels, length), axis=1, concatenate=True
  )
  return logits.reshape((logits.shape[0], count, length, -1))


def study(
  workdir: str,
  dataset: datasets.Dataset,
  count: int,
  motion: sequences_lib.Motion,
  seed: int,
  progressive_dir: str | None = None,
) -> dict:
  """The curves of every policy for the trained run in ``workdir`` on ``count`` sequences of
  ``dataset``'s test images (and, with ``progressive_dir``, ProgressiveNN's ``planes_study``)."""
  net = stepnet_jax.load(workdir)
  seqs = sequences_lib.make_sequences(dataset.test_images, dataset.test_labels, count, motion, seed)
  extra = {}
  if progressive_dir:
    top_per_planes = []  # the top exit at each plane count
    for model in progressive.load_planes(progressive_dir):
      graphdef, variables = nnx.split(model)
      top_per_planes.append(_exits(stepping.jitted_exits(graphdef), variables, seqs.frames, seqs.labels)[-1])
    extra['progressive'] = {'run': progressive_dir, **planes_study(np.stack(top_per_planes), seqs.labels)}
  logits = _exits(net.functions.exits, net.variables, seqs.frames, seqs.labels)
  thresholds = np.round(np.concatenate([np.linspace(0.3, 0.9, 13), [0.95, 0.97, 0.99, 0.995, 0.999]]), 4)
  per_level = (logits.argmax(-1) == seqs.labels[None, :, None]).mean(axis=(1, 2))
  return {
    'dataset': dataset.name,
    'run': workdir,
    'sequences': count,
    'motion': {k: float(v) for k, v in vars(motion).items()},
    'seed': seed,
    'macs_to_reach': [int(m) for m in net.macs_to_reach],
    'accuracy_per_level': [float(a) for a in per_level],
    'still_accuracy_per_level': [
      float(a) for a in (np.asarray(net.exits(dataset.test_images[seqs.source])).argmax(-1) == seqs.labels).mean(1)
    ],
    'curves': (c := curves(logits, seqs.labels, net.macs_to_reach, thresholds)),
    'accuracy_at_mac_fraction': at_budgets(c, BUDGETS),
    **extra,
    'date': datetime.date.today().isoformat(),
  }


BUDGETS = (0.2, 0.3, 0.4, 0.5)  # mean MACs per frame over the top's, where the curves are compared


def at_budgets(curves_of: dict[str, list[dict]], budgets) -> dict[str, dict[str, float | None]]:
  """Each curve's accuracy at each mean-MAC budget, linear between its thresholds' points
  (None outside the range the curve covers)."""
  out = {}
  for policy, points in curves_of.items():
    x = np.asarray([q['mac_fraction'] for q in points])
    y = np.asarray([q['accuracy'] for q in points])
    order = np.argsort(x)
    out[policy] = {
      f'{b:g}': (float(np.interp(b, x[order], y[order])) if x.min() <= b <= x.max() else None) for b in budgets
    }
  return out


def markdown(out: dict) -> str:
  """The study as Markdown: settings, accuracy per level, each policy's curve."""
  m = out['motion']
  lines = [
    f'# Anytime inference on sequences ({out["dataset"]})',
    '',
    f'{out["sequences"]} sequences of {int(m["frames"])} frames (seed {out["seed"]}): test images under a smooth '
    f'drift (shift up to {m["max_shift"]:g} px, rotation up to {m["max_angle"]:g} degrees, brightness up to '
    f'{100 * m["max_brightness"]:g}%), every frame labelled as its image. Accuracy per level on the frames: '
    + ', '.join(f'{100 * a:.2f}%' for a in out['accuracy_per_level'])
    + ' (on the stills: '
    + ', '.join(f'{100 * a:.2f}%' for a in out['still_accuracy_per_level'])
    + ').',
    '',
    '| policy | ' + ' | '.join(f'accuracy at {100 * b:g}% of the MACs' for b in BUDGETS) + ' |',
    '|---|' + '---:|' * len(BUDGETS),
    *(
      f'| {policy} | ' + ' | '.join('-' if v is None else f'{100 * v:.2f}' for v in row.values()) + ' |'
      for policy, row in out['accuracy_at_mac_fraction'].items()
    ),
    '',
    *_planes_markdown(out.get('progressive')),
    '| policy | threshold | mean MACs / top | accuracy | mean exit level |',
    '|---|---:|---:|---:|---:|',
  ]
  for policy, points in out['curves'].items():
    for q in points:
      lines.append(
        f'| {policy} | {q["threshold"]:g} | {q["mac_fraction"]:.3f} | {100 * q["accuracy"]:.2f} | {q["mean_level"]:.2f} |'
      )
  return '\n'.join(lines) + '\n'


def _planes_markdown(p: dict | None) -> list[str]:
  if p is None:
    return []
  lines = [
    f'ProgressiveNN ({p["planes"]} planes, top exit; controller chosen on the first half of the sequences, '
    'reported on the second): fixed planes on the second half '
    + ', '.join(f'b={b}: {100 * a:.2f}%' for b, a in enumerate(p['fixed_accuracy']['report'], 1)),
    '',
    '| target mean planes | controller (low, high, start) | mean planes | accuracy | fixed planes at that mean | '
    'within the frame: threshold, mean planes, accuracy | fixed planes at that mean |',
    '|---:|---|---:|---:|---:|---|---:|',
  ]
  for c in p['comparison']:
    k, w = c['controller'], c.get('within_frame')
    own = (
      f'{w["threshold"]:g}, {w["mean_planes"]:.2f}, {100 * w["accuracy"]:.2f} | {100 * w["fixed_accuracy_at_same_mean"]:.2f}'
      if w
      else '- | -'
    )
    lines.append(
      f'| {c["target_mean_planes"]:g} | {k["low"]:g}, {k["high"]:g}, {k["start"]} | {c["mean_planes"]:.2f} | '
      f'{100 * c["accuracy"]:.2f} | {100 * c["fixed_accuracy_at_same_mean"]:.2f} | {own} |'
    )
  return lines + ['']


def plot(path: str, out: dict) -> None:
  """Accuracy against mean MACs per frame, one curve per policy."""
  import matplotlib  # noqa: PLC0415 (only the command plots)

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(6, 4.2))
  for policy, points in out['curves'].items():
    ax.plot([100 * q['mac_fraction'] for q in points], [100 * q['accuracy'] for q in points], marker='.', label=policy)
  ax.set_xlabel("mean MACs per frame (% of the top level's)")
  ax.set_ylabel('accuracy over all frames (%)')
  ax.set_title(f'Anytime inference on sequences ({out["dataset"]})')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'A trained stepping run.', required=True)
  flags.DEFINE_string('dataset', 'idx:/usr/share/datasets/fashion-mnist', 'The dataset whose test images move.')
  flags.DEFINE_integer('sequences', 500, 'Sequences (one test image each).')
  flags.DEFINE_integer('frames', 16, 'Frames per sequence.')
  flags.DEFINE_float('max_shift', sequences_lib.Motion.max_shift, 'Largest shift (pixels).')
  flags.DEFINE_float('max_angle', sequences_lib.Motion.max_angle, 'Largest rotation (degrees).')
  flags.DEFINE_float('max_brightness', sequences_lib.Motion.max_brightness, 'Largest brightness change (fraction).')
  flags.DEFINE_integer('seed', 0, 'Seed of the images and the drift.')
  flags.DEFINE_string(
    'progressive', None, "A precision study's DIR/progressive: ProgressiveNN's planes on the sequences too."
  )
  flags.DEFINE_string(
    'json', None, 'Write the study here, with a table (.md) and a plot (.png) beside it.', required=True
  )


def main(argv) -> None:
  """The command: replays every policy, writes ``--json``, ``.md`` and ``.png``."""
  del argv
  f = flags.FLAGS
  motion = sequences_lib.Motion(
    frames=f.frames, max_shift=f.max_shift, max_angle=f.max_angle, max_brightness=f.max_brightness
  )
  out = study(f.workdir, datasets.load_dataset(f.dataset), f.sequences, motion, f.seed, f.progressive)
  print(markdown(out))
  base = os.path.splitext(f.json)[0]
  with open(f.json, 'w') as fh:
    json.dump(out, fh, indent=1)
  with open(base + '.md', 'w') as fh:
    fh.write(markdown(out))
  plot(base + '.png', out)
  print(f'wrote {f.json}, {base}.md and {base}.png')


def command() -> None:
  """``python -m stepnet_jax.studies.sequences --workdir RUN --json FILE``."""
  cli.run_command(__name__, _define_flags, main)


if __name__ == '__main__':
  command()
