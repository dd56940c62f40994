import argparse
import os
import re
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from gptdist.cli import build_parser, main, run

SUBCOMMANDS = ["prepare", "train", "tune", "sample", "eval", "export", "runs"]


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


def test_every_subcommand_has_a_handler():
    parser = build_parser()
    for name in SUBCOMMANDS:
        args = parser.parse_args([name] + (["--from", "x"] if name in ("sample", "eval", "export") else [])
                                 + (["--out", "y"] if name == "export" else []))
        assert callable(args.func)


def test_config_error_exits_2_with_the_key(capsys):
    assert main(["train", "--set", "train.max_steps=ten"]) == 2
    assert "train.max_steps='ten' must be an integer" in capsys.readouterr().err


def test_jobs_module_is_the_same_command():
    out = subprocess.run([sys.executable, "-m", "jobs.train", "--set", "model.n_head=5"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "n_embd=384 is not divisible by model.n_head=5" in out.stderr


REPO = Path(__file__).resolve().parents[1]


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def help_of(name: str, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_shows_every_default_and_ends_with_an_example(name, capsys):
    out = help_of(name, capsys)
    flat = " ".join(out.split())
    for action in subparsers()[name]._actions:
        if not action.option_strings or action.required or action.default in (False, argparse.SUPPRESS):
            continue  # positional, required, a flag, or --help
        if "default" in action.help:  # said in words, e.g. "(default: data.path)" for None
            assert " ".join(action.help.split()) in flat, action.dest
        else:
            assert f"(default: {action.default})" in flat, action.dest
    last = out.strip().splitlines()[-1].strip()
    assert last.startswith(f"gptdist {name} ")
    assert subparsers()[name].parse_args(shlex.split(last)[2:])  # the example parses


def test_verbose_is_an_option_of_every_subcommand_and_sets_gptdist_verbose(monkeypatch, capsys):
    for name in SUBCOMMANDS:
        assert "--verbose" in help_of(name, capsys)
    monkeypatch.setenv("GPTDIST_VERBOSE", "0")  # restored after the test
    assert main(["train", "--set", "train.max_steps=ten"]) == 2
    assert os.environ["GPTDIST_VERBOSE"] == "0"
    assert main(["train", "--verbose", "--set", "train.max_steps=ten"]) == 2
    assert os.environ["GPTDIST_VERBOSE"] == "1"


# A config error in a fresh interpreter: which heavy libraries it imported.
IMPORTED_BY_A_CONFIG_ERROR = """
import sys
from gptdist.cli import main
assert main(["train", "--set", "train.max_steps=ten"]) == 2
print(" ".join(m for m in ("ray", "mlflow", "torch", "gptdist.driver") if m in sys.modules))
"""


@pytest.fixture(scope="module")
def imported_by_a_config_error() -> list[str]:
    out = subprocess.run([sys.executable, "-c", IMPORTED_BY_A_CONFIG_ERROR], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "train.max_steps='ten' must be an integer" in out.stderr
    return out.stdout.split()


def test_config_error_does_not_import_ray_or_mlflow(imported_by_a_config_error):
    assert not {"ray", "mlflow", "gptdist.driver"} & set(imported_by_a_config_error)


def test_config_error_does_not_import_torch(imported_by_a_config_error):
    assert "torch" not in imported_by_a_config_error


def test_a_missing_module_is_raised_not_reported_as_not_implemented():
    def broken(args):
        import gptdist.no_such_module  # noqa: F401

    parser = build_parser()
    args = parser.parse_args(["runs"])
    with pytest.raises(ModuleNotFoundError):
        run(broken, args)


# --- gptdist runs, on a SQLite store written here -------------------------------

START_MS = 1_780_000_000_000  # a fixed start time


def log_run(client, experiment_id, name, kind, params, metrics, tags=None, minutes=None):
    """A run as MLflow stores it; `metrics` maps a key to its (step, value)
    history; `minutes` None leaves the run RUNNING."""
    run = client.create_run(experiment_id, run_name=name, start_time=START_MS,
                            tags={"gptdist.run_kind": kind, **(tags or {})})
    run_id = run.info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, value)
    for key, history in metrics.items():
        for step, value in history:
            client.log_metric(run_id, key, value, step=step, timestamp=START_MS)
    if minutes is not None:
        client.set_terminated(run_id, "FINISHED", end_time=START_MS + int(minutes * 60_000))
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('runs') / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("gptdist")
    train_params = {"model.preset": "nano", "model.n_layer": "3", "data.path": "/data/corpora/tiny/",
                    "derived.num_params": "3500000", "derived.global_batch_tokens": "4096"}
    # Final losses differ from the best ones: the table shows the final.
    log_run(client, experiment_id, "long", "train", train_params,
            {"train/loss": [(1, 5.0), (2, 4.0), (3, 4.5)], "val/loss": [(2, 4.2), (3, 4.4)],
             "tokens_seen": [(3, 3 * 4096.0)], "tokens_per_s": [(3, 1234.0)]},
            tags={"gptdist.dataset": "shakespeare"}, minutes=3.2)
    log_run(client, experiment_id, "still-going", "train", train_params,
            {"train/loss": [(1, 6.0), (2, 5.5)], "val/loss": [(2, 5.9)]})
    log_run(client, experiment_id, "eval-val-long", "eval", {"step": "3", "data_dir": "/data/corpora/tiny"},
            {"eval/val/loss": [(3, 4.3)], "eval/val/perplexity": [(3, 73.7)]}, minutes=0.5)
    return uri


def runs_table(uri: str, capsys, *extra: str) -> list[dict[str, str]]:
    assert main(["runs", "--set", f"tracking.uri={uri}", *extra]) == 0
    header, _, *lines = capsys.readouterr().out.strip().splitlines()
    columns = re.split(r"\s{2,}", header)
    return [dict(zip(columns, re.split(r"\s{2,}", line))) for line in lines]


def test_runs_table_shows_final_losses_and_run_details(store, capsys):
    rows = runs_table(store, capsys)
    assert [r["name"] for r in rows] == ["eval-val-long", "long", "still-going"]  # by val loss
    evaluation, long, going = rows
    assert long == {
        "name": "long", "kind": "train", "status": "FINISHED",
        "start": datetime.fromtimestamp(START_MS / 1000).strftime("%Y-%m-%d %H:%M"), "duration": "3m12s",
        "dataset": "shakespeare", "n_layer": "3", "n_head": "2", "n_embd": "64", "params": "3.50M",
        "steps": "3", "train loss": "4.5000", "val loss": "4.4000", "tokens/s": "1,234",
    }
    assert (going["status"], going["duration"], going["dataset"]) == ("RUNNING", "-", "tiny")
    assert (going["train loss"], going["val loss"]) == ("5.5000", "5.9000")
    assert (evaluation["kind"], evaluation["val loss"], evaluation["steps"]) == ("eval", "4.3000", "3")
    assert (evaluation["duration"], evaluation["n_layer"], evaluation["train loss"]) == ("30s", "-", "-")


def test_runs_sort_by_a_metric_ascending(store, capsys):
    rows = runs_table(store, capsys, "--sort", "train/loss")
    assert [r["name"] for r in rows] == ["long", "still-going", "eval-val-long"]  # no train/loss: last


def test_runs_sort_by_a_metric_no_run_logged_exits_2_naming_it(store, capsys):
    assert main(["runs", "--set", f"tracking.uri={store}", "--sort", "no/such"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--sort no/such" in err and "train/loss" in err and "eval/val/loss" in err
