"""`python -m lqf bench transfer|accuracy|cost`.

`transfer`: a transfer task (digits_transfer by default, or fashion_transfer). Each
arm's learning rate is chosen on the validation split, once with the subset of seed 0 or,
with `bench.tune_per_seed`, for every seed's subset; every arm runs on the same few-shot
subsets, one per seed, and is scored on the test split. With `bench.adapt_batch_norm`, every arm
that starts from the pretrained model starts from it with AdaBN statistics of its subset
(`finetune.adapt_batch_norm`), and the arm `source_adabn` is that model alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import functools
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lqf.data.pipeline as pipeline
from lqf.errors import NonFiniteLossError
import lqf.experiments.bench.common as common
from lqf.experiments.bench.common import TRANSFER_CONFIG, ensure_pretrained, summary
import lqf.finetune as finetune
import lqf.linearize as linearize
from lqf.models.classifier import Classifier, build_classifier
import lqf.objective as objective
import lqf.runtime.config as config_lib
import lqf.runtime.train as train

Predict = Callable[[np.ndarray], jax.Array]
Arm = Callable[[pipeline.ImageSplit, int, float | None], Predict]


def _predictor(clf: Classifier) -> Predict:
  apply = jax.jit(clf.apply)
  return lambda x: apply(clf.params, clf.batch_stats, x)


def make_arms(cfg, names: Sequence[str], quick: bool) -> dict[str, Arm]:
  """Each arm as `(few-shot data, seed, lr) -> predict`; lr None = the arm has no grid."""
  pre_cfg, pretrained = ensure_pretrained(cfg["pretrained"], quick)
  model_cfg, channels = pre_cfg["model"], cfg["data"]["channels"]

  adapt_bn = bool(cfg.bench.get("adapt_batch_norm", False))

  def new_head(data, seed, base=pretrained, model=model_cfg):
    clf = finetune.with_new_head(base, model, data.num_classes, channels, seed)
    return finetune.adapt_batch_norm(clf, data.images) if adapt_bn else clf

  def ft(data, seed, lr):
    t = dict(cfg["finetune"], lr=lr)
    return _predictor(finetune.finetune(new_head(data, seed), data, t, seed=seed,
                                        train_bn=t["train_bn"]))

  def scratch(data, seed, lr):
    clf = build_classifier(model_cfg, data.num_classes, channels, seed + 1000)
    t = dict(cfg["scratch"], lr=lr)
    return _predictor(finetune.finetune(clf, data, t, seed=seed, train_bn=t["train_bn"]))

  def probe(data, seed, lr):
    return _predictor(finetune.linear_probe(new_head(data, seed), data,
                                            dict(cfg["probe"], lr=lr), seed=seed))

  @functools.cache
  def relu_pretrained() -> Classifier:
    return ensure_pretrained(cfg["bench"]["relu"], quick)[1]

  def lqf_arm(relu: bool = False, **changes):
    def arm(data, seed, lr):
      c = dict(cfg["lqf"], **changes)
      if lr is not None:
        c["lr"] = lr
      base, model = pretrained, model_cfg
      if relu:
        base, model = relu_pretrained(), dict(model_cfg, activation="relu")
      return finetune.lqf(new_head(data, seed, base, model), data, c, seed=seed)[0]
    return arm

  def source_adabn(data, seed, lr):
    return _predictor(finetune.adapt_batch_norm(pretrained, data.images))

  arms = {"finetune": ft, "probe": probe, "scratch": scratch, "source_adabn": source_adabn,
          "lqf": lqf_arm(), "lqf_relu": lqf_arm(relu=True), "lqf_ce": lqf_arm(loss="ce"),
          "lqf_sgd": lqf_arm(optimizer="sgd", adaptive=False)}
  return {n: arms[n] for n in names}


# K-FAC's programs for the whole network take most of a quick run's compile time; the
# last stage runs the same code (the cost bench sets its scopes itself).
QUICK = (*common.QUICK_DATA, "lqf.scope=last_stage", "finetune.steps=10", "scratch.steps=10",
         "probe.steps=20", "lqf.steps=3", "bench.lr_grid.finetune=(0.003,)",
         "bench.lr_grid.scratch=(0.1,)", "bench.lr_grid.probe=(0.01,)",
         "bench.lr_grid.lqf_sgd=(0.0003,)")


def run_arms(*, arm_names: Sequence[str], shots: Sequence[int], seeds: int, quick: bool,
             config_path: str = TRANSFER_CONFIG, overrides: Sequence[str] = ()
             ) -> dict[str, Any]:
  """Runs `arm_names` on the digits transfer task at each number of `shots` (0 = the
  whole target training split); returns `arms`, `tuning`, `timing_s` and `design`.

  `quick` shrinks every arm to a few steps and one learning rate: a smoke test of the
  machinery, not a measurement.
  """
  cfg = config_lib.load(config_path, (QUICK if quick else ()) + tuple(overrides))
  arms = make_arms(cfg, arm_names, quick)
  d = cfg.data
  val = pipeline.load_split(d, cfg.val_split, corrupted=True)
  test = pipeline.load_split(d, d.eval_split, corrupted=True)
  result: dict[str, Any] = {"arms": {}, "tuning": {}, "timing_s": {}}
  per_seed = bool(cfg.bench.get("tune_per_seed", False))
  release = common.ReleaseCompiled()

  def tune(fn, name, data, seed):
    """The grid's learning rate with the best validation accuracy (ties to the lower
    rate), the grid's accuracies, and the chosen run's predictor."""
    grid, predictors = {}, {}
    for lr in cfg.bench.lr_grid[name]:
      try:
        predictors[lr] = fn(data, seed, lr)
        grid[lr] = train.accuracy(predictors[lr], val)
      except NonFiniteLossError:
        grid[lr] = 0.0  # Diverged: never chosen.
      release()
    best = max(grid, key=lambda v: (grid[v], -v))
    return best, {str(v): a for v, a in grid.items()}, predictors.get(best)

  for k in shots:
    suffix = f"@{k}shot" if k > 0 else "@full"
    subset = lambda seed: pipeline.load_split(d, d.train_split, corrupted=True, shots=k,
                                             subset_seed=seed)
    for name, fn in arms.items():
      t0 = time.perf_counter()
      lr, tuned, chosen = None, name in cfg.bench.lr_grid, None
      if tuned and not per_seed:
        lr, grid, chosen = tune(fn, name, subset(0), 0)
        result["tuning"][name + suffix] = {"val_accuracy": grid, "lr": lr}
      accs = []
      for seed in range(seeds):
        data = subset(seed)
        if tuned and per_seed:
          lr, grid, chosen = tune(fn, name, data, seed)
          result["tuning"].setdefault(name + suffix, {"val_accuracy": [], "lr": []})
          result["tuning"][name + suffix]["val_accuracy"].append(grid)
          result["tuning"][name + suffix]["lr"].append(lr)
        # The tuning run on this seed's subset is the run at the chosen rate: reused.
        predict = chosen if chosen is not None and (per_seed or seed == 0) else None
        accs.append(train.accuracy(predict or fn(data, seed, lr), test))
        print(f"{name}{suffix} seed {seed}: {accs[-1]:.4f}" +
              (f" (lr {lr})" if tuned else ""), file=sys.stderr)
        release()
      result["arms"][name + suffix] = {"accuracy": summary(accs)}
      result["timing_s"][name + suffix] = time.perf_counter() - t0
  result["design"] = {"target_train": d.train_split, "validation": cfg.val_split,
                      "evaluation": f"{d.eval_split} ({len(test)} images)",
                      "corruption": config_lib.to_dict(d.corruption),
                      "config": config_lib.to_dict(cfg)}
  return result, cfg, test


def transfer(*, seeds: int = 5, quick: bool = False, overrides: Sequence[str] = (),
             config: str = TRANSFER_CONFIG, shots: Sequence[int] | None = None
             ) -> dict[str, Any]:
  """Issue 2's benchmark: fine-tuning, probe, scratch and no adaptation at `shots` a
  class (default 5) on the transfer task of `config`; with its `bench.adapt_batch_norm`, also
  the source model under its subset's AdaBN statistics (`source_adabn`)."""
  adapt = config_lib.load(config, tuple(overrides)).bench.get("adapt_batch_norm", False)
  names = ("finetune", "probe", "scratch") + (("source_adabn",) if adapt else ())
  result, cfg, test = run_arms(arm_names=names,
                               shots=tuple(shots or (5,)), seeds=seeds, quick=quick,
                               config_path=config, overrides=overrides)
  pretrained = ensure_pretrained(cfg["pretrained"], quick)[1]
  acc = train.accuracy(_predictor(pretrained), test)
  result["arms"]["no_adaptation"] = {"accuracy": summary([acc] * seeds)}
  return result


