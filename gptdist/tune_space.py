"""What a Ray Tune sweep searches and what each trial gets: the shapes
(n_layer x n_head x n_embd or head_dim) that can exist, the ones that
cannot, equal budgets per trial (steps, or steps for a FLOPs budget), the
trial's config, and its resources."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from gptdist.config import Config, ConfigError, config_from_dict
from gptdist.model import GPTConfig, analytic_num_params, flops_per_token

# ASHA needs a few points per trial to compare trials before they finish.
MIN_REPORTS = 4
# The trial's own driver (the Tune actor that runs train_main) does no work;
# Tune refuses a zero CPU request, so it asks for a sliver.
TRIAL_DRIVER_CPU = 0.01


# --- the search space ----------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_head: int
    n_embd: int

    @property
    def name(self) -> str:
        return f"L{self.n_layer}-H{self.n_head}-E{self.n_embd}"

    @classmethod
    def from_name(cls, name: str) -> Shape:
        match = re.fullmatch(r"L(\d+)-H(\d+)-E(\d+)", name)
        if not match:
            raise ValueError(f"not a shape name: {name!r} (expected L<layers>-H<heads>-E<width>)")
        return cls(*map(int, match.groups()))

    def gpt_config(self, cfg: Config) -> GPTConfig:
        return replace(cfg.model.to_gpt_config(), n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd)


@dataclass(frozen=True)
class InvalidShape:
    n_layer: int
    n_head: int
    n_embd: int | None
    head_dim: int | None
    reason: str


def distinct(values) -> list:
    return list(dict.fromkeys(values))


def search_shapes(cfg: Config) -> tuple[list[Shape], list[InvalidShape]]:
    """Valid and invalid shapes of n_layer x n_head x (n_embd or head_dim).

    Width comes from tune.n_embd, else from tune.head_dim (n_embd = n_head x
    head_dim), else from the model config. With both lists a shape is valid
    when its n_embd is n_head x head_dim for some head_dim in the list."""
    t = cfg.tune
    default_embd = cfg.model.to_gpt_config().n_embd
    valid: list[Shape] = []
    invalid: list[InvalidShape] = []
    for n_layer in distinct(t.n_layer):
        for n_head in distinct(t.n_head):
            if t.n_embd is None and t.head_dim is not None:
                candidates = [(n_head * d, d, None) for d in distinct(t.head_dim)]
            else:
                candidates = []
                for n_embd in distinct(t.n_embd or [default_embd]):
                    reason = None
                    if t.head_dim is not None and not any(n_head * d == n_embd for d in t.head_dim):
                        reason = (f"n_embd={n_embd} is not n_head={n_head} x any head_dim "
                                  f"in tune.head_dim={t.head_dim}")
                    candidates.append((n_embd, None, reason))
            for n_embd, head_dim, reason in candidates:
                shape = Shape(n_layer, n_head, n_embd)
                if reason is None:
                    try:
                        shape.gpt_config(cfg).validate(prefix="tune")
                    except ValueError as e:
                        reason = str(e)
                if reason is None:
                    valid.append(shape)
                else:
                    invalid.append(InvalidShape(n_layer, n_head, n_embd, head_dim, reason))
    return distinct(valid), invalid


def check_tune_config(cfg: Config) -> None:
    """The tune section's own checks, with errors naming the key."""
    t = cfg.tune
    for key in ("n_layer", "n_head", "learning_rate"):
        if not getattr(t, key):
            raise ConfigError(f"tune.{key} must be a non-empty list")
    for key in ("n_embd", "head_dim"):
        if getattr(t, key) is not None and not getattr(t, key):
            raise ConfigError(f"tune.{key} must be null or a non-empty list")
    if any(lr <= 0 for lr in t.learning_rate):
        raise ConfigError(f"tune.learning_rate={t.learning_rate} must hold positive values")
    if t.max_steps is None and t.flops_budget is None:
        raise ConfigError("set tune.max_steps or tune.flops_budget: the budget of each trial")
    if t.flops_budget is not None and t.flops_budget <= 0:
        raise ConfigError(f"tune.flops_budget={t.flops_budget} must be positive")
    if t.flops_budget is None and t.max_steps < 1:
        raise ConfigError(f"tune.max_steps={t.max_steps} must be at least 1")
    for key in ("num_samples", "grace_period"):
        if getattr(t, key) < 1:
            raise ConfigError(f"tune.{key}={getattr(t, key)} must be at least 1")
    if t.reduction_factor < 2:
        raise ConfigError(f"tune.reduction_factor={t.reduction_factor} must be at least 2")
    if t.max_concurrent_trials is not None and t.max_concurrent_trials < 1:
        raise ConfigError(f"tune.max_concurrent_trials={t.max_concurrent_trials} must be at least 1")
    if not t.name or "/" in t.name:
        raise ConfigError(f"tune.name={t.name!r} must be a non-empty name without '/'")


