"""Images from TensorFlow Datasets without TensorFlow: the built-in digits and
Fashion-MNIST (from its IDX files), any catalogue dataset by name, splits held in memory
and batches that are pure functions of (seed, step)."""

import lqf.data.digits as digits
import lqf.data.fashion_mnist as fashion_mnist
import lqf.data.idx as idx
import lqf.data.pipeline as pipeline
from lqf.data.pipeline import ImageSplit, load_split

__all__ = ["ImageSplit", "digits", "fashion_mnist", "idx", "load_split", "pipeline"]
