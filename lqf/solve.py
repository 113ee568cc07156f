"""Exact minimisers of the linearized objective.

The problem is a sum of weighted least-squares terms on outputs affine in δ, plus a ridge:

    L(δ) = Σ_t a_t/N_t Σ_i w_ti ||g_t(h_ti; δ) - y_ti||² + λ ||δ||²,
    g_t(h; δ) = g_t(h; 0) + G_t(h) δ,

with term weights a_t, per-example weights w_ti ≥ 0, outputs [C_t] and targets y_ti. LQF's
own loss is one term (g = f_lin, y = k·one-hot, w = 1); the PC and BCT penalties are more.
With A = Σ_t a_t/N_t Σ_i w_ti G_tiᵀ G_ti + λI (half the Hessian) and
b = Σ_t a_t/N_t Σ_i w_ti G_tiᵀ (y_ti - g_t(h_ti; 0)), c = L(0) - 0:

    L(δ) = δᵀAδ - 2bᵀδ + c,     δ* = A⁻¹b,     L* = c - bᵀδ*.

Two solvers, which must agree:
- `cg`: conjugate gradient on Aδ = b, matrix-free (Av is one `jax.jvp` and one `jax.vjp`
  per batch), optionally preconditioned by K-FAC's inverse curvature (`kfac_preconditioner`).
- `kernel_solve`: with Φ the rows √(a_t w_ti/N_t)·G_ti (one per output) and r the matching
  residuals √(a_t w_ti/N_t)·(y_ti - g_t(h_ti; 0)), δ* = Φᵀ(ΦΦᵀ + λI)⁻¹ r and
  L* = λ rᵀ(ΦΦᵀ + λI)⁻¹ r. For one unweighted term ΦΦᵀ = K/N, so this is
  δ* = Jᵀ(K + NλI)⁻¹ r with the empirical tangent kernel K = JJᵀ. It costs memory for
  the Σ N_t C_t rows, so it is for small training sets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jax.sharding import Mesh
import kfac_jax
import numpy as np
import scipy.linalg

from lqf.errors import UserError
from lqf.linearize import LinState
import lqf.runtime.parallel as parallel

PyTree = Any
Outputs = Callable[[PyTree, LinState, jax.Array], jax.Array]  # (δ, state, h [B,...]) -> [B, C]
SOLVERS = ("cg", "kernel")


class Term(NamedTuple):
  """`weight/N Σ_i sample_weights_i ||outputs(δ, state, inputs_i) - targets_i||²`.

  `outputs` must be affine in δ (a linearized network, or a fixed linear map of one).
  inputs [N, ...], targets [N, C], sample_weights [N].
  """
  outputs: Outputs
  inputs: jax.Array
  targets: jax.Array
  sample_weights: jax.Array
  weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Problem:
  """The objective of the module docstring: its terms, the ridge λ, δ's structure
  (`like`, zeros) and the state the outputs read. `batch_size` bounds the examples per
  pass, so memory does not grow with the data. On a `mesh` (see `on_mesh`) every pass
  splits its batches over the devices."""
  terms: tuple[Term, ...]
  state: LinState
  like: PyTree
  lam: float
  batch_size: int = 256
  mesh: Mesh | None = None

  def __post_init__(self):
    if self.lam < 0:
      raise UserError(f"the ridge weight lam must be ≥ 0, got {self.lam}")
    if self.batch_size < 1:
      raise UserError(f"batch_size must be positive, got {self.batch_size}")
    for i, t in enumerate(self.terms):
      n = len(t.sample_weights)
      if n == 0:
        raise UserError(f"term {i} has no examples: drop it or give it data")
      if len(t.inputs) != n or len(t.targets) != n:
        raise UserError(f"term {i} has {len(t.inputs)} inputs, {len(t.targets)} targets "
                        f"and {n} sample weights: they must be one per example")
      if bool(jnp.any(t.sample_weights < 0)):
        raise UserError(f"term {i} has negative sample weights: the objective would not "
                        "be convex")


class Solution(NamedTuple):
  delta: PyTree                 # δ*
  objective: float              # L(δ*)
  iterations: int               # CG iterations (0 for the kernel solve)
  residual_norms: list[float]   # ||b - Aδ_j|| / ||b||, j = 0, 1, ... (CG)
  objectives: list[float]       # L(δ_j) along the CG iterates
  converged: bool


def mse_problem(apply: Outputs, state: LinState, like: PyTree, feats: jax.Array,
                labels: jax.Array, num_classes: int, *, k: float, lam: float,
                batch_size: int = 256) -> Problem:
  """LQF's objective (`objective.make_loss(loss="mse")`) as a `Problem`."""
  labels = jnp.asarray(labels)
  targets = k * jax.nn.one_hot(labels, num_classes, dtype=jnp.result_type(float))
  term = Term(apply, jnp.asarray(feats), targets, jnp.ones(len(labels), targets.dtype))
  return Problem((term,), state, like, lam, batch_size)


