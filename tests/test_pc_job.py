"""The PC jobs end to end on a tiny pretrained model."""

import json

from cli_helpers import ROOT, assert_one_line_error, run_cli
import numpy as np
import pytest

from lqf.errors import UserError
from lqf.experiments import finetune as job_finetune
from lqf.runtime import config as config_lib
from pc import metrics
from pc.experiments import curve as job_curve
from pc.experiments import train as job


def _overrides(pretrained):
  return [f"pretrained.workdir={pretrained}", f"old.pretrained.workdir={pretrained}",
          "data.image_size=8", "shots=2", "old.shots=2", "old.finetune.steps=3",
          "train.steps=4", "train.checkpoint_every=2", "train.log_every=1",
          "train.eval_every=4", "pc.ensemble_size=2", "curve.rhos=(0.0,0.5,1.0)",
          "curve.references=('none',)"]


def _cfg(pretrained, *extra):
  return config_lib.load("digits_pc",
                         _overrides(pretrained) + list(extra))


def test_interrupted_and_resumed_equals_uninterrupted(pretrained, tmp_path):
  full = job.run(_cfg(pretrained), str(tmp_path / "full"), progress=False)
  assert job.run(_cfg(pretrained), str(tmp_path / "cut"), stop_at_step=3,
                 progress=False) == {}
  assert not (tmp_path / "cut" / "final_metrics.json").exists()
  resumed = job.run(_cfg(pretrained), str(tmp_path / "cut"), progress=False)
  assert resumed == full
  r = full["eval"]["rates"]
  assert r["ER_new"] - r["ER_old"] == pytest.approx(r["NFR"] - r["PFR"], abs=1e-12)
  assert len(full["eval"]["negative_flips"]) == full["eval"]["counts"]["negative_flips"]
  assert json.load(open(tmp_path / "full" / "final_metrics.json")) == full


def test_stored_old_outputs_train_the_same_model_as_alongside(pretrained, tmp_path):
  a = job.run(_cfg(pretrained, "pc.method=fd_kl"), str(tmp_path / "a"), progress=False)
  b = job.run(_cfg(pretrained, "pc.method=fd_kl", "pc.old_outputs=stored"),
              str(tmp_path / "b"), progress=False)
  assert (tmp_path / "b" / "old_logits.npy").exists()
  np.testing.assert_allclose(a["eval"]["rates"]["ER_new"], b["eval"]["rates"]["ER_new"])
  assert a["eval"]["negative_flips"] == b["eval"]["negative_flips"]
  # ... and a stored file given back is read as it is.
  saved = np.load(tmp_path / "b" / "old_logits.npy")
  cfg = _cfg(pretrained, "pc.old_outputs=stored",
             f"pc.old_logits_file={tmp_path / 'b' / 'old_logits.npy'}")
  data, _ = job.load_data(cfg)
  np.testing.assert_array_equal(job.stored_old_logits(cfg, None, data, None), saved)


def test_ensemble_averages_its_members(pretrained, tmp_path):
  result = job.run(_cfg(pretrained, "pc.method=ensemble", "init=scratch"), str(tmp_path),
                   progress=False)
  assert (tmp_path / "member_0" / "checkpoints").exists()
  assert (tmp_path / "member_1" / "checkpoints").exists()
  assert result["method"] == "ensemble"
  calls = []
  members = [lambda x, i=i: calls.append(i) or np.full((len(x), 3), float(i)) for i in (1, 3)]
  np.testing.assert_allclose(job.ensemble(members)(np.zeros((2, 1))), 2.0)
  assert calls == [1, 3]


def test_old_model_loaded_from_a_finetuning_run(pretrained, tmp_path):
  ft = config_lib.load("digits_finetune", [
      f"pretrained.workdir={pretrained}", "data.image_size=8", "shots=2", "method=nonlinear",
      "finetune.steps=3", "finetune.checkpoint_every=3", "finetune.eval_every=3"])
  job_finetune.run(ft, str(tmp_path / "old"), progress=False)
  result = job.run(_cfg(pretrained, f"old.workdir={tmp_path / 'old'}", "pc.method=none"),
                   str(tmp_path / "new"), progress=False)
  ft_acc = json.load(open(tmp_path / "old" / "final_metrics.json"))["eval"]["accuracy"]
  assert 1 - result["eval"]["rates"]["ER_old"] == pytest.approx(ft_acc)


