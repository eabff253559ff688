"""stepnet_jax: stepping neural networks in JAX/Flax.

One network holds K nested subnets ("levels"); a connection i -> o exists only if
level(i) <= level(o), so every neuron has one value in all subnets, all exits come
from one pass, and stepping to level k computes only the level-k neurons.

The public face: ``load`` a trained run into a ``Stepper`` (start / advance / predict),
``build_model`` from the zoo, and the modules ``stepnet_jax.stepping`` (pure step
functions), ``stepnet_jax.policies`` (stopping policies), ``stepnet_jax.export`` and
``stepnet_jax.data``. The code is laid out by role, bottom to top (each layer imports only
from itself and below; ``pyproject.toml``'s import-linter contracts check it):

* ``core``: level sizes and masks, layers, the stepping model, step functions, the anytime program;
* ``models``, ``data``: the model zoo, budgets, surgery, bit widths; datasets, the device feed;
* ``inference``: the ``Stepper`` handle, policies, checkpoints read, export, timing, metrics;
* ``training``: losses, the train step, optimizers, the loop, checkpoints, runs, ``fit``;
* ``methods``: construction, the peers, importance, selection, bit search, ProgressiveNN;
* ``cli``, ``studies``: the command line and the study commands.
"""

from stepnet_jax.core.model import StepCache, SteppingModel
from stepnet_jax.inference.stepper import Stepper, load
from stepnet_jax.models.zoo import build_model

__all__ = ['Stepper', 'StepCache', 'SteppingModel', 'build_model', 'load']
__version__ = '0.1.0'
