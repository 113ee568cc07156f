"""ResNets in Flax NNX, and pure `(params, batch_stats, x)` views of them.

Two families share one `ResNet` class:

* `arch="cifar"`: He et al. (2016) section 4.2, depth 6n+2 (8, 20, 32, 56; 8 is
  for tests and smoke runs), BasicBlocks
  in three stages of widths (w, 2w, 4w), a 3x3 stride-1 stem and no max pool.
* `arch="imagenet"`: torchvision's ResNet-18/34/50 (v1.5: a Bottleneck strides on its
  3x3 conv), four stages of widths (w, 2w, 4w, 8w). Layer shapes, padding, bias-free
  convs and BN epsilon mirror torchvision exactly, so with `width=64` its weights map
  one to one onto this model (kernels OIHW -> HWIO).

Inputs are NHWC. Linearised fine-tuning needs the network as a pure function of its
parameters; `split_apply` and `split_train_apply` give that, with batch norm frozen to
its running statistics or in training mode respectively.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]
BatchStats = dict[str, Any]
ApplyFn = Callable[[Params, BatchStats, jax.Array], jax.Array]
ApplyTrainFn = Callable[[Params, BatchStats, jax.Array], tuple[jax.Array, BatchStats]]

ARCHS = ("cifar", "imagenet")
HEADS = ("linear", "cosine")
ACTIVATIONS = ("relu", "leaky_relu")
CIFAR_BLOCKS = {8: 1, 20: 3, 32: 5, 56: 9}  # Blocks per stage: depth = 6n + 2.
IMAGENET_LAYOUTS = {  # depth -> (block kind, blocks per stage), as in torchvision.
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}
BOTTLENECK_EXPANSION = 4

# torchvision's BN defaults; flax's momentum weights the old statistic (torch's 0.1).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9
# torchvision initialises convs with kaiming_normal_(mode="fan_out", relu); the same
# here keeps freshly built models statistically comparable to torchvision ones.
CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

_PAD1 = ((1, 1), (1, 1))
_PAD3 = ((3, 3), (3, 3))


def _activate(x: jax.Array, activation: str, leaky_slope: float) -> jax.Array:
  if activation == "relu":
    return jax.nn.relu(x)
  return jax.nn.leaky_relu(x, negative_slope=leaky_slope)


def _conv(cin: int, cout: int, kernel: int, stride: int, *, rngs: nnx.Rngs) -> nnx.Conv:
  # Explicit symmetric padding: 'SAME' pads asymmetrically at stride 2 and would no
  # longer match torchvision's outputs for the same weights.
  padding = {1: "VALID", 3: _PAD1, 7: _PAD3}[kernel]
  return nnx.Conv(cin, cout, (kernel, kernel), (stride, stride), padding=padding,
                  use_bias=False, kernel_init=CONV_INIT, rngs=rngs)


def _bn(c: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(c, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)


class BasicBlock(nnx.Module):
  """Two 3x3 convs and a residual: (N, H, W, cin) -> (N, H/stride, W/stride, cout)."""

  def __init__(self, cin: int, cout: int, stride: int, *, activation: str,
               leaky_slope: float, rngs: nnx.Rngs) -> None:
    self.activation = activation
    self.leaky_slope = leaky_slope
    self.conv1 = _conv(cin, cout, 3, stride, rngs=rngs)
    self.bn1 = _bn(cout, rngs=rngs)
    self.conv2 = _conv(cout, cout, 3, 1, rngs=rngs)
    self.bn2 = _bn(cout, rngs=rngs)
    self.shortcut_conv, self.shortcut_bn = _projection(cin, cout, stride, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    act = lambda y: _activate(y, self.activation, self.leaky_slope)
    y = act(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return act(y + _shortcut(self, x))


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (strided) -> 1x1 convs and a residual.

  (N, H, W, cin) -> (N, H/stride, W/stride, 4 * planes), torchvision v1.5.
  """

  def __init__(self, cin: int, planes: int, stride: int, *, activation: str,
               leaky_slope: float, rngs: nnx.Rngs) -> None:
    cout = planes * BOTTLENECK_EXPANSION
    self.activation = activation
    self.leaky_slope = leaky_slope
    self.conv1 = _conv(cin, planes, 1, 1, rngs=rngs)
    self.bn1 = _bn(planes, rngs=rngs)
    self.conv2 = _conv(planes, planes, 3, stride, rngs=rngs)
    self.bn2 = _bn(planes, rngs=rngs)
    self.conv3 = _conv(planes, cout, 1, 1, rngs=rngs)
    self.bn3 = _bn(cout, rngs=rngs)
    self.shortcut_conv, self.shortcut_bn = _projection(cin, cout, stride, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    act = lambda y: _activate(y, self.activation, self.leaky_slope)
    y = act(self.bn1(self.conv1(x)))
    y = act(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return act(y + _shortcut(self, x))


def _projection(cin: int, cout: int, stride: int, *, rngs: nnx.Rngs
                ) -> tuple[nnx.Conv | None, nnx.BatchNorm | None]:
  # Assigned once, never None-then-module: nnx would freeze a None attribute as static
  # and then refuse a module in it.
  if stride == 1 and cin == cout:
    return None, None
  return _conv(cin, cout, 1, stride, rngs=rngs), _bn(cout, rngs=rngs)


def _shortcut(block: BasicBlock | Bottleneck, x: jax.Array) -> jax.Array:
  if block.shortcut_conv is None or block.shortcut_bn is None:
    return x
  return block.shortcut_bn(block.shortcut_conv(x))


def _check_config(arch: str, depth: int, num_classes: int, width: int, activation: str,
                  leaky_slope: float, in_channels: int) -> None:
  if arch not in ARCHS:
    raise ValueError(f"unknown ResNet arch {arch!r}: use one of {', '.join(ARCHS)}")
  depths = CIFAR_BLOCKS if arch == "cifar" else IMAGENET_LAYOUTS
  if depth not in depths:
    raise ValueError(f"unsupported depth {depth!r} for arch {arch!r}: use one of "
                     f"{', '.join(map(str, depths))}")
  for name, value in (("width", width), ("num_classes", num_classes),
                      ("in_channels", in_channels)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  check_activation(activation, leaky_slope, ACTIVATIONS)


def check_activation(activation: str, leaky_slope: float, allowed: tuple[str, ...]) -> None:
  """Raises ValueError unless `activation` is one of `allowed` and 0 ≤ `leaky_slope` < 1."""
  if activation not in allowed:
    raise ValueError(f"unknown activation {activation!r}: use one of {', '.join(allowed)}")
  if not 0.0 <= leaky_slope < 1.0:
    raise ValueError(f"leaky_slope must be in [0, 1), got {leaky_slope!r}")


class CosineHead(nnx.Module):
  """A normalised classifier: logits = s · cos(φ, w_c) + b_c, with the columns w_c of
  `kernel` [D, C]. Features of a class gather around its weight's direction, which is
  what makes embeddings of two models trained against one head comparable."""

  def __init__(self, din: int, dout: int, *, scale: float, rngs: nnx.Rngs) -> None:
    self.scale = float(scale)
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (din, dout)))
    self.bias = nnx.Param(jnp.zeros((dout,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return cosine_logits(x, self.kernel[...], self.bias[...], self.scale)


def cosine_logits(x: jax.Array, kernel: jax.Array, bias: jax.Array, scale: float
                  ) -> jax.Array:
  """s · (x/‖x‖) @ (kernel/‖kernel‖_columns) + bias: [N, D] -> [N, C]."""
  xn = x / jnp.sqrt(jnp.sum(jnp.square(x), -1, keepdims=True) + 1e-12)
  kn = kernel / jnp.sqrt(jnp.sum(jnp.square(kernel), 0, keepdims=True) + 1e-12)
  return scale * (xn @ kn) + bias


def _make_head(din: int, dout: int, head: str, scale: float, *, rngs: nnx.Rngs
               ) -> nnx.Module:
  if head == "cosine":
    return CosineHead(din, dout, scale=scale, rngs=rngs)
  return nnx.Linear(din, dout, rngs=rngs)


class ResNet(nnx.Module):
  """A CIFAR- or ImageNet-style ResNet; NHWC images in, logits out.

  Attributes:
    conv_init, bn_init: the stem (plus a 3x3/2 max pool for arch="imagenet").
    stages: `nnx.List` of stages, each an `nnx.List` of blocks; the first block of a
      stage downsamples (except stage 0) and carries `shortcut_conv/shortcut_bn` when
      its input and output shapes differ.
    head: `nnx.Linear(feature_dim, num_classes)`, or a `CosineHead` (`head="cosine"`,
      logits scaled by `head_scale`); both hold params {"kernel": [D, C], "bias": [C]}.
    feature_dim: width of the pooled embedding: 4w (cifar), 8w (imagenet basic),
      32w (imagenet bottleneck).

  Batch norm uses batch statistics after `model.train()` (the nnx default) and running
  statistics after `model.eval()`.
  """

  def __init__(self, *, arch: str, depth: int, num_classes: int, width: int,
               activation: str = "leaky_relu", leaky_slope: float = 0.1,
               in_channels: int = 3, head: str = "linear", head_scale: float = 16.0,
               rngs: nnx.Rngs) -> None:
    _check_config(arch, depth, num_classes, width, activation, leaky_slope, in_channels)
    if head not in HEADS:
      raise ValueError(f"unknown head {head!r}: use one of {', '.join(HEADS)}")
    if not head_scale > 0:
      raise ValueError(f"head_scale must be positive, got {head_scale!r}")
    self.head_kind = head
    self.head_scale = float(head_scale)
    self.arch = arch
    self.depth = depth
    self.activation = activation
    self.leaky_slope = float(leaky_slope)
    block_kw = dict(activation=activation, leaky_slope=self.leaky_slope, rngs=rngs)

    if arch == "cifar":
      kind, blocks = "basic", (CIFAR_BLOCKS[depth],) * 3
      widths, strides = (width, 2 * width, 4 * width), (1, 2, 2)
      self.conv_init = _conv(in_channels, width, 3, 1, rngs=rngs)
    else:
      kind, blocks = IMAGENET_LAYOUTS[depth]
      widths, strides = (width, 2 * width, 4 * width, 8 * width), (1, 2, 2, 2)
      self.conv_init = _conv(in_channels, width, 7, 2, rngs=rngs)
    self.bn_init = _bn(width, rngs=rngs)

    expansion = BOTTLENECK_EXPANSION if kind == "bottleneck" else 1
    cin = width
    stages = []
    for stage_width, stage_stride, n in zip(widths, strides, blocks):
      stage = []
      for i in range(n):
        stride = stage_stride if i == 0 else 1
        if kind == "bottleneck":
          stage.append(Bottleneck(cin, stage_width, stride, **block_kw))
        else:
          stage.append(BasicBlock(cin, stage_width, stride, **block_kw))
        cin = stage_width * expansion
      stages.append(nnx.List(stage))
    self.stages = nnx.List(stages)
    self.feature_dim: int = cin
    self.head = _make_head(cin, num_classes, head, head_scale, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """(N, H, W, in_channels) -> globally average-pooled embedding (N, feature_dim)."""
    y = _activate(self.bn_init(self.conv_init(x)), self.activation, self.leaky_slope)
    if self.arch == "imagenet":
      y = nnx.max_pool(y, (3, 3), (2, 2), padding=_PAD1)
    for stage in self.stages:
      for block in stage:
        y = block(y)
    return jnp.mean(y, axis=(1, 2))

  def __call__(self, x: jax.Array) -> jax.Array:
    """(N, H, W, in_channels) -> logits (N, num_classes)."""
    return self.head(self.features(x))


def build_resnet(cfg: Mapping[str, Any], *, rngs: nnx.Rngs) -> ResNet:
  """Builds a `ResNet` from a config with keys arch, depth, width, num_classes,
  activation, leaky_slope, in_channels and optionally head, head_scale (e.g. an
  ml_collections.ConfigDict)."""
  return ResNet(arch=cfg["arch"], depth=cfg["depth"], width=cfg["width"],
                num_classes=cfg["num_classes"], activation=cfg["activation"],
                leaky_slope=cfg["leaky_slope"], in_channels=cfg["in_channels"],
                head=cfg.get("head", "linear"), head_scale=cfg.get("head_scale", 16.0),
                rngs=rngs)


def replace_head(model: ResNet, num_classes: int, *, rngs: nnx.Rngs) -> ResNet:
  """Gives `model` a fresh head of its kind for `num_classes`, in place.

  The head keeps nnx's default (lecun normal) initialisation on purpose: with a zero
  head the logits' Jacobian with respect to every backbone parameter is zero, which
  would make the linearised model blind to the backbone.
  """
  if not isinstance(num_classes, (int, np.integer)) or num_classes <= 0:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
  model.head = _make_head(model.feature_dim, int(num_classes), model.head_kind,
                         model.head_scale, rngs=rngs)
  return model


def count_params(params: Any) -> int:
  """Number of scalars in a pytree of arrays (or ShapeDtypeStructs, or an nnx.State)."""
  return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(params)))


def _pure_view(model: ResNet, *, use_running_average: bool
               ) -> tuple[Callable[[Params, BatchStats], ResNet], Params, BatchStats]:
  """Splits a BN-mode view of `model`; returns `(rebuild, params, batch_stats)`.

  `rebuild(params, batch_stats)` makes a new model whose Variables are all new objects:
  `nnx.merge` reuses the Variables of the State it is given, and those of `nnx.split`
  are the model's own, so merging them directly would let train-mode BN write into the
  original model.
  """
  view = nnx.view(model, use_running_average=use_running_average)
  graphdef, params_state, stats_state, rest = nnx.split(view, nnx.Param, nnx.BatchStat, ...)

  def rebuild(params: Params, batch_stats: BatchStats) -> ResNet:
    new_params = jax.tree.map(lambda v: v, params_state)  # Fresh Variable objects.
    new_stats = jax.tree.map(lambda v: v, stats_state)
    nnx.replace_by_pure_dict(new_params, params)
    nnx.replace_by_pure_dict(new_stats, batch_stats)
    return nnx.merge(graphdef, new_params, new_stats, jax.tree.map(lambda v: v, rest))

  return rebuild, nnx.to_pure_dict(params_state), nnx.to_pure_dict(stats_state)


def split_apply(model: ResNet, output: Literal["logits", "features", "both"] = "logits"
                ) -> tuple[ApplyFn, Params, BatchStats]:
  """Returns `(apply, params, batch_stats)` with BN frozen to running statistics.

  `apply(params, batch_stats, x)` maps (N, H, W, C) to logits (N, num_classes), to
  features (N, feature_dim) with `output="features"`, or to the pair (logits, features)
  from one forward pass with `output="both"`. It is pure (it neither mutates
  `model` nor updates statistics, whatever mode `model` is in), so it can be passed to
  `jax.jit`, `jax.jvp` and `jax.grad`. `params` and `batch_stats` are plain nested dicts
  (`nnx.to_pure_dict` of the states; list indices are int keys, "0"-style keys also work).
  """
  _check_output(output, ("logits", "features", "both"))
  rebuild, params, batch_stats = _pure_view(model, use_running_average=True)

  def apply(params: Params, batch_stats: BatchStats, x: jax.Array) -> Any:
    net = rebuild(params, batch_stats)
    if output == "logits":
      return net(x)
    feats = net.features(x)
    return feats if output == "features" else (net.head(feats), feats)

  return apply, params, batch_stats


def _check_output(output: str, allowed: tuple[str, ...]) -> None:
  if output not in allowed:
    raise ValueError(f"unknown output {output!r}: use one of {', '.join(allowed)}")


def split_train_apply(model: ResNet, output: Literal["logits", "both"] = "logits"
                      ) -> tuple[ApplyTrainFn, Params, BatchStats]:
  """Returns `(train_apply, params, batch_stats)` with BN in training mode.

  `train_apply(params, batch_stats, x) -> (logits, new_batch_stats)` (with
  `output="both"`, `((logits, features), new_batch_stats)`) normalises with
  the batch's statistics and returns the running statistics after one momentum update
  (`new = 0.9 * old + 0.1 * batch`, biased batch variance as in flax). It is pure, for a
  functional optax loop; `model` is left untouched.
  """
  _check_output(output, ("logits", "both"))
  rebuild, params, batch_stats = _pure_view(model, use_running_average=False)

  def train_apply(params: Params, batch_stats: BatchStats, x: jax.Array
                  ) -> tuple[Any, BatchStats]:
    net = rebuild(params, batch_stats)
    feats = net.features(x)
    logits = net.head(feats)
    out = logits if output == "logits" else (logits, feats)
    return out, nnx.to_pure_dict(nnx.state(net, nnx.BatchStat))

  return train_apply, params, batch_stats


SPLIT_POINTS = ("input", "last_stage", "head")


def split_at(model: ResNet, point: str, output: Literal["logits", "joint"] = "logits"
             ) -> tuple[Callable[[Params, BatchStats, jax.Array], jax.Array], ApplyFn]:
  """Cuts the network (batch norm on running statistics) into `prefix` and `suffix`.

  `suffix(params, batch_stats, prefix(params, batch_stats, x))` equals
  `split_apply(model)[0](params, batch_stats, x)`; with `output="joint"` the suffix
  returns one array [N, num_classes + feature_dim], the logits then the embedding (one
  array, so that a linearization of it is one Jacobian). `point` is where the suffix starts:
  "input" (the suffix is the whole network, the prefix the identity), "last_stage" (the
  last stage, pooling and head) or "head" (the head on pooled features). Linearizing
  only the suffix lets its frozen input be computed once per image and reused.
  """
  if point not in SPLIT_POINTS:
    raise ValueError(f"unknown split point {point!r}: use one of {', '.join(SPLIT_POINTS)}")
  _check_output(output, ("logits", "joint"))
  rebuild, _, _ = _pure_view(model, use_running_average=True)

  def head(net: ResNet, feats: jax.Array) -> jax.Array:
    logits = net.head(feats)
    return logits if output == "logits" else jnp.concatenate([logits, feats], axis=-1)

  n_stages = len(model.stages)
  first = {"input": 0, "last_stage": n_stages - 1, "head": n_stages}[point]

  def prefix(params: Params, batch_stats: BatchStats, x: jax.Array) -> jax.Array:
    if point == "input":
      return x
    net = rebuild(params, batch_stats)
    y = _activate(net.bn_init(net.conv_init(x)), net.activation, net.leaky_slope)
    if net.arch == "imagenet":
      y = nnx.max_pool(y, (3, 3), (2, 2), padding=_PAD1)
    for stage in list(net.stages)[:first]:
      for block in stage:
        y = block(y)
    return jnp.mean(y, axis=(1, 2)) if point == "head" else y

  def suffix(params: Params, batch_stats: BatchStats, h: jax.Array) -> jax.Array:
    net = rebuild(params, batch_stats)
    if point == "input":
      return head(net, net.features(h))
    if point == "head":
      return head(net, h)
    y = h
    for stage in list(net.stages)[first:]:
      for block in stage:
        y = block(y)
    return head(net, jnp.mean(y, axis=(1, 2)))

  return prefix, suffix


# The backbone protocol (`lqf.models.backbone`): what linearization needs to know about
# a ResNet's weights, kept here so that nothing else names its keys.

def build(cfg: Mapping[str, Any], rngs: nnx.Rngs) -> ResNet:
  """`build_resnet`, under the protocol's name."""
  return build_resnet(cfg, rngs=rngs)


def scope_subtree(params: Mapping[str, Any], scope: str) -> dict[str, Any]:
  """The nested part of `params` that scope "all" (every weight), "last_stage" (the last
  residual stage and the head) or "head" linearizes, batch norm included."""
  if scope == "all":
    return dict(params)
  if scope == "head":
    return {"head": params["head"]}
  if scope == "last_stage":
    stages = params["stages"]
    last = max(stages, key=int)
    return {"stages": {last: stages[last]}, "head": params["head"]}
  raise ValueError(f"unknown scope {scope!r}: use one of all, last_stage, head")


def is_batch_norm(key: Any) -> bool:
  """Whether a params key names a batch-norm layer (`bn1`, `bn_init`, `shortcut_bn`...):
  those weights stay frozen unless linearization is asked to include batch norm."""
  return isinstance(key, str) and "bn" in key
