"""``python -m stepnet_jax.compare``: every method at matched MACs. The command lives in
``stepnet_jax.studies.compare``; importing this name gives that module."""

from stepnet_jax import cli
from stepnet_jax.studies import compare as _module

cli.command_alias(__name__, _module)
