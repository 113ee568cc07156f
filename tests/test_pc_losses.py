"""Focal distillation and naive re-weighting against loops and limits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pc import losses

B, C = 16, 5


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, C, B)
  old = rng.normal(size=(B, C)) * 2
  old[: B // 2] += 6 * np.eye(C)[labels[: B // 2]]  # The old model right on half of them.
  new = rng.normal(size=(B, C)) * 2
  return jnp.asarray(new, jnp.float32), jnp.asarray(old, jnp.float32), jnp.asarray(labels)


def _softmax(z):
  e = np.exp(z - z.max())
  return e / e.sum()


@pytest.mark.parametrize("kind", ["kl", "lm"])
def test_focal_distillation_is_the_mean_of_per_sample_products(batch, kind):
  new, old, labels = (np.asarray(a, np.float64) for a in batch)
  alpha, beta, temp = 1.0, 5.0, 3.0
  total = 0.0
  for i in range(B):
    w = alpha + beta * float(np.argmax(old[i]) == labels[i])
    if kind == "kl":
      p, q = _softmax(old[i] / temp), _softmax(new[i] / temp)
      d = temp ** 2 * float(np.sum(p * np.log(p / q)))
    else:
      d = 0.5 * float(np.sum((new[i] - old[i]) ** 2))
    total += w * d
  got = losses.focal_distillation(*batch, kind=kind, alpha=alpha, beta=beta, temperature=temp)
  assert float(got) == pytest.approx(total / B, rel=1e-5)
  # The pitfall: the mean of the weights times the mean of the distances differs.
  w = np.asarray(losses.focal_weights(batch[1], batch[2], alpha=alpha, beta=beta))
  d = np.asarray(losses.distance(batch[0], batch[1], kind, temp))
  assert abs(w.mean() * d.mean() - total / B) > 1e-3 * total / B


def test_naive_reweighting_is_a_weighted_cross_entropy_loop(batch):
  new, old, labels = (np.asarray(a, np.float64) for a in batch)
  total = 0.0
  for i in range(B):
    w = 1.0 + 4.0 * float(np.argmax(old[i]) == labels[i])
    total += -w * np.log(_softmax(new[i])[int(labels[i])])
  got = losses.naive_reweighting(*batch, alpha=1.0, beta=4.0)
  assert float(got) == pytest.approx(total / B, rel=1e-5)


def test_kl_at_high_temperature_approaches_centred_logit_matching(batch):
  new, old, _ = batch
  diff = np.asarray(new - old, np.float64)
  centred = 0.5 * np.sum((diff - diff.mean(-1, keepdims=True)) ** 2, -1) / C
  errors = []
  for temp in (10.0, 100.0, 1000.0):
    with jax.enable_x64(True):
      kl = np.asarray(losses.kl_distance(jnp.asarray(new, jnp.float64),
                                         jnp.asarray(old, jnp.float64), temp))
    errors.append(np.max(np.abs(kl - centred) / centred))
  assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-2
  # With logit differences centred over the classes, that is logit matching over C.
  lm = np.asarray(losses.logit_matching(new - diff.mean(-1, keepdims=True), old))
  np.testing.assert_allclose(lm / C, centred, rtol=1e-4)


def test_old_logits_get_no_gradient(batch):
  new, old, labels = batch
  g = jax.grad(lambda o: losses.focal_distillation(new, o, labels, kind="lm", alpha=1.0,
                                                   beta=5.0))(old)
  assert float(jnp.abs(g).max()) == 0.0


@pytest.mark.parametrize("method", losses.METHODS)
def test_make_loss_combines_cross_entropy_and_the_penalty(batch, method):
  new, old, labels = batch
  p = dict(method=method, lam=0.7, alpha=1.0, beta=5.0, temperature=50.0)
  got = float(losses.make_loss(p)(new, labels, old))
  ce = float(optax.softmax_cross_entropy_with_integer_labels(new, labels).mean())
  if method == "none":
    want = ce
  elif method == "naive":
    want = float(losses.naive_reweighting(new, old, labels, alpha=1.0, beta=5.0))
  else:
    want = ce + 0.7 * float(losses.focal_distillation(
        new, old, labels, kind=method[3:], alpha=1.0, beta=5.0, temperature=50.0))
  assert got == pytest.approx(want, rel=1e-6)
