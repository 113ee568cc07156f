"""The backbone protocol and its registry: what training and linearization may ask of a
network family, so that nothing outside the family's module names its weights.

A backbone is a module (or any object) providing

* `build(cfg, rngs) -> nnx.Module`: the network of a `model` config block (with
  num_classes and in_channels filled in);
* `split_apply(model, output)`: `(apply, params, batch_stats)`, normalisation frozen;
  `output` is "logits", "features" or "both";
* `split_train_apply(model, output)`: `(train_apply, params, batch_stats)` in training
  mode; `train_apply(params, batch_stats, x) -> (out, new_batch_stats)`;
* `split_at(model, point, output)`: `(prefix, suffix)` at "input", "last_stage" or
  "head", `output` "logits" or "joint" (logits then embedding in one array);
* `replace_head(model, num_classes, rngs)`: a fresh head, in place;
* `scope_subtree(params, scope) -> dict`: the nested subset of `params` that scope
  "all", "last_stage" or "head" linearizes (normalisation layers included);
* `is_batch_norm(key) -> bool`: whether a params key names a normalisation layer that
  linearization leaves frozen unless asked (`batch_norm=True`).

`params` are plain nested dicts (`nnx.to_pure_dict`), list indices as int keys, with the
classifier under `params["head"]` (`{"kernel": [D, C], "bias": [C]}`): the one key that
heads, fresh-head fine-tuning and BCT's influence loss read directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

import lqf.models.resnet as resnet
import lqf.models.vit as vit

SCOPES = ("all", "last_stage", "head")

REGISTRY: dict[str, ModuleType] = {"cifar": resnet, "imagenet": resnet, "vit": vit}


def for_arch(arch: str) -> Any:
  """The backbone module of `model.arch`."""
  if arch not in REGISTRY:
    raise ValueError(f"unknown model arch {arch!r}: use one of {', '.join(REGISTRY)}")
  return REGISTRY[arch]


def register(arch: str, module: Any) -> None:
  """Adds a backbone family under `arch` (it must provide the protocol above)."""
  missing = [f for f in ("build", "split_apply", "split_train_apply", "split_at",
                         "replace_head", "scope_subtree", "is_batch_norm")
             if not callable(getattr(module, f, None))]
  if missing:
    raise TypeError(f"backbone for {arch!r} lacks {', '.join(missing)}")
  REGISTRY[arch] = module


def linearizable(backbone: Any, params: Mapping[str, Any], scope: str,
                 batch_norm: bool = False) -> dict[str, Any]:
  """`backbone.scope_subtree(params, scope)`, less the keys `backbone.is_batch_norm`
  names unless `batch_norm`."""
  if scope not in SCOPES:
    raise ValueError(f"unknown scope {scope!r}: use one of {', '.join(SCOPES)}")
  part = backbone.scope_subtree(params, scope)
  return part if batch_norm else _drop(part, backbone.is_batch_norm)


def _drop(tree: Mapping[Any, Any], is_norm: Any) -> dict[Any, Any]:
  return {k: _drop(v, is_norm) if isinstance(v, Mapping) else v for k, v in tree.items()
          if not is_norm(k)}


def selector(backbone: Any):
  """`(params, scope, batch_norm) -> subtree` for `backbone` (see `linearizable`)."""
  def select(params: Mapping[str, Any], scope: str, batch_norm: bool = False
             ) -> dict[str, Any]:
    return linearizable(backbone, params, scope, batch_norm)
  return select
