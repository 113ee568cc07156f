"""Zalando's Fashion-MNIST from its four IDX files, as a TensorFlow Datasets builder.

No download and no TensorFlow: the builder reads `train-images-idx3-ubyte.gz`,
`train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz` and `t10k-labels-idx1-ubyte.gz`
(gzip-compressed or not, the `.gz` dropped then) from a directory and writes array_record
files, which `tfds.data_source` reads like any catalogue dataset. The directory is, first
found: the `idx_dir` argument (the data config's `idx_dir`), `$GRACEFUL_FASHION_MNIST_DIR`,
then `/usr/share/datasets/fashion-mnist`, where the Debian package
`dataset-fashion-mnist` puts the files (`make data` installs it).

The splits are the published ones, in file order: `train` the 60,000 images of the
`train-*` files, `test` the 10,000 of the `t10k-*` files. `index` is an example's position
in its file.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds

import lqf.data.idx as idx
from lqf.errors import require

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "GRACEFUL_FASHION_MNIST_DIR"
URL = "https://github.com/zalandoresearch/fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
IMAGE_SHAPE = (28, 28)
# (images, labels) file names of each split, without the optional `.gz`.
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# The published sizes, which files of other sizes (the tests' tiny ones) need not have.
NUM_EXAMPLES = {"train": 60_000, "test": 10_000}

FIX = (f"run 'make data' (installs the Debian package dataset-fashion-mnist into "
       f"{DEFAULT_DIR}), or set {ENV_VAR} or data.idx_dir to a directory holding the four "
       f"IDX files of {URL}")


def source_dir(idx_dir: str = "") -> str:
  """The directory the IDX files are read from: `idx_dir`, else `$GRACEFUL_FASHION_MNIST_DIR`,
  else the Debian package's directory."""
  return os.path.abspath(os.path.expanduser(idx_dir or os.environ.get(ENV_VAR, "")
                                            or DEFAULT_DIR))


def find_files(folder: str) -> dict[str, tuple[str, str]]:
  """The (images, labels) paths of each split in `folder`; `name.gz` is preferred to `name`.

  Raises `UserError` naming `folder` when it or one of the four files is absent.
  """
  require(os.path.isdir(folder), f"Fashion-MNIST directory {folder} does not exist: {FIX}")
  out = {}
  for split, names in FILES.items():
    paths = []
    for name in names:
      found = [p for p in (os.path.join(folder, name + ".gz"), os.path.join(folder, name))
               if os.path.isfile(p)]
      require(bool(found), f"Fashion-MNIST file {name}.gz (or {name}) is absent from "
              f"{folder}: {FIX}")
      paths.append(found[0])
    out[split] = (paths[0], paths[1])
  return out


def fingerprint(paths: dict[str, tuple[str, str]]) -> str:
  """16 hex digits of the SHA-256 of the four files' bytes (about 20 ms for the real ones)."""
  h = hashlib.sha256()
  for split in sorted(paths):
    for path in paths[split]:
      with open(path, "rb") as f:
        h.update(hashlib.file_digest(f, "sha256").digest())
  return h.hexdigest()[:16]


def load(folder: str = "") -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Reads and checks the four files: split → (uint8 [N, 28, 28] images, uint8 [N] labels).

  `folder` defaults to `source_dir()`. Every defect raises `UserError` naming the file.
  """
  paths = find_files(folder or source_dir())
  out = {}
  for split, (images_path, labels_path) in paths.items():
    images, labels = idx.read_pair(images_path, labels_path, fix=FIX)
    require(images.shape[1:] == IMAGE_SHAPE, f"IDX file {images_path} holds images of "
            f"{images.shape[1]}x{images.shape[2]} pixels, Fashion-MNIST's are 28x28: {FIX}")
    require(len(labels) == 0 or int(labels.max()) < len(CLASS_NAMES),
            f"IDX file {labels_path} holds label {int(labels.max()) if len(labels) else 0}, "
            f"Fashion-MNIST's are 0..{len(CLASS_NAMES) - 1}: {FIX}")
    out[split] = (images, labels)
  return out


class GracefulFashionMnist(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST: 28×28×1 uint8 images in [0, 255], 10 classes, 60,000 train / 10,000 test.

  Args:
    idx_dir: the directory of the four IDX files ("" = `$GRACEFUL_FASHION_MNIST_DIR`, else
      `DEFAULT_DIR`).
    **kwargs: as for `tfds.core.GeneratorBasedBuilder` (data_dir, file_format, ...).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "The published train (60,000) / test (10,000) split."}

  def __init__(self, *, idx_dir: str = "", **kwargs):
    self._idx_dir = source_dir(idx_dir)
    self._paths = find_files(self._idx_dir)
    self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    if kwargs.get("config") is None:
      # The prepared dataset's folder, <data_dir>/graceful_fashion_mnist/<config>/1.0.0,
      # is named after a hash of the source files' bytes: preparing from other files
      # (another idx_dir, a damaged copy later fixed, the tests' tiny files) writes a
      # folder of its own instead of silently reusing one prepared from different data,
      # and the same files found in any directory reuse the same folder. Hashing the
      # real files takes about 20 ms.
      fp = fingerprint(self._paths)
      kwargs["config"] = tfds.core.BuilderConfig(
          name=f"src_{fp}", description=f"Prepared from the IDX files (SHA-256 {fp}...) "
          f"found in {self._idx_dir}.")
    super().__init__(**kwargs)
    self._original_state["idx_dir"] = idx_dir  # For pickling.

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Zalando's Fashion-MNIST: 28x28 grayscale images of clothing.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=IMAGE_SHAPE + (1,), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        homepage=URL,
        # File order, so that `train[:50%]` is the first half of the published file.
        disable_shuffling=True,
    )

  def download_and_prepare(self, *args, **kwargs) -> None:
    # Read and check every file before TFDS creates any folder, so that a bad directory
    # leaves nothing half-prepared behind.
    if not self.is_prepared():
      self._arrays = load(self._idx_dir)
    try:
      super().download_and_prepare(*args, **kwargs)
    finally:
      self._arrays = None  # 55 MB; the prepared files hold the data now.

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    arrays = self._arrays if self._arrays is not None else load(self._idx_dir)
    return {split: self._generate_examples(*arrays[split]) for split in FILES}

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
    for i in range(len(labels)):
      yield i, {"image": images[i][..., None], "label": int(labels[i]), "index": i}


def prepare(data_dir: str, idx_dir: str = "") -> GracefulFashionMnist:
  """Writes the array_record files under `data_dir` (a no-op when already there)."""
  builder = GracefulFashionMnist(data_dir=data_dir, idx_dir=idx_dir, file_format="array_record")
  builder.download_and_prepare()
  return builder
