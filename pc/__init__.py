"""Positive-congruent model updates: flip metrics (ER, NFR, PFR, relative NFR, NFI),
focal distillation, and the PC wish as a quadratic term of the LQF problem with its
exact trade-off path. `pc.experiments` holds the jobs, the benchmark and the command
line; nothing here imports it."""

import pc.losses as losses
import pc.lqf_term as lqf_term
import pc.metrics as metrics
from pc.metrics import FlipCounts, best_at, flip_counts, rates

__all__ = ["FlipCounts", "best_at", "flip_counts", "losses", "lqf_term", "metrics", "rates"]
