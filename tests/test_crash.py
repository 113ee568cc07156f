"""Crash safety: every training command killed with SIGKILL at a random step and run
again ends bit for bit where an uninterrupted run ends; damaged checkpoints are
detected; a workdir of another run is only replaced with --overwrite."""

import importlib
import json
import os
import random
import signal
import subprocess
import sys

from cli_helpers import ROOT, assert_one_line_error, run_cli
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lqf.errors import UserError
from lqf.experiments import pretrain
from lqf.runtime import checkpoint
from lqf.runtime import config as config_lib
from lqf.runtime import faults
from lqf.runtime.io import MetricsLog, read_tensorboard_scalars

STEPS = 6
PRETRAIN = ["--config.model.width=4", "--config.model.depth=8", "--config.data.image_size=8",
            f"--config.train.steps={STEPS}", "--config.train.batch_size=32",
            "--config.train.checkpoint_every=2", "--config.train.eval_every=3",
            "--config.train.log_every=1"]


def _train_overrides(pretrained):
  return [f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=2",
          "--config.train.log_every=1", "--config.train.eval_every=3",
          "--config.data.image_size=8", "--config.old.finetune.steps=2",
          f"--config.old.pretrained.workdir={pretrained}"]


COMMANDS = {  # name -> (module, command and config, overrides given the pretrained run)
    "pretrain": ("lqf", ["pretrain", "--config", "digits_pretrain"],
                 lambda pre: PRETRAIN),
    "finetune_lqf": ("lqf", ["finetune", "--config", "digits_finetune"],
                     lambda pre: [f"--config.pretrained.workdir={pre}",
                                  "--config.data.image_size=8", "--config.shots=2",
                                  "--config.lqf.scope=last_stage",
                                  f"--config.lqf.steps={STEPS}",
                                  "--config.lqf.checkpoint_every=2"]),
    "pc": ("pc", ["train", "--config", "digits_pc"],
           lambda pre: [f"--config.pretrained.workdir={pre}", "--config.shots=2",
                        "--config.old.shots=2", *_train_overrides(pre)]),
    "bct": ("bct", ["train", "--config", "digits_bct"],
            lambda pre: [f"--config.new.pretrained.workdir={pre}", "--config.new.shots=3",
                         "--config.old.shots=3", *_train_overrides(pre)]),
}


def _run(module, args, env=None):
  return subprocess.run([sys.executable, "-m", module, *args, "--no_progress"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, **(env or {})))


def _latest(workdir):
  root = os.path.join(workdir, "checkpoints")
  step = max(int(s) for s in os.listdir(root) if s.isdigit())
  return step, ocp.StandardCheckpointer().restore(os.path.join(root, str(step), "default"))


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_killed_at_a_random_step_and_rerun_ends_bit_for_bit_like_an_uninterrupted_run(
    pretrained, tmp_path, name):
  module, command, overrides = COMMANDS[name]
  args = command + overrides(pretrained)
  kill_at = random.randrange(1, STEPS)
  why = f"(killed after step {kill_at})"
  full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
  # The uninterrupted run and the rerun in this process (the same code as `python -m`,
  # warm caches); only the killed run needs a process of its own.
  main = importlib.import_module(f"{module}.experiments.cli").main
  assert main(args + ["--workdir", full, "--no_progress"]) == 0
  killed = _run(module, args + ["--workdir", cut], {faults.KILL_AT_STEP: str(kill_at)})
  assert killed.returncode == -signal.SIGKILL, (why, killed.stderr)
  assert not os.path.exists(os.path.join(cut, "final_metrics.json")), why
  assert main(args + ["--workdir", cut, "--no_progress"]) == 0, why
  assert json.load(open(os.path.join(full, "final_metrics.json"))) == \
      json.load(open(os.path.join(cut, "final_metrics.json"))), why
  (step_a, a), (step_b, b) = _latest(full), _latest(cut)
  assert step_a == step_b == STEPS
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=why)
  steps = lambda w: [r["step"] for r in MetricsLog(os.path.join(w, "metrics.jsonl")).read()]
  assert steps(full) == steps(cut), why
  # TensorBoard shows the resumed run as the uninterrupted one (timings aside).
  scalars = lambda w: {tag: v for tag, v in read_tensorboard_scalars(
      os.path.join(w, "tensorboard")).items() if not tag.endswith("seconds_per_step")}
  assert scalars(full) == scalars(cut) and scalars(full), why


