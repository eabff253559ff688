"""Per-level evaluation of a trained run: python evaluate.py --workdir DIR [--step N | --best] [--json F]
[--plot F.png] [--policy P] [--bits B [--act_bits A]].

Prints a table of test accuracy, MACs, delta MACs and measured step latency per level,
and the delta MACs of every layer at every level; with ``--policy`` (confidence, margin,
entropy, macs) also the accuracy and average MACs per input of that stopping policy
over a sweep of its knob, from the compiled anytime program. With ``--bits`` the run is
evaluated quantized (``stepnet_jax.models.quantized``: per-neuron weight bits, ``--act_bits``
hidden activations with clips calibrated on training images); a run that recorded its
precision is shown with it.
"""

import math

from absl import app, flags, logging
from flax import nnx

import stepnet_jax
from stepnet_jax import cli, config
from stepnet_jax.core import anytime
from stepnet_jax.data import datasets
from stepnet_jax.inference import evaluation, policies, restore, sweeps
from stepnet_jax.models import quantized
from stepnet_jax.studies import reports

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training run directory (with checkpoints/).')
_JSON = flags.DEFINE_string('json', None, 'Write the per-level results to this JSON file.')
_PLOT = flags.DEFINE_string('plot', None, 'Write an accuracy-vs-MACs plot to this PNG file.')
_BATCH = flags.DEFINE_integer('batch_size', 1000, 'Batch size for accuracy.')
_LAT_BATCH = flags.DEFINE_integer('latency_batch', 1, 'Batch size for the per-step latency.')
_REPEATS = flags.DEFINE_integer('latency_repeats', 50, 'Timed calls per step (median reported).')
_TEST_SUBSET = flags.DEFINE_integer('test_subset', 0, 'Evaluate on this many test images (0 = all).')
_POLICY = flags.DEFINE_enum(
  'policy',
  None,
  ['confidence', 'margin', 'entropy', 'macs'],
  'Also sweep this stopping policy through the compiled anytime program.',
)
_KNOBS = flags.DEFINE_list(
  'knobs', None, "The policy's thresholds (per-input MAC budgets for macs); default: policies.default_knobs."
)
_BITS = flags.DEFINE_string(
  'bits',
  None,
  'Evaluate quantized: weight bits of every neuron (an integer), or a '
  'JSON file {layer: [bits per neuron]} (of a quantized.Precision JSON only its weight_bits '
  'are read: activations follow --act_bits, with fresh clips).',
)
_ACT_BITS = flags.DEFINE_integer(
  'act_bits', 8, f'With --bits: bits of the hidden activations ({quantized.FLOAT_BITS} = float).'
)
_CALIBRATION = flags.DEFINE_integer(
  'calibration_images', 1000, 'With --bits: training images that calibrate the activation clips.'
)
_STEP = flags.DEFINE_integer('step', None, 'Evaluate this checkpoint (default: the newest).')
_BEST = flags.DEFINE_bool(
  'best',
  False,
  'Evaluate the checkpoint with the best top-exit validation accuracy '
  '(runs trained with data.validation_examples > 0).',
)
flags.mark_flag_as_required('workdir')


def _checkpoint_step() -> int | None:
  """The step --step / --best ask for (None: the newest); a usage error names what exists."""
  if _STEP.value is not None and _BEST.value:
    raise app.UsageError('give --step or --best, not both')
  steps = restore.all_steps(_WORKDIR.value)
  if _BEST.value:
    best = restore.best_step(_WORKDIR.value)
    if best is None:
      raise app.UsageError(
        f'no checkpoint in {_WORKDIR.value} recorded a validation accuracy (train with '
        '--config.data.validation_examples=N to rank checkpoints)'
      )
    return best
  if _STEP.value is not None and _STEP.value not in steps:
    raise app.UsageError(f'no checkpoint {_STEP.value} in {_WORKDIR.value}; it holds steps {sorted(steps)}')
  return _STEP.value


