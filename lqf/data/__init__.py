"""Images from TensorFlow Datasets without TensorFlow: the built-in digits, any catalogue
dataset by name, splits held in memory and batches that are pure functions of
(seed, step)."""

import lqf.data.digits as digits
import lqf.data.pipeline as pipeline
from lqf.data.pipeline import ImageSplit, load_split

__all__ = ["ImageSplit", "digits", "load_split", "pipeline"]
