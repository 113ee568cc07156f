"""`python -m pc bench --json results/pc.json`: a model update on the built-in digits.

The update of digits_pc, once per seed (the seed picks the few-shot subset,
the heads and the batch order of both models). Arms: no treatment, naive re-weighting,
FD-KL, FD-LM and an ensemble of untreated models (nonlinear fine-tuning, the paper's
settings α = 1, β = 5, T = 100, with λ chosen from `bench.lam_grid` on the validation split),
and the linearized new model solved
exactly without (`lqf`) and with the PC term along the share ρ (`lqf_pc@rho=...`). Each
arm reports ER_old, ER_new, NFR, PFR, relative NFR and NFI on the test split (fractions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import sys
import time
from typing import Any

import jax

import lqf.data.pipeline as pipeline
from lqf.errors import UserError
import lqf.experiments.bench.common as lqf_bench
import lqf.runtime.config as config_lib
from lqf.runtime.io import atomic_write_json
import pc.experiments.curve as job_curve
import pc.experiments.train as job
import pc.metrics as metrics

CONFIG = "digits_pc"
NONLINEAR_ARMS = ("none", "naive", "fd_kl", "fd_lm")
QUICK = (*lqf_bench.QUICK_DATA, "train.steps=10", "old.finetune.steps=10",
         "pc.ensemble_size=2", "curve.rhos=(0.0,0.5,1.0)", "shots=3", "old.shots=3",
         "bench.lam_grid=(1.0,)", "term.target=logits")


def ensure_backbones(cfg: Mapping[str, Any], quick: bool) -> list[str]:
  """Overrides pointing the new and old models at finished pretraining runs, pretrained
  first when missing (`_quick` runs of 20 steps in quick mode)."""
  return lqf_bench.backbone_overrides(cfg, ("pretrained", "old.pretrained"), quick)


def _rates_summary(per_seed: Sequence[Mapping[str, float]]) -> dict[str, Any]:
  return {k: lqf_bench.summary([r[k] for r in per_seed]) for k in metrics.RATE_NAMES}


def choose_lam(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """FD's λ per distance from `bench.lam_grid` on the validation split (seed 0): the lowest
  NFR among values with ER within a point of no treatment's (else the lowest ER)."""
  cfg = config_lib.to_dict(cfg) | {"seed": 0}
  data, _ = job.load_data(cfg)
  d = cfg["data"]
  val = pipeline.load_split(d, cfg["val_split"], corrupted=d["corrupt_eval"])
  old = job.predictor(job.old_model(cfg, data.num_classes))
  base = job.flips(old, job.train_new(cfg, data, old, seed=0, method="none"), val)["rates"]
  out = {"none": base}
  for arm in ("fd_kl", "fd_lm"):
    grid = {}
    for lam in cfg["bench"]["lam_grid"]:
      c = dict(cfg, pc=dict(cfg["pc"], lam=lam))
      grid[lam] = job.flips(old, job.train_new(c, data, old, seed=0, method=arm), val)["rates"]
      print(f"tuning {arm} lam={lam}: val ER {100 * grid[lam]['ER_new']:.2f} NFR "
            f"{100 * grid[lam]['NFR']:.2f}", file=sys.stderr)
    ok = [l for l, r in grid.items() if r["ER_new"] <= base["ER_new"] + 0.01]
    lam = (min(ok, key=lambda l: (grid[l]["NFR"], grid[l]["ER_new"])) if ok
           else min(grid, key=lambda l: grid[l]["ER_new"]))
    out[arm] = {"lam": lam, "val": {str(l): r for l, r in grid.items()}}
  return out


