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

import lqf.models.backbone as backbone_lib

PyTree = Any


@dataclasses.dataclass
class Classifier:
  """A backbone (see `lqf.models.backbone`) as pure functions and its weights.

  train_apply(params, batch_stats, x) -> (logits, new_batch_stats) with batch norm on
  batch statistics; apply(params, batch_stats, x) -> logits [N, C] and
  features(params, batch_stats, x) -> embedding [N, D], with running statistics.
  `train_apply_both` and `apply_both` give (logits, embedding) from one forward pass.
  `split_at(point, output="logits")` is the backbone's `split_at` of the model;
  `linearizable(params, scope, batch_norm) -> subtree` the weights a scope linearizes
  (what `linearize.linearize` takes as `select`);
  `backbone` is the family's module (`backbone.for_arch(model_cfg["arch"])`).
  """
  apply: Callable[..., jax.Array]
  train_apply: Callable[..., tuple[jax.Array, PyTree]]
  features: Callable[..., jax.Array]
  split_at: Callable[..., tuple[Callable[..., jax.Array], Callable[..., jax.Array]]]
  params: PyTree
  batch_stats: PyTree
  apply_both: Callable[..., tuple[jax.Array, jax.Array]] | None = None
  train_apply_both: Callable[..., tuple[tuple[jax.Array, jax.Array], PyTree]] | None = None
  linearizable: Callable[..., PyTree] | None = None
  backbone: Any = None


def build_classifier(model_cfg: Mapping[str, Any], num_classes: int, in_channels: int,
                     seed: int) -> Classifier:
  cfg = dict(model_cfg, num_classes=num_classes, in_channels=in_channels)
  bb = backbone_lib.for_arch(cfg["arch"])
  model = bb.build(cfg, nnx.Rngs(seed))
  apply, params, batch_stats = bb.split_apply(model, "logits")
  train_apply, _, _ = bb.split_train_apply(model, "logits")
  features, _, _ = bb.split_apply(model, "features")
  apply_both, _, _ = bb.split_apply(model, "both")
  train_apply_both, _, _ = bb.split_train_apply(model, "both")
  select = backbone_lib.selector(bb)
  split_at = functools.partial(bb.split_at, model)
  return Classifier(apply, train_apply, features, split_at, params, batch_stats,
                    apply_both, train_apply_both, linearizable=select, backbone=bb)
