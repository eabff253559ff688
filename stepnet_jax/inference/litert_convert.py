"""A JAX function as a LiteRT (TFLite) model: jax2tf, a SavedModel, the TFLite converter.

``convert({key: (fn, args, input_names, output_names), ...})`` gives the flatbuffer of one
model with a signature per key, each taking the named inputs and returning the named
outputs, with ``fn``'s constants (the network's parameters) baked in. Shapes are those of ``args``,
batch included: the converter mis-computes this project's networks when the batch axis is
symbolic (TensorFlow 2.21: its logits differ from JAX's as much as the logits themselves,
while each of the operations tried alone converts correctly), so a model is converted for
one batch size. Needs TensorFlow
(``pip install 'stepnet_jax[litert]'``); the device that runs the model needs only LiteRT.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence

import jax


def _tensorflow():
  """TensorFlow, quietly (its C++ log lines go to stderr before Python can silence them)."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  try:
    import tensorflow as tf
    from jax.experimental import jax2tf
  except ImportError as e:
    raise ImportError(f"format='tflite' needs TensorFlow: pip install 'stepnet_jax[litert]' ({e})") from e
  return tf, jax2tf


def convert(
  functions: dict[str, tuple[Callable, Sequence[jax.ShapeDtypeStruct], Sequence[str], Sequence[str]]],
) -> bytes:
  """One TFLite flatbuffer holding a signature per entry of ``functions``: key -> (fn,
  args, input_names, output_names), ``fn`` taken at the shapes of ``args`` and its
  signature mapping ``input_names`` (one per argument) to ``output_names`` (one per output
  of ``fn``, which returns a tuple). Converted in one pass (much faster than one model each)."""
  tf, jax2tf = _tensorflow()
  signatures = {}
  for key, (fn, args, input_names, output_names) in functions.items():
    signatures[key] = _signature(tf, jax2tf, fn, args, input_names, output_names)
  module = tf.Module()
  module.graphs = signatures  # tracked, so the SavedModel keeps them
  with tempfile.TemporaryDirectory() as saved:
    tf.saved_model.save(module, saved, signatures=signatures)
    return tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=list(signatures)).convert()


def _signature(tf, jax2tf, fn, args, input_names, output_names):
  """``fn`` as a concrete TensorFlow function from named inputs to a dict of named outputs."""
  if len(set(output_names)) != len(output_names):
    raise ValueError(f'output names repeat: {list(output_names)}')
  as_tf = jax2tf.convert(fn, polymorphic_shapes=None, with_gradient=False)
  spec = [tf.TensorSpec(a.shape, a.dtype, name=n) for a, n in zip(args, input_names, strict=True)]

  @tf.function(input_signature=spec, autograph=False)
  def serve(*inputs):
    outputs = as_tf(*inputs)
    if len(outputs) != len(output_names):
      raise ValueError(f'the function returns {len(outputs)} arrays for {len(output_names)} output names')
    return dict(zip(output_names, outputs))

  return serve.get_concrete_function()
