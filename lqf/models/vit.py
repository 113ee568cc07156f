"""A small Vision Transformer in Flax NNX, and pure `(params, batch_stats, x)` views of it.

The second backbone family of `lqf.models.backbone` (arch="vit"), small enough for the
digits benchmark: patches of `patch`² pixels embedded by one dense layer, a learned
position embedding, `depth` pre-norm transformer blocks (LayerNorm -> multi-head
self-attention -> residual; LayerNorm -> two-layer MLP -> residual), a final LayerNorm,
the mean of the tokens as the embedding, and a linear (or cosine) head.

Every weight matrix is a plain 2-D `nnx.Linear` kernel applied to the [N, T, in]
tokens, so that kfac-jax recognises each one as a (repeated) dense layer and gives it a
Kronecker-factored block; the position embedding (and the LayerNorms, if linearized)
get diagonal blocks.

There is no batch norm: `batch_stats` is always the empty dict, and training mode is
the same function as evaluation (no dropout).

Inputs are NHWC with H = W = `image_size`, a multiple of `patch`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

import lqf.models.resnet as resnet

Params = dict[str, Any]
BatchStats = dict[str, Any]

ARCH = "vit"
HEADS = ("linear", "cosine")
ACTIVATIONS = ("gelu", "relu", "leaky_relu")
SPLIT_POINTS = ("input", "last_stage", "head")
# Params keys of the LayerNorms: frozen by linearization unless batch_norm=True.
NORM_KEYS = ("norm1", "norm2", "norm")


def _activate(x: jax.Array, activation: str, leaky_slope: float) -> jax.Array:
  if activation == "gelu":
    return jax.nn.gelu(x)
  if activation == "relu":
    return jax.nn.relu(x)
  return jax.nn.leaky_relu(x, negative_slope=leaky_slope)


def _dense(layer: nnx.Linear, x: jax.Array) -> jax.Array:
  """`layer` on [N, T, in] -> [N, T, out]: one dot_general over the last axis, which
  kfac-jax tags as a "repeated dense" layer (batch axis first, tokens repeated) and
  gives a Kronecker-factored block. (Flattening tokens into rows would also be tagged,
  but then the layer's first axis is no longer the batch and kfac-jax's curvature
  update refuses it.)"""
  return layer(x)


def _positive_int(name: str, value: Any) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


class Attention(nnx.Module):
  """Multi-head self-attention: [N, T, D] -> [N, T, D], q/k/v/out dense D -> D."""

  def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs) -> None:
    self.heads = heads
    self.q = nnx.Linear(dim, dim, rngs=rngs)
    self.k = nnx.Linear(dim, dim, rngs=rngs)
    self.v = nnx.Linear(dim, dim, rngs=rngs)
    self.out = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    n, t, d = x.shape
    hd = d // self.heads
    split = lambda y: y.reshape(n, t, self.heads, hd)
    q, k, v = split(_dense(self.q, x)), split(_dense(self.k, x)), split(_dense(self.v, x))
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) / jnp.sqrt(jnp.asarray(hd, x.dtype))
    weights = jax.nn.softmax(logits, axis=-1)
    y = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, t, d)
    return _dense(self.out, y)


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(LN(x)), then y + mlp(LN(y))."""

  def __init__(self, dim: int, heads: int, mlp_dim: int, *, activation: str,
               leaky_slope: float, rngs: nnx.Rngs) -> None:
    self.activation = activation
    self.leaky_slope = leaky_slope
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = Attention(dim, heads, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, mlp_dim, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x))
    y = _activate(_dense(self.fc1, self.norm2(x)), self.activation, self.leaky_slope)
    return x + _dense(self.fc2, y)