def on_mesh(problem: Problem, mesh: Mesh | None) -> Problem:
  """`problem` with its passes split over `mesh`'s devices (δ's structure and the state
  replicated; each batch, padded to a multiple of the device count, sharded)."""
  if mesh is None:
    return problem
  like, state = parallel.replicate((problem.like, problem.state), mesh)
  return dataclasses.replace(problem, like=like, state=state, mesh=mesh)


def relative_gap(value: float, optimum: float) -> float:
  """(L - L*) / |L*|: how far an objective value is above the optimum, relatively."""
  return (value - optimum) / abs(optimum)


# --- Passes over the data, one batch at a time. -------------------------------------------

def _padded_batches(term: Term, batch_size: int, mesh: Mesh | None = None
                    ) -> Iterator[tuple[jax.Array, ...]]:
  """(h, y, w) batches of exactly `min(batch_size, N)` rows (rounded up to a multiple of
  the mesh's devices); the last is padded with zero-weight copies of the first rows, so
  every batch reuses one compiled program."""
  n = len(term.sample_weights)
  b = min(batch_size, n)
  if mesh is not None:
    b = -(-b // mesh.size) * mesh.size
  for i in range(0, n, b):
    h, y, w = term.inputs[i:i + b], term.targets[i:i + b], term.sample_weights[i:i + b]
    pad = b - len(w)
    if pad:
      fill = np.arange(pad) % n
      h = jnp.concatenate([h, term.inputs[fill]])
      y = jnp.concatenate([y, term.targets[fill]])
      w = jnp.concatenate([w, jnp.zeros((pad,), w.dtype)])
    yield (h, y, w) if mesh is None else parallel.shard_batch((h, y, w), mesh)


@functools.partial(jax.jit, static_argnums=0)
def _weighted_sq_error(outputs: Outputs, delta, state, h, y, w) -> jax.Array:
  r = outputs(delta, state, h) - y
  return jnp.sum(w * jnp.sum(jnp.square(r), axis=-1))


@functools.partial(jax.jit, static_argnums=0)
def _gauss_newton_product(outputs: Outputs, v, state, h, w) -> PyTree:
  """Σ_i w_i G_iᵀ G_i v on one batch."""
  f = lambda d: outputs(d, state, h)
  zero = jax.tree.map(jnp.zeros_like, v)
  _, gv = jax.jvp(f, (zero,), (v,))
  _, pullback = jax.vjp(f, zero)
  return pullback(w[:, None] * gv)[0]


@functools.partial(jax.jit, static_argnums=0)
def _normal_rhs(outputs: Outputs, like, state, h, y, w) -> tuple[PyTree, jax.Array]:
  """(Σ_i w_i G_iᵀ (y_i - g_i(0)), Σ_i w_i ||y_i - g_i(0)||²) on one batch."""
  g0, pullback = jax.vjp(lambda d: outputs(d, state, h), like)
  r = y - g0
  return pullback(w[:, None] * r)[0], jnp.sum(w * jnp.sum(jnp.square(r), axis=-1))


def _scale(term: Term) -> float:
  return term.weight / len(term.sample_weights)


@jax.jit
def _axpy(a, x, y):
  return jax.tree.map(lambda xi, yi: a * xi + yi, x, y)


@jax.jit
def _vdot(x, y) -> jax.Array:
  return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))


