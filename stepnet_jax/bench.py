"""``python -m stepnet_jax.bench``: the benchmark. The study lives in ``stepnet_jax.studies.bench``; importing
this name gives that module."""

import sys

from stepnet_jax.studies import bench as _module

if __name__ == '__main__':
  __doc__ = _module.__doc__  # absl's usage text
  _module.command()
else:
  sys.modules[__name__] = _module
