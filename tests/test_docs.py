"""The documentation cannot drift from the code.

* Every ```python block of README.md and docs/**/*.md runs, the blocks of one file in order
  and sharing one namespace (mktestdocs' ``memory=True``), in a scratch directory that holds
  a tiny trained run at the README's path ``runs/lenet3c1l_fmnist`` (trained once, here) and
  a link to ``configs/``. Blocks in another language (bash, text) are not run.
* Every public module, class, function and method of the package has a docstring, and every
  module is on a page of the API reference; every config field is on the configuration page.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import importlib
import importlib.util
import os
import pkgutil
import re
import sys

import pytest
from mktestdocs import grab_code_blocks

import stepnet_jax
from stepnet_jax import config
from stepnet_jax.methods import trainers
from stepnet_jax.registry import Registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, 'docs')
TINY = os.path.join(REPO, 'configs', 'tiny.py')
RUN = 'runs/lenet3c1l_fmnist'  # the README's workdir, relative to where the examples run

DOC_FILES = [os.path.join(REPO, 'README.md')] + sorted(glob.glob(os.path.join(DOCS, '**', '*.md'), recursive=True))


def _python_blocks(path: str) -> list[str]:
  with open(path, encoding='utf-8') as f:
    return grab_code_blocks(f.read(), lang='python')


WITH_EXAMPLES = [p for p in DOC_FILES if _python_blocks(p)]


@pytest.fixture(scope='module')
def scratch(tmp_path_factory, fashion_mnist):
  """A directory with a tiny trained run at ``runs/lenet3c1l_fmnist`` and ``configs/``:
  configs/tiny.py cut to one epoch on 512 images, trained as train.py trains it."""
  root = tmp_path_factory.mktemp('docs')
  c = config.load_file(TINY)
  c.train.num_epochs = 1
  c.data.train_subset = 512
  c.data.test_subset = 500
  c.train.progress = False
  cfg = trainers.validate(config.from_dict(c))
  trainers.train(cfg, str(root / RUN), fashion_mnist)
  os.symlink(os.path.join(REPO, 'configs'), root / 'configs')
  return root


def _registries() -> list[Registry]:
  """Every name table of the loaded package modules (an example may register a model)."""
  found = {}
  for name, module in list(sys.modules.items()):
    if name.startswith('stepnet_jax'):
      for value in vars(module).values():
        if isinstance(value, Registry):
          found[id(value)] = value
  return list(found.values())


@pytest.mark.parametrize('path', WITH_EXAMPLES, ids=lambda p: os.path.relpath(p, REPO))
def test_python_examples_run(path, scratch, monkeypatch):
  monkeypatch.chdir(scratch)
  saved = [(r, dict(r._entries)) for r in _registries()]
  namespace = {'__name__': '__main__'}
  try:
    for i, block in enumerate(_python_blocks(path)):
      code = compile(block, f'{os.path.relpath(path, REPO)} (python block {i + 1})', 'exec')
      exec(code, namespace)
  finally:
    for registry, entries in saved:  # what an example registered does not leak into other tests
      registry._entries.clear()
      registry._entries.update(entries)


def test_readme_and_docs_have_examples():
  """The pages that promise executed examples have them (a renamed fence would silently skip them)."""
  names = {os.path.relpath(p, REPO) for p in WITH_EXAMPLES}
  for page in ('python-api', 'custom-network', 'anytime', 'precision', 'training', 'data', 'configuration'):
    assert f'docs/{page}.md' in names, page


def _modules() -> list[str]:
  """Every module of the package under its own name (the public aliases such as
  ``stepnet_jax.stepping`` are the modules they name, checked there)."""
  names = ['stepnet_jax']
  for info in pkgutil.walk_packages(stepnet_jax.__path__, 'stepnet_jax.'):
    if not any(part.startswith('_') for part in info.name.split('.')):
      if importlib.import_module(info.name).__name__ == info.name:
        names.append(info.name)
  return names


def _undocumented(module_name: str) -> list[str]:
  """Public classes, functions and methods of a module (defined there) without a docstring."""
  path = importlib.util.find_spec(module_name).origin
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read())
  missing = [] if ast.get_docstring(tree) else ['(the module)']
  defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
  for node in tree.body:
    if isinstance(node, defs) and not node.name.startswith('_'):
      if not ast.get_docstring(node):
        missing.append(node.name)
      if isinstance(node, ast.ClassDef):
        for member in node.body:
          if isinstance(member, defs) and not member.name.startswith('_') and not ast.get_docstring(member):
            missing.append(f'{node.name}.{member.name}')
  return [f'{module_name}.{name}' for name in missing]


def test_every_public_name_has_a_docstring():
  missing = [name for module in _modules() for name in _undocumented(module)]
  assert not missing, 'public names without a docstring (the API reference skips them):\n' + '\n'.join(missing)


def test_every_module_is_in_the_api_reference():
  shown = set()
  for page in glob.glob(os.path.join(DOCS, 'reference', '*.md')):
    with open(page, encoding='utf-8') as f:
      shown.update(re.findall(r'^::: ([\w.]+)', f.read(), flags=re.M))
  missing = sorted(set(_modules()) - shown)
  assert not missing, f'modules on no page of docs/reference/: {missing}'
  unknown = sorted(name for name in shown if importlib.util.find_spec(name) is None)
  assert not unknown, f'docs/reference/ names modules that do not exist: {unknown}'


def test_every_config_field_is_on_the_configuration_page():
  with open(os.path.join(DOCS, 'configuration.md'), encoding='utf-8') as f:
    page = f.read()
  fields = []
  for section in dataclasses.fields(config.Config):
    if section.default_factory is dataclasses.MISSING:
      fields.append(section.name)
    else:
      fields.extend(f'{section.name}.{f.name}' for f in dataclasses.fields(section.default_factory))
  missing = [name for name in fields if f'`{name}`' not in page]
  assert not missing, f'config fields not described in docs/configuration.md: {missing}'


def test_every_results_file_is_in_the_results_index():
  """results/README.md is the index of what was measured: it links every file and folder
  in results/, and every file it links exists; the README and the docs' results page name
  every log page."""
  results = os.path.join(REPO, 'results')
  with open(os.path.join(results, 'README.md'), encoding='utf-8') as f:
    linked = {target.rstrip('/') for target in re.findall(r'\]\(([^)#\s]+)\)', f.read())}
  local = {t for t in linked if '/' not in t}  # a file or folder of results/ itself
  present = set(os.listdir(results)) - {'README.md', '__pycache__'}
  assert not sorted(present - local), f'in results/ but not in results/README.md: {sorted(present - local)}'
  missing = sorted(t for t in linked if not os.path.exists(os.path.join(results, t)))
  assert not missing, f'results/README.md links files that do not exist: {missing}'
  logs = sorted(name for name in present if name.endswith('_log.md'))
  for page in ('README.md', os.path.join('docs', 'results.md')):
    with open(os.path.join(REPO, page), encoding='utf-8') as f:
      text = f.read()
    assert not [log for log in logs if log not in text], f'{page} does not name every log page of results/'
