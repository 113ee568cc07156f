"""The exact compatibility curve: `python -m bct curve --config NAME --out DIR`.

The new model is the pretrained backbone under a fresh head, linearized around its
weights (joint output: logits and embedding). Its LQF objective with the influence term
(`bct.lqf_term`) is solved exactly at every share ρ in `curve.rhos` from one Jacobian,
and each optimum's embedding is scored by cross-model retrieval against the old model:
new/new (the new model's own gallery, after a backfill) against new/old (no backfill).
Writes `DIR/curve.json`, `DIR/curve.csv` and `DIR/curve.png`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import bct.experiments.train as job
import bct.lqf_term as lqf_term
import lqf.data.pipeline as pipeline
from lqf.errors import require
import lqf.linearize as linearize
import lqf.runtime.config as config_lib
from lqf.runtime.io import atomic_savefig, atomic_write_json, atomic_write_text, csv_text
import lqf.runtime.parallel as parallel
import lqf.solve as solve

CSV_FIELDS = ("rho", "new/new top1", "new/old top1", "new/new mAP", "new/old mAP",
              "accuracy", "objective")


def check_config(cfg: Mapping[str, Any]) -> None:
  job.check_config(cfg)
  config_lib.check_curve(cfg["curve"], cfg["term"])
  rho = cfg["term"]["rho"]
  require(0.0 <= rho <= 1.0, f"term.rho must be in [0, 1], got {rho}")
  require(cfg["lqf"]["k"] > 0 and cfg["lqf"]["lam"] > 0,
          "lqf.k and lqf.lam must be positive for the exact solve")


class Linearized:
  """The linearized new model of a config and its exact compatibility path."""

  def __init__(self, cfg: Mapping[str, Any], data: pipeline.ImageSplit, old: job.Model,
               seed: int):
    c, q, b = cfg["lqf"], cfg["term"], cfg["bct"]
    self.classes = job.label_set(cfg["new"]["classes"], data.num_classes, "new.classes")
    self.num_classes = len(self.classes)
    clf = job.new_classifier(cfg["new"], self.num_classes, cfg["data"]["channels"], seed,
                             job.head_kind(cfg))
    self.lin = linearize.linearize(functools.partial(clf.split_at, output="joint"),
                                   clf.params, clf.batch_stats, c["scope"],
                                   batch_norm=c["batch_norm"], select=clf.linearizable)
    sub = job.restrict(data, self.classes)
    self.head = job.old_head(old, self.classes, data, b["synth_norm"], b["synth_center"])
    feats = linearize.prefix_features(self.lin, jnp.asarray(sub.images))
    self.path = solve.KernelPath.build(
        lqf_term.bct_problem(self.lin.apply, self.lin.state, self.lin.zeros(), feats,
                             sub.labels, self.num_classes, self.head, rule=b["dim_rule"],
                             k=c["k"], lam=c["lam"], rho=0.0,
                             batch_size=int(q["batch_size"])),
        max_bytes=q["max_gb"] * 1e9)
    self._joint = jax.jit(self.lin.apply)

  def outputs(self, delta: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The joint output [N, C + D] (logits, embedding) at δ."""
    return np.concatenate([np.asarray(self._joint(delta, self.lin.state,
                                                  linearize.prefix_features(
                                                      self.lin, images[i:i + batch_size])))
                           for i in range(0, len(images), batch_size)])

  def model(self, rho: float) -> tuple[job.Model, dict[str, Any]]:
    """The exact optimum at ρ as a `job.Model` (embedding only), its δ and objective."""
    sol = self.path.at_share(rho)
    delta, value = sol.delta, sol.objective
    c = self.num_classes
    model = job.Model(lambda images: self.outputs(delta, images)[:, c:], self.classes)
    return model, {"delta": delta, "objective": value}


