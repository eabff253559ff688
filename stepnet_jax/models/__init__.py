"""Networks built on the core: the model zoo and its registry, level assignments, MAC budgets,
surgery (re-levelling a trained network), per-neuron bit widths, the cascade of independent
networks, and the structure record a checkpoint keeps.

``stepnet_jax.models.MODELS`` / ``build_model`` / ``Builder`` are the zoo's (``models.zoo``).
"""

from stepnet_jax.models.zoo import MODELS, Builder, assignment_of, build_model

__all__ = ['MODELS', 'Builder', 'assignment_of', 'build_model']