ACCURACY_ARMS = ("lqf", "lqf_relu", "lqf_ce", "lqf_sgd", "finetune", "probe")


def accuracy(*, seeds: int = 5, quick: bool = False, overrides: Sequence[str] = (),
             shots: Sequence[int] | None = None, config: str = TRANSFER_CONFIG
             ) -> dict[str, Any]:
  """Issue 3's benchmark: LQF, each of its changes reverted, fine-tuning and the probe,
  at 5 and 10 shots a class and on the whole target training split (shots 0)."""
  shots = shots or ((5,) if quick else (5, 10, 0))
  return run_arms(arm_names=ACCURACY_ARMS, shots=shots, seeds=seeds, quick=quick,
                  config_path=config, overrides=overrides)[0]


def _shots_run(arms: Mapping[str, Any]) -> list[int]:
  return sorted({int(a.rsplit("@", 1)[1].removesuffix("shot")) for a in arms
                 if a.endswith("shot")})


def transfer_goals(result: Mapping[str, Any]) -> dict[str, Any]:
  """The transfer task's bars (issues 2 and 16). At the fewest shots run, k: fine-tuning
  ≥ scratch + 10 points, and the best method in [60%, 95%]. At the most, m, when more
  than one setting ran: the best method ≥ 3 points above the probe and above the source
  model without adaptation."""
  arms = result["arms"]
  acc = lambda name: arms[name]["accuracy"]["mean"]
  best_at = lambda s: max(acc(a) for a in arms if a.endswith(f"@{s}shot"))
  shots = _shots_run(arms)
  k = shots[0]
  ft, sc = acc(f"finetune@{k}shot"), acc(f"scratch@{k}shot")
  goals = {"few_shots": k, "finetune_minus_scratch": ft - sc,
           "finetune_beats_scratch_by_10": ft - sc >= 0.10, "best_method": best_at(k),
           "best_in_60_95": 0.60 <= best_at(k) <= 0.95}
  if len(shots) > 1:
    m = shots[-1]
    lead = best_at(m) - max(acc(f"probe@{m}shot"), acc("no_adaptation"))
    goals.update({"many_shots": m, "best_minus_probe_and_source": lead,
                  "best_above_probe_and_source_by_3": lead >= 0.03})
  return goals


