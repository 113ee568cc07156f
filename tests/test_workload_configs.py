"""The ImageNet-scale configs: valid as written, documented, and runnable end to end on
stand-ins (imported stand-in ResNet weights, TFDS mock data of the real datasets)."""

import importlib
import os

import pytest
from safetensors.numpy import save_file
import tensorflow_datasets as tfds
from test_weights import stand_in

from lqf.data import pipeline
from lqf.experiments import import_weights
from lqf.runtime import config as config_lib

CONFIGS = {  # config -> (package of its job, overrides that shrink it to a stand-in)
    "imagenet_r50_lqf_cifar100": ("lqf.experiments.finetune", [
        "shots=1", "lqf.steps=2", "lqf.batch_size=64", "lqf.burnin_steps=1",
        "lqf.checkpoint_every=2", "lqf.scope=last_stage"]),
    "imagenet_r50_pc_birds": ("pc.experiments.train", [
        "old.shots=1", "old.finetune.steps=2", "train.steps=2", "train.checkpoint_every=2",
        "train.eval_every=2", "train.log_every=1"]),
    "imagenet_r50_bct_flowers": ("bct.experiments.train", [
        "old.shots=1", "old.finetune.steps=2", "train.steps=2", "train.checkpoint_every=2",
        "train.eval_every=2", "train.log_every=1"]),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_is_valid_and_documented(name):
  cfg = config_lib.load(name)
  job = importlib.import_module(CONFIGS[name][0])
  job.check_config(cfg)
  doc = importlib.import_module(
      f"{CONFIGS[name][0].split('.')[0]}.experiments.configs.{name}").__doc__
  for needed in ("python -m", "Hardware:", "Expected result source:", "import-weights"):
    assert needed in doc
  assert cfg.data.image_size == 224 and cfg.data.channels == 3
  assert cfg.parallel.devices == 0  # Every device of the node.


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """Stand-in ImageNet weights (a width-4 ResNet-18 with a 1000-way head), imported."""
  root = tmp_path_factory.mktemp("imported")
  save_file(stand_in(18, 4, num_classes=1000), str(root / "w.safetensors"))
  import_weights.import_run(str(root / "w.safetensors"), str(root / "run"))
  return str(root / "run")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_runs_on_stand_ins(imported, tmp_path, name):
  package, overrides = CONFIGS[name]
  cfg = config_lib.load(name, [
      f"pretrained.workdir={imported}" if "bct" not in name else
      f"new.pretrained.workdir={imported}", "data.image_size=32", "parallel.devices=1",
      *overrides] + ([f"old.pretrained.workdir={imported}"] if "lqf" not in name else []))
  job = importlib.import_module(package)
  with tfds.testing.mock_data(num_examples=60, policy=tfds.testing.MockPolicy.USE_CODE):
    if "bct" in name:
      # Mock labels are random: the label sets are classes the mock split holds.
      source, _ = pipeline.open_source(cfg.data.name, cfg.data.train_split)
      present = sorted({int(source[i]["label"]) for i in range(len(source))})
      config_lib.apply_override(cfg, f"old.classes={tuple(present[:3])}")
      config_lib.apply_override(cfg, f"new.classes={tuple(present[:6])}")
    result = job.run(cfg, str(tmp_path / "run"), progress=False)
  assert os.path.exists(tmp_path / "run" / "final_metrics.json")
  assert result
