"""Every byte adaptflow reads or writes goes through here, on any fsspec filesystem.

URIs may be local paths, `file://`, `s3://`, `memory://` or anything fsspec knows. A folder of
outputs is *committed* by writing its JSON manifest last: readers look for the manifest and ignore
anything without one, so a crash mid-write never exposes half an output.
"""

from __future__ import annotations

import io
import json
import posixpath
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from adaptflow import accounting
from adaptflow.errors import StoreError


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for `uri` and the path inside it (protocol stripped)."""
    return url_to_fs(uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping its protocol; `join("s3://b/x", "y")` -> `s3://b/x/y`."""
    if "://" in uri:
        proto, rest = uri.split("://", 1)
        return f"{proto}://{posixpath.join(rest, *parts)}"
    return posixpath.join(uri, *parts)


def to_uri(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    """Turn a protocol-less `path` listed by `fs` back into a URI written the way `like` was:
    plain local paths stay plain, anything with a protocol keeps it."""
    return fs.unstrip_protocol(path) if "://" in like else path


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        data = f.read()
    accounting.count(read=len(data))
    return data


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri`. Local files go through a temporary name and a rename, so a reader
    never sees a partial file; object stores publish a PUT atomically by themselves."""
    fs, path = filesystem(uri)
    accounting.count(written=len(data))
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if _is_local(fs):
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def read_json(uri: str) -> Any:
    try:
        return json.loads(read_bytes(uri))
    except FileNotFoundError:
        raise StoreError(f"not found: {uri}") from None
    except json.JSONDecodeError as e:
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
    fs, path = filesystem(uri)
    try:
        table = pq.read_table(path, filesystem=fs, columns=columns)
        if accounting.metering():
            accounting.count(read=fs.size(path))  # the file, though a column subset reads less
        return table
    except FileNotFoundError:
        raise StoreError(f"not found: {uri}") from None


def list_uris(uri: str, suffix: str = "") -> list[str]:
    """URIs of the files directly under folder `uri` whose names end with `suffix`, sorted."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    names = fs.ls(path, detail=False)
    return sorted(join(uri, posixpath.basename(n.rstrip("/"))) for n in names if n.endswith(suffix))
