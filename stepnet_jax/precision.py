"""``python -m stepnet_jax.precision``: per-neuron bits, ProgressiveNN and the level x precision staircase. The command lives in
``stepnet_jax.studies.precision``; importing this name gives that module."""

from stepnet_jax import cli
from stepnet_jax.studies import precision as _module

cli.command_alias(__name__, _module)