def objective(problem: Problem, delta: PyTree) -> float:
  """L(δ), in batches."""
  total = sum(_scale(t) * sum(float(_weighted_sq_error(t.outputs, delta, problem.state, *b))
                              for b in _padded_batches(t, problem.batch_size,
                                                              problem.mesh))
              for t in problem.terms)
  return total + problem.lam * float(_vdot(delta, delta))


def matvec(problem: Problem, v: PyTree) -> PyTree:
  """A v = (Σ_t a_t/N_t Σ_i w_ti G_tiᵀ G_ti + λI) v: half the Hessian of L, times v."""
  out = jax.tree.map(lambda x: problem.lam * x, v)
  for t in problem.terms:
    for h, _, w in _padded_batches(t, problem.batch_size, problem.mesh):
      out = _axpy(_scale(t), _gauss_newton_product(t.outputs, v, problem.state, h, w), out)
  return out


def normal_equations(problem: Problem) -> tuple[PyTree, float]:
  """(b, c) of L(δ) = δᵀAδ - 2bᵀδ + c."""
  b = jax.tree.map(jnp.zeros_like, problem.like)
  c = 0.0
  for t in problem.terms:
    for batch in _padded_batches(t, problem.batch_size, problem.mesh):
      g, sq = _normal_rhs(t.outputs, problem.like, problem.state, *batch)
      b = _axpy(_scale(t), g, b)
      c += _scale(t) * float(sq)
  return b, c


# --- Conjugate gradient. --------------------------------------------------------------------

def cg(problem: Problem, *, tol: float = 1e-5, max_iters: int = 500,
       precondition: Callable[[PyTree], PyTree] | None = None,
       callback: Callable[[int, PyTree, float], None] | None = None) -> Solution:
  """Preconditioned conjugate gradient on Aδ = b from δ = 0.

  Stops when ||b - Aδ|| ≤ tol·||b|| or after `max_iters`. The objective along the way
  comes free from the recursion (r = b - Aδ gives L(δ) = c - δᵀ(b + r)) and is what
  `callback(j, δ_j, L(δ_j))` sees, but it is a difference of numbers of size L(0): once
  L ≪ L(0) it needs float64. The returned `objective` is evaluated directly.
  """
  b, c = normal_equations(problem)
  m = precondition or (lambda v: v)
  x = jax.tree.map(jnp.zeros_like, b)
  r = b
  z = m(r)
  p = z
  rz = float(_vdot(r, z))
  b_norm = math.sqrt(float(_vdot(b, b)))
  if b_norm == 0.0:
    return Solution(x, c, 0, [0.0], [c], True)
  norms, values = [1.0], [c]
  j = 0
  while norms[-1] > tol and j < max_iters:
    ap = matvec(problem, p)
    alpha = rz / float(_vdot(p, ap))
    x = _axpy(alpha, p, x)
    r = _axpy(-alpha, ap, r)
    z = m(r)
    rz, rz_old = float(_vdot(r, z)), rz
    p = _axpy(rz / rz_old, p, z)
    j += 1
    norms.append(math.sqrt(float(_vdot(r, r))) / b_norm)
    values.append(c - float(_vdot(x, _axpy(1.0, b, r))))
    if callback is not None:
      callback(j, x, values[-1])
  return Solution(x, objective(problem, x), j, norms, values, norms[-1] <= tol)


