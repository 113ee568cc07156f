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
  δ* = Jᵀ(K + NλI)⁻¹ r with the empirical tangent kernel K = JJᵀ. Its memory is the
  (Σ N_t C_t)² float64 system plus, when it fits, the Jacobian; otherwise two row blocks
  of it at a time, recomputed (`KernelPath`), so it is for up to ~10⁴ rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import dataclasses
import functools
import math
import time
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
import lqf.objective as objective_lib
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
  targets = objective_lib.scaled_one_hot(labels, num_classes, k)
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


def gram_of_blocks(blocks: Sequence[Callable[[], np.ndarray]], sizes: Sequence[int]
                   ) -> np.ndarray:
  """G Gᵀ in float64 from G's row blocks: `blocks[a]()` returns rows [sizes[a], P].

  Two blocks are in memory at a time, converted to float64 (a float32 product's
  rounding, relative 1e-7 of the largest entries, can exceed a small ridge and make
  K + λI indefinite). Block a is asked for a + 1 times: when the functions recompute
  their blocks from the network, the kernel costs (B + 1)/2 Jacobian passes for B blocks
  and never holds G.
  """
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
  out = np.empty((offsets[-1], offsets[-1]), np.float64)
  for a, block_a in enumerate(blocks):
    rows_a = np.asarray(block_a(), np.float64)
    sa = slice(offsets[a], offsets[a + 1])
    for b in range(a + 1):
      rows_b = rows_a if b == a else np.asarray(blocks[b](), np.float64)
      sb = slice(offsets[b], offsets[b + 1])
      out[sa, sb] = rows_a @ rows_b.T
      out[sb, sa] = out[sa, sb].T
  return out


# Rows a block of a held Jacobian has (the float64 copies of two cost 2·512·P doubles).
_HELD_BLOCK = 512


def _row_slices(rows: np.ndarray, block: int) -> tuple[list[Callable[[], np.ndarray]],
                                                          list[int]]:
  """`rows` [R, P] as `gram_of_blocks`'s (blocks, sizes): slices of `block` rows."""
  starts = range(0, len(rows), block)
  return ([functools.partial(lambda i: rows[i:i + block], i) for i in starts],
          [min(block, len(rows) - i) for i in starts])


def gram(rows: np.ndarray, block: int = _HELD_BLOCK) -> np.ndarray:
  """rows @ rowsᵀ accumulated in float64, a pair of row blocks at a time: [R, P] ->
  [R, R] (`gram_of_blocks` over slices of `rows`)."""
  return gram_of_blocks(*_row_slices(rows, block))


def kernel_bytes(rows: int, params: int, itemsize: int = 4) -> int:
  """Bytes of the rows × params Jacobian, when the kernel path holds it."""
  return rows * params * itemsize


def _system_bytes(rows: int) -> int:
  # The float64 kernel, its scaled and shifted copy, and the Cholesky factor.
  return 3 * rows * rows * 8


