"""Text generation from a trained GPT, with the key/value cache.

While the sequence fits in `block_size`, each new token costs one position:
the prompt is prefilled once and every later step feeds only the newest
token against the cached keys and values.

Once the sequence outgrows `block_size` we crop and recompute: every step
re-runs the last `block_size` tokens, exactly as the cache-free
`GPT.generate` does. The position embeddings are learned and absolute, so
when the window slides by one every token moves to a new position and no
cached key or value stays valid; re-prefilling a shorter tail instead would
be cheaper but would condition on less context than `GPT.generate` and give
different tokens. We keep the two paths token-for-token identical for the
same seed (tests/test_sampling.py checks it).

temperature <= 0 means greedy decoding (argmax), see `sample_next_token`.
"""

from __future__ import annotations

import codecs
import sys
from typing import Callable, TextIO

import torch

from gptdist.model import GPT, KVCache, sample_next_token
from gptdist.tokenizer import EOT_TOKEN, encode, get_tokenizer


@torch.no_grad()
def generate_cached(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    stop_at_eot: bool = False,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """`GPT.generate` with a key/value cache: returns idx (B, T) extended by
    up to `max_new_tokens` columns. `on_token` gets each new (B, 1) column as
    it is drawn. With `stop_at_eot`, generation ends once every row has
    produced <|endoftext|> (rows that finished earlier keep being extended)."""
    cache: KVCache | None = None
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits, cache = _next_token_logits(model, idx, cache)
        idx_next = sample_next_token(logits, temperature, top_k, generator)
        idx = torch.cat((idx, idx_next), dim=1)
        if on_token is not None:
            on_token(idx_next)
        if stop_at_eot:
            finished |= idx_next[:, 0] == EOT_TOKEN
            if bool(finished.all()):
                break
    return idx


def _next_token_logits(
    model: GPT, idx: torch.Tensor, cache: KVCache | None
) -> tuple[torch.Tensor, KVCache]:
    """Last-position logits for the window `GPT.generate` would look at."""
    block_size = model.config.block_size
    if cache is None or idx.size(1) > block_size:
        # First step (prefill) or a slid window: recompute it whole.
        logits, _, cache = model(idx[:, -block_size:])
    else:
        logits, _, cache = model(idx[:, -1:], kv_cache=cache)
    return logits[:, -1, :], cache


def encode_prompt(prompt: str, block_size: int, log: TextIO | None = None) -> list[int]:
    """Prompt token ids, at most block_size of them (the left is cropped, with
    a message to `log`, default stderr). An empty prompt starts from
    <|endoftext|>, which GPT-2 training data uses as the document separator."""
    ids = encode(prompt) or [EOT_TOKEN]
    if len(ids) > block_size:
        print(
            f"prompt is {len(ids)} tokens, longer than block_size={block_size}: "
            f"keeping its last {block_size} tokens",
            file=log or sys.stderr,
        )
        ids = ids[-block_size:]
    return ids


class TextStream:
    """Writes tokens to a terminal as they arrive. A UTF-8 character can
    span two BPE tokens, so bytes go through an incremental decoder rather
    than being decoded token by token."""

    def __init__(self, out: TextIO):
        self.out = out
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write_ids(self, ids: list[int]) -> None:
        data = get_tokenizer().decode_bytes([i for i in ids if i != EOT_TOKEN])
        self.out.write(self.decoder.decode(data))
        self.out.flush()

    def close(self) -> None:
        self.out.write(self.decoder.decode(b"", final=True) + "\n")
        self.out.flush()


def sample_text(
    model: GPT,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 200,
    seed: int | None = 1337,
    num_samples: int = 1,
    stop_at_eot: bool = False,
    stream: TextIO | None = None,
    separator: str = "---------------",
) -> list[str]:
    """`num_samples` texts, each the (possibly cropped) prompt followed by
    its continuation; with `stop_at_eot` a text ends before its first
    <|endoftext|>. Samples are drawn one after another from one generator
    seeded with `seed`, and streamed to `stream` when given."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    prompt_ids = encode_prompt(prompt, model.config.block_size)
    texts = []
    for i in range(num_samples):
        if stream is not None and i > 0:
            stream.write(separator + "\n")
        texts.append(
            _one_sample(
                model, prompt_ids, max_new_tokens, temperature, top_k,
                generator, stop_at_eot, stream,
            )
        )
    return texts


def _one_sample(model, prompt_ids, max_new_tokens, temperature, top_k, generator, stop_at_eot, stream):
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    on_token = None
    if stream is not None:
        text_stream = TextStream(stream)
        text_stream.write_ids(prompt_ids)
        on_token = lambda col: text_stream.write_ids(col[0].tolist())  # noqa: E731
    out = generate_cached(
        model, idx, max_new_tokens, temperature, top_k, generator, stop_at_eot, on_token
    )
    if stream is not None:
        text_stream.close()
    new_ids = out[0, len(prompt_ids) :].tolist()
    if stop_at_eot and EOT_TOKEN in new_ids:
        new_ids = new_ids[: new_ids.index(EOT_TOKEN)]
    return get_tokenizer().decode([i for i in prompt_ids + new_ids if i != EOT_TOKEN])


def sample_main(args) -> int:
    """`gptdist sample`: resolve --from, load the model, stream samples."""
    from gptdist.checkpoint import CheckpointError
    from gptdist.checkpoint_source import load_inference_model, resolve_source

    cfg = args.cfg  # loaded and checked by cli.run
    if args.max_new_tokens < 0 or args.num_samples < 1:
        print("gptdist sample: --max-new-tokens must be >= 0 and --num-samples >= 1", file=sys.stderr)
        return 2
    try:
        source = resolve_source(args.source, cfg)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, meta = load_inference_model(source.path, device)
    except CheckpointError as e:
        print(f"gptdist sample: {e}", file=sys.stderr)
        return 1
    print(f"sampling from {source.origin} (step {meta.get('step', '?')})", file=sys.stderr)
    sample_text(
        model,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        num_samples=args.num_samples,
        stop_at_eot=args.stop_at_eot,
        stream=sys.stdout,
    )
    return 0