def _check_flags() -> None:
  """Numeric flags outside their range are usage errors (not a table of nonsense)."""
  for flag in (_JSON, _PLOT):  # an output inside a run (its checkpoints, its config) would break it
    if flag.value:
      try:
        restore.check_output_path(flag.value)
      except ValueError as e:
        raise app.UsageError(f'--{flag.name}: {e}') from None
  for flag, low in ((_BATCH, 1), (_LAT_BATCH, 1), (_REPEATS, 1), (_TEST_SUBSET, 0), (_CALIBRATION, 1)):
    if flag.value < low:
      raise app.UsageError(f'--{flag.name} must be >= {low}, got {flag.value}')
  if _TEST_SUBSET.value and _LAT_BATCH.value > _TEST_SUBSET.value:
    raise app.UsageError(
      f'--latency_batch {_LAT_BATCH.value} is more than the {_TEST_SUBSET.value} test images it would time '
      '(--test_subset); lower it'
    )
  for knob in _KNOBS.value or ():
    try:
      value = float(knob)
    except ValueError:
      value = math.nan
    if math.isnan(value):
      raise app.UsageError(f'--knobs takes numbers (thresholds, or MAC budgets for macs), got {knob!r}')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  _check_flags()
  step = _checkpoint_step()
  net = stepnet_jax.load(_WORKDIR.value, step)
  if step is not None:
    print(f'checkpoint {step} of {_WORKDIR.value}')
  source = config.saved_data(net.meta['config'])
  ds = datasets.subset(datasets.load_for(source), test=_TEST_SUBSET.value)
  if _LAT_BATCH.value > len(ds.test_labels):
    raise app.UsageError(
      f'--latency_batch {_LAT_BATCH.value} is more than the {len(ds.test_labels)} test images it would time; '
      'lower it (or raise --test_subset)'
    )
  precision = net.meta['model_meta'].get('precision')
  if _BITS.value:
    if precision:
      raise app.UsageError('this run is already quantized (its checkpoint records a precision); drop --bits')
    model = nnx.merge(net.graphdef, net.variables)
    bits = quantized.load_bits(_BITS.value, model)
    clips = (
      quantized.calibrate_clips(model, ds.train_images[: _CALIBRATION.value])
      if _ACT_BITS.value < quantized.FLOAT_BITS
      else None
    )
    precision = quantized.Precision(bits, _ACT_BITS.value, clips).to_json()
    net = stepnet_jax.Stepper(quantized.apply(model, quantized.Precision.from_json(precision)), net.meta)
  rows = evaluation.evaluate_levels(
    net,
    ds.test_images,
    ds.test_labels,
    batch_size=_BATCH.value,
    latency_batch=_LAT_BATCH.value,
    latency_repeats=_REPEATS.value,
  )
  print(
    f'{_WORKDIR.value}: {net.meta["model_meta"]["model"]} on {ds.name}, '
    f'{len(ds.test_labels)} test images, {net.num_levels} levels'
  )
  print(evaluation.format_table(rows, _LAT_BATCH.value))
  if precision:
    model, p = nnx.merge(net.graphdef, net.variables), quantized.Precision.from_json(precision)
    print('\nprecision (quantized weights and activations):')
    print(quantized.describe(model, p))
    reach = quantized.bitops_to_reach(model, p.weight_bits, p.act_bits)
    for row, ops in zip(rows, reach):
      row['bitops_to_reach'] = int(ops)
  print('\nMACs per image by layer (BN, ReLU, pooling and additions are not MACs):')
  print(evaluation.format_layer_macs(net))
  if _POLICY.value:
    name, reach = _POLICY.value, net.macs_to_reach
    knobs = [float(k) for k in _KNOBS.value] if _KNOBS.value else policies.default_knobs(name, reach)
    predict = anytime.make_predict(net.program, anytime.default_strategy())
    points = sweeps.sweep(
      predict,
      net.variables,
      net.num_levels,
      lambda k: policies.heuristic(name, k, reach),
      knobs,
      ds.test_images,
      ds.test_labels,
    )
    print(f'\npolicy {name} ({anytime.default_strategy()} program), test set:')
    print(sweeps.format_sweep(points, reach[-1]))
  if _JSON.value:
    reports.write_json(
      _JSON.value,
      rows,
      {'workdir': _WORKDIR.value, 'dataset': ds.name, 'latency_batch': _LAT_BATCH.value, 'precision': precision},
    )
    print(f'wrote {_JSON.value}')
  if _PLOT.value:
    reports.plot_accuracy_vs_macs(
      _PLOT.value, {net.meta['model_meta']['model']: rows}, title=f'{net.meta["model_meta"]["model"]} on {ds.name}'
    )
    print(f'wrote {_PLOT.value}')


if __name__ == '__main__':
  cli.run_app(main, cli.parse_flags_with_hints)
