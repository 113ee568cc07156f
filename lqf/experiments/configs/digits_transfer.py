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

import lqf.experiments.configs.common as common
import lqf.experiments.configs.digits_pretrain as digits_pretrain
import lqf.runtime.config as config_lib


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.pretrained = config_lib.pretrained_config("runs/digits_pretrain", "digits_pretrain")
  c.data = digits_pretrain.data_config()
  c.data.update(dict(train_split="train[50%:85%]", eval_split="test", corrupt_train=True,
                     corrupt_eval=True))
  c.data.augment.crop_padding = 0
  c.val_split = "train[85%:]"
  c.shots = 5                     # Labelled examples per class; 0 = the whole split.
  # The arms at their defaults. About `solve`, the exact optimum of the LQF problem
  # (`python -m lqf solve`; `lqf.report_gap=True` makes the finetune command report its
  # run's relative gap to it): the kernel solve (float32 Jacobian, float64 Cholesky)
  # matches a float64 solve to 1e-6 here; float32 CG cannot get within 1% of an optimum
  # ~1e-5 of the starting objective, so CG needs float64 (12× slower per product here).
  c.update(common.adaptation_blocks())
  # What only the benchmark reads. Each arm's learning rate is picked from its grid on the
  # validation split; the ReLU ablation needs a ReLU backbone, pretrained the same way.
  c.bench = dict(
      lr_grid=dict(finetune=(0.0003, 0.001, 0.003, 0.01), scratch=(0.03, 0.1, 0.3, 1.0),
                   probe=(0.001, 0.003, 0.01, 0.03), lqf_sgd=(1e-4, 3e-4, 1e-3)),
      relu=config_lib.pretrained_config("runs/digits_pretrain_relu", "digits_pretrain:relu"),
      # AdaBN statistics of each subset for the arms that start from the pretrained
      # model, and a learning rate chosen for every seed's subset (not only seed 0's).
      adapt_batch_norm=False, tune_per_seed=False)
  return c
