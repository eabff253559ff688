"""The study configs' sections are typed records (``config.study_config``): a misspelt key
anywhere, in the ``quick`` section too, is an error naming the closest keys before anything
is loaded or trained; wrong types and ranges are errors; the shipped files validate."""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import pytest

from stepnet_jax import config
from stepnet_jax.inference import policies
from stepnet_jax.studies import compare, precision, stopping

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
STUDIES = {'compare': compare, 'adaptive': stopping, 'precision': precision}


def _load(name: str) -> ml_collections.ConfigDict:
  return config.load_file(os.path.join(CONFIGS, f'{name}_fashion_mnist.py'))


def _loaded_with(name: str, path: str, value) -> dict:
  """The study config ``name`` as a dict, with the dotted ``path`` set to ``value``."""
  d = _load(name).to_dict()
  *parents, leaf = path.split('.')
  node = d
  for p in parents:
    node = node[p]
  node[leaf] = value
  return d


def _nothing_runs(monkeypatch):
  """Loading data or training anything fails the test: validation comes first."""

  def fail(*args, **kwargs):
    raise AssertionError('the study loaded data or trained before its config was validated')

  monkeypatch.setattr(compare.datasets, 'load_dataset', fail)
  monkeypatch.setattr(compare.trainers, 'train', fail)
  monkeypatch.setattr(precision.run, 'train_and_evaluate', fail)


def _run(name: str, cc, workdir: str, quick: bool = False):
  if name == 'compare':
    return compare.compare(cc, workdir, quick=quick)
  if name == 'adaptive':
    return stopping.adaptive(cc, workdir, quick=quick)
  return precision.study(cc, workdir, quick=quick)


@pytest.mark.parametrize('name', sorted(STUDIES))
@pytest.mark.parametrize('quick', [False, True])
def test_every_shipped_study_config_validates(name, quick):
  study = STUDIES[name].resolve(_load(name), quick)
  assert dataclasses.is_dataclass(study) and isinstance(study.common, config.Config)
  with pytest.raises(dataclasses.FrozenInstanceError):
    study.common = None


# (study, dotted path of the misspelt key, its value, the section and the close key the error names)
MISSPELT = [
  ('compare', 'awn.widn', 2.0, "section 'awn': ", 'widen'),
  ('compare', 'extra_budget', (0.2,), '', 'extra_budgets'),
  ('compare', 'steppingnet.construction.widn', 2.0, "section 'steppingnet': ", 'construction.widen'),
  ('compare', 'common.train.num_epoch', 2, "section 'common': ", 'train.num_epochs'),
  ('adaptive', 'knobs.confidense', (0.5,), "section 'knobs': ", 'confidence'),
  ('adaptive', 'heuristics.cascde', ('confidence',), "section 'heuristics': ", 'cascade'),
  ('adaptive', 'tolerence', 0.01, '', 'tolerance'),
  ('adaptive', 'nonuniform.baseline.generation_epoch', (1.0,), "section 'nonuniform': ", 'baseline.generation_epochs'),
  ('precision', 'precision.finetune_seed', (0,), "section 'precision': ", 'finetune_seeds'),
  ('precision', 'precision.progressive_plane', 4, "section 'precision': ", 'progressive_planes'),
  ('precision', 'quick.precision.finetune_seed', (0,), "section 'quick.precision': ", 'finetune_seeds'),
  ('precision', 'quick.common.model.widht', 0.5, "section 'quick.common': ", 'model.width'),
  ('compare', 'quick.extra_budget', (), "section 'quick': ", 'extra_budgets'),
  ('adaptive', 'quick.knobs.entropi', (1.0,), "section 'quick.knobs': ", 'entropy'),
]


@pytest.mark.parametrize('name, path, value, section, close', MISSPELT)
@pytest.mark.parametrize('quick', [False, True])
def test_a_misspelt_key_names_its_section_and_the_close_key_before_anything_trains(
  name, path, value, section, close, quick, tmp_path, monkeypatch
):
  _nothing_runs(monkeypatch)
  d = _loaded_with(name, path, value)
  leaf = path.rsplit('.', 1)[-1]
  with pytest.raises(ValueError, match=f"^{section}unknown .*[.']{leaf}'.*did you mean {close}\\b"):
    _run(name, d, str(tmp_path), quick=quick)


@pytest.mark.parametrize('name, section', [('compare', 'compar'), ('adaptive', 'familys'), ('precision', 'precison')])
def test_an_unknown_top_level_section_is_refused(name, section, tmp_path, monkeypatch):
  _nothing_runs(monkeypatch)
  cc = _load(name)
  cc[section] = ml_collections.ConfigDict({'anything': 1})
  with pytest.raises(ValueError, match=f"unknown top-level keys of the study config: \\['{section}'\\]"):
    _run(name, cc, str(tmp_path))


