"""A ledger of finished comparison runs: results that outlive the machine they were trained on.

A comparison reuses a method's ``result.json`` only while its run directory is there. Long
studies (the 20-epoch recipe search: hours per method and recipe) span machines whose run
directories do not carry over, so each finished method's result is also written to a
ledger directory kept in the repository (``LEDGER/METHOD-HASH.json``). A later comparison
takes an entry instead of training when the method's run settings equal the entry's and
so do the images it is scored on (the comparison's ``seed`` and ``data`` settings: a
method's own section may set its run's apart from them). Settings are compared by
``config.differing_keys`` (reporting keys aside, keys added since take their defaults). An
entry keeps the machine it was measured on: its latency and training seconds are that
machine's.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import os
import platform
from collections.abc import Sequence

import jax

from stepnet_jax import config as config_lib
from stepnet_jax.config import Config


def _same_images(saved_common: dict, common: Config) -> bool:
  """Whether a comparison with ``common`` scores on the images the entry's was scored on."""
  differ = config_lib.differing_keys(saved_common, common)
  return not any(k == 'seed' or k.startswith('data.') for k in differ)


def _matches(entry: dict, method: str, cfgs: Sequence[Config], dataset: str, common: Config) -> bool:
  saved = entry.get('configs', [])
  return (
    entry.get('method') == method
    and entry.get('dataset') == dataset
    and len(saved) == len(cfgs)
    and 'common' in entry
    and _same_images(entry['common'], common)
    and not any(config_lib.differing_keys(s, c) for s, c in zip(saved, cfgs))
  )


def find(ledger: str, method: str, cfgs: Sequence[Config], dataset: str, common: Config) -> dict | None:
  """The ledger's result of ``method`` trained with exactly ``cfgs`` on ``dataset`` and scored
  as a comparison with ``common`` scores, or None. The result's ``ledger`` names the entry's
  file and the machine it was measured on. An entry this version cannot read (a settings key
  it does not know, a damaged file) is passed over with a warning."""
  for path in sorted(glob.glob(os.path.join(ledger, f'{method}-*.json'))):
    try:
      with open(path) as f:
        entry = json.load(f)
      found = _matches(entry, method, cfgs, dataset, common)
    except (OSError, ValueError, TypeError) as e:
      print(f'warning: passing over the ledger entry {path}: {e}', flush=True)
      continue
    if found:
      kept = {k: v for k, v in entry.items() if k not in ('method', 'dataset', 'recorded', 'machine', 'common')}
      return {
        **kept,
        'ledger': {'path': path, 'machine': entry.get('machine', '?'), 'recorded': entry.get('recorded', '?')},
      }
  return None


def record(ledger: str, method: str, dataset: str, result: dict, common: Config) -> str:
  """Writes ``result`` (``compare.run_method``'s, with its ``configs``) to the ledger with the
  comparison's settings ``common`` and this machine; returns the entry's path.

  The file name hashes the settings, so recording the same run twice overwrites one file.
  """
  key = json.dumps({'method': method, 'dataset': dataset, 'configs': result['configs']}, sort_keys=True)
  path = os.path.join(ledger, f'{method}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json')
  entry = {
    'method': method,
    'dataset': dataset,
    'recorded': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
    'machine': f'{platform.node()}: {platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}',
    'common': common.to_dict(),
    **{k: v for k, v in result.items() if k != 'ledger'},
  }
  os.makedirs(ledger, exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(entry, f, indent=2)
  os.replace(tmp, path)
  return path
