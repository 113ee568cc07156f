"""Installed, not only cloned: the wheel carries the configs and the console scripts work.

The wheel is built offline (no build isolation: the project venv's setuptools) from a copy
of the sources, installed into a fresh venv, and its commands are run from a directory
outside the repository. The fresh venv borrows the project venv's dependencies through one
`.pth` line naming that site-packages directory: a directory named in a `.pth` file joins
sys.path, but its own `.pth` files are not processed, so the editable-install finder of the
repository that lives there is never activated. The test checks that it is not.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("graceful-lqf", "graceful-pc", "graceful-bct")
CONFIGS = ("lqf/experiments/configs/digits_pretrain.py", "pc/experiments/configs/digits_pc.py",
           "bct/experiments/configs/digits_bct.py")
TINY = ["--config.model.width=4", "--config.model.depth=8", "--config.data.image_size=8",
        "--config.train.steps=2",
        "--config.train.batch_size=16", "--config.train.checkpoint_every=2",
        "--config.train.eval_every=2", "--config.train.log_every=1"]


def _run(cmd, cwd, env=None, timeout=300):
  return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _check(proc):
  assert proc.returncode == 0, f"{proc.args}\n{proc.stdout}\n{proc.stderr}"
  return proc.stdout


def _build_wheel(tmp_path):
  """`pip wheel` from a copy of what the wheel is made of, so no stale build/ is reused."""
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, name), src / name)
  for pkg in ("lqf", "pc", "bct"):
    shutil.copytree(os.path.join(ROOT, pkg), src / pkg,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  out = tmp_path / "dist"
  _check(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
               "--no-index", "-q", "-w", out, src], cwd=tmp_path))
  wheels = list(out.glob("graceful-*.whl"))
  assert len(wheels) == 1, wheels
  return wheels[0]


def _fresh_venv(tmp_path):
  """A venv without graceful that sees the project venv's dependencies: its python."""
  venv = tmp_path / "venv"
  _check(_run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path))
  python = venv / "bin" / "python"
  site = _check(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path)).strip()
  deps = sysconfig.get_paths()["purelib"]
  assert os.path.realpath(site) != os.path.realpath(deps)
  with open(os.path.join(site, "graceful-deps.pth"), "w") as f:
    f.write(deps + "\n")
  return venv, python


@pytest.mark.slow
@pytest.mark.xdist_group("install")
def test_wheel_installs_and_runs_outside_the_repository(tmp_path, tfds_data_dir):
  wheel = _build_wheel(tmp_path)
  names = zipfile.ZipFile(wheel).namelist()
  for config in CONFIGS:
    assert config in names, config
  assert not [n for n in names if n.startswith("tests/") or "/tests/" in n]
  assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]

  venv, python = _fresh_venv(tmp_path)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env["TFDS_DATA_DIR"] = tfds_data_dir
  where = [python, "-c", "import lqf, pc, bct; print(lqf.__file__, pc.__file__, bct.__file__)"]

  # Before the wheel: the dependencies import, graceful does not (no editable finder leaked).
  _check(_run([python, "-c", "import jax, flax, ml_collections"], cwd=elsewhere, env=env))
  before = _run(where, cwd=elsewhere, env=env)
  assert before.returncode != 0 and "ModuleNotFoundError" in before.stderr, before

  # pip of the project venv, run for the fresh venv's python (which has no pip of its own).
  _check(_run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
               "--no-index", "-q", wheel], cwd=elsewhere, env=env))
  for path in _check(_run(where, cwd=elsewhere, env=env)).split():
    path = os.path.realpath(path)
    assert path.startswith(os.path.realpath(venv) + os.sep), path
    assert not path.startswith(os.path.realpath(ROOT) + os.sep), path

  bin_dir = venv / "bin"
  for command in COMMANDS:
    out = _check(_run([bin_dir / command, "--help"], cwd=elsewhere, env=env))
    assert "usage:" in out, out

  _check(_run([bin_dir / "graceful-lqf", "pretrain", "--config", "digits_pretrain",
               "--workdir", "run", "--no_progress", *TINY], cwd=elsewhere, env=env))
  assert (elsewhere / "run" / "final_metrics.json").is_file()
