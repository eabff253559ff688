"""Guan et al.'s selection module (IJCAI 2018), trained by REINFORCE.

After each level k the module reads the exit's class probabilities, the level and
(``history``) the previous exit's probabilities, and gives the probability of stopping
there. An episode per input: walk up the levels, stop at level s with probability
``p_s * prod_{j<s} (1 - p_j)`` (the top level always stops), reward
``R = correct(exit s) - cost_weight * macs_to_reach[s] / macs_to_reach[top]``. REINFORCE
follows ``(R - b_k) * grad log pi(decision at k)`` over the visited levels k <= s, with
``b_k`` a running mean of the rewards of episodes that reached level k, or, with
``selection.samples`` > 1 episodes per input, the mean reward of the input's other
episodes (leave-one-out). Any baseline that does not depend on the decision keeps the
estimate unbiased; a test compares it with the exact gradient. An optional bonus on
the expected entropy of the decisions keeps the module exploring.

By default the network is frozen (eval mode, no gradient, its updates zero:
``optax.set_to_zero``); ``selection.joint=True`` fine-tunes the exits jointly, as the
paper trains the two together: the network runs in train mode, the cross-entropy of the
exit each episode stopped at joins the loss, and Adam updates the network at
``selection.network_learning_rate`` (it arrives trained; the selector's rate would undo
that). Training is one objective (``reinforce``) run by the
shared ``training.fit.fit`` on a ``PolicyNet`` (the network, or a ``Cascade`` of
independent networks, plus a ``Selector``), on a validation split carved from the
training data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stepnet_jax import seeds
from stepnet_jax.config import Config
from stepnet_jax.core import stepping
from stepnet_jax.data import feed, sharding
from stepnet_jax.inference import evaluation, policies
from stepnet_jax.training import fit, loop, losses, optim


class Selector(nnx.Module):
  """The selection MLP (weights as in ``policies.init_selector``) and the running per-level
  reward baseline (a batch statistic: updated by the objective, not by the optimizer)."""

  def __init__(self, num_classes: int, num_levels: int, hidden: int, history: bool, seed: int):
    params = policies.init_selector(jax.random.key(seed), num_classes, num_levels, hidden, history)
    for name, value in params.items():
      setattr(self, name, nnx.Param(value))
    self.baseline = nnx.BatchStat(jnp.zeros((num_levels,), jnp.float32))
    self.num_levels, self.history = num_levels, history

  def params(self) -> dict[str, jax.Array]:
    """The MLP's weights as a plain dict (``policies.Learned`` takes them)."""
    return {name: getattr(self, name)[...] for name in ('w1', 'b1', 'w2', 'b2')}

  def policy(self) -> policies.Learned:
    """The trained module as a stopping policy."""
    return policies.Learned(self.params(), self.num_levels, self.history)


class CachedExits(nnx.Module):
  """Stands in for a frozen network whose exits were computed once: its ``exits`` reads them
  back from the batch, whose "images" are each input's exit logits [B, K, C]."""

  def exits(self, logits: jax.Array, train: bool = False) -> jax.Array:
    """The batch's cached exit logits [B, K, C] as a network's exits [K, B, C]."""
    del train  # the exits were computed in eval mode, as a frozen network's are
    return jnp.moveaxis(logits, 1, 0)  # [K, B, C]


def exit_logits(net: nnx.Module, images: np.ndarray, batch_size: int) -> np.ndarray:
  """Every input's eval-mode exit logits [N, K, C], through the library's evaluation loop
  (``stepping.jitted_exits``, one compiled batch shape)."""
  graphdef, variables = nnx.split(net)
  exits = stepping.jitted_exits(graphdef)
  labels = np.zeros(len(images), np.int32)  # the loop carries labels; the exits do not read them
  logits = evaluation.accumulate(
    lambda batch: exits(variables, batch.images), images, labels, batch_size, axis=1, concatenate=True
  )
  return np.asarray(logits).transpose(1, 0, 2)


class PolicyNet(nnx.Module):
  """A network with exits (a ``SteppingModel`` or a ``Cascade``) and its selection module."""

  def __init__(self, net: nnx.Module, selector: Selector):
    self.net, self.selector = net, selector


