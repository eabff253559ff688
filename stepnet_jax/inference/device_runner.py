"""Anytime inference on a device runtime (ONNX Runtime or LiteRT) with numpy only: no JAX,
no stepnet_jax.

``export.save(net, DIR, format='onnx')`` copies this file into DIR as ``anytime_onnx.py``
(the device needs onnxruntime, numpy and DIR), ``format='tflite'`` as ``anytime_litert.py``
(the device needs ai-edge-litert, or TensorFlow's ``tf.lite``, numpy and DIR):

    import sys; sys.path.insert(0, DIR)
    import anytime_onnx as ax                # or: import anytime_litert as ax
    net = ax.Network(DIR)
    cache = net.start(images)                # uint8 [B, H, W, C]; level 0
    cache = net.advance(cache)               # level 1, reusing level 0's activations
    logits = net.forward(images, level=2)    # the direct forward of one level
    out = net.predict(images, ax.Confidence(0.9))   # per-input stopping
    out.logits, out.exit_level, out.macs

The cache is a dict of named arrays: ``level`` (the level it holds), ``inputs`` (the
normalised images), the unit buffers and ``logits``. ONNX graphs hold each unit buffer as
the level blocks computed so far that a later step reads (``<buffer>.<lo>_<hi>``: its
channels lo..hi-1); each graph reads the names it declares and adds its outputs (a step
writes only its level's blocks: no buffer is copied). LiteRT models hold each buffer whole.

``predict`` runs each step only on the inputs still going: it drops the entries no later
step reads and gathers the rows of the others on the host. A LiteRT model converted for a
fixed batch (``batch=B``, the default, B = 1) runs batches of exactly B images: there ``predict`` splits the
images into such batches (the last one padded with copies of its first image) and steps a
batch while any of its inputs goes on, so an input's MACs (``out.macs``) are what its own
answer needed, not what was run (at B = 1 they are both).
Policies read the current exit's logits and stop where they are sure enough:
``Confidence``, ``Margin``, ``Entropy``, ``MacBudget`` and ``Learned`` (the selection
module of Guan et al., its weights in ``selector.npz`` when the export has one).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np


def _probs(logits: np.ndarray) -> np.ndarray:
  z = logits.astype(np.float32) - logits.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Confidence:
  """Stop when the top class's probability reaches ``threshold``."""

  threshold: float

  def stop(self, logits, level, state):
    """(stop [B], state): where the top probability is at least the threshold."""
    return _probs(logits).max(-1) >= self.threshold, state


@dataclasses.dataclass(frozen=True)
class Margin:
  """Stop when the top-1 probability exceeds the top-2 one by ``threshold``."""

  threshold: float

  def stop(self, logits, level, state):
    """(stop [B], state): where the top-1 probability exceeds the top-2 one by the threshold."""
    p = np.sort(_probs(logits), axis=-1)
    return p[:, -1] - p[:, -2] >= self.threshold, state


@dataclasses.dataclass(frozen=True)
class Entropy:
  """Stop when the softmax entropy (nats) is at most ``threshold``."""

  threshold: float

  def stop(self, logits, level, state):
    """(stop [B], state): where the softmax entropy is at most the threshold."""
    z = logits.astype(np.float32) - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(-1) <= self.threshold, state


@dataclasses.dataclass(frozen=True)
class MacBudget:
  """Stop before the step that would take an input past ``budget`` MACs (``macs_to_reach``:
  the manifest's MACs spent to have each level's answer). ``budget``: one number, or one
  per input [B] (carried as the state, so it follows the inputs that keep going)."""

  budget: float | np.ndarray
  macs_to_reach: tuple

  def stop(self, logits, level, state):
    """(stop [B], the per-input budgets): where the next level would cost more than the budget."""
    budget = np.broadcast_to(np.asarray(self.budget if state is None else state, np.float32), logits.shape[:1])
    nxt = np.float32(self.macs_to_reach[level + 1] if level + 1 < len(self.macs_to_reach) else np.inf)
    return nxt > budget, budget  # in float32, as the library compares

  def for_rows(self, rows: np.ndarray) -> MacBudget:
    """The policy of the inputs ``rows`` (a per-input budget follows them)."""
    budget = np.asarray(self.budget)
    return self if budget.ndim == 0 else dataclasses.replace(self, budget=budget[rows])


