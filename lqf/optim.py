"""Iterative optimisers for the linearized objective: K-FAC (kfac-jax), SGD with
momentum and Adam (optax).

All three minimise the same `objective(δ, state, batch)` over batches of cached prefix
features. The linearized problem's curvature does not depend on δ, so K-FAC can
estimate its Kronecker factors once (`curvature="once"`, from `burnin_steps` batches)
and invert them once, instead of tracking a moving average (`curvature="ema"`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import kfac_jax
import numpy as np
import optax

import lqf.data.pipeline as pipeline
from lqf.errors import NonFiniteLossError
from lqf.linearize import LinState
import lqf.runtime.parallel as parallel

PyTree = Any
# kfac-jax donates its batches; a batch sharded over a mesh cannot always be reused in
# place, which only costs a copy.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
Objective = Callable[[PyTree, LinState, tuple[jax.Array, jax.Array]], jax.Array]
OPTIMIZERS = ("kfac", "sgd", "adam")
_NEVER = 2**31 - 1  # The largest int32: kfac-jax counts steps in int32.


def batches(feats: jax.Array, labels: jax.Array, batch_size: int, seed: int,
            start: int = 0, mesh: Mesh | None = None
            ) -> Iterator[tuple[jax.Array, jax.Array]]:
  """Batch `s` is `pipeline.batch_indices(N, B, s, seed)`: a pure function of the step.
  The whole set, in order, when B ≥ N (full-batch steps on few-shot data). On a `mesh`
  each batch is split over its devices."""
  n = len(labels)
  step = start
  while True:
    if batch_size >= n:
      # A copy: kfac-jax's burn-in donates its batch, and these arrays are the caller's.
      batch = jnp.array(feats), jnp.array(labels)
    else:
      idx = pipeline.batch_indices(n, batch_size, step, seed)
      batch = feats[idx], labels[idx]
    yield batch if mesh is None else parallel.shard_batch(batch, mesh)
    step += 1


def make_kfac(objective: Objective, o: Mapping[str, Any]) -> kfac_jax.Optimizer:
  """A kfac-jax optimiser for `objective`. kfac-jax is told the penalty's curvature 2λ
  (`o.lam`, the λ the objective was made with: it is given once, in the config block)."""
  l2 = 2.0 * float(o["lam"])

  def with_state(delta, state, batch):
    return objective(delta, state, batch), state

  once = o["curvature"] == "once"
  # "once": the burn-in's factors and their inverses are kept for good (kfac-jax updates
  # them at steps divisible by the period, so at step 0 only). A period that does not
  # depend on `steps` gives runs of every length the same program, compiled once.
  period = _NEVER if once else int(o["inverse_every"])
  adaptive = bool(o["adaptive"])
  return kfac_jax.Optimizer(
      value_and_grad_func=jax.value_and_grad(with_state, has_aux=True),
      l2_reg=l2, value_func_has_aux=False, value_func_has_state=True,
      value_func_has_rng=False,
      use_adaptive_learning_rate=adaptive, use_adaptive_momentum=adaptive,
      use_adaptive_damping=False,
      learning_rate_schedule=None if adaptive else (lambda s: o["lr"]),
      momentum_schedule=None if adaptive else (lambda s: o["momentum"]),
      damping_schedule=lambda s: o["damping"],
      num_burnin_steps=int(o["burnin_steps"]),
      curvature_ema=0.0 if once else 0.95,
      curvature_update_period=period if once else 1, inverse_update_period=period,
      estimation_mode="ggn_curvature_prop", multi_device=False)


def kfac_blocks(opt: kfac_jax.Optimizer) -> tuple[Any, ...]:
  """The curvature blocks kfac-jax registered (after `init`)."""
  return opt._estimator.blocks  # No public accessor in kfac-jax 0.0.8.


def fit(objective: Objective, delta0: PyTree, state: LinState, feats: jax.Array,
        labels: jax.Array, o: Mapping[str, Any], *, seed: int,
        callback: Callable[[int, PyTree, Any], None] | None = None,
        resume: tuple[int, PyTree, Any] | None = None,
        mesh: Mesh | None = None) -> tuple[PyTree, list[float]]:
  """Minimises `objective` from `delta0` for `o["steps"]` steps with `o["optimizer"]`.

  Returns the final δ and the objective on each step's batch. `callback(step, δ,
  opt_state)` runs after every step (checkpoints, optimality-gap curves); `resume =
  (step, δ, opt_state)` continues a run from such a point. Every batch and random key is
  a function of `(seed, step)`, so a resumed run ends where an uninterrupted one does.
  On a `mesh` the batches are split over its devices and δ, the function state and the
  optimiser state are replicated: K-FAC's factors are sums over the global batch, so the
  steps are those of one device (kfac-jax runs in its single-program mode; XLA adds the
  cross-device sums, where its `multi_device` mode would need pmap).
  """
  name = o["optimizer"]
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")
  batch_size = int(o["batch_size"])
  start = 0 if resume is None else int(resume[0])
  if mesh is not None:
    parallel.check_batch(min(batch_size, len(labels)), mesh,
                         f"the LQF batch (lqf.batch_size={batch_size}, capped at the "
                         f"{len(labels)} examples)")
  data = batches(feats, labels, batch_size, seed, start=start, mesh=mesh)
  history: list[float] = []
  # Fresh buffers: kfac-jax donates δ and the function state, which the caller keeps.
  delta = jax.tree.map(jnp.array, delta0 if resume is None else resume[1])
  state = jax.tree.map(jnp.array, state)
  if mesh is not None:
    delta, state = parallel.replicate((delta, state), mesh)
    if resume is not None:
      resume = (resume[0], delta, parallel.replicate(resume[2], mesh))
  key = jax.random.key(seed)
  if name == "kfac":
    opt = make_kfac(objective, o)
    # `init` also finalizes the optimiser's graph, which a resumed run needs too.
    opt_state = opt.init(delta, key, next(batches(feats, labels, batch_size, seed,
                                                  mesh=mesh)), func_state=state)
    if resume is not None:
      opt_state = resume[2]
    for step in range(start, int(o["steps"])):
      # At step 0 kfac-jax first estimates the factors on `burnin_steps` batches.
      delta, opt_state, state, stats = opt.step(
          delta, opt_state, jax.random.fold_in(key, step), data_iterator=data,
          func_state=state, global_step_int=step)
      _record(history, stats["loss"], step)
      if callback is not None:
        callback(step + 1, delta, opt_state)
    return delta, history
  tx = _optax(o)

  def step_fn(delta, opt_state, state, batch):
    loss, grads = jax.value_and_grad(objective)(delta, state, batch)
    updates, opt_state = tx.update(grads, opt_state, delta)
    return optax.apply_updates(delta, updates), opt_state, loss

  rep = None if mesh is None else parallel.replicated(mesh)
  step_fn = jax.jit(step_fn) if mesh is None else jax.jit(step_fn, out_shardings=rep)
  opt_state = tx.init(delta) if resume is None else resume[2]
  for step in range(start, int(o["steps"])):
    delta, opt_state, loss = step_fn(delta, opt_state, state, next(data))
    _record(history, loss, step)
    if callback is not None:
      callback(step + 1, delta, opt_state)
  return delta, history


def init_state(objective: Objective, delta0: PyTree, state: LinState, feats: jax.Array,
               labels: jax.Array, o: Mapping[str, Any], *, seed: int) -> Any:
  """The optimiser state `fit` starts from: the structure a checkpoint restores into."""
  delta = jax.tree.map(jnp.array, delta0)
  if o["optimizer"] == "kfac":
    batch = next(batches(feats, labels, int(o["batch_size"]), seed))
    return make_kfac(objective, o).init(delta, jax.random.key(seed), batch,
                                            func_state=jax.tree.map(jnp.array, state))
  return _optax(o).init(delta)


def _optax(o: Mapping[str, Any]) -> optax.GradientTransformation:
  return optax.sgd(o["lr"], momentum=o["momentum"]) if o["optimizer"] == "sgd" \
      else optax.adam(o["lr"])


# A convex objective that grows a hundredfold has diverged, even while still finite.
DIVERGENCE_FACTOR = 100.0


def _record(history: list[float], loss: jax.Array, step: int) -> None:
  value = float(loss)
  diverged = history and history[0] > 0 and value > DIVERGENCE_FACTOR * history[0]
  if not np.isfinite(value) or diverged:
    raise NonFiniteLossError(
        f"the LQF objective {'became' if not diverged else 'diverged to'} {value:.4g} at "
        f"step {step + 1}: lower the learning rate or raise the damping "
        "(--config.lqf.lr / --config.lqf.damping), or let K-FAC choose its step with "
        "--config.lqf.adaptive=True")
  history.append(value)
