"""The PC training job: `python -m pc train --config NAME --workdir DIR`.

Loads (or trains) the old model, trains the new one with `pc.method`'s loss, and reports
the update's error and flip rates on the evaluation split. Like the other jobs it
checkpoints, resumes from the latest checkpoint when run again, shows progress, appends
to `workdir/metrics.jsonl` and writes `workdir/final_metrics.json` at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

import lqf.data.pipeline as pipeline
from lqf.errors import UserError, require
import lqf.experiments.pretrain as pretrain
import lqf.experiments.update as update
import lqf.finetune as finetune
from lqf.models.classifier import Classifier, build_classifier
import lqf.runtime.checkpoint as checkpoint
import lqf.runtime.config as config_lib
from lqf.runtime.io import atomic_write_json, is_primary
import lqf.runtime.parallel as parallel
import lqf.runtime.train as train
import pc.losses as losses
import pc.lqf_term as lqf_term
import pc.metrics as metrics

METHODS = losses.METHODS + ("ensemble",)
OLD_OUTPUTS = ("alongside", "stored")
COMMAND = "pc-train"
Predict = Callable[[np.ndarray], jax.Array]


def check_config(cfg: Mapping[str, Any]) -> None:
  p = cfg["pc"]
  require(p["method"] in METHODS, f"unknown pc.method {p['method']!r}: use one of "
          f"{', '.join(METHODS)}")
  require(p["old_outputs"] in OLD_OUTPUTS, f"unknown pc.old_outputs {p['old_outputs']!r}: "
          f"use one of {', '.join(OLD_OUTPUTS)}")
  for key in ("lam", "alpha", "beta"):
    require(p[key] >= 0, f"pc.{key} must be ≥ 0, got {p[key]}")
  require(p["temperature"] > 0, f"pc.temperature must be positive, got {p['temperature']}")
  require(p["ensemble_size"] >= 1, f"pc.ensemble_size must be ≥ 1, got {p['ensemble_size']}")
  require(cfg["init"] in ("finetune", "scratch"), f"unknown init {cfg['init']!r}: use "
          "'finetune' (the pretrained backbone) or 'scratch'")
  require(cfg["shots"] >= 0, f"shots must be ≥ 0 (0 = the whole split), got {cfg['shots']}")
  require(cfg["old"]["shots"] >= 0, f"old.shots must be ≥ 0, got {cfg['old']['shots']}")
  config_lib.check_data(cfg["data"])
  config_lib.check_train(cfg["train"], prefix="train")
  config_lib.check_train(cfg["old"]["finetune"], prefix="old.finetune")
  q = cfg["term"]
  require(q["target"] in lqf_term.TARGETS, f"unknown term.target {q['target']!r}: use "
          f"one of {', '.join(lqf_term.TARGETS)}")
  require(q["alpha"] >= 0 and q["beta"] >= 0 and q["alpha"] + q["beta"] > 0,
          f"term.alpha and term.beta must be ≥ 0 and not both 0, got {q['alpha']}, "
          f"{q['beta']}")
  require(cfg["lqf"]["k"] > 0 and cfg["lqf"]["lam"] > 0,
          "lqf.k and lqf.lam must be positive for the exact trade-off")
  aug = cfg["data"]["augment"]
  require(p["old_outputs"] == "alongside" or (aug["crop_padding"] == 0 and not aug["flip"]),
          "stored old outputs are per image, so they cannot follow augmentation: set "
          "--config.pc.old_outputs=alongside, or turn augmentation off")


def load_data(cfg: Mapping[str, Any]) -> tuple[pipeline.ImageSplit, pipeline.ImageSplit]:
  """(the new model's training subset, the evaluation split)."""
  d = cfg["data"]
  data = pipeline.load_split(d, d["train_split"], corrupted=d["corrupt_train"],
                             shots=cfg["shots"], subset_seed=cfg["seed"])
  evaluation = pipeline.load_split(d, d["eval_split"], corrupted=d["corrupt_eval"])
  return data, evaluation


def _pretrained(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], Classifier]:
  return pretrain.pretrained_for(cfg["pretrained"]["workdir"], cfg["data"]["channels"])


def new_classifier(cfg: Mapping[str, Any], num_classes: int, seed: int) -> Classifier:
  """The new model before training: the pretrained backbone under a fresh head, or a
  fresh network (`init="scratch"`)."""
  pre_cfg, pretrained = _pretrained(cfg)
  if cfg["init"] == "scratch":
    return build_classifier(pre_cfg["model"], num_classes, cfg["data"]["channels"],
                                  seed)
  return finetune.with_new_head(pretrained, pre_cfg["model"], num_classes,
                                cfg["data"]["channels"], seed)


def predictor(clf: Classifier) -> Predict:
  apply = jax.jit(clf.apply)
  return lambda x: apply(clf.params, clf.batch_stats, x)