# --- budgets ---------------------------------------------------------------------


def model_cost(cfg: Config, shape: Shape) -> tuple[int, int]:
    """(parameters, training FLOPs per token) of a shape, without building it."""
    gpt = shape.gpt_config(cfg)
    params = analytic_num_params(gpt)
    non_embedding = params - gpt.block_size * gpt.n_embd  # as GPT.num_params(non_embedding=True)
    return params, flops_per_token(gpt, non_embedding)


def steps_for_flops(flops_budget: float, flops_per_token: int, global_batch_size: int, block_size: int) -> int:
    """Optimizer steps that a FLOP budget buys: floor(budget / FLOPs per step), at least 1."""
    return max(1, math.floor(flops_budget / (flops_per_token * global_batch_size * block_size)))


def budget_steps(cfg: Config, shape: Shape) -> int:
    """A trial's step budget: tune.flops_budget (when set) at this shape's
    cost, else tune.max_steps."""
    if cfg.tune.flops_budget is None:
        return cfg.tune.max_steps
    _, fpt = model_cost(cfg, shape)
    return steps_for_flops(cfg.tune.flops_budget, fpt, cfg.train.global_batch_size, cfg.model.block_size)


def reports_per_trial(cfg: Config, shapes: list[Shape]) -> int:
    """How often every trial reports and evaluates. The trial with the
    fewest steps reports at the configured interval (the smaller of
    train.log_interval and train.eval_interval), or more often to reach
    MIN_REPORTS; the others report as often, at longer intervals."""
    fewest = min(budget_steps(cfg, s) for s in shapes)
    interval = min(cfg.train.log_interval, cfg.train.eval_interval)
    return min(fewest, max(MIN_REPORTS, math.ceil(fewest / interval)))


def report_interval(steps: int, reports: int) -> int:
    return math.ceil(steps / reports)


def trial_config(cfg: Config, shape: Shape, learning_rate: float, reports: int, seed: int | None = None) -> Config:
    """The full config of one trial (validated): the shape, the learning
    rate (min_lr keeps its ratio to it), the step budget, and an eval at
    every report so that the metric is in every result ASHA sees."""
    trial = config_from_dict(cfg.to_dict())
    trial.model.n_layer, trial.model.n_head, trial.model.n_embd = shape.n_layer, shape.n_head, shape.n_embd
    t = trial.train
    t.min_lr = float(f"{learning_rate * cfg.train.min_lr / cfg.train.learning_rate:.12g}")
    t.learning_rate = learning_rate
    t.max_steps = budget_steps(cfg, shape)
    interval = report_interval(t.max_steps, reports)
    t.log_interval = t.eval_interval = interval
    t.checkpoint_interval = interval * math.ceil(cfg.train.checkpoint_interval / interval)
    if seed is not None:
        t.seed = seed
    t.run_name = None
    return config_from_dict(trial.to_dict())


# --- resources ---------------------------------------------------------------------


def trial_cpus(cfg: Config) -> float:
    """CPUs one trial holds: its Train workers and its own driver."""
    return cfg.ray.num_workers * cfg.ray.cpus_per_worker + TRIAL_DRIVER_CPU


def concurrent_trials(cfg: Config, available_cpus: float, available_gpus: float = 0.0, gpu: bool = False) -> int:
    """Trials that fit side by side: Tune only books each trial's driver,
    the Train workers ask Ray for their resources themselves, so the limit
    must come from here. At least 1; tune.max_concurrent_trials caps it."""
    fit = math.floor(available_cpus / trial_cpus(cfg) + 1e-9)
    if gpu:
        fit = min(fit, math.floor(available_gpus / (cfg.ray.num_workers * cfg.ray.gpus_per_worker) + 1e-9))
    cap = cfg.tune.max_concurrent_trials or fit
    return max(1, min(fit, cap))


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"
