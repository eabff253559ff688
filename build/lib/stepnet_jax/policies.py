"""Stopping policies for the compiled anytime program. Public name of ``stepnet_jax.inference.policies``: this module *is* that one."""

import sys

from stepnet_jax.inference import policies as _module

sys.modules[__name__] = _module
