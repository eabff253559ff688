"""The command line shared by ``train.py``, ``evaluate.py`` and every study command.

Each study is ``python -m stepnet_jax.<study> --config FILE --workdir DIR [--quick]``:
``define_study_flags`` declares those flags, ``run_study`` runs the study's ``main`` with a
flags parser that names the new spelling of an override written for an older config
layout (or the closest fields to a misspelt key), and ends a training stopped by SIGTERM
or Ctrl-C with its one-line message and the shell's status (143 / 130). The commands with
flags of their own and no config (the benchmarks, the sequence replay) enter through
``run_command``, with the same one-line ends.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import types
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

from stepnet_jax.config import SECTIONS, Config, SettingsError, close_keys, flat_paths, flatten
from stepnet_jax.data import datasets
from stepnet_jax.inference import restore
from stepnet_jax.registry import UnknownName
from stepnet_jax.training import loop, run


def renamed_override(arg: str, run_roots: Sequence[str] = ('',)) -> str | None:
  """For a command-line override in the flat spelling of earlier versions
  (``--config.num_epochs=2``), the same override spelled for the sections
  (``--config.train.num_epochs=2``); None for anything else. ``run_roots``: the config
  paths that hold a run's config ('' for train.py; ``common`` and the method sections
  for the comparison), so other sections' fields get no hint."""
  if not arg.startswith('--config.'):
    return None
  key, sep, value = arg[len('--config.') :].partition('=')
  *parents, leaf = key.split('.')
  new = flat_paths().get(leaf)
  if new is None or '.' not in new or '.'.join(parents) not in run_roots:
    return None
  return '--config.' + '.'.join(parents + [new]) + sep + value


def unknown_override(arg: str, run_roots: Sequence[str] = ('',)) -> str | None:
  """For a ``--config.KEY=V`` override of a run's config (under one of ``run_roots``) whose
  KEY is no field, a hint naming the closest fields; None otherwise."""
  if not arg.startswith('--config.'):
    return None
  key = arg[len('--config.') :].partition('=')[0]
  for root in sorted(run_roots, key=len, reverse=True):
    prefix = f'{root}.' if root else ''
    if key.startswith(prefix):
      field = key[len(prefix) :]
      break
  else:
    return None
  known = flatten(Config().to_dict())
  if field in known or field in SECTIONS or any(k.startswith(field + '.') for k in known):
    return None
  close = close_keys(field, known)
  return (
    f'{key} is not a config key'
    + (f' (did you mean {", ".join(prefix + c for c in close)}?)' if close else '')
    + '; every field and its default: stepnet_jax/config.py'
  )


