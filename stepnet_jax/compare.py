"""Side-by-side comparison at matched MAC budgets: SteppingNet and its peers.

    python -m stepnet_jax.compare --config configs/compare_fashion_mnist.py --workdir DIR [--quick]

Trains (or reuses, when DIR/NAME/result.json exists) every method on the same data
with the same epochs, evaluates each level's test accuracy and MACs, and writes
DIR/compare.json, DIR/compare.md and DIR/compare.png. Methods:

* steppingnet: levels constructed by importance under the budgets (``construct.py``).
* steppingnet_tri: the same with Any-Width Networks' triangles inside each level block
  (an extension: more, sparser neurons per MAC; the mask rule between levels holds).
* awn: Any-Width Networks: triangular masks, base widened by ``awn.widen``, widths
  ``awn.widths``, all widths trained every batch. Its level MACs are the budget points.
* awn_sandwich: the same network trained with the sandwich rule: per batch the
  smallest and largest width and ``awn.sandwich_widths`` random widths.
* slimmable: uniform prefix subnets without the mask rule, a private BN per width, one
  forward pass per width per batch; widths are the widest uniform plans that fit each
  budget. Recomputes: stepping to level k costs every subnet up to k.
* nonuniform: Yang & Fan single-path non-uniform subnets (``nonuniform.py``); recomputes.
* independent: one plain network per budget, the widest uniform plan that fits it.

Budgets: the AWN points (as fractions of the dense base network at ``common.width``)
plus ``extra_budgets``.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

import stepnet_jax
from stepnet_jax import budgets as budgets_lib
from stepnet_jax import config as config_lib
from stepnet_jax import checkpoint, data, evaluation, methods, models

METHODS = ('steppingnet', 'steppingnet_tri', 'awn', 'awn_sandwich', 'slimmable', 'nonuniform', 'independent')
REUSING = {'steppingnet': True, 'steppingnet_tri': True, 'awn': True, 'awn_sandwich': True, 'slimmable': False, 'nonuniform': False,
           'independent': False}


def _config(common: dict, section=None, **fixed) -> config_lib.Config:
  """The common settings, then a method's config ``section``, then the keys the comparison
  fixes for that method (a section may not set those), validated."""
  own = section.to_dict() if section is not None else {}
  clash = sorted(set(own) & set(fixed))
  if clash:
    raise ValueError(f'the comparison sets {clash} itself for this method; remove them from its config section')
  return config_lib.from_dict({**common, **own, **fixed})


def awn_config(cc) -> config_lib.Config:
  """AWN on the common settings, or on its published optimiser recipe (``awn.recipe``)."""
  over = dict(method='joint', triangular=True, width=cc.common.width * cc.awn.widen,
              num_levels=len(cc.awn.widths), level_widths=tuple(cc.awn.widths), exit_weights=())
  if cc.awn.recipe == 'published':
    over.update(optimizer='sgd', learning_rate=0.01, momentum=0.9, weight_decay=5e-4, schedule='step',
                step_decay_at=(0.5, 0.75), warmup_epochs=0.0)
  elif cc.awn.recipe != 'common':
    raise ValueError(f'awn.recipe must be common or published, got {cc.awn.recipe!r}')
  return _config(cc.common.to_dict(), **over)


def budget_points(cc, dataset: data.Dataset) -> tuple[list[float], int]:
  """(budget fractions sorted, dense base MACs): the AWN level MACs plus the extra points."""
  shape, classes = dataset.input_shape, dataset.num_classes
  base = budgets_lib.dense_macs(cc.common.model, input_shape=shape, num_classes=classes, width=cc.common.width)
  awn = awn_config(cc)
  model = models.build_model(awn.model, num_classes=classes, input_shape=shape, num_levels=awn.num_levels,
                             width=awn.width, level_widths=awn.level_widths, triangular=True)
  awn_macs = np.cumsum(model.delta_macs().sum(0))
  points = sorted({round(float(m) / base, 6) for m in awn_macs} | {float(b) for b in cc.extra_budgets})
  return points, base


def uniform_plans(cc, dataset: data.Dataset, budgets: list[float], base: int) -> list[tuple[float, dict]]:
  """Per budget: the widest uniform width whose dense network fits, and its channels."""
  plans = []
  for b in budgets:
    w, _ = budgets_lib.width_for_budget(cc.common.model, b * base, input_shape=dataset.input_shape,
                                        num_classes=dataset.num_classes)
    plans.append((w, budgets_lib.layer_channels(cc.common.model, input_shape=dataset.input_shape,
                                                num_classes=dataset.num_classes, width=w)))
  return plans


def method_configs(cc, dataset: data.Dataset) -> dict[str, list[config_lib.Config]]:
  """The configs each method trains (several for 'independent')."""
  common = cc.common.to_dict()
  budgets, base = budget_points(cc, dataset)
  k = len(budgets)
  plans = uniform_plans(cc, dataset, budgets, base)
  out = {}
  out['steppingnet'] = [_config(common, method='steppingnet', num_levels=k, budgets=tuple(budgets),
                                exit_weights=(), section=cc.steppingnet)]
  out['steppingnet_tri'] = [dataclasses.replace(out['steppingnet'][0], triangular=True)]
  out['awn'] = [awn_config(cc)]
  out['awn_sandwich'] = [dataclasses.replace(awn_config(cc), sandwich_widths=cc.awn.sandwich_widths)]
  slim = {name: [plans[0][1][name]] + [plans[j][1][name] - plans[j - 1][1][name] for j in range(1, k)]
          for name in plans[0][1]}
  out['slimmable'] = [_config(common, method='joint', mask_rule=False, num_levels=k, exit_weights=(),
                              assignment=json.dumps(slim))]
  out['nonuniform'] = [_config(common, method='nonuniform', num_levels=k, budgets=tuple(budgets), exit_weights=(),
                               widen=plans[-1][0] / cc.common.width, section=cc.nonuniform)]
  out['independent'] = [_config(common, method='joint', num_levels=1, width=w, exit_weights=(), level_widths=())
                         for w, _ in plans]
  return {m: out[m] for m in cc.methods}


def _rows(workdir: str, dataset: data.Dataset, latency_repeats: int) -> list[dict]:
  net = stepnet_jax.load(workdir)
  return evaluation.evaluate_levels(net, dataset.test_images, dataset.test_labels, batch_size=1000,
                                    latency_batch=1, latency_repeats=latency_repeats)


def _refuse_other_settings(workdir: str, cfg: config_lib.Config) -> None:
  """A run left in ``workdir`` (finished or interrupted) must have exactly ``cfg``'s settings."""
  if checkpoint.latest_step(workdir) is None:
    return
  differ = config_lib.differing_keys(checkpoint.restore_meta(workdir)['config'], cfg)
  if differ:
    raise ValueError(f'{workdir} holds a run with other settings ({", ".join(differ)}); '
                     'use a new --workdir or delete it')


