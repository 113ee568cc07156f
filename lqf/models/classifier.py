"""A classifier as pure functions of its weights, whatever the backbone.

`build_classifier(model_cfg, ...)` builds the backbone named by `model_cfg.arch` from the
registry in `lqf.models.backbone`, so training, linearization and the heads never name
a ResNet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import functools
from typing import Any

from flax import nnx
import jax

import lqf.models.resnet as resnet

PyTree = Any


@dataclasses.dataclass
class Classifier:
  """A ResNet as pure functions and its weights.

  train_apply(params, batch_stats, x) -> (logits, new_batch_stats) with batch norm on
  batch statistics; apply(params, batch_stats, x) -> logits [N, C] and
  features(params, batch_stats, x) -> embedding [N, D], with running statistics.
  `train_apply_both` and `apply_both` give (logits, embedding) from one forward pass.
  `split_at(point, output="logits")` is `resnet.split_at` of the model.
  """
  apply: Callable[..., jax.Array]
  train_apply: Callable[..., tuple[jax.Array, PyTree]]
  features: Callable[..., jax.Array]
  split_at: Callable[..., tuple[Callable[..., jax.Array], Callable[..., jax.Array]]]
  params: PyTree
  batch_stats: PyTree
  apply_both: Callable[..., tuple[jax.Array, jax.Array]] | None = None
  train_apply_both: Callable[..., tuple[tuple[jax.Array, jax.Array], PyTree]] | None = None


def build_classifier(model_cfg: Mapping[str, Any], num_classes: int, in_channels: int,
                     seed: int) -> Classifier:
  cfg = dict(model_cfg, num_classes=num_classes, in_channels=in_channels)
  model = resnet.build_resnet(cfg, rngs=nnx.Rngs(seed))
  apply, params, batch_stats = resnet.split_apply(model)
  train_apply, _, _ = resnet.split_train_apply(model)
  features, _, _ = resnet.split_apply(model, output="features")
  apply_both, _, _ = resnet.split_apply(model, output="both")
  train_apply_both, _, _ = resnet.split_train_apply(model, output="both")
  return Classifier(apply, train_apply, features, functools.partial(resnet.split_at, model),
                    params, batch_stats, apply_both, train_apply_both)


