"""The exact solvers against a dense solve of the explicit normal equations."""

import dataclasses

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from lqf import linearize, objective, solve
from lqf.errors import UserError
from lqf.models.classifier import build_classifier

D, H, C = 6, 5, 3


def _mlp(w, h):
  return jnp.tanh(h @ w["l1"]["kernel"] + w["l1"]["bias"]) @ w["l2"]["kernel"] + w["l2"]["bias"]


def _outputs(delta, state, h):
  """The MLP linearized around state["w0"]: affine in δ."""
  y0, jd = jax.jvp(lambda w: _mlp(w, h), (state["w0"],), (delta,))
  return y0 + jd


def _other_outputs(delta, state, h):
  """A second term: a fixed linear map of the linearized outputs (like BCT's old head)."""
  return _outputs(delta, state, h) @ state["map"]


def _problem(rng, *, n=(9, 7), lam=0.05, batch_size=4, input_scales=None, d=D, h=H, c=C):
  scales = np.ones(d) if input_scales is None else input_scales
  # Pre-activations of order one whatever the input scales (the tanh is not saturated).
  w0 = {"l1": {"kernel": rng.normal(size=(d, h)) / np.sqrt(np.sum(scales ** 2)),
               "bias": rng.normal(size=h)},
        "l2": {"kernel": rng.normal(size=(h, c)) / np.sqrt(h), "bias": rng.normal(size=c)}}
  state = {"w0": jax.tree.map(jnp.asarray, w0), "map": jnp.asarray(rng.normal(size=(c, 2)))}
  h1, h2 = (jnp.asarray(rng.normal(size=(m, d)) * scales) for m in n)
  terms = (
      solve.Term(_outputs, h1, jnp.asarray(rng.normal(size=(n[0], c))),
                 jnp.asarray(rng.uniform(0.0, 2.0, size=n[0])), 1.0),
      solve.Term(_other_outputs, h2, jnp.asarray(rng.normal(size=(n[1], 2))),
                 jnp.asarray(rng.uniform(0.0, 2.0, size=n[1])), 0.7))
  like = jax.tree.map(jnp.zeros_like, state["w0"])
  return solve.Problem(terms, state, like, lam, batch_size)


def _dense(problem):
  """A, b, c of the normal equations from explicit Jacobians (one jvp per parameter)."""
  flat, unravel = ravel_pytree(problem.like)
  a = problem.lam * np.eye(flat.size)
  b = np.zeros(flat.size)
  c = 0.0
  for t in problem.terms:
    f = lambda v, t=t: t.outputs(unravel(v), problem.state, t.inputs)
    g0 = np.asarray(f(flat))
    jac = np.asarray(jax.jacfwd(f)(flat))  # [N, C, P]
    s = t.weight / len(t.sample_weights) * np.asarray(t.sample_weights)
    resid = np.asarray(t.targets) - g0
    a += np.einsum("i,icp,icq->pq", s, jac, jac)
    b += np.einsum("i,icp,ic->p", s, jac, resid)
    c += float(np.sum(s * np.sum(resid ** 2, -1)))
  return a, b, c, unravel


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def test_normal_equations_and_matvec_match_the_explicit_matrices(x64):
  problem = _problem(np.random.default_rng(0))
  a, b, c, unravel = _dense(problem)
  b_got, c_got = solve.normal_equations(problem)
  np.testing.assert_allclose(ravel_pytree(b_got)[0], b, rtol=1e-10)
  assert c_got == pytest.approx(c, rel=1e-10)
  v = np.random.default_rng(1).normal(size=b.size)
  np.testing.assert_allclose(ravel_pytree(solve.matvec(problem, unravel(v)))[0], a @ v,
                             rtol=1e-10)
  # And L(δ) = δᵀAδ - 2bᵀδ + c is the objective evaluated directly.
  assert solve.objective(problem, unravel(v)) == pytest.approx(v @ a @ v - 2 * b @ v + c,
                                                               rel=1e-10)


