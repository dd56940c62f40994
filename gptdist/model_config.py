"""The shape of a GPT, and the named presets: plain data, no torch, so
that reading and checking a configuration stays fast."""

from __future__ import annotations

from dataclasses import dataclass

# GPT-2's vocabulary is 50257 tokens; padding to a multiple of 64 makes the
# embedding and LM-head matmuls noticeably faster (nanoGPT measured ~25%).
GPT2_VOCAB_SIZE = 50257
PADDED_VOCAB_SIZE = 50304


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 512
    vocab_size: int = PADDED_VOCAB_SIZE
    dropout: float = 0.0
    bias: bool = True

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self, prefix: str = "model") -> None:
        """Raise ValueError naming the key when the shape cannot exist."""
        for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{prefix}.{key} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"{prefix}.n_embd={self.n_embd} is not divisible by {prefix}.n_head={self.n_head}"
            )
        if self.vocab_size < GPT2_VOCAB_SIZE:
            raise ValueError(
                f"{prefix}.vocab_size={self.vocab_size} is smaller than the GPT-2 "
                f"tokenizer's vocabulary ({GPT2_VOCAB_SIZE})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{prefix}.dropout must be in [0, 1), got {self.dropout!r}")


# Named shapes. The small ones train on a laptop CPU in seconds to minutes.
PRESETS: dict[str, dict[str, int]] = {
    "nano": dict(n_layer=2, n_head=2, n_embd=64),
    "micro": dict(n_layer=4, n_head=4, n_embd=128),
    "mini": dict(n_layer=6, n_head=6, n_embd=384),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
}


def preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})
