"""Adapting a pretrained classifier to a target task: nonlinear fine-tuning, a linear
probe on frozen features, and the reference arms (training from scratch; the source
model without adaptation)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import optax

import lqf.data.pipeline as pipeline
import lqf.linearize as linearize
from lqf.models.classifier import Classifier, build_classifier
import lqf.objective as objective
import lqf.optim as optim
import lqf.runtime.parallel as parallel
import lqf.runtime.train as train
import lqf.solve as solve

PyTree = Any


def with_new_head(pretrained: Classifier, model_cfg: Mapping[str, Any],
                  num_classes: int, in_channels: int, seed: int) -> Classifier:
  """The pretrained backbone under a freshly initialised (non-zero) head.

  Built as a new model for `num_classes`, then every weight but the head's is copied
  from `pretrained`, so the label sets of source and target may differ.
  """
  fresh = build_classifier(model_cfg, num_classes, in_channels, seed)
  params = dict(pretrained.params, head=fresh.params["head"])
  return dataclasses.replace(fresh, params=params, batch_stats=pretrained.batch_stats)


def adapt_batch_norm(clf: Classifier, images: np.ndarray | jax.Array) -> Classifier:
  """AdaBN (Li et al., 2016): batch norm's running statistics replaced by those of
  `images` [N, H, W, C], the target domain's (unlabelled) training images.

  Each layer's statistics are those of its input when every layer before it normalises
  with the batch's statistics, so that afterwards `clf.apply(params, new_stats, images)`
  equals the training-mode forward pass on `images` as one batch. The weights are kept; a
  backbone without batch norm is returned unchanged.

  The training-mode pass returns the momentum update `m · old + (1 − m) · batch`, so
  passes from zero and from one statistics give `(1 − m) · batch` and `m + (1 − m) · batch`;
  their difference is m whatever a backbone's momentum is (averaged over a layer's
  channels, where the batch's statistics would otherwise add their rounding to it).
  """
  if not jax.tree.leaves(clf.batch_stats):
    return clf
  x = jnp.asarray(images, jnp.float32)
  update = jax.jit(clf.train_apply)
  from_zero = update(clf.params, jax.tree.map(jnp.zeros_like, clf.batch_stats), x)[1]
  from_one = update(clf.params, jax.tree.map(jnp.ones_like, clf.batch_stats), x)[1]
  stats = jax.tree.map(lambda z, o: z / (1.0 - jnp.mean(o - z)), from_zero, from_one)
  return dataclasses.replace(clf, batch_stats=stats)


def finetune(clf: Classifier, data: pipeline.ImageSplit, t: Mapping[str, Any], *,
             seed: int, train_bn: bool, augment: Mapping[str, Any] | None = None,
             mesh: Mesh | None = None) -> Classifier:
  """Nonlinear fine-tuning of every weight with cross-entropy (`train.fit`)."""
  params, stats = train.fit(clf, data, t, seed=seed, augment=augment, train_bn=train_bn,
                            progress=False, mesh=mesh)
  return dataclasses.replace(clf, params=params, batch_stats=stats)


def fit_linear_probe(features: jax.Array, labels: jax.Array, num_classes: int, *,
                     lr: float, weight_decay: float, steps: int, seed: int
                     ) -> dict[str, jax.Array]:
  """Multinomial logistic regression on fixed features, full batch with Adam.

  Minimises `mean CE(f W + b, y) + weight_decay/2 · ||W||²`. The rate decays to zero
  (cosine) over `steps`: at a constant rate Adam's normalised steps keep the weights
  wandering around the optimum (1.5e-3 to 4e-3 from it after 3,000 steps on
  tests/test_finetune.py's problem, depending on XLA's rounding; 6e-6 with the decay).
  features [N, D], labels int [N] -> {"kernel": [D, C], "bias": [C]}.
  """
  if steps <= 0:
    raise ValueError(f"the linear probe needs a positive number of steps, got {steps}")
  d = features.shape[-1]
  head = {"kernel": jax.random.normal(jax.random.key(seed), (d, num_classes)) / jnp.sqrt(d),
          "bias": jnp.zeros((num_classes,))}
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps))

  def loss(h):
    logits = features @ h["kernel"] + h["bias"]
    return train.cross_entropy(logits, labels) + 0.5 * weight_decay * jnp.sum(h["kernel"] ** 2)

  def body(_, carry):
    h, s = carry
    g = jax.grad(loss)(h)
    u, s = opt.update(g, s, h)
    return optax.apply_updates(h, u), s

  head, _ = jax.jit(lambda h: jax.lax.fori_loop(0, steps, body, (h, opt.init(h))))(head)
  return head


def linear_probe(clf: Classifier, data: pipeline.ImageSplit, p: Mapping[str, Any], *,
                 seed: int) -> Classifier:
  """Fits `clf`'s head on its frozen features (batch norm on running statistics)."""
  feats = jax.jit(clf.features)(clf.params, clf.batch_stats, data.images)
  head = fit_linear_probe(feats, jnp.asarray(data.labels), data.num_classes, lr=p["lr"],
                          weight_decay=p["weight_decay"], steps=int(p["steps"]), seed=seed)
  return dataclasses.replace(clf, params=dict(clf.params, head=head))