def kfac_preconditioner(problem: Problem, *, damping: float, seed: int = 0
                        ) -> Callable[[PyTree], PyTree]:
  """v ↦ (K-FAC(G) + (2λ + damping) I)⁻¹ v, for `cg(precondition=...)`.

  kfac-jax estimates Kronecker factors of the Gauss-Newton matrix 2·a/N Σ w_i G_iᵀG_i of
  the first term (the data term; the other terms only change the weighting of similar
  rows), averaged over all its batches, and inverts them once. Every linearized conv and
  dense kernel gets a Kronecker block because δ enters as the tangent of `jax.jvp`.
  """
  t = problem.terms[0]

  def func(delta, state, batch):
    h, y, w = batch
    out = t.outputs(delta, state, h)
    sw = jnp.sqrt(w)[:, None]
    kfac_jax.register_squared_error_loss(sw * out, sw * y, weight=t.weight)
    return t.weight * jnp.mean(w * jnp.sum(jnp.square(out - y), axis=-1))

  n = len(t.sample_weights)
  b = min(problem.batch_size, n)
  # Whole batches only (the estimator normalises by the batch size it is given).
  batches = [(t.inputs[i:i + b], t.targets[i:i + b], t.sample_weights[i:i + b])
             for i in range(0, n - b + 1, b)]
  est = kfac_jax.curvature_estimator.BlockDiagonalCurvature(
      func=func, default_estimation_mode="ggn_exact")
  like = jax.tree.map(jnp.zeros_like, problem.like)
  key = jax.random.key(seed)
  identity = 2 * problem.lam + damping
  state = est.init(key, (like, problem.state, batches[0]), exact_powers_to_cache=-1,
                   approx_powers_to_cache=None)

  @jax.jit
  def update(est_state, i, rng, batch):
    return est.update_curvature_matrix_estimate(
        est_state, ema_old=i / (i + 1.0), ema_new=1.0 / (i + 1.0), identity_weight=identity,
        batch_size=b, rng=rng, func_args=(like, problem.state, batch))

  for i, batch in enumerate(batches):
    state = update(state, i, jax.random.fold_in(key, i), batch)
  state = jax.jit(lambda s: est.update_cache(
      s, identity_weight=identity, exact_powers=-1, approx_powers=None, eigenvalues=False,
      pmap_axis_name=None))(state)
  return jax.jit(lambda v: est.multiply_inverse(
      state, v, identity_weight=identity, exact_power=True, use_cached=True,
      pmap_axis_name=None))


# --- The kernel form. -----------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _jacobian_rows(outputs: Outputs, like, state, h) -> jax.Array:
  """G(h_i) for each example, flattened: [B·C, P] in `ravel_pytree(like)` order."""
  def one(hi):
    return jax.jacrev(lambda d: outputs(d, state, hi[None])[0])(like)
  jac = jax.vmap(one)(h)  # Leaves [B, C, *leaf.shape].
  leaves = jax.tree.leaves(jac)
  bsz, c = leaves[0].shape[:2]
  return jnp.concatenate([l.reshape(bsz * c, -1) for l in leaves], axis=1)


