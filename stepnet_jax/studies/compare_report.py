"""The comparison's report: SteppingNet's lead over its peers on both readings of an equal
budget, the targets checked on the measured numbers, and the files a comparison writes
(compare.md/png, and recipes.md/png for a recipe search). Pure functions of the results
dicts ``studies/compare.py`` builds; nothing here trains."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# The peers SteppingNet must lead at AWN's MAC points, and by how much (accuracy points).
LEAD_PEERS = ('awn', 'awn_sandwich', 'slimmable')
LEAD_TARGET = 0.5


# The two readings of "the same computational budget" the leads are judged on: the MACs of the
# subnet a one-shot device runs, and the MACs an anytime device spends stepping up to a level
# (a method that recomputes pays for every level below it again).
READINGS = {'macs': 'subnet MACs', 'macs_to_reach': 'MACs to reach'}

# A level "fits" a MAC point up to this fraction above it: the budgets are AWN's MACs rounded
# to 1e-6 of the base network, so a level built to fill one may exceed it by a few MACs.
MACS_TOLERANCE = 1e-5


def _fits(macs: int, point: int) -> bool:
  """Whether a level of ``macs`` counts as at or below the MAC point ``point``."""
  return macs <= point * (1 + MACS_TOLERANCE)


def _side(a: float, b: float) -> int:
  """-1, 0 or 1: ``a`` below, at (to 1e-9) or above ``b``."""
  return (a > b + 1e-9) - (a < b - 1e-9)


def _digits(x: float, bound: float) -> int:
  """Decimals to show ``x`` beside ``bound`` with: two, or more where two would round ``x``
  onto ``bound`` or past it (a seed mean of +0.497 would read +0.50 against the 0.5-point
  target it misses)."""
  return next((d for d in range(2, 6) if _side(round(x, d), round(bound, d)) == _side(x, bound)), 6)


def _signed(lead: float) -> str:
  """A lead in points, signed, with the decimals that keep it on its side of ``LEAD_TARGET``."""
  return f'{lead:+.{_digits(lead, LEAD_TARGET)}f}'


def _best_at(levels: list[dict], macs: int, reading: str = 'macs') -> dict | None:
  """The most accurate level that costs at most ``macs`` on ``reading`` (None if none does)."""
  fits = [r for r in levels if _fits(r[reading], macs)]
  return max(fits, key=lambda r: r['accuracy']) if fits else None


def leads(results: dict[str, dict], reading: str = 'macs') -> list[dict]:
  """SteppingNet's lead over its best peer (``LEAD_PEERS`` present in ``results``) at each
  of AWN's MAC points: at each point, SteppingNet's and each peer's most accurate level at
  or below it on ``reading`` (a key of ``READINGS``: the subnet's MACs, or the MACs spent
  stepping to it); the lead is SteppingNet's accuracy minus the best peer's, in points. With
  seeds (``accuracies`` per level) also the per-seed paired leads and their standard
  deviation. [] without steppingnet or awn."""
  if reading not in READINGS:
    raise ValueError(f'unknown reading {reading!r}; choose one of {", ".join(READINGS)}')
  if 'steppingnet' not in results or 'awn' not in results:
    return []
  out = []
  for point in results['awn']['levels']:
    budget = point[reading]
    s = _best_at(results['steppingnet']['levels'], budget, reading)
    peers = {name: _best_at(results[name]['levels'], budget, reading) for name in LEAD_PEERS if name in results}
    peers = {name: r for name, r in peers.items() if r is not None}
    if s is None or not peers:
      out.append({'reading': reading, 'awn_level': point['level'], 'awn_macs': budget, 'lead': None})
      continue
    best = max(peers, key=lambda name: peers[name]['accuracy'])
    row = {
      'reading': reading,
      'awn_level': point['level'],
      'awn_macs': budget,
      'steppingnet_level': s['level'],
      'steppingnet_macs': s[reading],
      'steppingnet_accuracy': s['accuracy'],
      'best_peer': best,
      'best_peer_level': peers[best]['level'],
      'best_peer_macs': peers[best][reading],
      'best_peer_accuracy': peers[best]['accuracy'],
      'lead': 100 * (s['accuracy'] - peers[best]['accuracy']),
    }
    if 'accuracies' in s and 'accuracies' in peers[best]:
      paired = 100 * (np.asarray(s['accuracies']) - np.asarray(peers[best]['accuracies']))
      row['seed_leads'] = paired.tolist()
      row['lead_std'] = float(paired.std(ddof=1)) if len(paired) > 1 else 0.0
    out.append(row)
  return out


def both_leads(results: dict[str, dict]) -> dict[str, list[dict]]:
  """``leads`` on each reading whose MACs every level of SteppingNet, AWN and the lead peers
  has (``READINGS``), by reading."""
  judged = ('steppingnet', 'awn') + LEAD_PEERS
  levels = [r for name, res in results.items() if name in judged for r in res['levels']]
  return {reading: leads(results, reading) for reading in READINGS if all(reading in r for r in levels)}


def leads_table(results: dict[str, dict]) -> list[str]:
  """The leads on both readings side by side: one row per AWN point, SteppingNet's level and
  its best peer's on each reading ([] without both readings' leads)."""
  both = both_leads(results)
  if not both or not all(both.values()):
    return []

  def cells(r: dict) -> str:
    if r['lead'] is None:
      return '- | - | -'
    peer = f'{r["best_peer"]} {r["best_peer_level"]}: {100 * r["best_peer_accuracy"]:.2f} ({r["best_peer_macs"]:,})'
    ours = f'{r["steppingnet_level"]}: {100 * r["steppingnet_accuracy"]:.2f} ({r["steppingnet_macs"]:,})'
    return f'{ours} | {peer} | {_signed(r["lead"])}'

  head = ' | '.join(f'{unit}: SteppingNet | best peer | lead' for unit in (READINGS[k] for k in both))
  lines = [
    f'| AWN level | {head} |',
    '|---:|' + '---|---|---:|' * len(both),
  ]
  for rows in zip(*both.values()):
    lines.append(f'| {rows[0]["awn_level"]} | ' + ' | '.join(cells(r) for r in rows) + ' |')
  return lines


def lead_lines(rows: list[dict]) -> list[str]:
  """One target line per AWN point: SteppingNet at least ``LEAD_TARGET`` points above its best peer."""
  lines = []
  for r in rows:
    unit = READINGS[r.get('reading', 'macs')]
    if r['lead'] is None:
      lines.append(
        f'- lead at AWN level {r["awn_level"]} ({r["awn_macs"]:,} {unit}): no SteppingNet level or peer '
        'at or below it: NOT met'
      )
      continue
    spread = (
      f' (per seed {", ".join(f"{x:+.2f}" for x in r["seed_leads"])}; std {r["lead_std"]:.2f})'
      if 'seed_leads' in r
      else ''
    )
    ok = _side(r['lead'], LEAD_TARGET) >= 0
    peer_level = f' level {r["best_peer_level"]}' if 'best_peer_level' in r else ''
    lines.append(
      f'- lead at AWN level {r["awn_level"]} ({r["awn_macs"]:,} {unit}): SteppingNet level '
      f'{r["steppingnet_level"]} {100 * r["steppingnet_accuracy"]:.2f}% at {r["steppingnet_macs"]:,} vs best peer '
      f'{r["best_peer"]}{peer_level} {100 * r["best_peer_accuracy"]:.2f}% at {r["best_peer_macs"]:,}: '
      f'{_signed(r["lead"])} pt{spread}: {"met" if ok else "NOT met"} (target: >= {LEAD_TARGET} pt)'
    )
  return lines


def _at_or_above(label: str, peer_levels: list[dict], s_levels: list[dict]) -> list[str]:
  """One line per level of a peer: SteppingNet's largest level at or below its MACs at or above its accuracy."""
  lines = []
  for a in peer_levels:
    cands = [r for r in s_levels if _fits(r['macs'], a['macs'])]
    if not cands:
      lines.append(f'- {label} level {a["level"]} ({a["macs"]:,} MACs): no SteppingNet level at or below its MACs')
      continue
    s = max(cands, key=lambda r: r['macs'])
    ours, theirs = 100 * s['accuracy'], 100 * a['accuracy']
    d = _digits(ours, theirs)
    lines.append(
      f'- vs {label} level {a["level"]}: SteppingNet {ours:.{d}f}% at {s["macs"]:,} MACs '
      f'vs {theirs:.{d}f}% at {a["macs"]:,}: {"met" if _side(ours, theirs) >= 0 else "NOT met"}'
    )
  return lines


