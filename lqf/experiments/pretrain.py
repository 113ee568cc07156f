"""The pretraining job (`python -m lqf pretrain`) and the finished runs other jobs start
from: `load_pretrained`, `pretrained_for` (cached once per process), `restore_final`."""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

import lqf.data.pipeline as pipeline
from lqf.errors import UserError, require
from lqf.models.classifier import Classifier, build_classifier
import lqf.runtime.checkpoint as checkpoint
import lqf.runtime.config as config_lib
from lqf.runtime.io import atomic_write_json
import lqf.runtime.parallel as parallel
from lqf.runtime.train import evaluate, fit, make_optimizer


def check_config(cfg: Mapping[str, Any]) -> None:
  if "parallel" in cfg:
    parallel.check_config(cfg["parallel"])
  config_lib.check_model(cfg["model"])
  config_lib.check_data(cfg["data"])
  config_lib.check_train(cfg["train"])


# What a resumed (or reused) pretraining run may change: how often it logs and saves, and
# the devices it runs on.
MAY_CHANGE = ("train.checkpoint_every", "train.eval_every", "train.log_every", "parallel")


def check_same_run(cfg: Mapping[str, Any], workdir: str, fix: str | None = None) -> None:
  """Checks that `workdir` holds a pretraining run of `cfg` (see `MAY_CHANGE`); `fix` is
  the advice the error ends with (see `checkpoint.check_same_run`).

  Raises:
    UserError: it holds another command's run or another config's.
  """
  checkpoint.check_same_run(workdir, config_lib.to_dict(cfg), command="pretrain",
                            may_change=MAY_CHANGE, fix=fix)


def pretrain(cfg: Mapping[str, Any], workdir: str, *, stop_at_step: int | None = None,
             progress: bool = True) -> dict[str, Any]:
  """The pretraining job: trains on the source task, evaluates, writes the result.

  Writes `workdir/{config.json, checkpoints/, metrics.jsonl, final_metrics.json}` and
  returns the final metrics.
  """
  check_config(cfg)
  mesh = parallel.mesh_for(cfg)
  d = cfg["data"]
  # Everything that can fail on bad input happens before the workdir is touched.
  train = pipeline.load_split(d, d["train_split"], corrupted=d["corrupt_train"])
  evaluation = pipeline.load_split(d, d["eval_split"], corrupted=d["corrupt_eval"])
  clf = build_classifier(cfg["model"], train.num_classes, d["channels"], cfg["seed"])
  checkpoint.claim_workdir(workdir, config_lib.to_dict(cfg), command="pretrain",
                           may_change=MAY_CHANGE)
  params, batch_stats = fit(clf, train, cfg["train"], seed=cfg["seed"], augment=d["augment"],
                            evaluation=evaluation, workdir=workdir, stop_at_step=stop_at_step,
                            progress=progress, mesh=mesh)
  result = {"eval": evaluate(clf.apply, params, batch_stats, evaluation),
            "train": evaluate(clf.apply, params, batch_stats, train)}
  if stop_at_step is None:
    atomic_write_json(os.path.join(workdir, "final_metrics.json"), result)
  return result


def load_pretrained(workdir: str) -> tuple[dict[str, Any], Classifier]:
  """The config and the final weights of a finished pretraining run in `workdir`."""
  path = os.path.join(workdir, checkpoint.CONFIG_FILE)
  if not os.path.exists(path):
    raise UserError(f"no pretraining run in {workdir!r} (no {checkpoint.CONFIG_FILE}): run "
                    f"'python -m lqf pretrain --config ... --workdir {workdir}' first")
  with open(path) as f:
    record = json.load(f)
  command = record.get("command")
  require(command in ("pretrain", "import"),
          f"{workdir!r} holds a {command!r} run, not a pretraining run")
  cfg = record["config"]
  if command == "import":  # `lqf.weights`: ImageNet weights, no dataset to open.
    num_classes = int(cfg["num_classes"])
  else:
    num_classes = pipeline.num_classes(cfg["data"])
  clf = build_classifier(cfg["model"], num_classes, cfg["data"]["channels"], cfg["seed"])
  mgr = checkpoint.manager(os.path.join(workdir, "checkpoints"))
  if command == "import":
    like = {"params": clf.params, "batch_stats": clf.batch_stats}
    restored = checkpoint.restore_latest(mgr, like)
    require(restored is not None, f"the imported run in {workdir!r} has no checkpoint: run "
            "'python -m lqf import-weights' again")
  else:
    # The checkpoint holds the whole training state; rebuild its structure to restore it.
    like = {"params": clf.params, "batch_stats": clf.batch_stats,
            "opt_state": make_optimizer(cfg["train"]).init(clf.params),
            "step": jnp.zeros((), jnp.int32)}
    restored = checkpoint.restore_latest(mgr, like)
    if restored is None or restored[1] < cfg["train"]["steps"]:
      mgr.close()
      raise UserError(f"the pretraining run in {workdir!r} has not finished (latest "
                      f"checkpoint: {restored and restored[1]}); run the pretrain command "
                      "again to resume it")
  mgr.close()
  clf.params, clf.batch_stats = restored[0]["params"], restored[0]["batch_stats"]
  return cfg, clf


_PRETRAINED: dict[tuple[str, float], tuple[dict[str, Any], Classifier]] = {}


def pretrained_for(workdir: str, channels: int) -> tuple[dict[str, Any], Classifier]:
  """`load_pretrained(workdir)`, checked to take `channels`-channel images. Restored once
  per process (every arm, ensemble member and seed starts from the same run), and again
  when the run's record has been rewritten. Callers must not change the weights in
  place (they are shared)."""
  path = os.path.abspath(workdir)
  record = os.path.join(path, checkpoint.CONFIG_FILE)
  key = (path, os.path.getmtime(record) if os.path.exists(record) else -1.0)
  if key not in _PRETRAINED:
    _PRETRAINED[key] = load_pretrained(workdir)
  pre_cfg, clf = _PRETRAINED[key]
  require(pre_cfg["data"]["channels"] == channels,
          f"the model in {workdir!r} was pretrained on {pre_cfg['data']['channels']}-channel "
          f"images but data.channels is {channels}: set --config.data.channels="
          f"{pre_cfg['data']['channels']} or use another pretrained model")
  return pre_cfg, clf


def restore_final(clf: Classifier, t: Mapping[str, Any], workdir: str) -> Classifier:
  """`clf` with the weights of the finished run in `workdir` (trained with the `t`
  block's optimiser for `t.steps` steps)."""
  like = {"params": clf.params, "batch_stats": clf.batch_stats,
          "opt_state": make_optimizer(t).init(clf.params), "step": jnp.zeros((), jnp.int32)}
  mgr = checkpoint.manager(os.path.join(workdir, "checkpoints"))
  restored = checkpoint.restore_latest(mgr, like)
  mgr.close()
  if restored is None or restored[1] < t["steps"]:
    raise UserError(f"the run in {workdir!r} has not finished (latest checkpoint: "
                    f"{restored and restored[1]}); run its command again to resume it")
  return dataclasses.replace(clf, params=restored[0]["params"],
                             batch_stats=restored[0]["batch_stats"])
