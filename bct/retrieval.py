"""Cross-model retrieval: CMC top-k and mean average precision.

Protocol (Shen et al. 2020): query and gallery features are L2-normalised and ranked by
Euclidean distance to the query; a gallery item is relevant when it shares the query's
label. Every evaluation image is usually both a query and a gallery item, so items with
the query's own image id are left out of its gallery (`query_ids`, `gallery_ids`).
Distance ties are broken by gallery index (a stable sort), so every figure is a
deterministic function of the features.

For a query with positives p_1 < p_2 < ... < p_P in the ranking (1-based ranks r_j):

    top-k hit  ⇔  r_1 ≤ k,        AP = (1/P) Σ_j j / r_j,

and r_j = j + (number of negatives ranked before p_j). Queries without a positive in
their gallery count toward neither (`skipped`).

Memory stays bounded as the gallery grows: distances are computed for `query_chunk`
queries × `gallery_chunk` items at a time, and a query keeps only its positives'
sort keys (their number, not the gallery's, sets the memory) and a count of the
negatives ranked before each of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

import bct.embedding as embedding
from lqf.errors import UserError, require

_EXCLUDED = np.iinfo(np.uint64).max


def sq_distances(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
  """Squared Euclidean distances [Q, G] (float32, ≥ 0) between rows of [Q, D], [G, D]."""
  q = np.asarray(query, np.float32)
  g = np.asarray(gallery, np.float32)
  d = (q * q).sum(-1)[:, None] + (g * g).sum(-1)[None, :] - 2.0 * (q @ g.T)
  return np.where(d > 0, d, np.float32(0.0)).astype(np.float32)  # +0.0, never -0.0.


def chunked_sq_distances(query: np.ndarray, gallery: np.ndarray, *, query_chunk: int = 256,
                         gallery_chunk: int = 4096) -> Iterator[tuple[int, int, np.ndarray]]:
  """`sq_distances` one block at a time: yields (query start, gallery start, block)."""
  for qs in range(0, len(query), query_chunk):
    for gs in range(0, len(gallery), gallery_chunk):
      yield qs, gs, sq_distances(query[qs:qs + query_chunk], gallery[gs:gs + gallery_chunk])


def sort_keys(dist: np.ndarray, gallery_index: np.ndarray) -> np.ndarray:
  """uint64 keys ordering (distance, gallery index) lexicographically: the bits of a
  non-negative float32 increase with its value, so they fill the upper 32 bits."""
  bits = np.ascontiguousarray(dist, np.float32).view(np.uint32).astype(np.uint64)
  return (bits << np.uint64(32)) | np.asarray(gallery_index, np.uint64)


def _check(query: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
           gallery_labels: np.ndarray) -> None:
  require(len(gallery) > 0, "the gallery is empty: retrieval needs at least one gallery "
          "item (check the evaluation split and any class filter)")
  require(len(query) > 0, "there are no queries: check the evaluation split")
  require(len(query) == len(query_labels) and len(gallery) == len(gallery_labels),
          f"{len(query)} queries with {len(query_labels)} labels, {len(gallery)} gallery "
          f"items with {len(gallery_labels)} labels: they must be one label per item")
  require(query.ndim == 2 and gallery.ndim == 2 and query.shape[1] == gallery.shape[1],
          f"query features {query.shape} and gallery features {gallery.shape} are not "
          "[N, D] of one size D: map them with bct.embedding.match_dim first")
  require(len(gallery) < 2 ** 32, "more than 2^32 gallery items are not supported")
  for name, x in (("query", query), ("gallery", gallery)):
    require(bool(np.isfinite(x).all()), f"the {name} features hold NaN or infinite "
            "values: the model that embedded them has diverged or its input is bad")


def evaluate(query: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
             gallery_labels: np.ndarray, *, query_ids: np.ndarray | None = None,
             gallery_ids: np.ndarray | None = None, ks: Sequence[int] = (1, 5),
             normalise: bool = True, query_chunk: int = 256, gallery_chunk: int = 4096
             ) -> dict[str, float]:
  """CMC top-k (fractions, for each k in `ks`) and mAP of `query` [Q, D] against
  `gallery` [G, D], leaving out gallery items whose id equals the query's (ids default
  to "no exclusion"). Returns {"top1": ..., "top5": ..., "mAP": ..., "queries": number
  evaluated, "skipped": queries without a positive}."""
  query, gallery = np.asarray(query, np.float32), np.asarray(gallery, np.float32)
  query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
  _check(query, query_labels, gallery, gallery_labels)
  require(all(k >= 1 for k in ks), f"every k of top-k must be ≥ 1, got {tuple(ks)}")
  require(query_chunk >= 1 and gallery_chunk >= 1, "the chunk sizes must be positive")
  if normalise:
    query, gallery = embedding.normalise(query), embedding.normalise(gallery)
  qid = None if query_ids is None else np.asarray(query_ids)
  gid = None if gallery_ids is None else np.asarray(gallery_ids)
  require((qid is None) == (gid is None), "give both query_ids and gallery_ids, or neither")

  first_ranks, aps = [], []
  for qs in range(0, len(query), query_chunk):
    q = query[qs:qs + query_chunk]
    ql = query_labels[qs:qs + query_chunk]
    qi = None if qid is None else qid[qs:qs + query_chunk]
    blocks = _key_blocks(q, ql, qi, gallery, gallery_labels, gid, gallery_chunk)
    cached = list(blocks) if len(gallery) <= gallery_chunk else None
    positives = _positive_keys(len(q), cached or _key_blocks(
        q, ql, qi, gallery, gallery_labels, gid, gallery_chunk))
    before = _negatives_before(positives, cached or _key_blocks(
        q, ql, qi, gallery, gallery_labels, gid, gallery_chunk))
    for n_before in before:
      if n_before is None:
        continue
      ranks = np.arange(1, len(n_before) + 1) + n_before
      first_ranks.append(int(ranks[0]))
      aps.append(float(np.mean(np.arange(1, len(ranks) + 1) / ranks)))
  out = {f"top{k}": float(np.mean(np.asarray(first_ranks) <= k)) if first_ranks else 0.0
         for k in ks}
  out["mAP"] = float(np.mean(aps)) if aps else 0.0
  out["queries"] = len(aps)
  out["skipped"] = len(query) - len(aps)
  return out


def _key_blocks(q, ql, qi, gallery, gallery_labels, gid, gallery_chunk
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(keys [q, g], positive mask [q, g]) per gallery block; excluded items get the
  largest key and no positive mark, and `_negatives_before` skips them."""
  for gs in range(0, len(gallery), gallery_chunk):
    g = gallery[gs:gs + gallery_chunk]
    keys = sort_keys(sq_distances(q, g), np.arange(gs, gs + len(g)))
    positive = ql[:, None] == gallery_labels[gs:gs + len(g)][None, :]
    if qi is not None:
      excluded = qi[:, None] == gid[gs:gs + len(g)][None, :]
      keys = np.where(excluded, _EXCLUDED, keys)
      positive &= ~excluded
    yield keys, positive


