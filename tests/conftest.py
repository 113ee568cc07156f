"""Strict, hermetic test settings.

Eight fake CPU devices (set before jax is imported) so sharded code can be tested on one
machine, and a private TFDS data directory so tests never read or write the user's.
A private persistent compilation cache lets the many trainings of one tiny model reuse
their compiled steps (a second training's compile drops from about 10 s to 3 s); the
environment variables carry it to the CLI subprocesses and notebook kernels too.
"""

import atexit
import os
import shutil
import tempfile

# The tests' programs are tiny and compiled once or twice each: compile time, not run time,
# is most of the suite's time. Skipping LLVM's expensive passes cut the user CPU time of a
# multi-device test by 40% (tests/test_parallel.py's LQF comparison: 87 s to 52 s). XLA's
# older CPU emitters compile these programs in 40% of the new fusion emitters' time
# (tests/test_linearize.py: backend compile 41 s to 16 s, wall 86 s to 49 s).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true"
                           " --xla_cpu_use_fusion_emitters=false").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# `make test` runs two pytest-xdist workers; they inherit the cache of the process that
# started them (which removes it at exit) and share it.
_CACHE = os.environ.get("GRACEFUL_TEST_JAX_CACHE", "")
if not _CACHE:
  _CACHE = tempfile.mkdtemp(prefix="graceful-jax-cache-")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["GRACEFUL_TEST_JAX_CACHE"] = _CACHE
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def tfds_data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  os.environ["TFDS_DATA_DIR"] = path
  yield path


@pytest.fixture
def tiny_config():
  """The digits pretraining config shrunk to run in seconds."""
  from lqf.experiments.configs import digits_pretrain as mod
  cfg = mod.get_config()
  cfg.model.width = 4
  cfg.model.depth = 8
  cfg.data.image_size = 8
  cfg.train.update(dict(steps=6, batch_size=32, warmup_steps=1, checkpoint_every=2,
                        eval_every=3, log_every=1))
  return cfg


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
  """A finished digits pretraining run of `cli_helpers.TINY_PRETRAIN`: the workdir."""
  from lqf.experiments import pretrain
  from lqf.runtime import config as config_lib
  workdir = str(tmp_path_factory.mktemp("pre"))
  from cli_helpers import TINY_PRETRAIN
  cfg = config_lib.load("digits_pretrain", list(TINY_PRETRAIN))
  pretrain.pretrain(cfg, workdir, progress=False)
  return workdir


# Longest first: with two xdist workers, README's command blocks, the notebooks (one worker
# runs them all) and the end-to-end benchmarks and crash tests start early instead of
# leaving a worker idle at the end.
_FIRST = ("test_readme.py", "test_notebooks.py", "test_bench.py", "test_crash.py",
          "test_parallel.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(_FIRST)))
