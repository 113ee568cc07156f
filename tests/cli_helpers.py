"""Running `python -m lqf` (or `pc`) as a user does, checking its one-line errors, and the
tiny settings that the job tests share."""

import contextlib
import importlib
import io
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_process(*args, cwd=ROOT, module="lqf"):
  """`python -m MODULE ARGS` in a process of its own (for what only a real process
  shows: its exit status through `__main__`, being killed, running beside another)."""
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ))


def run_cli(*args, module="lqf"):
  """`python -m MODULE ARGS` through the same `main` in this process, which saves a
  process start and the imports (5 s a call here): the exit status `main` returns (or
  argparse's SystemExit) and what it printed. An exception that `main` lets through
  fails the test, as a traceback would."""
  cli = importlib.import_module(f"{module}.experiments.cli")
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      code = cli.main(list(args))
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else 1
  return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


def assert_one_line_error(proc, match):
  """Exit code 2, no traceback, exactly one `error:` line, which contains `match`."""
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and match in lines[0], proc.stderr


# The session's `pretrained` run (conftest.py): a 12-step, 4-channel ResNet-8 on 8×8
# digits, 35% accurate. At 4 steps it was at chance, which left PC's fitted logit scale
# negative (a refused old model) and K-FAC steps on its head ill-conditioned.
TINY_PRETRAIN = ("model.width=4", "model.depth=8", "data.image_size=8", "train.steps=12",
                 "train.batch_size=32", "train.checkpoint_every=12", "train.eval_every=12",
                 "train.log_every=12")


def tiny_finetune_config(pretrained, scope, *extra):
  """`digits_finetune` on 2 shots of 8×8 images from the run in `pretrained`, every arm a
  few steps long."""
  from lqf.runtime import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load("digits_finetune", [
      f"pretrained.workdir={pretrained}", "data.image_size=8", "shots=2",
      f"lqf.scope={scope}", "lqf.steps=4", "lqf.checkpoint_every=2",
      "finetune.steps=4", "finetune.checkpoint_every=2", "finetune.log_every=1",
      "finetune.eval_every=4", "probe.steps=20", *extra])
