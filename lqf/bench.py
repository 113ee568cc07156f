"""Benchmarks that write one JSON file each:
`{"meta": {command, seeds, device, date, versions}, "arms": {arm: {metric: {mean, std,
values}}}, ...}`.

`transfer`: the built-in digits transfer task (configs/digits_transfer.py). Each arm's
learning rate is chosen once on the validation split (subset seed 0), then every arm
runs on the same few-shot subsets, one per seed, and is scored on the test split.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from lqf import config as config_lib
from lqf import finetune, train
from lqf.data import pipeline
from lqf.errors import NonFiniteLossError, UserError
from lqf.io import atomic_write_json

TRANSFER_CONFIG = "configs/digits_transfer.py"


def summary(values: Sequence[float]) -> dict[str, Any]:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
          "values": [float(x) for x in v]}


def meta(command: str, seeds: Sequence[int]) -> dict[str, Any]:
  versions = {p: importlib.metadata.version(p) for p in
              ("jax", "jaxlib", "flax", "optax", "kfac-jax", "orbax-checkpoint",
               "tensorflow-datasets", "graceful")}
  dev = jax.devices()[0]
  return {"command": command, "seeds": list(seeds),
          "device": f"{dev.platform}: {dev.device_kind} ({platform.processor() or platform.machine()}, "
                    f"{os.cpu_count()} cores)",
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "versions": versions, "python": sys.version.split()[0]}


def ensure_pretrained(cfg: Mapping[str, Any], quick: bool) -> train.Classifier:
  """The finished pretraining run of `cfg.pretrain_workdir`, trained first if needed."""
  workdir = cfg["pretrain_workdir"] + ("_quick" if quick else "")
  print(f"pretrained model: {workdir}", file=sys.stderr)
  try:
    _, clf = train.load_pretrained(workdir)
    return clf
  except UserError:
    pass
  pre = config_lib.load(cfg["pretrain_config"],
                        ["train.steps=20", "train.checkpoint_every=10"] if quick else [])
  print(f"pretraining into {workdir} ...", file=sys.stderr)
  train.pretrain(pre, workdir)
  return train.load_pretrained(workdir)[1]


def _arm_fns(cfg, pretrained: train.Classifier, pre_cfg: Mapping[str, Any]
             ) -> dict[str, Callable[[pipeline.ImageSplit, int, float], train.Classifier]]:
  """Each arm as `(few-shot data, seed, lr) -> adapted classifier`."""
  model_cfg, channels = pre_cfg["model"], cfg["data"]["channels"]

  def ft(data, seed, lr):
    clf = finetune.with_new_head(pretrained, model_cfg, data.num_classes, channels, seed)
    t = dict(cfg["finetune"], lr=lr)
    return finetune.finetune(clf, data, t, seed=seed, train_bn=t["train_bn"])

  def scratch(data, seed, lr):
    clf = train.build_classifier(model_cfg, data.num_classes, channels, seed + 1000)
    t = dict(cfg["scratch"], lr=lr)
    return finetune.finetune(clf, data, t, seed=seed, train_bn=t["train_bn"])

  def probe(data, seed, lr):
    clf = finetune.with_new_head(pretrained, model_cfg, data.num_classes, channels, seed)
    return finetune.linear_probe(clf, data, dict(cfg["probe"], lr=lr), seed=seed)

  return {"finetune": ft, "probe": probe, "scratch": scratch}


QUICK = ("finetune.steps=10", "scratch.steps=10", "probe.steps=20",
         "lr_grid.finetune=(0.003,)", "lr_grid.scratch=(0.1,)", "lr_grid.probe=(0.01,)")


def transfer(*, seeds: int = 5, quick: bool = False, shots: Sequence[int] | None = None,
             config_path: str = TRANSFER_CONFIG, overrides: Sequence[str] = ()
             ) -> dict[str, Any]:
  """Runs the transfer benchmark; returns the result document (see module docstring).

  `quick` shrinks every arm to a few steps and one learning rate: a smoke test of the
  machinery, not a measurement.
  """
  cfg = config_lib.load(config_path, (QUICK if quick else ()) + tuple(overrides))
  pre_cfg = config_lib.to_dict(config_lib.load(cfg.pretrain_config))
  pretrained = ensure_pretrained(cfg, quick)
  d = cfg.data
  val = pipeline.load_split(d, cfg.val_split, corrupted=True)
  test = pipeline.load_split(d, d.eval_split, corrupted=True)
  arms = _arm_fns(cfg, pretrained, pre_cfg)
  shots = [cfg.shots] if shots is None else list(shots)
  result: dict[str, Any] = {"arms": {}, "tuning": {}, "timing_s": {}}
  for k in shots:
    suffix = f"@{k}shot" if k > 0 else "@full"
    tune_data = pipeline.load_split(d, d.train_split, corrupted=True, shots=k, subset_seed=0)
    for name, fn in arms.items():
      t0 = time.perf_counter()
      grid = {}
      for lr in cfg.lr_grid[name]:
        try:
          adapted = fn(tune_data, 0, lr)
        except NonFiniteLossError:
          grid[lr] = 0.0  # Diverged: never chosen.
          continue
        grid[lr] = train.evaluate(adapted.apply, adapted.params, adapted.batch_stats, val)["accuracy"]
      best_lr = max(grid, key=lambda lr: (grid[lr], -lr))
      result["tuning"][name + suffix] = {"val_accuracy": {str(lr): a for lr, a in grid.items()},
                                         "lr": best_lr}
      accs = []
      for seed in range(seeds):
        data = pipeline.load_split(d, d.train_split, corrupted=True, shots=k, subset_seed=seed)
        adapted = fn(data, seed, best_lr)
        accs.append(train.evaluate(adapted.apply, adapted.params, adapted.batch_stats,
                                   test)["accuracy"])
        print(f"{name}{suffix} seed {seed}: {accs[-1]:.4f}", file=sys.stderr)
      result["arms"][name + suffix] = {"accuracy": summary(accs)}
      result["timing_s"][name + suffix] = time.perf_counter() - t0
  no_adapt = train.evaluate(pretrained.apply, pretrained.params, pretrained.batch_stats, test)
  result["arms"]["no_adaptation"] = {"accuracy": summary([no_adapt["accuracy"]] * seeds)}
  result["design"] = {"source": f"{pre_cfg['data']['train_split']} clean",
                      "target_train": d.train_split, "validation": cfg.val_split,
                      "evaluation": f"{d.eval_split} ({len(test)} images)",
                      "corruption": config_lib.to_dict(d.corruption)}
  return result


def transfer_goals(result: Mapping[str, Any], k: int = 5) -> dict[str, Any]:
  """Issue 2's bars at k shots: fine-tuning ≥ scratch + 10 points; best in [60%, 95%]."""
  arms = result["arms"]
  ft, sc = arms[f"finetune@{k}shot"]["accuracy"]["mean"], arms[f"scratch@{k}shot"]["accuracy"]["mean"]
  best = max(v["accuracy"]["mean"] for a, v in arms.items() if a.endswith(f"@{k}shot"))
  return {"finetune_minus_scratch": ft - sc, "finetune_beats_scratch_by_10": ft - sc >= 0.10,
          "best_method": best, "best_in_60_95": 0.60 <= best <= 0.95}


