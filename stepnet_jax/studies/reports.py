"""What the studies and ``evaluate.py`` write: a study's JSON, Markdown and plot side by side
(``write_study``), per-level rows as JSON, and accuracy-vs-MACs plots."""

from __future__ import annotations

import json
import os
from collections.abc import Callable


def write_study(workdir: str, name: str, out: dict, md: str, plot: Callable[[str], None]) -> None:
  """A study command's files: ``NAME.json`` (``out``), ``NAME.md`` (``md``, also printed)
  and ``NAME.png`` (``plot(path)``)."""
  with open(os.path.join(workdir, f'{name}.json'), 'w') as f:
    json.dump(out, f, indent=2)
  with open(os.path.join(workdir, f'{name}.md'), 'w') as f:
    f.write(md)
  plot(os.path.join(workdir, f'{name}.png'))
  print(md)


def write_json(path: str, rows: list[dict], extra: dict | None = None) -> None:
  """Writes ``{**extra, "levels": rows}`` to ``path``."""
  with open(path, 'w') as f:
    json.dump({**(extra or {}), 'levels': rows}, f, indent=2)


def plot_accuracy_vs_macs(path: str, curves: dict[str, list[dict]], title: str = '') -> None:
  """Accuracy against MACs, one line per named curve, each level a labelled point."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4.2))
  for name, rows in curves.items():
    macs = [r['macs'] / 1e6 for r in rows]
    acc = [100 * r['accuracy'] for r in rows]
    ax.plot(macs, acc, marker='o', label=name)
    for r, m, a in zip(rows, macs, acc):
      ax.annotate(f'L{r["level"]}', (m, a), textcoords='offset points', xytext=(4, -10), fontsize=8)
  ax.set_xlabel('MACs per image (millions)')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
