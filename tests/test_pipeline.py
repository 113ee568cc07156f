import numpy as np
import pytest
import tensorflow_datasets as tfds

from lqf.data import pipeline
from lqf.errors import UserError


def _cfg(tiny_config, **kw):
  d = tiny_config.data
  d.update(kw)
  return d


def test_split_shapes_and_value_ranges(tiny_config):
  d = _cfg(tiny_config, image_size=16)
  data = pipeline.load_split(d, "test", corrupted=False)
  assert data.images.shape == (600, 16, 16, 1) and data.images.dtype == np.float32
  assert data.labels.shape == (600,) and data.labels.dtype == np.int32
  raw = data.images * np.float32(d.std[0]) + np.float32(d.mean[0])
  assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
  assert abs(raw.mean() - 0.3) < 0.05  # the configured mean is near the data's own
  np.testing.assert_allclose(data.background, -np.float32(d.mean[0]) / np.float32(d.std[0]))


def test_corruption_is_fixed_per_example_and_changes_images(tiny_config):
  d = _cfg(tiny_config)
  clean = pipeline.load_split(d, "test", corrupted=False)
  a = pipeline.load_split(d, "test", corrupted=True)
  b = pipeline.load_split(d, "test", corrupted=True)
  np.testing.assert_array_equal(a.images, b.images)
  assert np.abs(a.images - clean.images).mean() > 0.05


def test_corrupt_matches_its_definition():
  img = np.zeros((4, 4, 1)); img[1, 2] = 1.0
  rng = np.random.default_rng(0)
  dy, dx = np.random.default_rng(0).integers(-1, 2, size=2)
  out = pipeline.corrupt(img, noise_std=0.0, max_shift=1, rng=rng)
  expected = np.zeros_like(img); expected[1 + dy, 2 + dx] = 1.0
  np.testing.assert_array_equal(out, expected)


def test_few_shot_subset_has_k_per_class_and_depends_on_seed(tiny_config):
  d = _cfg(tiny_config)
  a = pipeline.load_split(d, "train[50%:]", corrupted=True, shots=5, subset_seed=0)
  b = pipeline.load_split(d, "train[50%:]", corrupted=True, shots=5, subset_seed=1)
  assert len(a) == 50 and np.bincount(a.labels).tolist() == [5] * 10
  assert not np.array_equal(a.images, b.images)


def test_batch_indices_cover_each_epoch_once_and_are_deterministic():
  n, bs = 10, 4
  stream = np.concatenate([pipeline.batch_indices(n, bs, s, seed=3) for s in range(5)])
  assert sorted(stream[:10].tolist()) == list(range(10))
  assert sorted(stream[10:20].tolist()) == list(range(10))
  np.testing.assert_array_equal(pipeline.batch_indices(n, bs, 2, 3),
                                pipeline.batch_indices(n, bs, 2, 3))
  assert not np.array_equal(pipeline.batch_indices(n, bs, 0, 3), pipeline.batch_indices(n, bs, 0, 4))


def test_augmentation_shifts_with_background_fill(tiny_config):
  d = _cfg(tiny_config)
  data = pipeline.load_split(d, "test[:16]", corrupted=False)
  x, y = pipeline.batch_at(data, batch_size=8, step=0, seed=0, augment_cfg=d.augment)
  x2, _ = pipeline.batch_at(data, batch_size=8, step=0, seed=0, augment_cfg=None)
  assert x.shape == x2.shape == (8, 8, 8, 1)
  assert not np.array_equal(x, x2)
  # The raw scale stays in [0, 1]: fill is black, not normalised zero.
  raw = x * d.std[0] + d.mean[0]
  assert raw.min() >= -1e-5


def test_catalogue_dataset_through_the_same_path(tiny_config):
  d = _cfg(tiny_config, name="cifar10", image_size=16, channels=3,
           mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    data = pipeline.load_split(d, "train", corrupted=False)
    few = pipeline.load_split(d, "train", corrupted=False, shots=1)
  assert data.images.shape == (20, 16, 16, 3) and data.num_classes == 10
  raw = data.images * 0.25 + 0.5
  assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
  assert len(few) == len(np.unique(data.labels))


def test_unprepared_catalogue_dataset_says_how_to_prepare(tiny_config, tmp_path):
  d = _cfg(tiny_config, name="cifar10", data_dir=str(tmp_path))
  with pytest.raises(UserError, match=r"not prepared under .*tfds build cifar10"):
    pipeline.load_split(d, "train", corrupted=False)
  assert not any(tmp_path.rglob("*.array_record*"))


def test_unknown_dataset_is_named(tiny_config):
  with pytest.raises(UserError, match="unknown dataset 'no_such_set'"):
    pipeline.load_split(_cfg(tiny_config, name="no_such_set"), "train", corrupted=False)


def test_unknown_split_lists_the_splits(tiny_config):
  with pytest.raises(UserError, match="its splits are: test, train"):
    pipeline.load_split(_cfg(tiny_config), "validation", corrupted=False)


def test_num_classes_is_the_label_count_of_the_eval_split(tiny_config):
  d = tiny_config.data
  assert pipeline.num_classes(d) == 10
  assert pipeline.load_split(d, d.eval_split, corrupted=False).num_classes == 10
