"""Backward-compatible representation learning: new embedding models whose queries can
search an old model's gallery without a backfill (Shen et al., CVPR 2020).

- `bct.embedding`: matching embedding sizes (truncate or pad) and normalisation.
- `bct.retrieval`: CMC top-k and mAP across models, in bounded memory; the
  compatibility criterion and the update gain.
- `bct.losses`: the influence loss through the old head (synthesized weights for new
  classes), L2 regression and independent training.
- `bct.lqf_term`: compatibility as a quadratic term of the LQF objective, solved exactly.
- `python -m bct train | eval | curve | bench`: the jobs (`bct.cli`).
"""
