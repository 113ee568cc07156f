"""Pretraining on the source task of the built-in digits transfer benchmark.

Source task: clean digits, all 10 classes, the first half of the train split (598
images); evaluated on the clean test split (600 images). The target task that
`digits_transfer` fine-tunes on is the other half, corrupted.

    python -m lqf pretrain --config digits_pretrain --workdir runs/pretrain
    python -m lqf pretrain --config digits_pretrain:small --workdir runs/pretrain_small

Variants (`get_config(arg)`, named after a colon; several joined by commas): `small` (width
8, another seed: the old model of the PC and BCT updates), `relu` (the ReLU ablation),
`r32` (ResNet-32: the large gallery model of heterogeneous BCT) and `seed1`.

Expected: about 99% test accuracy on clean digits (the command prints it), about two minutes
on a 2-core CPU.
"""

import ml_collections

import lqf.runtime.config as config_lib


def data_config() -> ml_collections.ConfigDict:
  """The data block shared by the digits configs."""
  return ml_collections.ConfigDict(dict(
      name="graceful_digits",
      data_dir="",                # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
      idx_dir="",                 # Only for graceful_fashion_mnist (see lqf.data).
      train_split="train[:50%]",
      eval_split="test",
      image_size=16,
      channels=1,
      mean=(0.3,),
      std=(0.4,),
      corrupt_train=False,
      corrupt_eval=False,
      # The target domain: a fixed 1-pixel shift and Gaussian noise per image.
      corruption=dict(noise_std=0.1, max_shift=1, seed=0),
      augment=dict(crop_padding=1, flip=False),  # Flipping would change a digit's meaning.
  ))


def model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      arch="cifar", depth=20, width=16, activation="leaky_relu", leaky_slope=0.1))


VARIANTS = {
    "small": {"model.width": 8, "seed": 1},
    "relu": {"model.activation": "relu"},
    "r32": {"model.depth": 32},
    "seed1": {"seed": 1},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config()
  c.data = data_config()
  c.train = dict(
      optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=128,
      steps=600, warmup_steps=30, checkpoint_every=100, eval_every=100, log_every=20)
  c.parallel = config_lib.parallel_config()
  return config_lib.with_variants(c, arg, VARIANTS)
