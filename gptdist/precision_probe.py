"""Which precision trains faster on this CPU, measured rather than read
from its flags.

A bf16 flag promises little: on one 2-core Xeon VM with AVX-512 BF16 (no
AMX) a 2048² matmul ran at 292 GFLOP/s in fp32 and 159 in bf16, and a bf16
run trained at 0.6x the fp32 speed; on an AMD EPYC with the same flag bf16
autocast trained 1.6x faster than fp32. So `train.precision: auto` on a CPU times
the model's own matmuls both ways for a second or two (forward only, with
the worker's torch thread count) and keeps the result per machine in a small
JSON file, so that later runs read it instead of measuring again.

The cache lives in $GPTDIST_CACHE_DIR, else ~/.cache/gptdist. An entry is
keyed by everything the figures depend on: the CPU's model name and flags,
the torch version, the thread count and the shapes. A file that cannot be
read as such is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from gptdist.lm_loss import CHUNK_ROWS
from gptdist.model_config import GPTConfig

CACHE_DIR_ENV = "GPTDIST_CACHE_DIR"
CACHE_FILE_NAME = "precision-probe.json"

# bf16 only when it is at least this much faster on the model's matmuls.
# The probe times the matmuls alone, forward only, while a training step
# also runs the softmax, the loss and AdamW in fp32 at the same speed either
# way, so a matmul lead of a few percent shrinks to nothing in a step and
# would not pay for bf16's coarser rounding; and two probes of one CPU differ
# by a few percent, which must not flip the choice from run to run.
BF16_MARGIN = 1.1

# bf16 this much slower than fp32 on the smaller shapes means PyTorch
# emulates bf16 matmuls (no bf16 instructions: 1.2 against 128 GFLOP/s
# measured on an AVX2 CPU), where each large shape would take seconds: the
# remaining shapes are then timed in fp32 only.
BF16_HOPELESS = 10.0

# Settings that cap the instructions the kernels use: oneDNN's (bf16
# matmuls; AVX512_CORE_BF16 hides AMX, and bf16 then read 176 GFLOP/s
# against fp32's 200-250 on a Xeon whose AMX gave 1,100-1,300), MKL's (fp32
# matmuls) and PyTorch's own vectorized kernels. The same CPU with another
# cap is another machine to the probes.
ISA_CAP_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


@dataclass(frozen=True)
class Matmul:
    """One product of a forward pass: (rows, k) times (k, n), `count` times.
    `linear`: an nn.Linear under autocast (fp32 input, weight cast once per
    forward); else a product of operands already in the compute dtype (the
    chunked head and loss, gptdist.lm_loss)."""

    rows: int
    k: int
    n: int
    count: int
    linear: bool = True

    @property
    def flops(self) -> int:
        return 2 * self.rows * self.k * self.n


@dataclass(frozen=True)
class ProbeResult:
    precision: str  # what `auto` trains in: choose_precision of the two figures
    fp32_flops: float  # FLOP/s over the model's matmuls, fp32
    bf16_flops: float  # the same under bf16 autocast
    cached: bool  # read from the cache file rather than measured in this process

    def summary(self) -> str:
        source = "cached" if self.cached else "measured now"
        threads = torch.get_num_threads()
        return (f"precision auto: {self.precision} (this model's matmuls, {threads} thread{'s' * (threads > 1)}, "
                f"{source}: fp32 {self.fp32_flops / 1e9:,.0f} GFLOP/s, bf16 autocast "
                f"{self.bf16_flops / 1e9:,.0f} GFLOP/s; bf16 needs {BF16_MARGIN}x)")

    def facts(self) -> dict[str, str]:
        """For the run's tags (`gptdist.precision_probe.*`)."""
        return {"precision_probe.fp32_gflops": f"{self.fp32_flops / 1e9:.1f}",
                "precision_probe.bf16_gflops": f"{self.bf16_flops / 1e9:.1f}",
                "precision_probe.cached": str(self.cached).lower()}


def choose_precision(fp32_flops: float, bf16_flops: float) -> str:
    """bf16 if it beats fp32 by BF16_MARGIN, else fp32."""
    return "bf16" if bf16_flops >= BF16_MARGIN * fp32_flops else "fp32"


