"""The BCT jobs end to end on a tiny pretrained model."""

import json

from cli_helpers import assert_one_line_error, run_cli
import numpy as np
import pytest

from bct.experiments import curve as job_curve
from bct.experiments import train as job
from bct.experiments.bench import SPECS
from lqf.errors import UserError
from lqf.experiments import finetune as job_finetune
from lqf.experiments import pretrain
from lqf.runtime import config as config_lib


def _overrides(pretrained, *, old=None):
  out = [f"{s}.pretrained.workdir={pretrained}" for s in SPECS]
  if old:
    out.append(f"old.pretrained.workdir={old}")
  return out + [
      "data.image_size=8", "new.shots=3", "old.shots=3", "old.finetune.steps=3",
      "train.steps=4", "train.checkpoint_every=2", "train.log_every=1",
      "train.eval_every=4", "curve.rhos=(0.0,0.5,1.0)", "term.batch_size=16"]


def _cfg(pretrained, *extra, old=None):
  return config_lib.load("digits_bct",
                         _overrides(pretrained, old=old) + list(extra))


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
  """A finished tiny pretraining run of width 2 (an 8-dimensional embedding, against
  the `pretrained` run's 16)."""
  workdir = str(tmp_path_factory.mktemp("narrow"))
  cfg = config_lib.load("digits_pretrain", [
      "model.width=2", "model.depth=8", "data.image_size=8", "train.steps=2", "train.batch_size=32",
      "train.checkpoint_every=2", "train.eval_every=2", "train.log_every=2"])
  pretrain.pretrain(cfg, workdir, progress=False)
  return workdir


def test_interrupted_and_resumed_equals_uninterrupted(pretrained, narrow, tmp_path):
  full = job.run(_cfg(pretrained, old=narrow), str(tmp_path / "full"), progress=False)
  assert job.run(_cfg(pretrained, old=narrow), str(tmp_path / "cut"), stop_at_step=3,
                 progress=False) == {}
  assert not (tmp_path / "cut" / "final_metrics.json").exists()
  assert job.run(_cfg(pretrained, old=narrow), str(tmp_path / "cut"), progress=False) == full
  assert set(full["retrieval"]) == {"old/old", "new/old", "new/new"}
  for row in full["retrieval"].values():
    assert 0 <= row["top1"] <= row["top5"] <= 1 and row["queries"] + row["skipped"] == 600
  assert json.load(open(tmp_path / "full" / "final_metrics.json")) == full
  lines = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
  assert [l["step"] for l in lines if l["split"] == "train"] == [1, 2, 3, 4]


def test_eval_reads_a_finished_run_and_reports_the_update_gain(pretrained, tmp_path):
  for method in ("bct", "independent"):
    job.run(_cfg(pretrained, f"bct.method={method}"), str(tmp_path / method), progress=False)
  trained = json.load(open(tmp_path / "bct" / "final_metrics.json"))
  proc = run_cli("eval", "--workdir", str(tmp_path / "bct"), "--independent",
                 str(tmp_path / "independent"), module="bct")
  assert proc.returncode == 0, proc.stderr
  assert "new/old" in proc.stdout and "independent/independent" in proc.stdout
  result = job.evaluate_run(str(tmp_path / "bct"), str(tmp_path / "independent"))
  assert result["retrieval"]["new/old"] == trained["retrieval"]["new/old"]
  t = result["retrieval"]
  for m in ("top1", "mAP"):
    base = t["independent/independent"][m] - t["old/old"][m]
    assert result["update_gain"][m] == (
        pytest.approx((t["new/old"][m] - t["old/old"][m]) / base) if base > 0 else None)
  assert "update gain (top1)" in proc.stdout


def test_a_bct_run_is_an_old_model_for_the_next_update(pretrained, tmp_path):
  job.run(_cfg(pretrained, "new.classes=(0,1,2,3,4,5,6,7)"), str(tmp_path / "v2"),
          progress=False)
  result = job.run(_cfg(pretrained, f"old.workdir={tmp_path / 'v2'}"), str(tmp_path / "v3"),
                   progress=False)
  _, v2 = job.load_model(str(tmp_path / "v2"))
  assert v2.classes == tuple(range(8)) and v2.head[0].shape[1] == 8
  assert result["retrieval"]["old/old"]["queries"] == 600
  # The v2 model knows labels 0-7: a new model on 0-3 cannot be trained against it.
  with pytest.raises(UserError, match="does not have"):
    job.run(_cfg(pretrained, f"old.workdir={tmp_path / 'v2'}", "new.classes=(0,1,2,3)"),
            str(tmp_path / "bad"), progress=False)
  assert not (tmp_path / "bad").exists()


