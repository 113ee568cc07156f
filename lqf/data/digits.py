"""The handwritten digits bundled with scikit-learn, as a TensorFlow Datasets builder.

No download: the 1,797 8×8 images ship inside scikit-learn. Preparing the dataset
writes array_record files, which `tfds.data_source` reads without TensorFlow, so the
built-in data and the catalogue datasets go through the same loading path.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NUM_TEST = 600
# Fixed, not configurable: the split must be the same on every machine and release.
_SPLIT_SEED = 20_201_221


def split_indices() -> dict[str, np.ndarray]:
  """Indices into `sklearn.datasets.load_digits()` of each split, sorted.

  A fixed permutation puts `NUM_TEST` images in `test` and the rest in `train`.
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  n = len(load_digits().target)
  perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
  return {"train": np.sort(perm[NUM_TEST:]), "test": np.sort(perm[:NUM_TEST])}


class GracefulDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits: 8×8×1 uint8 images in [0, 255], 10 classes."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Fixed train (1,197) / test (600) split."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="UCI ML hand-written digits, as bundled with scikit-learn.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {name: self._generate_examples(idx) for name, idx in split_indices().items()}

  def _generate_examples(self, indices: np.ndarray):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    digits = load_digits()
    # Pixel values are 0..16 in scikit-learn; 255/16 maps them onto the usual uint8 range.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    for i in indices:
      yield int(i), {"image": images[i], "label": int(digits.target[i]), "index": int(i)}


def prepare(data_dir: str) -> None:
  """Writes the array_record files under `data_dir` (a no-op when already there)."""
  GracefulDigits(data_dir=data_dir, file_format="array_record").download_and_prepare()