def lqf_curve(cfg: Mapping[str, Any], data: pipeline.ImageSplit,
              evaluation: pipeline.ImageSplit, old: job.Model, rhos: Sequence[float],
              seed: int) -> dict[str, Any]:
  """For each ρ, the exact optimum's retrieval against `old` and its accuracy."""
  linear = Linearized(cfg, data, old, seed)
  c = linear.num_classes
  old_old = job.cross_retrieval(cfg, {"old": old}, evaluation, [("old", "old")])["old/old"]
  points = []
  for rho in rhos:
    model, info = linear.model(float(rho))
    out = linear.outputs(info["delta"], evaluation.images)
    table = job.cross_retrieval(cfg, {"old": old, "new": model}, evaluation,
                                [("new", "old"), ("new", "new")])
    pred = np.asarray(linear.classes)[out[:, :c].argmax(-1)]
    points.append({"rho": float(rho), "objective": info["objective"],
                   "accuracy": float((pred == evaluation.labels).mean()),
                   "retrieval": table})
  return {"points": points, "old/old": old_old, "jacobian_seconds": linear.path.seconds}


def flat_point(p: Mapping[str, Any]) -> dict[str, float]:
  out = {"rho": p["rho"], "accuracy": p["accuracy"], "objective": p["objective"]}
  for pair, row in p["retrieval"].items():
    for m in ("top1", "mAP"):
      out[f"{pair} {m}"] = row[m]
  return out


def to_csv(points: Sequence[Mapping[str, Any]]) -> str:
  return csv_text(map(flat_point, points), CSV_FIELDS)


def plot(doc: Mapping[str, Any], path: str) -> None:
  """new/new against new/old top-1, one point per ρ, with old/old as a line."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  pts = [flat_point(p) for p in doc["points"]]
  fig, ax = plt.subplots(figsize=(5, 4))
  ax.plot([100 * p["new/old top1"] for p in pts], [100 * p["new/new top1"] for p in pts],
          "o-", label="LQF + influence term (exact)")
  for p in pts:
    ax.annotate(f"ρ={p['rho']:g}", (100 * p["new/old top1"], 100 * p["new/new top1"]),
                fontsize=7)
  ax.axvline(100 * doc["old/old"]["top1"], color="gray", ls="--", label="old/old")
  ax.set_xlabel("new/old top-1 (%)  (no backfill)")
  ax.set_ylabel("new/new top-1 (%)  (backfilled)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  atomic_savefig(fig, path)


def run(cfg: Mapping[str, Any], out: str) -> dict[str, Any]:
  """Computes the curve of `cfg` and writes it to `out`."""
  check_config(cfg)
  data, evaluation = job.load_data(cfg)
  old = job.old_model(cfg, data.num_classes, parallel.mesh_for(cfg))
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    require(False, f"--out {out!r} cannot be written ({e.strerror}): choose a writable folder")
  print("solving the linearized model along rho ...", file=sys.stderr)
  doc = {"config": config_lib.to_dict(cfg),
         **lqf_curve(cfg, data, evaluation, old, cfg["curve"]["rhos"], cfg["seed"])}
  atomic_write_json(os.path.join(out, "curve.json"), doc)
  atomic_write_text(os.path.join(out, "curve.csv"), to_csv(doc["points"]))
  plot(doc, os.path.join(out, "curve.png"))
  return doc


def format_table(doc: Mapping[str, Any]) -> str:
  lines = [f"old/old top-1 {100 * doc['old/old']['top1']:.2f}%, mAP "
           f"{100 * doc['old/old']['mAP']:.2f}%",
           f"{'rho':>5} {'new/new top1':>13} {'new/old top1':>13} {'new/old mAP':>12} "
           f"{'accuracy':>9}"]
  for p in map(flat_point, doc["points"]):
    lines.append(f"{p['rho']:>5.2f} {100 * p['new/new top1']:>12.2f}% "
                 f"{100 * p['new/old top1']:>12.2f}% {100 * p['new/old mAP']:>11.2f}% "
                 f"{100 * p['accuracy']:>8.2f}%")
  return "\n".join(lines)
