"""The exact-solve job and the fine-tuning job's optimality gap, on a tiny model."""

import json

from cli_helpers import assert_one_line_error, run_cli
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lqf.experiments import finetune as job_finetune
from lqf.experiments import pretrain
from lqf.experiments import solve as job_solve
from lqf.runtime import config as config_lib


def _cfg(pretrained, *extra):
  return config_lib.load("digits_finetune", [
      f"pretrained.workdir={pretrained}", "data.image_size=8", "shots=2",
      "lqf.scope=last_stage", "lqf.steps=40", "lqf.checkpoint_every=40", *extra])


def test_solvers_agree_and_training_approaches_the_optimum(pretrained, tmp_path):
  # Unpreconditioned: on this 4-channel model K-FAC's factors miss so much curvature
  # that preconditioned CG needs more than 3000 iterations against 273 without.
  by_cg = job_solve.run(_cfg(pretrained, "solve.method=cg", "solve.float64=True",
                             "solve.tol=1e-9", "solve.precondition=False"),
                        str(tmp_path / "cg"), progress=False)
  by_kernel = job_solve.run(_cfg(pretrained, "solve.method=kernel"), str(tmp_path / "k"),
                            progress=False)
  assert by_cg["converged"] and by_cg["iterations"] > 0
  # The kernel solve's Jacobian is float32: agreement to 1e-4 (measured: 8.5e-6).
  assert by_cg["objective"] == pytest.approx(by_kernel["objective"], rel=1e-4)
  assert json.load(open(tmp_path / "cg" / "solution.json")) == by_cg
  a = ocp.StandardCheckpointer().restore(str(tmp_path / "cg" / "solution" / "0" / "default"))
  b = ocp.StandardCheckpointer().restore(str(tmp_path / "k" / "solution" / "0" / "default"))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5),
               a["delta"], b["delta"])
  # Training with K-FAC reports its gap to that optimum; it is small and non-negative.
  trained = job_finetune.run(_cfg(pretrained, "lqf.report_gap=True"), str(tmp_path / "ft"),
                             progress=False)
  o = trained["optimality"]
  assert o["optimum"] == pytest.approx(by_kernel["objective"], rel=1e-6)
  # A lower bound (up to float32) that training approaches: far below δ = 0's gap.
  import jax.numpy as jnp

  from lqf import finetune, linearize
  from lqf.data import pipeline
  cfg = _cfg(pretrained)
  pre_cfg, pre = pretrain.load_pretrained(pretrained)
  data = pipeline.load_split(cfg.data, cfg.data.train_split, corrupted=True, shots=2,
                             subset_seed=0)
  clf = finetune.with_new_head(pre, pre_cfg["model"], 10, 1, 0)
  zero = jax.tree.map(jnp.zeros_like, linearize.linearized_subtree(clf.params, "last_stage"))
  _, gap0 = finetune.gap_of(clf, data.images, data.labels, 10, cfg.lqf, zero, o["optimum"])
  assert -1e-4 <= o["relative_gap"] < gap0 / 10
  assert json.load(open(tmp_path / "ft" / "final_metrics.json"))["optimality"] == o


@pytest.mark.parametrize("override, match", [
    ("lqf.loss=ce", "the exact solvers need the squared loss"),
    ("solve.method=lu", "unknown solve.method 'lu'"),
    ("solve.tol=0", "solve.tol must be positive"),
    ("solve.max_gb=1e-9", "use --config.solve.method=cg"),
])
def test_solve_cli_errors(pretrained, tmp_path, override, match):
  workdir = tmp_path / "w"
  extra = ["--config.solve.method=kernel"] if "max_gb" in override else []
  args = ["solve", "--config", "digits_finetune", "--workdir", str(workdir),
          f"--config.pretrained.workdir={pretrained}", "--config.data.image_size=8",
          f"--config.{override}", *extra]
  assert_one_line_error(run_cli(*args), match)
  assert not workdir.exists()
