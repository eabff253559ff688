"""The wheel holds the whole package: built from this tree, every module imports from it alone.

``pyproject.toml`` finds the packages with setuptools' discovery; a package left out of the
wheel (as ``training/`` once was) makes ``pip install .`` give a library whose trainers
cannot import, while the editable install the scripts use hides it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source_modules() -> set[str]:
  """Every .py file of the package in the source tree, as a path relative to the repo."""
  out = set()
  for directory, _, files in os.walk(os.path.join(ROOT, 'stepnet_jax')):
    out.update(os.path.relpath(os.path.join(directory, f), ROOT) for f in files if f.endswith('.py'))
  return out


def test_wheel_holds_every_module_and_each_imports_from_it(tmp_path):
  # Built from a copy of what the wheel is made of, so setuptools' build/ folder (which may hold
  # modules deleted since) neither pollutes the tree nor leaks into the wheel.
  source = tmp_path / 'source'
  shutil.copytree(
    os.path.join(ROOT, 'stepnet_jax'), source / 'stepnet_jax', ignore=shutil.ignore_patterns('__pycache__')
  )
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(os.path.join(ROOT, name), source / name)
  subprocess.run(
    [sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(tmp_path), str(source)],
    check=True,
    cwd=tmp_path,
  )
  (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith('.whl')]
  with zipfile.ZipFile(tmp_path / wheel) as z:
    packaged = {n for n in z.namelist() if n.startswith('stepnet_jax/') and n.endswith('.py')}
    z.extractall(tmp_path / 'site')
  assert packaged == _source_modules(), sorted(packaged ^ _source_modules())

  modules = sorted(p[:-3].replace('/', '.').removesuffix('.__init__') for p in packaged)
  # Imported in a fresh interpreter whose only copy of the package is the unpacked wheel
  # (cwd is not the repo; PYTHONPATH comes before the editable install's finder).
  script = (
    'import importlib, sys, stepnet_jax\n'
    f'assert stepnet_jax.__file__.startswith({str(tmp_path / "site")!r}), stepnet_jax.__file__\n'
    f'for m in {modules!r}:\n'
    '  if m.rsplit(".", 1)[-1] in ("compare", "adaptive", "precision", "bench") and m.count(".") == 1:\n'
    '    continue  # command modules: run as python -m, checked below\n'
    '  importlib.import_module(m)\n'
    'print("ok")\n'
  )
  env = {**os.environ, 'PYTHONPATH': str(tmp_path / 'site'), 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env, capture_output=True, text=True)
  assert proc.returncode == 0 and proc.stdout.strip() == 'ok', proc.stderr[-3000:]
  for command in ('compare', 'adaptive', 'precision', 'bench'):
    proc = subprocess.run(
      [sys.executable, '-m', f'stepnet_jax.{command}', '--helpshort'],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
    )
    expected = '--model' if command == 'bench' else '--config'  # absl exits 1 after --helpshort
    assert proc.returncode in (0, 1) and expected in proc.stdout, (command, proc.stdout[-2000:], proc.stderr[-2000:])
