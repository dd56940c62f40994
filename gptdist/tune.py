"""`gptdist tune`: a Ray Tune search over model shapes and learning rates.

Every trial is a whole `gptdist train` run: the Tune trainable calls
`driver.train_main` with the trial's config, so trials train with the same
driver, workers, checkpoints and MLflow coordinator as a single run. Metrics
reach Tune through `TuneReportCallback` on the Ray Train controller.

What the sweep guarantees:

- Shapes that cannot exist (n_embd not divisible by n_head; n_embd that is
  n_head x head_dim for no head_dim given) are removed before launch, printed
  and logged to the sweep's MLflow run as `invalid_shapes.json`; a sweep
  never fails on them halfway.
- Trials are compared at equal budgets: `tune.max_steps` steps each, or with
  `tune.flops_budget` as many steps as that many training FLOPs buy for the
  trial's shape. Every trial reports (and evaluates) about as often as the
  others, at most `reports_per_trial` times, and ASHA's clock
  (`budget_reports`) is the fraction of its budget a trial has spent, in
  reports, so ASHA's rungs compare shapes at equal compute.
- The sweep lives at `<ray.storage_path>/tune/<tune.name>`, each trial's
  Train run (named `<tune.name>-<trial id>`) under it, so `--resume` finds
  both: Tune restores the sweep and a restarted trial continues its Train run
  from its last checkpoint and its MLflow run by name.
- MLflow holds one run for the sweep (tag gptdist.run_kind=tune-sweep) and
  one nested run per trial. The results table, a plot of validation loss
  against parameters and the best configuration (a full config for
  `gptdist train --config`) are logged to the sweep run and written to
  `<tracking.runs_dir>/tune/<tune.name>/`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from gptdist import tracking
from gptdist.config import Config, ConfigError, config_from_dict, flatten
from gptdist.redaction import redact_text
from gptdist.ray_session import connect_ray, shutdown_ray, use_gpu
from gptdist.driver import train_main
from gptdist.ray_session import storage_path
from gptdist.run_data import open_dataset
from gptdist.tracking import open_tracking
from gptdist.tune_results import (TrialResult, best_config, best_trial, collect_results, plot_val_loss_vs_params,
                                  results_csv, results_markdown)
from gptdist.tune_space import (TRIAL_DRIVER_CPU, InvalidShape, Shape, distinct, budget_steps, check_tune_config,
                                concurrent_trials, model_cost, reports_per_trial, search_shapes, trial_config,
                                trial_cpus, trial_run_name)

SWEEP_KIND = "tune-sweep"
TRIAL_KIND = "tune"
# ASHA's clock: reports' worth of the trial's budget spent (see BudgetReportCallback).
TIME_ATTR = "budget_reports"


# --- Tune wiring ---------------------------------------------------------------------


def sweeps_root(cfg: Config) -> str:
    return f"{storage_path(cfg).rstrip('/')}/tune"


def sweep_path(cfg: Config) -> str:
    """Where Tune keeps the sweep: deterministic, so --resume finds it."""
    return f"{sweeps_root(cfg)}/{cfg.tune.name}"


def results_dir(cfg: Config) -> Path:
    return tracking.runs_dir(cfg.tracking) / "tune" / cfg.tune.name


def param_space(cfg: Config, shapes: list[Shape]) -> dict[str, Any]:
    """Grid: every valid shape x every learning rate, listed explicitly
    (num_samples repeats each with another seed). Random and Optuna draw
    num_samples trials from the same choices."""
    names = [s.name for s in shapes]
    lrs = distinct(cfg.tune.learning_rate)
    if cfg.tune.search_alg == "grid":
        space = {"shape": tune.grid_search(names), "learning_rate": tune.grid_search(lrs)}
        if cfg.tune.num_samples > 1:
            space["seed"] = tune.grid_search([cfg.train.seed + i for i in range(cfg.tune.num_samples)])
        return space
    return {"shape": tune.choice(names), "learning_rate": tune.choice(lrs)}


def search_algorithm(cfg: Config, max_concurrent: int = 0):
    """Tune applies TuneConfig.max_concurrent_trials only to a `Searcher`
    (Optuna); Tune's own grid/random generator takes the limit itself."""
    if cfg.tune.search_alg == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError(
                "tune.search_alg=optuna needs the optuna package: pip install 'gptdist[tune]' "
                "(or choose tune.search_alg=grid or random)"
            ) from None
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=cfg.tune.metric, mode=cfg.tune.mode, seed=cfg.data.seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=cfg.data.seed)


