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

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lqf import checkpoint, finetune, linearize, parallel, solve, train
from lqf import config as config_lib
from lqf.data import pipeline
from lqf.errors import require
from lqf.io import atomic_write_json

PyTree = Any


def check_solve_config(cfg: Mapping[str, Any]) -> None:
  q, s = cfg["lqf"], cfg["solve"]
  require(q["loss"] == "mse", f"the exact solvers need the squared loss (lqf.loss=mse), "
          f"got lqf.loss={q['loss']!r}: cross-entropy has no closed-form optimum")
  require(s["method"] in solve.SOLVERS, f"unknown solve.method {s['method']!r}: use one of "
          f"{', '.join(solve.SOLVERS)}")
  for key in ("tol", "max_iters", "damping", "batch_size", "max_gb"):
    require(s[key] > 0, f"solve.{key} must be positive, got {s[key]}")


def _to_float(tree: PyTree, dtype: Any) -> PyTree:
  return jax.tree.map(lambda a: jnp.asarray(a, dtype)
                      if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a, tree)


def lqf_problem(clf: train.Classifier, images: np.ndarray, labels: np.ndarray,
                num_classes: int, c: Mapping[str, Any], *, dtype: Any,
                batch_size: int = 256) -> solve.Problem:
  """The LQF objective of config block `c` on (images, labels), in `dtype` (inside
  `jax.enable_x64` for float64)."""
  lin = linearize.linearize(clf.split_at, _to_float(clf.params, dtype),
                            _to_float(clf.batch_stats, dtype), c["scope"],
                            batch_norm=c["batch_norm"])
  feats = linearize.prefix_features(lin, jnp.asarray(images, dtype))
  return solve.mse_problem(lin.apply, lin.state, lin.zeros(), feats, labels, num_classes,
                           k=c["k"], lam=c["lam"], batch_size=batch_size)


def exact_optimum(clf: train.Classifier, images: np.ndarray, labels: np.ndarray,
                  num_classes: int, c: Mapping[str, Any], s: Mapping[str, Any], *,
                  seed: int = 0, callback: Callable[[int, PyTree, float], None] | None = None,
                  mesh: Mesh | None = None) -> tuple[solve.Solution, float]:
  """The minimiser of the LQF objective of config blocks `c` (lqf) and `s` (solve) on
  (images, labels), its data passes split over `mesh`'s devices. Returns the solution
  with δ* in float32, and the solve's seconds."""
  dtype = jnp.float64 if s["float64"] else jnp.float32
  with jax.enable_x64(bool(s["float64"])):
    problem = lqf_problem(clf, images, labels, num_classes, c, dtype=dtype,
                          batch_size=int(s["batch_size"]))
    problem = solve.on_mesh(problem, mesh)
    t0 = time.perf_counter()
    if s["method"] == "cg":
      pre = (solve.kfac_preconditioner(problem, damping=s["damping"], seed=seed)
             if s["precondition"] else None)
      sol = solve.cg(problem, tol=s["tol"], max_iters=int(s["max_iters"]), precondition=pre,
                     callback=callback)
    else:
      sol = solve.kernel_solve(problem, max_bytes=s["max_gb"] * 1e9)
    seconds = time.perf_counter() - t0
    delta = parallel.to_host(_to_float(sol.delta, jnp.float32))
    jax.block_until_ready(delta)
  return sol._replace(delta=delta), seconds


def gap_of(clf: train.Classifier, images: np.ndarray, labels: np.ndarray, num_classes: int,
           c: Mapping[str, Any], delta: PyTree, optimum: float, float64: bool = True
           ) -> tuple[float, float]:
  """(L(δ), (L(δ) - L*)/|L*|) for a trained δ, evaluated at the solver's precision."""
  dtype = jnp.float64 if float64 else jnp.float32
  with jax.enable_x64(float64):
    problem = lqf_problem(clf, images, labels, num_classes, c, dtype=dtype)
    value = solve.objective(problem, _to_float(delta, dtype))
  return value, solve.relative_gap(value, optimum)


def run(cfg: Mapping[str, Any], workdir: str, *, progress: bool = True) -> dict[str, Any]:
  """Runs the job; returns (and writes) its result."""
  from lqf import job_finetune  # pylint: disable=g-import-not-at-top
  job_finetune.check_config(cfg)
  check_solve_config(cfg)
  mesh = parallel.mesh_for(cfg)
  pre_cfg, pretrained = job_finetune.load_pretrained_for(cfg)
  d, c, s = cfg["data"], cfg["lqf"], cfg["solve"]
  data = pipeline.load_split(d, d["train_split"], corrupted=d["corrupt_train"],
                             shots=cfg["shots"], subset_seed=cfg["seed"])
  evaluation = pipeline.load_split(d, d["eval_split"], corrupted=d["corrupt_eval"])
  clf = finetune.with_new_head(pretrained, pre_cfg["model"], data.num_classes,
                               d["channels"], cfg["seed"])
  if s["method"] == "kernel":  # Refuse before anything is written.
    part = linearize.linearized_subtree(clf.params, c["scope"], batch_norm=c["batch_norm"])
    size = sum(np.size(l) for l in jax.tree.leaves(part))
    need = len(data) * data.num_classes * size * (8 if s["float64"] else 4)
    require(need <= s["max_gb"] * 1e9,
            f"the kernel solve needs the {len(data) * data.num_classes} × {size} Jacobian "
            f"({need / 1e9:.2f} GB), more than solve.max_gb={s['max_gb']}: use "
            "--config.solve.method=cg, which needs memory for one batch only")
  checkpoint.claim_workdir(workdir, config_lib.to_dict(cfg), command="solve",
                           may_change=("lqf.checkpoint_every", "parallel"))

  def show(j, _, value):
    if progress and (j % 25 == 0 or j == 1):
      print(f"  cg iteration {j}: objective {value:.6g}", flush=True)

  sol, seconds = exact_optimum(clf, data.images, data.labels, data.num_classes, c, s,
                               seed=cfg["seed"], callback=show, mesh=mesh)
  lin = linearize.linearize(clf.split_at, clf.params, clf.batch_stats, c["scope"],
                            batch_norm=c["batch_norm"])
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