def run(name: str, *, json_path: str, seeds: int, quick: bool,
        overrides: Sequence[str] = ()) -> dict[str, Any]:
  """Runs benchmark `name` and writes its JSON document to `json_path` atomically."""
  if seeds < 1:
    raise UserError(f"--seeds must be at least 1, got {seeds}")
  command = " ".join(["python -m lqf bench", name, "--json", json_path, "--seeds", str(seeds)]
                     + (["--quick"] if quick else []))
  if name == "transfer":
    result = transfer(seeds=seeds, quick=quick, overrides=overrides)
    result["goals"] = transfer_goals(result)
  else:
    raise UserError(f"unknown benchmark {name!r}: use transfer")
  doc = {"meta": meta(command, range(seeds)), **result}
  atomic_write_json(json_path, doc)
  return doc


def format_table(doc: Mapping[str, Any]) -> str:
  lines = [f"{'arm':<22} {'accuracy':>18}   values"]
  for arm, metrics in doc["arms"].items():
    a = metrics["accuracy"]
    vals = " ".join(f"{v:.3f}" for v in a["values"])
    lines.append(f"{arm:<22} {100 * a['mean']:8.2f} ± {100 * a['std']:5.2f} %   {vals}")
  if "goals" in doc:
    lines.append("goals: " + ", ".join(f"{k}={v}" for k, v in doc["goals"].items()))
  return "\n".join(lines)