def _positive_keys(n: int, blocks) -> list[np.ndarray]:
  parts: list[list[np.ndarray]] = [[] for _ in range(n)]
  for keys, positive in blocks:
    for i in range(n):
      parts[i].append(keys[i][positive[i]])
  return [np.sort(np.concatenate(p)) for p in parts]


def _negatives_before(positives: list[np.ndarray], blocks) -> list[np.ndarray | None]:
  """For each query, the number of negatives ranked before each of its positives
  (None for a query without positives)."""
  counts = [np.zeros(len(p) + 1, np.int64) for p in positives]
  for keys, positive in blocks:
    for i, pos in enumerate(positives):
      if not len(pos):
        continue
      neg = keys[i][~positive[i] & (keys[i] != _EXCLUDED)]
      # A negative placed at position c (c positives precede it) is ranked before
      # positives c, c+1, ...
      counts[i] += np.bincount(np.searchsorted(pos, neg), minlength=len(pos) + 1)
  return [np.cumsum(c)[:-1] if len(p) else None for c, p in zip(counts, positives)]


# --- Old and new models. -----------------------------------------------------------------

def cross_model(embeddings: Mapping[str, np.ndarray], labels: np.ndarray,
                pairs: Sequence[tuple[str, str]], *, dim_rule: str = "truncate_or_pad",
                **kwargs) -> dict[str, dict[str, float]]:
  """`evaluate` for each (query model, gallery model) pair, on one set of images that
  is both query and gallery (self matches left out). A query embedding of another
  size is mapped onto the gallery's with `dim_rule`. Keys are "query/gallery"."""
  ids = np.arange(len(labels))
  out = {}
  for qname, gname in pairs:
    g = np.asarray(embeddings[gname])
    q = embedding.match_dim(np.asarray(embeddings[qname]), g.shape[-1], dim_rule)
    out[f"{qname}/{gname}"] = evaluate(q, labels, g, labels, query_ids=ids, gallery_ids=ids,
                                       **kwargs)
  return out


def compatible(new_old: float, old_old: float) -> bool:
  """The compatibility criterion: M(new queries, old gallery) > M(old, old)."""
  return bool(new_old > old_old)


def update_gain(new_old: float, old_old: float, independent_new_new: float) -> float:
  """[M(new, old) - M(old, old)] / [M(new†, new†) - M(old, old)], new† the model trained
  without the constraint (its gallery backfilled): the share of a full backfill's gain
  reached with none."""
  denom = independent_new_new - old_old
  if denom <= 0:
    raise UserError(f"the update gain is undefined: the independent new model "
                    f"({independent_new_new:.4f}) is no better than the old one "
                    f"({old_old:.4f})")
  return (new_old - old_old) / denom
