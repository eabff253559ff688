"""A JAX function as a LiteRT (TFLite) model: jax2tf, a SavedModel, the TFLite converter.

``convert({key: (fn, args, input_names, output_names), ...})`` gives the flatbuffer of one
model with a signature per key, each taking the named inputs and returning the named
outputs, with ``fn``'s constants (the network's parameters) baked in. With
``any_batch=True`` the first axis of every non-scalar argument is symbolic, so one model
runs any batch size (LiteRT reallocates its tensors when the size changes); else the shapes
are those of ``args``. Needs TensorFlow (``pip install 'stepnet_jax[litert]'``); the device
that runs the model needs only LiteRT.

Under a symbolic batch TensorFlow 2.21's converter mis-computes a contraction over two axes
(``einsum('bsi,sio->bo')``) and cannot write the gather that indexing turns a slice into;
the library's layers write them as one matrix product (``layers._contract``) and as
``lax`` slices (``take_rows``, ``conv_by_taps``), and the export's tests check every
level's logits against JAX. The model for any batch size still runs far slower than one
converted for a fixed batch (``export._save_tflite``).
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
  any_batch: bool = False,
) -> bytes:
  """One TFLite flatbuffer holding a signature per entry of ``functions``: key -> (fn,
  args, input_names, output_names), ``fn`` taken at the shapes of ``args`` and its
  signature mapping ``input_names`` (one per argument) to ``output_names`` (one per output
  of ``fn``, which returns a tuple). Converted in one pass (much faster than one model each).
  ``any_batch``: the first axis of every non-scalar argument is symbolic."""
  tf, jax2tf = _tensorflow()
  signatures = {}
  for key, (fn, args, input_names, output_names) in functions.items():
    signatures[key] = _signature(tf, jax2tf, fn, args, input_names, output_names, any_batch)
  module = tf.Module()
  module.graphs = signatures  # tracked, so the SavedModel keeps them
  with tempfile.TemporaryDirectory() as saved:
    tf.saved_model.save(module, saved, signatures=signatures)
    return tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=list(signatures)).convert()


def _signature(tf, jax2tf, fn, args, input_names, output_names, any_batch: bool):
  """``fn`` as a concrete TensorFlow function from named inputs to a dict of named outputs."""
  if len(set(output_names)) != len(output_names):
    raise ValueError(f'output names repeat: {list(output_names)}')
  batched = [any_batch and len(a.shape) > 0 for a in args]
  polymorphic = [('(b, ...)' if b else None) for b in batched] if any_batch else None
  as_tf = jax2tf.convert(fn, polymorphic_shapes=polymorphic, with_gradient=False)
  spec = [
    tf.TensorSpec((None, *a.shape[1:]) if b else a.shape, a.dtype, name=n)
    for a, b, n in zip(args, batched, input_names, strict=True)
  ]

  @tf.function(input_signature=spec, autograph=False)
  def serve(*inputs):
    outputs = as_tf(*inputs)
    if len(outputs) != len(output_names):
      raise ValueError(f'the function returns {len(outputs)} arrays for {len(output_names)} output names')
    return dict(zip(output_names, outputs))

  return serve.get_concrete_function()