def stop_logits(params: dict[str, jax.Array], probs: jax.Array, history: bool) -> jax.Array:
  """The module's stop logit at every level of an episode: probs [K, B, C] -> [K, B]."""
  num_levels = probs.shape[0]
  previous = jnp.concatenate([jnp.zeros_like(probs[:1]), probs[:-1]])
  feats = jax.vmap(lambda p, k, q: policies.selector_features(p, k, q, num_levels, history))(
    probs, jnp.arange(num_levels), previous
  )
  return policies.selector_logit(params, feats)


def rewards(logits: jax.Array, labels: jax.Array, cost: jax.Array, cost_weight: float) -> jax.Array:
  """R[k, b]: reward of input b stopping at level k. cost [K]: MACs to reach k / top MACs."""
  correct = (logits.argmax(-1) == labels[None]).astype(jnp.float32)
  return correct - cost_weight * cost[:, None]


def stop_distribution(z: jax.Array) -> jax.Array:
  """P(stop at k) [K, B] from stop logits z [K, B]; the top level always stops."""
  log_stop = jax.nn.log_sigmoid(z).at[-1].set(0.0)
  log_go = jnp.cumsum(jax.nn.log_sigmoid(-z), axis=0)
  log_reach = jnp.concatenate([jnp.zeros_like(log_go[:1]), log_go[:-1]])
  return jnp.exp(log_reach + log_stop)


def expected_reward(params, probs: jax.Array, reward: jax.Array, history: bool) -> jax.Array:
  """The exact mean expected reward over a batch (no sampling): what REINFORCE estimates."""
  return (stop_distribution(stop_logits(params, probs, history)) * reward).sum(0).mean()


def reinforce_terms(
  params, probs: jax.Array, reward: jax.Array, rng: jax.Array, baseline: jax.Array, history: bool, samples: int = 1
) -> dict[str, jax.Array]:
  """``samples`` sampled episodes per input.

  With one sample the advantage is ``R - baseline[k]``; with several, each episode's
  reward minus the mean of the input's other episodes (leave-one-out: unbiased, and no
  running statistic needed). Returns ``surrogate`` (its gradient is minus the REINFORCE
  estimate of the gradient of the mean expected reward), ``entropy`` (the expected sum of
  the decision entropies along an episode, exact, so its gradient is exact too), and of
  the sampled episodes ``stop`` [S, B], ``reward`` [S, B] and ``visited`` [S, K, B].
  """
  num_levels, batch = reward.shape
  z = stop_logits(params, probs, history)  # [K, B]
  p = jax.nn.sigmoid(z)
  u = jax.random.uniform(rng, (samples,) + z.shape)
  stops = (u < jax.lax.stop_gradient(p)[None]).at[:, -1].set(True)
  stop = stops.argmax(1)  # first stop: [S, B]
  level = jnp.arange(num_levels)[None, :, None]
  decided = level < num_levels - 1  # the top makes no decision
  visited = level <= stop[:, None]  # [S, K, B]
  logp = jnp.where(level < stop[:, None], jax.nn.log_sigmoid(-z)[None], jax.nn.log_sigmoid(z)[None])
  logp = jnp.where(visited & decided, logp, 0.0)
  r = reward[stop, jnp.arange(batch)[None]]  # [S, B]
  if samples > 1:
    b = ((r.sum(0, keepdims=True) - r) / (samples - 1))[:, None]  # leave-one-out: [S, 1, B]
  else:
    b = baseline[None, :, None]
  advantage = jax.lax.stop_gradient(r[:, None] - b)  # [S, K, B]
  surrogate = -(advantage * logp).sum(1).mean()
  bern = -(p * jax.nn.log_sigmoid(z) + (1 - p) * jax.nn.log_sigmoid(-z))  # decision entropies [K, B]
  log_go = jnp.cumsum(jax.nn.log_sigmoid(-z), axis=0)
  reach = jnp.exp(jnp.concatenate([jnp.zeros_like(log_go[:1]), log_go[:-1]]))  # P(reach level k)
  entropy = jnp.where(decided[0], reach * bern, 0.0).sum(0).mean()  # exact expectation
  return {'surrogate': surrogate, 'entropy': entropy, 'stop': stop, 'reward': r, 'visited': visited}


