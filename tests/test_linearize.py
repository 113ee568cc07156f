"""The linearized network and the LQF objective against independent computations."""

import collections

from dense import kfac_initialised
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from lqf import linearize, objective, optim
from lqf.models.classifier import build_classifier

MODEL = dict(arch="cifar", depth=8, width=2, activation="leaky_relu", leaky_slope=0.1)
N, C, SIZE = 8, 3, 6


@pytest.fixture(scope="module")
def net():
  clf = build_classifier(MODEL, C, 1, seed=0)
  # Non-trivial running statistics, as after pretraining.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, SIZE, SIZE, 1)), jnp.float32)
  _, stats = clf.train_apply(clf.params, clf.batch_stats, x)
  clf.batch_stats = stats
  return clf


@pytest.fixture(scope="module")
def x():
  return jnp.asarray(np.random.default_rng(1).normal(size=(N, SIZE, SIZE, 1)), jnp.float32)


def _random_like(tree, seed, scale=1.0):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, l.shape, l.dtype)
                                      for k, l in zip(keys, leaves)])


@pytest.mark.parametrize("scope", ["all", "last_stage", "head"])
def test_f_lin_at_zero_is_the_network(net, x, scope):
  lin = linearize.linearize(net.split_at, net.params, net.batch_stats, scope,
                            select=net.linearizable)
  h = linearize.prefix_features(lin, x)
  np.testing.assert_allclose(lin.apply(lin.zeros(), lin.state, h),
                             net.apply(net.params, net.batch_stats, x), rtol=1e-5, atol=1e-5)


def test_f_lin_equals_f0_plus_explicit_jacobian(net, x):
  lin = linearize.linearize(net.split_at, net.params, net.batch_stats, "all",
                            select=net.linearizable)
  flat_w0, unravel = ravel_pytree(lin.state["w0"])
  f = lambda w: lin.nonlinear(unravel(w), lin.state, x).ravel()
  # J column by column: one forward-mode product per parameter.
  eye = jnp.eye(flat_w0.size, dtype=flat_w0.dtype)
  jac = jax.vmap(lambda e: jax.jvp(f, (flat_w0,), (e,))[1], out_axes=1)(eye)
  delta = _random_like(lin.state["w0"], 2, 0.01)
  expected = f(flat_w0) + jac @ ravel_pytree(delta)[0]
  got = lin.apply(delta, lin.state, x).ravel()
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_f_lin_is_affine_in_delta(net, x):
  lin = linearize.linearize(net.split_at, net.params, net.batch_stats, "all",
                            select=net.linearizable)
  d1, d2 = _random_like(lin.state["w0"], 3, 0.1), _random_like(lin.state["w0"], 4, 0.1)
  f0 = lin.apply(lin.zeros(), lin.state, x)
  g = lambda d: lin.apply(d, lin.state, x) - f0
  combo = jax.tree.map(lambda a, b: 2.0 * a - 3.0 * b, d1, d2)
  np.testing.assert_allclose(g(combo), 2.0 * g(d1) - 3.0 * g(d2), rtol=1e-4, atol=1e-4)


def test_linearization_error_is_second_order(net, x):
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), net.params)
    s64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), net.batch_stats)
    lin = linearize.linearize(net.split_at, p64, s64, "all", select=net.linearizable)
    x64 = jnp.asarray(x, jnp.float64)
    delta = _random_like(lin.state["w0"], 5)
    delta = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), delta)

    def err(eps):
      d = jax.tree.map(lambda a: eps * a, delta)
      w = jax.tree.map(jnp.add, lin.state["w0"], d)
      return float(jnp.linalg.norm(lin.nonlinear(w, lin.state, x64) - lin.apply(d, lin.state, x64)))

    # Small enough that no leaky-ReLU unit changes side (a kink is first order).
    errs = [err(1e-6 / 2 ** i) for i in range(4)]
  ratios = np.array(errs[:-1]) / np.array(errs[1:])
  np.testing.assert_allclose(ratios, 4.0, rtol=0.1)  # Halving ε quarters the error.


def test_suffix_linearization_matches_full_linearization_restricted(net, x):
  full = linearize.linearize(net.split_at, net.params, net.batch_stats, "all",
                             select=net.linearizable)
  last = linearize.linearize(net.split_at, net.params, net.batch_stats, "last_stage",
                             select=net.linearizable)
  d_last = _random_like(last.state["w0"], 6, 0.1)
  d_full = linearize.merge(jax.tree.map(jnp.zeros_like, full.state["w0"]), d_last)
  np.testing.assert_allclose(last.apply(d_last, last.state, last.prefix(x)),
                             full.apply(d_full, full.state, x), rtol=1e-4, atol=1e-4)