def lqf(clf: Classifier, data: pipeline.ImageSplit, c: Mapping[str, Any], *,
        seed: int, callback: Callable[[int, PyTree, Any], None] | None = None
        ) -> tuple[Callable[[jax.Array], jax.Array], dict[str, Any]]:
  """Linear quadratic fine-tuning of `clf` (whose head is already the target's).

  `c` is the `lqf` config block: scope, batch_norm, loss, k, lam and the optimiser's
  settings (see `optim.fit`). Returns `predict(images) -> logits` of the linearized
  model at the trained δ, and a record with δ, the loss history and the `Linearized`.
  """

  lin = linearize.linearize(clf.split_at, clf.params, clf.batch_stats, c["scope"],
                            batch_norm=c["batch_norm"], select=clf.linearizable)
  feats = linearize.prefix_features(lin, jnp.asarray(data.images))
  labels = jnp.asarray(data.labels)
  loss = objective.make_loss(lin.apply, loss=c["loss"], k=c["k"], lam=c["lam"])
  delta, history = optim.fit(loss, lin.zeros(), lin.state, feats, labels, c, seed=seed, callback=callback)
  apply = jax.jit(lin.apply)

  def predict(images: jax.Array) -> jax.Array:
    return jnp.concatenate([apply(delta, lin.state, linearize.prefix_features(
        lin, images[i:i + 256])) for i in range(0, len(images), 256)])

  return predict, {"delta": delta, "history": history, "linearized": lin, "loss": loss,
                   "features": feats, "labels": labels}


def _to_float(tree: PyTree, dtype: Any) -> PyTree:
  return jax.tree.map(lambda a: jnp.asarray(a, dtype)
                      if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a, tree)


def lqf_problem(clf: Classifier, images: np.ndarray, labels: np.ndarray,
                num_classes: int, c: Mapping[str, Any], *, dtype: Any,
                batch_size: int = 256) -> solve.Problem:
  """The LQF objective of config block `c` on (images, labels), in `dtype` (inside
  `jax.enable_x64` for float64)."""
  lin = linearize.linearize(clf.split_at, _to_float(clf.params, dtype),
                            _to_float(clf.batch_stats, dtype), c["scope"],
                            batch_norm=c["batch_norm"], select=clf.linearizable)
  feats = linearize.prefix_features(lin, jnp.asarray(images, dtype))
  return solve.mse_problem(lin.apply, lin.state, lin.zeros(), feats, labels, num_classes,
                           k=c["k"], lam=c["lam"], batch_size=batch_size)


def exact_optimum(clf: Classifier, images: np.ndarray, labels: np.ndarray,
                  num_classes: int, c: Mapping[str, Any], s: Mapping[str, Any], *,
                  seed: int = 0, callback: Callable[[int, PyTree, float], None] | None = None,
                  mesh: Mesh | None = None) -> tuple[solve.Solution, float]:
  """The minimiser of the LQF objective of config blocks `c` (lqf) and `s` (solve) on
  (images, labels), its data passes split over `mesh`'s devices. Returns the solution
  with δ* in float32, and the solve's seconds."""
  dtype = jnp.float64 if s["float64"] else jnp.float32
  with jax.enable_x64(bool(s["float64"])):
    problem = lqf_problem(clf, images, labels, num_classes, c, dtype=dtype,
                          batch_size=int(s["batch_size"]))
    problem = solve.on_mesh(problem, mesh)
    t0 = time.perf_counter()
    if s["method"] == "cg":
      pre = (solve.kfac_preconditioner(problem, damping=s["damping"], seed=seed)
             if s["precondition"] else None)
      sol = solve.cg(problem, tol=s["tol"], max_iters=int(s["max_iters"]), precondition=pre,
                     callback=callback)
    else:
      sol = solve.kernel_solve(problem, max_bytes=s["max_gb"] * 1e9)
    seconds = time.perf_counter() - t0
    delta = parallel.to_host(_to_float(sol.delta, jnp.float32))
    jax.block_until_ready(delta)
  return sol._replace(delta=delta), seconds


def gap_of(clf: Classifier, images: np.ndarray, labels: np.ndarray, num_classes: int,
           c: Mapping[str, Any], delta: PyTree, optimum: float, float64: bool = True
           ) -> tuple[float, float]:
  """(L(δ), (L(δ) - L*)/|L*|) for a trained δ, evaluated at the solver's precision."""
  dtype = jnp.float64 if float64 else jnp.float32
  with jax.enable_x64(float64):
    problem = lqf_problem(clf, images, labels, num_classes, c, dtype=dtype)
    value = solve.objective(problem, _to_float(delta, dtype))
  return value, solve.relative_gap(value, optimum)
