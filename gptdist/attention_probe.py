"""Which attention trains faster on this CPU: SDPA's fused kernel or two
batched matmuls and a softmax (`gptdist.model.matmul_attention`), measured.

Neither wins everywhere. On an AMD EPYC with AVX-512 BF16 (no AMX), one
`mini` layer's causal attention took 76 ms forward and backward through
SDPA in bf16 and 39 ms as matmuls, whose bf16 `bmm` runs near the matmul
peak. In fp32 SDPA was the faster by far (91 against 222 ms) while the
matmuls computed the whole T x T square; since they skip the keys above
the diagonal a block of queries at a time, they ran 67.5 ms against SDPA's
81-84. So `train.attention: auto` on a CPU times one layer's attention
both ways, forward and backward, at the run's shape and precision, for
about a second, and keeps the figures per machine beside the precision
probe's (gptdist.precision_probe: same folder, same keying).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from gptdist.model import QUERY_BLOCK, matmul_attention
from gptdist.precision_probe import best_seconds_per_call, cache_file, cached_pair

CACHE_FILE_NAME = "attention-probe.json"

# In bf16 the matmul path only when it is at least this much faster: it
# rounds the scores to bf16 before the softmax (about twice SDPA's error),
# which a lead of a few percent, within two probes' spread, would not pay
# for. In fp32 both are exact to fp32 rounding, so the faster one is taken:
# on an Intel Xeon in fp32 the matmuls read 57.7 ms against SDPA's 60.6 and
# the whole `mini` step 3.33 s against 3.39 (bench/README.md).
BF16_MATMUL_MARGIN = 1.1


def matmul_margin(precision: str) -> float:
    """How many times faster than SDPA the matmuls must be, in `precision`."""
    return BF16_MATMUL_MARGIN if precision == "bf16" else 1.0


@dataclass(frozen=True)
class AttentionShape:
    """One layer's attention in a micro-batch: (batch, heads, positions, head width)."""

    batch: int
    heads: int
    positions: int
    head_dim: int
    precision: str  # "fp32" or "bf16": the dtype of q, k and v


@dataclass(frozen=True)
class AttentionProbe:
    attention: str  # what `auto` trains with: choose_attention of the two timings
    sdpa_s: float  # seconds per forward + backward of one layer's attention
    matmul_s: float
    cached: bool  # read from the cache file rather than measured in this process
    margin: float  # matmul_margin of the precision measured

    def summary(self) -> str:
        source = "cached" if self.cached else "measured now"
        return (f"attention auto: {self.attention} (one layer forward + backward, {source}: SDPA "
                f"{self.sdpa_s * 1e3:,.1f} ms, matmuls {self.matmul_s * 1e3:,.1f} ms; {self.rule()})")

    def rule(self) -> str:
        """How the choice was made, for the printed line and the bench table."""
        return "the faster is taken" if self.margin == 1.0 else f"matmuls need {self.margin}x"

    def facts(self) -> dict[str, str]:
        """For the run's tags (`gptdist.attention_probe.*`)."""
        return {"attention_probe.sdpa_ms": f"{self.sdpa_s * 1e3:.2f}",
                "attention_probe.matmul_ms": f"{self.matmul_s * 1e3:.2f}",
                "attention_probe.cached": str(self.cached).lower()}


def choose_attention(sdpa_s: float, matmul_s: float, precision: str) -> str:
    """"matmul" if it beats SDPA by the margin of `precision`, else "sdpa"."""
    return "matmul" if matmul_s * matmul_margin(precision) <= sdpa_s else "sdpa"


def attention_runners(shape: AttentionShape) -> dict[str, Callable[[int], None]]:
    """Functions running one layer's causal attention forward and backward
    a given number of times, through SDPA and through the matmuls."""
    dtype = torch.bfloat16 if shape.precision == "bf16" else torch.float32
    size = (shape.batch, shape.heads, shape.positions, shape.head_dim)
    q, k, v = (torch.randn(size, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(size, dtype=dtype)

    def runner(attend: Callable[[], torch.Tensor]) -> Callable[[int], None]:
        def run(calls: int) -> None:
            for _ in range(calls):
                attend().backward(grad)
        return run

    return {"sdpa": runner(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
            "matmul": runner(lambda: matmul_attention(q, k, v))}


def measure_attention(shape: AttentionShape, seconds: float = 1.0, trials: int = 5) -> tuple[float, float]:
    """(SDPA, matmul) seconds per forward + backward, the best of up to
    `trials` alternating timings in about `seconds`."""
    best = best_seconds_per_call(attention_runners(shape), seconds / 2, trials)
    return best["sdpa"], best["matmul"]


def probe_attention(shape: AttentionShape, cache: Path | None,
                    measure: Callable[[AttentionShape], tuple[float, float]] = measure_attention) -> AttentionProbe:
    """SDPA against the matmuls at `shape`, from `cache` when it holds this
    machine's timings for it, else measured (and stored there).
    `cache=None` always measures and stores nothing."""
    # The matmul path's query block and backward are part of the key: timings
    # of another implementation are not reused.
    key = {"attention": asdict(shape), "matmul_query_block": QUERY_BLOCK, "matmul_backward": "blocked"}
    sdpa_s, matmul_s, cached = cached_pair(cache, key, ("sdpa_s", "matmul_s"),
                                           lambda: measure(shape))
    return AttentionProbe(choose_attention(sdpa_s, matmul_s, shape.precision), sdpa_s, matmul_s, cached,
                          matmul_margin(shape.precision))


def attention_cache_file() -> Path:
    return cache_file(CACHE_FILE_NAME)
