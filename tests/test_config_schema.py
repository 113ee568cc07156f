"""One config schema: the same block names in every method, variants by get_config(arg),
`pretrained` blocks of one shape, and no dataset's config built from another's."""

import ast
import os

from cli_helpers import TINY_PRETRAIN
import pytest

from lqf.errors import UserError
from lqf.experiments import update
from lqf.experiments.bench import common
from lqf.runtime import config as config_lib

BLOCKS = {"seed", "method", "model", "data", "pretrained", "shots", "val_split", "init",
          "old", "new", "train", "finetune", "scratch", "probe", "lqf", "solve", "pc", "bct",
          "term", "curve", "retrieval", "bench", "parallel"}


def _pretrained_blocks(tree, path=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      if key == "pretrained":
        yield f"{path}{key}", value
      else:
        yield from _pretrained_blocks(value, f"{path}{key}.")


@pytest.mark.parametrize("name", config_lib.available())
def test_every_config_uses_only_the_schema_blocks(name):
  cfg = config_lib.to_dict(config_lib.load(name))
  assert set(cfg) <= BLOCKS, set(cfg) - BLOCKS
  assert set(cfg["data"]) >= {"name", "data_dir", "idx_dir", "train_split", "eval_split"}
  for where, block in _pretrained_blocks(cfg):
    assert set(block) == {"workdir", "config"}, where
    if block["config"]:  # The config that remakes it must exist and load.
      config_lib.load(block["config"])


def test_block_modules_are_not_listed_as_configs():
  names = config_lib.available()
  assert "common" not in names and "imagenet_common" not in names
  assert {"digits_pretrain", "digits_pc", "digits_bct", "imagenet_r50_pc_birds"} <= set(names)


@pytest.mark.parametrize("name", [n for n in config_lib.available() if n.startswith("imagenet")])
def test_imagenet_configs_do_not_build_on_the_digits_ones(name):
  tree = ast.parse(open(config_lib.resolve(name)).read())
  imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
              for a in node.names}
  imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
  assert not [m for m in imported if "digits" in m], imported
  cfg = config_lib.to_dict(config_lib.load(name))
  assert "digits" not in repr(cfg)


def test_variants_are_get_config_arguments():
  base = config_lib.load("digits_pretrain")
  small = config_lib.load("digits_pretrain:small")
  assert (small.model.width, small.seed) == (8, 1) and base.model.width == 16
  both = config_lib.load("digits_pretrain:small,relu", ["train.steps=3"])
  assert (both.model.width, both.model.activation, both.train.steps) == (8, "relu", 3)
  with pytest.raises(UserError, match="unknown config variant 'tiny': use one of small"):
    config_lib.load("digits_pretrain:tiny")


def test_with_variants_applies_dotted_settings_in_order():
  cfg = config_lib.load("digits_pretrain")
  out = config_lib.with_variants(cfg, "a,b", {"a": {"model.depth": 32, "seed": 5},
                                              "b": {"seed": 7}})
  assert (out.model.depth, out.seed) == (32, 7)
  assert config_lib.with_variants(cfg, None, {}) is cfg


def test_a_pretrained_block_placed_twice_is_two_objects():
  cfg = config_lib.load("digits_bct", ["old.pretrained.workdir=elsewhere"])
  assert cfg.bench.hetero.query.pretrained.workdir == "runs/digits_pretrain_small"
  p = config_lib.pretrained_config("runs/x", "digits_pretrain:small")
  assert config_lib.to_dict(p) == {"workdir": "runs/x", "config": "digits_pretrain:small"}


def test_check_curve_refuses_shares_outside_the_unit_interval_and_bad_sizes():
  ok = {"max_gb": 1.0, "batch_size": 8}
  config_lib.check_curve({"rhos": (0.0, 1.0)}, ok)
  with pytest.raises(UserError, match=r"curve.rhos must be a non-empty list"):
    config_lib.check_curve({"rhos": ()}, ok)
  with pytest.raises(UserError, match=r"curve.rhos must be a non-empty list"):
    config_lib.check_curve({"rhos": (0.5, 1.5)}, ok)
  with pytest.raises(UserError, match="term.max_gb and term.batch_size must be positive"):
    config_lib.check_curve({"rhos": (0.5,)}, {"max_gb": 0.0, "batch_size": 8})


def test_memoized_makes_once_per_setting():
  cache, calls = {}, []
  make = lambda v: (lambda: calls.append(v) or v)
  assert update.memoized(cache, [{"a": 1}, 0], make("x")) == "x"
  assert update.memoized(cache, [{"a": 1}, 0], make("y")) == "x"
  assert update.memoized(cache, [config_lib.load("digits_pretrain").model, 0], make("z")) == "z"
  assert calls == ["x", "z"]


def test_check_same_dataset_refuses_another_dataset_unless_allowed():
  old = {"workdir": "runs/old", "allow_other_dataset": False}
  update.check_same_dataset(old, "graceful_digits", "graceful_digits")
  with pytest.raises(UserError, match="was trained on 'cifar10', the new data is "
                     "'graceful_digits'"):
    update.check_same_dataset(old, "cifar10", "graceful_digits")
  update.check_same_dataset(dict(old, allow_other_dataset=True), "cifar10", "graceful_digits")


def test_pretrained_run_without_a_config_says_how_to_import(tmp_path):
  with pytest.raises(UserError, match="holds no finished pretraining run.*import-weights"):
    common.pretrained_run({"workdir": str(tmp_path / "none"), "config": ""})
  assert not os.path.exists(tmp_path / "none")


def test_a_finished_run_is_reused_only_when_its_config_is_the_one_asked_for(pretrained):
  spec = {"workdir": pretrained, "config": "digits_pretrain"}
  record = open(os.path.join(pretrained, "config.json")).read()
  assert common.pretrained_run(spec, overrides=TINY_PRETRAIN) == pretrained
  # Logging and saving may differ; a model of other settings (a stale quick run) may not.
  assert common.pretrained_run(spec, overrides=(*TINY_PRETRAIN, "train.log_every=1")) == \
      pretrained
  with pytest.raises(UserError, match=r"different architecture \(model.depth differ\): "
                     "delete .* to pretrain it again"):
    common.pretrained_run(spec, overrides=(*TINY_PRETRAIN, "model.depth=20"))
  with pytest.raises(UserError, match=r"different config \(train.steps differ\): delete"):
    common.pretrained_run(spec, overrides=(*TINY_PRETRAIN, "train.steps=5"))
  assert open(os.path.join(pretrained, "config.json")).read() == record


def test_backbone_overrides_point_every_block_at_its_run(monkeypatch):
  seen = []
  monkeypatch.setattr(common, "pretrained_run",
                      lambda spec, suffix="", overrides=(): seen.append(overrides)
                      or spec["workdir"] + suffix)
  cfg = config_lib.to_dict(config_lib.load("digits_bct"))
  out = common.backbone_overrides(cfg, ["new.pretrained", "bench.hetero.gallery.pretrained"],
                                  quick=True)
  assert out == ["new.pretrained.workdir=runs/digits_pretrain_quick",
                 "bench.hetero.gallery.pretrained.workdir=runs/digits_pretrain_r32_quick"]
  assert seen == [common.QUICK_PRETRAIN] * 2
  config_lib.load("digits_bct", out)  # The overrides name real keys.
