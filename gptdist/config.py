"""Typed run configuration: one dataclass per section of `ray_config.yaml`.

The dataclass defaults are the single source of the defaults; the YAML file
at the repository root repeats them for users to edit. `load_config` reads a
YAML file, applies `--set section.key=value` overrides, and validates every
value where it enters, with an error naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gptdist.model_config import PRESETS, GPTConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = REPO_ROOT / "ray_config.yaml"


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or invalid."""


@dataclass
class RayConfig:
    # "local" starts Ray in-process on this machine; anything else ("auto",
    # "ray://host:10001", "host:6379") connects to a running cluster.
    # RAY_ADDRESS in the environment wins over "auto".
    address: str = "local"
    num_workers: int = 1
    use_gpu: Literal["auto", "true", "false"] = "auto"
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Logical CPUs for a local Ray; more than the cores so Ray Data always
    # has a slot beside the training workers (Ray Data stalls otherwise).
    local_num_cpus: int | None = None
    storage_path: str = "runs/ray"
    max_failures: int = 0
    # How often Ray Train's controller collects the workers' reports. A
    # worker's report waits while its previous one is uncollected, so steps
    # that report faster than this are slowed to it (Ray's default is 2 s).
    controller_poll_s: float = 0.25
    # Workers' glibc malloc keeps freed memory for reuse (worker_contract.WORKER_MALLOC_ENV)
    # instead of handing it back to the kernel and faulting it in again each step.
    worker_keeps_freed_memory: bool = True


@dataclass
class DataConfig:
    path: str = "data/shakespeare"
    # Sources used when the dataset does not exist yet; see data_pipeline.
    sources: list[str] = field(default_factory=lambda: ["shakespeare"])
    val_fraction: float = 0.05
    text_column: str = "text"
    seed: int = 1337
    # How training rows reach the workers: through Ray Data (read in the
    # background from any filesystem pyarrow reads), or read by each worker
    # itself from a path every node sees (data_pipeline.stream).
    ingest: Literal["ray_data", "direct"] = "ray_data"
    prefetch_batches: int = 4  # micro-batches Ray Data reads ahead of the step
    read_cpus: float = 0.25  # logical CPUs of each rank's Ray Data reader


@dataclass
class ModelConfig:
    preset: str = "mini"
    # Explicit values override the preset's.
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int = 512
    vocab_size: int = 50304
    dropout: float = 0.0
    bias: bool = True

    def to_gpt_config(self) -> GPTConfig:
        shape = dict(PRESETS[self.preset])
        for key in ("n_layer", "n_head", "n_embd"):
            if getattr(self, key) is not None:
                shape[key] = getattr(self, key)
        return GPTConfig(
            **shape,
            block_size=self.block_size,
            vocab_size=self.vocab_size,
            dropout=self.dropout,
            bias=self.bias,
        )


@dataclass
class TrainConfig:
    run_name: str | None = None  # None: gpt-L<l>H<h>E<e>-<date-time>
    max_steps: int = 60
    global_batch_size: int = 8  # sequences per optimizer step, all workers
    # Sequences per forward pass on one worker; "auto": global / workers,
    # lowered to the largest divisor that fits the memory budget (preflight.resolve_micro_batch).
    micro_batch_size: int | Literal["auto"] = "auto"
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    lr_decay_steps: int | None = None  # None: max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    chunked_loss: bool | None = None  # None: on for CPU workers, off on GPUs
    # "auto": on a CPU the faster of the two at the run's shape and precision
    # (gptdist.attention_probe, cached per machine); SDPA on GPUs.
    attention: Literal["auto", "sdpa", "matmul"] = "auto"
    eval_interval: int = 20
    eval_batches: int = 8
    log_interval: int = 10
    checkpoint_interval: int = 20
    num_to_keep: int = 2
    seed: int = 1337
    cpu_threads: int | None = None  # None: this node's cores shared among its workers
    cpu_peak_flops: float | None = None  # None: measured by a matmul probe
    max_nonfinite_steps: int = 5
    sample_tokens: int = 64
    sample_prompt: str | None = None  # None: a line of the dataset (run_data.dataset_prompt)
    # Fault injection for tests: raise in every worker at this step (once).
    fail_at_step: int | None = None


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else SQLite under runs/
    experiment: str = "gptdist"
    required: bool = True
    log_checkpoints: Literal["all", "final", "none"] = "final"
    runs_dir: str = "runs"


@dataclass
class TuneConfig:
    n_layer: list[int] = field(default_factory=lambda: [2, 4])
    n_head: list[int] = field(default_factory=lambda: [2, 4])
    n_embd: list[int] | None = None
    head_dim: list[int] | None = None
    learning_rate: list[float] = field(default_factory=lambda: [1e-3])
    num_samples: int = 1
    metric: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["asha", "fifo"] = "asha"
    search_alg: Literal["grid", "random", "optuna"] = "grid"
    max_steps: int | None = 100  # budget per trial in steps...
    flops_budget: float | None = None  # ...or in training FLOPs per trial
    grace_period: int = 1  # ASHA, in reports
    reduction_factor: int = 2
    max_concurrent_trials: int | None = None
    name: str = "gptdist-tune"