# --- damaged checkpoints ----------------------------------------------------------------


def _tiny_cfg(*extra):
  return config_lib.load("digits_pretrain",
                         [o.removeprefix("--config.") for o in PRETRAIN] + list(extra))


def _truncate_files(directory):
  for root, _, files in os.walk(directory):
    for f in files:
      path = os.path.join(root, f)
      size = os.path.getsize(path)
      with open(path, "r+b") as fh:
        fh.truncate(size // 2)


def test_a_truncated_latest_checkpoint_falls_back_to_the_one_before(tmp_path, capfd):
  pretrain.pretrain(_tiny_cfg(), str(tmp_path / "full"), progress=False)
  cut = str(tmp_path / "cut")
  pretrain.pretrain(_tiny_cfg(), cut, stop_at_step=5, progress=False)  # Checkpoints 2, 4.
  _truncate_files(os.path.join(cut, "checkpoints", "4"))
  resumed = pretrain.pretrain(_tiny_cfg(), cut, progress=False)
  assert "checkpoint at step 4" in capfd.readouterr().err
  assert resumed == json.load(open(tmp_path / "full" / "final_metrics.json"))
  for x, y in zip(jax.tree.leaves(_latest(str(tmp_path / "full"))[1]),
                  jax.tree.leaves(_latest(cut)[1])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
  cut = str(tmp_path / "cut")
  pretrain.pretrain(_tiny_cfg(), cut, stop_at_step=5, progress=False)
  for step in ("2", "4"):
    _truncate_files(os.path.join(cut, "checkpoints", step))
  with pytest.raises(UserError, match="no checkpoint in .* can be restored"):
    pretrain.pretrain(_tiny_cfg(), cut, progress=False)


def test_a_checkpoint_with_nan_is_refused(tmp_path):
  mgr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mgr, 1, {"w": np.array([1.0, np.nan], np.float32)})
  mgr.wait_until_finished()
  with pytest.raises(UserError, match="holds NaN or infinite values"):
    checkpoint.restore_latest(mgr, {"w": np.zeros(2, np.float32)})
  mgr.close()


def test_metrics_log_skips_a_line_cut_short_by_a_crash(tmp_path):
  log = MetricsLog(str(tmp_path / "m.jsonl"))
  log.write(1, loss=0.5)
  with open(tmp_path / "m.jsonl", "a") as f:
    f.write('{"step": 2, "lo')
  assert [r["step"] for r in log.read()] == [1]
  log.truncate_after(1)
  assert open(tmp_path / "m.jsonl").read() == '{"step": 1, "loss": 0.5}\n'


def test_metrics_log_mirrors_its_records_as_tensorboard_scalars_and_purges_on_resume(
    tmp_path):
  first = MetricsLog(str(tmp_path / "metrics.jsonl"))
  for step in (1, 2, 3):
    first.write(step, split="train", loss=1.0 / step, accuracy=0.1 * step, note="text")
  first.write(2, split="eval", accuracy=0.7)
  first.close()  # A crash after step 3, with the checkpoint of step 2.
  second = MetricsLog(str(tmp_path / "metrics.jsonl"))
  second.truncate_after(2)
  second.write(3, split="train", loss=0.25, accuracy=0.9, note="text")
  second.close()
  # What TensorBoard shows: the resumed step 3 replaces the lost one; text is left out.
  assert read_tensorboard_scalars(second.tensorboard_dir) == {
      "train/loss": {1: 1.0, 2: 0.5, 3: 0.25},
      "train/accuracy": pytest.approx({1: 0.1, 2: 0.2, 3: 0.9}),
      "eval/accuracy": pytest.approx({2: 0.7})}
  assert len(os.listdir(second.tensorboard_dir)) == 2
  # A file cut short mid-record keeps its complete events (one per scalar: the last one
  # written, step 3's accuracy, is lost).
  path = os.path.join(second.tensorboard_dir, sorted(os.listdir(second.tensorboard_dir))[1])
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 3)
  cut = read_tensorboard_scalars(second.tensorboard_dir)
  assert cut["train/loss"] == {1: 1.0, 2: 0.5, 3: 0.25}
  assert cut["train/accuracy"] == pytest.approx({1: 0.1, 2: 0.2})
  assert not MetricsLog(str(tmp_path / "x.jsonl"), tensorboard=False).tensorboard_dir


