"""The exact LQF+PC curve job: `python -m pc curve --config NAME --out DIR`.

For the config's update (old model, new training subset), the linearized new model's
LQF problem with the PC term is solved exactly at every penalty share in `curve.rhos`
(`lqf.solve.KernelPath`: one Jacobian, one small factorisation per point), and each optimum
is scored on the evaluation split. The `curve.references` arms (nonlinear new models
trained with those PC losses) are trained for comparison. Writes `DIR/curve.json`,
`DIR/curve.csv` and `DIR/curve.png`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

import lqf.data.pipeline as pipeline
from lqf.errors import require
import lqf.linearize as linearize
import lqf.runtime.config as config_lib
from lqf.runtime.io import atomic_savefig, atomic_write_json, atomic_write_text, csv_text
import lqf.runtime.parallel as parallel
import lqf.solve as solve
import pc.experiments.train as job
import pc.lqf_term as lqf_term
import pc.metrics as metrics

CSV_FIELDS = ("rho", "ER_new", "NFR", "PFR", "rel_NFR", "NFI", "ER_old", "objective",
              "solve_seconds")


def check_config(cfg: Mapping[str, Any]) -> None:
  job.check_config(cfg)
  config_lib.check_curve(cfg["curve"], cfg["term"])
  bad = [m for m in cfg["curve"]["references"] if m not in job.METHODS]
  require(not bad, f"unknown curve.references {bad}: use methods of {', '.join(job.METHODS)}")


def lqf_curve(cfg: Mapping[str, Any], data, evaluation, old: job.Predict,
              rhos: Sequence[float], seed: int) -> dict[str, Any]:
  """The exact LQF+PC optimum at each share ρ, scored on `evaluation` against `old`."""
  c, q = cfg["lqf"], cfg["term"]
  clf = job.new_classifier(dict(cfg, init="finetune"), data.num_classes, seed)
  lin = linearize.linearize(clf.split_at, clf.params, clf.batch_stats, c["scope"],
                            batch_norm=c["batch_norm"], select=clf.linearizable)
  feats = linearize.prefix_features(lin, jnp.asarray(data.images))
  old_train = job.logits_of(old, data.images)
  targets, fit = lqf_term.old_targets(old_train, data.labels, k=c["k"], mode=q["target"])
  weights = lqf_term.pc_weights(old_train, data.labels, alpha=q["alpha"], beta=q["beta"])
  path = solve.KernelPath.build(
      lqf_term.pc_problem(lin.apply, lin.state, lin.zeros(), feats, data.labels,
                          data.num_classes, targets, weights, k=c["k"], lam=c["lam"],
                          rho=0.0, batch_size=int(q["batch_size"])),
      max_bytes=q["max_gb"] * 1e9)
  old_pred = metrics.predictions(old, pipeline.eval_batches(evaluation, 256))
  eval_feats = linearize.prefix_features(lin, jnp.asarray(evaluation.images))
  apply = jax.jit(lin.apply)

  def score(delta):
    logits = np.concatenate([np.asarray(apply(delta, lin.state, eval_feats[i:i + 256]))
                             for i in range(0, len(eval_feats), 256)])
    return metrics.evaluate(old_pred, logits.argmax(-1), evaluation.labels,
                            evaluation.num_classes)["rates"]

  points = solve.curve(path, rhos, score)
  return {"points": points, "jacobian_seconds": path.seconds, "target_fit": fit,
          "old_right_on_train": float((old_train.argmax(-1) == data.labels).mean())}


def references(cfg: Mapping[str, Any], data, evaluation, old: job.Predict,
               methods: Sequence[str], seed: int, mesh: Mesh | None = None
               ) -> dict[str, dict[str, Any]]:
  """Each method's nonlinear new model (trained on `mesh`, None: one device): the
  update's rates on `evaluation`."""
  out = {}
  for m in methods:
    print(f"training the {m!r} reference model", file=sys.stderr)
    new = job.train_new(cfg, data, old, seed=seed, method=m, mesh=mesh)
    out[m] = job.flips(old, new, evaluation)["rates"]
  return out