class Learned:
  """The selection module: an MLP over the exit's sorted probabilities, the level one-hot
  and (``history``) the previous exit's; stops where its stop probability > ``threshold``."""

  def __init__(self, path: str, threshold: float | None = None):
    with np.load(path) as f:
      self.params = {k: f[k] for k in ('w1', 'b1', 'w2', 'b2')}
      self.num_levels = int(f['num_levels'])
      self.history = bool(f['history'])
      self.threshold = float(f['threshold']) if threshold is None else float(threshold)

  def features(self, probs: np.ndarray, level: int, previous: np.ndarray) -> np.ndarray:
    """What the module reads [B, F], as ``policies.selector_features`` computes it."""
    onehot = np.zeros((probs.shape[0], self.num_levels), np.float32)
    onehot[:, level] = 1
    parts = [-np.sort(-probs, axis=-1), onehot]
    if self.history:
      top = probs.argmax(-1)
      seen = (previous.sum(-1, keepdims=True) > 0).astype(np.float32)
      agree = (previous.argmax(-1) == top)[:, None].astype(np.float32) * seen
      parts += [-np.sort(-previous, axis=-1), np.take_along_axis(previous, top[:, None], axis=-1), agree]
    return np.concatenate(parts, axis=-1)

  def stop_probability(self, logits, level, state):
    """(stop probability [B], this exit's probabilities: the next state)."""
    probs = _probs(logits)
    previous = state if state is not None else np.zeros_like(probs)
    h = np.maximum(self.features(probs, level, previous) @ self.params['w1'] + self.params['b1'], 0)
    logit = h @ self.params['w2'] + self.params['b2']
    return 1 / (1 + np.exp(-logit)), probs

  def stop(self, logits, level, state):
    """(stop [B], state): where the stop probability exceeds the threshold."""
    p, probs = self.stop_probability(logits, level, state)
    return p > self.threshold, probs


@dataclasses.dataclass
class Prediction:
  """Each input's answer: ``logits`` [B, classes], ``exit_level`` [B], ``macs`` [B]."""

  logits: np.ndarray
  exit_level: np.ndarray
  macs: np.ndarray


