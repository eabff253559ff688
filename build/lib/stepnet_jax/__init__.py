"""stepnet_jax: stepping neural networks in JAX/Flax.

One network holds K nested subnets ("levels"); a connection i -> o exists only if
level(i) <= level(o), so every neuron has one value in all subnets, all exits come
from one pass, and stepping to level k computes only the level-k neurons.
"""

from stepnet_jax.core.model import StepCache, SteppingModel
from stepnet_jax.inference.stepper import Stepper, load
from stepnet_jax.models.zoo import build_model

__all__ = ['Stepper', 'StepCache', 'SteppingModel', 'build_model', 'load']
__version__ = '0.1.0'
