"""Supervised training of a classifier with optax: the loop that pretraining, nonlinear
fine-tuning, training from scratch, PC and BCT reuse.

The state is a plain pytree `{"params", "batch_stats", "opt_state", "step"}`; one jitted
step updates it. Batches come from `pipeline.batch_at(step)`, so a run resumed from a
checkpoint at step s continues exactly as if it had never stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import functools
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import optax
from tqdm import tqdm

import lqf.data.pipeline as pipeline
from lqf.errors import NonFiniteLossError
from lqf.models.classifier import Classifier
import lqf.runtime.checkpoint as checkpoint
import lqf.runtime.faults as faults
from lqf.runtime.io import MetricsLog
import lqf.runtime.parallel as parallel

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
  for images, labels in pipeline.padded_eval_batches(data, batch_size):
    logits = apply_jit(params, batch_stats, images)
    n = len(labels)
    correct += int((np.asarray(logits)[:n].argmax(-1) == labels).sum())
    losses = optax.softmax_cross_entropy_with_integer_labels(  # Padded: one shape.
        logits, np.pad(labels, (0, len(images) - n)))
    loss_sum += float(np.asarray(losses)[:n].sum())
  return {"accuracy": correct / len(data), "loss": loss_sum / len(data), "count": len(data)}


def accuracy(predict: Callable[[np.ndarray], jax.Array], data: pipeline.ImageSplit,
             batch_size: int = 256) -> float:
  """Top-1 accuracy of `predict(images) -> logits` over a whole split."""
  correct = sum(int((np.asarray(predict(images))[:len(labels)].argmax(-1) == labels).sum())
                for images, labels in pipeline.padded_eval_batches(data, batch_size))
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
      log.close()
  if mesh is not None:
    return parallel.to_host((state["params"], state["batch_stats"]))
  return state["params"], state["batch_stats"]


