"""The exact ER-versus-NFR trade-off of a linearized update, one solve per penalty share.

`Path` computes the Jacobian G of the training examples and the tangent kernel
K = G Gᵀ once. At share ρ (see `pc.lqf_term`), with s_i and m_i the merged weights and
targets, D = diag(√(s_i/N)) (repeated over the C outputs) and r = D(m - f0):

    δ*_ρ = Gᵀ D (D K D + λI)⁻¹ r,

the exact minimiser of L_ρ, for the price of one Cholesky factorisation of a (NC)²
matrix. Every point of the curve is an exact optimum: nothing is retrained.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import time
from typing import Any

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from lqf.errors import UserError
from lqf.linearize import LinState
import lqf.solve as solve
import pc.lqf_term as lqf_term

PyTree = Any


@dataclasses.dataclass
class Path:
  """The exact solutions of L_ρ for any ρ, from one Jacobian (see the module docstring).

  jac [N, C, P] float32, f0 [N, C]: the training examples' Jacobians and outputs at δ=0;
  targets (k·one-hot) and pc_targets [N, C], weights [N]; kernel [NC, NC] float64.
  """
  jac: np.ndarray
  f0: np.ndarray
  targets: np.ndarray
  pc_targets: np.ndarray
  weights: np.ndarray
  kernel: np.ndarray
  lam: float
  unravel: Callable[[jax.Array], PyTree]
  seconds: float  # Building the Jacobian and the kernel.

  @classmethod
  def build(cls, apply: solve.Outputs, state: LinState, like: PyTree, feats: jax.Array,
            labels: np.ndarray, num_classes: int, pc_targets: np.ndarray,
            weights: np.ndarray, *, k: float, lam: float, batch_size: int = 256,
            max_bytes: float = 8e9) -> "Path":
    if lam <= 0:
      raise UserError(f"the trade-off path needs a positive ridge lam, got {lam}")
    flat, unravel = ravel_pytree(like)
    need = len(labels) * num_classes * flat.size * 4
    if need > max_bytes:
      raise UserError(f"the trade-off path needs the {len(labels) * num_classes} × "
                      f"{flat.size} Jacobian ({need / 1e9:.1f} GB), more than "
                      f"{max_bytes / 1e9:.1f} GB: use fewer training examples, a smaller "
                      "lqf.scope, or raise the memory limit")
    t0 = time.perf_counter()
    jac, f0 = solve.jacobian(apply, like, state, feats, batch_size=batch_size)
    g = jac.reshape(-1, flat.size)
    kernel = (g @ g.T).astype(np.float64)
    targets = k * np.eye(num_classes, dtype=np.float32)[np.asarray(labels)]
    return cls(jac, f0, targets, np.asarray(pc_targets, np.float32),
               np.asarray(weights, np.float32), kernel, float(lam), unravel,
               time.perf_counter() - t0)

  def solve(self, rho: float) -> tuple[PyTree, float]:
    """(δ*_ρ, L_ρ(δ*_ρ)) exactly."""
    if not 0.0 <= rho <= 1.0:
      raise UserError(f"the PC share rho must be in [0, 1], got {rho}")
    n, c = self.f0.shape
    s, m = (np.asarray(a, np.float64) for a in lqf_term.merged(
        self.targets, self.pc_targets, self.weights, rho))
    d = np.repeat(np.sqrt(s / n), c)
    r = d * (m - self.f0).reshape(-1)
    system = d[:, None] * self.kernel * d[None, :] + self.lam * np.eye(n * c)
    alpha = scipy.linalg.cho_solve(scipy.linalg.cho_factor(system), r)
    delta = self.jac.reshape(n * c, -1).T @ (d * alpha).astype(np.float32)
    # L = λ rᵀα at the merged targets, plus the constant the merge dropped.
    y, t, w = (np.asarray(a, np.float64) for a in (self.targets, self.pc_targets, self.weights))
    const = ((1 - rho) * (y ** 2).sum(-1) + rho * w * (t ** 2).sum(-1)
             - s * (m ** 2).sum(-1)).sum() / n
    return self.unravel(jnp.asarray(delta)), float(self.lam * r @ alpha + const)


def curve(path: Path, rhos: Sequence[float], evaluate: Callable[[PyTree], dict[str, float]]
          ) -> list[dict[str, float]]:
  """For each ρ, the exact optimum's objective, solve time and `evaluate(δ*_ρ)`."""
  points = []
  for rho in rhos:
    t0 = time.perf_counter()
    delta, value = path.solve(float(rho))
    points.append({"rho": float(rho), "objective": value,
                   "solve_seconds": time.perf_counter() - t0, **evaluate(delta)})
  return points


def best_at(points: Sequence[dict[str, float]], max_er: float) -> dict[str, float] | None:
  """The point of lowest NFR among those with ER_new ≤ max_er (None if there is none)."""
  ok = [p for p in points if p["ER_new"] <= max_er + 1e-12]
  return min(ok, key=lambda p: (p["NFR"], p["ER_new"])) if ok else None