def to_csv(points: Sequence[Mapping[str, float]]) -> str:
  return csv_text(({k: f"{p[k]:.6g}" for k in CSV_FIELDS} for p in points), CSV_FIELDS)


def plot(points: Sequence[Mapping[str, float]], refs: Mapping[str, Mapping[str, float]],
         path: str, title: str = "") -> None:
  """ER_new against NFR: the exact LQF curve and the reference arms as points, as PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(5.5, 4.2))
  ax.plot([100 * p["NFR"] for p in points], [100 * p["ER_new"] for p in points], "o-",
          color="tab:blue", ms=3, label="LQF + PC term (exact, ρ from 0)")
  ax.annotate("ρ=0", (100 * points[0]["NFR"], 100 * points[0]["ER_new"]), fontsize=8)
  ax.annotate(f"ρ={points[-1]['rho']:g}", (100 * points[-1]["NFR"], 100 * points[-1]["ER_new"]),
              fontsize=8)
  markers = {"none": "s", "naive": "v", "fd_kl": "^", "fd_lm": "D", "ensemble": "*"}
  for name, r in refs.items():
    ax.plot(100 * r["NFR"], 100 * r["ER_new"], markers.get(name, "x"), ms=8,
            label=f"{name} (nonlinear)")
  ax.set_xlabel("negative flip rate NFR (%)")
  ax.set_ylabel("new model's error rate ER (%)")
  ax.set_title(title or "PC trade-off")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  atomic_savefig(fig, path)


def run(cfg: Mapping[str, Any], out: str, *, progress: bool = True) -> dict[str, Any]:
  """Runs the job; writes `out/curve.{json,csv,png}` and returns the JSON document."""
  del progress  # Every step prints its own line.
  check_config(cfg)
  data, evaluation = job.load_data(cfg)
  mesh = parallel.mesh_for(cfg)  # Once per job: it may start jax.distributed.
  old = job.predictor(job.old_model(cfg, data.num_classes, mesh))
  # Size check before any work or write.
  c = cfg["lqf"]
  clf = job.new_classifier(dict(cfg, init="finetune"), data.num_classes, cfg["seed"])
  solve.check_kernel_memory(
      len(data) * data.num_classes,
      solve.linearized_size(clf.params, c["scope"], batch_norm=c["batch_norm"],
                              select=clf.linearizable),
      cfg["term"]["max_gb"] * 1e9, outputs=data.num_classes, what="the exact trade-off",
      limit="term.max_gb")
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    require(False, f"--out {out!r} cannot be created ({e.strerror}): choose a writable folder")
  print(f"solving the LQF+PC problem at {len(cfg['curve']['rhos'])} shares", file=sys.stderr)
  curve = lqf_curve(cfg, data, evaluation, old, cfg["curve"]["rhos"], cfg["seed"])
  refs = references(cfg, data, evaluation, old, cfg["curve"]["references"], cfg["seed"],
                    mesh)
  doc = {"config": config_lib.to_dict(cfg), "train_examples": len(data),
         "eval_examples": len(evaluation), "lqf_pc": curve, "references": refs}
  atomic_write_json(os.path.join(out, "curve.json"), doc)
  atomic_write_text(os.path.join(out, "curve.csv"), to_csv(curve["points"]))
  plot(curve["points"], refs, os.path.join(out, "curve.png"),
       title=f"digits update, {len(data)} training examples")
  return doc


def format_table(doc: Mapping[str, Any]) -> str:
  lines = [f"{'arm':<22} {'ER_new %':>9} {'NFR %':>7} {'rel NFR':>8}"]
  for p in doc["lqf_pc"]["points"]:
    lines.append(f"{'lqf+pc rho=' + format(p['rho'], 'g'):<22} {100 * p['ER_new']:9.2f} "
                 f"{100 * p['NFR']:7.2f} {p['rel_NFR']:8.3f}")
  for name, r in doc["references"].items():
    lines.append(f"{name:<22} {100 * r['ER_new']:9.2f} {100 * r['NFR']:7.2f} "
                 f"{r['rel_NFR']:8.3f}")
  return "\n".join(lines)
