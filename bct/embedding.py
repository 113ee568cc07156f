"""Making embeddings of two models comparable: dimension matching and normalisation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lqf.errors import UserError

DIM_RULES = ("none", "truncate_or_pad")


def match_dim(x, dim: int, rule: str):
  """x [..., D] -> [..., dim]: unchanged when D = dim; with `rule="truncate_or_pad"` the
  first `dim` coordinates (D > dim) or x followed by zeros (D < dim), as in BCT. With
  `rule="none"` different sizes are an error. Works on numpy and jax arrays alike."""
  if rule not in DIM_RULES:
    raise UserError(f"unknown embedding size rule {rule!r}: use one of {', '.join(DIM_RULES)}")
  d = x.shape[-1]
  if d == dim:
    return x
  if rule == "none":
    raise UserError(f"the embeddings have {d} and {dim} dimensions and no rule maps one "
                    "onto the other: set --config.bct.dim_rule=truncate_or_pad, or give "
                    "both models the same embedding size")
  if d > dim:
    return x[..., :dim]
  pad = [(0, 0)] * (x.ndim - 1) + [(0, dim - d)]
  return np.pad(x, pad) if isinstance(x, np.ndarray) else jnp.pad(x, pad)


def normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  """Rows scaled to unit L2 norm (a zero row stays zero). [N, D] -> [N, D] float32."""
  x = np.asarray(x, np.float32)
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(norm, eps)
