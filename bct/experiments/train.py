"""The BCT training job: `python -m bct train --config NAME --workdir DIR`,
and `python -m bct eval --workdir DIR` for a finished one.

Loads (or trains) the old embedding model, trains the new one with `bct.method`'s loss,
and reports cross-model retrieval (old/old, new/old, new/new) on the evaluation split.
Like the other jobs it checkpoints, resumes from the latest checkpoint when run again,
shows progress, appends to `workdir/metrics.jsonl` and writes
`workdir/final_metrics.json` at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import os
from typing import Any

import jax
from jax.sharding import Mesh
import numpy as np

import bct.embedding as embedding
import bct.losses as losses
import bct.retrieval as retrieval
import lqf.data.pipeline as pipeline
from lqf.errors import UserError, require
import lqf.experiments.pretrain as pretrain
import lqf.experiments.update as update
import lqf.finetune as finetune
from lqf.models.classifier import Classifier
import lqf.runtime.checkpoint as checkpoint
import lqf.runtime.config as config_lib
from lqf.runtime.io import atomic_write_json
import lqf.runtime.parallel as parallel
import lqf.runtime.train as train

COMMAND = "bct-train"
Embed = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass
class Model:
  """An embedding model of an update.

  embed(images [N, H, W, C]) -> features [N, D]; `head` (kernel [D, len(classes)],
  bias) is its classifier, whose column j scores label `classes[j]` (None for a model
  without one of its own, such as a linearized one).
  """
  embed: Embed
  classes: tuple[int, ...]
  head: tuple[np.ndarray, np.ndarray] | None = None
  head_scale: float | None = None  # A cosine head's scale; None for a linear head.


def check_config(cfg: Mapping[str, Any]) -> None:
  b = cfg["bct"]
  require(b["method"] in losses.METHODS, f"unknown bct.method {b['method']!r}: use one of "
          f"{', '.join(losses.METHODS)}")
  require(b["lam"] >= 0, f"bct.lam must be ≥ 0, got {b['lam']}")
  require(b["l2_clip_norm"] >= 0, f"bct.l2_clip_norm must be ≥ 0, got {b['l2_clip_norm']}")
  require(b["dim_rule"] in embedding.DIM_RULES, f"unknown bct.dim_rule {b['dim_rule']!r}: "
          f"use one of {', '.join(embedding.DIM_RULES)}")
  require(b["head"] in ("linear", "cosine"), f"unknown bct.head {b['head']!r}: use "
          "'linear' or 'cosine' (the normalised classifier)")
  require(b["head_scale"] > 0, f"bct.head_scale must be positive, got {b['head_scale']}")
  require(b["synth_norm"] in losses.SYNTH_NORMS, f"unknown bct.synth_norm "
          f"{b['synth_norm']!r}: use one of {', '.join(losses.SYNTH_NORMS)}")
  for block in ("new", "old"):
    require(cfg[block]["shots"] >= 0, f"{block}.shots must be ≥ 0 (0 = the whole split), "
            f"got {cfg[block]['shots']}")
  config_lib.check_data(cfg["data"])
  config_lib.check_train(cfg["train"], prefix="train")
  config_lib.check_train(cfg["old"]["finetune"], prefix="old.finetune")
  r = cfg["retrieval"]
  require(len(r["ks"]) > 0 and all(k >= 1 for k in r["ks"]),
          f"retrieval.ks must be top-k sizes ≥ 1, got {r['ks']}")
  require(r["query_chunk"] > 0 and r["gallery_chunk"] > 0,
          "retrieval.query_chunk and retrieval.gallery_chunk must be positive")


def label_set(classes: Sequence[int], num_classes: int, name: str) -> tuple[int, ...]:
  """The labels a model is trained on: `classes`, or every label when empty."""
  if not len(classes):
    return tuple(range(num_classes))
  out = tuple(int(c) for c in classes)
  require(len(set(out)) == len(out) and all(0 <= c < num_classes for c in out),
          f"{name} must be distinct labels in [0, {num_classes}), got {list(classes)}")
  return out


def restrict(data: pipeline.ImageSplit, classes: Sequence[int]) -> pipeline.ImageSplit:
  """The examples of `classes`, relabelled by position in `classes` (0, 1, ...)."""
  position = np.full(data.num_classes, -1, np.int32)
  position[list(classes)] = np.arange(len(classes), dtype=np.int32)
  keep = position[data.labels] >= 0
  require(bool(keep.any()), f"no example of the classes {list(classes)} in the split")
  return dataclasses.replace(data, images=data.images[keep],
                             labels=position[data.labels[keep]], num_classes=len(classes))


def load_split(cfg: Mapping[str, Any], shots: int, seed: int) -> pipeline.ImageSplit:
  d = cfg["data"]
  return pipeline.load_split(d, d["train_split"], corrupted=d["corrupt_train"], shots=shots,
                             subset_seed=seed)


def load_data(cfg: Mapping[str, Any]) -> tuple[pipeline.ImageSplit, pipeline.ImageSplit]:
  """(the new model's training subset over every class, the evaluation split)."""
  d = cfg["data"]
  evaluation = pipeline.load_split(d, d["eval_split"], corrupted=d["corrupt_eval"])
  return load_split(cfg, cfg["new"]["shots"], cfg["seed"]), evaluation


# --- Models. ---------------------------------------------------------------------------------

def new_classifier(spec: Mapping[str, Any], num_classes: int, channels: int, seed: int,
                   head: Mapping[str, Any] | None = None) -> Classifier:
  """The backbone of `spec["pretrained"]["workdir"]` under a fresh `num_classes` head of
  the kind `head` gives ({"head": "linear" | "cosine", "head_scale": s})."""
  pre_cfg, clf = pretrain.pretrained_for(spec["pretrained"]["workdir"], channels)
  model_cfg = dict(pre_cfg["model"], **(head or {}))
  return finetune.with_new_head(clf, model_cfg, num_classes, channels, seed)


def head_kind(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """The head every model of a BCT config is fine-tuned with."""
  b = cfg["bct"]
  return {"head": b.get("head", "linear"), "head_scale": float(b.get("head_scale", 16.0))}


def model_of(clf: Classifier, classes: Sequence[int], head_scale: float | None = None,
             batch_size: int = 256) -> Model:
  features = jax.jit(clf.features)

  def embed(images: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(features(clf.params, clf.batch_stats,
                                               images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)])

  head = clf.params["head"]
  return Model(embed, tuple(int(c) for c in classes),
               (np.asarray(head["kernel"]), np.asarray(head["bias"])), head_scale)


def old_head(old: Model, classes: Sequence[int], data: pipeline.ImageSplit, norm: str,
             center: bool = False) -> losses.OldHead:
  """`old`'s head over the labels `classes` of a new model (columns in that order), the
  labels `old` never saw synthesized from its embeddings of their examples in `data`
  (the new training set, original labels)."""
  require(old.head is not None, "the old model has no classifier head to train against")
  unknown = [c for c in old.classes if c not in classes]
  require(not unknown, f"the old model scores labels {unknown} that the new model does not "
          "have: the new label set must contain the old one")
  kernel, bias = old.head
  sub = restrict(data, classes)
  return losses.synthesize_head(kernel, bias, [list(classes).index(c) for c in old.classes],
                                len(classes), old.embed(sub.images), sub.labels, norm=norm,
                                center=center, scale=old.head_scale)


def fit_model(cfg: Mapping[str, Any], spec: Mapping[str, Any], data: pipeline.ImageSplit,
              t: Mapping[str, Any], *, seed: int, method: str = "independent",
              heads: Sequence[losses.OldHead] = (), old: Model | None = None,
              workdir: str | None = None, stop_at_step: int | None = None,
              progress: bool = False, log_name: str | None = None,
              mesh: Mesh | None = None) -> Model | None:
  """Fine-tunes the backbone of `spec` on the examples of `spec["classes"]` in `data`
  with `method`'s loss (`heads`: the old heads for "bct", over the same classes, see
  `old_head`; `old`: the old model for "l2") on the job's device `mesh` (None: one
  device). Returns the model, or None when stopped early."""
  classes = label_set(spec.get("classes", ()), data.num_classes, "classes")
  sub = restrict(data, classes)
  kind = head_kind(cfg)
  clf = new_classifier(spec, len(classes), cfg["data"]["channels"], seed, kind)
  b = cfg["bct"]
  loss = losses.make_loss(method, lam=b["lam"], rule=b["dim_rule"], heads=heads)
  extras = None
  if method == "l2":
    require(old is not None, "the l2 loss needs the old model")
    extras = lambda idx, images: old.embed(images)
    t = dict(t, clip_norm=max(float(t.get("clip_norm", 0.0) or 0.0), b["l2_clip_norm"]))
  params, stats = train.fit(clf, sub, t, seed=seed, augment=cfg["data"]["augment"],
                            train_bn=t["train_bn"], workdir=workdir, stop_at_step=stop_at_step,
                            progress=progress, loss=loss, extras=extras, with_features=True,
                            log_name=log_name or method, mesh=mesh)
  if stop_at_step is not None and stop_at_step < t["steps"]:
    return None
  return model_of(dataclasses.replace(clf, params=params, batch_stats=stats), classes,
                  kind["head_scale"] if kind["head"] == "cosine" else None)


_OLD_MODELS: dict[str, Model] = {}


def train_old(cfg: Mapping[str, Any], mesh: Mesh | None = None) -> Model:
  """The config's old model, trained in memory on `old.shots` examples of each of
  `old.classes` (seed + 1000). Deterministic, so done once per process and setting."""
  o = cfg["old"]
  return update.memoized(
      _OLD_MODELS, [cfg["data"], o, head_kind(cfg), cfg["seed"]],
      lambda: fit_model(cfg, o, load_split(cfg, o["shots"], cfg["seed"]), o["finetune"],
                        seed=cfg["seed"] + 1000, log_name="old", mesh=mesh))


def load_model(workdir: str) -> tuple[dict[str, Any], Model]:
  """The config and final model of a finished `bct train` run or nonlinear
  `lqf finetune` run."""
  cmd, run_cfg = checkpoint.read_run(workdir, "train the old model first (python -m bct "
                                     "train, or python -m lqf finetune "
                                     "--config.method=nonlinear)")
  num_classes = pipeline.num_classes(run_cfg["data"])
  channels = run_cfg["data"]["channels"]
  if cmd == COMMAND:
    classes = label_set(run_cfg["new"]["classes"], num_classes, "new.classes")
    spec, t, seed = run_cfg["new"], run_cfg["train"], run_cfg["seed"]
    kind = head_kind(run_cfg)
  elif cmd == "finetune" and run_cfg.get("method") == "nonlinear":
    classes = tuple(range(num_classes))
    spec = {"pretrained": run_cfg["pretrained"]}
    t, seed = run_cfg["finetune"], run_cfg["seed"]
    kind = {"head": "linear"}
  else:
    raise UserError(f"{workdir!r} holds a {cmd!r} run; an old embedding model must be a "
                    "bct train run or a nonlinear lqf finetune run")
  clf = new_classifier(spec, len(classes), channels, seed, kind)
  scale = kind["head_scale"] if kind["head"] == "cosine" else None
  return run_cfg, model_of(pretrain.restore_final(clf, t, workdir), classes, scale)


def old_model(cfg: Mapping[str, Any], num_classes: int, mesh: Mesh | None = None) -> Model:
  """The old model of `cfg`, checked against the new data's label set."""
  o = cfg["old"]
  if not o["workdir"]:
    label_set(o["classes"], num_classes, "old.classes")
    return train_old(cfg, mesh)
  run_cfg, model = load_model(o["workdir"])
  update.check_same_dataset(o, run_cfg["data"]["name"], cfg["data"]["name"])
  require(max(model.classes) < num_classes,
          f"the old model in {o['workdir']!r} scores labels up to {max(model.classes)}, "
          f"the new data has {num_classes} classes: the label sets differ")
  return model


# --- Retrieval. ------------------------------------------------------------------------------

def embed_all(models: Mapping[str, Model], images: np.ndarray) -> dict[str, np.ndarray]:
  out = {}
  for name, m in models.items():
    out[name] = np.asarray(m.embed(images), np.float32)
    require(bool(np.isfinite(out[name]).all()), f"the {name} model's embeddings hold NaN "
            "or infinite values: it has diverged; retrain it with a lower learning rate")
  return out


def cross_retrieval(cfg: Mapping[str, Any], models: Mapping[str, Model],
                    evaluation: pipeline.ImageSplit, pairs: Sequence[tuple[str, str]]
                    ) -> dict[str, dict[str, float]]:
  """Retrieval metrics of each (query model, gallery model) pair on `evaluation`."""
  r = cfg["retrieval"]
  return retrieval.cross_model(embed_all(models, evaluation.images), evaluation.labels,
                               pairs, dim_rule=cfg["bct"]["dim_rule"], ks=tuple(r["ks"]),
                               query_chunk=int(r["query_chunk"]),
                               gallery_chunk=int(r["gallery_chunk"]))


UPDATE_PAIRS = (("old", "old"), ("new", "old"), ("new", "new"))


def summarize(table: Mapping[str, Mapping[str, float]], metric: str = "top1"
              ) -> dict[str, Any]:
  """The compatibility criterion of an update's table on `metric`."""
  return {"metric": metric,
          "compatible": retrieval.compatible(table["new/old"][metric], table["old/old"][metric])}


def run(cfg: Mapping[str, Any], workdir: str, *, stop_at_step: int | None = None,
        progress: bool = True) -> dict[str, Any]:
  """Runs the job; returns (and writes) the final metrics."""
  check_config(cfg)
  data, evaluation = load_data(cfg)
  classes = label_set(cfg["new"]["classes"], data.num_classes, "new.classes")
  mesh = parallel.mesh_for(cfg)  # Once per job: it may start jax.distributed.
  old = old_model(cfg, data.num_classes, mesh)
  b = cfg["bct"]
  heads = [old_head(old, classes, data, b["synth_norm"], b["synth_center"])
           ] if b["method"] == "bct" else []
  if b["method"] != "independent":
    # A size mismatch without a rule fails here, before the workdir is touched.
    _check_dims(cfg, old.embed(evaluation.images[:1]).shape[-1])
  checkpoint.claim_workdir(workdir, config_lib.to_dict(cfg), command=COMMAND,
                           may_change=("train.checkpoint_every", "train.log_every",
                                       "train.eval_every", "retrieval", "parallel"))
  new = fit_model(cfg, cfg["new"], data, cfg["train"], seed=cfg["seed"], method=b["method"],
                  heads=heads, old=old, workdir=workdir, stop_at_step=stop_at_step,
                  progress=progress, mesh=mesh)
  if new is None:
    return {}
  table = cross_retrieval(cfg, {"old": old, "new": new}, evaluation, UPDATE_PAIRS)
  result = {"method": b["method"], "retrieval": table, **summarize(table),
            "count": len(evaluation)}
  if stop_at_step is None:
    atomic_write_json(os.path.join(workdir, "final_metrics.json"), result)
  return result


def _check_dims(cfg: Mapping[str, Any], old_dim: int) -> None:
  _, clf = pretrain.pretrained_for(cfg["new"]["pretrained"]["workdir"], cfg["data"]["channels"])
  new_dim = int(np.shape(clf.params["head"]["kernel"])[0])
  embedding.match_dim(np.zeros((1, new_dim), np.float32), old_dim, cfg["bct"]["dim_rule"])


def evaluate_run(workdir: str, independent: str | None = None) -> dict[str, Any]:
  """The retrieval table of a finished `bct train` run in `workdir` (its old model as
  configured there); with `independent`, a finished run of the same update trained
  without the constraint, the update gain too."""
  cmd, cfg = checkpoint.read_run(workdir, "train one first: python -m bct train ...")
  require(cmd == COMMAND, f"{workdir!r} holds a {cmd!r} run, not a bct train run")
  _, new = load_model(workdir)
  _, evaluation = load_data(cfg)
  old = old_model(cfg, evaluation.num_classes)
  models = {"old": old, "new": new}
  pairs = list(UPDATE_PAIRS)
  if independent:
    _, models["independent"] = load_model(independent)
    pairs.append(("independent", "independent"))
  table = cross_retrieval(cfg, models, evaluation, pairs)
  result = {"method": cfg["bct"]["method"], "retrieval": table, **summarize(table),
            "count": len(evaluation)}
  if independent:
    # None where undefined: the independent model is no better than the old one.
    result["update_gain"] = {m: retrieval.update_gain(
        table["new/old"][m], table["old/old"][m], table["independent/independent"][m])
        if table["independent/independent"][m] > table["old/old"][m] else None
        for m in ("top1", "mAP")}
  return result


def format_table(result: Mapping[str, Any]) -> str:
  """The retrieval table of a result, one row per query/gallery pair."""
  table = result["retrieval"]
  metrics = [k for k in next(iter(table.values())) if k not in ("queries", "skipped")]
  lines = [f"{'query/gallery':<26}" + "".join(f"{m:>9}" for m in metrics)]
  for pair, row in table.items():
    lines.append(f"{pair:<26}" + "".join(f"{100 * row[m]:>8.2f}%" for m in metrics))
  verdict = "passes" if result["compatible"] else "fails"
  lines.append(f"compatibility (new/old > old/old, {result['metric']}): {verdict}")
  for m, g in result.get("update_gain", {}).items():
    lines.append(f"update gain ({m}): " + (f"{g:.3f}" if g is not None else
                 "undefined (the independent model is no better than the old one)"))
  return "\n".join(lines)
