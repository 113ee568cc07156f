"""`python -m bct bench --json results/bct.json`: backward-compatible updates on the
built-in digits.

The update of digits_bct, once per seed (the seed picks the few-shot
subsets, the heads and the batch order of every model). Arms, each scored by cross-model
retrieval on the test split (every image a query and a gallery item):

* `independent`, `l2`, `bct`: the new model fine-tuned with that loss (nonlinear);
* `lqf`, `lqf_bct`: the linearized new model solved exactly without (ρ = 0) and with
  the influence term (ρ = `term.rho`);
* `hetero_*`: a small query model (ResNet-20, width 8) against a large gallery model
  (ResNet-32, width 16), trained with BCT against the large one or independently;
* `chain`: v1 (the old model) -> v2 -> v3, each trained with BCT against its
  predecessor, and every cross-model pair.

Metrics are fractions; `gain` is the update gain on top-1 against the independently
trained nonlinear model, `own_gain` against the same family without the constraint
(LQF at ρ = 0 for `lqf_bct`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import sys
import time
from typing import Any

import bct.experiments.curve as job_curve
import bct.experiments.train as job
import bct.retrieval as retrieval
import lqf.experiments.bench.common as lqf_bench
import lqf.runtime.config as config_lib
from lqf.runtime.io import atomic_write_json

CONFIG = "digits_bct"
NONLINEAR = ("independent", "l2", "bct")
QUICK = (*lqf_bench.QUICK_DATA, "train.steps=10", "old.finetune.steps=10", "new.shots=3",
         "old.shots=3", "curve.rhos=(0.0,0.5)")
METRICS = ("top1", "top5", "mAP")


SPECS = ("new", "old", "bench.hetero.gallery", "bench.hetero.query", "bench.chain.v2",
         "bench.chain.v3")


def ensure_backbones(cfg: Mapping[str, Any], quick: bool) -> list[str]:
  """Overrides pointing every model of the config at a finished pretraining run,
  pretrained first when missing (`_quick` runs of 20 steps in quick mode)."""
  return lqf_bench.backbone_overrides(cfg, [f"{k}.pretrained" for k in SPECS], quick)


def _pairs(arms: Sequence[str]) -> list[tuple[str, str]]:
  return [("old", "old")] + [p for a in arms for p in ((a, "old"), (a, a))]


def run_update(cfg: Mapping[str, Any], seed: int) -> dict[str, Any]:
  """Every arm on the update of `seed`: the retrieval tables and timings."""
  cfg = config_lib.to_dict(cfg) | {"seed": seed}
  b = cfg["bct"]
  data, evaluation = job.load_data(cfg)
  classes = job.label_set(cfg["new"]["classes"], data.num_classes, "new.classes")
  old = job.old_model(cfg, data.num_classes)
  heads = [job.old_head(old, classes, data, b["synth_norm"], b["synth_center"])]
  models, timing = {"old": old}, {}
  for method in NONLINEAR:
    t0 = time.perf_counter()
    models[method] = job.fit_model(cfg, cfg["new"], data, cfg["train"], seed=seed,
                                   method=method, heads=heads, old=old)
    timing[method] = time.perf_counter() - t0
  t0 = time.perf_counter()
  linear = job_curve.Linearized(cfg, data, old, seed)
  models["lqf"] = linear.model(0.0)[0]
  models["lqf_bct"] = linear.model(float(cfg["term"]["rho"]))[0]
  timing["lqf_path"] = time.perf_counter() - t0
  update = job.cross_retrieval(cfg, models, evaluation,
                               _pairs(NONLINEAR + ("lqf", "lqf_bct")))
  t0 = time.perf_counter()
  hetero = heterogeneous(cfg, data, evaluation, seed)
  timing["hetero"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  chain = chain_matrix(cfg, data, evaluation, old, seed)
  timing["chain"] = time.perf_counter() - t0
  return {"update": update, "hetero": hetero, "chain": chain, "timing_s": timing}


def heterogeneous(cfg: Mapping[str, Any], data, evaluation, seed: int
                  ) -> dict[str, dict[str, float]]:
  """A small query model trained against a large gallery model that saw every class."""
  h, b = cfg["bench"]["hetero"], cfg["bct"]
  everything = dict(classes=())
  large = job.fit_model(cfg, dict(h["gallery"], **everything), data, cfg["train"],
                        seed=seed, log_name="large")
  head = job.old_head(large, tuple(range(data.num_classes)), data, b["synth_norm"],
                      b["synth_center"])
  small = job.fit_model(cfg, dict(h["query"], **everything), data, cfg["train"], seed=seed,
                        method="bct", heads=[head], log_name="small_bct")
  small_ind = job.fit_model(cfg, dict(h["query"], **everything), data, cfg["train"],
                            seed=seed, log_name="small_independent")
  models = {"large": large, "small": small, "small_independent": small_ind}
  return job.cross_retrieval(cfg, models, evaluation, [
      ("large", "large"), ("small", "large"), ("small_independent", "large"),
      ("small", "small"), ("small_independent", "small_independent")])


def chain_matrix(cfg: Mapping[str, Any], data, evaluation, v1: job.Model, seed: int
                 ) -> dict[str, dict[str, float]]:
  """v1 -> v2 -> v3 and the retrieval of every (query version, gallery version)."""
  c, b = cfg["bench"]["chain"], cfg["bct"]
  versions = {"v1": v1}
  for name in ("v2", "v3"):
    spec = c[name]
    classes = job.label_set(spec["classes"], data.num_classes, f"bench.chain.{name}.classes")
    olds = list(versions.values()) if c["mode"] == "all" else [list(versions.values())[-1]]
    heads = [job.old_head(o, classes, data, b["synth_norm"], b["synth_center"])
             for o in olds]
    versions[name] = job.fit_model(cfg, spec, data, cfg["train"], seed=seed, method="bct",
                                   heads=heads, log_name=f"chain_{name}")
  names = list(versions)
  return job.cross_retrieval(cfg, versions, evaluation,
                             [(q, g) for q in names for g in names])


def _gain(new_old: float, old_old: float, reference: float) -> float:
  """The update gain, NaN where it is undefined (the reference no better than old)."""
  return retrieval.update_gain(new_old, old_old, reference) if reference > old_old \
      else float("nan")


def _arms(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """{arm: {metric: summary over seeds}} from the per-seed tables."""
  values: dict[str, dict[str, list[float]]] = {}

  def add(arm, metric, value):
    values.setdefault(arm, {}).setdefault(metric, []).append(float(value))

  for r in per_seed:
    u = r["update"]
    for m in METRICS:
      add("old", f"old/old {m}", u["old/old"][m])
    for arm in NONLINEAR + ("lqf", "lqf_bct"):
      for m in METRICS:
        add(arm, f"new/old {m}", u[f"{arm}/old"][m])
        add(arm, f"new/new {m}", u[f"{arm}/{arm}"][m])
      add(arm, "compatible", retrieval.compatible(u[f"{arm}/old"]["top1"],
                                                  u["old/old"]["top1"]))
      add(arm, "gain", _gain(u[f"{arm}/old"]["top1"], u["old/old"]["top1"],
                             u["independent/independent"]["top1"]))
    add("lqf_bct", "own_gain", _gain(u["lqf_bct/old"]["top1"], u["old/old"]["top1"],
                                     u["lqf/lqf"]["top1"]))
    for pair, row in r["hetero"].items():
      for m in METRICS:
        add("hetero", f"{pair} {m}", row[m])
    for pair, row in r["chain"].items():
      for m in ("top1", "mAP"):
        add("chain", f"{pair} {m}", row[m])
  return {arm: {k: lqf_bench.summary(v) for k, v in ms.items()} for arm, ms in values.items()}


def goals(arms: Mapping[str, Any]) -> dict[str, Any]:
  """The issue's goals, on the means over seeds (top-1)."""
  mean = lambda arm, k: arms[arm][k]["mean"]
  old_old = mean("old", "old/old top1")
  passes = lambda arm: mean(arm, "new/old top1") > old_old
  return {
      "independent fails the criterion": {"met": not passes("independent"),
                                          "new/old": mean("independent", "new/old top1"),
                                          "old/old": old_old},
      "bct passes the criterion": {"met": passes("bct"), "new/old": mean("bct", "new/old top1"),
                                   "old/old": old_old},
      "lqf_bct passes the criterion": {"met": passes("lqf_bct"),
                                       "new/old": mean("lqf_bct", "new/old top1"),
                                       "old/old": old_old},
      "lqf_bct update gain >= 0.3": {"met": mean("lqf_bct", "own_gain") >= 0.3,
                                     "own_gain": mean("lqf_bct", "own_gain"),
                                     "gain": mean("lqf_bct", "gain")},
  }


