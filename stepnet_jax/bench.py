"""``python -m stepnet_jax.bench``: the benchmark. The command lives in
``stepnet_jax.studies.bench``; importing this name gives that module."""

from stepnet_jax import cli
from stepnet_jax.studies import bench as _module

cli.command_alias(__name__, _module)
