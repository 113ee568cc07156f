"""LQF on CIFAR-100 at 10 shots a class from an ImageNet ResNet-50 (224×224).

    python -m lqf import-weights --weights resnet50.safetensors --workdir runs/imagenet_r50
    python -m lqf finetune --config imagenet_r50_lqf_cifar100 \
        --workdir runs/r50_cifar100_lqf
    python -m lqf finetune --config imagenet_r50_lqf_cifar100 \
        --workdir runs/r50_cifar100_nonlinear --config.method=nonlinear

Hardware: one node of 8 GPUs (A100/H100 class, `parallel.devices=0` uses them all; the
global batch is the same on any number of devices) and about 16 GB of host RAM for the
1,000 training and 10,000 test images at 224×224. For several nodes see docs/CLUSTER.md.

Expected result source: LQF (Achille et al., CVPR 2021, arXiv 2012.11140) reports that
LQF matches nonlinear fine-tuning of an ImageNet ResNet-50 and beats it at few shots a
class; its tables are the reference. This config has not been run by this project yet
(no GPU was available): no result in results/ comes from it.
"""

import ml_collections

import lqf.experiments.configs.common as common
import lqf.experiments.configs.imagenet_common as imagenet_common
import lqf.runtime.config as config_lib


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = "lqf"
  c.pretrained = imagenet_common.pretrained_config()
  c.data = imagenet_common.data_config("cifar100", "train", "test", augment=False)
  c.shots = 10
  # Everything linearized (25.6 M weights), squared loss against 5·one-hot, K-FAC with
  # its factors estimated once on 4 batches of 250 and its step from the quadratic model.
  c.lqf = common.lqf_block(scope="all", k=5.0, lam=1e-4, steps=100, batch_size=250,
                           burnin_steps=4, checkpoint_every=10)
  c.solve = common.solve_block(method="cg", batch_size=125, max_iters=500)
  # The nonlinear arm: SGD on every weight, batch norm frozen, no augmentation.
  c.finetune = common.sgd(lr=0.003, batch_size=64, steps=2000, checkpoint_every=200,
                          eval_every=500, log_every=50)
  c.probe = common.probe_block(lr=0.001, steps=1000)
  c.parallel = config_lib.parallel_config(devices=0)
  return c
