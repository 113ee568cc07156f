"""The built-in transfer benchmark: adapt the clean-digits model to noisy, shifted digits.

Target domain: the same 10 classes, each image shifted by up to 1 pixel and with
additive Gaussian noise (σ = 0.1 on [0, 1] pixels), fixed per image. Few-shot subsets
come from `train[50%:85%]` (419 images, disjoint from the source half), learning rates
are chosen on `train[85%:]` (180 images), and accuracy is measured on the 600 test
images, corrupted the same way.

    python -m lqf bench transfer --json results/transfer.json

Expected (docs/BENCHMARKS.md): fine-tuning beats training from scratch by more than 10
points at 5 shots a class, and the best method lands between 60% and 95%.
"""

import ml_collections

import lqf.experiments.configs.digits_pretrain as digits_pretrain


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.pretrain_config = "digits_pretrain"
  c.pretrain_workdir = "runs/digits_pretrain"
  c.data = digits_pretrain.data_config()
  c.data.update(dict(train_split="train[50%:85%]", eval_split="test", corrupt_train=True,
                     corrupt_eval=True))
  c.data.augment.crop_padding = 0
  c.val_split = "train[85%:]"
  c.shots = 5                     # Labelled examples per class; 0 = the whole split.
  c.finetune = dict(
      optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, batch_size=64, steps=150,
      warmup_steps=0, checkpoint_every=150, eval_every=150, log_every=150, train_bn=False)
  c.scratch = dict(
      optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=64, steps=300,
      warmup_steps=10, checkpoint_every=300, eval_every=300, log_every=300, train_bn=True)
  c.probe = dict(lr=0.01, weight_decay=1e-3, steps=300)
  # LQF: every conv and dense kernel linearized (batch norm frozen), squared loss against
  # k·one-hot, ridge λ toward w0, K-FAC with factors estimated and inverted once and the
  # step size and momentum from the exact quadratic model (full batch).
  c.lqf = dict(
      scope="all", batch_norm=False, loss="mse", k=5.0, lam=1e-4, optimizer="kfac",
      lr=1.0, momentum=0.9, steps=30, batch_size=512, curvature="once", inverse_every=5,
      adaptive=True, damping=1e-3, burnin_steps=1, report_gap=False)
  # The exact optimum of the LQF problem (`python -m lqf solve`; `lqf.report_gap=True`
  # makes the finetune command report its run's relative gap to it). The kernel solve
  # (float32 Jacobian, float64 Cholesky) matches a float64 solve to 1e-6 here; float32 CG
  # cannot get within 1% of an optimum ~1e-5 of the starting objective, so CG needs
  # float64 (12× slower per product on this CPU).
  c.solve = dict(method="kernel", precondition=True, damping=1e-3, tol=1e-8,
                 max_iters=3000, batch_size=256, float64=False, max_gb=8.0)
  # The ReLU ablation needs a ReLU backbone, pretrained the same way.
  c.pretrain_relu_workdir = "runs/digits_pretrain_relu"
  # Each arm's learning rate is picked from its grid on the validation split.
  c.lr_grid = dict(finetune=(0.0003, 0.001, 0.003, 0.01), scratch=(0.03, 0.1, 0.3, 1.0),
                   probe=(0.001, 0.003, 0.01, 0.03), lqf_sgd=(1e-4, 3e-4, 1e-3))
  return c
