"""Pure step and forward functions of ``(graphdef, variables, ...)`` and their jitted forms. Public name of ``stepnet_jax.core.stepping``: this module *is* that one."""

import sys

from stepnet_jax.core import stepping as _module

sys.modules[__name__] = _module
