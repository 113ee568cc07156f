"""Bad data at the boundary and a diverging run, through the command line (in-process:
`lqf.cli.main` is what `python -m lqf` runs). Each gets one `error:` line naming the
problem and the fix, exit status 2, no traceback, and nothing written (docs/RELIABILITY.md
lists every bad input and the test that covers it)."""

import os

import numpy as np
import pytest

from lqf.data import pipeline
from lqf.experiments import cli
from lqf.models.classifier import build_classifier
from lqf.runtime import checkpoint, train

TINY = ["--config.model.width=4", "--config.model.depth=8", "--config.data.image_size=8",
        "--config.train.steps=4",
        "--config.train.batch_size=32", "--config.train.checkpoint_every=1",
        "--config.train.eval_every=4", "--config.train.log_every=1"]


def _main(capfd, *args):
  code = cli.main(["pretrain", "--config", "digits_pretrain", "--no_progress",
                   *args])
  return code, capfd.readouterr().err


def _assert_one_line(code, err, match):
  assert code == 2 and "Traceback" not in err
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and match in lines[0], err


def _records(n=40, *, label=None, image=None):
  rng = np.random.default_rng(0)
  out = [{"image": rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), "label": i % 10}
         for i in range(n)]
  if out and label is not None:
    out[3]["label"] = label
  if out and image is not None:
    out[5]["image"] = image
  return out


@pytest.mark.parametrize("records, match", [
    (_records(label=12), "labels of 'graceful_digits'/train[:50%] fall outside [0, 10)"),
    (_records(label=-1), "fall outside [0, 10)"),
    (_records(image=np.zeros((8, 8, 4), np.uint8)), "has shape (8, 8, 4); expected"),
    (_records(image=np.zeros((8,), np.uint8)), "has shape (8,); expected"),
    (_records(image=np.full((8, 8, 1), np.nan, np.float32)), "NaN or infinite pixels"),
    (_records(0), "is empty: choose a split with examples"),
], ids=["label_too_large", "label_negative", "four_channels", "one_dimensional",
        "nan_pixels", "empty_split"])
def test_bad_data_is_refused_before_anything_is_written(monkeypatch, capfd, tmp_path,
                                                        records, match):
  monkeypatch.setattr(pipeline, "open_source", lambda *a, **k: (records, 10))
  workdir = tmp_path / "run"
  code, err = _main(capfd, "--workdir", str(workdir), *TINY)
  _assert_one_line(code, err, match)
  assert not workdir.exists()


def test_catalogue_dataset_not_prepared_offline(capfd, tmp_path):
  workdir = tmp_path / "run"
  code, err = _main(capfd, "--workdir", str(workdir), *TINY, "--config.data.name=cifar10",
                    f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.data.channels=3",
                    "--config.data.mean=(0.5,0.5,0.5)", "--config.data.std=(0.25,0.25,0.25)")
  _assert_one_line(code, err, "is not prepared under")
  assert "tfds build cifar10 --file_format=array_record" in err
  assert not workdir.exists()


def test_a_diverging_run_stops_at_its_step_and_keeps_the_last_good_checkpoint(capfd,
                                                                             tmp_path):
  workdir = tmp_path / "run"
  code, err = _main(capfd, "--workdir", str(workdir), *TINY, "--config.train.lr=1e12",
                    "--config.train.warmup_steps=0")
  _assert_one_line(code, err, "the training loss became")
  assert "lower --config.train.lr" in err and "last good checkpoint is kept" in err
  bad_step = int(err.split(" at step ")[1].split(":")[0])
  assert not (workdir / "final_metrics.json").exists()
  saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints"))
  assert saved == list(range(1, bad_step))  # Every step before the bad one, nothing after.
  if saved:  # The kept checkpoint restores, and is finite (restore_latest checks).
    clf = build_classifier({"arch": "cifar", "depth": 8, "width": 4,
                                  "activation": "leaky_relu", "leaky_slope": 0.1}, 10, 1, 0)
    mgr = checkpoint.manager(str(workdir / "checkpoints"))
    from lqf.runtime import config as config_lib  # pylint: disable=g-import-not-at-top
    cfg = config_lib.load("digits_pretrain", [o.removeprefix("--config.")
                                                          for o in TINY])
    opt = train.make_optimizer(cfg.train)
    like = {"params": clf.params, "batch_stats": clf.batch_stats,
            "opt_state": opt.init(clf.params), "step": np.zeros((), np.int32)}
    assert checkpoint.restore_latest(mgr, like)[1] == saved[-1]
    mgr.close()
