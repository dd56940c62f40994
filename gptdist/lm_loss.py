"""The LM-head cross-entropy, computed without the full logits tensor.

Training needs the loss and its gradients, never the (B·T, V) logits. At
batch 8×512 with V = 50304 those are 824 MB in fp32: the LM-head matmul
writes them, log-softmax reads and writes them, its backward and the
cross-entropy backward do it again, and every one of those tensors is fresh
memory the kernel must fault in and zero. On a CPU that was about a fifth
of a `mini` training step (see bench/results), and on a GPU log-softmax alone was
9% of a GPT-2 124M step.

Here the head and the loss run a chunk of rows at a time, and the gradients
with respect to the hidden states and the head weight are computed in the
same pass, while the chunk's logits are still in cache: softmax minus the
one-hot target is the gradient of the summed loss. The backward pass then
only scales what the forward pass stored. PyTorch has no such fused op, and
Liger-Kernel's (the same idea) is a Triton kernel that does not run on CPUs,
hence this file. The result equals `F.cross_entropy(hidden @ weight.T, targets)`
to float rounding (tests/test_model.py checks the loss and both gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Rows per chunk: the chunk's fp32 logits are rows × V × 4 bytes (about 51 MB
# at 256 rows). Fewer rows keep them in cache between the passes over them,
# but the head matmuls (K = n_embd) run below peak on short chunks. Measured
# on CPUs (bench/results, README), alternating the sizes within one process:
# 256 rows were the faster in bf16, 512 in fp32 (1.5-5% per step on `micro`
# and `mini`), whose matmuls gain more from longer chunks than its one
# softmax pass loses.
# The weight-gradient matmul wants more rows per chunk
# (its output, V × C, is read and written once per chunk), so the chunk
# gradients are gathered into groups of `GROUP_ROWS` before that matmul.
# On a GPU each chunk costs kernel launches, so chunks there are large
# (these sizes are not yet measured on a GPU; see train_step.resolve_chunked_loss).
CHUNK_ROWS = 256
FP32_CHUNK_ROWS = 512
GROUP_ROWS = 1024
GPU_CHUNK_ROWS = 4096


def chunk_sizes(device: torch.device, dtype: torch.dtype) -> tuple[int, int]:
    """(rows per chunk, rows per weight-gradient group) on this device, for
    head matmuls in `dtype`."""
    if device.type != "cpu":
        return GPU_CHUNK_ROWS, GPU_CHUNK_ROWS
    return (FP32_CHUNK_ROWS if dtype == torch.float32 else CHUNK_ROWS), GROUP_ROWS


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype autocast would give the head matmul, else the input's."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


class LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(hidden_i · weightᵀ, targets_i), with the gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype,
                workspace: LossWorkspace):
        n = hidden.shape[0]
        chunk_rows, group_rows = chunk_sizes(hidden.device, dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            buffers = workspace.buffers(min(group_rows, n), weight.shape, dtype, hidden.device)
            x = hidden.detach().to(dtype)
            w = weight.detach().to(dtype)
            w_t = buffers.weight_t.copy_(w.t())  # (C, V): the forward matmul is faster on a row-major right operand
            grad_x = torch.empty_like(x)
            grad_w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for g0 in range(0, n, group_rows):
                g1 = min(g0 + group_rows, n)
                for c0 in range(g0, g1, chunk_rows):
                    c1 = min(c0 + chunk_rows, g1)
                    grad_logits = buffers.group[c0 - g0 : c1 - g0]
                    loss += chunk_loss_and_grad(x[c0:c1], w_t, targets[c0:c1], grad_logits)
                    torch.mm(grad_logits, w, out=grad_x[c0:c1])
                accumulate_weight_grad(grad_w, buffers.group[: g1 - g0], x[g0:g1], buffers, first=g0 == 0)
            grad_w.div_(n)  # the gradient of the mean loss
        ctx.save_for_backward(grad_x, grad_w)
        ctx.hidden_dtype, ctx.weight_dtype, ctx.n = hidden.dtype, weight.dtype, n
        return loss / n

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_x, grad_w = ctx.saved_tensors
        grad_x = (grad_x * (grad_output.float() / ctx.n)).to(ctx.hidden_dtype)
        # loss.backward() passes 1: hand grad_w over as it is rather than a
        # scaled V x C copy. Reading the value is free on a CPU; on a GPU it
        # would wait for the device, so there the product is always taken.
        if not (grad_output.device.type == "cpu" and grad_output.item() == 1.0):
            grad_w = grad_w * grad_output.float()
        return grad_x, grad_w.to(ctx.weight_dtype), None, None, None


@dataclass
class ChunkBuffers:
    """Scratch memory that every chunk reuses."""

    group: torch.Tensor  # (group rows, V), matmul dtype: the logits, then their gradient
    weight_t: torch.Tensor  # (C, V), matmul dtype
    group_grad_w: torch.Tensor | None  # (V, C), matmul dtype when that is not fp32
    group_grad_w_fp32: torch.Tensor | None  # (V, C), fp32, the same product cast up

    @classmethod
    def allocate(cls, group_rows: int, weight_shape: torch.Size, dtype: torch.dtype, device) -> ChunkBuffers:
        vocab = weight_shape[0]
        return cls(group=torch.empty((group_rows, vocab), dtype=dtype, device=device),
                   weight_t=torch.empty((weight_shape[1], vocab), dtype=dtype, device=device),
                   group_grad_w=None if dtype == torch.float32
                   else torch.empty(weight_shape, dtype=dtype, device=device),
                   group_grad_w_fp32=None if dtype == torch.float32
                   else torch.empty(weight_shape, dtype=torch.float32, device=device))


class LossWorkspace:
    """Keeps one ChunkBuffers from call to call (the model holds one).

    Fresh buffers each step cost more than their size suggests on a CPU:
    glibc hands blocks this large back to the kernel when they are freed, so
    every step faults and zeroes them again (the group buffer alone is 200 MB
    in fp32 at the `mini` shape)."""

    def __init__(self) -> None:
        self._buffers: ChunkBuffers | None = None
        self._key: tuple | None = None

    def buffers(self, group_rows: int, weight_shape: torch.Size, dtype: torch.dtype, device) -> ChunkBuffers:
        key = (group_rows, tuple(weight_shape), dtype, torch.device(device))
        if key != self._key:
            self._buffers, self._key = None, None  # free the old ones first
            self._buffers, self._key = ChunkBuffers.allocate(group_rows, weight_shape, dtype, device), key
        return self._buffers


# A target probability below this may have lost digits to underflow (the
# smallest normal fp32 and bf16 number is 1.2e-38): that row's loss, over
# 69 nats, is computed again from its logits with log_softmax.
UNDERFLOW_PROB = 1e-30


def chunk_loss_and_grad(x: torch.Tensor, w_t: torch.Tensor, targets: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Summed loss of one chunk; writes d(summed loss)/d(logits), softmax
    minus one-hot, into `out` (in the matmul dtype).

    One fused softmax is the only pass over the logits: the loss is
    -log p(target) from the same probabilities. A log_softmax for the loss
    (and, under bf16, an fp32 copy of the logits for it) cost more per chunk
    than the chunk's three matmuls on `micro`. Under bf16 the target
    probability is rounded to bf16 (relative error 2^-9, at most 0.002 in
    the loss of a token), which is finer than the bf16 rounding of the
    logits themselves, present either way."""
    rows, vocab = out.shape
    torch.mm(x, w_t, out=out)  # the logits go straight into `out` (a fresh product each chunk page-faults)
    torch.softmax(out, dim=-1, out=out)
    # Only the target elements change: `scatter_add_` on a bf16 tensor converts
    # the whole chunk to fp32 and back on a CPU, many times the cost of this.
    flat = out.view(-1)
    index = torch.arange(rows, device=targets.device) * vocab + targets
    target_probs = flat[index]
    flat[index] = target_probs - 1
    losses = -target_probs.float().log()
    underflow = (target_probs < UNDERFLOW_PROB).nonzero().squeeze(1)  # on a GPU, one wait per chunk
    if underflow.numel():
        logits = (x[underflow] @ w_t).float()
        losses[underflow] = -torch.log_softmax(logits, dim=-1).gather(1, targets[underflow, None]).squeeze(1)
    return losses.sum()


