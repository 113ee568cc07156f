"""The blocks of the BCT job configs, at their defaults; each dataset's configs take them
and change only what their data needs."""

import ml_collections


def bct_block(**changes) -> ml_collections.ConfigDict:
  """The new model's loss: BCT's influence loss through the old classifier at λ = 1, as
  in the paper and its reimplementations, with a cosine head (see digits_bct for why)."""
  return ml_collections.ConfigDict(dict(
      method="bct", lam=1.0, dim_rule="truncate_or_pad", synth_norm="match",
      synth_center=False, l2_clip_norm=1.0, head="cosine", head_scale=16.0) | changes)


def term_block(**changes) -> ml_collections.ConfigDict:
  """The influence term of the linearized new model's LQF problem (bct/lqf_term.py) at
  the share `rho`; `max_gb` bounds the exact path's memory (its kernel system and Jacobian
  blocks), `batch_size` its batches."""
  return ml_collections.ConfigDict(dict(rho=0.5, max_gb=12.0, batch_size=64) | changes)


def curve_block(**changes) -> ml_collections.ConfigDict:
  """`python -m bct curve`: the exact path at each share ρ."""
  return ml_collections.ConfigDict(
      dict(rhos=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)) | changes)


def retrieval_block(**changes) -> ml_collections.ConfigDict:
  """Cross-model retrieval: the top-k sizes and the chunks that bound its memory."""
  return ml_collections.ConfigDict(dict(ks=(1, 5), query_chunk=256, gallery_chunk=4096)
                                   | changes)
