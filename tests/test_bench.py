import numpy as np
import pytest

from lqf.experiments import bench
from lqf.experiments.bench import common, transfer


def test_summary_is_mean_and_sample_std():
  s = common.summary([0.5, 0.7, 0.9])
  assert s["mean"] == np.mean([0.5, 0.7, 0.9])
  assert np.isclose(s["std"], np.std([0.5, 0.7, 0.9], ddof=1))
  assert s["values"] == [0.5, 0.7, 0.9]
  assert common.summary([0.3])["std"] == 0.0


def test_release_compiled_clears_the_caches_every_few_runs(monkeypatch):
  calls = []
  monkeypatch.setattr(common.jax, "clear_caches", lambda: calls.append(1))
  release = common.ReleaseCompiled(every=3)
  for _ in range(7):
    release()
  assert len(calls) == 2  # After the third and the sixth run.


def _arm(mean):
  return {"accuracy": common.summary([mean, mean])}


def test_transfer_goals():
  ok = {"arms": {"finetune@5shot": _arm(0.8), "scratch@5shot": _arm(0.6),
                 "probe@5shot": _arm(0.85), "no_adaptation": _arm(0.99)}}
  g = transfer.transfer_goals(ok)
  assert g["finetune_beats_scratch_by_10"] and g["best_in_60_95"] and g["best_method"] == 0.85
  bad = {"arms": {"finetune@5shot": _arm(0.65), "scratch@5shot": _arm(0.6),
                  "probe@5shot": _arm(0.97)}}
  g = transfer.transfer_goals(bad)
  assert not g["finetune_beats_scratch_by_10"] and not g["best_in_60_95"]


def test_transfer_goals_at_few_and_many_shots():
  arms = {"finetune@10shot": _arm(0.75), "scratch@10shot": _arm(0.60),
          "probe@10shot": _arm(0.70), "finetune@100shot": _arm(0.86),
          "scratch@100shot": _arm(0.80), "probe@100shot": _arm(0.82),
          "no_adaptation": _arm(0.70)}
  g = transfer.transfer_goals({"arms": arms})
  assert (g["few_shots"], g["many_shots"]) == (10, 100)
  assert g["finetune_beats_scratch_by_10"] and g["best_in_60_95"]
  assert g["best_minus_probe_and_source"] == pytest.approx(0.04)
  assert g["best_above_probe_and_source_by_3"]
  arms["probe@100shot"] = _arm(0.84)
  assert not transfer.transfer_goals({"arms": arms})["best_above_probe_and_source_by_3"]


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
  return f"pretrained.workdir={tmp_path_factory.mktemp('bench') / 'pre'}"


def test_quick_cost_bench_reports_ratios_of_its_own_timings(tmp_path, pre):
  doc = bench.run("cost", json_path=str(tmp_path / "c.json"), seeds=2, quick=True,
                  overrides=[pre])
  arms = doc["arms"]
  assert set(arms) == {"nonlinear_all", "lqf_all", "nonlinear_last_stage", "lqf_last_stage",
                       "ratios"}
  r = arms["ratios"]["lqf_all / nonlinear_all"]["values"]
  t_lin = arms["lqf_all"]["seconds_per_step"]["values"]
  t_non = arms["nonlinear_all"]["seconds_per_step"]["values"]
  np.testing.assert_allclose(r, np.array(t_lin) / np.array(t_non))
  assert all(arms[a]["temp_memory_bytes"]["mean"] > 0 for a in arms if a != "ratios")
  assert set(doc["goals"]) == {"all_at_most_1.8x", "last_stage_at_most_1.3x"}


# The transfer, accuracy, solve and throughput benches run in quick mode as README.md gives
# them: tests/test_readme.py checks their JSON.


def test_summary_of_a_metric_some_seeds_never_reach():
  from lqf.experiments.bench import solve as bench_solve
  assert bench_solve._summary_nan([1.0, float("nan"), 3.0]) == {
      "mean": 2.0, "std": pytest.approx(np.sqrt(2.0)), "values": [1.0, None, 3.0],
      "not_reached": 1}


def test_rates_chosen_per_seed_on_validation_and_arms_from_adabn_statistics(pre):
  result, _, _ = transfer.run_arms(
      arm_names=("finetune", "source_adabn"), shots=(2,), seeds=2, quick=True,
      overrides=[pre, "bench.tune_per_seed=True", "bench.adapt_batch_norm=True",
                 "bench.lr_grid.finetune=(0.001,0.01)"])
  tuning = result["tuning"]["finetune@2shot"]
  assert len(tuning["lr"]) == len(tuning["val_accuracy"]) == 2
  for lr, grid in zip(tuning["lr"], tuning["val_accuracy"]):
    assert set(grid) == {"0.001", "0.01"}
    assert grid[str(lr)] == max(grid.values())  # The best on validation (ties: lower).
    assert lr == min(float(v) for v, a in grid.items() if a == max(grid.values()))
  assert "source_adabn@2shot" not in result["tuning"]  # No grid: nothing tuned.
  for arm in ("finetune@2shot", "source_adabn@2shot"):
    values = result["arms"][arm]["accuracy"]["values"]
    assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)
