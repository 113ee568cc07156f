"""Training losses for a new embedding model that must stay comparable with an old one.

With φ_new the new embedding, (W_new, b_new) its own head and (W_old, b_old) the old
model's frozen head (extended to the new label set by `synthesize_head`):

* "independent": CE(W_new φ_new + b_new, y), no constraint.
* "l2": CE + λ ‖m(φ_new) - φ_old‖², regression onto the old embedding.
* "bct": CE + λ CE(W_old m(φ_new) + b_old, y), the influence loss (Shen et al. 2020).

m maps the new embedding onto the old size (`embedding.match_dim`). Several old heads
(a chain of updates constrained by all predecessors) add one influence term each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import bct.embedding as embedding
from lqf.errors import UserError, require
import lqf.models.resnet as resnet
import lqf.runtime.train as train

METHODS = ("independent", "l2", "bct")
SYNTH_NORMS = ("none", "match")


class OldHead(NamedTuple):
  """A frozen classifier over the new label set: logits = e @ kernel + bias, or with a
  `scale` the normalised (cosine) classifier s·cos(e, kernel_c) + bias_c.
  kernel [D_old, C], bias [C]."""
  kernel: np.ndarray
  bias: np.ndarray
  scale: float | None = None


def class_means(features: np.ndarray, labels: np.ndarray, classes: Sequence[int]
                ) -> np.ndarray:
  """The mean feature of each class in `classes`: [len(classes), D]."""
  features, labels = np.asarray(features, np.float64), np.asarray(labels)
  means = []
  for c in classes:
    rows = features[labels == c]
    require(len(rows) > 0, f"class {c} has no example to synthesize its old-head weights "
            "from: the new training set must hold every class the old model never saw")
    means.append(rows.mean(0))
  return np.stack(means).astype(np.float32)


def synthesize_head(kernel: np.ndarray, bias: np.ndarray, old_classes: Sequence[int],
                    num_classes: int, old_features: np.ndarray, labels: np.ndarray, *,
                    norm: str = "none", center: bool = False, scale: float | None = None
                    ) -> OldHead:
  """The old head over all `num_classes` labels.

  Column j of the trained head (kernel [D, C_old], bias [C_old]) scores label
  `old_classes[j]`. Every other label c gets the mean old embedding of its examples
  (`old_features` [N, D] with `labels` [N], the new training set through the old model)
  as its weight, as in BCT, and the mean trained bias, so that no class is favoured
  by its bias alone. `center` subtracts the mean old embedding of all of `old_features`
  first: features after a ReLU share a large common component, which would give every
  synthesized class a high score on every image. `norm="match"` rescales each synthesized weight to the mean norm
  of the trained columns (the class means are far shorter or longer than trained
  weights, which would make the new classes too weak or too strong). `scale` marks a
  cosine head (see `OldHead`), for which only the weights' directions matter.
  """
  kernel, bias = np.asarray(kernel, np.float32), np.asarray(bias, np.float32)
  old_classes = [int(c) for c in old_classes]
  require(kernel.ndim == 2 and bias.shape == (kernel.shape[1],),
          f"the old head's kernel {kernel.shape} and bias {bias.shape} do not form a "
          "[D, C] kernel and [C] bias")
  require(kernel.shape[1] == len(old_classes),
          f"the old head has {kernel.shape[1]} classes but the old model's label set "
          f"{old_classes} has {len(old_classes)}: the head and the label set belong to "
          "different models (check old.classes or the old model's run)")
  require(len(set(old_classes)) == len(old_classes) and
          all(0 <= c < num_classes for c in old_classes),
          f"the old label set {old_classes} must be distinct labels in [0, {num_classes})")
  require(norm in SYNTH_NORMS, f"unknown synth_norm {norm!r}: use one of "
          f"{', '.join(SYNTH_NORMS)}")
  require(np.shape(old_features)[-1] == kernel.shape[0],
          f"the old features have {np.shape(old_features)[-1]} dimensions, the old head "
          f"takes {kernel.shape[0]}")
  new_classes = [c for c in range(num_classes) if c not in old_classes]
  full_k = np.zeros((kernel.shape[0], num_classes), np.float32)
  full_b = np.zeros((num_classes,), np.float32)
  full_k[:, old_classes] = kernel
  full_b[old_classes] = bias
  if new_classes:
    means = class_means(old_features, labels, new_classes)
    if center:
      means = means - np.asarray(old_features, np.float64).mean(0).astype(np.float32)
    if norm == "match":
      target = np.linalg.norm(kernel, axis=0).mean()
      means = means * (target / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12))
    full_k[:, new_classes] = means.T
    full_b[new_classes] = bias.mean()
  return OldHead(full_k, full_b, scale)


def old_head_logits(features: jax.Array, head: OldHead, rule: str) -> jax.Array:
  """The old head on the new embedding: [B, D_new] -> [B, C]."""
  x = embedding.match_dim(features, head.kernel.shape[0], rule)
  if head.scale is not None:
    return resnet.cosine_logits(x, head.kernel, head.bias, head.scale)
  return x @ head.kernel + head.bias


def influence_ce(features: jax.Array, labels: jax.Array, head: OldHead, rule: str
                 ) -> jax.Array:
  """BCT's influence loss: mean CE of the old head on the new embedding."""
  return train.cross_entropy(old_head_logits(features, head, rule), labels)


def l2_regression(features: jax.Array, old_features: jax.Array, rule: str) -> jax.Array:
  """Mean over the batch of ‖m(φ_new) - φ_old‖²."""
  diff = embedding.match_dim(features, old_features.shape[-1], rule) - old_features
  return jnp.mean(jnp.sum(jnp.square(diff), axis=-1))


LossFn = Callable[[tuple[jax.Array, jax.Array], jax.Array, Any], jax.Array]


def make_loss(method: str, *, lam: float, rule: str, heads: Sequence[OldHead] = ()
              ) -> LossFn:
  """`loss((logits, embedding), labels, extras)` for `train.fit(with_features=True)`;
  for "l2", `extras` is the batch's old embeddings [B, D_old]."""
  if method not in METHODS:
    raise UserError(f"unknown bct.method {method!r}: use one of {', '.join(METHODS)}")
  if method == "bct" and not heads:
    raise UserError("the bct loss needs at least one old head")
  heads = [OldHead(jnp.asarray(h.kernel), jnp.asarray(h.bias), h.scale) for h in heads]

  def loss(outputs, labels, extras):
    logits, feats = outputs
    value = train.cross_entropy(logits, labels)
    if method == "l2":
      value = value + lam * l2_regression(feats, extras, rule)
    elif method == "bct":
      value = value + lam * sum(influence_ce(feats, labels, h, rule) for h in heads)
    return value

  return loss