def model_matmuls(config: GPTConfig, micro_batch_size: int, chunked_loss: bool) -> list[Matmul]:
    """Every matmul of one micro-batch's forward pass on a CPU worker: per
    block the QKV projection, the attention output, the MLP up and down;
    then the head, a chunk of rows at a time with the chunked loss.
    (Attention's own products are left out: at these widths they are a
    small share, and they run in SDPA's kernels, not as plain matmuls.)"""
    rows, c, layers = micro_batch_size * config.block_size, config.n_embd, config.n_layer
    if chunked_loss:
        chunk = min(CHUNK_ROWS, rows)
        head = Matmul(chunk, c, config.vocab_size, math.ceil(rows / chunk), linear=False)
    else:
        head = Matmul(rows, c, config.vocab_size, 1)
    return [Matmul(rows, c, 3 * c, layers), Matmul(rows, c, c, layers), Matmul(rows, c, 4 * c, layers),
            Matmul(rows, 4 * c, c, layers), head]


def measure_precisions(matmuls: list[Matmul], seconds: float = 1.0, trials: int = 5) -> tuple[float, float]:
    """(fp32, bf16 autocast) FLOP/s over `matmuls`, each weighted by its
    count: total FLOPs over the total of each product's best time per call.

    About `seconds` in all (plus a warm-up call of each product), with this
    process's torch thread count. fp32 and bf16 timings alternate, so that
    whatever else runs on the machine meanwhile slows both alike; the best of
    up to `trials` timings of each product is kept."""
    budget = seconds / (2 * len(matmuls))  # per product and precision
    total_flops, fp32_s = 0.0, 0.0
    bf16_flops, bf16_s = 0.0, 0.0  # over the products bf16 was timed on
    for mm in sorted(matmuls, key=lambda m: m.flops):
        fp32_run, bf16_run = matmul_runners(mm)
        total_flops += mm.count * mm.flops
        hopeless = bf16_s > BF16_HOPELESS * fp32_s
        runners = {"fp32": fp32_run} if hopeless else {"fp32": fp32_run, "bf16": bf16_run}
        best = best_seconds_per_call(runners, budget, trials)
        fp32_s += mm.count * best["fp32"]
        if "bf16" in best:
            bf16_flops += mm.count * mm.flops
            bf16_s += mm.count * best["bf16"]
    # With bf16 given up part-way, its figure is its rate on the products it ran.
    return total_flops / fp32_s, bf16_flops / bf16_s


def matmul_runners(mm: Matmul) -> tuple[Callable[[int], None], Callable[[int], None]]:
    """Two functions that run `mm` a given number of times: in fp32, and in
    bf16 as training does it."""
    x = torch.randn(mm.rows, mm.k)
    if mm.linear:
        # A leaf that requires grad, as a parameter is: autocast then casts
        # it once per region (one forward pass) and reuses the copy.
        weight = torch.randn(mm.n, mm.k, requires_grad=True)

        def fp32_run(calls: int) -> None:
            with torch.no_grad():
                for _ in range(calls):
                    F.linear(x, weight)

        def bf16_run(calls: int) -> None:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                for _ in range(calls):
                    F.linear(x, weight)

        return fp32_run, bf16_run
    # The chunked head: both operands cast once per step, a row-major (k, n) right operand.
    w_t = torch.randn(mm.k, mm.n)
    x16, w_t16 = x.to(torch.bfloat16), w_t.to(torch.bfloat16)

    def product_runner(a: torch.Tensor, b: torch.Tensor) -> Callable[[int], None]:
        def run(calls: int) -> None:
            for _ in range(calls):
                torch.mm(a, b)
        return run

    return product_runner(x, w_t), product_runner(x16, w_t16)