def run(*, json_path: str, seeds: int = 5, quick: bool = False,
        overrides: Sequence[str] = ()) -> dict[str, Any]:
  """Runs every arm for `seeds` seeds (0, 1, ...) and writes the JSON."""
  base = config_lib.load(CONFIG, list(QUICK if quick else ()) + list(overrides))
  cfg = config_lib.load(CONFIG, list(QUICK if quick else ()) + list(overrides)
                        + ensure_backbones(base, quick))
  per_seed = []
  for seed in range(seeds):
    t0 = time.perf_counter()
    per_seed.append(run_update(cfg, seed))
    u = per_seed[-1]["update"]
    print(f"bct seed {seed}: {time.perf_counter() - t0:.0f}s; top-1 old/old "
          f"{100 * u['old/old']['top1']:.2f}%, new/old " + ", ".join(
              f"{a} {100 * u[f'{a}/old']['top1']:.2f}%" for a in NONLINEAR + ("lqf_bct",)),
          file=sys.stderr)
  arms = _arms(per_seed)
  doc = {"meta": lqf_bench.meta(f"python -m bct bench --json {json_path} --seeds {seeds}"
                                + (" --quick" if quick else ""), range(seeds)),
         "config": config_lib.to_dict(cfg), "arms": arms, "goals": goals(arms),
         "per_seed": per_seed}
  atomic_write_json(json_path, doc)
  return doc


