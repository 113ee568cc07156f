"""Supervised training of a ResNet classifier with optax: the pretraining job, and the
loop that nonlinear fine-tuning and training from scratch reuse.

The state is a plain pytree `{"params", "batch_stats", "opt_state", "step"}`; one jitted
step updates it. Batches come from `pipeline.batch_at(step)`, so a run resumed from a
checkpoint at step s continues exactly as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from lqf import checkpoint, faults, parallel, resnet
from lqf import config as config_lib
from lqf.data import pipeline
from lqf.errors import NonFiniteLossError, UserError, require
from lqf.io import MetricsLog, atomic_write_json

PyTree = Any


def make_schedule(t: Mapping[str, Any]) -> optax.Schedule:
  """Linear warmup from 0 to `t.lr` over `t.warmup_steps`, then cosine decay to 0."""
  warmup = max(min(int(t["warmup_steps"]), int(t["steps"]) - 1), 0)
  return optax.warmup_cosine_decay_schedule(0.0, t["lr"], warmup, int(t["steps"]))


def make_optimizer(t: Mapping[str, Any]) -> optax.GradientTransformation:
  """SGD with Nesterov momentum or Adam, decoupled weight decay, `make_schedule`; with
  `t.clip_norm` > 0 the gradient's global norm is clipped to it first."""
  schedule = make_schedule(t)
  if t["optimizer"] == "sgd":
    opt = optax.sgd(schedule, momentum=t["momentum"], nesterov=True)
  else:
    opt = optax.adam(schedule)
  chain = [optax.add_decayed_weights(t["weight_decay"]), opt]
  clip = float(t.get("clip_norm", 0.0) or 0.0)
  # Only when asked: the optimiser state's structure (and so old checkpoints) stays put.
  return optax.chain(optax.clip_by_global_norm(clip), *chain) if clip > 0 \
      else optax.chain(*chain)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy. logits [B, C], labels int [B]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@dataclasses.dataclass
class Classifier:
  """A ResNet as pure functions and its weights.

  train_apply(params, batch_stats, x) -> (logits, new_batch_stats) with batch norm on
  batch statistics; apply(params, batch_stats, x) -> logits [N, C] and
  features(params, batch_stats, x) -> embedding [N, D], with running statistics.
  `train_apply_both` and `apply_both` give (logits, embedding) from one forward pass.
  `split_at(point, output="logits")` is `resnet.split_at` of the model.
  """
  apply: Callable[..., jax.Array]
  train_apply: Callable[..., tuple[jax.Array, PyTree]]
  features: Callable[..., jax.Array]
  split_at: Callable[..., tuple[Callable[..., jax.Array], Callable[..., jax.Array]]]
  params: PyTree
  batch_stats: PyTree
  apply_both: Callable[..., tuple[jax.Array, jax.Array]] | None = None
  train_apply_both: Callable[..., tuple[tuple[jax.Array, jax.Array], PyTree]] | None = None


def build_classifier(model_cfg: Mapping[str, Any], num_classes: int, in_channels: int,
                     seed: int) -> Classifier:
  cfg = dict(model_cfg, num_classes=num_classes, in_channels=in_channels)
  model = resnet.build_resnet(cfg, rngs=nnx.Rngs(seed))
  apply, params, batch_stats = resnet.split_apply(model)
  train_apply, _, _ = resnet.split_train_apply(model)
  features, _, _ = resnet.split_apply(model, output="features")
  apply_both, _, _ = resnet.split_apply(model, output="both")
  train_apply_both, _, _ = resnet.split_train_apply(model, output="both")
  return Classifier(apply, train_apply, features, functools.partial(resnet.split_at, model),
                    params, batch_stats, apply_both, train_apply_both)


# (logits [B, C] or, for `with_features`, the pair (logits, embedding [B, D]),
#  labels int [B], extras of the batch) -> the scalar training loss.
LossFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def _plain_cross_entropy(logits: jax.Array, labels: jax.Array, extras: Any) -> jax.Array:
  del extras
  return cross_entropy(logits, labels)


