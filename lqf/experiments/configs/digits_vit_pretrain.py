"""Pretraining a small ViT (arch="vit") on the source task of the digits benchmark.

The data block is `digits_pretrain`'s; the model is a 2-block ViT on 4x4 patches of the
16x16 digits (`model.image_size` must equal `data.image_size`). It shows the backbone
protocol (`lqf.models.backbone`) at work: the fine-tuning and solve commands take it
unchanged.

    python -m lqf pretrain --config digits_vit_pretrain --workdir runs/digits_vit_pretrain
    python -m lqf finetune --config digits_finetune --workdir runs/vit_ft \\
        --config.pretrained_workdir=runs/digits_vit_pretrain
    python -m lqf solve --config digits_finetune --workdir runs/vit_solve \\
        --config.pretrained_workdir=runs/digits_vit_pretrain --config.solve.method=cg

No accuracy is claimed yet: these settings have only been run for a few steps in tests.
"""

import ml_collections

import lqf.experiments.configs.digits_pretrain as digits_pretrain
import lqf.runtime.config as config_lib


def model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      arch="vit", patch=4, dim=32, depth=2, heads=2, mlp_dim=64, activation="leaky_relu",
      leaky_slope=0.1, image_size=16))


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config()
  c.data = digits_pretrain.data_config()
  c.train = dict(
      optimizer="adam", lr=1e-3, momentum=0.9, weight_decay=0.0, batch_size=128,
      steps=600, warmup_steps=30, checkpoint_every=100, eval_every=100, log_every=20)
  c.parallel = config_lib.parallel_config()
  return c
