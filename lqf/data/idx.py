"""A pure-numpy reader of IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a big-endian header followed by the raw tensor: the magic number
`0x0000TTDD` (`TT` the element type code, `0x08` for unsigned bytes; `DD` the number of
dimensions), then one uint32 size per dimension, then the elements in C order. Files may
be gzip-compressed (recognised by their first two bytes, whatever the name).

Every defect (an absent file, a short or over-long payload, a wrong magic number or type
code, image and label counts that disagree) raises `UserError` with one line that names
the file, the directory it was looked for in, and how to fix it.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from lqf.errors import UserError, require

IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions: (N, rows, cols)
LABELS_MAGIC = 0x00000801  # uint8, 1 dimension: (N,)
_UBYTE = 0x08
_GZIP = b"\x1f\x8b"

# What to do about a bad file unless the caller knows better.
DEFAULT_FIX = ("run 'make data', or set GRACEFUL_FASHION_MNIST_DIR (or data.idx_dir) "
               "to a directory with intact IDX files")


def _read_bytes(path: str, fix: str) -> bytes:
  """The file's contents, decompressed when it is gzip-compressed."""
  folder = os.path.dirname(os.path.abspath(path))
  require(os.path.isfile(path), f"IDX file {os.path.basename(path)} is absent from "
          f"{folder}: {fix}")
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] != _GZIP:
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
    raise UserError(f"IDX file {path} is a damaged gzip file ({e}): {fix}") from None


def read(path: str, ndim: int, *, fix: str = DEFAULT_FIX) -> np.ndarray:
  """Reads an IDX file of unsigned bytes with `ndim` dimensions.

  Args:
    path: the file, gzip-compressed or not.
    ndim: the number of dimensions the file must have (3 for images, 1 for labels).
    fix: how to fix a missing or damaged file; ends every error message.
  Returns:
    uint8 array of the shape the header gives (a read-only view of the file's bytes).
  """
  data = _read_bytes(path, fix)
  expected = (_UBYTE << 8) | ndim
  require(len(data) >= 4, f"IDX file {path} is truncated: {len(data)} bytes, shorter than "
          f"its 4-byte magic number: {fix}")
  magic = int.from_bytes(data[:4], "big")
  require(magic >> 16 == 0 and magic & 0xFF == ndim,
          f"IDX file {path} has magic number 0x{magic:08x}, expected 0x{expected:08x} "
          f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''}); it is not the "
          f"right file: {fix}")
  code = (magic >> 8) & 0xFF
  require(code == _UBYTE, f"IDX file {path} holds elements of type code 0x{code:02x}, "
          f"expected 0x{_UBYTE:02x} (unsigned byte): {fix}")
  header = 4 + 4 * ndim
  require(len(data) >= header, f"IDX file {path} is truncated: {len(data)} bytes, shorter "
          f"than its {header}-byte header: {fix}")
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  size = int(np.prod(shape, dtype=np.int64))
  payload = len(data) - header
  require(payload >= size, f"IDX file {path} is truncated: its header promises shape "
          f"{shape} ({size} bytes) but it holds {payload} bytes: {fix}")
  require(payload == size, f"IDX file {path} has {payload - size} bytes beyond the shape "
          f"{shape} its header gives: {fix}")
  return np.frombuffer(data, np.uint8, count=size, offset=header).reshape(shape)


def read_images(path: str, *, fix: str = DEFAULT_FIX) -> np.ndarray:
  """uint8 [N, rows, cols] images from an IDX file with magic 0x00000803."""
  return read(path, 3, fix=fix)


def read_labels(path: str, *, fix: str = DEFAULT_FIX) -> np.ndarray:
  """uint8 [N] labels from an IDX file with magic 0x00000801."""
  return read(path, 1, fix=fix)


def read_pair(images_path: str, labels_path: str, *,
              fix: str = DEFAULT_FIX) -> tuple[np.ndarray, np.ndarray]:
  """Images and their labels, checked to be as many: (uint8 [N, rows, cols], uint8 [N])."""
  images = read_images(images_path, fix=fix)
  labels = read_labels(labels_path, fix=fix)
  require(len(images) == len(labels), f"IDX files disagree: {images_path} holds "
          f"{len(images)} images but {labels_path} holds {len(labels)} labels: {fix}")
  return images, labels
