"""The blocks of the PC job configs, at their defaults (focal distillation as in the
paper); each dataset's configs take them and change only what their data needs."""

import ml_collections


def pc_block(**changes) -> ml_collections.ConfigDict:
  """The new model's PC loss: FD as in the paper (α = 1, β = 5, λ = 1, T = 100 for KL)."""
  return ml_collections.ConfigDict(dict(
      method="fd_kl", lam=1.0, alpha=1.0, beta=5.0, temperature=100.0,
      old_outputs="alongside", old_logits_file="", ensemble_size=3) | changes)


def term_block(**changes) -> ml_collections.ConfigDict:
  """The PC term of the linearized new model's LQF problem (pc/lqf_term.py): weights
  α + β·1(old right) on the distance to the old outputs, fitted affinely to the k·one-hot
  scale (`target`); `max_gb` bounds the exact path's memory (its kernel system and
  Jacobian blocks), `batch_size` its batches."""
  return ml_collections.ConfigDict(dict(
      alpha=0.0, beta=1.0, target="affine", max_gb=8.0, batch_size=64) | changes)


def curve_block(**changes) -> ml_collections.ConfigDict:
  """`python -m pc curve`: the exact path at each penalty share ρ, and the nonlinear
  arms it is compared with."""
  return ml_collections.ConfigDict(dict(
      rhos=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0),
      references=("none", "fd_kl", "fd_lm")) | changes)