def run_method(name: str, cfgs: list[config_lib.Config], workdir: str, full: data.Dataset,
               dataset: data.Dataset, latency_repeats: int) -> dict:
  """Trains (or reuses) one method; returns {'levels': rows, 'train_seconds', 'reusable'}.

  ``train_seconds`` adds up the training time each run reports (all of its sessions,
  when it was resumed), not this call's wall time.

  ``full`` is the loaded dataset (each method takes the configured subset of it itself);
  ``dataset`` is that subset, whose test split is evaluated here.
  """
  result_path = os.path.join(workdir, 'result.json')
  cfg_dicts = [c.to_dict() for c in cfgs]
  if os.path.exists(result_path):
    with open(result_path) as f:
      saved = json.load(f)
    if len(saved['configs']) != len(cfgs) or not all(
        config_lib.same_settings(d, c) for d, c in zip(saved['configs'], cfgs)):
      raise ValueError(f'{workdir} holds a {name} run with other settings; use a new --workdir or delete it')
    print(f'{name}: reusing {result_path}', flush=True)
    return saved
  print(f'=== {name} ===', flush=True)
  subs = [workdir] if len(cfgs) == 1 else [os.path.join(workdir, f'budget{i}') for i in range(len(cfgs))]
  for sub, cfg in zip(subs, cfgs):   # all before training any of them
    _refuse_other_settings(sub, cfg)
  seconds, rows = 0.0, []
  for sub, cfg in zip(subs, cfgs):
    seconds += methods.train(cfg, sub, full)['seconds']
    rows.append(_rows(sub, dataset, latency_repeats))
  if len(cfgs) == 1:
    levels = rows[0]
  else:  # one single-level network per budget: level k is network k
    levels, spent = [], 0
    for k, r in enumerate(rows):
      row = dict(r[0], level=k)
      row['delta_macs'] = row['macs'] - (levels[-1]['macs'] if levels else 0)
      spent += row['macs']
      row['macs_to_reach'] = spent
      levels.append(row)
  result = {'levels': levels, 'train_seconds': seconds, 'reusable': REUSING[name], 'configs': cfg_dicts}
  os.makedirs(workdir, exist_ok=True)
  evaluation.write_json(os.path.join(workdir, 'levels.json'), levels, {'method': name, 'dataset': dataset.name})
  with open(result_path, 'w') as f:
    json.dump(result, f, indent=2)
  return result


