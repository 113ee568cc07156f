"""Backward-compatible update on Oxford Flowers-102 from an ImageNet ResNet-50 (224×224).

    python -m lqf import-weights --weights resnet50.safetensors --workdir runs/imagenet_r50
    python -m bct train --config imagenet_r50_bct_flowers --workdir runs/r50_flowers_bct
    python -m bct train --config imagenet_r50_bct_flowers \
        --workdir runs/r50_flowers_independent --config.bct.method=independent
    python -m bct eval --workdir runs/r50_flowers_bct --independent runs/r50_flowers_independent

The old model saw the first 51 classes (10 images each); the new one all 102 (the 1,020
training images) and is trained with the influence loss through the old model's cosine
head (λ = 1), synthesized old-head columns for the 51 classes the old model never saw.
Retrieval runs on the 6,149 test images, each a query against all the others.

Hardware: one node of 8 GPUs (`parallel.devices=0`), about 5 GB of host RAM for the
images. The exact LQF variant (`bct curve`) needs the Jacobian: use `lqf.scope=head`.

Expected result source: BCT (Shen et al., CVPR 2020, arXiv 2003.11942) and the first
author's reimplementation (METHODS.md: ImageNet new/old 42.2 against old/old 39.5, 46.8
with a normalised classifier). Not run by this project yet: no result in results/
comes from it.
"""

import ml_collections

import bct.experiments.configs.common as common
import lqf.experiments.configs.common as lqf_common
import lqf.experiments.configs.imagenet_common as imagenet_common
import lqf.runtime.config as config_lib


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = imagenet_common.data_config("oxford_flowers102", "train", "test", augment=True)
  c.new = dict(pretrained=imagenet_common.pretrained_config(), shots=0, classes=())
  c.old = dict(workdir="", pretrained=imagenet_common.pretrained_config(), shots=10,
               classes=tuple(range(51)), allow_other_dataset=False,
               finetune=lqf_common.sgd(lr=0.003, batch_size=64, steps=500,
                                       checkpoint_every=500, eval_every=500, log_every=50))
  c.train = lqf_common.sgd(lr=0.003, batch_size=64, steps=2000, checkpoint_every=200,
                           eval_every=500, log_every=50)
  c.bct = common.bct_block()
  c.lqf = lqf_common.lqf_block(scope="head")
  c.term = common.term_block(max_gb=32.0, batch_size=32)
  c.curve = common.curve_block()
  c.retrieval = common.retrieval_block(query_chunk=1024, gallery_chunk=8192)
  c.parallel = config_lib.parallel_config(devices=0)
  return c
