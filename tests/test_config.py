import pytest

from lqf.errors import UserError
from lqf.runtime import config as config_lib

PATH = "digits_pretrain"


def test_overrides_parse_and_keep_types():
  cfg = config_lib.load(PATH, ["--config.train.lr=1", "train.steps=7",
                               "--config.model.activation=relu", "data.mean=[0.1]"])
  assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
  assert cfg.train.steps == 7 and cfg.model.activation == "relu"
  assert cfg.data.mean == (0.1,)


@pytest.mark.parametrize("item, match", [
    ("train.lrr=0.1", "unknown config key 'train.lrr'"),
    ("trian.lr=0.1", "unknown config key 'trian'"),
    ("train.steps=abc", "holds a int"),
    ("train.lr", "not of the form key=value"),
])
def test_bad_overrides(item, match):
  with pytest.raises(UserError, match=match):
    config_lib.load(PATH, [item])


def test_missing_config_file():
  with pytest.raises(UserError, match="neither a file nor the name of a config"):
    config_lib.load("configs/nope.py")


def test_configs_are_found_by_name_and_by_path():
  by_name = config_lib.load("digits_pretrain")
  by_path = config_lib.load(config_lib.resolve("digits_pretrain"))
  assert config_lib.to_dict(by_name) == config_lib.to_dict(by_path)
  assert {"digits_pretrain", "digits_pc", "digits_bct"} <= set(config_lib.available())


@pytest.mark.parametrize("key, value, match", [
    ("model.arch", "vgg", "unknown model.arch 'vgg'"),
    ("model.depth", 21, "model.depth 21 is not a cifar ResNet"),
    ("model.activation", "gelu", "unknown model.activation"),
    ("train.lr", 0.0, "train.lr must be positive"),
    ("train.batch_size", -1, "train.batch_size must be positive"),
    ("train.optimizer", "lbfgs", "unknown train.optimizer"),
])
def test_checks_name_the_bad_value(key, value, match):
  cfg = config_lib.load(PATH)
  block, leaf = key.split(".")
  cfg[block][leaf] = value
  with pytest.raises(UserError, match=match):
    config_lib.check_model(cfg.model)
    config_lib.check_train(cfg.train)


def test_diff_ignores_prefixes():
  a = {"model": {"depth": 20}, "train": {"steps": 5, "lr": 0.1}}
  b = {"model": {"depth": 32}, "train": {"steps": 6, "lr": 0.1}}
  assert config_lib.diff(a, b) == ["model.depth", "train.steps"]
  assert config_lib.diff(a, b, ignore=("train.steps",)) == ["model.depth"]