def reinforce(
  macs_to_reach: Sequence[int],
  cost_weight: float,
  *,
  history: bool,
  entropy_weight: float,
  use_baseline: bool,
  joint: bool,
  ce_weight: float,
  samples: int = 1,
  momentum: float = 0.9,
) -> losses.Objective:
  """The selection module's objective on a ``PolicyNet`` (see the module docstring)."""
  cost = jnp.asarray(macs_to_reach, jnp.float32) / float(macs_to_reach[-1])

  def objective(model: PolicyNet, batch, rng):
    logits = model.net.exits(batch.images, train=joint)  # [K, B, C]
    if not joint:
      logits = jax.lax.stop_gradient(logits)
    probs = jax.nn.softmax(logits, axis=-1)
    reward = rewards(logits, batch.labels, cost, cost_weight)
    baseline = model.selector.baseline[...]
    t = reinforce_terms(
      model.selector.params(),
      probs,
      reward,
      rng,
      baseline if use_baseline else jnp.zeros_like(baseline),
      history,
      samples,
    )
    loss = t['surrogate'] - entropy_weight * t['entropy']
    batch_size = logits.shape[1]
    chosen = logits[t['stop'][0], jnp.arange(batch_size)]  # first episode: [B, C]
    ce = optax.softmax_cross_entropy_with_integer_labels(chosen, batch.labels).mean()
    if joint:
      loss = loss + ce_weight * ce
    reached = t['visited'].sum((0, 2))  # episodes reaching level k
    mean_reward = jnp.where(t['visited'], t['reward'][:, None], 0.0).sum((0, 2)) / jnp.maximum(reached, 1)
    model.selector.baseline[...] = jnp.where(reached > 0, momentum * baseline + (1 - momentum) * mean_reward, baseline)
    return loss, {
      'logits': chosen[None],
      'ce': ce[None],
      'distill': jnp.zeros(()),
      'reward': t['reward'].mean(),
      'cost': cost[t['stop']].mean(),
    }

  return objective


def _optimizer(learning_rate: float, joint: bool, network_learning_rate: float) -> optax.GradientTransformation:
  """Adam on the selector; on the network, Adam at ``network_learning_rate`` when ``joint`` (it
  arrives trained: a fine-tune), else exactly zero updates and no optimizer state."""

  def labels(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: optim.param_names(path)[0], params)

  network = optax.adam(network_learning_rate) if joint else optax.set_to_zero()
  return optax.multi_transform({'selector': optax.adam(learning_rate), 'net': network}, labels)


def train_selector(
  cfg: Config,
  net: nnx.Module,
  macs_to_reach: Sequence[int],
  images: np.ndarray,
  labels: np.ndarray,
  num_classes: int,
  *,
  cost_weight: float | None = None,
  desc: str = 'selection module',
  cache_exits: bool = True,
) -> tuple[policies.Learned, Any]:
  """Trains a selection module for ``net`` on ``images``, ``labels`` (a validation split, or
  training images where the network has not fitted them: ``AdaptiveConfig.policy_fit``).

  Settings from ``cfg.selection`` (``cost_weight`` overrides its lambda). Returns the
  learned policy and the network's variables (changed only with ``selection.joint``).
  A frozen network gives an input the same exits at every step, so with ``cache_exits``
  they are computed once (``exit_logits``) and the module trains on them: the same
  batches, episodes and updates without a forward pass per step (on a ResNet-20 that
  pass was nearly all of the time).
  """
  s = cfg.selection
  lam = s.cost_weight if cost_weight is None else cost_weight
  cached = cache_exits and not s.joint
  if cached:
    images = exit_logits(net, images, cfg.train.eval_batch_size)
  model = PolicyNet(
    CachedExits() if cached else net, Selector(num_classes, len(macs_to_reach), s.hidden, s.history, cfg.seed)
  )
  objective = reinforce(
    macs_to_reach,
    lam,
    history=s.history,
    entropy_weight=s.entropy_weight,
    use_baseline=s.baseline == 'running',
    joint=s.joint,
    ce_weight=s.ce_weight,
    samples=s.samples,
  )
  batch_size = min(s.batch_size, len(labels))
  batch_size -= batch_size % sharding.num_devices()  # the batch splits over the devices
  steps = s.epochs * (len(labels) // batch_size)
  trained, _ = fit.fit(
    model,
    _optimizer(s.learning_rate, s.joint, s.network_learning_rate),
    objective,
    feed.training_batches(images, labels, batch_size, cfg.seed, 0, steps),
    steps,
    seed=seeds.seed_for(cfg.seed, seeds.Stream.SELECTOR_TRAINING),
    settings=loop.LoopSettings.from_config(cfg, num_classes),
    desc=f'{desc} (lambda {lam:g})',
  )
  return trained.selector.policy(), nnx.state(net if cached else trained.net)