def test_batch_norm_is_frozen_unless_asked(net):
  keys = lambda t: {"/".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(t)[0]}
  frozen = keys(linearize.linearized_subtree(net.params, "all"))
  with_bn = keys(linearize.linearized_subtree(net.params, "all", batch_norm=True))
  assert frozen and not any("bn" in k for k in frozen)
  assert with_bn == keys(net.params)


def test_objective_hessian_is_constant(net, x):
  lin = linearize.linearize(net.split_at, net.params, net.batch_stats, "all",
                            select=net.linearizable)
  y = jnp.arange(N) % C
  loss = objective.make_loss(lin.apply, loss="mse", k=5.0, lam=1e-3)
  f = lambda d: loss(d, lin.state, (x, y))
  v = _random_like(lin.state["w0"], 7)
  hvp = lambda d: jax.jvp(jax.grad(f), (d,), (v,))[1]
  a, b = ravel_pytree(hvp(lin.zeros()))[0], ravel_pytree(hvp(_random_like(v, 8)))[0]
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(a).max()))


def _kernels(tree):
  return [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
          if getattr(p[-1], "key", None) == "kernel"]


@pytest.mark.parametrize("scope", ["all", "last_stage"])
def test_kfac_gives_every_linearized_kernel_a_kronecker_block(net, x, scope):
  lin = linearize.linearize(net.split_at, net.params, net.batch_stats, scope,
                            select=net.linearizable)
  h = linearize.prefix_features(lin, x)
  y = jnp.arange(N) % C
  opt = kfac_initialised(lin, h, y)
  kinds = collections.Counter(type(b).__name__ for b in optim.kfac_blocks(opt))
  kron = kinds["Conv2DTwoKroneckerFactored"] + kinds["DenseTwoKroneckerFactored"]
  assert kron == len(_kernels(lin.state["w0"])), kinds
  assert kinds["DenseTwoKroneckerFactored"] == 1


def _closed_form(lin, h, y, k, lam):
  flat_w0, unravel = ravel_pytree(lin.state["w0"])
  f = lambda w: lin.nonlinear(unravel(w), lin.state, h).ravel()
  jac = jax.jacfwd(f)(flat_w0)
  f0 = f(flat_w0)
  target = (k * jax.nn.one_hot(y, C)).ravel()
  n = len(y)
  a = jac.T @ jac + n * lam * jnp.eye(flat_w0.size)
  delta = jnp.linalg.solve(a, jac.T @ (target - f0))
  return unravel(delta)


@pytest.mark.parametrize("optimizer", ["kfac", "adam"])
def test_training_reaches_the_closed_form_ridge_solution(net, x, optimizer):
  lin = linearize.linearize(net.split_at, net.params, net.batch_stats, "last_stage",
                            select=net.linearizable)
  h = linearize.prefix_features(lin, x)
  y = jnp.arange(N) % C
  k, lam = 5.0, 1e-1
  loss = objective.make_loss(lin.apply, loss="mse", k=k, lam=lam)
  best = _closed_form(lin, h, y, k, lam)
  o = dict(optimizer=optimizer, lr=0.05, momentum=0.9, steps=300, batch_size=N,
           curvature="ema", inverse_every=1, adaptive=True, damping=1e-3, burnin_steps=1,
           lam=lam)
  delta, history = optim.fit(loss, lin.zeros(), lin.state, h, y, o, seed=0)
  l_best = float(loss(best, lin.state, (h, y)))
  l_got = float(loss(delta, lin.state, (h, y)))
  assert abs(l_got - l_best) <= 1e-3 * l_best
  rel = float(jnp.linalg.norm(ravel_pytree(delta)[0] - ravel_pytree(best)[0]) /
              jnp.linalg.norm(ravel_pytree(best)[0]))
  assert rel < 2e-2


def test_a_diverging_run_stops_with_a_clear_error(net, x):
  from lqf.errors import NonFiniteLossError
  lin = linearize.linearize(net.split_at, net.params, net.batch_stats, "all",
                            select=net.linearizable)
  y = jnp.arange(N) % C
  loss = objective.make_loss(lin.apply, loss="mse", k=5.0, lam=1e-3)
  o = dict(optimizer="sgd", lr=10.0, momentum=0.9, steps=50, batch_size=N)
  with pytest.raises(NonFiniteLossError, match="diverged to|became"):
    optim.fit(loss, lin.zeros(), lin.state, x, y, dict(o, lam=1e-3), seed=0)
