"""Positive-congruent training: model updates that do not break what the old model got
right (Yan et al., CVPR 2021).

- `pc.metrics`: error rates and flip rates (ER, NFR, PFR, relative NFR, NFI) from counts.
- `pc.losses`: focal distillation (KL and logit matching) and naive re-weighting.
- `pc.lqf_term`: the PC wish as a quadratic term of the LQF objective.
- `pc.tradeoff`: the exact ER-versus-NFR curve of the linearized model.
- `python -m pc train | tradeoff | bench`: the jobs (`pc.cli`).
"""
