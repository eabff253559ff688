"""How far a comparison's leads move with the test images: SteppingNet against its best peer,
image by image, at each of AWN's MAC points and on both readings of an equal budget.

    python -m stepnet_jax.studies.paired --workdir RUNS/final_RECIPE

reads a finished comparison (``compare.json`` and the run directories of its methods, with
their checkpoints), evaluates every level of SteppingNet and of the lead peers
(``compare_report.LEAD_PEERS``) on the test split again, and refuses to go on unless that
gives exactly the accuracies ``compare.json`` recorded. It then pairs SteppingNet's level
with its best peer's (``compare_report.both_leads``) on the same images. Per pair it gives
the lead, a paired bootstrap interval over the test images and McNemar's exact test.

This is the spread of one trained pair over the choice of test images. It says nothing of
the training seed, whose spread can be larger (``results/compare_fashion_mnist_3ep_seeds.md``).
Writes ``paired.json`` and ``paired.md`` beside ``compare.json``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import numpy as np
from absl import flags, logging

import stepnet_jax
from stepnet_jax import cli, config
from stepnet_jax.data import datasets
from stepnet_jax.inference import evaluation, restore
from stepnet_jax.studies import compare_report

CONFIDENCE = 0.95
DRAWS = 20_000


def run_dirs(method_dir: str) -> list[str]:
  """The run directories of one method of a comparison: ``budget0``, ``budget1``, ... for a
  method that trains one network per budget, else the method's own directory."""
  budgets = []
  while os.path.isdir(os.path.join(method_dir, f'budget{len(budgets)}')):
    budgets.append(os.path.join(method_dir, f'budget{len(budgets)}'))
  return budgets or [method_dir]


def method_hits(method_dir: str, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> np.ndarray:
  """Whether each level of one method gets each image right: bool [K, N]. A method of one
  network gives its exits; with one network per budget, level k is network k's first exit,
  as ``compare._as_levels`` counts it."""
  dirs = run_dirs(method_dir)
  rows = []
  for d in dirs:
    net = stepnet_jax.load(d)
    hits = evaluation.exit_hits(net.functions.exits, net.variables, images, labels, batch_size)
    rows.append(hits if len(dirs) == 1 else hits[:1])
  return np.concatenate(rows)


def mcnemar_p(wins: int, losses: int) -> float:
  """McNemar's exact two-sided p-value: ``wins`` images only the first network gets right,
  ``losses`` only the second. Twice the binomial tail of the rarer of the two in
  ``wins + losses`` fair coin flips, at most 1; exact in integers."""
  if wins < 0 or losses < 0:
    raise ValueError(f'counts must be >= 0, got {wins} and {losses}')
  n = wins + losses
  if n == 0:
    return 1.0
  tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1))
  return min(1.0, 2 * tail / 2**n)


def paired_lead(
  first: np.ndarray, second: np.ndarray, *, draws: int = DRAWS, confidence: float = CONFIDENCE, seed: int = 0
) -> dict:
  """The first network's lead over the second in accuracy points on the same images (bool
  [N] each: right or wrong), with a paired bootstrap interval and McNemar's p.

  The bootstrap resamples the images with replacement. Only the images one network gets
  right and the other wrong move the difference, so each draw is a multinomial count of
  wins, losses and the rest: the same distribution as resampling indices, at a cost that
  does not grow with N."""
  first, second = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
  if first.ndim != 1 or first.shape != second.shape or not len(first):
    raise ValueError(f'need two equal, non-empty [N] vectors of hits, got shapes {first.shape} and {second.shape}')
  if not 0 < confidence < 1:
    raise ValueError(f'confidence must be in (0, 1), got {confidence}')
  n = len(first)
  wins, losses = int((first & ~second).sum()), int((~first & second).sum())
  rest = n - wins - losses
  counts = np.random.default_rng(seed).multinomial(n, [wins / n, losses / n, rest / n], size=draws)
  boot = 100 * (counts[:, 0] - counts[:, 1]) / n
  low, high = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
  return {
    'lead': 100 * (wins - losses) / n,
    'interval': [float(low), float(high)],
    'confidence': confidence,
    'wins': wins,
    'losses': losses,
    'images': n,
    'p_mcnemar': mcnemar_p(wins, losses),
  }


def check_hits(results: Mapping[str, dict], hits: Mapping[str, np.ndarray]) -> None:
  """``config.SettingsError`` unless every method's re-evaluated accuracy per level is the one the
  comparison recorded (to one image): otherwise these are not its networks or test images."""
  for name, h in hits.items():
    recorded = np.array([r['accuracy'] for r in results[name]['levels']])
    if h.shape[0] != len(recorded) or np.abs(h.mean(1) - recorded).max() > 0.5 / h.shape[1]:
      raise config.SettingsError(
        f'{name}: the test accuracy evaluated again, {np.round(100 * h.mean(1), 2).tolist()}%, is not the '
        f'{np.round(100 * recorded, 2).tolist()}% the comparison recorded: not its networks or test images'
      )