class ViT(nnx.Module):
  """A small ViT; NHWC images in, logits out.

  Attributes:
    embed: `nnx.Linear(patch² · in_channels, dim)` on flattened patches.
    pos: position embedding, an `nnx.Param` [1, tokens, dim].
    blocks: `nnx.List` of `Block`s.
    norm: the final LayerNorm.
    head: `nnx.Linear(dim, num_classes)` or a `resnet.CosineHead`.
    feature_dim: `dim` (the embedding is the mean of the final tokens).
  """

  def __init__(self, *, patch: int, dim: int, depth: int, heads: int, mlp_dim: int,
               num_classes: int, in_channels: int, image_size: int,
               activation: str = "leaky_relu", leaky_slope: float = 0.1,
               head: str = "linear", head_scale: float = 16.0, rngs: nnx.Rngs) -> None:
    for name, value in (("patch", patch), ("dim", dim), ("depth", depth), ("heads", heads),
                        ("mlp_dim", mlp_dim), ("num_classes", num_classes),
                        ("in_channels", in_channels), ("image_size", image_size)):
      _positive_int(name, value)
    if dim % heads:
      raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
    if image_size % patch:
      raise ValueError(f"image_size ({image_size}) must be a multiple of patch ({patch})")
    resnet.check_activation(activation, leaky_slope, ACTIVATIONS)
    if head not in HEADS:
      raise ValueError(f"unknown head {head!r}: use one of {', '.join(HEADS)}")
    if not head_scale > 0:
      raise ValueError(f"head_scale must be positive, got {head_scale!r}")
    self.patch = int(patch)
    self.image_size = int(image_size)
    self.in_channels = int(in_channels)
    self.head_kind = head
    self.head_scale = float(head_scale)
    self.feature_dim: int = int(dim)
    tokens = (image_size // patch) ** 2
    self.embed = nnx.Linear(patch * patch * in_channels, dim, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens, dim)))
    self.blocks = nnx.List([Block(dim, heads, mlp_dim, activation=activation,
                                  leaky_slope=float(leaky_slope), rngs=rngs)
                            for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = _make_head(dim, num_classes, head, head_scale, rngs=rngs)

  def tokens(self, x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> embedded patches plus positions (N, T, dim)."""
    n, h, w, c = x.shape
    p = self.patch
    if h != self.image_size or w != self.image_size or c != self.in_channels:
      raise ValueError(f"this ViT takes {self.image_size}x{self.image_size}x"
                       f"{self.in_channels} images, got {h}x{w}x{c}: set model.image_size "
                       "to data.image_size")
    y = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    y = y.reshape(n, (h // p) * (w // p), p * p * c)
    return _dense(self.embed, y) + self.pos[...]

  def pool(self, y: jax.Array) -> jax.Array:
    """Final LayerNorm and the mean over tokens: (N, T, dim) -> (N, dim)."""
    return jnp.mean(self.norm(y), axis=1)

  def features(self, x: jax.Array) -> jax.Array:
    y = self.tokens(x)
    for block in self.blocks:
      y = block(y)
    return self.pool(y)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.features(x))


def _make_head(din: int, dout: int, head: str, scale: float, *, rngs: nnx.Rngs
               ) -> nnx.Module:
  if head == "cosine":
    return resnet.CosineHead(din, dout, scale=scale, rngs=rngs)
  return nnx.Linear(din, dout, rngs=rngs)


def build(cfg: Mapping[str, Any], rngs: nnx.Rngs) -> ViT:
  """A `ViT` from a config with keys patch, dim, depth, heads, mlp_dim, num_classes,
  in_channels, image_size and optionally activation, leaky_slope, head, head_scale."""
  return ViT(patch=cfg["patch"], dim=cfg["dim"], depth=cfg["depth"], heads=cfg["heads"],
             mlp_dim=cfg["mlp_dim"], num_classes=cfg["num_classes"],
             in_channels=cfg["in_channels"], image_size=cfg["image_size"],
             activation=cfg.get("activation", "leaky_relu"),
             leaky_slope=cfg.get("leaky_slope", 0.1), head=cfg.get("head", "linear"),
             head_scale=cfg.get("head_scale", 16.0), rngs=rngs)


def replace_head(model: ViT, num_classes: int, *, rngs: nnx.Rngs) -> ViT:
  """Gives `model` a fresh (non-zero, lecun normal) head of its kind, in place."""
  if not isinstance(num_classes, (int, np.integer)) or num_classes <= 0:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
  model.head = _make_head(model.feature_dim, int(num_classes), model.head_kind,
                          model.head_scale, rngs=rngs)
  return model


def _pure_view(model: ViT) -> tuple[Callable[[Params], ViT], Params]:
  """`(rebuild, params)`: `rebuild(params)` is a new model (fresh Variables) at params."""
  graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)

  def rebuild(params: Params) -> ViT:
    new_params = jax.tree.map(lambda v: v, params_state)
    nnx.replace_by_pure_dict(new_params, params)
    return nnx.merge(graphdef, new_params, jax.tree.map(lambda v: v, rest))

  return rebuild, nnx.to_pure_dict(params_state)


def _check_output(output: str, allowed: tuple[str, ...]) -> None:
  if output not in allowed:
    raise ValueError(f"unknown output {output!r}: use one of {', '.join(allowed)}")


def split_apply(model: ViT, output: Literal["logits", "features", "both"] = "logits"
                ) -> tuple[Callable[..., Any], Params, BatchStats]:
  """`(apply, params, {})`: `apply(params, batch_stats, x)` gives logits [N, C],
  features [N, dim] or (logits, features); `batch_stats` is ignored (there are none)."""
  _check_output(output, ("logits", "features", "both"))
  rebuild, params = _pure_view(model)

  def apply(params: Params, batch_stats: BatchStats, x: jax.Array) -> Any:
    del batch_stats
    net = rebuild(params)
    feats = net.features(x)
    if output == "features":
      return feats
    logits = net.head(feats)
    return logits if output == "logits" else (logits, feats)

  return apply, params, {}


def split_train_apply(model: ViT, output: Literal["logits", "both"] = "logits"
                      ) -> tuple[Callable[..., tuple[Any, BatchStats]], Params, BatchStats]:
  """`(train_apply, params, {})`: `train_apply(params, batch_stats, x) -> (out,
  batch_stats)`, the statistics returned unchanged (no batch norm, no dropout)."""
  _check_output(output, ("logits", "both"))
  apply, params, stats = split_apply(model, output)

  def train_apply(params: Params, batch_stats: BatchStats, x: jax.Array
                  ) -> tuple[Any, BatchStats]:
    return apply(params, batch_stats, x), batch_stats

  return train_apply, params, stats


def split_at(model: ViT, point: str, output: Literal["logits", "joint"] = "logits"
             ) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
  """`(prefix, suffix)` with `suffix(p, s, prefix(p, s, x)) == apply(p, s, x)`.

  `point`: "input" (prefix the identity), "last_stage" (prefix: patches, positions and
  all blocks but the last, tokens [N, T, dim]) or "head" (prefix: the pooled features).
  With `output="joint"` the suffix returns [N, C + dim], logits then embedding.
  """
  if point not in SPLIT_POINTS:
    raise ValueError(f"unknown split point {point!r}: use one of {', '.join(SPLIT_POINTS)}")
  _check_output(output, ("logits", "joint"))
  rebuild, _ = _pure_view(model)
  last = len(model.blocks) - 1

  def head(net: ViT, feats: jax.Array) -> jax.Array:
    logits = net.head(feats)
    return logits if output == "logits" else jnp.concatenate([logits, feats], axis=-1)

  def prefix(params: Params, batch_stats: BatchStats, x: jax.Array) -> jax.Array:
    if point == "input":
      return x
    net = rebuild(params)
    if point == "head":
      return net.features(x)
    y = net.tokens(x)
    for block in list(net.blocks)[:last]:
      y = block(y)
    return y

  def suffix(params: Params, batch_stats: BatchStats, h: jax.Array) -> jax.Array:
    net = rebuild(params)
    if point == "input":
      return head(net, net.features(h))
    if point == "head":
      return head(net, h)
    return head(net, net.pool(net.blocks[last](h)))

  return prefix, suffix


def scope_subtree(params: Mapping[str, Any], scope: str) -> dict[str, Any]:
  """Scope "all": every weight; "last_stage": the last block, the final LayerNorm and
  the head; "head": the head. LayerNorms included (see `is_batch_norm`)."""
  if scope == "all":
    return dict(params)
  if scope == "head":
    return {"head": params["head"]}
  if scope == "last_stage":
    blocks = params["blocks"]
    last = max(blocks, key=int)
    return {"blocks": {last: blocks[last]}, "norm": params["norm"], "head": params["head"]}
  raise ValueError(f"unknown scope {scope!r}: use one of all, last_stage, head")


def is_batch_norm(key: Any) -> bool:
  """True for the LayerNorms' keys. A ViT has no batch norm, but its LayerNorm scales
  and shifts are treated like batch-norm ones: frozen by linearization unless
  `batch_norm=True`, since kfac-jax can only give them diagonal blocks."""
  return key in NORM_KEYS
