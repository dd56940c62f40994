"""Ray Tune sweeps: the search space and budgets (pure), and a real 4-trial
sweep on a local Ray with ASHA, MLflow in SQLite and the best config trained."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import ray
import yaml
from support import BLOCK, DIRECT_INGEST, tiny_config
from mlflow.tracking import MlflowClient

from gptdist import tracking
from gptdist.cli import main as cli_main
from gptdist.config import ConfigError, load_config
from gptdist.model import GPT
from gptdist.tune import SWEEP_KIND, search_algorithm, tune_main
from gptdist.tune_results import error_line
from gptdist.tune_space import (
    Shape,
    budget_steps,
    concurrent_trials,
    model_cost,
    report_interval,
    reports_per_trial,
    search_shapes,
    steps_for_flops,
    trial_config,
)

# No shared Ray in this module: tune_main starts the one it needs (with the
# dashboard), as `gptdist tune` does, and stops it.
pytestmark = pytest.mark.usefixtures("own_ray")


def tune_config(*extra: str):
    return load_config(overrides=["model.preset=nano", f"model.block_size={BLOCK}", *extra])


# --- the search space and budgets -------------------------------------------------


def test_indivisible_shapes_are_removed_and_named():
    cfg = tune_config("tune.n_layer=[1, 2]", "tune.n_head=[2, 3]", "tune.n_embd=[64]")
    valid, invalid = search_shapes(cfg)
    assert valid == [Shape(1, 2, 64), Shape(2, 2, 64)]
    assert [(s.n_layer, s.n_head, s.n_embd) for s in invalid] == [(1, 3, 64), (2, 3, 64)]
    assert all("not divisible" in s.reason for s in invalid)


def test_head_dim_gives_the_width():
    cfg = tune_config("tune.n_layer=[2]", "tune.n_head=[2, 4]", "tune.head_dim=[16, 32]")
    valid, invalid = search_shapes(cfg)
    assert [s.name for s in valid] == ["L2-H2-E32", "L2-H2-E64", "L2-H4-E64", "L2-H4-E128"]
    assert invalid == []


def test_head_dim_and_n_embd_in_conflict():
    cfg = tune_config("tune.n_layer=[2]", "tune.n_head=[2, 4]", "tune.n_embd=[64]", "tune.head_dim=[16]")
    valid, invalid = search_shapes(cfg)
    assert valid == [Shape(2, 4, 64)]  # 4 x 16 = 64
    assert len(invalid) == 1 and invalid[0].n_head == 2
    assert "not n_head=2 x any head_dim" in invalid[0].reason


def test_width_defaults_to_the_model():
    valid, _ = search_shapes(tune_config("tune.n_layer=[3]", "tune.n_head=[4]"))
    assert valid == [Shape(3, 4, 64)]  # the nano preset is 64 wide


def test_no_valid_shape_fails_before_launch():
    cfg = tune_config("tune.n_head=[3]", "tune.n_embd=[64]")
    with pytest.raises(ConfigError, match="no shape in the search space can exist"):
        tune_main(cfg)
    assert not ray.is_initialized()


def test_model_cost_matches_the_model():
    cfg = tune_config()
    shape = Shape(2, 4, 128)
    params, fpt = model_cost(cfg, shape)
    model = GPT(shape.gpt_config(cfg))
    assert (params, fpt) == (model.num_params(), model.flops_per_token())


def test_steps_for_flops():
    assert steps_for_flops(1000.0, 10, 2, 5) == 10
    assert steps_for_flops(1099.0, 10, 2, 5) == 10  # floor
    assert steps_for_flops(1.0, 10, 2, 5) == 1  # at least one step


def test_flops_budget_gives_equal_compute():
    cfg = tune_config("tune.n_layer=[1, 4]", "tune.n_head=[2]", "tune.n_embd=[64]",
                      "tune.flops_budget=2.0e+11", "train.global_batch_size=4", "train.micro_batch_size=4")
    small, big = search_shapes(cfg)[0]
    per_step = {s: model_cost(cfg, s)[1] * 4 * BLOCK for s in (small, big)}
    steps = {s: budget_steps(cfg, s) for s in (small, big)}
    assert steps[small] > steps[big]
    for s in (small, big):
        assert steps[s] * per_step[s] <= 2e11 < (steps[s] + 1) * per_step[s]
    # Every trial reports the same number of times, so ASHA's rungs compare equal compute.
    reports = reports_per_trial(cfg, [small, big])
    for s in (small, big):
        assert math.ceil(steps[s] / report_interval(steps[s], reports)) == reports


def test_trial_config_reports_the_metric_at_every_report():
    cfg = tune_config("tune.max_steps=10", "train.log_interval=2", "train.eval_interval=50",
                      "train.learning_rate=0.001", "train.min_lr=0.0001", "train.checkpoint_interval=3")
    reports = reports_per_trial(cfg, [Shape(1, 2, 64)])
    assert reports == 5
    trial = trial_config(cfg, Shape(1, 2, 64), 0.01, reports)
    assert (trial.model.n_layer, trial.model.n_head, trial.model.n_embd) == (1, 2, 64)
    assert trial.train.learning_rate == 0.01 and trial.train.min_lr == pytest.approx(0.001)
    assert trial.train.max_steps == 10
    assert trial.train.eval_interval == trial.train.log_interval == 2
    assert trial.train.checkpoint_interval % 2 == 0
    # Too few steps for the interval: report more often, at least MIN_REPORTS times.
    cfg = tune_config("tune.max_steps=8", "train.log_interval=10", "train.eval_interval=10")
    assert reports_per_trial(cfg, [Shape(1, 2, 64)]) == 4


def test_concurrency_from_resources():
    cfg = tune_config()  # 1 worker x 1 CPU
    assert concurrent_trials(cfg, available_cpus=3) == 2  # 1.01 CPUs per trial
    assert concurrent_trials(cfg, available_cpus=0.5) == 1  # never 0
    cfg = tune_config("tune.max_concurrent_trials=1")
    assert concurrent_trials(cfg, available_cpus=16) == 1
    cfg = tune_config("ray.num_workers=2", "train.micro_batch_size=4")
    assert concurrent_trials(cfg, available_cpus=16, available_gpus=3, gpu=True) == 1


def test_a_failed_trial_is_summed_up_by_its_exception_last_line():
    wrapped = RuntimeError("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                           "sqlite3.IntegrityError: UNIQUE constraint failed\n\n")
    assert error_line(wrapped) == "sqlite3.IntegrityError: UNIQUE constraint failed"
    assert error_line(KeyError()) == "KeyError"
    assert error_line(None) == ""


def test_optuna_is_a_clear_error_when_missing():
    pytest.importorskip("ray.tune.search.optuna")
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="needs the optuna package"):
            search_algorithm(tune_config("tune.search_alg=optuna"))
    else:
        pytest.skip("optuna is installed")


# --- a real sweep ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    """Not the shared Ray (see `own_ray` above): tiny_dataset needs none."""
    yield


def sweep_config(tmp: Path, data: Path, *extra: str):
    """4 valid trials: 2 depths x a learning rate that learns and one that
    cannot (1e-6), plus 2 shapes that cannot exist (3 heads, 64 wide). The
    trials read their rows directly (the search, not the data path, is
    what this module tests)."""
    return tiny_config(
        tmp, data, "unused", DIRECT_INGEST, "train.global_batch_size=4", "train.micro_batch_size=4",
        "train.warmup_steps=2", "train.log_interval=2", "train.eval_interval=2",
        "train.checkpoint_interval=100", "train.sample_tokens=0",
        "tune.n_layer=[1, 2]", "tune.n_head=[2, 3]", "tune.n_embd=[64]", "tune.learning_rate=[0.003, 0.000001]",
        "tune.max_steps=10", "tune.grace_period=1", "tune.reduction_factor=2", "tune.name=sweep-test", *extra,
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_dataset):
    tmp = tmp_path_factory.mktemp("tune")
    cfg = sweep_config(tmp, tiny_dataset)
    summary = tune_main(cfg)
    return tmp, cfg, summary


def mlflow_runs(tmp: Path):
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gptdist")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get(tracking.RUN_KIND_TAG) == SWEEP_KIND]
    return client, parents, [r for r in runs if r not in parents]


def test_sweep_runs_every_trial_and_asha_stops_the_worst(sweep):
    tmp, cfg, summary = sweep
    trials = summary["trials"]
    assert len(trials) == 4
    assert {(t["n_layer"], t["learning_rate"]) for t in trials} == {(1, 0.003), (2, 0.003), (1, 1e-6), (2, 1e-6)}
    assert all(t["status"] in ("finished", "stopped early") for t in trials), [t["error"] for t in trials]
    assert all(not math.isnan(t["val_loss"]) for t in trials)
    stopped = [t for t in trials if t["stopped_early"]]
    assert stopped and all(t["steps"] < t["budget_steps"] == 10 for t in stopped)
    assert any(t["learning_rate"] == 1e-6 for t in stopped)
    assert summary["best"]["learning_rate"] == 0.003 and not summary["best"]["stopped_early"]
    assert not ray.is_initialized()  # tune_main stops the Ray it started


def test_invalid_shapes_are_reported(sweep):
    tmp, cfg, summary = sweep
    assert [(s["n_layer"], s["n_head"]) for s in summary["invalid_shapes"]] == [(1, 3), (2, 3)]
    client, (parent,), _ = mlflow_runs(tmp)
    folder = client.download_artifacts(parent.info.run_id, "invalid_shapes.json", str(tmp / "dl"))
    assert json.loads(Path(folder).read_text()) == summary["invalid_shapes"]


def test_mlflow_holds_one_sweep_run_and_a_child_per_trial(sweep):
    tmp, cfg, summary = sweep
    client, parents, children = mlflow_runs(tmp)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_name == "sweep-test" and parent.info.status == "FINISHED"
    assert parent.data.metrics["trials"] == 4
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.md", "results.csv", "val_loss_vs_params.png", "best_config.yaml",
            "invalid_shapes.json"} <= artifacts

    assert len(children) == 4
    by_name = {c.info.run_name: c for c in children}
    for trial in summary["trials"]:
        child = by_name[trial["run_name"]]
        assert child.data.tags[tracking.PARENT_TAG] == parent.info.run_id
        assert child.data.tags[tracking.RUN_KIND_TAG] == "tune"
        params = child.data.params
        assert (params["model.n_layer"], params["model.n_head"], params["model.n_embd"]) == (
            str(trial["n_layer"]), str(trial["n_head"]), str(trial["n_embd"]))
        assert float(params["train.learning_rate"]) == trial["learning_rate"]
        assert child.info.status == ("KILLED" if trial["stopped_early"] else "FINISHED")
        assert "val/loss" in child.data.metrics

    results = Path(summary["results_dir"])
    table = (results / "results.md").read_text()
    assert table.count("\n") == 2 + 4 and "stopped early" in table
    assert (results / "val_loss_vs_params.png").stat().st_size > 0


def test_existing_sweep_needs_resume_and_resumes(sweep, tiny_dataset):
    tmp, cfg, summary = sweep
    with pytest.raises(ConfigError, match="already exists.*--resume"):
        tune_main(sweep_config(tmp, tiny_dataset))
    # Resuming a finished sweep restores it from storage and runs nothing again.
    again = tune_main(sweep_config(tmp, tiny_dataset), resume=True)
    assert sorted(t["trial"] for t in again["trials"]) == sorted(t["trial"] for t in summary["trials"])
    assert again["best"]["trial"] == summary["best"]["trial"]
    _, parents, children = mlflow_runs(tmp)
    assert len(parents) == 1 and len(children) == 4


def test_best_config_trains(sweep):
    tmp, cfg, summary = sweep
    path = Path(summary["best_config"])
    assert path == tmp / "tune" / "sweep-test" / "best_config.yaml"
    best = yaml.safe_load(path.read_text())
    assert best["model"]["n_layer"] == summary["best"]["n_layer"]
    assert best["train"]["learning_rate"] == summary["best"]["learning_rate"]
    assert best["train"]["max_steps"] == 10
    code = cli_main(["train", "--config", str(path), "--set", "train.max_steps=2",
                     "--set", "train.run_name=best-of-sweep"])
    assert code == 0
    _, _, runs = mlflow_runs(tmp)
    (run,) = [r for r in runs if r.info.run_name == "best-of-sweep"]
    assert run.info.status == "FINISHED"
    assert run.data.params["model.n_layer"] == str(summary["best"]["n_layer"])