def paired_leads(results: Mapping[str, dict], hits: Mapping[str, np.ndarray], **kw) -> dict[str, list[dict]]:
  """``compare_report.both_leads`` by reading, each row with ``paired_lead``'s interval,
  counts and p for SteppingNet's level against its best peer's (``hits``: ``method_hits``
  by method; ``kw`` goes to ``paired_lead``)."""
  out = {}
  for reading, rows in compare_report.both_leads(dict(results)).items():
    out[reading] = []
    for r in rows:
      if r['lead'] is not None:
        stats = paired_lead(
          hits['steppingnet'][r['steppingnet_level']], hits[r['best_peer']][r['best_peer_level']], **kw
        )
        if abs(stats.pop('lead') - r['lead']) > 1e-6:
          raise ValueError(
            f'the hits give another lead than the recorded {r["lead"]:+.2f} at AWN level {r["awn_level"]}'
          )
        r = {**r, **stats}
      out[reading].append(r)
  return out


def format_markdown(rows: Mapping[str, list[dict]], title: str = '') -> str:
  """The paired leads as a table, one row per reading and AWN point."""
  first = next((r for rs in rows.values() for r in rs if 'images' in r), None)
  n = first['images'] if first else 0
  pct = round(100 * (first['confidence'] if first else CONFIDENCE))
  lines = [
    f'# How far the leads move with the test images{f": {title}" if title else ""}',
    '',
    f"SteppingNet's level against its best peer's at each of AWN's points (the leads of compare.md), "
    f'image by image on the same {n:,} test images. Wins: images only SteppingNet gets right; losses: '
    f'images only the peer gets right. The {pct}% interval is a paired bootstrap over the test images '
    f"({DRAWS:,} draws); p is McNemar's exact test. The training seed's spread is not in these numbers.",
    '',
    f'| reading | AWN level | SteppingNet | best peer | lead (pt) | {pct}% interval | wins / losses | p |',
    '|---|---:|---|---|---:|---|---:|---:|',
  ]
  for reading, rs in rows.items():
    for r in rs:
      if r['lead'] is None:
        lines.append(f'| {compare_report.READINGS[reading]} | {r["awn_level"]} | - | - | - | - | - | - |')
        continue
      low, high = r['interval']
      lines.append(
        f'| {compare_report.READINGS[reading]} | {r["awn_level"]} | level {r["steppingnet_level"]} '
        f'{100 * r["steppingnet_accuracy"]:.2f}% | {r["best_peer"]} {r["best_peer_level"]} '
        f'{100 * r["best_peer_accuracy"]:.2f}% | {r["lead"]:+.2f} | {low:+.2f} to {high:+.2f} | '
        f'{r["wins"]} / {r["losses"]} | {r["p_mcnemar"]:.3g} |'
      )
  return '\n'.join(lines) + '\n'


def paired_study(workdir: str, batch_size: int = 1000) -> dict:
  """The study on the finished comparison in ``workdir``: writes and returns ``paired.json``'s contents."""
  path = os.path.join(workdir, 'compare.json')
  if not os.path.exists(path):
    raise config.SettingsError(f'{path}: no such file; run the comparison to its end first')
  with open(path) as f:
    compared = json.load(f)
  if compared.get('seeds'):
    raise config.SettingsError(
      f"{path} is the mean over seeds {compared['seeds']}; run the paired study on one seed's comparison "
      f'({os.path.join(workdir, "seedS")})'
    )
  results = compared['methods']
  names = [n for n in ('steppingnet',) + compare_report.LEAD_PEERS if n in results]
  missing = [n for n in names if not os.path.isdir(os.path.join(workdir, n))]
  if 'steppingnet' not in names or missing:
    raise config.SettingsError(
      f'{workdir}: no run directory for {", ".join(missing or ["steppingnet"])}; the paired study needs the '
      'checkpoints of SteppingNet and its peers (a method taken from a ledger entry has none here)'
    )
  # The test images the comparison scored on: its subset of the run's data (compare._method_configs).
  saved = restore.restore_meta(run_dirs(os.path.join(workdir, 'steppingnet'))[0])['config']
  source = config.saved_data(saved)
  ds = datasets.subset(datasets.load_for(source), source.train_subset, source.test_subset, saved.get('seed', 0))
  hits = {n: method_hits(os.path.join(workdir, n), ds.test_images, ds.test_labels, batch_size) for n in names}
  check_hits(results, hits)
  rows = paired_leads(results, hits)
  out = {'dataset': compared.get('dataset'), 'recipe': compared.get('recipe'), 'draws': DRAWS, 'leads': rows}
  with open(os.path.join(workdir, 'paired.json'), 'w') as f:
    json.dump(out, f, indent=2)
  md = format_markdown(rows, compared.get('recipe') or '')
  with open(os.path.join(workdir, 'paired.md'), 'w') as f:
    f.write(md)
  print(md)
  return out


def _define_flags() -> None:
  flags.DEFINE_string('workdir', None, "A finished comparison: compare.json and its methods' run directories.")
  flags.DEFINE_integer('batch_size', 1000, 'Evaluation batch size.')
  flags.mark_flag_as_required('workdir')


def main(argv) -> None:
  """The command: the paired study of ``--workdir``'s comparison."""
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  paired_study(flags.FLAGS.workdir, flags.FLAGS.batch_size)


def command() -> None:
  """``python -m stepnet_jax.studies.paired --workdir DIR``."""
  cli.run_command(__name__, _define_flags, main)


if __name__ == '__main__':
  command()