def format_table(doc: Mapping[str, Any]) -> str:
  arms = doc["arms"]
  pct = lambda s: f"{100 * s['mean']:6.2f} ± {100 * s['std']:5.2f}"
  lines = [f"old/old top-1 {pct(arms['old']['old/old top1'])}, mAP "
           f"{pct(arms['old']['old/old mAP'])}",
           f"{'arm':<12} {'new/old top1':>16} {'new/new top1':>16} {'new/old mAP':>16} "
           f"{'gain':>6} {'compatible':>11}"]
  for arm in NONLINEAR + ("lqf", "lqf_bct"):
    a = arms[arm]
    lines.append(f"{arm:<12} {pct(a['new/old top1']):>16} {pct(a['new/new top1']):>16} "
                 f"{pct(a['new/old mAP']):>16} {a['gain']['mean']:>6.2f} "
                 f"{sum(a['compatible']['values']):.0f}/{len(a['compatible']['values'])}")
  lines.append("heterogeneous (query/gallery top-1): " + ", ".join(
      f"{k.removesuffix(' top1')} {pct(v)}" for k, v in arms["hetero"].items()
      if k.endswith("top1")))
  lines.append("chain (query/gallery top-1): " + ", ".join(
      f"{k.removesuffix(' top1')} {pct(v)}" for k, v in arms["chain"].items()
      if k.endswith("top1")))
  for name, g in doc["goals"].items():
    lines.append(f"goal: {name}: {'met' if g['met'] else 'MISSED'}")
  return "\n".join(lines)