def test_curve_writes_json_csv_png_with_exact_end_points(pretrained, tmp_path):
  doc = job_curve.run(_cfg(pretrained), str(tmp_path), progress=False)
  for name in ("curve.json", "curve.csv", "curve.png"):
    assert (tmp_path / name).stat().st_size > 0
  assert open(tmp_path / "curve.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  rows = open(tmp_path / "curve.csv").read().splitlines()
  assert rows[0].startswith("rho,ER_new,NFR") and len(rows) == 4
  points = doc["lqf_pc"]["points"]
  assert [p["rho"] for p in points] == [0.0, 0.5, 1.0]
  assert set(doc["references"]) == {"none"}
  for p in points:
    assert p["ER_new"] - p["ER_old"] == pytest.approx(p["NFR"] - p["PFR"], abs=1e-12)
  assert metrics.best_at(points, 1.0) is not None
  assert "lqf+pc rho=0.5" in job_curve.format_table(doc)


def test_curve_cli_refuses_shares_outside_the_unit_interval(pretrained, tmp_path):
  args = [f"--config.{o}" for o in _overrides(pretrained)]
  proc = run_cli("curve", "--config", "digits_pc", "--out", str(tmp_path / "o"),
                 *args, "--config.curve.rhos=(0.0,1.5)", module="pc")
  assert_one_line_error(proc, "curve.rhos must be a non-empty list of shares in [0, 1]")
  assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("override, match", [
    ("pc.method=magic", "unknown pc.method 'magic'"),
    ("pc.temperature=0", "pc.temperature must be positive"),
    ("train.lr=0", "train.lr must be positive"),
    ("pc.old_outputs=stored", "old model's outputs '/nonexistent.npy' are missing"),
    ("old.workdir=/nonexistent/run", "no run in '/nonexistent/run'"),
])
def test_cli_errors(pretrained, tmp_path, override, match):
  workdir = tmp_path / "w"
  args = ["train", "--config", "digits_pc", "--workdir", str(workdir),
          *[f"--config.{o}" for o in _overrides(pretrained)],
          "--config.pc.old_logits_file=/nonexistent.npy", f"--config.{override}"]
  assert_one_line_error(run_cli(*args, module="pc"), match)
  assert not workdir.exists()


def test_label_sets_that_differ_are_refused(pretrained, tmp_path):
  ft = config_lib.load("digits_finetune", [
      f"pretrained.workdir={pretrained}", "data.image_size=8", "shots=2", "method=nonlinear",
      "finetune.steps=2", "finetune.checkpoint_every=2", "finetune.eval_every=2"])
  job_finetune.run(ft, str(tmp_path / "old"), progress=False)
  record = json.load(open(tmp_path / "old" / "config.json"))
  record["config"]["data"]["name"] = "mnist"
  json.dump(record, open(tmp_path / "old" / "config.json", "w"))
  with pytest.raises(UserError, match="label sets may differ"):
    job.old_model(_cfg(pretrained, f"old.workdir={tmp_path / 'old'}"), 10)
  record["config"]["data"]["name"] = "graceful_digits"
  json.dump(record, open(tmp_path / "old" / "config.json", "w"))
  with pytest.raises(UserError, match="has 10 classes, the new data has 7"):
    job.old_model(_cfg(pretrained, f"old.workdir={tmp_path / 'old'}"), 7)


def test_stored_outputs_of_the_wrong_shape_are_refused(pretrained, tmp_path):
  np.save(tmp_path / "bad.npy", np.zeros((3, 10), np.float32))
  cfg = _cfg(pretrained, "pc.old_outputs=stored", f"pc.old_logits_file={tmp_path / 'bad.npy'}")
  with pytest.raises(UserError, match=r"have shape \(3, 10\)"):
    job.run(cfg, str(tmp_path / "w"), progress=False)
  assert not (tmp_path / "w").exists()


def test_cli_train_prints_its_results(pretrained, tmp_path, capsys, monkeypatch):
  from pc.experiments import cli
  monkeypatch.chdir(ROOT)
  args = [f"--config.{o}" for o in _overrides(pretrained)]
  assert cli.main(["train", "--config", "digits_pc", "--workdir",
                   str(tmp_path / "t"), "--no_progress", *args]) == 0
  out = capsys.readouterr().out
  assert "NFR" in out and "relative NFR" in out and str(tmp_path / "t") in out



# The benchmark itself runs as README.md gives it (tests/test_readme.py checks its JSON).

def test_goals_on_a_known_curve():
  from pc.experiments import bench
  s = lambda v: {"mean": v}
  arms = {"none": {"ER_new": s(0.05), "NFR": s(0.04)},
          "fd_kl": {"ER_new": s(0.06), "NFR": s(0.03)},
          "fd_lm": {"ER_new": s(0.07), "NFR": s(0.035)}}
  curve = [{"rho": 0.0, "ER_new": 0.04, "NFR": 0.03},
           {"rho": 0.5, "ER_new": 0.052, "NFR": 0.019},
           {"rho": 1.0, "ER_new": 0.08, "NFR": 0.01}]
  g = bench.goals(arms, curve)
  assert g["fd_kl_lowers_nfr"] and g["fd_lm_lowers_nfr"] and g["untreated_nfr_at_least_2pct"]
  assert g["lqf_pc_point_halving_nfr"]["rho"] == 0.5
  assert g["best_fd_arm"] == "fd_kl"
  assert g["lqf_pc_point_at_best_fd_er"]["rho"] == 0.5 and g["lqf_pc_beats_best_fd_at_its_er"]
  assert not g["lqf_pc_halves_its_own_rho0_nfr_within_half_a_point"]
