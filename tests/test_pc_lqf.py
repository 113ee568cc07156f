"""The PC term of the LQF objective and the exact trade-off path, on tiny problems."""

import collections

import dense
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from lqf import linearize, optim, solve
from lqf.errors import UserError
from lqf.models.classifier import build_classifier
from pc import lqf_term

N, D, H, C = 12, 5, 4, 3
K, LAM = 2.0, 0.03


def _mlp(w, h):
  return jnp.tanh(h @ w["l1"]["kernel"] + w["l1"]["bias"]) @ w["l2"]["kernel"] + w["l2"]["bias"]


_outputs = dense.linearized(_mlp)


@pytest.fixture
def tiny():
  """A linearized MLP in float64, labels, old logits and the PC pieces."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    w0 = {"l1": {"kernel": rng.normal(size=(D, H)) / np.sqrt(D), "bias": rng.normal(size=H)},
          "l2": {"kernel": rng.normal(size=(H, C)) / np.sqrt(H), "bias": rng.normal(size=C)}}
    state = {"w0": jax.tree.map(jnp.asarray, w0)}
    h = jnp.asarray(rng.normal(size=(N, D)))
    labels = np.arange(N) % C
    old_logits = rng.normal(size=(N, C)) * 2 + 3 * np.eye(C)[labels]
    old_logits[:3] = -old_logits[:3]  # Some examples the old model gets wrong.
    targets, _ = lqf_term.old_targets(old_logits, labels, k=K, mode="affine")
    weights = lqf_term.pc_weights(old_logits, labels, alpha=0.0, beta=1.0)
    like = jax.tree.map(jnp.zeros_like, state["w0"])
    yield dict(state=state, h=h, labels=labels, targets=jnp.asarray(targets, jnp.float64),
               weights=jnp.asarray(weights, jnp.float64), like=like, old=old_logits)


def _problem(t, rho, lam=LAM):
  return lqf_term.pc_problem(_outputs, t["state"], t["like"], t["h"], t["labels"], C,
                             t["targets"], t["weights"], k=K, lam=lam, rho=rho, batch_size=5)


def test_pc_weights_are_alpha_plus_beta_where_old_is_right(tiny):
  w = lqf_term.pc_weights(tiny["old"], tiny["labels"], alpha=0.5, beta=2.0)
  right = [int(np.argmax(tiny["old"][i]) == tiny["labels"][i]) for i in range(N)]
  np.testing.assert_allclose(w, [0.5 + 2.0 * r for r in right])
  assert 0 < sum(right) < N


def test_affine_targets_are_the_least_squares_fit(tiny):
  t, ab = lqf_term.old_targets(tiny["old"], tiny["labels"], k=K, mode="affine")
  y = K * np.eye(C)[tiny["labels"]]
  resid = (y - t).ravel()
  # The residual of a least-squares fit is orthogonal to both regressors.
  assert abs(resid @ tiny["old"].ravel()) < 1e-3 * np.abs(tiny["old"]).sum()
  assert abs(resid.sum()) < 1e-3 * N * C
  assert ab["a"] > 0
  np.testing.assert_array_equal(np.argmax(t, -1), np.argmax(tiny["old"], -1))
  same, _ = lqf_term.old_targets(tiny["old"], tiny["labels"], k=K, mode="logits")
  np.testing.assert_allclose(same, tiny["old"], rtol=1e-6)


def test_affine_targets_refuse_logits_unrelated_to_the_labels(tiny):
  with pytest.raises(UserError, match="not positively related"):
    lqf_term.old_targets(-tiny["old"] * 10, tiny["labels"], k=K, mode="affine")
  with pytest.raises(UserError, match="unknown PC target"):
    lqf_term.old_targets(tiny["old"], tiny["labels"], k=K, mode="softmax")


def test_pc_objective_is_quadratic_with_a_constant_psd_hessian(tiny):
  with jax.enable_x64(True):
    problem = _problem(tiny, 0.6)
    flat, unravel = ravel_pytree(problem.like)

    def total(v):  # L_ρ written out term by term, in jnp.
      out = 0.0
      for term in problem.terms:
        r = term.outputs(unravel(v), problem.state, term.inputs) - term.targets
        out += term.weight * jnp.mean(term.sample_weights * jnp.sum(r ** 2, -1))
      return out + problem.lam * jnp.sum(v ** 2)

    rng = np.random.default_rng(3)
    h1 = np.asarray(jax.hessian(total)(jnp.asarray(rng.normal(size=flat.size))))
    h2 = np.asarray(jax.hessian(total)(jnp.asarray(rng.normal(size=flat.size) * 10)))
    np.testing.assert_allclose(h1, h2, rtol=1e-10, atol=1e-10)
    assert np.linalg.eigvalsh(h1).min() >= 2 * LAM * (1 - 1e-9)
    for v in rng.normal(size=(3, flat.size)):
      assert float(total(jnp.asarray(v))) == pytest.approx(
          solve.objective(problem, unravel(jnp.asarray(v))), rel=1e-10)


@pytest.mark.parametrize("rho", [0.0, 0.4, 1.0])
def test_exact_solvers_match_a_dense_solve(tiny, rho):
  with jax.enable_x64(True):
    problem = _problem(tiny, rho)
    dense.assert_solvers_match_dense(problem)


@pytest.mark.parametrize("rho", [0.0, 0.25, 0.7, 1.0])
def test_path_solution_is_the_exact_optimum(tiny, rho):
  with jax.enable_x64(True):
    problem = _problem(tiny, rho)
    path = solve.KernelPath.build(_problem(tiny, 0.5))
    sol = path.at_share(rho)
    delta, value = sol.delta, sol.objective
    # One Jacobian for both terms: the PC term shares the data term's rows.
    np.testing.assert_allclose(dense.flat(delta), dense.dense_optimum(problem), rtol=1e-4,
                               atol=1e-5)
    assert value == pytest.approx(solve.objective(problem, delta), rel=1e-4)


def test_path_end_points_are_plain_lqf_and_the_fully_constrained_problem(tiny):
  with jax.enable_x64(True):
    path = solve.KernelPath.build(_problem(tiny, 0.0))
    assert len(path.g0) == 1 and solve.kernel_rows(path.problem) == len(tiny["labels"]) * C
    plain = solve.mse_problem(_outputs, tiny["state"], tiny["like"], tiny["h"],
                              tiny["labels"], C, k=K, lam=LAM)
    np.testing.assert_allclose(dense.flat(path.at_share(0.0).delta), dense.dense_optimum(plain),
                               rtol=1e-4, atol=1e-5)
    only_pc = solve.Problem((solve.Term(_outputs, tiny["h"], tiny["targets"],
                                        tiny["weights"]),), tiny["state"], tiny["like"], LAM)
    np.testing.assert_allclose(dense.flat(path.at_share(1.0).delta), dense.dense_optimum(only_pc),
                               rtol=1e-4, atol=1e-5)


def test_merged_objective_differs_from_the_two_terms_by_a_constant(tiny):
  with jax.enable_x64(True):
    problem = _problem(tiny, 0.35)
    obj = lqf_term.make_objective(_outputs, k=K, lam=LAM, rho=0.35)
    batch = (tiny["h"], jnp.asarray(tiny["labels"]), tiny["targets"], tiny["weights"])
    rng = np.random.default_rng(5)
    flat, unravel = ravel_pytree(problem.like)
    gaps = []
    for scale in (0.0, 1.0, 5.0):
      d = unravel(jnp.asarray(rng.normal(size=flat.size) * scale))
      gaps.append(solve.objective(problem, d) - float(obj(d, tiny["state"], batch)))
    np.testing.assert_allclose(gaps, gaps[0], atol=1e-9)


def test_rho_outside_the_unit_interval_is_refused(tiny):
  with pytest.raises(UserError, match="rho must be in"):
    _problem(tiny, 1.5)


def test_kfac_sees_kronecker_blocks_with_the_pc_term():
  clf = build_classifier(dict(arch="cifar", depth=8, width=4, activation="leaky_relu",
                                    leaky_slope=0.1), C, 1, seed=0)
  lin = linearize.linearize(clf.split_at, clf.params, clf.batch_stats, "all",
                            select=clf.linearizable)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(N, 6, 6, 1)), jnp.float32)
  labels = jnp.arange(N) % C
  batch = (x, labels, jnp.ones((N, C)), jnp.ones(N))
  loss = lqf_term.make_objective(lin.apply, k=K, lam=1e-3, rho=0.5)
  o = dict(optimizer="kfac", lr=1.0, momentum=0.0, steps=1, batch_size=N, curvature="once",
           inverse_every=1, adaptive=True, damping=1e-3, burnin_steps=1)
  opt = optim.make_kfac(loss, dict(o, lam=1e-3))
  opt.init(lin.zeros(), jax.random.key(0), batch, func_state=lin.state)
  kinds = collections.Counter(type(b).__name__ for b in optim.kfac_blocks(opt))
  kernels = [p for p, _ in jax.tree_util.tree_flatten_with_path(lin.state["w0"])[0]
             if getattr(p[-1], "key", None) == "kernel"]
  kron = kinds["Conv2DTwoKroneckerFactored"] + kinds["DenseTwoKroneckerFactored"]
  assert kron == len(kernels), kinds
