"""Per-level ``jax.export`` artifacts and their manifest. Public name of ``stepnet_jax.inference.export``: this module *is* that one."""

import sys

from stepnet_jax.inference import export as _module

sys.modules[__name__] = _module