def make_train_step(clf: Classifier, optimizer: optax.GradientTransformation,
                    trainable: PyTree | None = None, train_bn: bool = True,
                    loss: LossFn = _plain_cross_entropy, with_features: bool = False,
                    mesh: Mesh | None = None) -> Callable:
  """A jitted `state, images, labels, extras -> state, metrics` step.

  `trainable`, a pytree of bools shaped like the params, freezes the False leaves
  (their updates are zeroed). `train_bn=False` keeps batch norm on its running
  statistics and never updates them. `loss` defaults to cross-entropy; `extras` is
  whatever else it reads per example (the PC losses: the old model's logits).
  `with_features` hands `loss` the pair (logits, embedding) instead of the logits.
  On a `mesh` the state and metrics come out replicated (the batch arrives sharded,
  `parallel.shard_batch`), so batch statistics and gradients are those of the global batch.
  """
  if with_features and (clf.apply_both is None or clf.train_apply_both is None):
    raise ValueError("with_features needs a Classifier with apply_both/train_apply_both")
  train_apply = clf.train_apply_both if with_features else clf.train_apply
  apply = clf.apply_both if with_features else clf.apply

  def loss_fn(params, batch_stats, images, labels, extras):
    if train_bn:
      outputs, new_stats = train_apply(params, batch_stats, images)
    else:
      outputs, new_stats = apply(params, batch_stats, images), batch_stats
    value = loss(outputs, labels, extras)
    logits = outputs[0] if with_features else outputs
    return value, (new_stats, (logits.argmax(-1) == labels).mean())

  def step(state, images, labels, extras=None):
    (value, (new_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["batch_stats"], images, labels, extras)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    if trainable is not None:
      updates = jax.tree.map(lambda u, t: u if t else jnp.zeros_like(u), updates, trainable)
    params = optax.apply_updates(state["params"], updates)
    new = {"params": params, "batch_stats": new_stats, "opt_state": opt_state,
           "step": state["step"] + 1}
    return new, {"loss": value, "accuracy": acc}

  if mesh is None:
    return jax.jit(step)
  rep = parallel.replicated(mesh)
  return jax.jit(step, out_shardings=(rep, rep))


def evaluate(apply: Callable, params: PyTree, batch_stats: PyTree,
             data: pipeline.ImageSplit, batch_size: int = 256) -> dict[str, float]:
  """Accuracy and mean cross-entropy over a whole split, batch norm in eval mode."""
  apply_jit = _jit_apply(apply)
  correct, loss_sum = 0, 0.0
  for images, labels in pipeline.eval_batches(data, batch_size):
    logits = apply_jit(params, batch_stats, images)
    correct += int((np.asarray(logits).argmax(-1) == labels).sum())
    loss_sum += float(cross_entropy(logits, labels)) * len(labels)
  return {"accuracy": correct / len(data), "loss": loss_sum / len(data), "count": len(data)}


def accuracy(predict: Callable[[np.ndarray], jax.Array], data: pipeline.ImageSplit,
             batch_size: int = 256) -> float:
  """Top-1 accuracy of `predict(images) -> logits` over a whole split."""
  correct = sum(int((np.asarray(predict(images)).argmax(-1) == labels).sum())
                for images, labels in pipeline.eval_batches(data, batch_size))
  return correct / len(data)


@functools.lru_cache(maxsize=32)
def _jit_apply(apply: Callable) -> Callable:
  return jax.jit(apply)


def fit(clf: Classifier, train: pipeline.ImageSplit, t: Mapping[str, Any], *,
        seed: int, augment: Mapping[str, Any] | None = None,
        trainable: PyTree | None = None, train_bn: bool = True,
        evaluation: pipeline.ImageSplit | None = None, workdir: str | None = None,
        stop_at_step: int | None = None, progress: bool = True,
        loss: LossFn = _plain_cross_entropy,
        extras: Callable[[np.ndarray, np.ndarray], Any] | None = None,
        log_name: str = "train", with_features: bool = False,
        mesh: Mesh | None = None) -> tuple[PyTree, PyTree]:
  """Trains `clf` on `train` for `t.steps` steps; returns `(params, batch_stats)`.

  With a `workdir`, checkpoints every `t.checkpoint_every` steps and at the end, resumes
  from the latest checkpoint, and appends metrics to `workdir/metrics.jsonl`.
  `stop_at_step` ends the run early, as a preemption would (for tests). `loss` replaces
  cross-entropy; `extras(indices, images)` gives it per-batch data (the rows of `train`
  in the batch, and the batch's images after augmentation); with `with_features` it
  reads the pair (logits, embedding). On a `mesh` (`parallel.make_mesh`) every batch is
  split over its devices; `t.batch_size` is the global batch, so the run computes the
  same steps as on one device, and it resumes from checkpoints saved on any other mesh.
  """
  batch_size = min(int(t["batch_size"]), len(train))
  optimizer, schedule = make_optimizer(t), make_schedule(t)
  step_fn = make_train_step(clf, optimizer, trainable, train_bn, loss, with_features, mesh)
  state = {"params": clf.params, "batch_stats": clf.batch_stats,
           "opt_state": optimizer.init(clf.params), "step": jnp.zeros((), jnp.int32)}
  if mesh is not None:
    parallel.check_batch(batch_size, mesh, f"the batch size (train.batch_size={batch_size}"
                         f" capped at the {len(train)} training examples)")
    # Restoring into replicated arrays puts a checkpoint from any layout onto this mesh.
    state = parallel.replicate(state, mesh)
  total = int(t["steps"])
  mgr = log = None
  start = 0
  if workdir is not None:
    mgr = checkpoint.manager(os.path.join(workdir, "checkpoints"))
    log = MetricsLog(os.path.join(workdir, "metrics.jsonl"))
    restored = checkpoint.restore_latest(mgr, state)
    if restored is not None:
      state, start = restored
      print(f"resuming from the checkpoint at step {start} in {workdir}", file=sys.stderr)
    log.truncate_after(start)
  bar = tqdm(total=total, initial=start, desc=log_name, disable=not progress,
             dynamic_ncols=True, file=sys.stderr)
  last_time = time.perf_counter()
  try:
    for step in range(start, total):
      if stop_at_step is not None and step >= stop_at_step:
        break
      images, labels = pipeline.batch_at(train, batch_size=batch_size, step=step, seed=seed,
                                         augment_cfg=augment)
      batch_extras = None if extras is None else extras(
          pipeline.batch_indices(len(train), batch_size, step, seed), images)
      if mesh is not None:
        images, labels, batch_extras = parallel.shard_batch((images, labels, batch_extras),
                                                            mesh)
      state, metrics = step_fn(state, images, labels, batch_extras)
      done = step + 1
      if log is not None and (done % t["log_every"] == 0 or done == total):
        now = time.perf_counter()
        log.write(done, split="train", loss=metrics["loss"], accuracy=metrics["accuracy"],
                  lr=float(schedule(done)), seconds_per_step=(now - last_time) / t["log_every"])
        last_time = now
      if not np.isfinite(float(metrics["loss"])):
        raise NonFiniteLossError(
            f"the training loss became {float(metrics['loss'])} at step {done}: the learning "
            "rate is probably too high; lower --config.train.lr (the last good checkpoint "
            "is kept)")
      if evaluation is not None and log is not None and done % t["eval_every"] == 0:
        ev = evaluate(clf.apply, *parallel.to_host((state["params"], state["batch_stats"])),
                      evaluation)
        log.write(done, split="eval", loss=ev["loss"], accuracy=ev["accuracy"])
        bar.set_postfix(eval_acc=f"{ev['accuracy']:.3f}")
      if mgr is not None and (done % t["checkpoint_every"] == 0 or done == total):
        checkpoint.save(mgr, done, state)
      bar.update(1)
      bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", refresh=False)
      faults.after_step(done)
  finally:
    # Also when the run stops on an error: a checkpoint being written is completed, so
    # the last good one stays readable.
    bar.close()
    if mgr is not None:
      mgr.wait_until_finished()
      mgr.close()
  if mesh is not None:
    return parallel.to_host((state["params"], state["batch_stats"]))
  return state["params"], state["batch_stats"]


def check_config(cfg: Mapping[str, Any]) -> None:
  if "parallel" in cfg:
    parallel.check_config(cfg["parallel"])
  config_lib.check_model(cfg["model"])
  config_lib.check_data(cfg["data"])
  config_lib.check_train(cfg["train"])


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
                           may_change=("train.checkpoint_every", "train.eval_every",
                                       "train.log_every", "parallel"))
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
  import json  # pylint: disable=g-import-not-at-top
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
    _, num_classes = pipeline.open_source(cfg["data"]["name"], cfg["data"]["eval_split"],
                                          cfg["data"]["data_dir"])
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
