"""The GPT-2 model, as in nanoGPT: one file of small classes.

Token + learned position embeddings, `n_layer` pre-LayerNorm blocks of causal
multi-head self-attention and a 4x GELU MLP, a final LayerNorm and an LM head
tied to the token embedding. Attention runs through PyTorch's fused
`scaled_dot_product_attention` (flash / memory-efficient kernels on GPU), or
in training on a CPU where it measured faster, as two batched matmuls and a
softmax (`matmul_attention`; gptdist.attention_probe decides).

`forward` optionally takes a key/value cache so that sampling costs one
position per new token instead of the whole prefix (see `gptdist.sampling`).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from gptdist.lm_loss import LossWorkspace, linear_cross_entropy

# The shape and the presets live in model_config (no torch); importable from here too.
from gptdist.model_config import GPT2_VOCAB_SIZE, PADDED_VOCAB_SIZE, PRESETS, GPTConfig, preset  # noqa: F401

KVCache = list[tuple[torch.Tensor, torch.Tensor]]

ATTENTION_KINDS = ("sdpa", "matmul")


def causal_bias(T: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(T, T): 0 where a query may see a key, -inf above the diagonal; made
    once per shape in eager mode. Under `torch.compile` it is built in the
    graph (Dynamo traces through a cache and warns about it at every compile)."""
    if torch.compiler.is_compiling():
        return new_causal_bias(T, dtype, device)
    return cached_causal_bias(T, dtype, device)


