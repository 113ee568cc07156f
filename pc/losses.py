"""Training losses for a positive-congruent update: focal distillation and naive
re-weighting.

With new logits φ_new, old logits φ_old, labels y and per-example weights

    w_i = α + β·1(argmax φ_old(x_i) = y_i)      (focal: more weight where the old was right),

the focal-distillation (FD) loss is

    CE(φ_new, y) + λ · 1/B Σ_i w_i · D(φ_new(x_i), φ_old(x_i)),

a mean of per-example products (not the product of the means, a known pitfall), with D

    "kl": T²·KL(softmax(φ_old/T) ‖ softmax(φ_new/T))       (FD-KL; T² keeps the gradient's
          scale as T grows. For large T it tends to ½‖c(φ_new - φ_old)‖²/C, c centring
          over the C classes: logit matching up to the scale 1/C.)
    "lm": ½‖φ_new - φ_old‖²                                 (FD-LM, logit matching)

The naive baseline re-weights cross-entropy instead: 1/B Σ_i w_i CE(φ_new(x_i), y_i).
Shapes: logits [B, C], labels int [B].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

METHODS = ("none", "naive", "fd_kl", "fd_lm")
DISTANCES = ("kl", "lm")


def focal_weights(old_logits: jax.Array, labels: jax.Array, *, alpha: float, beta: float
                  ) -> jax.Array:
  """α + β·1(the old model is right), per example: [B]."""
  old_right = (jnp.argmax(old_logits, -1) == labels).astype(old_logits.dtype)
  return alpha + beta * old_right


def kl_distance(new_logits: jax.Array, old_logits: jax.Array, temperature: float
                ) -> jax.Array:
  """T²·KL(softmax(φ_old/T) ‖ softmax(φ_new/T)) per example: [B]."""
  log_p_old = jax.nn.log_softmax(old_logits / temperature, axis=-1)
  log_p_new = jax.nn.log_softmax(new_logits / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_old) * (log_p_old - log_p_new), axis=-1)
  return temperature ** 2 * kl


def logit_matching(new_logits: jax.Array, old_logits: jax.Array) -> jax.Array:
  """½‖φ_new - φ_old‖² per example: [B]."""
  return 0.5 * jnp.sum(jnp.square(new_logits - old_logits), axis=-1)


def distance(new_logits: jax.Array, old_logits: jax.Array, kind: str,
             temperature: float = 100.0) -> jax.Array:
  if kind == "kl":
    return kl_distance(new_logits, old_logits, temperature)
  if kind == "lm":
    return logit_matching(new_logits, old_logits)
  raise ValueError(f"unknown distance {kind!r}: use one of {', '.join(DISTANCES)}")


def focal_distillation(new_logits: jax.Array, old_logits: jax.Array, labels: jax.Array, *,
                       kind: str, alpha: float, beta: float, temperature: float = 100.0
                       ) -> jax.Array:
  """1/B Σ_i w_i D(φ_new(x_i), φ_old(x_i)): the FD penalty alone (a scalar)."""
  # The old model is fixed: no gradient flows into its logits.
  old_logits = jax.lax.stop_gradient(old_logits)
  w = focal_weights(old_logits, labels, alpha=alpha, beta=beta)
  return jnp.mean(w * distance(new_logits, old_logits, kind, temperature))


def naive_reweighting(new_logits: jax.Array, old_logits: jax.Array, labels: jax.Array, *,
                      alpha: float, beta: float) -> jax.Array:
  """1/B Σ_i w_i CE(φ_new(x_i), y_i): cross-entropy with the focal weights."""
  w = focal_weights(jax.lax.stop_gradient(old_logits), labels, alpha=alpha, beta=beta)
  return jnp.mean(w * optax.softmax_cross_entropy_with_integer_labels(new_logits, labels))


def make_loss(p: Mapping[str, Any]):
  """The training loss of config block `p` (method, lam, alpha, beta, temperature) as
  `loss(logits, labels, old_logits)`, the form `lqf.train.fit` takes."""
  method = p["method"]
  if method not in METHODS:
    raise ValueError(f"unknown PC method {method!r}: use one of {', '.join(METHODS)}")

  def loss(logits: jax.Array, labels: jax.Array, old_logits: jax.Array) -> jax.Array:
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    if method == "none":
      return ce
    if method == "naive":
      return naive_reweighting(logits, old_logits, labels, alpha=p["alpha"], beta=p["beta"])
    return ce + p["lam"] * focal_distillation(
        logits, old_logits, labels, kind=method[3:], alpha=p["alpha"], beta=p["beta"],
        temperature=p["temperature"])

  return loss