def scheduler(cfg: Config, reports: int):
    if cfg.tune.scheduler == "fifo":
        from ray.tune.schedulers import FIFOScheduler

        return FIFOScheduler()
    from ray.tune.schedulers import ASHAScheduler

    # stop_last_trials=False: a trial at its last report is left to finish
    # train_main (final checkpoint, MLflow artifacts and status), not killed.
    return ASHAScheduler(time_attr=TIME_ATTR, max_t=reports, grace_period=cfg.tune.grace_period,
                         reduction_factor=cfg.tune.reduction_factor, stop_last_trials=False)


class BudgetReportCallback(TuneReportCallback):
    """Tune's report callback, plus ASHA's clock: `budget_reports`, the
    fraction of the trial's step budget done, times the reports per trial.
    It is the report's index when the interval divides the budget, equal
    across shapes at equal compute, and it follows the step, so a trial
    resumed mid-run keeps its place (Tune's training_iteration would
    restart from 1)."""

    def __init__(self, budget_steps: int, reports: int):
        super().__init__()
        self.budget_steps = budget_steps
        self.reports = reports

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        first = dict(metrics[0])
        first[TIME_ATTR] = self.reports * first["step"] / self.budget_steps
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def make_trainable(cfg: Config, reports: int, parent_run_id: str | None, side_by_side: bool):
    """The Tune function trainable: one full training run per trial.
    Trials that run side by side each take their CPU share of torch threads
    (a lone Train worker would otherwise take every core of the node)."""
    base = cfg.to_dict()
    sweep_name = cfg.tune.name
    train_storage = f"{sweep_path(cfg)}/train"

    def gptdist_trial(config: dict[str, Any]) -> None:
        base_cfg = config_from_dict(base)
        trial_cfg = trial_config(base_cfg, Shape.from_name(config["shape"]), config["learning_rate"],
                                 reports, config.get("seed"))
        trial_cfg.train.run_name = trial_run_name(sweep_name, tune.get_context().get_trial_id())
        trial_cfg.ray.storage_path = train_storage
        if side_by_side and trial_cfg.train.cpu_threads is None:
            trial_cfg.train.cpu_threads = max(1, math.floor(trial_cfg.ray.cpus_per_worker))
        train_main(trial_cfg, parent_run_id=parent_run_id, kind=TRIAL_KIND,
                   callbacks=[BudgetReportCallback(trial_cfg.train.max_steps, reports)])
        # Nothing returned: Tune would report a returned dict as one more result.

    return gptdist_trial


def trial_dirname(trial) -> str:
    return trial.trial_id


def build_tuner(cfg: Config, reports: int, parent_run_id: str | None, max_concurrent: int,
                shapes: list[Shape], resume: bool) -> tune.Tuner:
    trainable = tune.with_resources(make_trainable(cfg, reports, parent_run_id, max_concurrent > 1),
                                    {"cpu": TRIAL_DRIVER_CPU})
    path = sweep_path(cfg)
    if resume and tune.Tuner.can_restore(path):
        print(f"resuming sweep {cfg.tune.name} from {path}")
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    if resume:
        print(f"no sweep to resume at {path}: starting it")
    num_samples = 1 if cfg.tune.search_alg == "grid" else cfg.tune.num_samples
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg, shapes),
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric,
            mode=cfg.tune.mode,
            search_alg=search_algorithm(cfg, max_concurrent),
            scheduler=scheduler(cfg, reports),
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent if cfg.tune.search_alg == "optuna" else None,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(name=cfg.tune.name, storage_path=sweeps_root(cfg), verbose=1),
    )


# --- the sweep ---------------------------------------------------------------------


def absolute_paths(cfg: Config) -> Config:
    """Trials run with a Tune trial folder as their working directory:
    every relative path and the tracking URI are made explicit first."""
    cfg = config_from_dict(cfg.to_dict())
    cfg.data.path = str(Path(cfg.data.path).expanduser().resolve())
    cfg.ray.storage_path = storage_path(cfg)
    cfg.tracking.uri = tracking.tracking_uri(cfg.tracking)
    cfg.tracking.runs_dir = str(tracking.runs_dir(cfg.tracking))
    return cfg


def open_sweep_run(cfg: Config, shapes: list[Shape], invalid: list[InvalidShape], reports: int):
    """(client, run_id) of the sweep's MLflow run, or (None, None) without tracking."""
    sweep_cfg = config_from_dict(cfg.to_dict())
    sweep_cfg.train.run_name = cfg.tune.name
    params = {
        **flatten(cfg.to_dict()),
        "derived.valid_shapes": len(shapes),
        "derived.invalid_shapes": len(invalid),
        "derived.reports_per_trial": reports,
        "derived.sweep_path": sweep_path(cfg),
    }
    client, run_id, _ = open_tracking(sweep_cfg, params, kind=SWEEP_KIND)
    return client, run_id


