"""The exact LQF solution of a fine-tuning config: `python -m lqf solve --config ...
--workdir DIR`.

Builds the same linearized problem as `python -m lqf finetune` with `method=lqf` (the same
pretrained model, new head, few-shot subset, scope, k and λ) and minimises it exactly with
`solve.method` ("kernel": the tangent-kernel solve; "cg": K-FAC-preconditioned conjugate
gradient). Writes `workdir/solution/` (an orbax checkpoint of δ*, in the structure the
fine-tuning job's checkpoints hold it) and `workdir/solution.json` (optimum, iterations,
time, accuracies).

Precision: at a few shots a class the optimum is ~1e-5 of the objective at δ = 0. The
kernel solve resolves it in float32 (the kernel is factorised in float64); CG needs
`solve.float64=True` to get there.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
from typing import Any

import jax

import lqf.data.pipeline as pipeline
import lqf.experiments.finetune as job_finetune
import lqf.finetune as finetune
import lqf.linearize as linearize
import lqf.runtime.checkpoint as checkpoint
import lqf.runtime.config as config_lib
from lqf.runtime.io import atomic_write_json
import lqf.runtime.parallel as parallel
import lqf.runtime.train as train
import lqf.solve as solve

PyTree = Any


def run(cfg: Mapping[str, Any], workdir: str, *, progress: bool = True) -> dict[str, Any]:
  """Runs the job; returns (and writes) its result."""
  job_finetune.check_config(cfg)
  job_finetune.check_solve_config(cfg)
  mesh = parallel.mesh_for(cfg)
  pre_cfg, pretrained = job_finetune.load_pretrained_for(cfg)
  d, c, s = cfg["data"], cfg["lqf"], cfg["solve"]
  data = pipeline.load_split(d, d["train_split"], corrupted=d["corrupt_train"],
                             shots=cfg["shots"], subset_seed=cfg["seed"])
  evaluation = pipeline.load_split(d, d["eval_split"], corrupted=d["corrupt_eval"])
  clf = finetune.with_new_head(pretrained, pre_cfg["model"], data.num_classes,
                               d["channels"], cfg["seed"])
  if s["method"] == "kernel":  # Refuse before anything is written.
    solve.check_kernel_memory(
        len(data) * data.num_classes,
        solve.linearized_size(clf.params, c["scope"], batch_norm=c["batch_norm"],
                              select=clf.linearizable),
        s["max_gb"] * 1e9, outputs=data.num_classes, itemsize=8 if s["float64"] else 4)
  checkpoint.claim_workdir(workdir, config_lib.to_dict(cfg), command="solve",
                           may_change=("lqf.checkpoint_every", "parallel"))

  def show(j, _, value):
    if progress and (j % 25 == 0 or j == 1):
      print(f"  cg iteration {j}: objective {value:.6g}", flush=True)

  sol, seconds = finetune.exact_optimum(clf, data.images, data.labels, data.num_classes, c, s,
                               seed=cfg["seed"], callback=show, mesh=mesh)
  lin = linearize.linearize(clf.split_at, clf.params, clf.batch_stats, c["scope"],
                            batch_norm=c["batch_norm"], select=clf.linearizable)
  apply = jax.jit(lin.apply)
  predict = lambda x: apply(sol.delta, lin.state, linearize.prefix_features(lin, x))
  mgr = checkpoint.manager(os.path.join(workdir, "solution"), keep=1)
  checkpoint.save(mgr, 0, {"delta": sol.delta})
  mgr.wait_until_finished()
  mgr.close()
  result = {"method": f"solve:{s['method']}", "objective": sol.objective,
            "iterations": sol.iterations, "converged": bool(sol.converged),
            "seconds": seconds, "float64": bool(s["float64"]),
            "eval": {"accuracy": train.accuracy(predict, evaluation), "count": len(evaluation)},
            "train": {"accuracy": train.accuracy(predict, data), "count": len(data)}}
  atomic_write_json(os.path.join(workdir, "solution.json"), result)
  return result
