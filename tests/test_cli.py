"""The command line as a user meets it: one-line errors, exit code 2, nothing written."""


from cli_helpers import assert_one_line_error, run_cli, run_process
import pytest

CONFIG = "digits_pretrain"
TINY = ["--config.model.width=4", "--config.model.depth=8", "--config.data.image_size=8",
        "--config.train.steps=2",
        "--config.train.batch_size=16", "--config.train.checkpoint_every=1"]


run = run_cli
_assert_one_line_error = assert_one_line_error


@pytest.mark.parametrize("override, match", [
    ("--config.data.name=imagenet_nope", "unknown dataset 'imagenet_nope'"),
    ("--config.model.arch=vgg", "unknown model.arch 'vgg'"),
    ("--config.train.lrr=0.1", "unknown config key 'train.lrr'"),
    ("--config.train.lr=0", "train.lr must be positive"),
    ("--config.train.lr=-0.1", "train.lr must be positive"),
    ("--config.train.batch_size=0", "train.batch_size must be positive"),
])
def test_bad_input_gets_one_line_and_exit_2(tmp_path, override, match):
  workdir = tmp_path / "run"
  proc = run("pretrain", "--config", CONFIG, "--workdir", str(workdir), override)
  _assert_one_line_error(proc, match)
  assert not workdir.exists()


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  # A real process: `python -m lqf` itself exits 2 with the one line.
  proc = run_process("pretrain", "--config", CONFIG, "--workdir", str(blocker / "run"), *TINY)
  _assert_one_line_error(proc, "cannot be written")


def test_csv_text_and_atomic_figures(tmp_path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from lqf.runtime import io
  assert io.csv_text([{"a": 1, "b": 2, "c": 3}, {"a": 4, "b": 5}], ["a", "b"]) == \
      "a,b\n1,2\n4,5\n"
  fig, _ = plt.subplots()
  io.atomic_savefig(fig, str(tmp_path / "f.png"))
  assert open(tmp_path / "f.png", "rb").read(4) == b"\x89PNG"
  assert [p.name for p in tmp_path.iterdir()] == ["f.png"]