def sweep_run_exists(cfg: Config) -> bool:
    """Whether MLflow already holds a sweep of this name (False when it cannot
    be asked: open_tracking then decides whether that is an error)."""
    try:
        tracking.check_reachable(cfg.tracking.uri)
        client = tracking.mlflow_client(cfg.tracking.uri)
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        if experiment is None:
            return False
        return bool(client.search_runs(
            [experiment.experiment_id],
            filter_string=(f"tags.`{tracking.RUN_NAME_TAG}` = '{cfg.tune.name}' and "
                           f"tags.`{tracking.RUN_KIND_TAG}` = '{SWEEP_KIND}'"),
            max_results=1,
        ))
    except Exception:
        return False


def print_plan(cfg: Config, shapes: list[Shape], invalid: list[InvalidShape], reports: int, max_concurrent: int) -> None:
    t = cfg.tune
    budget = f"{t.flops_budget:.3g} FLOPs" if t.flops_budget is not None else f"{t.max_steps} steps"
    print(f"sweep {t.name}: {len(shapes)} shape(s) x {len(distinct(t.learning_rate))} learning rate(s), "
          f"{t.search_alg} search, {t.scheduler} scheduler, {budget} per trial, "
          f"{reports} reports per trial, up to {max_concurrent} trial(s) at once")
    for s in shapes:
        params, fpt = model_cost(cfg, s)
        print(f"  {s.name}: {params / 1e6:.2f}M parameters, {fpt:.3e} FLOPs/token, {budget_steps(cfg, s)} steps")
    if t.scheduler == "asha" and t.grace_period >= reports:
        print(f"warning: tune.grace_period={t.grace_period} is not below the {reports} reports per trial: "
              "ASHA will stop no trial early")
    if invalid:
        print(f"removed {len(invalid)} shape(s) that cannot exist:")
        for s in invalid:
            print(f"  n_layer={s.n_layer} n_head={s.n_head} n_embd={s.n_embd}"
                  + (f" head_dim={s.head_dim}" if s.head_dim is not None else "") + f": {s.reason}")


def tune_main(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Run (or with `resume`, continue) the sweep of cfg.tune; return its summary."""
    check_tune_config(cfg)
    cfg = absolute_paths(cfg)
    shapes, invalid = search_shapes(cfg)
    if not shapes:
        raise ConfigError("no shape in the search space can exist: "
                          + "; ".join(s.reason for s in invalid))
    for shape in shapes:  # every trial's config must load before any trial starts
        trial_config(cfg, shape, cfg.tune.learning_rate[0], 1)
    search_algorithm(cfg)  # a missing optuna is a config error, before Ray starts
    reports = reports_per_trial(cfg, shapes)
    path = sweep_path(cfg)
    if not resume and tune.Tuner.can_restore(path):
        raise ConfigError(f"sweep tune.name={cfg.tune.name!r} already exists at {path}; "
                          "pass --resume to continue it or choose another tune.name")

    if not resume and sweep_run_exists(cfg):
        raise ConfigError(
            f"a sweep named tune.name={cfg.tune.name!r} already exists in MLflow experiment "
            f"{cfg.tracking.experiment!r}; pass --resume to continue it or choose another tune.name"
        )

    # A local Ray gets the dashboard: Ray Train needs its state API to remove
    # the placement groups of trials that ASHA stops.
    started_ray = connect_ray(cfg, include_dashboard=True)
    try:
        open_dataset(cfg)  # prepares the default dataset once, before trials race for it
        gpu = use_gpu(cfg)
        available = ray.available_resources()
        fit = math.floor(available.get("CPU", 0) / trial_cpus(cfg) + 1e-9)
        if fit < 1:
            message = (f"one trial needs {trial_cpus(cfg):g} CPUs (ray.num_workers x ray.cpus_per_worker + "
                       f"{TRIAL_DRIVER_CPU}) but Ray has {available.get('CPU', 0):g} free")
            if started_ray:
                raise ConfigError(message + "; lower ray.cpus_per_worker or raise ray.local_num_cpus")
            print(f"warning: {message}; trials will wait for the cluster to grow")
        max_concurrent = concurrent_trials(cfg, available.get("CPU", 0), available.get("GPU", 0), gpu)
        print_plan(cfg, shapes, invalid, reports, max_concurrent)

        client, parent_run_id = open_sweep_run(cfg, shapes, invalid, reports)
        if client is not None:
            client.log_dict(parent_run_id, [asdict(s) for s in invalid], "invalid_shapes.json")
            client.log_text(parent_run_id, redact_text(cfg.to_yaml()), "config.yaml")
        try:
            tuner = build_tuner(cfg, reports, parent_run_id, max_concurrent, shapes, resume)
            grid = tuner.fit()
            if grid.num_terminated + grid.num_errors < len(grid):
                return interrupted_sweep(cfg, grid, client, parent_run_id)
            summary = finish_sweep(cfg, grid, invalid, reports, client, parent_run_id)
        except BaseException as e:
            if client is not None:
                tracking.finish_run(client, parent_run_id, e)
            raise
        return summary
    finally:
        if started_ray:
            shutdown_ray()


def interrupted_sweep(cfg: Config, grid, client, parent_run_id: str | None) -> dict[str, Any]:
    """Tune stopped on Ctrl-C and saved its state: no results yet, the
    sweep's and the running trials' MLflow runs are marked KILLED until
    --resume continues them."""
    done = grid.num_terminated + grid.num_errors
    print(f"\nsweep {cfg.tune.name} interrupted with {done} of {len(grid)} trial(s) done; "
          f"continue it with: gptdist tune --resume (same config) from {sweep_path(cfg)}")
    if client is not None:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        running = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'",
        )
        for run in running:
            client.set_terminated(run.info.run_id, status="KILLED")
        client.set_terminated(parent_run_id, status="KILLED")
    return {"name": cfg.tune.name, "path": sweep_path(cfg), "mlflow_run_id": parent_run_id,
            "interrupted": True, "trials_done": done, "trials": len(grid)}


def mark_trial_runs(cfg: Config, client, parent_run_id: str, rows: list[TrialResult]) -> None:
    """Record how each trial ended on its MLflow run. A trial that ASHA
    stopped was killed mid-run: its run says RUNNING, or FAILED with the
    death of its Train controller as the error when train_main saw it die;
    it is KILLED, by the sweep's decision."""
    children = client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent_run_id}'",
        max_results=10_000,
    )
    by_name = {run.data.tags.get(tracking.RUN_NAME_TAG): run for run in children}
    for row in rows:
        run = by_name.get(row.run_name)
        if run is None:
            continue
        client.set_tag(run.info.run_id, "gptdist.tune_status", row.status)
        if row.stopped_early and run.info.status in ("RUNNING", "FAILED"):
            if "gptdist.error" in run.data.tags:
                client.delete_tag(run.info.run_id, "gptdist.error")
            client.set_terminated(run.info.run_id, status="KILLED")
        elif run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="FAILED")


