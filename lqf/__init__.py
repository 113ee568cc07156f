"""LQF: linear quadratic fine-tuning, and the core the `pc` and `bct` packages share."""

__version__ = "0.1.0"
