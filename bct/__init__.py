"""Backward-compatible embeddings: cross-model retrieval (CMC, mAP, the compatibility
criterion, the update gain), the influence loss through the old classifier, and
compatibility as a quadratic term of the LQF problem. `bct.experiments` holds the jobs,
the benchmark and the command line; nothing here imports it."""

import bct.embedding as embedding
import bct.losses as losses
import bct.lqf_term as lqf_term
import bct.retrieval as retrieval

__all__ = ["embedding", "losses", "lqf_term", "retrieval"]
