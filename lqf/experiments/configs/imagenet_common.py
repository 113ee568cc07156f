"""What the ImageNet-scale configs share: the imported backbone and the data block.

The backbone is an ImageNet-pretrained ResNet-50 from torchvision or timm, imported once:

    python -m lqf import-weights --weights resnet50.safetensors --workdir runs/imagenet_r50

(`torchvision.models.ResNet50_Weights.IMAGENET1K_V2` saved with
`safetensors.torch.save_file(model.state_dict(), "resnet50.safetensors")`, or timm's
`resnet50.a1_in1k` safetensors file). The activation becomes leaky ReLU, as LQF asks.

The datasets are TFDS catalogue datasets prepared offline in array_record format
(`tfds build NAME --file_format=array_record`, see README). The pipeline holds a split
in memory at 224×224×3 float32, about 0.6 MB an image: size the host's RAM for it.
"""

import ml_collections

import lqf.runtime.config as config_lib

PRETRAINED = "runs/imagenet_r50"


def pretrained_config() -> ml_collections.ConfigDict:
  """The imported backbone's `pretrained` block: nothing can remake it (`config` "")."""
  return config_lib.pretrained_config(PRETRAINED)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def data_config(name: str, train_split: str, eval_split: str, *, augment: bool
                ) -> ml_collections.ConfigDict:
  """A catalogue dataset at 224×224, normalised as the ImageNet weights expect."""
  return ml_collections.ConfigDict(dict(
      name=name, data_dir="", idx_dir="", train_split=train_split, eval_split=eval_split,
      image_size=224, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD,
      corrupt_train=False, corrupt_eval=False,
      corruption=dict(noise_std=0.0, max_shift=0, seed=0),
      # Random 16-pixel translations and flips for the nonlinear arms; LQF caches the
      # frozen prefix per image and cannot augment.
      augment=dict(crop_padding=16 if augment else 0, flip=augment)))
