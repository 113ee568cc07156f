"""Compatibility as a quadratic term of the LQF objective.

Linearize the new network's joint output (logits then embedding, `resnet.split_at(...,
output="joint")`) around w0: z_lin(x; δ) = [f_lin(x; δ), φ_lin(x; δ)], affine in δ. The
old model's frozen head (W_old, b_old) on m(φ_lin) (m: `embedding.match_dim`, a fixed
linear map) is again affine in δ, so the influence loss with a squared error,

    L_ρ(δ) = (1-ρ)/N Σ_i ‖f_lin(x_i; δ) - k·y_i‖² + ρ/N Σ_i ‖W_oldᵀ m(φ_lin(x_i; δ)) + b_old - k·y_i‖²
             + λ‖δ‖²,

is a convex quadratic with constant Hessian, solved exactly by `lqf.solve` (`bct_problem`)
or, along the share ρ, from one Jacobian by `lqf.solve.KernelPath`. ρ = 0 is plain LQF, ρ = 1/2 weighs
the two terms equally (BCT's λ = 1), ρ = 1 keeps only the old head's wish.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

import bct.embedding as embedding
import bct.losses as losses
from lqf.errors import require
from lqf.linearize import LinState
import lqf.objective as objective_lib
import lqf.solve as solve

PyTree = Any


def logits_outputs(joint: solve.Outputs, num_classes: int) -> solve.Outputs:
  """(δ, state, h) -> f_lin [B, C], from the linearized joint output."""
  return lambda delta, state, h: joint(delta, state, h)[:, :num_classes]


def embedding_outputs(joint: solve.Outputs, num_classes: int) -> solve.Outputs:
  """(δ, state, h) -> φ_lin [B, D]."""
  return lambda delta, state, h: joint(delta, state, h)[:, num_classes:]


def influence_outputs(joint: solve.Outputs, num_classes: int, head: losses.OldHead,
                      rule: str) -> solve.Outputs:
  """(δ, state, h) -> W_oldᵀ m(φ_lin) + b_old [B, C], affine in δ.

  A cosine old head (s·cos(m(φ), w_c) + b_c) is not affine in φ; its normaliser is taken
  at the linearization point, s·m(φ_lin)ᵀŵ_c/‖m(φ_lin(·; 0))‖ + b_c, which keeps the
  term quadratic and equals the head's logits at δ = 0 (and to first order near it)."""
  kernel, bias = jnp.asarray(head.kernel), jnp.asarray(head.bias)
  feats = embedding_outputs(joint, num_classes)
  dim = kernel.shape[0]

  def outputs(delta: PyTree, state: LinState, h: jax.Array) -> jax.Array:
    x = embedding.match_dim(feats(delta, state, h), dim, rule)
    if head.scale is None:
      return x @ kernel + bias
    x0 = embedding.match_dim(feats(jax.tree.map(jnp.zeros_like, delta), state, h), dim, rule)
    norm0 = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(jnp.square(x0), -1, keepdims=True) + 1e-12))
    unit = kernel / jnp.sqrt(jnp.sum(jnp.square(kernel), 0, keepdims=True) + 1e-12)
    return head.scale * (x / norm0) @ unit + bias

  return outputs


def paired_outputs(joint: solve.Outputs, num_classes: int, head: losses.OldHead,
                   rule: str) -> solve.Outputs:
  """(δ, state, h) -> [f_lin, old head on φ_lin]: [B, 2C], one Jacobian for both terms."""
  logits = logits_outputs(joint, num_classes)
  influence = influence_outputs(joint, num_classes, head, rule)
  return lambda delta, state, h: jnp.concatenate(
      [logits(delta, state, h), influence(delta, state, h)], axis=-1)


def _check_rho(rho: float) -> None:
  require(0.0 <= rho <= 1.0, f"the compatibility share rho must be in [0, 1], got {rho}")


def bct_problem(joint: solve.Outputs, state: LinState, like: PyTree, feats: jax.Array,
                labels: jax.Array, num_classes: int, head: losses.OldHead, *, rule: str,
                k: float, lam: float, rho: float, batch_size: int = 256) -> solve.Problem:
  """L_ρ as a `lqf.solve.Problem` of two terms (data, influence)."""
  _check_rho(rho)
  labels = jnp.asarray(labels)
  dtype = jnp.result_type(float)  # float64 under jax.enable_x64.
  targets = objective_lib.scaled_one_hot(labels, num_classes, k, dtype)
  ones = jnp.ones(len(labels), dtype)
  feats = jnp.asarray(feats)
  data = solve.Term(logits_outputs(joint, num_classes), feats, targets, ones, 1.0 - rho)
  influence = solve.Term(influence_outputs(joint, num_classes, head, rule), feats, targets,
                         ones, rho)
  return solve.Problem((data, influence), state, like, lam, batch_size)