def jacobian(outputs: Outputs, like: PyTree, state: LinState, inputs: jax.Array, *,
             batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """The per-example Jacobians and outputs at δ = 0, in batches.

  Returns (G [N, C, P] float32 in `ravel_pytree(like)` order, g(h; 0) [N, C]).
  """
  p = ravel_pytree(like)[0].size
  jacs, outs = [], []
  for i in range(0, len(inputs), batch_size):
    h = inputs[i:i + batch_size]
    jacs.append(np.asarray(_jacobian_rows(outputs, like, state, h)).reshape(len(h), -1, p))
    outs.append(np.asarray(outputs(like, state, h)))
  return np.concatenate(jacs), np.concatenate(outs)


def gram(rows: np.ndarray, block: int = 512) -> np.ndarray:
  """rows @ rowsᵀ accumulated in float64, one pair of row blocks at a time: [R, P] ->
  [R, R]. A float32 product's rounding (relative 1e-7 of the largest entries) can exceed
  a small ridge and make K + λI indefinite; converting two blocks at a time keeps the
  extra memory at 2·block·P doubles."""
  n = len(rows)
  out = np.empty((n, n), np.float64)
  for i in range(0, n, block):
    a = np.asarray(rows[i:i + block], np.float64)
    for j in range(0, i + 1, block):
      b = a if j == i else np.asarray(rows[j:j + block], np.float64)
      out[i:i + block, j:j + block] = a @ b.T
      out[j:j + block, i:i + block] = out[i:i + block, j:j + block].T
  return out


def kernel_solve(problem: Problem, *, max_bytes: float = 4e9) -> Solution:
  """δ* = Φᵀ(ΦΦᵀ + λI)⁻¹ r (module docstring), the kernel built in batches.

  The rows Φ are computed once per batch and kept while they fit in `max_bytes`
  (float32); the (ΣNC)² kernel is solved in float64 by Cholesky.
  """
  flat_like, unravel = ravel_pytree(problem.like)
  p = flat_like.size
  rows = sum(len(t.sample_weights) * t.targets.shape[-1] for t in problem.terms)
  if rows * p * flat_like.dtype.itemsize > max_bytes:
    raise UserError(
        f"the kernel solve needs the {rows} × {p} Jacobian "
        f"({rows * p * flat_like.dtype.itemsize / 1e9:.1f} GB), "
        f"more than max_bytes={max_bytes / 1e9:.1f} GB: use --config.solve.method=cg, which "
        "needs memory for one batch only")
  blocks, resid = [], []
  # Not split over a mesh: with the batch sharded, XLA (jax 0.9.1, CPU) returned wrong
  # per-example Jacobian rows from this vmap of jacrev, and so did a shard_map of it
  # (tests/test_parallel.py compares against one device).
  like, state = (problem.like, problem.state) if problem.mesh is None else \
      parallel.to_host((problem.like, problem.state))
  for t in problem.terms:
    for h, y, w in _padded_batches(t, problem.batch_size):
      keep = np.asarray(w) > 0  # Padding rows have zero weight; drop them.
      jac = np.asarray(_jacobian_rows(t.outputs, like, state, h))
      jac = jac.reshape(len(w), -1, p)[keep]
      s = np.sqrt(np.asarray(w, np.float64)[keep] * _scale(t)).astype(jac.dtype)
      g0 = np.asarray(t.outputs(like, state, h))[keep]
      blocks.append((s[:, None, None] * jac).reshape(-1, p))
      resid.append((s[:, None] * (np.asarray(y)[keep] - g0)).reshape(-1))
  phi = np.concatenate(blocks)
  r = np.concatenate(resid).astype(np.float64)
  kernel = (phi @ phi.T).astype(np.float64)
  if problem.lam > 0:
    alpha = scipy.linalg.cho_solve(
        scipy.linalg.cho_factor(kernel + problem.lam * np.eye(len(r))), r)
  else:  # Minimum-norm interpolation.
    alpha = np.linalg.lstsq(kernel, r, rcond=None)[0]
  delta_flat = phi.T @ alpha.astype(phi.dtype)
  delta = unravel(jnp.asarray(delta_flat, flat_like.dtype))
  if problem.mesh is not None:
    delta = parallel.replicate(delta, problem.mesh)
  value = problem.lam * float(r @ alpha) if problem.lam > 0 else objective(problem, delta)
  return Solution(delta, value, 0, [], [value], True)


def solve(problem: Problem, method: str = "cg", **kwargs: Any) -> Solution:
  """The exact minimiser by `method` ("cg" or "kernel")."""
  if method == "cg":
    return cg(problem, **kwargs)
  if method == "kernel":
    return kernel_solve(problem, **kwargs)
  raise UserError(f"unknown solver {method!r}: use one of {', '.join(SOLVERS)}")
