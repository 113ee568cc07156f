"""Flip metrics against brute-force loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pc import metrics

C = 4


def _random(seed, n=97):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, C, n)
  old = np.where(rng.random(n) < 0.7, labels, rng.integers(0, C, n))
  new = np.where(rng.random(n) < 0.75, labels, rng.integers(0, C, n))
  return old, new, labels


def _loop(old, new, labels):
  n = len(labels)
  old_wrong = sum(1 for i in range(n) if old[i] != labels[i])
  new_wrong = sum(1 for i in range(n) if new[i] != labels[i])
  nf = sum(1 for i in range(n) if old[i] == labels[i] and new[i] != labels[i])
  pf = sum(1 for i in range(n) if old[i] != labels[i] and new[i] == labels[i])
  er_old, er_new = old_wrong / n, new_wrong / n
  return {"ER_old": er_old, "ER_new": er_new, "NFR": nf / n, "PFR": pf / n,
          "rel_NFR": (nf / n) / ((1 - er_old) * er_new), "NFI": (nf / n) / er_new}


@pytest.mark.parametrize("seed", range(5))
def test_rates_equal_a_brute_force_loop(seed):
  old, new, labels = _random(seed)
  got = metrics.evaluate(old, new, labels, C, batch_size=10)["rates"]
  want = _loop(old, new, labels)
  for name in metrics.RATE_NAMES:
    assert got[name] == pytest.approx(want[name], rel=1e-12), name


@pytest.mark.parametrize("seed", range(5))
def test_error_change_equals_negative_minus_positive_flips(seed):
  r = metrics.evaluate(*_random(seed), C)["rates"]
  assert r["ER_new"] - r["ER_old"] == pytest.approx(r["NFR"] - r["PFR"], abs=1e-12)
  # NFR cannot exceed the new errors nor the old model's right answers.
  assert 0 <= r["NFR"] <= min(r["ER_new"], 1 - r["ER_old"])
  assert 0 <= r["NFI"] <= 1


def test_counts_add_up_exactly_across_batches_and_devices():
  old, new, labels = _random(7, n=96)
  whole = metrics.flip_counts(jnp.asarray(old), jnp.asarray(new), jnp.asarray(labels))
  parts = [metrics.flip_counts(*(jnp.asarray(a[i:i + 12]) for a in (old, new, labels)))
           for i in range(0, 96, 12)]
  summed = parts[0]
  for p in parts[1:]:
    summed = metrics.merge(summed, p)
  assert [int(x) for x in summed] == [int(x) for x in whole]
  # Sharded over the 8 fake devices and summed with psum.
  n_dev = jax.local_device_count()
  shard = lambda a: jnp.asarray(a).reshape(n_dev, -1)
  counts = jax.pmap(lambda o, n, y: jax.lax.psum(metrics.flip_counts(o, n, y), "d"),
                    axis_name="d")(shard(old), shard(new), shard(labels))
  assert [int(x[0]) for x in counts] == [int(x) for x in whole]


def test_per_class_counts_and_flip_list():
  old, new, labels = _random(3)
  res = metrics.evaluate(old, new, labels, C)
  for c in range(C):
    rows = [i for i in range(len(labels)) if labels[i] == c]
    assert res["per_class"]["total"][c] == len(rows)
    assert res["per_class"]["negative_flips"][c] == sum(
        1 for i in rows if old[i] == c and new[i] != c)
    assert res["per_class"]["positive_flips"][c] == sum(
        1 for i in rows if old[i] != c and new[i] == c)
  flipped = [i for i in range(len(labels)) if old[i] == labels[i] and new[i] != labels[i]]
  assert [f["index"] for f in res["negative_flips"]] == flipped
  assert all(f["old"] == f["label"] != f["new"] for f in res["negative_flips"])
  assert sum(res["per_class"]["negative_flips"]) == res["counts"]["negative_flips"]


def test_no_new_errors_gives_zero_relative_rates():
  labels = np.arange(10) % C
  r = metrics.evaluate(labels, labels, labels, C)["rates"]
  assert r == {"ER_old": 0.0, "ER_new": 0.0, "NFR": 0.0, "PFR": 0.0, "rel_NFR": 0.0,
               "NFI": 0.0}


def test_empty_evaluation_set_is_refused():
  empty = np.zeros(0, np.int64)
  with pytest.raises(ValueError, match="empty"):
    metrics.evaluate(empty, empty, empty, C)