def test_l2_regression_trains_against_the_old_embedding(pretrained, narrow, tmp_path):
  result = job.run(_cfg(pretrained, "bct.method=l2", old=narrow), str(tmp_path),
                   progress=False)
  assert result["method"] == "l2"


def test_curve_writes_json_csv_png(pretrained, tmp_path):
  doc = job_curve.run(_cfg(pretrained), str(tmp_path))
  for name in ("curve.json", "curve.csv", "curve.png"):
    assert (tmp_path / name).stat().st_size > 0
  rows = open(tmp_path / "curve.csv").read().splitlines()
  assert rows[0].startswith("rho,new/new top1,new/old top1") and len(rows) == 4
  assert [p["rho"] for p in doc["points"]] == [0.0, 0.5, 1.0]
  objectives = [p["objective"] for p in doc["points"]]
  assert all(np.isfinite(objectives))
  assert "new/old top1" in job_curve.format_table(doc)


@pytest.mark.parametrize("override, match", [
    ("bct.method=magic", "unknown bct.method 'magic'"),
    ("bct.dim_rule=none", "no rule maps one onto the other"),
    ("old.classes=(0,11)", "old.classes must be distinct labels in [0, 10)"),
    ("train.lr=0", "train.lr must be positive"),
    ("old.workdir=/nonexistent/run", "no run in '/nonexistent/run'"),
])
def test_cli_errors(pretrained, narrow, tmp_path, override, match):
  workdir = tmp_path / "w"
  args = ["train", "--config", "digits_bct", "--workdir", str(workdir),
          *[f"--config.{o}" for o in _overrides(pretrained, old=narrow)],
          f"--config.{override}"]
  assert_one_line_error(run_cli(*args, module="bct"), match)
  assert not workdir.exists()


# The benchmark itself runs as README.md gives it (tests/test_readme.py checks its JSON).

def test_a_chain_constrained_by_every_predecessor(pretrained):
  from bct.experiments import bench
  cfg = config_lib.to_dict(_cfg(pretrained, "bench.chain.mode=all", "train.steps=2"))
  data, evaluation = job.load_data(cfg)
  v1 = job.old_model(cfg, data.num_classes)
  table = bench.chain_matrix(cfg, data, evaluation, v1, seed=0)
  assert set(table) == {f"{q}/{g}" for q in ("v1", "v2", "v3") for g in ("v1", "v2", "v3")}
  # v1's own row is the old model's retrieval, whatever came after it.
  assert table["v1/v1"] == job.cross_retrieval(cfg, {"old": v1}, evaluation,
                                               [("old", "old")])["old/old"]


def test_old_model_loaded_from_a_nonlinear_finetuning_run(pretrained, tmp_path):
  """README advertises `--config.old.workdir=<a nonlinear lqf finetune run>`; the old
  model is that run's network, its embedding the one the run trained."""
  ft = config_lib.load("digits_finetune", [
      f"pretrained.workdir={pretrained}", "data.image_size=8", "shots=2", "method=nonlinear",
      "finetune.steps=3", "finetune.checkpoint_every=3", "finetune.eval_every=3"])
  job_finetune.run(ft, str(tmp_path / "old"), progress=False)
  run_cfg, model = job.load_model(str(tmp_path / "old"))
  assert run_cfg["method"] == "nonlinear" and model.classes == tuple(range(10))
  restored = pretrain.restore_final(
      job.new_classifier({"pretrained": {"workdir": pretrained}}, 10, 1, 0, {"head": "linear"}),
      ft.finetune, str(tmp_path / "old"))
  images = np.zeros((2, 8, 8, 1), np.float32)
  np.testing.assert_allclose(model.embed(images), restored.features(
      restored.params, restored.batch_stats, images), rtol=1e-5, atol=1e-6)
  result = job.run(_cfg(pretrained, f"old.workdir={tmp_path / 'old'}", "bct.method=independent"),
                   str(tmp_path / "new"), progress=False)
  assert set(result["retrieval"]) == {"old/old", "new/old", "new/new"}