def targets(results: dict[str, dict], references: Mapping[str, list[dict]] | None = None) -> list[str]:
  """The issue's targets, checked on the measured numbers (one line each). ``references``:
  levels of runs outside this comparison (by label, e.g. AWN on its published recipe) that
  SteppingNet is also judged against at equal or lower MACs."""
  lines = []
  st = results.get('steppingnet')
  if st is None:
    return lines
  s_levels = st['levels']
  acc = [r['accuracy'] for r in s_levels]
  inc = all(b > a for a, b in zip(acc, acc[1:]))
  lines.append(
    f'- SteppingNet exits strictly increasing: {"yes" if inc else "NO"} ({" < ".join(f"{100 * a:.2f}" for a in acc)})'
  )
  for peer, label in (('awn', 'AWN'), ('awn_sandwich', 'AWN sandwich')):
    lines += _at_or_above(label, results.get(peer, {}).get('levels', []), s_levels)
  for label, levels in (references or {}).items():
    lines += _at_or_above(label, levels, s_levels)
  for rows in both_leads(results).values():
    lines += lead_lines(rows)
  if 'independent' in results:
    for s, i in zip(s_levels, results['independent']['levels']):
      gap = 100 * (i['accuracy'] - s['accuracy'])
      lines.append(
        f'- level {s["level"]} vs independent net: SteppingNet {100 * s["accuracy"]:.2f}% '
        f'({s["macs"]:,} MACs) vs {100 * i["accuracy"]:.2f}% ({i["macs"]:,} MACs), gap {gap:+.{_digits(gap, 1.0)}f} pt: '
        f'{"met" if _side(gap, 1.0) <= 0 else "NOT met"} (target: gap <= 1.0)'
      )
    lines.append(
      f'- training time: SteppingNet (construction included) {st["train_seconds"]:.0f} s vs '
      f'{len(results["independent"]["levels"])} independent networks '
      f'{results["independent"]["train_seconds"]:.0f} s'
    )
  return lines


