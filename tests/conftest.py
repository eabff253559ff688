"""Test-wide JAX settings and fixtures.

Note on rank promotion: the library deliberately relies on NumPy trailing-axis
broadcasting (e.g. ``(x - mean)`` with x [B, H, W, C] and mean [C] in
``SteppingModel.normalize`` and ``BatchNorm``, the teacher broadcast in
``multi_exit_loss``), so ``jax_numpy_rank_promotion='raise'`` would reject every
forward pass. Set STEPNET_STRICT_RANK=1 to run the suite with 'raise' anyway.
"""

import os
import shutil
import sys
import tempfile

# The suite's programs are tiny and most tests spend their time compiling them. LLVM's
# cheapest code generation (XLA:CPU backend optimisation level 0) changes no HLO, so FLOP
# counts and every tested number keep their meaning, and it made compile-bound files about
# a third faster (test_heads.py + test_losses.py: 64-66 s -> 41-45 s; test_quant.py: 49 ->
# 32 s). Subprocesses inherit it. STEPNET_TEST_XLA_OPT=1 keeps XLA's default optimisation.
if not os.environ.get('STEPNET_TEST_XLA_OPT') and 'xla_backend_optimization_level' not in os.environ.get(
  'XLA_FLAGS', ''
):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()

import jax  # noqa: E402

jax.config.update('jax_enable_x64', False)  # float32 everywhere
jax.config.update('jax_numpy_rank_promotion', 'raise' if os.environ.get('STEPNET_STRICT_RANK') else 'allow')

# A compilation cache private to this test session (deleted at the end): identical
# programs compiled again (model initialisers of equal shapes, the train step of a
# resumed run, the scripts run as subprocesses) are compiled once. Nothing persists
# between sessions, so a stale cache can never hide a change.
COMPILE_CACHE = tempfile.mkdtemp(prefix='stepnet-test-jax-cache-')
jax.config.update('jax_compilation_cache_dir', COMPILE_CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # tests/testlib.py
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'


def pytest_sessionfinish(session, exitstatus):
  shutil.rmtree(COMPILE_CACHE, ignore_errors=True)


def pytest_configure(config):
  # flax 0.12 deprecates Variable.value; the library indexes variables instead. Keep it so.
  config.addinivalue_line('filterwarnings', "error:'.value' access is now deprecated")
  config.addinivalue_line('filterwarnings', "error:'.value' setter is now deprecated")
  config.addinivalue_line('markers', 'slow: end-to-end training runs')


@pytest.fixture(autouse=True)
def _float32_and_seeded():
  """Every test starts in float32 with a fixed numpy seed."""
  assert not jax.config.jax_enable_x64
  np.random.seed(0)
  yield


@pytest.fixture(scope='session')
def fashion_mnist():
  from stepnet_jax.data import datasets

  # scripts/setup.sh installs Debian's dataset-fashion-mnist: a missing copy is an error.
  return datasets.load_dataset(f'idx:{FASHION_MNIST_DIR}')
