import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from lqf import finetune
from lqf.data import pipeline
from lqf.models.classifier import build_classifier
from lqf.runtime import train

MODEL = dict(arch="cifar", depth=8, width=4, activation="leaky_relu", leaky_slope=0.1)


def _data(n=40, classes=4, size=8, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % classes
  images = rng.normal(size=(n, size, size, 1)).astype(np.float32)
  images[..., 0] += labels[:, None, None] * 0.5  # Learnable from the mean brightness.
  return pipeline.ImageSplit(images, labels.astype(np.int32), classes, np.zeros(1, np.float32))


def test_linear_probe_reaches_the_logistic_regression_optimum():
  rng = np.random.default_rng(0)
  n, d, c, wd = 60, 5, 3, 0.1
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = (x[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(int) + (x[:, 1] > 1)
  head = finetune.fit_linear_probe(jnp.asarray(x), jnp.asarray(y), c, lr=0.05,
                                   weight_decay=wd, steps=3000, seed=0)
  # sklearn minimises ½||W||² + C Σ CE; ours is mean CE + wd/2 ||W||², so C = 1/(wd n).
  ref = LogisticRegression(C=1.0 / (wd * n), tol=1e-10, max_iter=10_000).fit(x, y)
  np.testing.assert_allclose(np.asarray(head["kernel"]).T, ref.coef_, atol=1e-4)
  # Softmax logits are defined up to a constant: compare centred biases.
  b = np.asarray(head["bias"])
  np.testing.assert_allclose(b - b.mean(), ref.intercept_ - ref.intercept_.mean(), atol=1e-4)
  with pytest.raises(ValueError, match="positive number of steps"):
    finetune.fit_linear_probe(jnp.asarray(x), jnp.asarray(y), c, lr=0.05, weight_decay=wd,
                              steps=0, seed=0)


def test_with_new_head_keeps_the_backbone_and_changes_the_label_set():
  pre = build_classifier(MODEL, 10, 1, seed=0)
  new = finetune.with_new_head(pre, MODEL, num_classes=4, in_channels=1, seed=1)
  assert new.params["head"]["kernel"].shape == (16, 4)
  assert float(jnp.abs(new.params["head"]["kernel"]).sum()) > 0
  for k in pre.params:
    if k != "head":
      jax.tree.map(np.testing.assert_array_equal, pre.params[k], new.params[k])
  jax.tree.map(np.testing.assert_array_equal, pre.batch_stats, new.batch_stats)
  x = np.zeros((2, 8, 8, 1), np.float32)
  assert new.apply(new.params, new.batch_stats, x).shape == (2, 4)


@pytest.mark.parametrize("train_bn", [False, True])
def test_finetune_fits_the_data_and_respects_frozen_batch_norm(train_bn):
  data = _data()
  clf = build_classifier(MODEL, data.num_classes, 1, seed=0)
  t = dict(optimizer="adam", lr=3e-3, momentum=0.9, weight_decay=0.0, batch_size=40,
           steps=60, warmup_steps=0, checkpoint_every=100, eval_every=100, log_every=100)
  before = train.evaluate(clf.apply, clf.params, clf.batch_stats, data)
  out = finetune.finetune(clf, data, t, seed=0, train_bn=train_bn)
  after = train.evaluate(out.apply, out.params, out.batch_stats, data)
  assert after["loss"] < 0.5 * before["loss"] and after["accuracy"] > 0.9
  same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                                      clf.batch_stats, out.batch_stats))
  assert all(same) == (not train_bn)


def test_linear_probe_trains_only_the_head():
  data = _data()
  clf = build_classifier(MODEL, data.num_classes, 1, seed=0)
  out = finetune.linear_probe(clf, data, dict(lr=0.05, weight_decay=1e-4, steps=300), seed=0)
  for k in clf.params:
    if k != "head":
      jax.tree.map(np.testing.assert_array_equal, clf.params[k], out.params[k])
  assert train.evaluate(out.apply, out.params, out.batch_stats, data)["accuracy"] > 0.8


def test_adapt_batch_norm_makes_running_statistics_those_of_the_images():
  # The definition: with the adapted statistics, the inference pass on the images is the
  # training-mode pass that normalises them as one batch.
  clf = build_classifier(MODEL, 4, 1, seed=0)
  images = _data(n=24).images * 3.0 + 1.0  # Far from the statistics the model holds.
  adapted = finetune.adapt_batch_norm(clf, images)
  batch_logits = clf.train_apply(clf.params, clf.batch_stats, jnp.asarray(images))[0]
  np.testing.assert_allclose(adapted.apply(adapted.params, adapted.batch_stats, images),
                             batch_logits, rtol=1e-4, atol=1e-4)
  assert not np.allclose(clf.apply(clf.params, clf.batch_stats, images), batch_logits,
                         atol=1e-2)
  jax.tree.map(np.testing.assert_array_equal, clf.params, adapted.params)
  # The statistics the model held before play no part.
  shifted = jax.tree.map(lambda a: a * 7.0 + 2.0, clf.batch_stats)
  other = finetune.adapt_batch_norm(dataclasses.replace(clf, batch_stats=shifted), images)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               adapted.batch_stats, other.batch_stats)


def test_adapt_batch_norm_leaves_a_model_without_batch_norm_unchanged():
  vit = build_classifier(dict(arch="vit", patch=4, dim=8, depth=1, heads=2, mlp_dim=16,
                              activation="leaky_relu", leaky_slope=0.1, image_size=8),
                         3, 1, seed=0)
  assert finetune.adapt_batch_norm(vit, np.zeros((2, 8, 8, 1), np.float32)) is vit