def markdown(
  results: dict[str, dict],
  budgets: list[float],
  base: int,
  dataset: str,
  epochs: int,
  seeds: tuple[int, ...] = (),
  recipe: str = 'common',
  awn_recipe: str = 'common',
  references: Mapping[str, list[dict]] | None = None,
) -> str:
  """compare.md: per-level table of every method, training times, and the targets checked
  (with ``seeds``: mean ± standard deviation over them, targets on the means). When the
  runs held images out of training, their validation accuracy (the number to choose
  settings on) has a column before the test accuracy. ``references``: see ``targets``."""
  over = f', mean ± std over seeds {", ".join(map(str, seeds))}' if seeds else ''
  held_out = any('validation_accuracy' in r for res in results.values() for r in res['levels'])
  val_head, val_rule = ('validation accuracy (%) | ', '---:|') if held_out else ('', '')
  lines = [
    f'# Accuracy against MACs on {dataset} ({epochs} epochs and the {recipe!r} recipe for every method{over})'
    + (f' (AWN on its own {awn_recipe!r} recipe)' if awn_recipe != 'common' else ''),
    '',
    f'Budgets (fractions of the dense base network, {base:,} MACs): ' + ', '.join(f'{b:.4f}' for b in budgets),
    '',
    'MACs: what the subnet of that level computes (a one-shot device runs one subnet). MACs to reach: '
    'what a device stepping through the levels in order has spent when that level answers; a method '
    'that recomputes (not reusable) pays again for every subnet up to it.'
    + (" Over seeds a level's MACs are the largest of any seed's (construction lands a few apart)." if seeds else ''),
    '',
    f'| method | level | MACs | MACs to reach | {val_head}test accuracy (%) | step latency (ms, B=1) |',
    f'|---|---:|---:|---:|{val_rule}---:|---:|',
  ]
  for name, res in results.items():
    for r in res['levels']:
      acc = f'{100 * r["accuracy"]:.2f}' + (f' ± {100 * r["accuracy_std"]:.2f}' if 'accuracy_std' in r else '')
      val = (f'{100 * r["validation_accuracy"]:.2f} | ' if 'validation_accuracy' in r else '- | ') if held_out else ''
      lines.append(
        f'| {name} | {r["level"]} | {r["macs"]:,} | {r["macs_to_reach"]:,} | {val}{acc} | {r["latency_ms"]:.3f} |'
      )
  lines += [
    '',
    f'| method | reusable | train seconds{" per seed" if seeds else ""} | train steps |',
    '|---|---|---:|---:|',
  ]
  for name, res in results.items():
    steps = f'{res["train_steps"]:,}' if 'train_steps' in res else '-'
    lines.append(
      f'| {name} | {"yes" if res["reusable"] else "no (recomputes)"} | {res["train_seconds"]:.0f} | {steps} |'
    )
  total = sum(res['train_seconds'] for res in results.values())
  lines += [
    '',
    f'Train seconds of all methods together: {total:,.0f} (each on its own clock; runs side by side shared the machine).',
  ]
  lines += _ledger_lines(results)
  table = leads_table(results)
  if table:
    lines += ['', "## SteppingNet's lead over its best peer at AWN's points, on both readings", '']
    lines += ['Each cell: level: test accuracy % (MACs); the lead in points.', ''] + table
  lines += ['', '## Targets', ''] + targets(results, references)
  return '\n'.join(lines) + '\n'