@pytest.mark.parametrize("method", ["cg", "kernel"])
def test_solvers_reach_the_dense_optimum(x64, method):
  problem = _problem(np.random.default_rng(2))
  a, b, c, _ = _dense(problem)
  expected = np.linalg.solve(a, b)
  kwargs = {"tol": 1e-12} if method == "cg" else {}
  sol = solve.solve(problem, method, **kwargs)
  got = ravel_pytree(sol.delta)[0]
  assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-8
  assert sol.objective == pytest.approx(c - b @ expected, rel=1e-8)
  assert sol.objective == pytest.approx(solve.objective(problem, sol.delta), rel=1e-8)
  assert sol.converged


def test_kernel_solve_without_ridge_interpolates(x64):
  # Fewer rows (N·C = 6) than parameters (53): λ = 0 has an exact zero-loss fit.
  problem = _problem(np.random.default_rng(3), n=(2, 1), lam=0.0)
  problem = dataclasses.replace(problem, terms=problem.terms[:1])
  sol = solve.kernel_solve(problem)
  assert sol.objective < 1e-16


def test_cg_objectives_decrease_to_the_optimum(x64):
  problem = _problem(np.random.default_rng(4))
  seen = []
  sol = solve.cg(problem, tol=1e-12, callback=lambda j, d, v: seen.append(v))
  assert seen == sol.objectives[1:]
  assert all(x >= y - 1e-12 for x, y in zip(sol.objectives, sol.objectives[1:]))
  # The free objective of the CG recursion equals the objective evaluated directly.
  assert sol.objectives[-1] == pytest.approx(solve.objective(problem, sol.delta), rel=1e-9)
  assert solve.relative_gap(sol.objectives[0], sol.objective) > 0.1


def test_batches_do_not_change_the_answer(x64):
  problem = _problem(np.random.default_rng(5))
  one = solve.cg(dataclasses.replace(problem, batch_size=100), tol=1e-12)
  many = solve.cg(dataclasses.replace(problem, batch_size=2), tol=1e-12)
  np.testing.assert_allclose(ravel_pytree(many.delta)[0], ravel_pytree(one.delta)[0],
                             rtol=1e-8)


def test_kfac_preconditioner_cuts_cg_iterations_on_an_ill_conditioned_problem(x64):
  # Input scales over four decades: the ill-conditioning K-FAC's input factor undoes.
  # (On a 53-parameter problem CG ends in ≤ 53 steps anyway, so this one is wider.)
  d = 30
  problem = _problem(np.random.default_rng(6), n=(256, 1), lam=1e-2, batch_size=128,
                     input_scales=np.logspace(-2, 2, d), d=d, h=40, c=5)
  problem = dataclasses.replace(problem, terms=problem.terms[:1])
  pre = solve.cg(problem, tol=1e-6, max_iters=5000,
                 precondition=solve.kfac_preconditioner(problem, damping=1e-2))
  assert pre.converged
  # Plain CG, given three times as many iterations, has not got there yet.
  plain = solve.cg(problem, tol=1e-6, max_iters=3 * pre.iterations)
  assert not plain.converged, (pre.iterations, plain.iterations)
  assert plain.objective > pre.objective


def test_mse_problem_is_lqf_objective_and_solvers_agree_on_a_resnet(x64):
  clf = build_classifier(dict(arch="cifar", depth=8, width=2, activation="leaky_relu",
                                    leaky_slope=0.1), 3, 1, seed=0)
  f64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)
  x = jnp.asarray(np.random.default_rng(7).normal(size=(10, 6, 6, 1)))
  labels = jnp.asarray(np.arange(10) % 3)
  lin = linearize.linearize(clf.split_at, f64(clf.params), f64(clf.batch_stats), "last_stage",
                            select=clf.linearizable)
  h = linearize.prefix_features(lin, x)
  problem = solve.mse_problem(lin.apply, lin.state, lin.zeros(), h, labels, 3, k=5.0,
                              lam=1e-3, batch_size=4)
  loss = objective.make_loss(lin.apply, loss="mse", k=5.0, lam=1e-3)
  delta = jax.tree.map(lambda l: 0.01 * jnp.ones_like(l), lin.zeros())
  assert solve.objective(problem, delta) == pytest.approx(
      float(loss(delta, lin.state, (h, labels))), rel=1e-10)
  # 30 rows: the Gauss-Newton part has rank ≤ 30, so CG ends in about 31 iterations.
  by_cg = solve.cg(problem, tol=1e-10, max_iters=200)
  by_kernel = solve.kernel_solve(problem)
  assert by_cg.converged and by_cg.iterations <= 60
  assert by_cg.objective == pytest.approx(by_kernel.objective, rel=1e-8)
  assert solve.objective(problem, by_kernel.delta) == pytest.approx(by_kernel.objective,
                                                                    rel=1e-8)
  np.testing.assert_allclose(ravel_pytree(by_cg.delta)[0], ravel_pytree(by_kernel.delta)[0],
                             rtol=1e-5, atol=1e-8)


