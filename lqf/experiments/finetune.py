"""The fine-tuning job: `python -m lqf finetune --config ... --workdir DIR`.

Loads a finished pretraining run, gives it a new head for the target task and adapts it
with `method` ("lqf", "nonlinear" or "probe"). Like pretraining it checkpoints, resumes
from the latest checkpoint when run again, shows progress, appends to
`workdir/metrics.jsonl` and writes `workdir/final_metrics.json` at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from tqdm import tqdm

import lqf.data.pipeline as pipeline
from lqf.errors import require
import lqf.experiments.pretrain as pretrain
import lqf.finetune as finetune
import lqf.linearize as linearize
from lqf.models.classifier import Classifier
import lqf.objective as objective
import lqf.optim as optim
import lqf.runtime.checkpoint as checkpoint
import lqf.runtime.config as config_lib
import lqf.runtime.faults as faults
from lqf.runtime.io import MetricsLog, atomic_write_json
import lqf.runtime.parallel as parallel
import lqf.runtime.train as train
import lqf.solve as solve

METHODS = ("lqf", "nonlinear", "probe")


def check_config(cfg: Mapping[str, Any]) -> None:
  require(cfg["method"] in METHODS, f"unknown method {cfg['method']!r}: use one of "
          f"{', '.join(METHODS)}")
  require(cfg["shots"] >= 0, f"shots must be ≥ 0 (0 = the whole split), got {cfg['shots']}")
  config_lib.check_data(cfg["data"])
  q = cfg["lqf"]
  require(q["k"] > 0, f"lqf.k (the target scale) must be positive, got {q['k']}")
  require(q["lam"] >= 0, f"lqf.lam (the ridge weight) must be ≥ 0, got {q['lam']}")
  require(q["damping"] > 0, f"lqf.damping must be positive, got {q['damping']}")
  require(q["scope"] in linearize.SCOPES, f"unknown lqf.scope {q['scope']!r}: use one of "
          f"{', '.join(linearize.SCOPES)}")
  require(q["loss"] in objective.LOSSES, f"unknown lqf.loss {q['loss']!r}: use one of "
          f"{', '.join(objective.LOSSES)}")
  require(q["optimizer"] in optim.OPTIMIZERS, f"unknown lqf.optimizer {q['optimizer']!r}: "
          f"use one of {', '.join(optim.OPTIMIZERS)}")
  require(q["curvature"] in ("once", "ema"), f"lqf.curvature must be 'once' or 'ema', got "
          f"{q['curvature']!r}")
  for key in ("lr", "steps", "batch_size", "checkpoint_every"):
    require(q[key] > 0, f"lqf.{key} must be positive, got {q[key]}")
  aug = cfg["data"]["augment"]
  require(cfg["method"] != "lqf" or (aug["crop_padding"] == 0 and not aug["flip"]),
          "lqf computes the frozen prefix once per image, so it cannot augment: set "
          "--config.data.augment.crop_padding=0 and --config.data.augment.flip=False")
  if cfg["method"] == "lqf" and q["report_gap"]:
    check_solve_config(cfg)
  config_lib.check_train(cfg["finetune"], prefix="finetune")
  require(cfg["probe"]["lr"] > 0 and cfg["probe"]["steps"] > 0,
          "probe.lr and probe.steps must be positive")


def check_solve_config(cfg: Mapping[str, Any]) -> None:
  q, s = cfg["lqf"], cfg["solve"]
  require(q["loss"] == "mse", f"the exact solvers need the squared loss (lqf.loss=mse), "
          f"got lqf.loss={q['loss']!r}: cross-entropy has no closed-form optimum")
  require(s["method"] in solve.SOLVERS, f"unknown solve.method {s['method']!r}: use one of "
          f"{', '.join(solve.SOLVERS)}")
  for key in ("tol", "max_iters", "damping", "batch_size", "max_gb"):
    require(s[key] > 0, f"solve.{key} must be positive, got {s[key]}")


def load_pretrained_for(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], Classifier]:
  """The pretraining run's config and model, checked against the target data."""
  return pretrain.pretrained_for(cfg["pretrained"]["workdir"], cfg["data"]["channels"])


