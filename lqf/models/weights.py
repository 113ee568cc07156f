"""ImageNet-pretrained ResNets from torchvision or timm, as a finished pretraining run.

torchvision and timm name a ResNet's tensors alike (`conv1.weight`, `bn1.running_mean`,
`layer2.0.downsample.0.weight`, `fc.weight`, ...), and `lqf.resnet`'s `arch="imagenet"`
mirrors their layers, so the import is a renaming plus two transpositions:

    conv  weight [O, I, kh, kw]  ->  kernel [kh, kw, I, O]
    fc    weight [C, D]          ->  kernel [D, C]
    bn    weight, bias, running_mean, running_var  ->  scale, bias, mean, var

The depth (18, 34, 50), width and class count are read off the tensors. The activation
is the caller's choice: LQF linearizes a network with leaky ReLU, so `import_run`
defaults to it, which changes the function the weights compute (the report says so).

`python -m lqf import-weights --weights resnet50.safetensors --workdir runs/imagenet_r50`
writes the run that fine-tuning, PC and BCT configs name as `pretrained.workdir`.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lqf.errors import UserError, require
from lqf.models.classifier import build_classifier
import lqf.models.resnet as resnet

StateDict = dict[str, np.ndarray]
FORMATS = (".safetensors", ".npz", ".pth", ".pt", ".bin")
# Prefixes that wrappers add: DistributedDataParallel ("module.") and some timm exports.
PREFIXES = ("module.", "model.")
IGNORED = ("num_batches_tracked",)  # Torch's BN step counter: no Flax counterpart.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_state_dict(path: str) -> StateDict:
  """The tensors of a `.safetensors`, `.npz` or (with torch installed) `.pth` file."""
  require(os.path.isfile(path), f"weights file {path!r} does not exist")
  suffix = os.path.splitext(path)[1].lower()
  require(suffix in FORMATS, f"weights file {path!r} has an unknown format: use "
          f"{', '.join(FORMATS)}")
  try:
    if suffix == ".safetensors":
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      tensors = load_file(path)
    elif suffix == ".npz":
      with np.load(path, allow_pickle=False) as f:
        tensors = {k: f[k] for k in f.files}
    else:
      tensors = _read_torch(path)
  except UserError:
    raise
  except Exception as e:  # A damaged file: name it and the way out.
    raise UserError(f"weights file {path!r} cannot be read ({type(e).__name__}: {e}); "
                    "download it again") from None
  return {_strip(k): np.asarray(v) for k, v in tensors.items()}


def _read_torch(path: str) -> StateDict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(f"reading {path!r} needs PyTorch: 'pip install torch', or convert the "
                    "file to .safetensors or .npz where torch is installed") from None
  obj = torch.load(path, map_location="cpu", weights_only=True)
  for key in ("state_dict", "model", "model_state_dict"):  # Training checkpoints nest it.
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
  return {k: v.detach().float().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def _strip(key: str) -> str:
  for prefix in PREFIXES:
    if key.startswith(prefix):
      return key[len(prefix):]
  return key


@dataclasses.dataclass(frozen=True)
class Architecture:
  depth: int
  width: int
  num_classes: int
  in_channels: int


def infer_architecture(sd: StateDict) -> Architecture:
  """The ResNet a torchvision/timm state dict belongs to."""
  for key in ("conv1.weight", "fc.weight"):
    require(key in sd, f"the weights have no {key!r}: not a torchvision/timm ResNet "
            f"(first keys: {', '.join(sorted(sd)[:5])})")
  blocks = []
  for stage in range(1, 5):
    ids = {int(m.group(1)) for k in sd for m in [re.match(rf"layer{stage}\.(\d+)\.", k)] if m}
    blocks.append(len(ids))
  kind = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
  depths = [d for d, layout in resnet.IMAGENET_LAYOUTS.items()
            if layout == (kind, tuple(blocks))]
  require(len(depths) == 1, f"the weights hold a {kind}-block ResNet with {blocks} blocks "
          "per stage, which is none of the supported ResNet-"
          f"{'/'.join(map(str, resnet.IMAGENET_LAYOUTS))}")
  out_c, in_c = sd["conv1.weight"].shape[:2]
  return Architecture(depths[0], int(out_c), int(sd["fc.weight"].shape[0]), int(in_c))


def _torch_prefix(path: tuple[Any, ...]) -> str:
  """The torch name of the module at a Flax parameter path (without `.weight` etc.)."""
  names = [p.key if hasattr(p, "key") else p.idx for p in path]
  top = names[0]
  if top == "conv_init":
    return "conv1"
  if top == "bn_init":
    return "bn1"
  if top == "head":
    return "fc"
  stage, block, layer = names[1], names[2], names[3]
  layer = {"shortcut_conv": "downsample.0", "shortcut_bn": "downsample.1"}.get(layer, layer)
  return f"layer{stage + 1}.{block}.{layer}"


_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _from_torch(leaf_name: str, module: str, sd: StateDict) -> tuple[str, np.ndarray]:
  if leaf_name == "kernel":
    key = f"{module}.weight"
    w = sd.get(key)
    if w is None:
      return key, None
    return key, w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
  key = f"{module}.{_BN[leaf_name] if not module == 'fc' else leaf_name}"
  return key, sd.get(key)


@dataclasses.dataclass
class Report:
  """What the import used and what it left: `unmapped` names tensors of the file that no
  weight of the model took (an extra head, an auxiliary branch, a different network)."""
  architecture: Architecture
  mapped: int
  ignored: list[str]
  unmapped: list[str]
  activation: str

  def summary(self) -> str:
    a = self.architecture
    lines = [f"ResNet-{a.depth} (width {a.width}, {a.num_classes} classes, "
             f"{a.in_channels} input channels): {self.mapped} tensors mapped, "
             f"{len(self.ignored)} BN step counters ignored"]
    if self.unmapped:
      lines.append(f"WARNING: {len(self.unmapped)} tensor(s) of the file left unmapped: "
                   + ", ".join(self.unmapped[:10]) + (" ..." if len(self.unmapped) > 10 else ""))
    else:
      lines.append("every tensor of the file was mapped")
    if self.activation != "relu":
      lines.append(f"activation switched from ReLU to {self.activation}: the network no longer "
                   "computes what it was trained to; fine-tuning adapts it")
    return "\n".join(lines)


def convert(sd: StateDict, *, activation: str = "leaky_relu", leaky_slope: float = 0.1
            ) -> tuple[dict[str, Any], Any, Any, Report]:
  """(model config, params, batch_stats, report) of the Flax ResNet holding `sd`."""
  arch = infer_architecture(sd)
  model_cfg = dict(arch="imagenet", depth=arch.depth, width=arch.width,
                   activation=activation, leaky_slope=leaky_slope)
  like = build_classifier(model_cfg, arch.num_classes, arch.in_channels, 0)
  used: set[str] = set()
  problems: list[str] = []

  def fill(path, leaf):
    key, value = _from_torch(path[-1].key, _torch_prefix(path[:-1]), sd)
    if value is None:
      problems.append(f"missing {key}")
      return leaf
    if value.shape != leaf.shape:
      problems.append(f"{key} has shape {tuple(sd[key].shape)}, the model needs "
                      f"{tuple(leaf.shape)} (after transposition)")
      return leaf
    used.add(key)
    return jnp.asarray(value, leaf.dtype)

  params = jax.tree_util.tree_map_with_path(fill, like.params)
  batch_stats = jax.tree_util.tree_map_with_path(fill, like.batch_stats)
  require(not problems, f"the weights do not fit a ResNet-{arch.depth}: "
          + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)"
                                       if len(problems) > 5 else ""))
  ignored = sorted(k for k in sd if k.rsplit(".", 1)[-1] in IGNORED)
  unmapped = sorted(set(sd) - used - set(ignored))
  report = Report(arch, len(used), ignored, unmapped, activation)
  return model_cfg, params, batch_stats, report
