"""Fashion-MNIST from IDX files: the reader on hand-made files (bad ones included), the
TFDS builder on tiny files, the pipeline on 28×28 input, and, where `make data` has put
them, the published files."""

import gzip
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lqf.data import fashion_mnist, idx, pipeline
from lqf.errors import UserError

TRAIN_IMAGES, TRAIN_LABELS = fashion_mnist.FILES["train"]
TEST_IMAGES, TEST_LABELS = fashion_mnist.FILES["test"]


def _write_idx(path, array, *, magic=None, cut=0, extra=b"", gz=None):
  """Writes `array` (uint8) as an IDX file; `magic` replaces the true magic number, `cut`
  drops bytes from the end, `extra` appends some. gzip-compressed when `path` ends .gz."""
  array = np.asarray(array, np.uint8)
  if magic is None:
    magic = 0x0800 | array.ndim
  data = magic.to_bytes(4, "big") + np.asarray(array.shape, ">u4").tobytes() + array.tobytes()
  data = data[:len(data) - cut] + extra
  gz = str(path).endswith(".gz") if gz is None else gz
  with open(path, "wb") as f:
    f.write(gzip.compress(data, mtime=0) if gz else data)
  return str(path)


def _write_set(folder, *, n_train=30, n_test=20, gz=True, seed=0, size=(28, 28)):
  """The four files of a tiny Fashion-MNIST in `folder`: split → (images, labels)."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  out = {}
  for split, n in (("train", n_train), ("test", n_test)):
    images = rng.integers(0, 256, (n,) + size, dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    rng.shuffle(labels)
    names = fashion_mnist.FILES[split]
    suffix = ".gz" if gz else ""
    _write_idx(os.path.join(folder, names[0] + suffix), images)
    _write_idx(os.path.join(folder, names[1] + suffix), labels)
    out[split] = (images, labels)
  return out


def _read_prepared(data_dir, idx_dir):
  builder = fashion_mnist.prepare(str(data_dir), str(idx_dir))
  out = {}
  for split in ("train", "test"):
    src = builder.as_data_source(split=split)
    recs = [src[i] for i in range(len(src))]
    out[split] = {k: np.stack([r[k] for r in recs]) for k in ("image", "label", "index")}
  return builder, out


# The IDX reader.


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_reader_gives_the_written_shapes_dtypes_and_labels(tmp_path, gz):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (5, 3, 4), dtype=np.uint8)  # rows != cols: order matters
  labels = np.asarray([9, 0, 3, 7, 1], np.uint8)
  suffix = ".gz" if gz else ""
  ip = _write_idx(tmp_path / f"images{suffix}", images)
  lp = _write_idx(tmp_path / f"labels{suffix}", labels)
  got_images, got_labels = idx.read_pair(ip, lp)
  assert got_images.shape == (5, 3, 4) and got_images.dtype == np.uint8
  assert got_labels.shape == (5,) and got_labels.dtype == np.uint8
  np.testing.assert_array_equal(got_images, images)
  assert got_labels.tolist() == [9, 0, 3, 7, 1]


def test_reader_recognises_gzip_by_content_not_name(tmp_path):
  labels = np.arange(7, dtype=np.uint8)
  path = _write_idx(tmp_path / "labels-idx1-ubyte", labels, gz=True)
  np.testing.assert_array_equal(idx.read_labels(path), labels)


def test_reader_reads_empty_tensors(tmp_path):
  path = _write_idx(tmp_path / "empty.gz", np.zeros((0, 28, 28), np.uint8))
  assert idx.read_images(path).shape == (0, 28, 28)


_IMAGES = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize("damage, pattern", [
    (dict(cut=1), r"is truncated: its header promises shape \(2, 3, 3\) \(18 bytes\) but it "
     r"holds 17 bytes"),
    (dict(cut=18 + 8), r"is truncated: 8 bytes, shorter than its 16-byte header"),
    (dict(cut=18 + 14), r"is truncated: 2 bytes, shorter than its 4-byte magic number"),
    (dict(extra=b"\0"), r"has 1 bytes beyond the shape \(2, 3, 3\)"),
    (dict(magic=0x00000801), r"has magic number 0x00000801, expected 0x00000803"),
    (dict(magic=0x12340803), r"has magic number 0x12340803, expected 0x00000803"),
    (dict(magic=0x00000D03), r"holds elements of type code 0x0d, expected 0x08"),
], ids=["short-payload", "short-header", "short-magic", "long-payload", "label-magic",
        "bad-magic", "float-dtype"])
def test_every_damaged_file_gets_one_clear_error(tmp_path, damage, pattern, gz):
  path = _write_idx(tmp_path / ("bad.gz" if gz else "bad"), _IMAGES, **damage)
  with pytest.raises(UserError, match=pattern) as e:
    idx.read_images(path)
  msg = str(e.value)
  assert "\n" not in msg and path in msg and "make data" in msg
  assert "GRACEFUL_FASHION_MNIST_DIR" in msg


def test_absent_file_names_the_directory_it_looked_in(tmp_path):
  with pytest.raises(UserError, match=f"IDX file nothing.gz is absent from {tmp_path}: "
                     "run 'make data'"):
    idx.read_labels(str(tmp_path / "nothing.gz"))


def test_damaged_gzip_stream_is_named(tmp_path):
  path = tmp_path / "labels.gz"
  path.write_bytes(gzip.compress(b"\0\0\x08\x01" + bytes(4) , mtime=0)[:-6])
  with pytest.raises(UserError, match=f"IDX file {path} is a damaged gzip file .*make data"):
    idx.read_labels(str(path))


def test_image_and_label_counts_that_disagree(tmp_path):
  ip = _write_idx(tmp_path / "images", _IMAGES)
  lp = _write_idx(tmp_path / "labels", np.zeros(3, np.uint8))
  with pytest.raises(UserError, match=f"IDX files disagree: {ip} holds 2 images but {lp} "
                     "holds 3 labels: run 'make data'"):
    idx.read_pair(ip, lp)


def test_the_caller_says_how_to_fix_it(tmp_path):
  with pytest.raises(UserError, match=r"absent from .*: download it again$"):
    idx.read_images(str(tmp_path / "x"), fix="download it again")


# Finding the files.


def test_source_directory_argument_then_environment_then_debian(monkeypatch, tmp_path):
  monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
  assert fashion_mnist.source_dir() == "/usr/share/datasets/fashion-mnist"
  monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path / "env"))
  assert fashion_mnist.source_dir() == str(tmp_path / "env")
  assert fashion_mnist.source_dir(str(tmp_path / "arg")) == str(tmp_path / "arg")


def test_absent_directory_and_absent_file_are_named(tmp_path):
  with pytest.raises(UserError, match=f"directory {tmp_path}/none does not exist: run "
                     "'make data'.*GRACEFUL_FASHION_MNIST_DIR or data.idx_dir"):
    fashion_mnist.find_files(str(tmp_path / "none"))
  _write_set(tmp_path)
  os.remove(tmp_path / f"{TEST_LABELS}.gz")
  with pytest.raises(UserError, match=f"file {TEST_LABELS}.gz \\(or {TEST_LABELS}\\) is "
                     f"absent from {tmp_path}: run 'make data'"):
    fashion_mnist.find_files(str(tmp_path))


def test_plain_files_are_found_too(tmp_path):
  _write_set(tmp_path, gz=False)
  paths = fashion_mnist.find_files(str(tmp_path))
  assert paths["test"] == (str(tmp_path / TEST_IMAGES), str(tmp_path / TEST_LABELS))


def test_wrong_image_size_and_label_range_are_named(tmp_path):
  _write_set(tmp_path / "a", size=(27, 28))
  with pytest.raises(UserError, match="holds images of 27x28 pixels, Fashion-MNIST's are 28x28"):
    fashion_mnist.load(str(tmp_path / "a"))
  _write_set(tmp_path / "b")
  _write_idx(tmp_path / "b" / f"{TRAIN_LABELS}.gz", np.full(30, 10, np.uint8))
  with pytest.raises(UserError, match=f"{TRAIN_LABELS}.gz holds label 10, Fashion-MNIST's "
                     "are 0..9"):
    fashion_mnist.load(str(tmp_path / "b"))


# The builder.


def test_builder_is_deterministic_and_keeps_file_order(tmp_path):
  source = _write_set(tmp_path / "idx")
  ba, a = _read_prepared(tmp_path / "a", tmp_path / "idx")
  bb, b = _read_prepared(tmp_path / "b", tmp_path / "idx")
  for split, (images, labels) in source.items():
    for k in ("image", "label", "index"):
      np.testing.assert_array_equal(a[split][k], b[split][k])
    np.testing.assert_array_equal(a[split]["index"], np.arange(len(labels)))
    np.testing.assert_array_equal(a[split]["image"], images[..., None])
    np.testing.assert_array_equal(a[split]["label"], labels)
    assert a[split]["image"].dtype == np.uint8 and a[split]["image"].shape[1:] == (28, 28, 1)
  # Byte for byte the same files.
  records = sorted(f for f in os.listdir(ba.data_dir) if ".array_record" in f)
  assert len(records) == 2
  for f in records:
    with open(os.path.join(ba.data_dir, f), "rb") as fa, \
         open(os.path.join(bb.data_dir, f), "rb") as fb:
      assert fa.read() == fb.read()
  assert ba.info.features["label"].names == list(fashion_mnist.CLASS_NAMES)
  assert ba.info.features["label"].names[0] == "T-shirt/top"


def test_splits_are_disjoint_and_come_from_their_own_files(tmp_path):
  source = _write_set(tmp_path / "idx")
  _, data = _read_prepared(tmp_path / "tfds", tmp_path / "idx")
  train = {im.tobytes() for im in data["train"]["image"]}
  test = {im.tobytes() for im in data["test"]["image"]}
  assert len(train) == 30 and len(test) == 20 and not train & test
  assert test == {im[..., None].tobytes() for im in source["test"][0]}


def test_bad_directory_leaves_nothing_half_prepared(tmp_path):
  _write_set(tmp_path / "idx")
  _write_idx(tmp_path / "idx" / f"{TEST_IMAGES}.gz", np.zeros((20, 28, 28)), cut=5)
  data_dir = tmp_path / "tfds"
  with pytest.raises(UserError, match=f"{TEST_IMAGES}.gz is truncated"):
    fashion_mnist.prepare(str(data_dir), str(tmp_path / "idx"))
  assert not data_dir.exists() or not any(data_dir.rglob("*"))


def test_other_source_files_are_prepared_apart_not_reused(tmp_path):
  first = _write_set(tmp_path / "one", seed=1)
  second = _write_set(tmp_path / "two", seed=2, gz=False)
  ba, a = _read_prepared(tmp_path / "tfds", tmp_path / "one")
  bb, b = _read_prepared(tmp_path / "tfds", tmp_path / "two")
  assert ba.data_dir != bb.data_dir
  np.testing.assert_array_equal(a["test"]["image"][..., 0], first["test"][0])
  np.testing.assert_array_equal(b["test"]["image"][..., 0], second["test"][0])
  # The same bytes elsewhere reuse the prepared folder.
  _write_set(tmp_path / "copy", seed=1)
  again = fashion_mnist.GracefulFashionMnist(data_dir=str(tmp_path / "tfds"),
                                             idx_dir=str(tmp_path / "copy"))
  assert again.data_dir == ba.data_dir and again.is_prepared()


# The pipeline.


def _data_cfg(tiny_config, **kw):
  d = tiny_config.data
  d.update(dict(name="graceful_fashion_mnist", eval_split="test", mean=(0.3,), std=(0.35,)))
  d.idx_dir = ""
  d.update(kw)
  return d


@pytest.mark.parametrize("size, channels", [(28, 1), (16, 1), (32, 3)])
def test_pipeline_shapes_and_value_ranges_on_28x28_input(tiny_config, tmp_path, size, channels):
  source = _write_set(tmp_path / "idx")
  c = channels
  d = _data_cfg(tiny_config, idx_dir=str(tmp_path / "idx"), image_size=size, channels=c,
                mean=(0.3,) * c, std=(0.35,) * c)
  data = pipeline.load_split(d, "test", corrupted=False)
  assert data.images.shape == (20, size, size, c) and data.images.dtype == np.float32
  assert data.labels.dtype == np.int32 and data.num_classes == 10
  np.testing.assert_array_equal(data.labels, source["test"][1])
  raw = data.images * np.float32(0.35) + np.float32(0.3)
  assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
  if size == 28:  # No resize: the pixels themselves, scaled to [0, 1].
    np.testing.assert_allclose(raw[..., 0], source["test"][0] / 255.0, atol=1e-6)
  if c == 3:
    np.testing.assert_array_equal(data.images[..., 0], data.images[..., 2])
  np.testing.assert_allclose(data.background, -0.3 / 0.35 * np.ones(c), rtol=1e-6)
  half = pipeline.load_split(d, "train[:50%]", corrupted=True, shots=1)
  assert len(half) == len(np.unique(source["train"][1][:15]))


def test_pipeline_reports_a_bad_idx_dir(tiny_config, tmp_path):
  d = _data_cfg(tiny_config, idx_dir=str(tmp_path / "nowhere"))
  with pytest.raises(UserError, match=f"directory {tmp_path}/nowhere does not exist: run "
                     "'make data'"):
    pipeline.load_split(d, "test", corrupted=False)


def test_pipeline_reads_the_environment_directory(tiny_config, tmp_path, monkeypatch):
  source = _write_set(tmp_path / "idx", seed=3)
  monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path / "idx"))
  data = pipeline.load_split(_data_cfg(tiny_config, image_size=28), "test", corrupted=False)
  np.testing.assert_array_equal(data.labels, source["test"][1])


def test_idx_dir_is_refused_for_other_datasets(tiny_config, tmp_path):
  d = _data_cfg(tiny_config, name="graceful_digits", idx_dir=str(tmp_path))
  with pytest.raises(UserError, match="dataset 'graceful_digits' does not read IDX files"):
    pipeline.load_split(d, "test", corrupted=False)


def test_catalogue_fashion_mnist_goes_through_the_catalogue(tiny_config, tmp_path):
  d = _data_cfg(tiny_config, name="fashion_mnist", image_size=28)
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    data = pipeline.load_split(d, "train", corrupted=False)
  assert data.images.shape == (12, 28, 28, 1) and data.num_classes == 10
  d = _data_cfg(tiny_config, name="fashion_mnist", data_dir=str(tmp_path))
  with pytest.raises(UserError, match=r"not prepared under .*tfds build fashion_mnist"):
    pipeline.load_split(d, "train", corrupted=False)


# The published files, where `make data` has installed them (CI does).


def _real_dir() -> str:
  folder = fashion_mnist.source_dir()
  try:
    fashion_mnist.find_files(folder)
  except UserError:
    pytest.skip(f"Fashion-MNIST's IDX files are not in {folder}: run 'make data'")
  return folder


def test_published_files_counts_classes_and_first_labels():
  data = fashion_mnist.load(_real_dir())
  (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
  assert train_x.shape == (60_000, 28, 28) and test_x.shape == (10_000, 28, 28)
  assert np.bincount(train_y, minlength=10).tolist() == [6_000] * 10
  assert np.bincount(test_y, minlength=10).tolist() == [1_000] * 10
  assert train_y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
  assert test_y[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]


@pytest.fixture(scope="session")
def prepared_real(tmp_path_factory):
  """The full builder prepared from the published files (about 12 s)."""
  folder = _real_dir()
  return fashion_mnist.prepare(str(tmp_path_factory.mktemp("fashion_tfds")), folder), folder


@pytest.mark.xdist_group("fashion_mnist_real")
def test_published_files_through_the_builder(prepared_real):
  builder, folder = prepared_real
  assert {s: builder.info.splits[s].num_examples for s in ("train", "test")} == \
      fashion_mnist.NUM_EXAMPLES
  train_x, train_y = fashion_mnist.load(folder)["train"]
  src = builder.as_data_source(split="train")
  first = src.__getitems__(list(range(10)))
  assert [int(r["label"]) for r in first] == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
  assert [int(r["index"]) for r in first] == list(range(10))
  last = src[59_999]
  np.testing.assert_array_equal(last["image"][..., 0], train_x[-1])
  assert last["label"] == train_y[-1] and last["index"] == 59_999
