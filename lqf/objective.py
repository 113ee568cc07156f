"""The LQF objective over the linearized network.

    L(δ) = 1/N Σ_i ||f_lin(x_i; δ) - k·y_i||² + λ ||δ||²          (loss="mse")
    L(δ) = 1/N Σ_i CE(f_lin(x_i; δ), y_i) + λ ||δ||²              (loss="ce", ablation)

y_i is one-hot, k the target scale; the penalty is on δ = w - w0, so it pulls toward the
pretrained weights, not toward zero. With "mse" the problem is a ridge regression on
Jacobian features, with minimiser δ* = (JᵀJ + NλI)⁻¹ Jᵀ (kY - f0).

The losses are registered with kfac-jax (no-ops outside its tracer), with the
normalisation it assumes: a sum over outputs and a mean over the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import kfac_jax
import optax

from lqf.linearize import LinState

PyTree = Any
Batch = tuple[jax.Array, jax.Array]  # (prefix features [B, ...], int labels [B])
LOSSES = ("mse", "ce")


def sq_norm(tree: PyTree) -> jax.Array:
  return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


def scaled_one_hot(labels: jax.Array, num_classes: int, k: float, dtype: Any = None
                   ) -> jax.Array:
  """LQF's regression target k·one-hot(y): labels int [N] -> [N, C], in `dtype` (default
  the float type in use: float64 under `jax.enable_x64`)."""
  dtype = jnp.result_type(float) if dtype is None else dtype
  return k * jax.nn.one_hot(jnp.asarray(labels), num_classes, dtype=dtype)


def data_term(outputs: jax.Array, labels: jax.Array, *, loss: str, k: float) -> jax.Array:
  """Mean over the batch of the per-example loss, registered for kfac-jax.

  outputs [B, C], labels int [B].
  """
  if loss == "mse":
    targets = scaled_one_hot(labels, outputs.shape[-1], k, outputs.dtype)
    kfac_jax.register_squared_error_loss(outputs, targets)
    return jnp.mean(jnp.sum(jnp.square(outputs - targets), axis=-1))
  if loss == "ce":
    kfac_jax.register_softmax_cross_entropy_loss(outputs, labels)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(outputs, labels))
  raise ValueError(f"unknown loss {loss!r}: use one of {', '.join(LOSSES)}")


def make_loss(apply: Callable[[PyTree, LinState, jax.Array], jax.Array], *, loss: str,
              k: float, lam: float) -> Callable[[PyTree, LinState, Batch], jax.Array]:
  """`L(δ, state, batch)`, the objective of the module docstring on one batch."""

  def objective(delta: PyTree, state: LinState, batch: Batch) -> jax.Array:
    h, labels = batch
    return data_term(apply(delta, state, h), labels, loss=loss, k=k) + lam * sq_norm(delta)

  return objective


def make_nonlinear_loss(nonlinear: Callable[[PyTree, LinState, jax.Array], jax.Array], *,
                        loss: str, k: float, lam: float
                        ) -> Callable[[PyTree, LinState, Batch], jax.Array]:
  """The same objective through the network itself at `w0 + δ` (what LQF linearizes):
  equal to `make_loss`'s at δ = 0 with the same gradient there, but not quadratic."""

  def objective(delta: PyTree, state: LinState, batch: Batch) -> jax.Array:
    h, labels = batch
    w = jax.tree.map(jnp.add, state["w0"], delta)
    return data_term(nonlinear(w, state, h), labels, loss=loss, k=k) + lam * sq_norm(delta)

  return objective