@dataclass
class Config:
    ray: RayConfig = field(default_factory=RayConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --- loading and validation -------------------------------------------------


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; allow int where float is
    expected. Raises ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[-1] if value is not None else ConfigError(f"{key} must not be null")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and "true" in allowed:
            value = "true" if value else "false"
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _section_from_dict(cls: type, raw: Any, section: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"section {section!r} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"unknown key {section}.{unknown[0]} (known keys of {section}: {sorted(names)})"
        )
    values = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in raw.items()}
    return cls(**values)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def config_from_dict(raw: dict[str, Any]) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"a configuration must be a mapping of sections, got {raw!r}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r} (known: {sorted(SECTIONS)})")
    hints = typing.get_type_hints(Config)
    cfg = Config(**{name: _section_from_dict(hints[name], raw.get(name), name) for name in SECTIONS})
    validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.max_steps=10' -> (['train', 'max_steps'], 10). The value is
    parsed as YAML, so numbers, booleans, null and lists work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw_value = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must look like section.key")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = {k: dict(v or {}) for k, v in raw.items()}
    for text in overrides:
        (section, key), value = parse_override(text)
        if section not in SECTIONS:
            raise ConfigError(f"unknown section {section!r} in override {text!r}")
        raw.setdefault(section, {})[key] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read `path` (default: the repository's ray_config.yaml, or the
    dataclass defaults when it is absent, e.g. in an installed package),
    apply overrides, validate."""
    if path is None:
        raw = read_yaml(DEFAULT_CONFIG_PATH) if DEFAULT_CONFIG_PATH.is_file() else {}
        where = str(DEFAULT_CONFIG_PATH)
    else:
        raw = read_yaml(path)
        where = str(path)
    if overrides:
        where += " with --set " + " ".join(overrides)
    try:
        return config_from_dict(apply_overrides(raw, overrides or []))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def validate(cfg: Config) -> None:
    """Cross-field checks that the types alone cannot express."""
    m = cfg.model
    if m.preset not in PRESETS:
        raise ConfigError(f"model.preset={m.preset!r} is not one of {sorted(PRESETS)}")
    try:
        m.to_gpt_config().validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    positive = {
        "ray.num_workers": cfg.ray.num_workers,
        "train.max_steps": cfg.train.max_steps,
        "train.global_batch_size": cfg.train.global_batch_size,
        "train.eval_interval": cfg.train.eval_interval,
        "train.eval_batches": cfg.train.eval_batches,
        "train.log_interval": cfg.train.log_interval,
        "train.checkpoint_interval": cfg.train.checkpoint_interval,
        "train.num_to_keep": cfg.train.num_to_keep,
        "train.max_nonfinite_steps": cfg.train.max_nonfinite_steps,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    if cfg.ray.cpus_per_worker <= 0:
        raise ConfigError(f"ray.cpus_per_worker={cfg.ray.cpus_per_worker} must be positive")
    if cfg.ray.max_failures < 0:
        raise ConfigError(f"ray.max_failures={cfg.ray.max_failures} must be >= 0")
    if not cfg.ray.controller_poll_s > 0:
        raise ConfigError(f"ray.controller_poll_s={cfg.ray.controller_poll_s} must be > 0")
    t = cfg.train
    if t.learning_rate <= 0 or t.min_lr < 0 or t.min_lr > t.learning_rate:
        raise ConfigError(
            f"train.learning_rate={t.learning_rate} and train.min_lr={t.min_lr} must satisfy "
            "0 <= min_lr <= learning_rate, learning_rate > 0"
        )
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be >= 0")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in (0, 1)")
    if cfg.data.prefetch_batches < 0:
        raise ConfigError(f"data.prefetch_batches={cfg.data.prefetch_batches} must be >= 0")
    if not cfg.data.read_cpus > 0:
        raise ConfigError(f"data.read_cpus={cfg.data.read_cpus} must be > 0")
    if t.micro_batch_size == "auto":
        if t.global_batch_size % cfg.ray.num_workers:
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                              f"ray.num_workers={cfg.ray.num_workers}")
        return
    if t.micro_batch_size < 1:
        raise ConfigError(f"train.micro_batch_size={t.micro_batch_size} must be at least 1 (or auto)")
    gradient_accumulation_steps(t.global_batch_size, t.micro_batch_size, cfg.ray.num_workers)


def gradient_accumulation_steps(global_batch: int, micro_batch: int, num_workers: int) -> int:
    """Micro-steps per optimizer step so that micro_batch x workers x steps
    equals the global batch; an indivisible combination is an error."""
    per_step = micro_batch * num_workers
    if global_batch % per_step != 0:
        raise ConfigError(
            f"train.global_batch_size={global_batch} is not divisible by "
            f"train.micro_batch_size={micro_batch} x ray.num_workers={num_workers} = {per_step}"
        )
    return global_batch // per_step


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'max_steps': 5}} -> {'train.max_steps': 5}"""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
