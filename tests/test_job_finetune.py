"""The fine-tuning job end to end on a tiny pretrained model."""

import json
import os

from cli_helpers import assert_one_line_error, run_cli, tiny_finetune_config
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lqf.errors import UserError
from lqf.experiments import finetune as job_finetune


def _cfg(pretrained, *extra):
  return tiny_finetune_config(pretrained, "last_stage", *extra)


def _delta(workdir, step):
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), "default"))["delta"]


def test_lqf_interrupted_and_resumed_equals_uninterrupted(pretrained, tmp_path):
  full = job_finetune.run(_cfg(pretrained), str(tmp_path / "full"), progress=False)
  assert job_finetune.run(_cfg(pretrained), str(tmp_path / "cut"), stop_at_step=3,
                          progress=False) == {}
  assert not (tmp_path / "cut" / "final_metrics.json").exists()
  resumed = job_finetune.run(_cfg(pretrained), str(tmp_path / "cut"), progress=False)
  assert resumed == full
  a, b = _delta(tmp_path / "full", 4), _delta(tmp_path / "cut", 4)
  import jax
  jax.tree.map(np.testing.assert_array_equal, a, b)
  steps = [json.loads(l)["step"] for l in open(tmp_path / "cut" / "metrics.jsonl")]
  assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("method", ["nonlinear", "probe"])
def test_other_methods_write_their_metrics(pretrained, tmp_path, method):
  result = job_finetune.run(_cfg(pretrained, f"method={method}"), str(tmp_path), progress=False)
  assert result["method"] == method and result["eval"]["count"] == 600
  assert json.load(open(tmp_path / "final_metrics.json")) == result


def test_mismatched_channels_are_refused(pretrained, tmp_path):
  cfg = _cfg(pretrained, "data.channels=3", "data.mean=(0.3, 0.3, 0.3)",
             "data.std=(0.4, 0.4, 0.4)")
  with pytest.raises(UserError, match="pretrained on 1-channel images"):
    job_finetune.run(cfg, str(tmp_path / "w"), progress=False)
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("override, match", [
    ("lqf.k=0", "lqf.k (the target scale) must be positive"),
    ("lqf.lam=-1", "lqf.lam (the ridge weight) must be ≥ 0"),
    ("lqf.damping=0", "lqf.damping must be positive"),
    ("method=magic", "unknown method 'magic'"),
    ("data.augment.crop_padding=2", "lqf computes the frozen prefix once per image"),
    ("pretrained.workdir=/nonexistent/run", "no pretraining run in '/nonexistent/run'"),
])
def test_cli_errors(pretrained, tmp_path, override, match):
  workdir = tmp_path / "w"
  args = ["finetune", "--config", "digits_finetune", "--workdir", str(workdir),
          f"--config.pretrained.workdir={pretrained}", f"--config.{override}"]
  assert_one_line_error(run_cli(*args), match)
  assert not workdir.exists()
