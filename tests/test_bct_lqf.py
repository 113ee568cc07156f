"""The influence term of the LQF objective: quadratic, and solved exactly."""

import dense
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from bct import losses, lqf_term
from lqf import solve

N, D, E, C = 10, 4, 5, 3   # examples, input size, embedding size, classes
K, LAM = 2.0, 0.05


def _joint(w, h):
  """A tiny network's joint output: logits then its embedding, [N, C + E]."""
  e = jnp.tanh(h @ w["body"]["kernel"] + w["body"]["bias"])
  return jnp.concatenate([e @ w["head"]["kernel"] + w["head"]["bias"], e], -1)


_lin = dense.linearized(_joint)


@pytest.fixture
def tiny():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    w0 = {"body": {"kernel": rng.normal(size=(D, E)), "bias": rng.normal(size=E)},
          "head": {"kernel": rng.normal(size=(E, C)), "bias": rng.normal(size=C)}}
    state = {"w0": jax.tree.map(jnp.asarray, w0)}
    h = jnp.asarray(rng.normal(size=(N, D)))
    labels = np.arange(N) % C
    # An old model with a 3-dimensional embedding that scored labels 0 and 2.
    old_feats = rng.normal(size=(N, 3))
    yield dict(state=state, h=h, labels=labels, like=jax.tree.map(jnp.zeros_like, state["w0"]),
               linear=losses.synthesize_head(rng.normal(size=(3, 2)), rng.normal(size=2),
                                             [0, 2], C, old_feats, labels),
               cosine=losses.synthesize_head(rng.normal(size=(3, 2)), rng.normal(size=2),
                                             [0, 2], C, old_feats, labels, scale=3.0))


def _problem(t, rho, head="linear"):
  return lqf_term.bct_problem(_lin, t["state"], t["like"], t["h"], t["labels"], C, t[head],
                              rule="truncate_or_pad", k=K, lam=LAM, rho=rho, batch_size=4)


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_influence_objective_is_quadratic_with_constant_hessian(tiny, head):
  with jax.enable_x64(True):
    problem = _problem(tiny, 0.5, head)
    flat, unravel = ravel_pytree(problem.like)
    total = lambda v: solve.objective(problem, unravel(v))
    hess = lambda v: jax.hessian(lambda u: sum(
        t.weight * jnp.mean(jnp.sum((t.outputs(unravel(u), problem.state, t.inputs)
                                     - t.targets) ** 2, -1)) for t in problem.terms)
        + LAM * jnp.sum(u ** 2))(v)
    rng = np.random.default_rng(1)
    h1 = np.asarray(hess(jnp.asarray(rng.normal(size=flat.size))))
    h2 = np.asarray(hess(jnp.asarray(rng.normal(size=flat.size) * 10)))
    np.testing.assert_allclose(h1, h2, rtol=1e-10, atol=1e-10)
    assert np.linalg.eigvalsh(h1).min() >= 2 * LAM * (1 - 1e-9)
    # At δ = 0 the influence outputs are the old head on the (truncated) embedding.
    zero = jnp.zeros(flat.size)
    e0 = _joint(tiny["state"]["w0"], tiny["h"])[:, C:][:, :3]
    np.testing.assert_allclose(problem.terms[1].outputs(unravel(zero), problem.state,
                                                        tiny["h"]),
                               losses.old_head_logits(e0, tiny[head], "none"), rtol=1e-10)
    assert np.isfinite(total(zero))


@pytest.mark.parametrize("rho", [0.0, 0.5, 1.0])
def test_exact_solvers_and_path_match_a_dense_solve(tiny, rho):
  with jax.enable_x64(True):
    problem = _problem(tiny, rho)
    want = dense.assert_solvers_match_dense(problem)
    path = solve.KernelPath.build(_problem(tiny, 0.5))
    sol = path.at_share(rho)
    delta, value = sol.delta, sol.objective
    np.testing.assert_allclose(dense.flat(delta), want, rtol=1e-4, atol=1e-5)
    assert value == pytest.approx(solve.objective(problem, delta), rel=1e-4)


def test_path_refuses_bad_shares_and_oversized_jacobians(tiny):
  from lqf.errors import UserError
  with jax.enable_x64(True):
    with pytest.raises(UserError, match="more than"):
      solve.KernelPath.build(_problem(tiny, 0.5), max_bytes=10)
    with pytest.raises(UserError, match="rho"):
      _problem(tiny, 1.5)
