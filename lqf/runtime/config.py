"""Config files (`get_config()` → `ml_collections.ConfigDict`), command-line overrides,
and the checks that turn bad values into one clear `UserError`."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping, Sequence
import importlib.util
import json
import os
from typing import Any

import ml_collections

from lqf.errors import UserError, require
import lqf.models.resnet as resnet

# The depths the ResNets are built for, from their own tables.
ARCH_DEPTHS = {"cifar": tuple(resnet.CIFAR_BLOCKS), "imagenet": tuple(resnet.IMAGENET_LAYOUTS)}
ACTIVATIONS = ("relu", "leaky_relu")
VIT_ARCHS = ("vit",)
VIT_INT_KEYS = ("patch", "dim", "depth", "heads", "mlp_dim")
VIT_ACTIVATIONS = ("gelu", "relu", "leaky_relu")
ARCHS = (*ARCH_DEPTHS, *VIT_ARCHS)
OPTIMIZERS = ("sgd", "adam")


def parallel_config(devices: int = 1) -> ml_collections.ConfigDict:
  """The `parallel` block of a job config: the device mesh and the multi-host start-up
  (`lqf.parallel`). `devices=0` uses every device; the built-in digits jobs use one, as
  their batches are too small to gain from more."""
  return ml_collections.ConfigDict(dict(devices=devices, distributed=False, coordinator="",
                                        num_processes=0, process_id=-1))


def pretrained_config(workdir: str, config: str = "") -> ml_collections.ConfigDict:
  """A `pretrained` block: the finished pretraining (or `import-weights`) run in `workdir`,
  and the config, by name with its variant (`digits_pretrain:small`), that makes it when
  it is missing ("" for imported weights, which nothing can remake). Jobs read `workdir`;
  benchmarks and notebooks use `config` to pretrain a missing backbone first."""
  return ml_collections.ConfigDict(dict(workdir=workdir, config=config))


# Where a config given by name is looked up, in order. Only names: this module imports
# none of them (the library never imports the experiments that use it).
CONFIG_PACKAGES = ("lqf.experiments.configs", "pc.experiments.configs",
                   "bct.experiments.configs")


def available() -> list[str]:
  """The names of the configs that ship with graceful."""
  names = []
  for pkg in CONFIG_PACKAGES:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
      continue
    for folder in spec.submodule_search_locations:
      names += sorted(f[:-3] for f in os.listdir(folder)
                      if f.endswith(".py") and not f.startswith("_")
                      and _defines_get_config(os.path.join(folder, f)))
  return names


def _defines_get_config(path: str) -> bool:
  # Block modules (common.py, imagenet_common.py) sit beside the configs but are none.
  with open(path, encoding="utf-8") as f:
    return "\ndef get_config(" in f.read()


def resolve(name_or_path: str) -> str:
  """The file of a config given by path (`configs/x.py`, `/abs/x.py`) or by the name of
  one that ships with graceful (`digits_pretrain`)."""
  if os.path.isfile(name_or_path):
    return name_or_path
  if name_or_path.isidentifier():
    for pkg in CONFIG_PACKAGES:
      try:
        spec = importlib.util.find_spec(f"{pkg}.{name_or_path}")
      except ModuleNotFoundError:
        spec = None
      if spec is not None and spec.origin:
        return spec.origin
  raise UserError(f"config {name_or_path!r} is neither a file nor the name of a config "
                  f"that ships with graceful ({', '.join(available())})")


def load(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads a config (a Python file or a shipped config's name, optionally `NAME:arg`,
  which calls `get_config(arg)`) and applies `key=value` overrides.

  The returned config is locked: an override of a key the config does not have is an
  error, so a typo never silently does nothing.
  """
  path, _, arg = path.partition(":")
  path = resolve(path)
  spec = importlib.util.spec_from_file_location("_graceful_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # A broken config file is the user's to fix; say where.
    raise UserError(f"config file {path!r} failed to load: {type(e).__name__}: {e}") from None
  require(hasattr(module, "get_config"), f"config file {path!r} has no get_config()")
  cfg = module.get_config(arg) if arg else module.get_config()
  cfg = ml_collections.ConfigDict(cfg)
  cfg.lock()
  for item in overrides:
    apply_override(cfg, item)
  return cfg


def with_variants(cfg: ml_collections.ConfigDict, arg: str | None,
                  variants: Mapping[str, Mapping[str, Any]]) -> ml_collections.ConfigDict:
  """`cfg` with the settings of each variant named in `arg` (comma-separated, as in
  `--config NAME:small,relu`) applied in order; None or "" leaves it as it is."""
  for name in filter(None, (arg or "").split(",")):
    require(name in variants, f"unknown config variant {name!r}: use one of "
            f"{', '.join(variants)} (several joined by commas)")
    for key, value in variants[name].items():
      *parents, leaf = key.split(".")
      node = cfg
      for part in parents:
        node = node[part]
      node[leaf] = value
  return cfg


def apply_override(cfg: ml_collections.ConfigDict, item: str) -> None:
  """Sets `a.b.c=value` in place; the value is parsed as a Python literal when it can
  be, and must keep the type of the key it replaces (ints widen to floats)."""
  key, sep, raw = item.partition("=")
  key = key.removeprefix("--").removeprefix("config.")
  require(bool(sep) and bool(key), f"override {item!r} is not of the form key=value "
          "(for example --config.train.lr=0.1)")
  *parents, leaf = key.split(".")
  node = cfg
  for i, part in enumerate(parents):
    require(isinstance(node, ml_collections.ConfigDict) and part in node,
            f"unknown config key {'.'.join(parents[:i + 1])!r} in override {item!r}; "
            f"known keys here: {', '.join(sorted(node.keys()))}")
    node = node[part]
  require(isinstance(node, ml_collections.ConfigDict) and leaf in node,
          f"unknown config key {key!r}; known keys here: {', '.join(sorted(node.keys()))}")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  old = node[leaf]
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(old, tuple) and isinstance(value, list):
    value = tuple(value)
  require(old is None or type(value) is type(old),
          f"config key {key!r} holds a {type(old).__name__}, got {raw!r}")
  node[leaf] = value


def to_dict(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(cfg.to_json())


def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def diff(a: Mapping[str, Any], b: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
  """Keys whose values differ between two nested dicts, skipping `ignore` prefixes."""
  fa, fb = flat(a), flat(b)
  keys = sorted(set(fa) | set(fb))
  return [k for k in keys if fa.get(k) != fb.get(k)
          and not any(k == p or k.startswith(p + ".") for p in ignore)]


def check_model(m: Mapping[str, Any]) -> None:
  require(m["arch"] in ARCHS, f"unknown model.arch {m['arch']!r}: use one of "
          f"{', '.join(ARCHS)}")
  if m["arch"] in VIT_ARCHS:
    _check_vit(m)
    return
  require(m["depth"] in ARCH_DEPTHS[m["arch"]], f"model.depth {m['depth']} is not a "
          f"{m['arch']} ResNet: use one of {ARCH_DEPTHS[m['arch']]}")
  require(m["activation"] in ACTIVATIONS, f"unknown model.activation {m['activation']!r}: "
          f"use one of {', '.join(ACTIVATIONS)}")
  require(0.0 <= m["leaky_slope"] < 1.0, f"model.leaky_slope must be in [0, 1), got "
          f"{m['leaky_slope']}")
  require(m["width"] > 0, f"model.width must be positive, got {m['width']}")


def _check_vit(m: Mapping[str, Any]) -> None:
  for key in VIT_INT_KEYS:
    require(key in m, f"model.{key} is missing: a {m['arch']} model needs "
            f"{', '.join(VIT_INT_KEYS)}")
    v = m[key]
    require(isinstance(v, int) and not isinstance(v, bool) and v > 0,
            f"model.{key} must be a positive integer, got {v!r}")
  require(m["dim"] % m["heads"] == 0, f"model.dim ({m['dim']}) must be a multiple of "
          f"model.heads ({m['heads']})")
  if "image_size" in m:
    require(m["image_size"] % m["patch"] == 0, f"model.image_size ({m['image_size']}) "
            f"must be a multiple of model.patch ({m['patch']})")
  activation = m.get("activation", "leaky_relu")
  require(activation in VIT_ACTIVATIONS, f"unknown model.activation {activation!r}: "
          f"use one of {', '.join(VIT_ACTIVATIONS)}")
  slope = m.get("leaky_slope", 0.1)
  require(0.0 <= slope < 1.0, f"model.leaky_slope must be in [0, 1), got {slope}")


def check_curve(curve: Mapping[str, Any], term: Mapping[str, Any]) -> None:
  """The `curve` and `term` blocks of an exact path over the penalty share ρ (pc curve,
  bct curve): shares in [0, 1], a positive memory bound and block size."""
  rhos = curve["rhos"]
  require(len(rhos) > 0 and all(0.0 <= r <= 1.0 for r in rhos),
          f"curve.rhos must be a non-empty list of shares in [0, 1], got {rhos}")
  require(term["max_gb"] > 0 and term["batch_size"] > 0,
          "term.max_gb and term.batch_size must be positive")


def check_data(d: Mapping[str, Any]) -> None:
  require(d["image_size"] > 0, f"data.image_size must be positive, got {d['image_size']}")
  require(d["channels"] in (1, 3), f"data.channels must be 1 or 3, got {d['channels']}")
  require(len(d["mean"]) == len(d["std"]) and all(s > 0 for s in d["std"]),
          "data.mean and data.std need the same length and a positive std")


def check_train(t: Mapping[str, Any], prefix: str = "train") -> None:
  require(t["optimizer"] in OPTIMIZERS, f"unknown {prefix}.optimizer {t['optimizer']!r}: "
          f"use one of {', '.join(OPTIMIZERS)}")
  for key in ("lr", "batch_size", "steps"):
    require(t[key] > 0, f"{prefix}.{key} must be positive, got {t[key]}: set "
            f"--config.{prefix}.{key} to a positive value")
  require(t["weight_decay"] >= 0, f"{prefix}.weight_decay must be ≥ 0, got {t['weight_decay']}")
  for key in ("checkpoint_every", "eval_every", "log_every"):
    require(t[key] > 0, f"{prefix}.{key} must be positive, got {t[key]}")
  require(t.get("clip_norm", 0.0) >= 0, f"{prefix}.clip_norm must be ≥ 0 (0 = no clipping), "
          f"got {t.get('clip_norm')}")
