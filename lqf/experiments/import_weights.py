"""`python -m lqf import-weights`: torchvision/timm ResNet weights written as a finished
pretraining run (command "import") that `pretrain.load_pretrained` and so every job
accept."""

from __future__ import annotations

import dataclasses
import os

from lqf.errors import require
import lqf.models.resnet as resnet
from lqf.models.weights import IMAGENET_MEAN, IMAGENET_STD, Report, convert, read_state_dict
import lqf.runtime.checkpoint as checkpoint
from lqf.runtime.io import atomic_write_json

COMMAND = "import"


def import_run(weights: str, workdir: str, *, activation: str = "leaky_relu",
               leaky_slope: float = 0.1, image_size: int = 224) -> Report:
  """Converts `weights` and writes them to `workdir` as a finished pretraining run
  (`config.json` with command "import", a checkpoint, `import_report.json`)."""
  require(activation in resnet.ACTIVATIONS, f"unknown activation {activation!r}: use one of "
          f"{', '.join(resnet.ACTIVATIONS)}")
  model_cfg, params, batch_stats, report = convert(
      read_state_dict(weights), activation=activation, leaky_slope=leaky_slope)
  a = report.architecture
  cfg = {"seed": 0, "model": model_cfg, "weights": os.path.abspath(weights),
         "num_classes": a.num_classes,
         "data": {"name": "imagenet2012", "channels": a.in_channels, "image_size": image_size,
                  "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}
  checkpoint.claim_workdir(workdir, cfg, command=COMMAND)
  mgr = checkpoint.manager(os.path.join(workdir, "checkpoints"), keep=1)
  checkpoint.save(mgr, 0, {"params": params, "batch_stats": batch_stats})
  mgr.wait_until_finished()
  mgr.close()
  atomic_write_json(os.path.join(workdir, "import_report.json"),
                    {"architecture": dataclasses.asdict(a), "mapped": report.mapped,
                     "ignored": report.ignored, "unmapped": report.unmapped,
                     "activation": activation})
  return report
