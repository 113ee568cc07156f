"""Data parallelism: every trainer on 8 (fake CPU) devices computes what it computes on
one, checkpoints move between layouts, and two processes train like one.

Tolerance: the sharded step sums gradients, batch-norm statistics and K-FAC factors in
another order than one device does, so float32 results differ in the last bits and the
differences grow over a few steps; 1e-4 (absolute and relative) holds with a wide
margin on these runs.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

from cli_helpers import ROOT
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lqf.errors import UserError
from lqf.experiments import finetune as job_finetune
from lqf.experiments import pretrain
from lqf.experiments import solve as job_solve
from lqf.runtime import checkpoint
from lqf.runtime import config as config_lib
from lqf.runtime import parallel

TOL = dict(rtol=1e-4, atol=1e-4)


def _latest_state(workdir, sub="checkpoints"):
  """The weights of the latest checkpoint (the optimiser's internals are left out: K-FAC's
  curvature factors are sums of thousands of products and only agree to about 1e-4)."""
  root = os.path.join(workdir, sub)
  step = max(int(s) for s in os.listdir(root) if s.isdigit())
  state = ocp.StandardCheckpointer().restore(os.path.join(root, str(step), "default"))
  return {k: v for k, v in state.items() if k != "opt_state"}


def _assert_close(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL,
                               err_msg=jax.tree_util.keystr(path))


def _assert_results_close(a, b):
  """Nested results: numbers within TOL, everything else equal."""
  if isinstance(a, dict):
    assert a.keys() == b.keys()
    for k in a:
      _assert_results_close(a[k], b[k])
  elif isinstance(a, float):
    assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
  elif isinstance(a, list) and a and isinstance(a[0], float):
    np.testing.assert_allclose(a, b, **TOL)
  else:
    assert a == b


def _load(name, *overrides):
  return config_lib.load(name, list(overrides))


def test_make_mesh_and_batch_checks():
  assert parallel.make_mesh(0).size == jax.device_count() == 8
  assert parallel.make_mesh(2).devices.tolist() == jax.devices()[:2]
  with pytest.raises(UserError, match="sees 8 device"):
    parallel.make_mesh(9)
  with pytest.raises(UserError, match="does not split over the 8 devices"):
    parallel.check_batch(20, parallel.make_mesh(8), "the batch size")
  cfg = {"parallel": config_lib.parallel_config(devices=1)}
  assert parallel.mesh_for(cfg) is None  # One device: the unsharded path.


def test_shard_batch_splits_rows_and_replicate_copies():
  mesh = parallel.make_mesh(8)
  x = np.arange(32.0).reshape(16, 2)
  sharded = parallel.shard_batch(x, mesh)
  assert [s.data.shape for s in sharded.addressable_shards] == [(2, 2)] * 8
  np.testing.assert_array_equal(np.asarray(sharded), x)
  rep = parallel.replicate({"w": x}, mesh)["w"]
  assert all(s.data.shape == (16, 2) for s in rep.addressable_shards)
  np.testing.assert_array_equal(parallel.to_host(rep), x)
  np.testing.assert_array_equal(parallel.to_host(sharded), x)  # Gathered, not one shard.


# --- every trainer, 8 devices against 1 ----------------------------------------------


def _pretrain(workdir, *extra):
  cfg = _load("digits_pretrain", "model.width=4", "model.depth=8", "data.image_size=8",
              "train.steps=4",
              "train.batch_size=32", "train.checkpoint_every=2", "train.eval_every=4",
              "train.log_every=1", *extra)
  return pretrain.pretrain(cfg, workdir, progress=False)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """The tiny pretraining run on one device: (workdir, final metrics)."""
  workdir = str(tmp_path_factory.mktemp("one") / "run")
  return workdir, _pretrain(workdir)


def _finetune_cfg(pretrained, *extra):
  return _load("digits_finetune", f"pretrained.workdir={pretrained}", "data.image_size=8",
               "shots=4", "lqf.scope=last_stage", "lqf.steps=3", "lqf.checkpoint_every=3",
               "finetune.steps=3", "finetune.checkpoint_every=3", "finetune.log_every=1",
               "finetune.eval_every=3", *extra)


def test_lqf_finetuning_on_8_devices_equals_one(pretrained, tmp_path):
  # Nonlinear fine-tuning is `train.fit`, as pretraining, PC and BCT below. With the
  # configs' damping (1e-3) K-FAC's adaptive step amplifies the sums' rounding on this
  # tiny problem: the head bias of 8 devices ended 9e-5 from one device's (5.7e-4 with
  # XLA's older CPU emitters); at 0.1 every weight agrees to 4e-7.
  runs = {}
  for n in (1, 8):
    cfg = _finetune_cfg(pretrained, "method=lqf", f"parallel.devices={n}",
                        "lqf.damping=0.1")
    runs[n] = job_finetune.run(cfg, str(tmp_path / str(n)), progress=False)
  _assert_results_close(runs[1], runs[8])
  _assert_close(_latest_state(str(tmp_path / "1")), _latest_state(str(tmp_path / "8")))


def test_exact_solvers_data_passes_on_8_devices_equal_one(pretrained, tmp_path):
  # In float64. CG's iterates are chaotic in the rounding of its sums (matrix-vector
  # products agree to 1e-15, yet 30 iterations on this ill-conditioned problem end 3e-4
  # apart), so its comparison stops after 5 iterations; the kernel solve is direct.
  out = {}
  for n in (1, 8):  # The `solve` command, CG.
    cfg = _finetune_cfg(pretrained, f"parallel.devices={n}", "solve.method=cg",
                        "solve.float64=True", "solve.max_iters=5", "solve.batch_size=12")
    out[n] = job_solve.run(cfg, str(tmp_path / f"cg{n}"), progress=False)
  assert out[1]["objective"] == pytest.approx(out[8]["objective"], rel=1e-6)
  assert out[1]["eval"] == out[8]["eval"] and out[1]["iterations"] == out[8]["iterations"]
  _assert_close(_latest_state(str(tmp_path / "cg1"), "solution"),
                _latest_state(str(tmp_path / "cg8"), "solution"))
  # The kernel solve, through the function the command calls.
  cfg = _finetune_cfg(pretrained, "solve.method=kernel", "solve.float64=True",
                      "solve.batch_size=12")
  pre_cfg, clf = job_finetune.load_pretrained_for(cfg)
  from lqf import finetune  # pylint: disable=g-import-not-at-top
  from lqf.data import pipeline  # pylint: disable=g-import-not-at-top
  data = pipeline.load_split(cfg.data, cfg.data.train_split, corrupted=True, shots=4)
  clf = finetune.with_new_head(clf, pre_cfg["model"], data.num_classes, 1, 0)
  sols = [finetune.exact_optimum(clf, data.images, data.labels, data.num_classes, cfg.lqf,
                                  cfg.solve, mesh=mesh)[0]
          for mesh in (None, parallel.make_mesh(8))]
  assert sols[0].objective == pytest.approx(sols[1].objective, rel=1e-6)
  _assert_close(sols[0].delta, sols[1].delta)


def _pc_overrides(pretrained):
  return [f"pretrained.workdir={pretrained}", f"old.pretrained.workdir={pretrained}",
          "shots=4", "old.shots=4"]


def _bct_overrides(pretrained):
  return [f"new.pretrained.workdir={pretrained}", f"old.pretrained.workdir={pretrained}",
          "new.shots=4", "old.shots=8"]


@pytest.mark.parametrize("package,config,overrides", [
    ("pc", "digits_pc", _pc_overrides), ("bct", "digits_bct", _bct_overrides)])
def test_pc_and_bct_training_on_8_devices_equals_one(pretrained, tmp_path, package, config,
                                                     overrides):
  import importlib  # pylint: disable=g-import-not-at-top
  job = importlib.import_module(f"{package}.experiments.train")
  runs = {}
  for n in (1, 8):
    cfg = _load(config, *overrides(pretrained), "data.image_size=8", "old.finetune.steps=2",
                "train.steps=3", "train.checkpoint_every=3", "train.log_every=1",
                "train.eval_every=3", f"parallel.devices={n}")
    runs[n] = job.run(cfg, str(tmp_path / str(n)), progress=False)
  _assert_results_close(runs[1], runs[8])
  _assert_close(_latest_state(str(tmp_path / "1")), _latest_state(str(tmp_path / "8")))


def test_a_batch_that_does_not_split_is_refused_before_anything_is_written(pretrained,
                                                                           tmp_path):
  cfg = _finetune_cfg(pretrained, "method=nonlinear", "shots=3", "parallel.devices=8")
  with pytest.raises(UserError, match="does not split over the 8 devices"):
    job_finetune.run(cfg, str(tmp_path / "w"), progress=False)
  assert not (tmp_path / "w" / "checkpoints").exists()


# --- checkpoints across layouts ---------------------------------------------------------


def test_a_state_saved_on_8_devices_restores_on_2_and_1(tmp_path):
  state = {"params": {"w": np.arange(24.0, dtype=np.float32).reshape(4, 6)},
           "step": np.int32(3)}
  mgr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mgr, 3, parallel.replicate(state, parallel.make_mesh(8)))
  mgr.wait_until_finished()
  for n in (2, 1):
    mesh = parallel.make_mesh(n)
    like = parallel.replicate(jax.tree.map(np.zeros_like, state), mesh)
    restored, step = checkpoint.restore_latest(mgr, like)
    assert step == 3
    w = restored["params"]["w"]
    assert w.sharding.mesh.devices.size == n and len(w.addressable_shards) == n
    np.testing.assert_array_equal(np.asarray(w), state["params"]["w"])
  mgr.close()


def test_pretraining_on_8_then_2_then_1_devices_equals_one_device(one_device, tmp_path):
  # Pretraining on 8 devices against one, and checkpoints moving between layouts.
  cut = str(tmp_path / "cut")
  _pretrain(cut, "parallel.devices=8", "train.checkpoint_every=1", "train.steps=4")
  # The checkpoints of the 8-device run are rewound to step 1, then the run goes on on 2
  # devices to step 3 and on one to the end.
  for step in (4, 3, 2):
    shutil.rmtree(os.path.join(cut, "checkpoints", str(step)))
  cfg_cut = ["parallel.devices=2", "train.checkpoint_every=1"]
  pretrain.pretrain(_load("digits_pretrain", "model.width=4", "model.depth=8", "data.image_size=8",
                       "train.steps=4", "train.batch_size=32", "train.eval_every=4",
                       "train.log_every=1", *cfg_cut), cut, stop_at_step=3, progress=False)
  assert sorted(int(s) for s in os.listdir(os.path.join(cut, "checkpoints"))) == [1, 2, 3]
  resumed = _pretrain(cut, "train.checkpoint_every=1")
  _assert_results_close(one_device[1], resumed)
  _assert_close(_latest_state(one_device[0]), _latest_state(cut))


# --- two processes ------------------------------------------------------------------------


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_of_4_devices_train_like_one_process(one_device, tmp_path):
  port = _free_port()
  # Four devices each; conftest's other XLA flags (its cheap compiles) are kept.
  env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace(
      "--xla_force_host_platform_device_count=8", "--xla_force_host_platform_device_count=4"))
  assert "device_count=4" in env["XLA_FLAGS"]
  base = [sys.executable, "-m", "lqf", "pretrain", "--config", "digits_pretrain",
          "--workdir", str(tmp_path / "two"), "--no_progress", "--config.model.width=4",
          "--config.model.depth=8",
          "--config.data.image_size=8", "--config.train.steps=4",
          "--config.train.batch_size=32", "--config.train.checkpoint_every=2",
          "--config.train.eval_every=4", "--config.train.log_every=1",
          "--config.parallel.devices=0", "--config.parallel.distributed=True",
          f"--config.parallel.coordinator=localhost:{port}",
          "--config.parallel.num_processes=2"]
  procs = [subprocess.Popen(base + [f"--config.parallel.process_id={i}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err
  _assert_results_close(one_device[1], json.load(open(tmp_path / "two" / "final_metrics.json")))
  # Restored through the library, which hands orbax the layout of this process.
  _, a = pretrain.load_pretrained(one_device[0])
  _, b = pretrain.load_pretrained(str(tmp_path / "two"))
  _assert_close((a.params, a.batch_stats), (b.params, b.batch_stats))
  # Only the first process writes the metrics: each step once.
  steps = [json.loads(l)["step"] for l in open(tmp_path / "two" / "metrics.jsonl")
           if json.loads(l)["split"] == "train"]
  assert steps == [1, 2, 3, 4]