def run_update(cfg: Mapping[str, Any], seed: int,
               lams: Mapping[str, float] | None = None) -> dict[str, Any]:
  """Every arm on the update of `seed`: {arm: rates} and the LQF curve's points."""
  cfg = config_lib.to_dict(cfg) | {"seed": seed}
  data, evaluation = job.load_data(cfg)
  old = job.predictor(job.old_model(cfg, data.num_classes))
  rates, timing = {}, {}
  members = []
  for arm in NONLINEAR_ARMS:
    t0 = time.perf_counter()
    c = dict(cfg, pc=dict(cfg["pc"], lam=(lams or {}).get(arm, cfg["pc"]["lam"])))
    new = job.train_new(c, data, old, seed=seed, method=arm)
    rates[arm] = job.flips(old, new, evaluation)["rates"]
    timing[arm] = time.perf_counter() - t0
    if arm == "none":
      members.append(new)
  t0 = time.perf_counter()
  for i in range(1, int(cfg["pc"]["ensemble_size"])):
    members.append(job.train_new(cfg, data, old, seed=seed + i, method="none"))
  rates["ensemble"] = job.flips(old, job.ensemble(members), evaluation)["rates"]
  timing["ensemble"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  curve = job_curve.lqf_curve(cfg, data, evaluation, old, cfg["curve"]["rhos"], seed)
  timing["lqf_pc_curve"] = time.perf_counter() - t0
  return {"rates": rates, "curve": curve["points"], "timing_s": timing,
          "old_right_on_train": curve["old_right_on_train"]}


def goals(arms: Mapping[str, Any], curve: Sequence[Mapping[str, float]]) -> dict[str, Any]:
  """The issue's goals, on means over seeds; `curve` holds the mean point per ρ."""
  mean = lambda arm, k: arms[arm][k]["mean"]
  none_er, none_nfr = mean("none", "ER_new"), mean("none", "NFR")
  fd = min(("fd_kl", "fd_lm"), key=lambda a: mean(a, "NFR"))
  halved = metrics.best_at([p for p in curve if p["NFR"] <= 0.5 * none_nfr],
                            none_er + 0.005)
  at_fd = metrics.best_at(curve, mean(fd, "ER_new"))
  lqf0 = curve[0]
  return {
      "untreated_nfr_at_least_2pct": none_nfr >= 0.02,
      "fd_kl_lowers_nfr": mean("fd_kl", "NFR") < none_nfr,
      "fd_lm_lowers_nfr": mean("fd_lm", "NFR") < none_nfr,
      "lqf_pc_halves_untreated_nfr_within_half_a_point": halved is not None,
      "lqf_pc_point_halving_nfr": halved,
      "lqf_pc_halves_its_own_rho0_nfr_within_half_a_point": metrics.best_at(
          [p for p in curve if p["NFR"] <= 0.5 * lqf0["NFR"]], lqf0["ER_new"] + 0.005)
          is not None,
      "best_fd_arm": fd,
      "lqf_pc_beats_best_fd_at_its_er": at_fd is not None and at_fd["NFR"] < mean(fd, "NFR"),
      "lqf_pc_point_at_best_fd_er": at_fd,
  }


def run(*, json_path: str, seeds: int, quick: bool, overrides: Sequence[str] = ()
        ) -> dict[str, Any]:
  """Runs the benchmark (module docstring) and writes its JSON document atomically.
  `quick` shrinks everything to a smoke test of the machinery, not a measurement."""
  if seeds < 1:
    raise UserError(f"--seeds must be at least 1, got {seeds}")
  base = (QUICK if quick else ()) + tuple(overrides)
  cfg = config_lib.load(CONFIG, base)
  cfg = config_lib.load(CONFIG, base + tuple(ensure_backbones(cfg, quick)))
  job.check_config(cfg)
  tuning = choose_lam(cfg)
  lams = {arm: tuning[arm]["lam"] for arm in ("fd_kl", "fd_lm")}
  per_seed = []
  for seed in range(seeds):
    t0 = time.perf_counter()
    per_seed.append(run_update(cfg, seed, lams))
    r = per_seed[-1]["rates"]
    print(f"seed {seed} ({time.perf_counter() - t0:.0f} s): " + "; ".join(
        f"{a} ER {100 * v['ER_new']:.2f} NFR {100 * v['NFR']:.2f}" for a, v in r.items()),
        file=sys.stderr)
    jax.clear_caches()  # Each seed compiles new closures; see bench.common.ReleaseCompiled.
  arm_names = list(per_seed[0]["rates"])
  arms = {a: _rates_summary([s["rates"][a] for s in per_seed]) for a in arm_names}
  rhos = [p["rho"] for p in per_seed[0]["curve"]]
  arms["lqf"] = _rates_summary([s["curve"][0] for s in per_seed])
  for i, rho in enumerate(rhos):
    arms[f"lqf_pc@rho={rho:g}"] = _rates_summary([s["curve"][i] for s in per_seed])
  mean_curve = [{"rho": rho, **{k: arms[f"lqf_pc@rho={rho:g}"][k]["mean"]
                                for k in metrics.RATE_NAMES}} for rho in rhos]
  command = f"python -m pc bench --json {json_path} --seeds {seeds}" + (" --quick" if quick else "")
  doc = {"meta": lqf_bench.meta(command, range(seeds)), "arms": arms,
         "goals": goals(arms, mean_curve), "curve_mean": mean_curve, "tuning": tuning,
         "timing_s": [s["timing_s"] for s in per_seed],
         "old_right_on_train": [s["old_right_on_train"] for s in per_seed],
         "design": {"config": config_lib.to_dict(cfg), "quick": quick}}
  atomic_write_json(json_path, doc)
  return doc


def format_table(doc: Mapping[str, Any]) -> str:
  lines = [f"{'arm':<20} " + " ".join(f"{k:>14}" for k in ("ER_old %", "ER_new %", "NFR %",
                                                            "rel NFR"))]
  for arm, m in doc["arms"].items():
    cells = [f"{100 * m[k]['mean']:7.2f} ± {100 * m[k]['std']:4.2f}" for k in
             ("ER_old", "ER_new", "NFR")]
    cells.append(f"{m['rel_NFR']['mean']:7.3f} ± {m['rel_NFR']['std']:4.2f}")
    lines.append(f"{arm:<20} " + " ".join(f"{c:>14}" for c in cells))
  lines.append("goals: " + ", ".join(f"{k}={v}" for k, v in doc["goals"].items()
                                     if not isinstance(v, dict)))
  return "\n".join(lines)
