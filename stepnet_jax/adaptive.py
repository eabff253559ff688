"""``python -m stepnet_jax.adaptive``: the anytime (stopping) study. The command lives in
``stepnet_jax.studies.stopping``; importing this name gives that module."""

from stepnet_jax import cli
from stepnet_jax.studies import stopping as _module

cli.command_alias(__name__, _module)
