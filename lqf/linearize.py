"""The linearized network `f_lin(x; δ) = f(x; w0) + J(x) δ`, with one `jax.jvp`.

Only a suffix of the network may be linearized (`scope`): "all" (every weight),
"last_stage" (the last residual stage or transformer block, and the head) or "head";
the backbone (`lqf.models.backbone`) says which weights those are. The frozen prefix is
computed once per image (`Linearized.prefix`), so training touches only the suffix.

kfac-jax sees Kronecker-factorable conv/dense layers only if the optimised variable is
`δ` itself, fed as the tangent of `jax.jvp(f, (w0,), (δ,))`; forming `w0 + δ` inside the
loss makes every layer fall back to a diagonal block. So `δ` is the parameter, and `w0`,
the frozen weights and the batch statistics travel as `LinState`, an argument rather
than a closure (closed-over arrays become constants that XLA folds at length).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

import lqf.models.backbone as backbone_lib
import lqf.models.resnet as resnet

PyTree = Any
SCOPES = {"all": "input", "last_stage": "last_stage", "head": "head"}
LinState = dict[str, PyTree]  # {"w0": linearized weights, "params": all weights, "batch_stats"}


def linearized_subtree(params: Mapping[str, Any], scope: str, *,
                       batch_norm: bool = False, backbone: Any = None) -> dict[str, Any]:
  """The part of `params` that `scope` linearizes, as a nested dict of the same keys.

  `backbone` (a module of `lqf.models.backbone`'s registry, or any object with
  `scope_subtree` and `is_batch_norm`) says which keys those are; None means the ResNets
  (`lqf.models.resnet`), as before backbones were pluggable.

  Batch-norm scales and shifts are left frozen unless `batch_norm`: kfac-jax can only
  give them diagonal blocks, which underestimate their curvature (a shift moves a whole
  channel at once) badly enough to make K-FAC steps diverge.
  """
  if scope not in SCOPES:
    raise ValueError(f"unknown scope {scope!r}: use one of {', '.join(SCOPES)}")
  return backbone_lib.linearizable(resnet if backbone is None else backbone, params,
                                   scope, batch_norm)


def merge(params: Mapping[str, Any], part: Mapping[str, Any]) -> dict[str, Any]:
  """`params` with the leaves of `part` (a nested subset of its keys) put in."""
  out = dict(params)
  for k, v in part.items():
    out[k] = merge(params[k], v) if isinstance(v, Mapping) else v
  return out


@dataclasses.dataclass(frozen=True)
class Linearized:
  """A network linearized around `state["w0"]`.

  prefix(x) -> h: the frozen part, [N, ...] -> [N, ...] (identity for scope "all").
  apply(δ, state, h) -> logits [N, C]: `f(h; w0) + J(h) δ`, linear in δ.
  nonlinear(w, state, h) -> logits: the suffix itself at weights w (for comparisons).
  """
  prefix: Callable[[jax.Array], jax.Array]
  apply: Callable[[PyTree, LinState, jax.Array], jax.Array]
  nonlinear: Callable[[PyTree, LinState, jax.Array], jax.Array]
  state: LinState
  scope: str

  def zeros(self) -> PyTree:
    """δ = 0, in fresh buffers (kfac-jax donates δ; it must never alias w0)."""
    return jax.tree.map(jnp.zeros_like, self.state["w0"])


def linearize(split_at: Callable[[str], tuple[Callable, Callable]], params: PyTree,
              batch_stats: PyTree, scope: str, *, batch_norm: bool = False,
              select: Callable[..., PyTree]) -> Linearized:
  """Linearizes a network given by `split_at` (see `lqf.models.backbone`) around `params`;
  `scope` and `batch_norm` choose the weights.

  The weights are `select(params, scope, batch_norm)`: a classifier's `linearizable`,
  which its backbone family defines (`lqf.models.backbone`).
  """
  if scope not in SCOPES:
    raise ValueError(f"unknown scope {scope!r}: use one of {', '.join(SCOPES)}")
  prefix_fn, suffix_fn = split_at(SCOPES[scope])

  def nonlinear(w: PyTree, state: LinState, h: jax.Array) -> jax.Array:
    return suffix_fn(merge(state["params"], w), state["batch_stats"], h)

  def apply(delta: PyTree, state: LinState, h: jax.Array) -> jax.Array:
    y0, jd = jax.jvp(lambda w: nonlinear(w, state, h), (state["w0"],), (delta,))
    return y0 + jd

  w0 = select(params, scope, batch_norm)
  state = {"w0": jax.tree.map(jnp.array, w0),
           "params": params, "batch_stats": batch_stats}
  prefix = jax.jit(lambda x: prefix_fn(params, batch_stats, x))
  return Linearized(prefix=prefix, apply=apply, nonlinear=nonlinear, state=state, scope=scope)


def prefix_features(lin: Linearized, images: jax.Array, batch_size: int = 256) -> jax.Array:
  """`lin.prefix` over a whole array of images, in batches. [N, ...] -> [N, ...]."""
  if lin.scope == "all":
    return jnp.asarray(images)
  return jnp.concatenate([lin.prefix(images[i:i + batch_size])
                          for i in range(0, len(images), batch_size)])
