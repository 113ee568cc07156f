"""Pretraining on the source task of the Fashion-MNIST transfer benchmark.

Source task: clean Fashion-MNIST, all 10 classes, the first half of the training split
(30,000 images, 28×28); evaluated on the clean test split (10,000). The target task that
`fashion_transfer` adapts to is the other half, corrupted (`data.corruption`).

    make data          # the Debian package dataset-fashion-mnist, or see lqf.data
    python -m lqf pretrain --config fashion_pretrain --workdir runs/fashion_pretrain

Variants as for digits_pretrain: `fashion_pretrain:relu` (the ReLU ablation), `small`.
"""

import ml_collections

import lqf.runtime.config as config_lib

VARIANTS = {
    "small": {"model.width": 8, "seed": 1},
    "relu": {"model.activation": "relu"},
}


def data_config() -> ml_collections.ConfigDict:
  """The data block shared by the Fashion-MNIST configs."""
  return ml_collections.ConfigDict(dict(
      name="graceful_fashion_mnist",
      data_dir="",                # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
      idx_dir="",                 # "" = $GRACEFUL_FASHION_MNIST_DIR or the Debian directory
      train_split="train[:50%]",
      eval_split="test",
      image_size=28,
      channels=1,
      mean=(0.286,),              # Of the training images, on [0, 1].
      std=(0.353,),
      corrupt_train=False,
      corrupt_eval=False,
      # The target domain of `fashion_transfer`, fixed per image.
      corruption=dict(noise_std=0.5, max_shift=3, seed=0),
      augment=dict(crop_padding=2, flip=True),  # A mirrored garment is the same garment.
  ))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      arch="cifar", depth=20, width=16, activation="leaky_relu", leaky_slope=0.1))
  c.data = data_config()
  c.train = dict(
      optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=128,
      steps=1200, warmup_steps=50, checkpoint_every=200, eval_every=400, log_every=50)
  c.parallel = config_lib.parallel_config()
  return config_lib.with_variants(c, arg, VARIANTS)
