"""The blocks of the LQF job configs, at their defaults: one schema for every dataset.

Each dataset's configs (digits_*, imagenet_*, ...) take these blocks and change only what
their data needs; none inherits another dataset's config.
"""

import ml_collections


def sgd(**changes) -> ml_collections.ConfigDict:
  """A `train`-shaped block (`lqf.runtime.config.check_train`): SGD with momentum,
  batch norm frozen (`train_bn`), no warm-up."""
  return ml_collections.ConfigDict(dict(
      optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, batch_size=64, steps=150,
      warmup_steps=0, checkpoint_every=150, eval_every=150, log_every=150, train_bn=False)
                                   | changes)


def lqf_block(**changes) -> ml_collections.ConfigDict:
  """LQF: every conv and dense kernel linearized (batch norm frozen), squared loss against
  k·one-hot, ridge λ toward w0, K-FAC with factors estimated and inverted once and the
  step size and momentum from the exact quadratic model (full batch)."""
  return ml_collections.ConfigDict(dict(
      scope="all", batch_norm=False, loss="mse", k=5.0, lam=1e-4, optimizer="kfac",
      lr=1.0, momentum=0.9, steps=30, batch_size=512, curvature="once", inverse_every=5,
      adaptive=True, damping=1e-3, burnin_steps=1, report_gap=False, checkpoint_every=10)
                                   | changes)


def solve_block(**changes) -> ml_collections.ConfigDict:
  """The exact optimum of the LQF problem (`python -m lqf solve`): the kernel solve, or
  CG preconditioned by K-FAC (`method="cg"`)."""
  return ml_collections.ConfigDict(dict(
      method="kernel", precondition=True, damping=1e-3, tol=1e-8, max_iters=3000,
      batch_size=256, float64=False, max_gb=8.0) | changes)


def probe_block(**changes) -> ml_collections.ConfigDict:
  """The linear probe: the head alone on frozen features."""
  return ml_collections.ConfigDict(dict(lr=0.01, weight_decay=1e-3, steps=300) | changes)


def adaptation_blocks() -> dict[str, ml_collections.ConfigDict]:
  """The arms of a transfer task, at their defaults: `finetune` (every weight, batch norm
  frozen), `scratch` (a fresh network, batch norm trained), `probe`, `lqf`, `solve`."""
  return dict(
      finetune=sgd(),
      scratch=sgd(lr=0.05, weight_decay=5e-4, steps=300, warmup_steps=10,
                  checkpoint_every=300, eval_every=300, log_every=300, train_bn=True),
      probe=probe_block(), lqf=lqf_block(), solve=solve_block())
