"""The pinned stack: kfac-jax 0.0.8 only works beside jax 0.9.1 (it fails inside its
graph tracer on jax >= 0.9.2). If the pins drift into a broken pair, this fails first."""

import importlib.metadata

import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np


def test_pins_match_the_lock_file():
  lock = dict(line.strip().split("==") for line in open("requirements.lock") if "==" in line)
  for name in ("jax", "jaxlib", "kfac-jax", "flax", "optax"):
    assert importlib.metadata.version(name) == lock[name.replace("-", "_") if
                                                    name.replace("-", "_") in lock else name]


def test_kfac_takes_a_step_with_a_kronecker_block():
  x = jax.random.normal(jax.random.key(0), (16, 3))
  y = x @ jnp.array([[1.0], [-2.0], [0.5]])

  def loss(params, batch):
    xb, yb = batch
    pred = xb @ params["w"]
    kfac_jax.register_squared_error_loss(pred, yb)
    return jnp.mean(jnp.sum((pred - yb) ** 2, -1))

  opt = kfac_jax.Optimizer(
      value_and_grad_func=jax.value_and_grad(loss), l2_reg=0.0,
      value_func_has_aux=False, value_func_has_state=False, value_func_has_rng=False,
      use_adaptive_learning_rate=False, use_adaptive_momentum=False,
      use_adaptive_damping=False, learning_rate_schedule=lambda s: 0.5,
      momentum_schedule=lambda s: 0.0, damping_schedule=lambda s: 1e-3,
      multi_device=False, num_burnin_steps=0)
  params = {"w": jnp.zeros((3, 1))}
  rng = jax.random.key(1)
  state = opt.init(params, rng, (x, y))
  before = float(loss(params, (x, y)))
  params, state, _ = opt.step(params, state, rng, batch=(x, y), global_step_int=0)
  assert float(loss(params, (x, y))) < 0.5 * before
  blocks = opt._estimator.blocks  # kfac-jax exposes no public accessor in 0.0.8.
  assert any(isinstance(b, kfac_jax.DenseTwoKroneckerFactored) for b in blocks), blocks
  assert np.isfinite(np.asarray(params["w"])).all()
