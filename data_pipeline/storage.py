"""Where datasets and checkpoints live: a local path, or any URI pyarrow
reads (`s3://`, `gs://`, `file://`, ...).

Everything that opens a dataset or a run folder goes through these few
functions, so a cluster can keep its data in object storage instead of on a
shared POSIX mount. An S3-compatible endpoint (MinIO, Ceph, a local test
server) is taken from the standard `AWS_ENDPOINT_URL` variable, which
pyarrow reads itself; credentials come from the usual AWS variables or the
machine's role.

A local path behaves exactly as the plain filesystem calls would. On a URI,
a failure to reach or read the store is a `StorageError` naming the full
URI (and the endpoint, when one is set), raised within seconds: the S3
client is given a short connect timeout and few retries.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

# Variables a Ray worker needs to reach the same object store as the driver.
# Only the endpoint and region: credentials stay with the machine's role or
# the cluster's own environment unless the user passes them on.
ENDPOINT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
# FileSystem.from_uri's S3 client retried a refused connection for 6 s per
# request (measured with pyarrow 25), and opening a dataset makes a dozen
# requests. Three attempts gave up after 1.6 s; a host that never answers
# costs at most three connect timeouts.
S3_CONNECT_TIMEOUT_S = 5.0
S3_MAX_ATTEMPTS = 3


class StorageError(OSError):
    """Object storage that cannot be reached, or refuses a request."""


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def normalize(location: str | Path) -> str:
    """A local path made absolute (`~` expanded); a URI unchanged, except
    that `file://` becomes the plain local path it names."""
    text = str(location)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if is_uri(text):
        return text.rstrip("/")
    return str(Path(text).expanduser().resolve())


def join(base: str | Path, *parts: str) -> str:
    """`base/part/...` for a path or a URI (never os.path.join on a URI)."""
    text = str(base).rstrip("/")
    return "/".join([text, *(p.strip("/") for p in parts)])


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it."""
    text = normalize(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), text
    scheme, _, rest = text.partition("://")
    bucket = rest.split("/", 1)[0]
    if scheme == "s3" and "?" not in rest and "@" not in bucket:  # not for options or credentials in the URI
        env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
        with _naming(text):
            return _s3_filesystem(bucket, env), rest
    with _naming(text):
        return pafs.FileSystem.from_uri(text)


@functools.lru_cache(maxsize=16)
def _s3_filesystem(bucket: str, aws_env: tuple) -> pafs.S3FileSystem:
    """from_uri's client for the bucket (endpoint and credentials from the
    AWS_* variables, the bucket's region looked up once), with the short
    timeouts above. Cached per bucket and AWS_* environment: without an
    endpoint, from_uri asks AWS for the region on every call."""
    fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}")
    options = fs.__reduce__()[1][0]  # the options from_uri chose
    options.update(
        region=fs.region,
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
    )
    return pafs.S3FileSystem(**options)


@contextlib.contextmanager
def _naming(location: str | Path) -> Iterator[None]:
    """On a URI, pyarrow's errors name a bucket and key; ours name the URI.
    A missing object stays a FileNotFoundError. Local paths keep their
    errors unchanged."""
    try:
        yield
    except FileNotFoundError:
        if not is_uri(location):
            raise
        raise FileNotFoundError(f"{location} does not exist") from None
    except OSError as e:
        if not is_uri(location) or isinstance(e, StorageError):
            raise
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        where = f" (endpoint {endpoint})" if endpoint and str(location).startswith("s3://") else ""
        raise StorageError(f"cannot access {location}{where}: {e}") from None


def root(location: str | Path) -> str:
    """The bucket of a URI (`s3://bucket`); `/` for a local path."""
    text = normalize(location)
    if not is_uri(text):
        return "/"
    scheme, _, rest = text.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def exists(location: str | Path) -> bool:
    fs, path = filesystem(location)
    with _naming(location):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str | Path) -> bool:
    fs, path = filesystem(location)
    with _naming(location):
        return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(location: str | Path) -> bytes:
    fs, path = filesystem(location)
    with _naming(location), fs.open_input_stream(path) as f:
        return f.read()


def open_input_file(location: str | Path) -> pafs.NativeFile:
    """A random-access file (for Parquet footers); close it after use."""
    fs, path = filesystem(location)
    with _naming(location):
        return fs.open_input_file(path)


def write_bytes(location: str | Path, data: bytes) -> None:
    """One object or file. On object storage a single PUT is atomic, which
    is what makes a manifest written last a commit marker."""
    fs, path = filesystem(location)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)
        return
    with _naming(location), fs.open_output_stream(path) as f:
        f.write(data)


def delete(location: str | Path) -> None:
    """Remove a file or a whole folder (prefix); nothing if absent."""
    fs, path = filesystem(location)
    with _naming(location):
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif kind != pafs.FileType.NotFound:
            fs.delete_file(path)


def _entries(location: str | Path) -> list[pafs.FileInfo]:
    fs, path = filesystem(location)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    with _naming(location):
        return fs.get_file_info(selector)


def list_names(location: str | Path) -> list[str]:
    """Names of the entries directly inside a folder (or prefix); [] if
    there is none."""
    return sorted(info.base_name for info in _entries(location))


def list_folders(location: str | Path) -> list[str]:
    """Names of the sub-folders directly inside a folder (or prefix)."""
    return sorted(info.base_name for info in _entries(location) if info.type == pafs.FileType.Directory)


def copy_folder(source: str | Path, destination: str | Path) -> None:
    """Copy every file under `source` to the same relative path under
    `destination` (either may be local or a URI)."""
    src_fs, src = filesystem(source)
    dst_fs, dst = filesystem(destination)
    if isinstance(dst_fs, pafs.LocalFileSystem):
        Path(dst).mkdir(parents=True, exist_ok=True)
    with _naming(source if is_uri(source) else destination):
        pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def sha256(location: str | Path) -> str:
    """Hex sha256 of a file or object, streamed in 1 MiB chunks."""
    fs, path = filesystem(location)
    digest = hashlib.sha256()
    with _naming(location), fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def endpoint_env() -> dict[str, str]:
    """The object-store endpoint settings of this process, for Ray workers."""
    return {k: os.environ[k] for k in ENDPOINT_ENV if os.environ.get(k)}