def cost(*, seeds: int = 5, quick: bool = False, overrides: Sequence[str] = (),
         config: str = TRANSFER_CONFIG) -> dict[str, Any]:
  """Time and memory of one training step, linearized against nonlinear, same batch.

  Steps (SGD update included): nonlinear CE through the whole network; LQF through the
  whole network; the nonlinear last stage + head on the cached prefix; LQF of the last
  stage + head on the cached prefix. Each "seed" is one interleaved timing round; the
  ratios are per round, so a slow moment of the machine cancels.
  """
  cfg = config_lib.load(config, (QUICK if quick else ()) + tuple(overrides))
  pre_cfg, pretrained = ensure_pretrained(cfg.pretrained, quick)
  d = cfg.data
  data = pipeline.load_split(d, d.train_split, corrupted=True)
  x, y = jnp.asarray(data.images[:64]), jnp.asarray(data.labels[:64])
  clf = finetune.with_new_head(pretrained, pre_cfg["model"], data.num_classes,
                               d["channels"], 0)

  def ce(params, xb, yb, apply):
    return train.cross_entropy(apply(params, clf.batch_stats, xb), yb)

  fns, memory = {}, {}
  fns["nonlinear_all"], c = common.sgd_step_timer(lambda p, xb, yb: ce(p, xb, yb, clf.apply),
                                           clf.params, x, y)
  memory["nonlinear_all"] = c.memory_analysis().temp_size_in_bytes
  for scope in ("all", "last_stage"):
    lin = linearize.linearize(clf.split_at, clf.params, clf.batch_stats, scope,
                              select=clf.linearizable)
    h = linearize.prefix_features(lin, x)
    loss = objective.make_loss(lin.apply, loss="mse", k=5.0, lam=1e-4)
    fns[f"lqf_{scope}"], c = common.sgd_step_timer(
        lambda dl, hb, yb, l=loss, s=lin.state: l(dl, s, (hb, yb)), lin.zeros(), h, y)
    memory[f"lqf_{scope}"] = c.memory_analysis().temp_size_in_bytes
    if scope == "last_stage":
      nonlin = lambda w, hb, yb, l=lin: train.cross_entropy(l.nonlinear(w, l.state, hb), yb)
      fns["nonlinear_last_stage"], c = common.sgd_step_timer(nonlin, lin.state["w0"], h, y)
      memory["nonlinear_last_stage"] = c.memory_analysis().temp_size_in_bytes
  repeats = 3 if quick else 20
  rounds = [common.time_steps(fns, repeats) for _ in range(seeds)]
  med = lambda r, n: float(np.median(r[n]))
  arms = {n: {"seconds_per_step": summary([med(r, n) for r in rounds]),
              "temp_memory_bytes": summary([memory[n]] * seeds)} for n in fns}
  ratios = {
      "lqf_all / nonlinear_all": [med(r, "lqf_all") / med(r, "nonlinear_all") for r in rounds],
      "lqf_last_stage / nonlinear_last_stage": [
          med(r, "lqf_last_stage") / med(r, "nonlinear_last_stage") for r in rounds],
      "lqf_last_stage / nonlinear_all": [
          med(r, "lqf_last_stage") / med(r, "nonlinear_all") for r in rounds]}
  for name, values in ratios.items():
    arms.setdefault("ratios", {})[name] = summary(values)
  goals = {"all_at_most_1.8x": arms["ratios"]["lqf_all / nonlinear_all"]["mean"] <= 1.8,
           "last_stage_at_most_1.3x":
               arms["ratios"]["lqf_last_stage / nonlinear_last_stage"]["mean"] <= 1.3}
  return {"arms": arms, "goals": goals,
          "design": {"batch": 64, "image_size": d.image_size, "model": pre_cfg["model"],
                     "repeats_per_round": repeats,
                     "memory": "XLA temp allocation of the compiled step (bytes)"}}


def accuracy_goals(result: Mapping[str, Any]) -> dict[str, Any]:
  """Issue 3's goals: LQF ≥ nonlinear fine-tuning at 5 and 10 shots, within 1 point on
  the full set, and above every arm with one of its changes reverted."""
  arms = {a: v["accuracy"]["mean"] for a, v in result["arms"].items()}
  goals = {}
  for suffix in sorted({a.split("@")[1] for a in arms}):
    lqf, ft = arms.get(f"lqf@{suffix}"), arms.get(f"finetune@{suffix}")
    if lqf is None or ft is None:
      continue
    goals[f"lqf_minus_finetune@{suffix}"] = lqf - ft
    goals[f"lqf_matches_finetune@{suffix}"] = lqf >= ft - (0.01 if suffix == "full" else 0.0)
    reverted = [a for a in ("lqf_relu", "lqf_ce", "lqf_sgd") if f"{a}@{suffix}" in arms]
    goals[f"lqf_beats_reverted@{suffix}"] = all(lqf > arms[f"{a}@{suffix}"] for a in reverted)
  return goals