def test_kernel_solve_refuses_what_does_not_fit_and_unknown_solvers(x64):
  problem = _problem(np.random.default_rng(8))
  with pytest.raises(UserError, match="method=cg"):
    solve.kernel_solve(problem, max_bytes=100)
  with pytest.raises(UserError, match="unknown solver 'lu'"):
    solve.solve(problem, "lu")
  empty = problem.terms[1]._replace(inputs=problem.terms[1].inputs[:0],
                                    targets=problem.terms[1].targets[:0],
                                    sample_weights=problem.terms[1].sample_weights[:0])
  with pytest.raises(UserError, match="term 1 has no examples"):
    dataclasses.replace(problem, terms=(problem.terms[0], empty))
  with pytest.raises(UserError, match="negative sample weights"):
    dataclasses.replace(problem, terms=(problem.terms[0]._replace(
        sample_weights=-problem.terms[0].sample_weights),))
  with pytest.raises(UserError, match="lam"):
    dataclasses.replace(problem, lam=-1.0)


def test_gram_is_the_float64_product_in_any_blocks():
  rng = np.random.default_rng(0)
  rows = rng.normal(size=(37, 50)).astype(np.float32)
  want = rows.astype(np.float64) @ rows.astype(np.float64).T
  for block in (5, 37, 100):
    got = solve.gram(rows, block=block)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-12)


def _block_budget(problem, block_rows):
  """A max_bytes that leaves room for the kernel system and `block_rows`-row blocks, not
  for the whole Jacobian (float64 parameters)."""
  rows, p = solve.kernel_rows(problem), ravel_pytree(problem.like)[0].size
  return 3 * rows * rows * 8 + block_rows * p * (2 * 8 + 2 * 8)


def test_kernel_path_without_the_jacobian_matches_the_held_one_and_the_dense_optimum(
    x64, monkeypatch):
  problem = _problem(np.random.default_rng(9))
  a, b, _, _ = _dense(problem)
  want = np.linalg.solve(a, b)
  held = solve.KernelPath.build(problem)
  assert held.held
  calls = []
  real = solve.jacobian
  monkeypatch.setattr(solve, "jacobian", lambda *a, **k: calls.append(1) or real(*a, **k))
  # Blocks of 6 rows: 2 examples of the 3-output term, 3 of the 2-output one.
  blocked = solve.KernelPath.build(problem, max_bytes=_block_budget(problem, 6))
  assert not blocked.held
  n_blocks = len(blocked.blocks)
  assert n_blocks == -(-9 // 2) + -(-7 // 3)
  assert len(calls) == n_blocks * (n_blocks + 1) // 2  # (B + 1)/2 Jacobian passes.
  np.testing.assert_allclose(blocked.kernel, held.kernel, rtol=1e-12, atol=1e-12)
  for weights in (None, (0.3, 2.0)):
    got, ref = blocked.solve(weights), held.solve(weights)
    np.testing.assert_allclose(ravel_pytree(got.delta)[0], ravel_pytree(ref.delta)[0],
                               rtol=1e-10, atol=1e-12)
    assert got.objective == pytest.approx(ref.objective, rel=1e-10)
  np.testing.assert_allclose(ravel_pytree(blocked.solve().delta)[0], want, rtol=1e-7,
                             atol=1e-9)
  with pytest.raises(UserError, match="at least one example"):
    solve.KernelPath.build(problem, max_bytes=_block_budget(problem, 5))