def best_seconds_per_call(runners: dict[str, Callable[[int], None]], budget_s: float,
                          trials: int) -> dict[str, float]:
    """Seconds per call of each runner: the best of up to `trials` timings,
    alternating between runners, each about `budget_s` in all after a
    warm-up call. A timing repeats the call enough to take budget_s / trials;
    every runner is timed at least once, however slow."""
    first = {}
    for name, run in runners.items():  # warm-up: oneDNN builds its kernels on the first call
        start = time.perf_counter()
        run(1)
        first[name] = time.perf_counter() - start
    calls = {name: max(1, int(budget_s / trials / t)) for name, t in first.items()}
    best = {name: math.inf for name in runners}
    deadline = time.perf_counter() + budget_s * len(runners)
    for i in range(trials):
        if i and time.perf_counter() > deadline:
            break
        for name, run in runners.items():
            start = time.perf_counter()
            run(calls[name])
            best[name] = min(best[name], (time.perf_counter() - start) / calls[name])
    return best


# --- the cache -----------------------------------------------------------------


def cache_file(name: str = CACHE_FILE_NAME) -> Path:
    """A probe's cache file (this one's, or gptdist.attention_probe's)."""
    root = os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "gptdist"
    return Path(root) / name


def cache_key(inputs: dict) -> str:
    """This machine's identity and a probe's `inputs`, hashed: what its
    figures depend on (the readable parts are stored beside)."""
    identity = {**machine_identity(), **inputs}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def isa_caps() -> dict[str, str]:
    """The instruction-set caps (ISA_CAP_ENV) set in this process's environment."""
    return {name: os.environ[name] for name in ISA_CAP_ENV if os.environ.get(name)}


def machine_identity() -> dict:
    """CPU model name and flags, torch version and thread count: hosts of
    one name can differ in flags, and a thread more or less changes the
    figures. Instruction-set caps are named only when set, so that the
    entries of an uncapped machine keep their keys."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first CPU's
    except OSError:
        pass
    model, flags = fields.get("model name") or platform.processor(), fields.get("flags", "")
    identity = {"cpu": model, "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16],
                "torch": torch.__version__, "threads": torch.get_num_threads()}
    return {**identity, "isa_caps": caps} if (caps := isa_caps()) else identity


def read_cache(path: Path) -> dict:
    """The file's entries, or none when it is missing or not a JSON object."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def write_cache(path: Path, entries: dict) -> None:
    """Whole-file replace, so that two workers writing at once leave one
    complete file. A cache that cannot be written only costs a measurement
    next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp",
                                         delete=False) as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.chmod(f.name, 0o644)  # a temporary file is private; the cache need not be
        os.replace(f.name, path)
    except OSError as e:
        sys.stderr.write(f"gptdist: could not write the probe cache {path}: {e}\n")


def cached_pair(cache: Path | None, inputs: dict, names: tuple[str, str],
                measure: Callable[[], tuple[float, float]], record: dict | None = None) -> tuple[float, float, bool]:
    """A probe's two figures (`names`, both positive) for `inputs` on this
    machine: from `cache` when it holds them, else `measure()`d and stored
    there with `record` (default: `inputs`) beside them; and whether they
    came from the cache. `cache=None` always measures and stores nothing."""
    key = cache_key(inputs)
    entries = read_cache(cache) if cache else {}
    entry = entries.get(key)
    try:
        first, second = float(entry[names[0]]), float(entry[names[1]])
        if first > 0 and second > 0:
            return first, second, True
    except (TypeError, KeyError, ValueError):
        pass
    first, second = measure()
    if cache:
        entries[key] = {**machine_identity(), **(inputs if record is None else record), names[0]: first,
                        names[1]: second, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_cache(cache, entries)
    return first, second, False


def probe_precision(matmuls: list[Matmul], cache: Path | None,
                    measure: Callable[[list[Matmul]], tuple[float, float]] = measure_precisions) -> ProbeResult:
    """fp32 against bf16 autocast on `matmuls`, from `cache` when it holds
    this machine's figures for them, else measured (and stored there).
    `cache=None` always measures and stores nothing."""
    fp32_flops, bf16_flops, cached = cached_pair(
        cache, {"shapes": [asdict(m) for m in matmuls]}, ("fp32_flops", "bf16_flops"), lambda: measure(matmuls),
        record={"shapes": [[m.rows, m.k, m.n, m.count] for m in matmuls]})
    return ProbeResult(choose_precision(fp32_flops, bf16_flops), fp32_flops, bf16_flops, cached)
