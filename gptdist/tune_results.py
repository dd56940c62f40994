"""What a Ray Tune sweep found: one row per trial, the best one, a table
(Markdown and CSV), a plot of validation loss against parameters, and the
best trial's configuration for `gptdist train --config`."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from gptdist.config import Config
from gptdist.tune_space import Shape, budget_steps, model_cost, trial_config, trial_run_name

# --- results ---------------------------------------------------------------------


@dataclass
class TrialResult:
    trial: str
    n_layer: int
    n_head: int
    n_embd: int
    learning_rate: float
    params: int
    flops_per_token: int
    steps: int
    budget_steps: int
    val_loss: float
    metric: float
    tokens_per_s: float
    stopped_early: bool
    status: str  # finished | stopped early | error
    run_name: str
    error: str = ""  # the last line of a failed trial's exception

    @property
    def shape(self) -> Shape:
        return Shape(self.n_layer, self.n_head, self.n_embd)


def collect_results(cfg: Config, grid) -> list[TrialResult]:
    rows = []
    for result in grid:
        trial_id = Path(result.path).name
        shape = Shape.from_name(result.config["shape"])
        params, fpt = model_cost(cfg, shape)
        last = result.metrics or {}
        history = result.metrics_dataframe
        speeds = list(history["tokens_per_s"].dropna()) if history is not None and "tokens_per_s" in history else []
        # The first window includes start-up; leave it out when there are others.
        speed = sum(speeds[1:]) / len(speeds[1:]) if len(speeds) > 1 else (speeds[0] if speeds else float("nan"))
        budget = budget_steps(cfg, shape)
        steps = int(last.get("step", 0))
        stopped_early = result.error is None and steps < budget
        rows.append(TrialResult(
            trial=trial_id, n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd,
            learning_rate=result.config["learning_rate"], params=params, flops_per_token=fpt,
            steps=steps, budget_steps=budget,
            val_loss=float(last.get("val/loss", float("nan"))),
            metric=float(last.get(cfg.tune.metric, float("nan"))),
            tokens_per_s=speed, stopped_early=stopped_early,
            status="error" if result.error is not None else ("stopped early" if stopped_early else "finished"),
            run_name=trial_run_name(cfg.tune.name, trial_id),
            error=error_line(result.error),
        ))
    sign = 1 if cfg.tune.mode == "min" else -1
    return sorted(rows, key=lambda r: (math.isnan(r.metric), sign * r.metric if not math.isnan(r.metric) else 0))


def error_line(error: BaseException | None) -> str:
    """The line that says what went wrong: Tune wraps a trial's exception in
    a TuneError/RayTaskError whose text ends with the original one's."""
    if error is None:
        return ""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def best_trial(rows: list[TrialResult]) -> TrialResult | None:
    """The best trial that spent its whole budget (ASHA's survivors), else
    the best of those that reported the metric at all. `rows` is sorted."""
    scored = [r for r in rows if r.status != "error" and not math.isnan(r.metric)]
    finished = [r for r in scored if not r.stopped_early]
    return (finished or scored or [None])[0]


COLUMNS = ["trial", "n_layer", "n_head", "n_embd", "lr", "params", "FLOPs/token", "steps",
           "val loss", "tokens/s", "stopped early", "status"]


def _table_rows(rows: list[TrialResult]) -> list[list[str]]:
    return [[r.trial, str(r.n_layer), str(r.n_head), str(r.n_embd), f"{r.learning_rate:.3g}",
             f"{r.params:,}", f"{r.flops_per_token:.3e}", f"{r.steps}/{r.budget_steps}",
             f"{r.val_loss:.4f}", f"{r.tokens_per_s:,.0f}", "yes" if r.stopped_early else "no", r.status]
            for r in rows]


def results_markdown(rows: list[TrialResult]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in _table_rows(rows)]
    return "\n".join(lines) + "\n"


def results_csv(rows: list[TrialResult]) -> str:
    out = io.StringIO()
    fields = list(asdict(rows[0])) if rows else list(TrialResult.__dataclass_fields__)
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    for r in rows:
        writer.writerow(asdict(r))
    return out.getvalue()


def plot_val_loss_vs_params(rows: list[TrialResult], out: Path) -> Path | None:
    """Validation loss against parameters, one point per trial; hollow
    points were stopped early."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if not math.isnan(r.val_loss)]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, lr in enumerate(sorted({r.learning_rate for r in points})):
        for early in (False, True):
            group = [r for r in points if r.learning_rate == lr and r.stopped_early == early]
            if group:
                ax.scatter([r.params for r in group], [r.val_loss for r in group],
                           facecolors="none" if early else f"C{i}", edgecolors=f"C{i}",
                           label=f"lr {lr:.3g}" + (", stopped early" if early else ""))
    for r in points:
        ax.annotate(r.shape.name, (r.params, r.val_loss), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if max(r.params for r in points) > 3 * min(r.params for r in points):
        ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("validation loss (last report)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def best_config(cfg: Config, best: TrialResult, reports: int) -> Config:
    """A config for `gptdist train --config`: the sweep's config with the
    best trial's shape, learning rate, step budget and intervals, a fresh
    run name and the project's own storage."""
    best_cfg = trial_config(cfg, best.shape, best.learning_rate, reports)
    best_cfg.train.run_name = None
    return best_cfg