def targets(results: dict[str, dict]) -> list[str]:
  """The issue's targets, checked on the measured numbers (one line each)."""
  lines = []
  st = results.get('steppingnet')
  if st is None:
    return lines
  s_levels = st['levels']
  acc = [r['accuracy'] for r in s_levels]
  inc = all(b > a for a, b in zip(acc, acc[1:]))
  lines.append(f'- SteppingNet exits strictly increasing: {"yes" if inc else "NO"} '
               f'({" < ".join(f"{100 * a:.2f}" for a in acc)})')
  for peer, label in (('awn', 'AWN'), ('awn_sandwich', 'AWN sandwich')):
    for a in results.get(peer, {}).get('levels', []):
      cands = [r for r in s_levels if r['macs'] <= a['macs']]
      if not cands:
        lines.append(f'- {label} level {a["level"]} ({a["macs"]:,} MACs): no SteppingNet level at or below its MACs')
        continue
      s = max(cands, key=lambda r: r['macs'])
      ok = s['accuracy'] >= a['accuracy']
      lines.append(f'- vs {label} level {a["level"]}: SteppingNet {100 * s["accuracy"]:.2f}% at {s["macs"]:,} MACs '
                   f'vs {100 * a["accuracy"]:.2f}% at {a["macs"]:,}: {"met" if ok else "NOT met"}')
  if 'independent' in results:
    for s, i in zip(s_levels, results['independent']['levels']):
      gap = 100 * (i['accuracy'] - s['accuracy'])
      lines.append(f'- level {s["level"]} vs independent net: SteppingNet {100 * s["accuracy"]:.2f}% '
                   f'({s["macs"]:,} MACs) vs {100 * i["accuracy"]:.2f}% ({i["macs"]:,} MACs), gap {gap:+.2f} pt: '
                   f'{"met" if gap <= 1.0 else "NOT met"} (target: gap <= 1.0)')
    lines.append(f'- training time: SteppingNet (construction included) {st["train_seconds"]:.0f} s vs '
                 f'{len(results["independent"]["levels"])} independent networks '
                 f'{results["independent"]["train_seconds"]:.0f} s')
  return lines


def markdown(results: dict[str, dict], budgets: list[float], base: int, dataset: str, epochs: int) -> str:
  """compare.md: per-level table of every method, training times, and the targets checked."""
  lines = [f'# Accuracy against MACs on {dataset} ({epochs} epochs for every method)', '',
           f'Budgets (fractions of the dense base network, {base:,} MACs): '
           + ', '.join(f'{b:.4f}' for b in budgets), '',
           '| method | level | MACs | MACs to reach | accuracy (%) | step latency (ms, B=1) |',
           '|---|---:|---:|---:|---:|---:|']
  for name, res in results.items():
    for r in res['levels']:
      lines.append(f'| {name} | {r["level"]} | {r["macs"]:,} | {r["macs_to_reach"]:,} | '
                   f'{100 * r["accuracy"]:.2f} | {r["latency_ms"]:.3f} |')
  lines += ['', '| method | reusable | train seconds |', '|---|---|---:|']
  for name, res in results.items():
    lines.append(f'| {name} | {"yes" if res["reusable"] else "no (recomputes)"} | {res["train_seconds"]:.0f} |')
  lines += ['', '## Targets', ''] + targets(results)
  return '\n'.join(lines) + '\n'