# --- a workdir of another run -------------------------------------------------------------


def test_another_run_is_replaced_only_with_overwrite(tmp_path):
  workdir = str(tmp_path / "run")
  base = ["pretrain", "--config", "digits_pretrain", "--workdir", workdir,
          "--no_progress", *PRETRAIN, "--config.train.steps=2"]
  first = run_cli(*base)
  assert first.returncode == 0 and "eval accuracy" in first.stdout
  again = run_cli(*base)  # The same command again reuses the finished run.
  assert again.returncode == 0 and again.stdout == first.stdout
  before = {p: os.path.getmtime(os.path.join(workdir, p)) for p in os.listdir(workdir)}
  assert_one_line_error(run_cli(*base, "--config.model.depth=32"),
                        "holds a checkpoint of a different architecture (model.depth differ)")
  other = base + ["--config.train.lr=0.01"]
  assert_one_line_error(run_cli(*other), "--overwrite to replace it")
  assert {p: os.path.getmtime(os.path.join(workdir, p)) for p in os.listdir(workdir)} == before
  # A bad config with --overwrite still leaves the old run alone.
  assert_one_line_error(run_cli(*other, "--overwrite", "--config.train.batch_size=0"),
                        "train.batch_size must be positive")
  assert os.path.exists(os.path.join(workdir, "final_metrics.json"))
  replaced = run_cli(*other, "--overwrite")
  assert replaced.returncode == 0, replaced.stderr
  record = json.load(open(os.path.join(workdir, "config.json")))
  assert record["config"]["train"]["lr"] == 0.01
  steps = [r["step"] for r in MetricsLog(os.path.join(workdir, "metrics.jsonl")).read()
           if r["split"] == "train"]
  assert steps == [1, 2]  # The old run's records are gone, not appended to.


# --- atomic outputs -----------------------------------------------------------------------


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path,
                                                                       monkeypatch):
  from lqf.runtime import io  # pylint: disable=g-import-not-at-top
  path = tmp_path / "final_metrics.json"
  io.atomic_write_json(str(path), {"accuracy": 0.5})

  def crash(fd):
    raise OSError("disk full")

  monkeypatch.setattr(os, "fsync", crash)
  with pytest.raises(OSError, match="disk full"):
    io.atomic_write_json(str(path), {"accuracy": 0.9})
  assert json.load(open(path)) == {"accuracy": 0.5}
  assert os.listdir(tmp_path) == ["final_metrics.json"]


def test_package_code_writes_files_only_through_temporary_names():
  """Every file the library writes goes through lqf/io.py (temporary name, then rename),
  orbax (the same, for checkpoints) or the metrics log (appended lines; a line cut
  short by a crash is skipped when read). A direct write elsewhere fails this test."""
  import re  # pylint: disable=g-import-not-at-top
  direct = re.compile(r"open\([^)]*['\"][wa]b?['\"]|\.savefig\(|np\.save\(|json\.dump\(")
  allowed = {("lqf/runtime/io.py", "open"), ("lqf/runtime/io.py", ".savefig("),
             ("pc/experiments/train.py", "np.save(")}  # it saves to .tmp-old_logits.npy, renames.
  found = []
  for package in ("lqf", "pc", "bct"):
    for root, _, files in os.walk(os.path.join(ROOT, package)):
      for f in files:
        if not f.endswith(".py"):
          continue
        rel = os.path.relpath(os.path.join(root, f), ROOT)
        for m in direct.finditer(open(os.path.join(root, f)).read()):
          token = "open" if m.group().startswith("open") else m.group()
          if (rel, token) not in allowed:
            found.append(f"{rel}: {m.group()}")
  assert not found, found