def run(cfg: Mapping[str, Any], workdir: str, *, stop_at_step: int | None = None,
        progress: bool = True) -> dict[str, Any]:
  """Runs the job; returns (and writes) the final metrics."""
  check_config(cfg)
  mesh = parallel.mesh_for(cfg)
  pre_cfg, pretrained = load_pretrained_for(cfg)
  d = cfg["data"]
  data = pipeline.load_split(d, d["train_split"], corrupted=d["corrupt_train"],
                             shots=cfg["shots"], subset_seed=cfg["seed"])
  evaluation = pipeline.load_split(d, d["eval_split"], corrupted=d["corrupt_eval"])
  clf = finetune.with_new_head(pretrained, pre_cfg["model"], data.num_classes,
                               d["channels"], cfg["seed"])
  checkpoint.claim_workdir(workdir, config_lib.to_dict(cfg), command="finetune",
                           may_change=("lqf.checkpoint_every", "finetune.checkpoint_every",
                                       "finetune.log_every", "finetune.eval_every",
                                       "parallel"))
  method = cfg["method"]
  if method == "nonlinear":
    t = cfg["finetune"]
    params, stats = train.fit(clf, data, t, seed=cfg["seed"], train_bn=t["train_bn"],
                              augment=d["augment"],
                              evaluation=evaluation, workdir=workdir,
                              stop_at_step=stop_at_step, progress=progress, mesh=mesh)
    jitted = jax.jit(clf.apply)
    predict = lambda x: jitted(params, stats, x)
  elif method == "probe":
    out = finetune.linear_probe(clf, data, cfg["probe"], seed=cfg["seed"])
    jitted = jax.jit(out.apply)
    predict = lambda x: jitted(out.params, out.batch_stats, x)
  else:
    trained = _run_lqf(clf, data, cfg, workdir, stop_at_step, progress, mesh)
    if trained is None:
      return {}
    predict, delta = trained
  result = {"method": method, "eval": {"accuracy": train.accuracy(predict, evaluation),
                                       "count": len(evaluation)},
            "train": {"accuracy": train.accuracy(predict, data), "count": len(data)}}
  if method == "lqf" and cfg["lqf"]["report_gap"]:
    result["optimality"] = _optimality(clf, data, cfg, delta)
  if stop_at_step is None:
    atomic_write_json(os.path.join(workdir, "final_metrics.json"), result)
  return result


def _optimality(clf: Classifier, data: pipeline.ImageSplit, cfg: Mapping[str, Any],
                delta: Any) -> dict[str, Any]:
  """The trained δ's objective against the exact optimum (config block `solve`)."""
  c, s = cfg["lqf"], cfg["solve"]
  sol, seconds = finetune.exact_optimum(clf, data.images, data.labels, data.num_classes,
                                         c, s, seed=cfg["seed"])
  value, gap = finetune.gap_of(clf, data.images, data.labels, data.num_classes, c, delta,
                                sol.objective, float64=s["float64"])
  return {"objective": value, "optimum": sol.objective, "relative_gap": gap,
          "solver": s["method"], "solver_seconds": seconds}


def _run_lqf(clf: Classifier, data: pipeline.ImageSplit, cfg: Mapping[str, Any],
             workdir: str, stop_at_step: int | None, progress: bool,
             mesh: Mesh | None = None) -> tuple[Callable[[jax.Array], jax.Array], Any] | None:
  """Trains δ with checkpoints and resume; returns (predictor, δ), or None if stopped."""
  c = cfg["lqf"]
  lin = linearize.linearize(clf.split_at, clf.params, clf.batch_stats, c["scope"],
                            batch_norm=c["batch_norm"], select=clf.linearizable)
  # Augmentation is off here, so the frozen prefix is computed once per image.
  feats = linearize.prefix_features(lin, jnp.asarray(data.images))
  labels = jnp.asarray(data.labels)
  loss = objective.make_loss(lin.apply, loss=c["loss"], k=c["k"], lam=c["lam"])
  mgr = checkpoint.manager(os.path.join(workdir, "checkpoints"))
  log = MetricsLog(os.path.join(workdir, "metrics.jsonl"))
  like = {"delta": lin.zeros(),
          "opt_state": optim.init_state(loss, lin.zeros(), lin.state, feats, labels, c, seed=cfg["seed"])}
  restored = checkpoint.restore_latest(mgr, like)
  resume = None
  if restored is not None:
    state, step = restored
    resume = (step, state["delta"], state["opt_state"])
    print(f"resuming from the checkpoint at step {step} in {workdir}", file=sys.stderr)
  start = 0 if resume is None else resume[0]
  log.truncate_after(start)
  total = int(c["steps"]) if stop_at_step is None else min(int(c["steps"]), stop_at_step)
  bar = tqdm(total=int(c["steps"]), initial=start, desc="lqf", disable=not progress,
             dynamic_ncols=True, file=sys.stderr)
  objective_at = jax.jit(loss)
  # The whole-set objective reads δ where the optimiser keeps it (replicated on a mesh).
  state_at, data_at = (lin.state, (feats, labels)) if mesh is None else \
      parallel.replicate((lin.state, (feats, labels)), mesh)

  def on_step(step, delta, opt_state):
    value = float(objective_at(delta, state_at, data_at))
    log.write(step, split="train", objective=value)
    bar.update(1)
    bar.set_postfix(objective=f"{value:.4g}", refresh=False)
    if step % c["checkpoint_every"] == 0 or step == c["steps"]:
      checkpoint.save(mgr, step, {"delta": delta, "opt_state": opt_state})
    faults.after_step(step)

  try:
    delta, _ = optim.fit(loss, lin.zeros(), lin.state, feats, labels, dict(c, steps=total), seed=cfg["seed"], callback=on_step, resume=resume,
                         mesh=mesh)
  finally:  # Also on a diverging run: the last good checkpoint is completed, not lost.
    bar.close()
    mgr.wait_until_finished()
    mgr.close()
    log.close()
  delta = parallel.to_host(delta)
  if total < int(c["steps"]):
    return None
  apply = jax.jit(lin.apply)
  return (lambda x: apply(delta, lin.state, linearize.prefix_features(lin, x))), delta
