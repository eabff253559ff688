"""``python -m stepnet_jax.compare``: every method at matched MACs. The study lives in ``stepnet_jax.studies.compare``; importing
this name gives that module."""

import sys

from stepnet_jax.studies import compare as _module

if __name__ == '__main__':
  __doc__ = _module.__doc__  # absl's usage text
  _module.command()
else:
  sys.modules[__name__] = _module