def parse_flags_with_hints(argv: list[str], run_roots: Sequence[str] = ('',)) -> list[str]:
  """absl flags parser for the commands: a flags error exits with absl's message, plus the
  new spelling of an override in the flat spelling of earlier versions, or the closest
  fields to an unknown key."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, flags.Error) as e:
    hints = [f'{a} is now spelled {renamed_override(a, run_roots)}' for a in argv if renamed_override(a, run_roots)]
    unknown = [unknown_override(a, run_roots) for a in argv if not renamed_override(a, run_roots)]
    message = f'FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags.'
    if hints:
      message += '\nThe config has sections (stepnet_jax/config.py): ' + '; '.join(hints)
    message += ''.join(f'\n{u}' for u in unknown if u)
    raise SystemExit(message) from e


def define_study_flags(what: str) -> None:
  """The flags every study command takes: --config FILE, --workdir DIR, --quick (defined only
  when run as the command: importing a module defines none)."""
  config_flags.DEFINE_config_file('config', None, f'{what} configuration file.', lock_config=False)
  flags.DEFINE_string('workdir', None, "Directory for the trained networks and the study's files.")
  flags.DEFINE_bool('quick', False, "Tiny settings (the config's `quick` overrides) for a smoke run.")
  flags.mark_flags_as_required(['config', 'workdir'])


def run_study(
  what: str,
  study: Callable[[flags.FlagValues], object],
  *,
  extra_flags: Callable[[], None] | None = None,
  run_roots: Sequence[str] = ('common',),
) -> None:
  """The one entry point of every study command: defines the study flags (``define_study_flags``)
  and ``extra_flags``, parses them with the parser that names renamed or misspelt overrides
  (``run_roots``: the config sections that hold a run's config), and calls ``study(FLAGS)``
  with absl's logging at WARNING (orbax logs every file it writes at INFO). A training
  stopped by SIGTERM or Ctrl-C ends the command with its one-line message and exit status
  143 or 130 (as ``train.py`` does), not a traceback."""
  define_study_flags(what)
  if extra_flags is not None:
    extra_flags()

  def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    study(flags.FLAGS)

  show_in_help(__name__, study.__module__, getattr(extra_flags, '__module__', __name__))
  run_app(main, functools.partial(parse_flags_with_hints, run_roots=run_roots))


def run_command(module_name: str, define_flags: Callable[[], None], main: Callable[[list[str]], object]) -> None:
  """The entry point of a command with flags of its own and no config (the benchmarks, the
  sequence replay): defines them, lists them under ``--helpshort``, and runs ``main`` as
  ``run_app`` does, so a refused setting, a missing dataset or run ends in one line."""
  define_flags()
  show_in_help(module_name)
  run_app(main, parse_flags_with_hints)


def show_in_help(*module_names: str) -> None:
  """Lists the flags those modules define under ``--helpshort`` of the running command, whose
  main module is a thin alias (``python -m stepnet_jax.compare``) that defines none itself."""
  by_module = flags.FLAGS.flags_by_module_dict()
  for name in dict.fromkeys(module_names):
    for flag in by_module.get(name, []):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


# What ends a command with a one-line message and status 1 instead of a traceback: refused
# settings (a config value or name, a workdir that is not this run's), a missing or unreadable dataset,
# a loss that went non-finite, diverged or never left chance, a workdir another trainer holds,
# an unreadable checkpoint or none at all, a full disk.
FAILURES = (
  SettingsError,
  UnknownName,
  datasets.DatasetError,
  FloatingPointError,
  loop.Diverged,
  loop.NotLearned,
  run.WorkdirBusy,
  restore.CheckpointError,
  restore.NoCheckpoint,
)


def failure_message(error: BaseException) -> str | None:
  """The one-line report of a failure a command ends on (``FAILURES``, or a full disk), or
  None for anything else (a bug: let its traceback show)."""
  if isinstance(error, FAILURES):
    return f'error: {error}'
  full = _disk_full(error)
  if full is not None:
    return f'error: the disk is full ({full}); free space and run the same command again to resume'
  return None


def _disk_full(error: BaseException | None) -> str | None:
  """Where ``error`` or one of its causes reports a full disk: an ``OSError`` ENOSPC, or the
  ``ValueError`` tensorstore raises when a checkpoint's array write fails ("RESOURCE_EXHAUSTED
  ... No space left on device", no errno to test): its path-naming text, else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return str(error)
    text = str(error)
    if isinstance(error, ValueError) and 'RESOURCE_EXHAUSTED' in text and 'No space left on device' in text:
      return text.splitlines()[0].split(' [tensorstore_spec=')[0].split(' [os_error_code=')[0]
    # The error it was raised from, or the one being handled then (unless ``from None`` hid it).
    error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
  return None


class Failed(SystemExit):
  """A command's end on a reported failure (its message already printed): ``run_app`` ends
  the process with its status at once."""


def exit_with(message: str, status: int, *, stdout: bool = False) -> NoReturn:
  """Prints ``message`` (on stderr, or ``stdout``) and raises ``Failed(status)``."""
  sys.stdout.flush()
  print(message, file=sys.stdout if stdout else sys.stderr, flush=True)
  raise Failed(status)


def run_app(main: Callable[[list[str]], object], flags_parser: Callable[[list[str]], list[str]]) -> None:
  """``absl.app.run`` for the commands (``train.py``, ``evaluate.py``, the studies): a failure
  ends with its one-line message (``_stop_quietly``). A ``Failed`` end skips the interpreter's shutdown,
  where orbax's background threads print noise ("Event loop is closed") that would bury the
  message: the message stays the last line. Saves have been waited for by then."""
  try:
    app.run(functools.partial(_stop_quietly, main), flags_parser=flags_parser)
  except Failed as failed:
    sys.stderr.flush()
    os._exit(failed.code)


def _stop_quietly(main: Callable[[list[str]], object], argv: list[str]) -> object:
  """``main(argv)``; a training stopped by SIGTERM or Ctrl-C (``loop.Preempted``) ends the
  process with its one-line message and the shell's status, a failure (``failure_message``)
  with its message and status 1, instead of a traceback."""
  try:
    return main(argv)
  except loop.Preempted as stopped:
    exit_with(f'stopped: {stopped}', stopped.exit_status)
  except Exception as e:
    message = failure_message(e)
    if message is None:
      raise
    exit_with(message, 1)


def command_alias(name: str, module: types.ModuleType) -> None:
  """What a command module's name (``stepnet_jax.compare``) does: run as ``python -m``, it
  runs ``module.command()`` with the study's docstring as the usage text; imported, it *is*
  ``module``."""
  if name == '__main__':
    sys.modules['__main__'].__doc__ = module.__doc__  # absl's usage text
    module.command()
  else:
    sys.modules[name] = module
