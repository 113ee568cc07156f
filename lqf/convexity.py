"""Tools to look at the shape of an objective: Hessian-vector products, extreme
eigenvalues by Lanczos, and the loss along 1-D and 2-D slices through parameter space.

Every function takes the objective as `loss(δ) -> scalar` over a pytree δ (close over the
data), so the same tools apply to the linearized objective, whose Hessian is constant and
positive semi-definite, and to the nonlinear one at `w0 + δ`, whose Hessian is neither.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np

PyTree = Any
Loss = Callable[[PyTree], jax.Array]


def hvp(loss: Loss, delta: PyTree, v: PyTree) -> PyTree:
  """∇²L(δ) v, forward-over-reverse (one jvp of the gradient)."""
  return jax.jvp(jax.grad(loss), (delta,), (v,))[1]


def hessian_change(loss: Loss, delta_a: PyTree, delta_b: PyTree, v: PyTree) -> float:
  """||∇²L(δ_a) v - ∇²L(δ_b) v|| / ||∇²L(δ_a) v||: 0 for a quadratic objective."""
  ha, hb = ravel_pytree(hvp(loss, delta_a, v))[0], ravel_pytree(hvp(loss, delta_b, v))[0]
  return float(jnp.linalg.norm(ha - hb) / jnp.linalg.norm(ha))


class Spectrum(NamedTuple):
  ritz_values: np.ndarray   # [m] ascending: estimates of the eigenvalues, extremes first to converge
  smallest: float
  largest: float


def lanczos(matvec: Callable[[PyTree], PyTree], like: PyTree, num_iters: int = 30, *,
            seed: int = 0) -> Spectrum:
  """Extreme eigenvalues of the symmetric operator `matvec` by Lanczos.

  `num_iters` steps from a random unit vector with full reorthogonalisation (the basis,
  num_iters × P, is kept in float64), then the eigenvalues of the tridiagonal matrix. The
  largest and smallest Ritz values converge first; with num_iters ≥ P they are exact.
  """
  flat, unravel = ravel_pytree(like)
  n = flat.size
  m = min(num_iters, n)
  op = jax.jit(lambda x: ravel_pytree(matvec(unravel(x.astype(flat.dtype))))[0])
  rng = np.random.default_rng(seed)
  q = rng.normal(size=n)
  q /= np.linalg.norm(q)
  basis = np.zeros((m, n))
  alphas, betas = [], []
  for j in range(m):
    basis[j] = q
    w = np.asarray(op(jnp.asarray(q)), np.float64)
    alpha = float(q @ w)
    w -= basis[:j + 1].T @ (basis[:j + 1] @ w)  # Full reorthogonalisation, twice is enough.
    w -= basis[:j + 1].T @ (basis[:j + 1] @ w)
    alphas.append(alpha)
    beta = float(np.linalg.norm(w))
    if j == m - 1 or beta < 1e-12 * max(1.0, abs(alpha)):
      break
    betas.append(beta)
    q = w / beta
  k = len(alphas)
  t = np.diag(alphas) + np.diag(betas[:k - 1], 1) + np.diag(betas[:k - 1], -1)
  ritz = np.linalg.eigvalsh(t)
  return Spectrum(ritz, float(ritz[0]), float(ritz[-1]))


def random_direction(like: PyTree, seed: int, *, reference: PyTree | None = None) -> PyTree:
  """A Gaussian direction shaped like `like`. With `reference` (say w0), each leaf is
  rescaled to the norm of the matching reference leaf (layer-wise normalisation, so that
  a step of 1 moves every layer by its own size)."""
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
  if reference is not None:
    refs = jax.tree.leaves(reference)
    out = [d * jnp.linalg.norm(r) / jnp.maximum(jnp.linalg.norm(d), 1e-12)
           for d, r in zip(out, refs)]
  return jax.tree.unflatten(treedef, out)


def _along(center: PyTree, steps: Sequence[tuple[float, PyTree]]) -> PyTree:
  out = center
  for s, d in steps:
    out = jax.tree.map(lambda o, di, s=s: o + s * di, out, d)
  return out


def slice_1d(loss: Loss, center: PyTree, direction: PyTree, alphas: Sequence[float]
             ) -> np.ndarray:
  """L(center + α·direction) for each α: [len(alphas)]."""
  f = jax.jit(lambda a: loss(_along(center, [(a, direction)])))
  return np.array([float(f(a)) for a in alphas])


def slice_2d(loss: Loss, center: PyTree, d1: PyTree, d2: PyTree, alphas: Sequence[float],
             betas: Sequence[float]) -> np.ndarray:
  """L(center + α·d1 + β·d2) on the grid: [len(alphas), len(betas)]."""
  f = jax.jit(lambda a, b: loss(_along(center, [(a, d1), (b, d2)])))
  return np.array([[float(f(a, b)) for b in betas] for a in alphas])


def curvature_along(values: np.ndarray, alphas: Sequence[float]) -> np.ndarray:
  """Second finite differences of a 1-D slice on a uniform grid: [len(alphas) - 2].
  Constant for a quadratic; sign changes show non-convexity along the line."""
  h = float(alphas[1] - alphas[0])
  return (values[2:] - 2 * values[1:-1] + values[:-2]) / h ** 2
