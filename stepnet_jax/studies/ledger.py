"""A ledger of finished comparison runs: results that outlive the machine they were trained on.

A comparison reuses a method's ``result.json`` only while its run directory is there. Long
studies (the 20-epoch recipe search: hours per method and recipe) span machines whose run
directories do not carry over, so each finished method's result is also written to a
ledger directory kept in the repository (``LEDGER/METHOD-HASH.json``). A later comparison
whose run settings for that method equal an entry's takes the entry instead of training:
the same rule as reusing ``result.json``, with the settings compared by
``config.differing_keys`` (reporting keys aside, keys added since take their defaults).
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import os
from collections.abc import Sequence

from stepnet_jax import config as config_lib
from stepnet_jax.config import Config


def _matches(entry: dict, method: str, cfgs: Sequence[Config], dataset: str) -> bool:
  saved = entry.get('configs', [])
  return (
    entry.get('method') == method
    and entry.get('dataset') == dataset
    and len(saved) == len(cfgs)
    and not any(config_lib.differing_keys(s, c) for s, c in zip(saved, cfgs))
  )


def find(ledger: str, method: str, cfgs: Sequence[Config], dataset: str) -> dict | None:
  """The ledger's result of ``method`` trained with exactly ``cfgs`` on ``dataset`` (with
  ``path``: the entry's file), or None."""
  for path in sorted(glob.glob(os.path.join(ledger, f'{method}-*.json'))):
    with open(path) as f:
      entry = json.load(f)
    if _matches(entry, method, cfgs, dataset):
      return {**{k: v for k, v in entry.items() if k not in ('method', 'dataset', 'recorded')}, 'path': path}
  return None


def record(ledger: str, method: str, dataset: str, result: dict) -> str:
  """Writes ``result`` (``compare.run_method``'s, with its ``configs``) to the ledger; returns its path.

  The file name hashes the settings, so recording the same run twice overwrites one file.
  """
  key = json.dumps({'method': method, 'dataset': dataset, 'configs': result['configs']}, sort_keys=True)
  path = os.path.join(ledger, f'{method}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json')
  entry = {
    'method': method,
    'dataset': dataset,
    'recorded': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
    **result,
  }
  os.makedirs(ledger, exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(entry, f, indent=2)
  os.replace(tmp, path)
  return path