def new_causal_bias(T: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((T, T), float("-inf"), dtype=dtype, device=device).triu(1)


cached_causal_bias = functools.lru_cache(maxsize=8)(new_causal_bias)


# Query rows per block of `matmul_attention`: the block of queries s..e
# takes keys 0..e only. At T = 512, four blocks compute 5/8 of the full
# T x T scores; one `mini` layer fwd+bwd took 67.5 ms in fp32 against 87-89
# for the full square (AMD EPYC, AVX-512 BF16), in bf16 40-41 against 43-44.
QUERY_BLOCK = 128


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention over (B, H, T, D) as `baddbmm` (scaled scores plus
    the causal bias), a softmax and `bmm`, a block of QUERY_BLOCK queries at
    a time against the keys up to the block's last query, so the keys above
    the diagonal are skipped rather than masked; the probabilities are kept
    for backward. On CPUs whose bf16 matmuls are fast but have no AMX, SDPA's
    fused CPU kernel ran fwd+bwd at half this speed (76 against 39 ms a layer
    for `mini`, AMD EPYC with AVX-512 BF16), the rest of the step unchanged.
    The scores are rounded to the compute dtype before the softmax, as in
    nanoGPT's non-flash path under autocast: in bf16 about twice SDPA's
    error against an fp64 reference (1.4% against 0.75% of the output)."""
    B, H, T, D = q.shape
    q, k, v = (t.reshape(B * H, T, D) for t in (q, k, v))
    if dropout_p > 0.0:
        return blocked_attention_autograd(q, k, v, dropout_p).view(B, H, T, D)
    return BlockedCausalAttention.apply(q, k, v).view(B, H, T, D)


def blocked_attention_autograd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """The same blocks with dropout on the probabilities, differentiated by
    autograd (which BlockedCausalAttention's own backward has no mask for)."""
    blocks = []
    bias = causal_bias(q.shape[1], q.dtype, q.device)
    for start, end in query_blocks(q.shape[1]):
        scores = block_scores(q, k, bias, start, end)
        blocks.append(torch.bmm(F.dropout(torch.softmax(scores, dim=-1), dropout_p), v[:, :end]))
    return torch.cat(blocks, dim=1)


def query_blocks(T: int) -> list[tuple[int, int]]:
    """(start, end) of each block of QUERY_BLOCK queries among T positions."""
    return [(start, min(start + QUERY_BLOCK, T)) for start in range(0, T, QUERY_BLOCK)]


def block_scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Scaled scores of queries start..end against keys 0..end, -inf above
    the diagonal (`bias`, causal_bias of the whole sequence): (B·H, end - start, end)."""
    return torch.baddbmm(bias[start:end, :end], q[:, start:end], k[:, :end].transpose(1, 2), alpha=q.shape[2] ** -0.5)


class BlockedCausalAttention(torch.autograd.Function):
    """matmul_attention's blocks over (B·H, T, D) with a backward of its own.

    Under autograd each block's slices of the keys and values (k[:, :end])
    give back a zero-filled full-length gradient, which autograd then adds
    up, block by block: on `mini` those fills and adds were a third of the
    attention's fwd+bwd in bf16. Here each block adds its share straight into
    one key and one value gradient (`baddbmm_` on their leading rows): one
    `mini` layer's attention took 27-28 against 41-44 ms in bf16 and 58-61
    against 68-69 in fp32 (Intel Xeon with AMX, 2 threads). PyTorch has no
    blocked causal attention of this kind on CPU, hence this class."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        probs = []
        bias = causal_bias(q.shape[1], q.dtype, q.device)
        for start, end in query_blocks(q.shape[1]):
            block = block_scores(q, k, bias, start, end)
            torch.softmax(block, dim=-1, out=block)
            out[:, start:end] = torch.bmm(block, v[:, :end])
            probs.append(block)
        ctx.save_for_backward(q, k, v, *probs)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, *probs = ctx.saved_tensors
        scale = q.shape[2] ** -0.5
        grad_out = grad_out.contiguous()
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for block, (start, end) in zip(probs, query_blocks(q.shape[1])):
            g = grad_out[:, start:end]
            grad_v[:, :end].baddbmm_(block.transpose(1, 2), g)
            # Softmax's own fused backward, the op autograd calls for torch.softmax.
            grad_scores = torch._softmax_backward_data(torch.bmm(g, v[:, :end].transpose(1, 2)), block, -1, block.dtype)
            grad_q[:, start:end] = torch.bmm(grad_scores, k[:, :end]).mul_(scale)
            grad_k[:, :end].baddbmm_(grad_scores.transpose(1, 2), q[:, start:end], alpha=scale)
        return grad_q, grad_k, grad_v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, attention: str = "sdpa"):
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={attention!r} is not one of {list(ATTENTION_KINDS)}")
        self.attention = attention
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        # With a cache, the T new queries sit at the end of the key sequence; a
        # single new query may see every key, so no mask is needed. Longer
        # chunks after a prefix are not used by sampling.
        is_causal = past is None or T > 1
        if past is not None and T > 1:
            raise ValueError("a KV-cached forward takes one new position at a time")
        dropout_p = self.dropout if self.training else 0.0
        if self.attention == "matmul" and past is None:
            y = matmul_attention(q, k, v, dropout_p)
        else:  # and always with a cache: one new query, nothing to gain
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, attention: str = "sdpa"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, attention)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, past=None):
        attn_out, present = self.attn(self.ln_1(x), past)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, present


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, chunked_loss: bool = False, attention: str = "sdpa"):
        """`chunked_loss`: with targets, compute the head and the loss a chunk
        of rows at a time (gptdist.lm_loss) and return no logits.
        `attention`: "sdpa" or "matmul" (`matmul_attention`), in training;
        the weights are the same either way."""
        super().__init__()
        config.validate()
        self.config = config
        self.chunked_loss = chunked_loss
        self.loss_workspace = LossWorkspace()  # scratch buffers of the chunked loss, kept between steps
        self.chunked_loss_fn = linear_cross_entropy  # compile_gpt swaps in one torch.compile leaves eager
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, attention) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017), as GPT-2 does: one matrix, ~38M
        # fewer parameters at 124M scale.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # Scaled init of the residual projections, per the GPT-2 paper.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; the tied LM head is counted once. With
        `non_embedding` the position embedding is left out, as in nanoGPT."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self) -> int:
        return flops_per_token(self.config, self.num_params(non_embedding=True))

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ):
        """Returns (logits for every position, loss or None, the key/value
        cache extended by these positions). With `chunked_loss` and targets
        the logits are never built, and None is returned in their place."""
        B, T = idx.shape
        start = 0 if not kv_cache else kv_cache[0][0].shape[2]
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}"
            )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        new_cache: KVCache = []
        for i, block in enumerate(self.transformer.h):
            x, present = block(x, kv_cache[i] if kv_cache else None)
            new_cache.append(present)
        x = self.transformer.ln_f(x)
        if targets is not None and self.chunked_loss:
            return None, self.chunked_loss_fn(x, self.lm_head.weight, targets, self.loss_workspace), new_cache
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss, new_cache

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Cache-free autoregressive sampling, as nanoGPT does it: every step
        re-reads the (cropped) prefix. `gptdist.sampling` has the cached path."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size :]
            logits, _, _ = self(idx_cond)
            idx_next = sample_next_token(logits[:, -1, :], temperature, top_k, generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def bare_gpt(model: nn.Module) -> GPT:
    """The GPT inside DDP (`module`) and torch.compile (`_orig_mod`) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def compile_gpt(wrapped: nn.Module, **options) -> nn.Module:
    """`torch.compile(wrapped, **options)`, `wrapped` being a GPT or DDP around
    one. The chunked loss stays eager: its loop of matmuls and in-place updates
    costs the matmuls either way. It is marked here, when a model is compiled,
    not with a decorator: `torch.compiler.disable` imports torch._dynamo, which
    would add 1.2 s to the start of every process that imports the model."""
    bare_gpt(wrapped).chunked_loss_fn = torch.compiler.disable(linear_cross_entropy)
    return torch.compile(wrapped, **options)


def sample_next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from last-position logits of shape (B, V).

    temperature <= 0 means greedy decoding (argmax), documented in the README.
    """
    logits = logits[:, :GPT2_VOCAB_SIZE].float()  # never sample padding ids
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def flops_per_token(config: GPTConfig, non_embedding_params: int) -> int:
    """Training FLOPs per token: 6N + 12·L·H·Q·T (PaLM paper, appendix B),
    N the non-embedding parameters, Q the head dim, T the context length."""
    L, H, Q, T = config.n_layer, config.n_head, config.head_dim, config.block_size
    return 6 * non_embedding_params + 12 * L * H * Q * T


def analytic_num_params(config: GPTConfig) -> int:
    """Closed-form parameter count with a tied head (used to check the model)."""
    C, V, T, L = config.n_embd, config.vocab_size, config.block_size, config.n_layer
    b = 1 if config.bias else 0
    ln = C * (1 + b)
    attn = C * 3 * C + b * 3 * C + C * C + b * C
    mlp = C * 4 * C + b * 4 * C + 4 * C * C + b * C
    per_block = 2 * ln + attn + mlp
    return V * C + T * C + L * per_block + ln
