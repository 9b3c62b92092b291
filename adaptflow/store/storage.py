"""Every byte adaptflow reads or writes goes through here, on any fsspec filesystem.

URIs may be local paths, `file://`, `s3://`, `memory://` or anything fsspec knows. A folder of
outputs is *committed* by writing its JSON manifest last: readers look for the manifest and ignore
anything without one, so a crash mid-write never exposes half an output.

Remote stores (S3 and the like) take their credentials and endpoint from the environment, as botocore
does (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, `AWS_ENDPOINT_URL`, ...), never from
the configuration. On them, transient faults (connection refused or reset, timeouts, 5xx) are retried
with exponential backoff for up to `ADAPTFLOW_STORE_PATIENCE_S` seconds (default 60); a store still
unreachable after that is a StoreUnavailableError (transient: Prefect's task retries try again), every
other failure a StoreError naming the URI. Local files are read once, with Python's own errors; a local
write that fails (a read-only folder, a path through a file) is a StoreError too. An unknown scheme
(`foo://x`) is a StoreError before anything is tried.

URIs a store records are absolute (`absolute`), and readers find what a store names by where the store
is now (`rebase`), so a store keeps working after it is moved, or copied to object storage.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import posixpath
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError, IncompleteReadError
from fsspec.core import split_protocol, url_to_fs

from adaptflow.errors import StoreError, StoreNotFoundError, StoreUnavailableError
from adaptflow.store import accounting

log = logging.getLogger(__name__)
T = TypeVar("T")

PATIENCE_ENV = "ADAPTFLOW_STORE_PATIENCE_S"
_FIRST_DELAY_S, _MAX_DELAY_S = 0.5, 8.0  # 0.5, 1, 2, 4, 8, 8, ... s between tries
_TRANSIENT = (ConnectionError, TimeoutError, BotoConnectionError, HTTPClientError, IncompleteReadError)
_TRANSIENT_ERRNOS = {
    errno.EBUSY,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    getattr(errno, "EREMOTEIO", errno.EIO),
}
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
_CREATE_LOCK = threading.Lock()
PAGE_BUFFER = 1 << 20  # bytes of a column read ahead while reading a local Parquet file in parts


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for `uri` and the path inside it (protocol stripped); a StoreError for a scheme
    fsspec does not know, or one whose package is not installed."""
    protocol = split_protocol(uri)[0]
    if protocol and protocol not in fsspec.available_protocols():
        raise StoreError(
            f"unknown storage scheme {protocol}:// in {uri} (local paths need none; known: file://, "
            "s3://, memory:// and the other fsspec protocols)"
        )
    try:
        return url_to_fs(uri)
    except ImportError as e:  # a known protocol whose package is missing, e.g. gs:// without gcsfs
        raise StoreError(f"cannot open {uri}: {e}") from None


def absolute(uri: str) -> str:
    """`uri` independent of the working directory: a relative local path (or `file://` URI) made absolute;
    other filesystems' URIs as they are. Every URI a store records goes through this first."""
    if "://" not in uri:
        return os.path.abspath(uri)
    protocol, rest = uri.split("://", 1)
    return f"{protocol}://{os.path.abspath(rest)}" if protocol in ("file", "local") else uri


def rebase(uri: str, old_root: str, new_root: str) -> str:
    """`uri`, recorded under `old_root`, at the same place under `new_root` (a store that was moved,
    copied to object storage, or recorded relative to another working directory); as it is otherwise."""
    old = old_root.rstrip("/")
    if uri == old:
        return new_root
    return join(new_root, uri[len(old) + 1 :]) if uri.startswith(old + "/") else uri


def check_writable(uri: str) -> None:
    """Fail at once, with one line, when `uri` cannot hold a store or outputs: an unknown scheme, a path that
    is a file, a folder this process may not write. Writes and deletes a small probe file (creating the
    folder, which the run would create anyway)."""
    fs, path = filesystem(uri)
    probe = f".adaptflow-probe-{uuid.uuid4().hex[:12]}"
    if is_local(fs):
        if os.path.exists(path) and not os.path.isdir(path):
            raise StoreError(f"cannot use {uri}: it is a file, not a folder")
        try:
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, probe), "wb"):
                pass
            os.remove(os.path.join(path, probe))
        except OSError as e:
            raise StoreError(f"cannot write to {uri}: {_why(e, path)}") from None
        return
    _check_bucket(uri, fs, path)
    try:
        write_bytes(join(uri, probe), b"")
    except StoreUnavailableError:
        raise
    except StoreError as e:
        raise StoreError(f"cannot write to {uri}: {e}") from None
    with contextlib.suppress(StoreError, OSError):  # may write but not delete: the probe is harmless
        remove(join(uri, probe))