def kernel_block_rows(rows: int, params: int, max_bytes: float, *, outputs: int = 1,
                      itemsize: int = 4, what: str = "the kernel solve",
                      limit: str = "solve.max_gb") -> int:
  """The Jacobian rows the kernel path holds at a time within `max_bytes`: all `rows`
  when the whole Jacobian fits beside the R × R system, else the most that two float64
  blocks (and their float32 originals) may take, a multiple of `outputs` (one example's
  rows). Refuses, before any work, a system that leaves no room for one example's rows.
  This is the kernel path's one memory check."""
  system = _system_bytes(rows)
  per_row = params * (2 * 8 + 2 * itemsize)  # Two float64 blocks, two float32 ones.
  held_blocks = 2 * min(rows, _HELD_BLOCK) * params * 8
  if system + kernel_bytes(rows, params, itemsize) + held_blocks <= max_bytes:
    return rows
  block = int((max_bytes - system) // per_row) // outputs * outputs
  if block < outputs:
    raise UserError(
        f"{what} needs the {rows} × {rows} kernel system ({system / 1e9:.2f} GB) and "
        f"Jacobian blocks of at least one example's {outputs} × {params} rows "
        f"({outputs * per_row / 1e9:.2f} GB), more than the {max_bytes / 1e9:.2f} GB "
        f"allowed ({limit}): use --config.solve.method=cg, which needs memory for one "
        "batch only, fewer training examples or a smaller lqf.scope")
  return block


def check_kernel_memory(rows: int, params: int, max_bytes: float, *, outputs: int = 1,
                        itemsize: int = 4, what: str = "the kernel solve",
                        limit: str = "solve.max_gb") -> None:
  """Refuses, before any work, a kernel path that cannot fit in `max_bytes`
  (`kernel_block_rows`)."""
  kernel_block_rows(rows, params, max_bytes, outputs=outputs, itemsize=itemsize, what=what,
                    limit=limit)


def linearized_size(params: PyTree, scope: str, *, select: Callable[..., PyTree],
                    batch_norm: bool = False) -> int:
  """P: the number of weights `scope` linearizes (the Jacobian's columns), as `select`
  (a classifier's `linearizable`) chooses them."""
  part = select(params, scope, batch_norm)
  return sum(np.size(l) for l in jax.tree.leaves(part))


def kernel_rows(problem: Problem) -> int:
  """The Jacobian rows the kernel path needs: Σ N·C over the distinct (outputs, inputs)
  of the terms (terms that share both share their rows)."""
  return sum(len(g[0].inputs) * g[0].targets.shape[-1] for g in _groups(problem.terms))


def _groups(terms: tuple[Term, ...]) -> list[list[Term]]:
  """Terms grouped by the (outputs, inputs) they read: one Jacobian per group."""
  groups: dict[tuple[int, int], list[Term]] = {}
  for t in terms:
    groups.setdefault((id(t.outputs), id(t.inputs)), []).append(t)
  return list(groups.values())


@dataclasses.dataclass
class KernelPath:
  """The exact optimum of every problem that differs from `problem` only in its term
  weights a_t, from one float64 kernel.

  Terms that read the same outputs of the same inputs share Jacobian rows G_i; per
  example they merge into one weighted squared error (c_ti = a_t w_ti / N_t):

      Σ_t c_ti ‖g_i − y_ti‖² = s_i ‖g_i − m_i‖² + const,   s_i = Σ_t c_ti,
      m_i = Σ_t c_ti y_ti / s_i,   const = Σ_t c_ti ‖y_ti‖² − s_i ‖m_i‖².

  With D = diag(√s_i) (repeated over the outputs), r = D (m − g(0)) and the kernel
  K = G Gᵀ (accumulated in float64 a pair of row blocks at a time, `gram_of_blocks`):

      δ* = Gᵀ D (D K D + λI)⁻¹ r,     L* = λ rᵀ (D K D + λI)⁻¹ r + const.

  Memory is bounded by `max_bytes` (`kernel_block_rows`): the Jacobian G is held when it
  fits beside the (Σ N C)² system, and otherwise never formed: its row blocks are
  recomputed from the network for each kernel tile ((B + 1)/2 Jacobian passes for B
  blocks) and once more for each `solve`'s Gᵀ(Dα). Each `solve` is one Cholesky
  factorisation. LQF's own problem is one group of one term; the PC term shares LQF's
  rows (one group, two terms); the BCT term reads other outputs (two groups).
  """
  problem: Problem
  blocks: list[Callable[[], np.ndarray]]  # G's row blocks [R_a, P], in row order
  g0: list[np.ndarray]        # per group, [N_g, C_g]
  kernel: np.ndarray          # [R, R] float64, R = Σ N_g·C_g
  unravel: Callable[[jax.Array], PyTree]
  seconds: float              # building the kernel
  held: bool                  # whether G is held (else its blocks are recomputed)

  @classmethod
  def build(cls, problem: Problem, *, max_bytes: float = 4e9) -> "KernelPath":
    flat_like, unravel = ravel_pytree(problem.like)
    p, rows = flat_like.size, kernel_rows(problem)
    groups = _groups(problem.terms)
    outputs = math.lcm(*(g[0].targets.shape[-1] for g in groups))
    block_rows = kernel_block_rows(rows, p, max_bytes, outputs=outputs,
                                   itemsize=flat_like.dtype.itemsize)
    t0 = time.perf_counter()
    # Not split over a mesh: with the batch sharded, XLA (jax 0.9.1, CPU) returned wrong
    # per-example Jacobian rows from this vmap of jacrev, and so did a shard_map of it
    # (tests/test_parallel.py compares against one device).
    like, state = (problem.like, problem.state) if problem.mesh is None else \
        parallel.to_host((problem.like, problem.state))
    held = block_rows >= rows
    blocks, sizes, g0 = [], [], []
    for group in groups:
      t = group[0]
      c = t.targets.shape[-1]
      if held:
        jac, out = jacobian(t.outputs, like, state, t.inputs, batch_size=problem.batch_size)
        new_blocks, new_sizes = _row_slices(jac.reshape(-1, p), _HELD_BLOCK)
        blocks += new_blocks
        sizes += new_sizes
        g0.append(out)
        continue
      images = block_rows // c
      batch = min(problem.batch_size, images)
      for i in range(0, len(t.inputs), images):
        h = t.inputs[i:i + images]
        blocks.append(functools.partial(
            lambda t, h, b: jacobian(t.outputs, like, state, h,
                                     batch_size=b)[0].reshape(-1, p), t, h, batch))
        sizes.append(len(h) * c)
      g0.append(np.concatenate([np.asarray(t.outputs(like, state, t.inputs[i:i + batch]))
                                for i in range(0, len(t.inputs), batch)]))
    kernel = gram_of_blocks(blocks, sizes)
    return cls(problem, blocks, g0, kernel, unravel, time.perf_counter() - t0, held)

  def transpose_product(self, coef: np.ndarray) -> np.ndarray:
    """Gᵀ coef in float64, a row block at a time: [R] -> [P]."""
    out, start = None, 0
    for block in self.blocks:
      rows = np.asarray(block(), np.float64)
      part = rows.T @ coef[start:start + len(rows)]
      out = part if out is None else out + part
      start += len(rows)
    return out

  def solve(self, weights: Sequence[float] | None = None) -> Solution:
    """The exact optimum with term weights `weights` (default: the problem's own)."""
    terms = self.problem.terms
    weights = [t.weight for t in terms] if weights is None else [float(w) for w in weights]
    if len(weights) != len(terms) or min(weights) < 0:
      raise UserError(f"give one non-negative weight per term ({len(terms)}), got {weights}")
    by_term = {id(t): a for t, a in zip(terms, weights)}
    d, r, const = [], [], 0.0
    for group, g0 in zip(_groups(terms), self.g0):
      n_out = g0.shape[-1]
      s = np.zeros(len(g0))
      sm = np.zeros(g0.shape)
      for t in group:
        c = by_term[id(t)] * np.asarray(t.sample_weights, np.float64) / len(t.sample_weights)
        y = np.asarray(t.targets, np.float64)
        s += c
        sm += c[:, None] * y
        const += float(c @ np.sum(y ** 2, -1))
      m = np.where(s[:, None] > 0, sm / np.where(s > 0, s, 1.0)[:, None], 0.0)
      const -= float(s @ np.sum(m ** 2, -1))
      root = np.repeat(np.sqrt(s), n_out)
      d.append(root)
      r.append(root * (m - g0).reshape(-1))
    d, r = np.concatenate(d), np.concatenate(r)
    lam = self.problem.lam
    system = d[:, None] * self.kernel * d[None, :]
    if lam > 0:
      system[np.diag_indices_from(system)] += lam
      alpha = scipy.linalg.cho_solve(scipy.linalg.cho_factor(system, overwrite_a=True), r)
    else:  # Minimum-norm interpolation.
      alpha = np.linalg.lstsq(system, r, rcond=None)[0]
    del system
    delta_flat = self.transpose_product(d * alpha)
    dtype = ravel_pytree(self.problem.like)[0].dtype
    delta = self.unravel(jnp.asarray(delta_flat, dtype))
    if self.problem.mesh is not None:
      delta = parallel.replicate(delta, self.problem.mesh)
    value = lam * float(r @ alpha) + const if lam > 0 else \
        objective(dataclasses.replace(self.problem, terms=tuple(
            t._replace(weight=a) for t, a in zip(terms, weights))), delta)
    return Solution(delta, value, 0, [], [value], True)

  def at_share(self, rho: float) -> Solution:
    """For a two-term problem (LQF's data term, one wish): the optimum at weights
    (1 − ρ, ρ). ρ = 0 is plain LQF, ρ = 1 the wish alone with the ridge."""
    if len(self.problem.terms) != 2:
      raise UserError(f"a share needs a two-term problem, this one has "
                      f"{len(self.problem.terms)} terms")
    if not 0.0 <= rho <= 1.0:
      raise UserError(f"the share rho must be in [0, 1], got {rho}")
    return self.solve((1.0 - rho, rho))


def curve(path: KernelPath, rhos: Sequence[float],
          evaluate: Callable[[PyTree], dict[str, float]]) -> list[dict[str, float]]:
  """For each share ρ, the exact optimum's objective, solve time and `evaluate(δ*_ρ)`."""
  points = []
  for rho in rhos:
    t0 = time.perf_counter()
    sol = path.at_share(float(rho))
    points.append({"rho": float(rho), "objective": sol.objective,
                   "solve_seconds": time.perf_counter() - t0, **evaluate(sol.delta)})
  return points


def kernel_solve(problem: Problem, *, max_bytes: float = 4e9) -> Solution:
  """δ* = Φᵀ(ΦΦᵀ + λI)⁻¹ r (module docstring): `KernelPath.build(problem).solve()`."""
  return KernelPath.build(problem, max_bytes=max_bytes).solve()


def solve(problem: Problem, method: str = "cg", **kwargs: Any) -> Solution:
  """The exact minimiser by `method` ("cg" or "kernel")."""
  if method == "cg":
    return cg(problem, **kwargs)
  if method == "kernel":
    return kernel_solve(problem, **kwargs)
  raise UserError(f"unknown solver {method!r}: use one of {', '.join(SOLVERS)}")