def logits_of(predict: Predict, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
  return np.concatenate([np.asarray(predict(images[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])


def ensemble(predicts: list[Predict]) -> Predict:
  """The members' logits, averaged."""
  return lambda x: sum(jnp.asarray(p(x)) for p in predicts) / len(predicts)


# --- The old model. --------------------------------------------------------------------------

_OLD_MODELS: dict[str, Classifier] = {}


def train_old(cfg: Mapping[str, Any], mesh: Mesh | None = None) -> Classifier:
  """The config's old model, trained in memory: the `old.pretrained.workdir` backbone
  fine-tuned (nonlinear) on `old.shots` examples a class (seeds offset by 1000 from the
  new model's). Training is deterministic, so it is done once per process and setting.
  `mesh` is the job's device mesh (None: one device), built once by the job."""
  return update.memoized(_OLD_MODELS, [cfg["data"], cfg["old"], cfg["seed"]],
                         lambda: _fit_old(cfg, mesh))


def _fit_old(cfg: Mapping[str, Any], mesh: Mesh | None) -> Classifier:
  d, o = cfg["data"], cfg["old"]
  data = pipeline.load_split(d, d["train_split"], corrupted=d["corrupt_train"],
                             shots=o["shots"], subset_seed=cfg["seed"])
  seed = cfg["seed"] + 1000
  clf = new_classifier(dict(cfg, init="finetune", pretrained=o["pretrained"]),
                       data.num_classes, seed)
  t = o["finetune"]
  return finetune.finetune(clf, data, t, seed=seed, train_bn=t["train_bn"], mesh=mesh)


def read_run(workdir: str) -> tuple[str | None, dict[str, Any]]:
  """(command, config) of the run recorded in `workdir`."""
  return checkpoint.read_run(workdir, "train the old model first (python -m lqf finetune "
                             "--config.method=nonlinear ...)")


def load_run(workdir: str) -> tuple[dict[str, Any], Classifier]:
  """The config and final model of a finished `lqf finetune --config.method=nonlinear`
  or `pc train` run."""
  cmd, cfg = read_run(workdir)
  if cmd == "finetune":
    require(cfg["method"] == "nonlinear", f"{workdir!r} holds an LQF or probe fine-tuning "
            f"run (method {cfg['method']!r}); an old model must be a nonlinear fine-tuning "
            "run or a pc train run")
    t = cfg["finetune"]
  elif cmd == COMMAND:
    require(cfg["pc"]["method"] != "ensemble", f"{workdir!r} holds an ensemble; use one "
            "member's workdir (member_0) as the old model")
    t = cfg["train"]
  else:
    raise UserError(f"{workdir!r} holds a {cmd!r} run; an old model must be a nonlinear "
                    "fine-tuning run or a pc train run")
  num_classes = pipeline.num_classes(cfg["data"])
  clf = new_classifier(dict(cfg, init=cfg.get("init", "finetune")), num_classes, cfg["seed"])
  return cfg, pretrain.restore_final(clf, t, workdir)


def old_model(cfg: Mapping[str, Any], num_classes: int, mesh: Mesh | None = None
              ) -> Classifier:
  """The old model of `cfg`, checked to share the new model's label set."""
  o = cfg["old"]
  if not o["workdir"]:
    return train_old(cfg, mesh)
  update.check_same_dataset(o, read_run(o["workdir"])[1]["data"]["name"], cfg["data"]["name"])
  _, clf = load_run(o["workdir"])
  old_classes = int(np.shape(clf.params["head"]["kernel"])[-1])
  require(old_classes == num_classes,
          f"the old model in {o['workdir']!r} has {old_classes} classes, the new data has "
          f"{num_classes}: the label sets of the old and new models differ")
  return clf


# --- The old model's outputs for the PC losses. -----------------------------------------------

def stored_old_logits(cfg: Mapping[str, Any], old: Predict, data: pipeline.ImageSplit,
                      workdir: str | None) -> np.ndarray:
  """The old logits of every training example [N, C]: read from `pc.old_logits_file`,
  or computed once (and, with a workdir, saved to `workdir/old_logits.npy`)."""
  path = cfg["pc"]["old_logits_file"]
  if path:
    require(os.path.exists(path), f"the old model's outputs {path!r} are missing: set "
            "--config.pc.old_logits_file to the .npy file of old logits, or '' to compute "
            "them here")
    out = np.load(path)
    require(out.shape == (len(data), data.num_classes),
            f"the old outputs in {path!r} have shape {out.shape}, but the training set "
            f"needs {(len(data), data.num_classes)} (one row of logits per example, in "
            "the split's order)")
    require(bool(np.isfinite(out).all()), f"the old outputs in {path!r} hold NaN or "
            "infinite values")
    return out.astype(np.float32)
  out = logits_of(old, data.images)
  if workdir is not None and is_primary():
    tmp = os.path.join(workdir, ".tmp-old_logits.npy")
    np.save(tmp, out)
    os.replace(tmp, os.path.join(workdir, "old_logits.npy"))
  return out


def old_extras(cfg: Mapping[str, Any], old: Predict, data: pipeline.ImageSplit,
               workdir: str | None) -> Callable[[np.ndarray, np.ndarray], jax.Array]:
  """`extras(indices, images)` for `train.fit`: the batch's old logits."""
  if cfg["pc"]["old_outputs"] == "stored":
    table = stored_old_logits(cfg, old, data, workdir)
    return lambda idx, images: jnp.asarray(table[idx])
  return lambda idx, images: old(images)


# --- The new model. ----------------------------------------------------------------------------

def train_new(cfg: Mapping[str, Any], data: pipeline.ImageSplit, old: Predict, *,
              seed: int, workdir: str | None = None, stop_at_step: int | None = None,
              progress: bool = False, method: str | None = None,
              mesh: Mesh | None = None) -> Predict | None:
  """Trains the new model with `method` (default `pc.method`); returns its predictor, or
  None when stopped early. An ensemble trains `pc.ensemble_size` untreated members with
  seeds seed, seed + 1, ..., each in `workdir/member_<i>`. `mesh`: as for `train_old`."""
  p = dict(cfg["pc"], method=method or cfg["pc"]["method"])
  t = cfg["train"]
  if p["method"] == "ensemble":
    members = []
    for i in range(int(p["ensemble_size"])):
      sub = None if workdir is None else os.path.join(workdir, f"member_{i}")
      member = train_new(cfg, data, old, seed=seed + i, workdir=sub,
                         stop_at_step=stop_at_step, progress=progress, method="none",
                         mesh=mesh)
      if member is None:
        return None
      members.append(member)
    return ensemble(members)
  clf = new_classifier(cfg, data.num_classes, seed)
  extras = None if p["method"] == "none" else old_extras(cfg, old, data, workdir)
  params, stats = train.fit(clf, data, t, seed=seed, augment=cfg["data"]["augment"],
                            train_bn=t["train_bn"], workdir=workdir, stop_at_step=stop_at_step,
                            progress=progress, loss=losses.make_loss(p), extras=extras,
                            log_name=p["method"], mesh=mesh)
  if stop_at_step is not None and stop_at_step < t["steps"]:
    return None
  return predictor(dataclasses.replace(clf, params=params, batch_stats=stats))


def flips(old: Predict, new: Predict, evaluation: pipeline.ImageSplit) -> dict[str, Any]:
  """The update's rates, counts, per-class counts and negative flips on `evaluation`."""
  batches = lambda: pipeline.eval_batches(evaluation, 256)
  return metrics.evaluate(metrics.predictions(old, batches()),
                          metrics.predictions(new, batches()), evaluation.labels,
                          evaluation.num_classes)


def run(cfg: Mapping[str, Any], workdir: str, *, stop_at_step: int | None = None,
        progress: bool = True) -> dict[str, Any]:
  """Runs the job; returns (and writes) the final metrics."""
  check_config(cfg)
  data, evaluation = load_data(cfg)
  mesh = parallel.mesh_for(cfg)  # Once per job: it may start jax.distributed.
  old = predictor(old_model(cfg, data.num_classes, mesh))
  if cfg["pc"]["old_outputs"] == "stored" and cfg["pc"]["old_logits_file"]:
    stored_old_logits(cfg, old, data, None)  # Bad stored outputs fail before any write.
  checkpoint.claim_workdir(workdir, config_lib.to_dict(cfg), command=COMMAND,
                           may_change=("train.checkpoint_every", "train.log_every",
                                       "train.eval_every", "parallel"))
  new = train_new(cfg, data, old, seed=cfg["seed"], workdir=workdir,
                  stop_at_step=stop_at_step, progress=progress, mesh=mesh)
  if new is None:
    return {}
  update = flips(old, new, evaluation)
  result = {"method": cfg["pc"]["method"],
            "eval": {"accuracy": 1 - update["rates"]["ER_new"], "count": len(evaluation),
                     **update},
            "train": {"accuracy": train.accuracy(new, data), "count": len(data)}}
  if stop_at_step is None:
    atomic_write_json(os.path.join(workdir, "final_metrics.json"), result)
  print(f"update: {_rates_line(update['rates'])}", file=sys.stderr)
  return result


def _rates_line(r: Mapping[str, float]) -> str:
  return ", ".join(f"{k} {100 * r[k]:.2f}%" if k not in ("rel_NFR", "NFI") else
                   f"{k} {r[k]:.3f}" for k in metrics.RATE_NAMES)