def _check_bucket(uri: str, fs: fsspec.AbstractFileSystem, path: str) -> None:
    """An S3 store's bucket must exist: a server that creates buckets on the first write (SeaweedFS's
    default, MinIO's option) would otherwise make one of a mistyped name, and the run would succeed into
    it. Credentials that may not look at the bucket itself leave the decision to the write probe."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    if not {"s3", "s3a"} & set(protocols):
        return
    bucket = path.split("/", 1)[0]
    try:
        _call(f"s3://{bucket}", lambda fs, b: fs.info(b, refresh=True))
    except StoreNotFoundError:
        raise StoreError(
            f"cannot use {uri}: the bucket {bucket!r} does not exist; create it first (adaptflow makes the "
            "folders inside a bucket, never the bucket)"
        ) from None
    except StoreUnavailableError:
        raise
    except StoreError:
        pass


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping its protocol; `join("s3://b/x", "y")` -> `s3://b/x/y`."""
    if "://" in uri:
        proto, rest = uri.split("://", 1)
        return f"{proto}://{posixpath.join(rest, *parts)}"
    return posixpath.join(uri, *parts)


def to_uri(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    """A protocol-less `path` listed by `fs` as a URI written like `like` (local stays plain; else protocol)."""
    return fs.unstrip_protocol(path) if "://" in like else path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """A local filesystem: `read_table` reads only the columns asked for, not the whole file in one GET."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols


# Remote stores: retry what may pass, name the URI in what will not.


def _call(uri: str, op: Callable[[fsspec.AbstractFileSystem, str], T]) -> T:
    """`op(fs, path)` for `uri`: once on local files; on a remote store, transient faults are retried
    with exponential backoff until the patience runs out, and failures become StoreErrors."""
    fs, path = filesystem(uri)
    if is_local(fs):
        return op(fs, path)
    patience = float(os.environ.get(PATIENCE_ENV, 60))
    deadline, delay = time.monotonic() + patience, _FIRST_DELAY_S
    while True:
        try:
            return op(fs, path)
        except Exception as e:
            if not _is_transient(e):
                error = _store_error(uri, e, fs)
                if error is None:
                    raise
                raise error from None
            if time.monotonic() + delay > deadline:
                raise StoreUnavailableError(
                    f"store unreachable: {uri} (gave up after {patience:g} s; last error: {_describe(e, fs)})"
                ) from None
            log.warning("store unreachable: %s (%s); retrying in %g s", uri, _describe(e, fs), delay)
            time.sleep(delay)
            delay = min(2 * delay, _MAX_DELAY_S)


def _is_transient(e: BaseException) -> bool:
    """A network fault or a server-side (5xx, 429) error, here or in the errors that caused it. A missing
    object or a refused credential is permanent, whatever caused it."""
    if isinstance(e, (FileNotFoundError, PermissionError)):
        return False
    seen: set[int] = set()
    err: BaseException | None = e
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        status = (getattr(err, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        if (
            isinstance(err, _TRANSIENT)
            or type(err).__module__.startswith("aiohttp")
            or (isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS)
            or (isinstance(status, int) and (status >= 500 or status == 429))
        ):
            return True
        err = err.__cause__ or err.__context__
    return False


def _store_error(uri: str, e: Exception, fs: fsspec.AbstractFileSystem) -> StoreError | None:
    """The StoreError a user reads for a permanent failure; None for what is not a storage failure (a
    bug, a bad argument) or already a StoreError, to be raised as it is."""
    if isinstance(e, StoreError):
        return None
    if isinstance(e, FileNotFoundError):
        detail = _describe(e, fs)
        return StoreNotFoundError(f"not found: {uri}" + ("" if detail in uri else f" ({detail})"))
    if isinstance(e, PermissionError):
        return StoreError(
            f"access denied: {uri} ({_describe(e, fs)}); check the credentials in the "
            "environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        )
    if isinstance(e, OSError) or type(e).__module__.startswith(("botocore", "s3fs")):
        return StoreError(f"cannot access {uri}: {_describe(e, fs)}")
    return None


def _describe(e: BaseException, fs: fsspec.AbstractFileSystem) -> str:
    """The error's message with every credential this process knows of masked."""
    text = str(e) or type(e).__name__
    known = [os.environ.get(name) for name in _SECRET_ENV]
    known += [getattr(fs, name, None) for name in ("key", "secret", "token")]
    for value in known:
        if isinstance(value, str) and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def exists(uri: str) -> bool:
    def op(fs: fsspec.AbstractFileSystem, path: str) -> bool:
        fs.invalidate_cache(path)  # another process may have written it since this one last listed
        return fs.exists(path)

    return _call(uri, op)


def read_bytes(uri: str) -> bytes:
    data = _call(uri, lambda fs, path: fs.cat_file(path))
    accounting.count(read=len(data))
    return data


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri`. Local files go through a temporary name and a rename, so a reader
    never sees a partial file; object stores publish a PUT atomically by themselves (and have no
    folders to make: a missing bucket is an error, never created behind the user's back)."""
    fs, path = filesystem(uri)
    accounting.count(written=len(data))
    if is_local(fs):
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            parent = posixpath.dirname(path)
            if parent:
                fs.makedirs(parent, exist_ok=True)
            with fs.open(tmp, "wb") as f:
                f.write(data)
            fs.mv(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise _local_write_error(uri, e) from None
    else:
        extra = _content_type(uri)
        _call(uri, lambda fs, path: fs.pipe_file(path, data, **extra))


_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".json": "application/json", ".png": "image/png"}


def _content_type(uri: str) -> dict[str, str]:
    """S3 objects that a browser opens (the report, the history page) get their content type, so a link to
    them shows the page instead of downloading `binary/octet-stream`."""
    content_type = _CONTENT_TYPES.get(posixpath.splitext(uri)[1].lower())
    return {"ContentType": content_type} if content_type and split_protocol(uri)[0] in ("s3", "s3a") else {}


def _local_write_error(uri: str, e: OSError) -> StoreError:
    """A failed local write, in one line."""
    message = f"cannot write {uri}: {_why(e, uri)}"
    return StoreUnavailableError(message) if e.errno in _TRANSIENT_ERRNOS else StoreError(message)


def _why(e: OSError, path: str) -> str:
    """What the system said, and where when that is not `path` itself (the part of it that was refused)."""
    where = f" ({e.filename})" if e.filename and str(e.filename) != path else ""
    return f"{(e.strerror or str(e)).lower()}{where}"


def read_json(uri: str) -> Any:
    try:
        return json.loads(read_bytes(uri))
    except StoreError:
        raise
    except FileNotFoundError:
        raise StoreError(f"not found: {uri}") from None
    except OSError as e:  # a local file this process may not read, a folder where a file should be
        raise StoreError(f"cannot read {uri}: {_why(e, uri)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"not valid JSON: {uri} ({e})") from None


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def write_table(uri: str, table: pa.Table, **parquet_options: Any) -> int:
    """Write a Parquet file (zstd) and return its size in bytes."""
    buf = io.BytesIO()
    parquet_options.setdefault("compression", "zstd")
    pq.write_table(table, buf, **parquet_options)
    data = buf.getvalue()
    write_bytes(uri, data)
    return len(data)


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file; from a remote store in one GET (retried as a whole), not one request per column."""
    fs, path = filesystem(uri)
    with _reading(uri):
        if not is_local(fs):
            return pq.read_table(pa.BufferReader(read_bytes(uri)), columns=columns)  # read_bytes counts
        if columns is None:
            table, read = pq.read_table(path, filesystem=fs), fs.size(path) if accounting.metering() else 0
        else:  # counted as the column chunks read, not the whole file
            found = pq.ParquetFile(path, filesystem=fs)
            table, read = found.read(columns=columns), _column_bytes(found.metadata, columns)
        accounting.count(read=read)
        return table


def _column_bytes(meta: pq.FileMetaData, columns: list[str]) -> int:
    chunks = (meta.row_group(g).column(c) for g in range(meta.num_row_groups) for c in range(meta.num_columns))
    read = sum(c.total_compressed_size for c in chunks if c.path_in_schema.split(".")[0] in columns)
    return read + meta.serialized_size + 8  # the footer and its length


def parquet_file(uri: str) -> pq.ParquetFile:
    """A Parquet file to read in parts (row groups, record batches), counted as read whole. A remote one is
    fetched in one GET, as `read_table` does; a local one is read as its parts are: a column PAGE_BUFFER
    bytes at a time rather than a column chunk (a shard's every value) at once."""
    fs, path = filesystem(uri)
    with _reading(uri):
        if not is_local(fs):
            return pq.ParquetFile(pa.BufferReader(read_bytes(uri)))
        found = pq.ParquetFile(path, buffer_size=PAGE_BUFFER, pre_buffer=False)
        if accounting.metering():
            accounting.count(read=fs.size(path))
        return found


@contextlib.contextmanager
def _reading(uri: str) -> Iterator[None]:
    """A local file's errors as StoreErrors naming `uri` (a remote store's are, by `_call`)."""
    try:
        yield
    except StoreError:
        raise
    except FileNotFoundError:
        raise StoreError(f"not found: {uri}") from None
    except OSError as e:
        raise StoreError(f"cannot read {uri}: {_why(e, uri)}") from None


def list_uris(uri: str, suffix: str = "") -> list[str]:
    """URIs of the files directly under folder `uri` whose names end with `suffix`, sorted."""

    def op(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
        fs.invalidate_cache(path)  # a listing cached by s3fs misses what other processes wrote since
        return fs.ls(path, detail=False) if fs.exists(path) else []

    names = _call(uri, op)
    return sorted(join(uri, posixpath.basename(n.rstrip("/"))) for n in names if n.endswith(suffix))


def ls(uri: str) -> list[dict]:
    """fsspec `ls` entries (name, type, size, mtime/LastModified...) directly under folder `uri`; [] when
    it does not exist."""

    def op(fs: fsspec.AbstractFileSystem, path: str) -> list[dict]:
        fs.invalidate_cache(path)
        return fs.ls(path, detail=True) if fs.exists(path) else []

    return _call(uri, op)


def find(uri: str) -> list[str]:
    """Paths (protocol stripped) of every file anywhere under folder `uri`."""
    return _call(uri, lambda fs, path: fs.find(path))


def walk_files(uri: str) -> tuple[dict[str, dict], dict[str, str]]:
    """Everything under folder `uri` but folders: ({path: fsspec's detail} — type "file" for a regular file,
    "other" for a named pipe, socket or device, which must never be read; size, and what the filesystem says
    of its version: mtime, ETag, ...), and {path: why} for each folder below that could not be listed (no
    permission, say), which a plain `find` leaves out without a word. An object store lists a prefix in one
    recursive call; a local tree is walked folder by folder, since fsspec's `find` drops the error callback
    below the first level."""
    unreadable: dict[str, str] = {}

    def walk(fs, path: str, found: dict[str, dict]) -> dict[str, dict]:
        try:
            listing = fs.ls(path, detail=True)
        except OSError as e:
            unreadable[path] = f"{type(e).__name__}: {e.strerror or e}"
            return found
        for entry in listing:
            if entry.get("type") == "directory":
                walk(fs, entry["name"], found)
            else:
                found[entry["name"]] = entry
        return found

    def op(fs, path):
        if is_local(fs):
            return walk(fs, path, {})
        return fs.find(path, detail=True)

    return _call(uri, op), unreadable


def isfile(uri: str) -> bool:
    return _call(uri, lambda fs, path: fs.isfile(path))


def info(uri: str) -> dict:
    return _call(uri, lambda fs, path: fs.info(path))


def remove(uri: str) -> None:
    """Delete one file; a file already gone is fine."""

    def op(fs: fsspec.AbstractFileSystem, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)

    _call(uri, op)


def browser_url(uri: str, expires_s: int | None) -> str:
    """A URL a person can open for `uri`: a local path becomes a file:// URL; an s3:// object, with
    `expires_s`, a presigned URL (HTTPS on AWS: the endpoint's scheme) valid that long, signed as botocore
    signs for the endpoint; anything else, or `expires_s` None, the URI as it is. A presigned URL carries
    the access key ID and a signature, never the secret key."""
    if "://" not in uri:
        return "file://" + os.path.abspath(uri)
    if not expires_s or split_protocol(uri)[0] not in ("s3", "s3a"):
        return uri
    return _call(uri, lambda fs, path: fs.sign(path, expiration=int(expires_s)))


def create_only(uri: str, data: bytes) -> bool:
    """Write `data` to `uri` unless something is there already; False if it was. Exclusive across
    processes on local files (a hard link) and S3 (`If-None-Match`); within this process on memory://."""
    fs, path = filesystem(uri)
    if is_local(fs):
        # A complete temporary file, then a hard link: atomic and exclusive, so no reader sees half a file.
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.remove(tmp)
        except OSError as e:
            raise _local_write_error(uri, e) from None

    def op(fs: fsspec.AbstractFileSystem, path: str) -> bool:
        # s3fs reports a lost If-None-Match race as a 412 in a plain OSError: look at what is there now
        with _CREATE_LOCK:
            try:
                fs.pipe_file(path, data, mode="create")
                return True
            except FileExistsError:
                return False
            except OSError:
                fs.invalidate_cache(posixpath.dirname(path))
                if fs.exists(path):
                    return False
                raise

    return _call(uri, op)