class _OrtGraph:
  """An ONNX graph in an onnxruntime session: ``inputs`` and ``outputs`` (cache names; an
  output ``next_x`` updates ``x``), ``run(feeds) -> {name: array}``."""

  def __init__(self, path: str, threads: int, providers, spinning: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: onnxruntime's default
    if not spinning:  # idle threads sleep at once instead of spinning (fairer to other work on the cores)
      options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    self._session = ort.InferenceSession(path, options, providers=list(providers))
    self.inputs = [i.name for i in self._session.get_inputs()]
    self._names = [o.name for o in self._session.get_outputs()]
    self.outputs = [n[len('next_') :] if n.startswith('next_') else n for n in self._names]

  def run(self, feeds: dict) -> dict:
    """The graph's outputs under their cache names."""
    return dict(zip(self.outputs, self._session.run(None, feeds)))


def _litert_interpreter():
  """LiteRT's interpreter class: ai-edge-litert's, else TensorFlow's ``tf.lite``."""
  try:
    from ai_edge_litert.interpreter import Interpreter
  except ImportError:
    try:
      import tensorflow as tf
    except ImportError as e:
      raise ImportError('running a LiteRT export needs ai-edge-litert: pip install ai-edge-litert') from e
    Interpreter = tf.lite.Interpreter
  return Interpreter


class _LiteRTGraph:
  """A signature of a LiteRT model: ``inputs`` and ``outputs`` (cache names),
  ``run(feeds) -> {name: array}``."""

  def __init__(self, interpreter, key: str):
    self._runner = interpreter.get_signature_runner(key)
    self.inputs = list(self._runner.get_input_details())
    self.outputs = list(self._runner.get_output_details())

  def run(self, feeds: dict) -> dict:
    """The signature's outputs under their cache names."""
    return dict(self._runner(**feeds))


RUNTIMES = {'onnx': 'onnxruntime', 'tflite': 'LiteRT'}


class Network:
  """The graphs of an ONNX or LiteRT export directory, run with onnxruntime or LiteRT.

  ``threads``: intra-op threads, 0 for the runtime's default. ONNX Runtime only:
  ``providers``, and ``spinning=False`` lets idle threads sleep at once.
  """

  def __init__(self, directory: str, threads: int = 0, providers=('CPUExecutionProvider',), spinning: bool = True):
    with open(os.path.join(directory, 'manifest.json')) as f:
      self.manifest = json.load(f)
    self.format = self.manifest.get('format', 'jax')
    if self.format not in RUNTIMES:
      raise ValueError(f'{directory} holds a {self.format} export; this runner runs {", ".join(RUNTIMES)} exports')

    if self.format == 'tflite':  # one model, a signature per graph
      model = os.path.join(directory, self.manifest['model'])
      interpreter = _litert_interpreter()(model_path=model, num_threads=threads or None)

    def graph(name):
      if self.format == 'onnx':
        return _OrtGraph(os.path.join(directory, name), threads, providers, spinning)
      return _LiteRTGraph(interpreter, name)

    self._start = graph(self.manifest['start'])
    self._steps = [graph(n) for n in self.manifest['steps']]
    self._forwards = [graph(n) for n in self.manifest['forwards']]
    # The cache entries a step after level k reads: all that predict keeps (and gathers) there.
    self._read_after = [{'level'} | {n for s in self._steps[k:] for n in s.inputs} for k in range(len(self._steps) + 1)]
    self.num_levels = int(self.manifest['num_levels'])
    self.macs_to_reach = tuple(int(m) for m in self.manifest['macs_to_reach'])
    self.batch = self.manifest.get('batch')  # None: any batch size; else exactly this many images per call
    selector = self.manifest.get('selector')  # the manifest's, not a file an older export left behind
    self.selector_path = os.path.join(directory, selector) if selector else None

  def _images(self, images: np.ndarray) -> np.ndarray:
    shape = tuple(self.manifest['input_shape'])
    if images.ndim != 4 or tuple(images.shape[1:]) != shape or images.dtype != np.uint8:
      raise ValueError(f'expected uint8 images [B, {", ".join(map(str, shape))}], got {images.dtype} {images.shape}')
    if self.batch is not None and images.shape[0] != self.batch:
      raise ValueError(
        f'this {RUNTIMES[self.format]} export runs batches of exactly {self.batch} images, got {images.shape[0]} '
        '(predict splits any number of images into such batches)'
      )
    return images

  def _run(self, graph, cache: dict) -> dict:
    """``cache`` updated with what ``graph`` computes from the entries it reads."""
    return {**cache, **graph.run({n: cache[n] for n in graph.inputs})}

  def start(self, images: np.ndarray) -> dict:
    """Level 0's cache of uint8 images [B, H, W, C]."""
    return self._run(self._start, {'images': self._images(images)})

  def advance(self, cache: dict) -> dict:
    """The next level's cache (a new dict; the entries of ``cache`` are shared, not copied)."""
    level = int(cache['level'])
    if not 0 <= level < self.num_levels - 1:
      raise ValueError(
        f'cannot advance a cache of level {level} ({self.num_levels} levels; -1: a step got a wrong cache)'
      )
    return self._run(self._steps[level], cache)

  def forward(self, images: np.ndarray, level: int) -> np.ndarray:
    """Logits of subnet ``level``, computed directly."""
    return self._forwards[level].run({'images': self._images(images)})['logits']

  def predict(self, images: np.ndarray, policy) -> Prediction:
    """Each input's answer under ``policy``: steps run only on the inputs not yet stopped
    (on LiteRT: only on the batches with an input not yet stopped)."""
    if self.batch is None:
      return self._predict(images, policy, gather=True)
    parts = []
    for lo in range(0, images.shape[0], self.batch):
      rows = np.arange(lo, min(lo + self.batch, images.shape[0]))
      padded = np.concatenate([rows, np.full(self.batch - len(rows), lo)])  # copies of the first image
      rows_policy = policy.for_rows(padded) if hasattr(policy, 'for_rows') else policy
      parts.append((len(rows), self._predict(images[padded], rows_policy, gather=False)))
    return Prediction(
      *(np.concatenate([getattr(p, f)[:n] for n, p in parts]) for f in ('logits', 'exit_level', 'macs'))
    )

  def _predict(self, images: np.ndarray, policy, gather: bool) -> Prediction:
    """``predict`` on one call's images; ``gather``: step only the rows still going (else
    step them all while any goes on)."""
    cache = self.start(images)
    batch = images.shape[0]
    logits = np.zeros_like(cache['logits'])
    exit_level = np.full(batch, self.num_levels - 1, np.int32)
    active = np.arange(batch)  # the inputs still going (without gathering, also their rows in the cache)
    state = None
    for level in range(self.num_levels):
      current = cache['logits'] if gather else cache['logits'][active]
      if level == self.num_levels - 1:
        stop = np.ones(len(active), bool)
      else:
        stop, state = policy.stop(current, level, state)
        stop = np.asarray(stop, bool)
      logits[active[stop]] = current[stop]
      exit_level[active[stop]] = level
      if stop.all():
        break
      cache = {n: a for n, a in cache.items() if n in self._read_after[level]}  # no later step reads the rest
      if stop.any():
        keep = ~stop
        state = state[keep] if isinstance(state, np.ndarray) else state
        if gather:  # the rows still going (none to gather when every input goes on)
          cache = {n: (a if n == 'level' else a[keep]) for n, a in cache.items()}
        active = active[keep]
      cache = self.advance(cache)
    return Prediction(logits, exit_level, np.asarray(self.macs_to_reach, np.int64)[exit_level])
