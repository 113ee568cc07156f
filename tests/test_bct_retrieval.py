"""Cross-model retrieval metrics against brute-force loops."""

import numpy as np
import pytest

from bct import embedding, retrieval
from lqf.errors import UserError


def _brute_force(query, qlabels, gallery, glabels, qids=None, gids=None, ks=(1, 5)):
  """Rank every gallery item per query by (distance, index) with Python's sort."""
  dist = retrieval.sq_distances(query, gallery)
  hits = {k: [] for k in ks}
  aps = []
  for i in range(len(query)):
    items = [(float(dist[i, j]), j) for j in range(len(gallery))
             if qids is None or qids[i] != gids[j]]
    items.sort()
    relevant = [glabels[j] == qlabels[i] for _, j in items]
    if not any(relevant):
      continue
    ranks = [r + 1 for r, rel in enumerate(relevant) if rel]
    for k in ks:
      hits[k].append(ranks[0] <= k)
    aps.append(np.mean([(n + 1) / r for n, r in enumerate(ranks)]))
  out = {f"top{k}": float(np.mean(v)) for k, v in hits.items()}
  out["mAP"] = float(np.mean(aps))
  out["queries"] = len(aps)
  return out


def _tied_features(n, rng):
  """Unit vectors with four entries ±1/2: every dot product is a multiple of 1/4,
  exact in float32, so many distances tie exactly."""
  x = np.zeros((n, 8), np.float32)
  for row in x:
    idx = rng.choice(8, 4, replace=False)
    row[idx] = rng.choice([-0.5, 0.5], 4)
  return x


@pytest.mark.parametrize("tied", [False, True])
def test_metrics_match_brute_force_with_self_match_exclusion(tied):
  rng = np.random.default_rng(0)
  n = 60
  feats = _tied_features(n, rng) if tied else rng.normal(size=(n, 8)).astype(np.float32)
  feats = embedding.normalise(feats)
  labels = rng.integers(0, 4, n)
  ids = np.arange(n)
  got = retrieval.evaluate(feats, labels, feats, labels, query_ids=ids, gallery_ids=ids,
                           query_chunk=7, gallery_chunk=11)
  want = _brute_force(feats, labels, feats, labels, ids, ids)
  for key in ("top1", "top5", "mAP"):
    assert got[key] == pytest.approx(want[key], abs=1e-12)
  assert got["queries"] == want["queries"]
  if tied:  # The data really has ties that the order decides.
    d = retrieval.sq_distances(feats, feats)
    assert len(np.unique(d[0])) < n // 4


def test_self_match_would_otherwise_be_the_top_hit():
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(30, 6)).astype(np.float32)
  labels = rng.integers(0, 10, 30)
  with_self = retrieval.evaluate(feats, labels, feats, labels)
  ids = np.arange(30)
  without = retrieval.evaluate(feats, labels, feats, labels, query_ids=ids, gallery_ids=ids)
  assert with_self["top1"] == 1.0
  assert without["top1"] < 1.0


def test_chunked_and_unchunked_agree():
  rng = np.random.default_rng(2)
  q, g = rng.normal(size=(37, 16)), rng.normal(size=(53, 16))
  full = retrieval.sq_distances(q, g)
  blocks = np.zeros_like(full)
  for qs, gs, block in retrieval.chunked_sq_distances(q, g, query_chunk=5, gallery_chunk=8):
    blocks[qs:qs + block.shape[0], gs:gs + block.shape[1]] = block
  np.testing.assert_allclose(blocks, full, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(full, ((q[:, None] - g[None]) ** 2).sum(-1), rtol=1e-4, atol=1e-4)
  ql, gl = rng.integers(0, 5, 37), rng.integers(0, 5, 53)
  a = retrieval.evaluate(q, ql, g, gl, query_chunk=4, gallery_chunk=6)
  b = retrieval.evaluate(q, ql, g, gl, query_chunk=1000, gallery_chunk=1000)
  assert a == b


def test_sort_keys_order_by_distance_then_index():
  d = np.array([[0.5, 0.25, 0.5, 0.0, 2.0]], np.float32)
  keys = retrieval.sort_keys(d, np.arange(5))
  assert list(np.argsort(keys[0])) == [3, 1, 0, 2, 4]


def test_queries_without_positives_are_skipped():
  q = np.eye(3, dtype=np.float32)
  labels = np.array([0, 1, 1])
  ids = np.arange(3)
  out = retrieval.evaluate(q, labels, q, labels, query_ids=ids, gallery_ids=ids)
  assert out["skipped"] == 1 and out["queries"] == 2


def test_compatibility_and_update_gain():
  assert retrieval.compatible(0.5, 0.4) and not retrieval.compatible(0.4, 0.4)
  assert retrieval.update_gain(0.5, 0.4, 0.8) == pytest.approx(0.25)
  with pytest.raises(UserError, match="undefined"):
    retrieval.update_gain(0.5, 0.4, 0.4)


def test_cross_model_maps_sizes_and_excludes_self():
  rng = np.random.default_rng(3)
  old = rng.normal(size=(20, 4)).astype(np.float32)
  new = np.concatenate([old, rng.normal(size=(20, 4)).astype(np.float32)], 1)
  labels = rng.integers(0, 3, 20)
  table = retrieval.cross_model({"old": old, "new": new}, labels,
                                [("new", "old"), ("old", "old")])
  # The new embedding's first four coordinates are the old one: truncation makes them equal.
  assert table["new/old"] == table["old/old"]
  with pytest.raises(UserError, match="no rule"):
    retrieval.cross_model({"old": old, "new": new}, labels, [("new", "old")], dim_rule="none")


def test_bad_inputs_get_clear_errors():
  x = np.ones((3, 2), np.float32)
  with pytest.raises(UserError, match="gallery is empty"):
    retrieval.evaluate(x, [0, 1, 2], np.zeros((0, 2), np.float32), [])
  with pytest.raises(UserError, match="one size D"):
    retrieval.evaluate(x, [0, 1, 2], np.ones((3, 5), np.float32), [0, 1, 2])
  bad = x.copy()
  bad[0, 0] = np.nan
  with pytest.raises(UserError, match="NaN"):
    retrieval.evaluate(bad, [0, 1, 2], x, [0, 1, 2])


def test_match_dim_truncates_and_pads():
  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  np.testing.assert_array_equal(embedding.match_dim(x, 2, "truncate_or_pad"), x[:, :2])
  np.testing.assert_array_equal(embedding.match_dim(x, 5, "truncate_or_pad"),
                                np.concatenate([x, np.zeros((2, 2))], 1))
  assert embedding.match_dim(x, 3, "none") is x
  with pytest.raises(UserError, match="truncate_or_pad"):
    embedding.match_dim(x, 2, "none")
