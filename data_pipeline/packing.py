"""How token streams become training rows, and which documents go where.

Pure numpy, no Ray: the driver plans with these functions over small
per-document arrays (one entry per document, never the tokens), and Ray
workers assemble rows with `pack_into_blocks`.

Row layout. A split's token stream S is its documents in key order, each
followed by the end-of-text token, as GPT-2 does. With B = block_size it
gives N = (len(S) - 1) // B rows, row i = S[i*B : i*B + B + 1]. Consecutive
rows share exactly one token, so the inputs row[:-1] and targets row[1:] make
every stream position 1..N*B a prediction target exactly once. The
len(S) - N*B - 1 trailing tokens that do not fill a row are dropped and
counted.

Split. A document goes to val when a 64-bit hash of its text falls below
val_fraction * 2**64: deterministic, independent of order and parallelism,
and identical texts always land together. Each split must hold at least
B + 1 tokens (one row): when it does not, documents move over in hash order
(smallest hashes into val, largest into train) while the other split keeps
one row. A corpus with too few documents for that (a single long text file,
say) is split by stream position instead: the last val_fraction of the
stream (at least one row) becomes val. A corpus shorter than two rows is an
error.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

HASH_RANGE = 2**64


class CorpusTooSmallError(ValueError):
    """The corpus cannot give one train row and one val row."""


def token_dtype(vocab_size: int) -> np.dtype:
    # uint16 suffices for GPT-2: its vocabulary of 50257 ids is below 65536.
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def rows_in_stream(n_tokens: int, block_size: int) -> int:
    """Rows of block_size + 1 tokens, overlapping by one, that fit."""
    return max(0, (n_tokens - 1) // block_size)


def dropped_tokens(n_tokens: int, block_size: int) -> int:
    """Trailing tokens of a stream that fall in no row."""
    rows = rows_in_stream(n_tokens, block_size)
    return n_tokens - rows * block_size - 1 if rows else n_tokens


def pack_into_blocks(stream: np.ndarray, block_size: int) -> np.ndarray:
    """(N, block_size + 1) array of rows; row i = stream[i*B : i*B + B + 1].
    Requires len(stream) == N * B + 1 exactly: the caller cuts the stream."""
    n_rows = rows_in_stream(len(stream), block_size)
    if len(stream) != n_rows * block_size + 1:
        raise ValueError(f"a stream of {len(stream)} tokens is not N*{block_size}+1 tokens long")
    windows = np.lib.stride_tricks.sliding_window_view(stream, block_size + 1)
    return np.ascontiguousarray(windows[::block_size])


@dataclass
class SplitPlan:
    """A split's stream as an ordered list of document segments: document
    `doc[k]` (an index into the driver's document arrays) contributes its
    tokens [start[k], end[k])."""

    doc: np.ndarray
    start: np.ndarray
    end: np.ndarray

    @property
    def tokens(self) -> int:
        return int((self.end - self.start).sum())

    @property
    def documents(self) -> int:
        return len(self.doc)

    def segment_offsets(self) -> np.ndarray:
        """Stream position of each segment's first token, plus the total."""
        return np.concatenate([[0], np.cumsum(self.end - self.start)])


def whole_documents(mask: np.ndarray, n_tokens: np.ndarray) -> SplitPlan:
    doc = np.flatnonzero(mask)
    return SplitPlan(doc, np.zeros(len(doc), np.int64), n_tokens[doc].astype(np.int64))


def assign_splits(
    split_hash: np.ndarray, n_tokens: np.ndarray, val_fraction: float, block_size: int
) -> tuple[SplitPlan, SplitPlan, str]:
    """(train, val, method) for documents given in key order; method is
    "document-hash" or "stream-tail" (see the module docstring)."""
    need = block_size + 1
    total = int(n_tokens.sum())
    if total < 2 * need:
        raise CorpusTooSmallError(
            f"the corpus has {total} tokens; one train row and one val row of "
            f"{block_size}+1 tokens need at least {2 * need}"
        )
    threshold = np.uint64(min(HASH_RANGE - 1, int(val_fraction * HASH_RANGE)))
    is_val = split_hash < threshold
    is_val = _top_up(is_val, split_hash, n_tokens, need)
    if is_val is not None:
        is_train = _top_up(~is_val, ~split_hash, n_tokens, need)  # ~h: largest hash first
        if is_train is not None:
            return whole_documents(is_train, n_tokens), whole_documents(~is_train, n_tokens), "document-hash"
    return (*split_stream_tail(n_tokens, val_fraction, need), "stream-tail")


def _top_up(into: np.ndarray, priority: np.ndarray, n_tokens: np.ndarray, need: int):
    """Move documents into the `into` set, lowest `priority` first, until it
    holds `need` tokens, while the others keep `need`. None if impossible."""
    have = int(n_tokens[into].sum())
    if have >= need:
        return into
    others = np.flatnonzero(~into)
    others = others[np.argsort(priority[others], kind="stable")]
    gained = np.cumsum(n_tokens[others])
    k = int(np.searchsorted(gained, need - have)) + 1
    if k > len(others) or int(n_tokens[others].sum()) - int(gained[k - 1]) < need:
        return None
    moved = into.copy()
    moved[others[:k]] = True
    return moved


def split_stream_tail(n_tokens: np.ndarray, val_fraction: float, need: int) -> tuple[SplitPlan, SplitPlan]:
    """Train = the stream up to a cut, val = the rest, val holding
    max(need, ceil(val_fraction * total)) tokens and train at least `need`."""
    ends = np.cumsum(n_tokens).astype(np.int64)
    starts = ends - n_tokens
    total = int(ends[-1])
    cut = total - min(max(need, math.ceil(val_fraction * total)), total - need)
    train_docs = np.flatnonzero(starts < cut)
    val_docs = np.flatnonzero(ends > cut)
    train_end = np.minimum(ends[train_docs], cut) - starts[train_docs]
    val_start = np.maximum(starts[val_docs], cut) - starts[val_docs]
    train = SplitPlan(train_docs, np.zeros(len(train_docs), np.int64), train_end)
    val = SplitPlan(val_docs, val_start, n_tokens[val_docs].astype(np.int64))
    return train, val


def plan_shards(n_rows: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """(first_row, rows) of each shard: as few shards as hold at most
    `rows_per_shard` rows each, their sizes differing by at most one row.
    Equal shards are written in equal time by parallel tasks (a full shard
    beside a small remainder left one core idle for most of the write).
    Depends only on the counts, never on the parallelism."""
    n_shards = -(-n_rows // rows_per_shard)
    if n_shards == 0:
        return []
    sizes = [n_rows // n_shards + (k < n_rows % n_shards) for k in range(n_shards)]
    firsts = itertools.accumulate(sizes[:-1], initial=0)
    return list(zip(firsts, sizes))


def shard_segments(
    plan: SplitPlan, first_row: int, n_rows: int, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc, start, end) of the document pieces that make the stream range
    of rows first_row .. first_row + n_rows - 1: positions
    [first_row*B, (first_row + n_rows)*B + 1)."""
    lo = first_row * block_size
    hi = (first_row + n_rows) * block_size + 1
    offsets = plan.segment_offsets()
    i0 = int(np.searchsorted(offsets[1:], lo, side="right"))
    i1 = int(np.searchsorted(offsets[:-1], hi, side="left"))
    seg_pos = offsets[i0:i1]
    start = plan.start[i0:i1] + np.maximum(0, lo - seg_pos)
    end = np.minimum(plan.end[i0:i1], plan.start[i0:i1] + (hi - seg_pos))
    return plan.doc[i0:i1], start, end
