"""The BCT losses and the synthesized old head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bct import losses
from lqf.errors import UserError
from lqf.models import resnet


def _setup(seed=0, n=40, d=6, c=5):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(n, d)).astype(np.float32)
  labels = np.arange(n) % c
  kernel = rng.normal(size=(d, 3)).astype(np.float32)
  bias = rng.normal(size=3).astype(np.float32)
  return feats, labels, kernel, bias


def test_synthesized_weights_are_the_class_means():
  feats, labels, kernel, bias = _setup()
  head = losses.synthesize_head(kernel, bias, [4, 0, 2], 5, feats, labels)
  for c in (1, 3):
    np.testing.assert_allclose(head.kernel[:, c], feats[labels == c].mean(0), rtol=1e-6)
    assert head.bias[c] == pytest.approx(bias.mean())
  # Trained columns land on the labels they score.
  np.testing.assert_array_equal(head.kernel[:, [4, 0, 2]], kernel)
  np.testing.assert_array_equal(head.bias[[4, 0, 2]], bias)


def test_synthesis_options_rescale_and_center():
  feats, labels, kernel, bias = _setup()
  matched = losses.synthesize_head(kernel, bias, [0, 1, 2], 5, feats, labels, norm="match")
  target = np.linalg.norm(kernel, axis=0).mean()
  np.testing.assert_allclose(np.linalg.norm(matched.kernel[:, 3:], axis=0), target, rtol=1e-5)
  centered = losses.synthesize_head(kernel, bias, [0, 1, 2], 5, feats, labels, center=True)
  np.testing.assert_allclose(centered.kernel[:, 3],
                             feats[labels == 3].mean(0) - feats.mean(0), rtol=1e-5, atol=1e-6)


def test_synthesis_errors():
  feats, labels, kernel, bias = _setup()
  with pytest.raises(UserError, match="has 3 classes but the old model's label set"):
    losses.synthesize_head(kernel, bias, [0, 1], 5, feats, labels)
  with pytest.raises(UserError, match="class 4 has no example"):
    losses.synthesize_head(kernel, bias, [0, 1, 2], 5, feats, np.arange(40) % 4)
  with pytest.raises(UserError, match="dimensions"):
    losses.synthesize_head(kernel, bias, [0, 1, 2], 5, feats[:, :4], labels)


def test_influence_loss_is_cross_entropy_through_the_old_head():
  feats, labels, kernel, bias = _setup()
  head = losses.synthesize_head(kernel, bias, [0, 1, 2], 5, feats, labels)
  new = np.concatenate([feats, np.ones((40, 2), np.float32)], 1)  # Truncated back to 6.
  logits = feats @ head.kernel + head.bias
  want = np.mean([np.log(np.exp(l).sum()) - l[y] for l, y in zip(logits, labels)])
  got = losses.influence_ce(jnp.asarray(new), jnp.asarray(labels), head, "truncate_or_pad")
  assert float(got) == pytest.approx(want, rel=1e-5)
  cos = losses.OldHead(head.kernel, head.bias, 4.0)
  xn = feats / np.linalg.norm(feats, axis=1, keepdims=True)
  kn = head.kernel / np.linalg.norm(head.kernel, axis=0, keepdims=True)
  np.testing.assert_allclose(losses.old_head_logits(jnp.asarray(feats), cos, "none"),
                             4.0 * xn @ kn + head.bias, rtol=1e-5, atol=1e-5)


def test_make_loss_adds_each_term():
  feats, labels, kernel, bias = _setup()
  head = losses.synthesize_head(kernel, bias, [0, 1, 2], 5, feats, labels)
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(40, 5)), jnp.float32)
  f, y = jnp.asarray(feats), jnp.asarray(labels)
  ce = float(losses.train.cross_entropy(logits, y))
  assert float(losses.make_loss("independent", lam=2.0, rule="none")((logits, f), y, None)) \
      == pytest.approx(ce)
  bct = losses.make_loss("bct", lam=2.0, rule="none", heads=[head, head])((logits, f), y, None)
  assert float(bct) == pytest.approx(ce + 4 * float(losses.influence_ce(f, y, head, "none")),
                                     rel=1e-6)
  old = f + 1.0
  l2 = losses.make_loss("l2", lam=0.5, rule="none")((logits, f), y, old)
  assert float(l2) == pytest.approx(ce + 0.5 * 6.0, rel=1e-6)
  with pytest.raises(UserError, match="old head"):
    losses.make_loss("bct", lam=1.0, rule="none")
  with pytest.raises(UserError, match="unknown bct.method"):
    losses.make_loss("bogus", lam=1.0, rule="none")


def test_influence_gradient_reaches_only_the_new_embedding():
  feats, labels, kernel, bias = _setup()
  head = losses.synthesize_head(kernel, bias, [0, 1, 2], 5, feats, labels)
  g = jax.grad(lambda h: losses.influence_ce(jnp.asarray(feats), jnp.asarray(labels),
                                             losses.OldHead(h, head.bias), "none"))(
      jnp.asarray(head.kernel))
  assert float(jnp.abs(g).sum()) > 0  # Differentiable in the head, but make_loss freezes it:
  loss = losses.make_loss("bct", lam=1.0, rule="none", heads=[head])
  grads = jax.grad(lambda f: loss((jnp.zeros((40, 5)), f), jnp.asarray(labels), None))(
      jnp.asarray(feats))
  assert grads.shape == feats.shape


def test_cosine_head_in_a_resnet():
  from flax import nnx
  model = resnet.build_resnet(dict(arch="cifar", depth=8, width=4, num_classes=3,
                                   activation="leaky_relu", leaky_slope=0.1, in_channels=1,
                                   head="cosine", head_scale=8.0), rngs=nnx.Rngs(0))
  apply, params, stats = resnet.split_apply(model, output="both")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 1)), jnp.float32)
  logits, feats = apply(params, stats, x)
  want = resnet.cosine_logits(feats, params["head"]["kernel"], params["head"]["bias"], 8.0)
  np.testing.assert_allclose(logits, want, rtol=1e-6)
  assert float(jnp.abs(logits).max()) <= 8.0 + 1e-4
