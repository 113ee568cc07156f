"""Independent reference computations for the exact solvers' tests."""

import jax
from jax.flatten_util import ravel_pytree
import numpy as np

from lqf import objective, optim


def dense_optimum(problem):
  """δ* of a `lqf.solve.Problem` from its explicit normal equations: every term's
  Jacobian by `jax.jacfwd`, then one dense solve."""
  flat, unravel = ravel_pytree(problem.like)
  a, b = problem.lam * np.eye(flat.size), np.zeros(flat.size)
  for term in problem.terms:
    f = lambda v, term=term: term.outputs(unravel(v), problem.state, term.inputs)
    jac, g0 = np.asarray(jax.jacfwd(f)(flat)), np.asarray(f(flat))
    s = term.weight / len(term.sample_weights) * np.asarray(term.sample_weights)
    a += np.einsum("n,ncp,ncq->pq", s, jac, jac)
    b += np.einsum("n,ncp,nc->p", s, jac, np.asarray(term.targets) - g0)
  return np.linalg.solve(a, b)


def flat(tree):
  return np.asarray(ravel_pytree(tree)[0])


def linearized(net):
  """`(δ, state, h) -> net(w0, h) + J δ` for `net(w, h)`, by one `jax.jvp` around
  `state["w0"]`: a tiny stand-in for `lqf.linearize`."""
  def outputs(delta, state, h):
    y0, jd = jax.jvp(lambda w: net(w, h), (state["w0"],), (delta,))
    return y0 + jd
  return outputs


def assert_solvers_match_dense(problem):
  """Both exact solvers of `lqf.solve` reach the dense optimum (float64, rtol 1e-8);
  returns that optimum."""
  from lqf import solve  # pylint: disable=g-import-not-at-top
  want = dense_optimum(problem)
  for method, kw in (("kernel", {}), ("cg", {"tol": 1e-12, "max_iters": 500})):
    sol = solve.solve(problem, method, **kw)
    np.testing.assert_allclose(flat(sol.delta), want, rtol=1e-8, atol=1e-10)
  return want


def kfac_initialised(lin, h, y, lam=1e-3):
  """kfac-jax K-FAC for the squared loss of the linearized model `lin` on prefix features
  `h` and labels `y` (one full batch), initialised at δ = 0: its blocks can be read."""
  loss = objective.make_loss(lin.apply, loss="mse", k=5.0, lam=lam)
  o = dict(optimizer="kfac", lr=1.0, momentum=0.0, steps=1, batch_size=len(y),
           curvature="once", inverse_every=1, adaptive=True, damping=1e-3, burnin_steps=1,
           lam=lam)
  opt = optim.make_kfac(loss, o)
  opt.init(lin.zeros(), jax.random.key(0), (h, y), func_state=lin.state)
  return opt