def accumulate_weight_grad(grad_w: torch.Tensor, grad_logits: torch.Tensor, x: torch.Tensor,
                           buffers: ChunkBuffers, first: bool) -> None:
    """grad_w (fp32) = (or += after the `first` group) grad_logitsᵀ · x.

    A bf16 product goes through reused buffers: PyTorch has no bf16 x bf16 ->
    fp32 matmul on CPU, and `grad_w += product` of mixed dtypes made a fresh
    fp32 copy of the product, a V × C tensor per group."""
    if grad_logits.dtype == torch.float32:
        if first:
            torch.mm(grad_logits.t(), x, out=grad_w)
        else:
            grad_w.addmm_(grad_logits.t(), x)
        return
    product = torch.mm(grad_logits.t(), x, out=buffers.group_grad_w)
    if first:
        grad_w.copy_(product)
    else:
        grad_w.add_(buffers.group_grad_w_fp32.copy_(product))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         workspace: LossWorkspace | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`.

    hidden (..., C), weight (V, C), targets (...) of token ids; `workspace`
    keeps the scratch buffers for the next call."""
    flat, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    dtype = compute_dtype(hidden)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(flat, weight, targets, dtype, workspace or LossWorkspace())
    return chunked_loss_only(flat, weight, targets, dtype)


def chunked_loss_only(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype):
    """The same mean loss without gradients (evaluation)."""
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    rows, _ = chunk_sizes(hidden.device, dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        x, w = hidden.to(dtype), weight.to(dtype)
        for c0 in range(0, x.shape[0], rows):
            log_probs = torch.log_softmax((x[c0 : c0 + rows] @ w.t()).float(), dim=-1)
            loss -= log_probs.gather(1, targets[c0 : c0 + rows, None]).sum()
    return loss / x.shape[0]
