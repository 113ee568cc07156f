import numpy as np
from sklearn.datasets import load_digits
import tensorflow_datasets as tfds

from lqf.data import digits


def _read(data_dir):
  digits.prepare(data_dir)
  out = {}
  for split in ("train", "test"):
    src = tfds.data_source("graceful_digits", split=split, data_dir=data_dir)
    recs = [src[i] for i in range(len(src))]
    out[split] = {k: np.stack([r[k] for r in recs]) for k in ("image", "label", "index")}
  return out


def test_builder_is_deterministic_and_splits_are_disjoint(tmp_path):
  a = _read(str(tmp_path / "a"))
  b = _read(str(tmp_path / "b"))
  for split in ("train", "test"):
    for k in ("image", "label", "index"):
      np.testing.assert_array_equal(np.sort(a[split]["index"]), np.sort(b[split]["index"]))
      order_a, order_b = np.argsort(a[split]["index"]), np.argsort(b[split]["index"])
      np.testing.assert_array_equal(a[split][k][order_a], b[split][k][order_b])
  train, test = set(a["train"]["index"]), set(a["test"]["index"])
  assert not train & test
  assert len(train) == 1797 - digits.NUM_TEST and len(test) == digits.NUM_TEST
  assert train | test == set(range(1797))


def test_examples_equal_the_scikit_learn_images(tmp_path):
  data = _read(str(tmp_path))["test"]
  ref = load_digits()
  idx = data["index"]
  np.testing.assert_array_equal(data["label"], ref.target[idx])
  np.testing.assert_allclose(data["image"][..., 0] / 255.0 * 16.0, ref.images[idx], atol=16 / 255)
  assert data["image"].dtype == np.uint8 and data["image"].shape[1:] == (8, 8, 1)


def test_every_class_is_in_both_splits():
  idx = digits.split_indices()
  y = load_digits().target
  for split in idx.values():
    counts = np.bincount(y[split], minlength=10)
    assert counts.min() > 0.05 * len(split)
