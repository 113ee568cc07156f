"""The PC wish as a quadratic term of the LQF objective.

For a linearized new model f_lin(x; δ) = f(x; w0) + J(x)δ, old logits φ_old and
per-example weights w_i = α + β·1(old right on x_i) (α = 0: only where it was right),

    L_ρ(δ) = (1-ρ)/N Σ_i ‖f_lin(x_i; δ) - k·y_i‖² + ρ/N Σ_i w_i ‖f_lin(x_i; δ) - t_i‖² + λ‖δ‖²,

with targets t_i from the old model (`old_targets`). ρ ∈ [0, 1] is the penalty's share:
ρ = 0 is plain LQF, ρ = 1 the fully constrained problem (the old model's outputs where it
was right, and the ridge). Both terms are squared errors of outputs affine in δ, so L_ρ
is a convex quadratic whose curvature does not depend on δ, with the exact solvers of
`lqf.solve` (`pc_problem`), and K-FAC still sees one Kronecker block per conv and dense
kernel (`make_objective`).

Per example the two terms merge into one (`merged`):

    (1-ρ)‖f - ky‖² + ρw‖f - t‖² = s‖f - m‖² + const,   s = 1-ρ+ρw,   m = ((1-ρ)ky + ρwt)/s,

so the problem at any ρ is one weighted least squares with the same Jacobian, which is
what makes sweeping ρ cheap (`lqf.solve.KernelPath` merges them per example).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np

from lqf.errors import UserError
from lqf.linearize import LinState
import lqf.objective as objective_lib
import lqf.solve as solve

PyTree = Any
TARGETS = ("affine", "logits")


def old_targets(old_logits: np.ndarray, labels: np.ndarray, *, k: float, mode: str
                ) -> tuple[np.ndarray, dict[str, float]]:
  """The outputs the PC term pulls toward, and how they were made from φ_old [N, C].

  "logits": t = φ_old. "affine": t = a·φ_old + b with the scalars (a, b) that best fit
  k·one-hot(y) by least squares over these examples: φ_old put on LQF's target scale,
  with every example's ranking of classes and the ratios of its margins kept (a > 0).
  """
  old_logits = np.asarray(old_logits, np.float64)
  if mode == "logits":
    return old_logits.astype(np.float32), {"a": 1.0, "b": 0.0}
  if mode != "affine":
    raise UserError(f"unknown PC target {mode!r}: use one of {', '.join(TARGETS)}")
  y = np.asarray(objective_lib.scaled_one_hot(labels, old_logits.shape[-1], k, jnp.float32),
                 np.float64)
  x = old_logits.reshape(-1)
  a, b = np.linalg.lstsq(np.stack([x, np.ones_like(x)], 1), y.reshape(-1), rcond=None)[0]
  if not a > 0:
    raise UserError("the old model's logits are not positively related to its labels "
                    f"(fitted scale a = {a:.3g}): use term.target=logits, or check that "
                    "the old model and the labels share one label set")
  return (a * old_logits + b).astype(np.float32), {"a": float(a), "b": float(b)}


def pc_weights(old_logits: np.ndarray, labels: np.ndarray, *, alpha: float, beta: float
               ) -> np.ndarray:
  """w_i = α + β·1(argmax φ_old(x_i) = y_i): [N]."""
  right = np.asarray(old_logits).argmax(-1) == np.asarray(labels)
  return (alpha + beta * right).astype(np.float32)


def merged(targets: jax.Array, pc_targets: jax.Array, weights: jax.Array, rho: float
           ) -> tuple[jax.Array, jax.Array]:
  """(s [N], m [N, C]) of the module docstring; m = 0 where s = 0 (no term left)."""
  s = (1.0 - rho) + rho * weights
  safe = jnp.where(s > 0, s, 1.0)
  m = ((1.0 - rho) * targets + rho * weights[:, None] * pc_targets) / safe[:, None]
  return s, jnp.where(s[:, None] > 0, m, 0.0)


def pc_problem(apply: solve.Outputs, state: LinState, like: PyTree, feats: jax.Array,
               labels: jax.Array, num_classes: int, pc_targets: jax.Array,
               weights: jax.Array, *, k: float, lam: float, rho: float,
               batch_size: int = 256) -> solve.Problem:
  """L_ρ as a `lqf.solve.Problem` with its two terms kept apart (data, PC)."""
  if not 0.0 <= rho <= 1.0:
    raise UserError(f"the PC share rho must be in [0, 1], got {rho}")
  base = solve.mse_problem(apply, state, like, feats, labels, num_classes, k=k, lam=lam,
                           batch_size=batch_size)
  data = base.terms[0]._replace(weight=1.0 - rho)
  pc = solve.Term(apply, data.inputs, jnp.asarray(pc_targets),
                  jnp.asarray(weights), weight=rho)
  return solve.Problem((data, pc), state, like, lam, batch_size)


Batch = tuple[jax.Array, jax.Array, jax.Array, jax.Array]  # (h, labels, pc targets, w)


def make_objective(apply: solve.Outputs, *, k: float, lam: float, rho: float
                   ) -> Callable[[PyTree, LinState, Batch], jax.Array]:
  """L_ρ on one batch (up to a constant in δ), registered for kfac-jax as one squared
  error on √s·f_lin against √s·m, so K-FAC's curvature is that of L_ρ."""

  def objective(delta: PyTree, state: LinState, batch: Batch) -> jax.Array:
    h, labels, pc_targets, weights = batch
    out = apply(delta, state, h)
    y = objective_lib.scaled_one_hot(labels, out.shape[-1], k, out.dtype)
    s, m = merged(y, pc_targets, weights, rho)
    root = jnp.sqrt(s)[:, None]
    kfac_jax.register_squared_error_loss(root * out, root * m)
    return jnp.mean(jnp.sum(jnp.square(root * (out - m)), axis=-1)) + lam * sum(
        jnp.sum(jnp.square(x)) for x in jax.tree.leaves(delta))

  return objective