@pytest.mark.parametrize(
  'name, path, value, error, match',
  [
    ('precision', 'precision.min_bits', 1.5, TypeError, 'precision.min_bits must be int'),
    ('precision', 'precision.finetune_seeds', (0, 0), ValueError, 'finetune_seeds must be distinct'),
    ('precision', 'precision.budgets', (2.5,), ValueError, 'whole bit counts'),
    ('precision', 'precision.budgets', (9.0,), ValueError, r'whole bit counts in \[1, 8\]'),
    ('precision', 'precision.search_rank_by', 'los', ValueError, 'search_rank_by must be one of'),
    ('precision', 'precision.finetune_epochs', 0.0, ValueError, 'finetune_epochs must be > 0'),
    ('precision', 'precision.max_bits', 0, ValueError, 'max_bits must be >= 1'),
    ('precision', 'precision.progressive_planes', True, TypeError, 'progressive_planes must be int'),
    ('precision', 'common.data.validation_examples', 0, ValueError, 'set common.data.validation_examples'),
    ('precision', 'common.model.width', 'wide', TypeError, "section 'common'.*model.width must be float"),
    ('compare', 'awn.recipe', 'publish', ValueError, 'awn.recipe must be one of common, published'),
    ('compare', 'recipe', 'sgd', ValueError, 'recipe must be one of common, published, sgd_cosine_1e-4'),
    ('compare', 'recipes', ('common', 'sgd'), ValueError, "recipe must be one of .*, got 'sgd'"),
    ('compare', 'recipes', 'common,published_torch,sgd', ValueError, "recipe must be one of .*, got 'sgd'"),
    ('compare', 'recipes', ('common', 'published'), ValueError, 'set common.data.validation_examples'),
    ('adaptive', 'recipes', ('common',), ValueError, 'recipes must be'),
    ('adaptive', 'ledger', 'results/ledger', ValueError, 'ledger must be empty'),
    ('compare', 'awn.widths', (0.5, 0.25), ValueError, 'awn.widths must be positive and strictly increasing'),
    ('compare', 'seeds', (1, 1), ValueError, 'seeds repeat'),
    ('compare', 'seeds', (-1,), ValueError, 'seeds must be >= 0'),
    ('compare', 'methods', ('steppingnet', 'awm'), ValueError, "unknown comparison method 'awm'"),
    ('compare', 'extra_budgets', (0.0,), ValueError, 'extra_budgets must be > 0'),
    ('compare', 'awn', 2.0, TypeError, 'awn must be a section'),
    ('compare', 'steppingnet.construction.rounds', 2.5, TypeError, "section 'steppingnet'.*construction.rounds"),
    ('adaptive', 'families', ('awn', 'cascade'), ValueError, 'families must include steppingnet'),
    ('adaptive', 'families', ('steppingnet', 'slimmable'), ValueError, "unknown family 'slimmable'"),
    ('adaptive', 'heuristics.awn', ('margin',), ValueError, 'give its values in knobs.margin'),
    ('adaptive', 'heuristics.awn', ('macs',), ValueError, "unknown policy 'macs' in heuristics.awn"),
    ('adaptive', 'lambdas', (), ValueError, 'at least one MAC price'),
    ('adaptive', 'lambdas', (0.1, -0.5), ValueError, 'lambdas must be >= 0'),
    ('adaptive', 'tolerance', -0.1, ValueError, 'tolerance must be >= 0'),
    ('adaptive', 'policy_split', 'validation', ValueError, "unknown policy_split 'validation'"),
    ('adaptive', 'policy_examples', 1, ValueError, 'policy_examples must be at least 2'),
    ('adaptive', 'policy_fit', 'val', ValueError, "unknown policy_fit 'val'"),
    ('adaptive', 'policy_fit_examples', 0, ValueError, 'policy_fit_examples must be at least 1'),
    ('adaptive', 'common.data.validation_examples', 0, ValueError, "or policy_split='test'"),
    ('adaptive', 'seeds', (0, 1), ValueError, 'trains one seed'),
    ('adaptive', 'knobs.confidence', (0.5, 'high'), TypeError, r'knobs.confidence\[1\] must be float'),
  ],
)
def test_wrong_types_and_ranges_are_errors_before_anything_trains(
  name, path, value, error, match, tmp_path, monkeypatch
):
  _nothing_runs(monkeypatch)
  d = _loaded_with(name, path, value)
  with pytest.raises(error, match=match):
    _run(name, d, str(tmp_path))


def test_sequences_given_as_text_are_parsed_as_the_command_line_gives_them():
  d = _load('compare').to_dict()
  d['methods'], d['seeds'], d['extra_budgets'] = 'steppingnet, awn', '3,4', 0.2
  study = compare.resolve(d)
  assert (study.methods, study.seeds, study.extra_budgets) == (('steppingnet', 'awn'), (3, 4), (0.2,))
  d['seeds'] = 5
  assert compare.resolve(d).seeds == (5,)


def test_quick_merges_over_the_sections_field_by_field():
  cc = _load('precision')
  full, quick = precision.resolve(cc), precision.resolve(cc, quick=True)
  assert full.precision.finetune_seeds == (0, 1, 2) and quick.precision.finetune_seeds == (0,)
  assert quick.precision.max_bits == full.precision.max_bits == 8  # not in quick: kept
  assert quick.common.model.width == 0.25 and quick.common.model.name == full.common.model.name
  no_quick = cc.to_dict()
  del no_quick['quick']
  assert precision.resolve(no_quick) == full
  with pytest.raises(ValueError, match='no quick section'):
    precision.resolve(no_quick, quick=True)


def test_the_records_match_the_registries_they_name():
  assert {f.name for f in dataclasses.fields(stopping.Heuristics)} == set(stopping.FAMILIES)
  assert {f.name for f in dataclasses.fields(stopping.Knobs)} <= set(policies.HEURISTICS.names())
  assert compare.RUN_ROOTS == ('common', 'steppingnet', 'nonuniform')
  assert config.run_sections(precision.PrecisionConfig) == ('common',)
  # A method's overrides are a partial run config: checked key by key, merged later.
  study = compare.resolve(_load('compare'))
  assert isinstance(study.steppingnet, config.Overrides) and study.steppingnet['construction.widen'] == 3.0


def test_the_run_config_names_the_close_keys_too():
  with pytest.raises(ValueError, match=r"unknown config keys: \['train.num_epoch'\]; .*did you mean train.num_epochs"):
    config.from_dict({'train.num_epoch': 2})
  assert config.overrides({'model': {'width': 1}}) == {'model.width': 1.0}