def _ledger_lines(results: dict[str, dict]) -> list[str]:
  """A sentence naming the methods taken from the ledger and the machines they were measured on."""
  taken = {}
  for name, res in results.items():
    entries = res.get('ledger') or []
    for e in entries if isinstance(entries, list) else [entries]:  # one per seed, aggregated
      taken.setdefault(name, set()).add(e['machine'])
  if not taken:
    return []
  named = '; '.join(f'{name} ({", ".join(sorted(machines))})' for name, machines in taken.items())
  return ['', f'Taken from the ledger, with the step latency and train seconds of the machine each ran on: {named}.']


def plot(path: str, results: dict[str, dict], title: str, references: Mapping[str, list[dict]] | None = None) -> None:
  """compare.png: accuracy against subnet MACs, and against the MACs spent stepping there,
  side by side; AWN's points as dotted lines, ``references`` (see ``targets``) as open markers."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, reading in zip(axes, READINGS):
    for name, res in results.items():
      acc = [100 * r['accuracy'] for r in res['levels']]
      err = [100 * r.get('accuracy_std', 0.0) for r in res['levels']]  # seeds' standard deviation, if any
      ax.errorbar([r[reading] / 1e6 for r in res['levels']], acc, yerr=err, marker='o', capsize=3, label=name)
    for r in results.get('awn', {}).get('levels', []):
      ax.axvline(r[reading] / 1e6, color='grey', linestyle=':', linewidth=0.8)
    for label, levels in (references or {}).items():  # reusable (AWN): its MACs are its MACs to reach
      ax.plot(
        [r['macs'] / 1e6 for r in levels],
        [100 * r['accuracy'] for r in levels],
        linestyle='--',
        marker='s',
        fillstyle='none',
        color='black',
        label=label,
      )
  axes[0].set_xlabel('MACs of the subnet (millions per image)')
  axes[1].set_xlabel('MACs spent stepping from level 0 to this level (millions)')
  for ax in axes:
    ax.set_ylabel('test accuracy (%)')
    ax.grid(alpha=0.3)
  # One legend below both panels: inside an axis it would hide the low-MAC points.
  handles, labels = axes[0].get_legend_handles_labels()
  columns = 3
  rows = -(-len(labels) // columns)
  legend_inches = 0.22 * rows + 0.15
  width, height = fig.get_size_inches()
  fig.set_size_inches(width, height + legend_inches)
  fig.legend(handles, labels, loc='lower center', ncol=columns, fontsize=8, frameon=False)
  fig.suptitle(title)
  fig.tight_layout(rect=(0, legend_inches / (height + legend_inches), 1, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


def recipes_markdown(result: dict) -> str:
  """recipes.md: every recipe's mean validation accuracy, over all and per method, and the choice."""
  methods = list(next(iter(result['recipes'].values()))['methods'])
  lines = [
    f'# Choosing the training recipe ({result["epochs"]} epochs, validation split)',
    '',
    f'Rule: {result["rule"]}. Chosen: **{result["chosen"]}**.',
    '',
    '| recipe | mean over all levels (%) | ' + ' | '.join(methods) + ' |',
    '|---|---:|' + '---:|' * len(methods),
  ]
  for recipe, r in result['recipes'].items():
    cells = ' | '.join(f'{100 * r["methods"][m]:.2f}' for m in methods)
    lines.append(f'| {recipe} | {100 * r["mean_validation_accuracy"]:.2f} | {cells} |')
  return '\n'.join(lines) + '\n'


def recipes_plot(path: str, result: dict) -> None:
  """Each method's mean validation accuracy under each recipe, grouped by method."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  recipes = list(result['recipes'])
  methods = list(result['recipes'][recipes[0]]['methods'])
  fig, ax = plt.subplots(figsize=(1.4 + 1.2 * len(methods), 4))
  width = 0.8 / len(recipes)
  for i, recipe in enumerate(recipes):
    values = [100 * result['recipes'][recipe]['methods'][m] for m in methods]
    ax.bar(np.arange(len(methods)) + i * width, values, width, label=recipe)
  ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2, methods)
  lows = [100 * r['methods'][m] for r in result['recipes'].values() for m in methods]
  ax.set_ylim(min(lows) - 1, max(lows) + 0.5)
  ax.set_ylabel('mean validation accuracy over levels (%)')
  ax.set_title(f'Recipes at {result["epochs"]} epochs (chosen: {result["chosen"]})')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