def plot(path: str, results: dict[str, dict], title: str) -> None:
  """compare.png: accuracy against subnet MACs, and against the MACs spent stepping there."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for name, res in results.items():
    acc = [100 * r['accuracy'] for r in res['levels']]
    axes[0].plot([r['macs'] / 1e6 for r in res['levels']], acc, marker='o', label=name)
    axes[1].plot([r['macs_to_reach'] / 1e6 for r in res['levels']], acc, marker='o', label=name)
  axes[0].set_xlabel('MACs of the subnet (millions per image)')
  axes[1].set_xlabel('MACs spent stepping from level 0 to this level (millions)')
  for ax in axes:
    ax.set_ylabel('test accuracy (%)')
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _merge(cc: ml_collections.ConfigDict, overrides) -> None:
  """Overrides fields of ``cc`` in place; nested sections merge field by field."""
  for key, value in overrides.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)) and key in cc:
      _merge(cc[key], value)
    else:
      cc[key] = value


def compare(cc, workdir: str, quick: bool = False, latency_repeats: int = 10) -> dict:
  """Runs every method of compare config ``cc`` in ``workdir``; returns the compare.json dict."""
  cc = cc.copy_and_resolve_references()
  if quick:
    _merge(cc, cc.quick)
  cc.methods = tuple(m.strip() for item in ([cc.methods] if isinstance(cc.methods, str) else cc.methods)
                     for m in item.split(',') if m.strip())  # also accepts --config.methods=a,b
  unknown = set(cc.methods) - set(METHODS)
  if unknown:
    raise ValueError(f'unknown methods {sorted(unknown)}; choose from {METHODS}')
  common = config_lib.from_dict(cc.common.to_dict())
  full = data.load_dataset(common.dataset, common.data_dir or None)
  dataset = data.subset(full, common.train_subset, common.test_subset, common.seed)  # what every method sees
  budgets, base = budget_points(cc, dataset)
  cfgs = method_configs(cc, dataset)
  for c in cfgs.values():              # every config and budget checked before any training
    for cfg in c:
      methods.check(cfg, dataset)
  print(f'budgets (x {base:,} MACs): ' + ', '.join(f'{b:.4f}' for b in budgets), flush=True)
  results = {name: run_method(name, c, os.path.join(workdir, name), full, dataset, latency_repeats)
             for name, c in cfgs.items()}
  out = {'dataset': dataset.name, 'epochs': common.num_epochs, 'base_macs': base, 'budgets': budgets,
         'methods': {name: {'levels': [{k: r[k] for k in ('level', 'macs', 'accuracy', 'macs_to_reach')}
                                       for r in res['levels']],
                            'train_seconds': res['train_seconds'], 'reusable': res['reusable']}
                     for name, res in results.items()}}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'compare.json'), 'w') as f:
    json.dump(out, f, indent=2)
  md = markdown(results, budgets, base, dataset.name, common.num_epochs)
  with open(os.path.join(workdir, 'compare.md'), 'w') as f:
    f.write(md)
  plot(os.path.join(workdir, 'compare.png'), results, f'{common.model} on {dataset.name}')
  print(md)
  return out


_CONFIG = config_flags.DEFINE_config_file('config', None, 'Comparison configuration file.', lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for every method\'s run and the comparison files.')
_QUICK = flags.DEFINE_bool('quick', False, 'Tiny settings (the config\'s `quick` overrides) for a smoke run.')
_LAT = flags.DEFINE_integer('latency_repeats', 10, 'Timed calls per level for the latency column.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError('--config and --workdir are required')
  compare(_CONFIG.value, _WORKDIR.value, quick=_QUICK.value, latency_repeats=_LAT.value)


if __name__ == '__main__':
  app.run(main)
