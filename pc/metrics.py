"""Error and flip rates of a model update, from counts.

Over an evaluation set of N examples with labels y, old predictions o and new ones n:

    ER_old = #{o ≠ y}/N,   ER_new = #{n ≠ y}/N,
    NFR = #{n ≠ y, o = y}/N   (negative flips: the update broke it),
    PFR = #{n = y, o ≠ y}/N   (positive flips: the update fixed it),
    relative NFR = NFR / ((1 - ER_old)·ER_new)   (against two independent models),
    NFI = NFR / ER_new   (the share of the new errors that are new).

ER_new - ER_old = NFR - PFR exactly. `FlipCounts` holds integer counts, so counts of
batches or devices add up exactly (`merge`, or `jax.lax.psum` of the tree) and rates are
formed once at the end (`rates`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

RATE_NAMES = ("ER_old", "ER_new", "NFR", "PFR", "rel_NFR", "NFI")


class FlipCounts(NamedTuple):
  """Integer counts over a set of examples (scalars, or arrays for per-class counts)."""
  total: Any
  old_errors: Any
  new_errors: Any
  negative_flips: Any
  positive_flips: Any


def flip_counts(old_pred: jax.Array, new_pred: jax.Array, labels: jax.Array) -> FlipCounts:
  """Counts over one batch. old_pred, new_pred, labels: int [B]. Works under `jit`."""
  old_right, new_right = old_pred == labels, new_pred == labels
  count = lambda m: jnp.sum(m, dtype=jnp.int32)
  return FlipCounts(total=jnp.asarray(labels.shape[0], jnp.int32),
                    old_errors=count(~old_right), new_errors=count(~new_right),
                    negative_flips=count(old_right & ~new_right),
                    positive_flips=count(~old_right & new_right))


def merge(a: FlipCounts, b: FlipCounts) -> FlipCounts:
  """The counts of the union of two disjoint sets of examples."""
  return FlipCounts(*(x + y for x, y in zip(a, b)))


def _ratio(num: float, den: float) -> float:
  # A zero denominator forces a zero numerator here (ER_new = 0 or ER_old = 1 leaves no
  # negative flip), so the rate is 0 rather than undefined.
  return num / den if den > 0 else 0.0


def rates(c: FlipCounts) -> dict[str, float]:
  """ER_old, ER_new, NFR, PFR, rel_NFR and NFI (fractions, not percent) from counts."""
  n = int(c.total)
  if n == 0:
    raise ValueError("no examples were counted: the evaluation set is empty")
  er_old, er_new = int(c.old_errors) / n, int(c.new_errors) / n
  nfr, pfr = int(c.negative_flips) / n, int(c.positive_flips) / n
  return {"ER_old": er_old, "ER_new": er_new, "NFR": nfr, "PFR": pfr,
          "rel_NFR": _ratio(nfr, (1 - er_old) * er_new), "NFI": _ratio(nfr, er_new)}


def per_class(old_pred: np.ndarray, new_pred: np.ndarray, labels: np.ndarray,
              num_classes: int) -> FlipCounts:
  """Counts per true class: each field an int array [num_classes]."""
  old_right, new_right = old_pred == labels, new_pred == labels
  count = lambda m: np.bincount(labels[m], minlength=num_classes)
  every = np.ones_like(old_right)
  return FlipCounts(total=count(every), old_errors=count(~old_right),
                    new_errors=count(~new_right),
                    negative_flips=count(old_right & ~new_right),
                    positive_flips=count(~old_right & new_right))


def negative_flips(old_pred: np.ndarray, new_pred: np.ndarray, labels: np.ndarray
                   ) -> list[dict[str, int]]:
  """The negatively flipped examples, for inspection: index, label, old and new
  prediction."""
  idx = np.flatnonzero((old_pred == labels) & (new_pred != labels))
  return [{"index": int(i), "label": int(labels[i]), "old": int(old_pred[i]),
           "new": int(new_pred[i])} for i in idx]


Predict = Callable[[np.ndarray], jax.Array]  # images [B, ...] -> logits [B, C]


def predictions(predict: Predict, batches: Iterable[tuple[np.ndarray, np.ndarray]]
                ) -> np.ndarray:
  """argmax of `predict` over every batch, concatenated: int [N]."""
  return np.concatenate([np.asarray(predict(x)).argmax(-1) for x, _ in batches])


def evaluate(old_pred: np.ndarray, new_pred: np.ndarray, labels: np.ndarray,
             num_classes: int, batch_size: int = 256) -> dict[str, Any]:
  """Everything the jobs report about an update: rates, counts, per-class counts and
  the list of negative flips. Counts are accumulated batch by batch."""
  total = None
  for i in range(0, len(labels), batch_size):
    c = flip_counts(jnp.asarray(old_pred[i:i + batch_size]),
                    jnp.asarray(new_pred[i:i + batch_size]),
                    jnp.asarray(labels[i:i + batch_size]))
    total = c if total is None else merge(total, c)
  if total is None:
    raise ValueError("no examples were counted: the evaluation set is empty")
  pc = per_class(old_pred, new_pred, labels, num_classes)
  return {"rates": rates(total),
          "counts": {k: int(v) for k, v in total._asdict().items()},
          "per_class": {k: np.asarray(v).tolist() for k, v in pc._asdict().items()},
          "negative_flips": negative_flips(old_pred, new_pred, labels)}


def best_at(points: Sequence[dict[str, float]], max_er: float) -> dict[str, float] | None:
  """The point of lowest NFR among those with ER_new ≤ max_er (None if there is none)."""
  ok = [p for p in points if p["ER_new"] <= max_er + 1e-12]
  return min(ok, key=lambda p: (p["NFR"], p["ER_new"])) if ok else None
