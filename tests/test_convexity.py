"""Convexity tools against explicit Hessians, and the shape of both objectives."""

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from lqf import convexity, linearize, objective, solve
from lqf.models.classifier import build_classifier

MODEL = dict(arch="cifar", depth=8, width=2, activation="leaky_relu", leaky_slope=0.1)


@pytest.fixture(scope="module")
def setup():
  clf = build_classifier(MODEL, 3, 1, seed=0)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(12, 6, 6, 1)), jnp.float32)
  labels = jnp.asarray(np.arange(12) % 3)
  lin = linearize.linearize(clf.split_at, clf.params, clf.batch_stats, "head",
                            select=clf.linearizable)
  h = linearize.prefix_features(lin, x)
  lq = objective.make_loss(lin.apply, loss="mse", k=2.0, lam=1e-2)
  nl = objective.make_nonlinear_loss(lin.nonlinear, loss="mse", k=2.0, lam=1e-2)
  return lin, h, labels, (lambda d: lq(d, lin.state, (h, labels))), \
      (lambda d: nl(d, lin.state, (h, labels)))


def test_lanczos_matches_eigvalsh_of_an_explicit_matrix():
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.normal(size=(40, 40)))
  eig = np.concatenate([[-3.0], np.linspace(0.1, 2.0, 38), [50.0]])
  mat = (q * eig) @ q.T
  like = {"a": jnp.zeros((30,)), "b": jnp.zeros((2, 5))}
  _, unravel = ravel_pytree(like)
  mv = lambda v: unravel(jnp.asarray(mat, jnp.float32) @ ravel_pytree(v)[0])
  spec = convexity.lanczos(mv, like, num_iters=40)
  np.testing.assert_allclose(spec.ritz_values, np.linalg.eigvalsh(mat), rtol=1e-4, atol=1e-4)
  few = convexity.lanczos(mv, like, num_iters=20)
  assert few.largest == pytest.approx(50.0, rel=1e-4)  # Extremes converge first.
  assert few.smallest == pytest.approx(-3.0, rel=1e-3)


def test_hvp_and_lanczos_on_an_explicit_hessian(setup):
  lin, _, _, lq, nl = setup
  flat, unravel = ravel_pytree(lin.zeros())
  for loss in (lq, nl):
    at = unravel(0.1 * jnp.ones_like(flat))
    hess = np.asarray(jax.hessian(lambda v: loss(unravel(v)))(ravel_pytree(at)[0]))
    v = np.random.default_rng(2).normal(size=flat.size).astype(np.float32)
    np.testing.assert_allclose(ravel_pytree(convexity.hvp(loss, at, unravel(v)))[0],
                               hess @ v, rtol=1e-3, atol=1e-4)
    spec = convexity.lanczos(lambda u: convexity.hvp(loss, at, u), at, num_iters=flat.size)
    eig = np.linalg.eigvalsh(hess.astype(np.float64))
    np.testing.assert_allclose(spec.ritz_values[[0, -1]], eig[[0, -1]], rtol=1e-3, atol=1e-4)
    assert spec.smallest > 0  # The ridge makes both strictly convex in the head alone.


def test_linearized_hessian_is_twice_the_gauss_newton_matrix(setup):
  lin, h, labels, lq, _ = setup
  problem = solve.mse_problem(lin.apply, lin.state, lin.zeros(), h, labels, 3, k=2.0,
                              lam=1e-2)
  v = convexity.random_direction(lin.zeros(), 3)
  got = ravel_pytree(convexity.hvp(lq, lin.zeros(), v))[0]
  np.testing.assert_allclose(got, 2 * ravel_pytree(solve.matvec(problem, v))[0],
                             rtol=1e-4, atol=1e-5)


def test_linearized_hessian_is_constant_and_psd_nonlinear_is_not_constant():
  clf = build_classifier(MODEL, 3, 1, seed=0)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(12, 6, 6, 1)), jnp.float32)
  labels = jnp.asarray(np.arange(12) % 3)
  lin = linearize.linearize(clf.split_at, clf.params, clf.batch_stats, "all",
                            select=clf.linearizable)
  lq = objective.make_loss(lin.apply, loss="mse", k=2.0, lam=0.0)
  nl = objective.make_nonlinear_loss(lin.nonlinear, loss="mse", k=2.0, lam=0.0)
  lq1 = lambda d: lq(d, lin.state, (x, labels))
  nl1 = lambda d: nl(d, lin.state, (x, labels))
  far = convexity.random_direction(lin.zeros(), 5, reference=lin.state["w0"])
  v = convexity.random_direction(lin.zeros(), 6)
  assert convexity.hessian_change(lq1, lin.zeros(), far, v) < 1e-4
  assert convexity.hessian_change(nl1, lin.zeros(), far, v) > 1e-2
  # Positive semi-definite: vᵀHv ≥ 0 in random directions, at any δ.
  for seed in range(3):
    u = convexity.random_direction(lin.zeros(), 10 + seed)
    assert float(jnp.vdot(ravel_pytree(u)[0], ravel_pytree(convexity.hvp(lq1, far, u))[0])) > 0


def test_slices_quadratic_for_linearized(setup):
  lin, _, _, lq, nl = setup
  d1 = convexity.random_direction(lin.zeros(), 7)
  d2 = convexity.random_direction(lin.zeros(), 8)
  alphas = np.linspace(-2, 2, 9)
  values = convexity.slice_1d(lq, lin.zeros(), d1, alphas)
  curv = convexity.curvature_along(values, alphas)
  np.testing.assert_allclose(curv, curv.mean(), rtol=1e-3)  # A parabola.
  # The curvature of a parabola along d is dᵀ∇²L d.
  expected = float(jnp.vdot(ravel_pytree(d1)[0], ravel_pytree(convexity.hvp(lq, lin.zeros(), d1))[0]))
  assert curv.mean() == pytest.approx(expected, rel=1e-3)
  betas = [0.0, 0.5, 1.0, 1.5]
  grid = convexity.slice_2d(lq, lin.zeros(), d1, d2, alphas[:3], betas)
  assert grid.shape == (3, 4)
  np.testing.assert_allclose(grid[:, 0], values[:3], rtol=1e-5)
  assert grid[1, 2] == pytest.approx(
      float(lq(jax.tree.map(lambda a, b: alphas[1] * a + betas[2] * b, d1, d2))), rel=1e-5)
  # At δ = 0 the two objectives agree in value (and the nonlinear one is not a parabola).
  assert float(nl(lin.zeros())) == pytest.approx(float(lq(lin.zeros())), rel=1e-6)


def test_random_direction_layer_normalisation(setup):
  lin = setup[0]
  d = convexity.random_direction(lin.zeros(), 9, reference=lin.state["w0"])
  for a, r in zip(jax.tree.leaves(d), jax.tree.leaves(lin.state["w0"])):
    assert float(jnp.linalg.norm(a)) == pytest.approx(float(jnp.linalg.norm(r)), rel=1e-5)
