"""Will a run fit in memory? An estimate made before any worker starts.

Without it, a configuration too large for the machine is found by Ray's
memory monitor minutes later, after it has killed and restarted workers
`ray.max_failures` times. The estimate is the host memory of one CPU
training worker (GPU workers keep weights and activations on the device
and are not checked here):

    process     torch, Ray and gptdist loaded, before the model (about 0.9 GB)
    model       fp32 weights, gradients and AdamW's two moments: 16 bytes a
                parameter, plus a gradient bucket copy for DDP
    activations what backward keeps at the micro batch: about 20 values of
                4 bytes per (row, position, channel) per layer
    loss        the LM head's logits and their gradient: a chunk of rows at
                a time with the chunked loss, the whole micro batch without
    attention   with the matmul attention (`train.attention` not `sdpa`), the
                T x T probabilities each layer keeps for backward, 4 bytes
                each, doubled for the temporaries of the same size that the
                worker's malloc keeps once freed (measured: `mini` fp32 at
                8x512 rows peaked 577 MB above SDPA; this counts 604).
                Since the attention skips the keys above the diagonal a
                block of queries at a time, it keeps about 5/8 of that at
                T = 512; the estimate still counts the whole square

The constants were fitted to the peak RSS of Ray Train workers measured by
the benchmark (`micro` 1.1-1.2 GB and `mini` 1.9-2.3 GB at 8x512 rows); they
err on the high side, and a run is refused only when the estimate exceeds
the memory of the node its workers would share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gptdist.lm_loss import CHUNK_ROWS
from gptdist.model_config import GPTConfig

GiB = 2**30
PROCESS_BYTES = int(0.9 * GiB)
ACTIVATION_VALUES_PER_CHANNEL = 20
LOSS_COPIES = 3  # logits, their softmax gradient, and one temporary


class MemoryEstimateError(ValueError):
    """The configured run cannot fit in the memory of its workers' node."""


class WorkerOutOfMemoryError(RuntimeError):
    """A worker was killed for memory although the estimate let the run start."""


# How Ray reports a task or actor its memory monitor killed.
OOM_MARKERS = ("OutOfMemoryError", "running low on memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether a training failure is Ray's memory monitor killing a worker."""
    seen, text = set(), []
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return any(marker in " ".join(text) for marker in OOM_MARKERS)


@dataclass(frozen=True)
class WorkerMemory:
    process: int
    model: int
    activations: int
    loss: int
    attention: int = 0

    @property
    def total(self) -> int:
        return self.process + self.model + self.activations + self.loss + self.attention

    def describe(self) -> str:
        parts = {"process": self.process, "weights + AdamW": self.model,
                 "activations": self.activations, "loss workspace": self.loss}
        if self.attention:
            parts["attention scores"] = self.attention
        return ", ".join(f"{k} {v / GiB:.1f}" for k, v in parts.items())


def worker_memory(model: GPTConfig, num_params: int, micro_batch: int, chunked_loss: bool,
                  ddp: bool, matmul_attention: bool = False) -> WorkerMemory:
    rows = micro_batch * model.block_size
    loss_rows = min(rows, CHUNK_ROWS) if chunked_loss else rows
    scores = micro_batch * model.n_head * model.block_size ** 2  # one layer's T x T, all heads
    return WorkerMemory(
        process=PROCESS_BYTES,
        model=num_params * (16 + (4 if ddp else 0)),
        activations=ACTIVATION_VALUES_PER_CHANNEL * 4 * model.n_layer * rows * model.n_embd,
        loss=LOSS_COPIES * 4 * loss_rows * model.vocab_size,
        attention=2 * 4 * model.n_layer * scores if matmul_attention else 0,
    )


def check_fits(per_worker: WorkerMemory, workers_on_node: int, node_memory: int) -> None:
    """MemoryEstimateError naming the estimate, the memory and the knobs."""
    need = per_worker.total * workers_on_node
    if need <= node_memory:
        return
    raise MemoryEstimateError(
        f"this run needs about {need / GiB:.1f} GiB of memory for {workers_on_node} worker(s) on one node "
        f"(each: {per_worker.describe()} GiB), and the node has {node_memory / GiB:.1f} GiB for Ray workers; "
        "lower train.micro_batch_size (gradient accumulation keeps train.global_batch_size), "
        "put fewer workers on a node (ray.num_workers, ray.cpus_per_worker), choose a smaller model "
        "(model.preset), or keep train.chunked_loss on"
    )


def largest_node(nodes: list[dict], cpus_per_worker: float) -> tuple[int, int]:
    """(memory for Ray workers in bytes, workers that fit by CPU) of the
    alive node with the most memory, from `ray.nodes()`."""
    alive = [n for n in nodes if n.get("Alive")]
    best = max(alive, key=lambda n: n["Resources"].get("memory", 0))
    workers = max(1, int(best["Resources"].get("CPU", 1) // cpus_per_worker))
    return int(best["Resources"].get("memory", 0)), workers


def auto_micro_batch(rows_per_worker: int, fits: Callable[[int], bool], cap: int | None = None) -> int:
    """The largest divisor of `rows_per_worker` (at most `cap`) whose
    estimate fits; 1 when none does (check_fits then says why)."""
    for micro in range(min(rows_per_worker, cap or rows_per_worker), 0, -1):
        if rows_per_worker % micro == 0 and fits(micro):
            return micro
    return 1