def finish_sweep(cfg: Config, grid, invalid: list[InvalidShape], reports: int, client,
                 parent_run_id: str | None) -> dict[str, Any]:
    rows = collect_results(cfg, grid)
    best = best_trial(rows)
    out = results_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    table = results_markdown(rows)
    (out / "results.md").write_text(table)
    (out / "results.csv").write_text(results_csv(rows))
    (out / "invalid_shapes.json").write_text(json.dumps([asdict(s) for s in invalid], indent=2))
    plot = plot_val_loss_vs_params(rows, out / "val_loss_vs_params.png")
    best_path = None
    if best is not None:
        best_path = out / "best_config.yaml"
        best_path.write_text(best_config(cfg, best, reports).to_yaml())

    errors = [r for r in grid if r.error is not None]
    print()
    print(f"sweep {cfg.tune.name}: {len(rows)} trial(s), "
          f"{sum(r.stopped_early for r in rows)} stopped early, {len(errors)} failed")
    print(table)
    for r in errors:
        print(f"trial {Path(r.path).name} failed: {type(r.error).__name__}: {r.error}"[:2000])
    if best is not None:
        print(f"best: trial {best.trial} ({best.shape.name}, lr {best.learning_rate:.3g}) "
              f"{cfg.tune.metric} {best.metric:.4f}")
        print(f"train it:  gptdist train --config {best_path}")
    print(f"results: {out}")

    if client is not None:
        for path in (out / "results.md", out / "results.csv", plot, best_path):
            if path is not None:
                client.log_artifact(parent_run_id, str(path))
        metrics = {"trials": len(rows), "trials_stopped_early": sum(r.stopped_early for r in rows),
                   "trials_failed": len(errors)}
        if best is not None:
            metrics[f"best/{cfg.tune.metric}"] = best.metric
            client.set_tag(parent_run_id, "gptdist.best_trial", best.run_name)
        for key, value in metrics.items():
            client.log_metric(parent_run_id, key, value)
        mark_trial_runs(cfg, client, parent_run_id, rows)
        if best is None:
            tracking.finish_run(client, parent_run_id, RuntimeError("no trial reported " + cfg.tune.metric))
        else:
            tracking.finish_run(client, parent_run_id)
    if best is None:
        raise RuntimeError(f"sweep {cfg.tune.name}: no trial reported {cfg.tune.metric}"
                           + (f"; first error: {errors[0].error}" if errors else ""))
    return {
        "name": cfg.tune.name,
        "path": sweep_path(cfg),
        "results_dir": str(out),
        "mlflow_run_id": parent_run_id,
        "trials": [asdict(r) for r in rows],
        "invalid_shapes": [asdict(s) for s in invalid],
        "best": asdict(best),
        "best_config": str(best_path),
        "interrupted": False,
    }
