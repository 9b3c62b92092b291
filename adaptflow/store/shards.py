"""Sharded Parquet stores keyed by image: the feature store and the training-image cache share them.

A store folder holds `shards/{key}-{nonce}.parquet` data files, each with `image_id` (and `label`,
`domain`, `split`) and one fixed-size value column per image — `embedding` (a list of float16/32) for
features, `pixels` (3 x S x S uint8 as one fixed-size binary value; a list of uint8 in stores written
before 2026-12, still read) for cached training images — and `shards/{key}.json`, the
shard's manifest, written last: it names its data file, and a data file no manifest names does not
exist. Every attempt writes its data under a fresh nonce, so a retried, killed or concurrent attempt
never overwrites a file someone may be reading. Small shards are merged by `compact_shards`; the
merged manifest lists the keys it `replaces`, which hides them at once.

A store heals: a shard manifest that cannot be read, or whose data file is damaged (truncated,
overwritten, of another width than its manifest says), is moved with its data to `quarantine/` beside
`shards/`, with the reason in `quarantine/{key}.why.txt` (`quarantine`). Its images are then missing
from the store, and the next extraction embeds them again; a reader that met the damage names the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from adaptflow.errors import IncompatibleStoreError, StoreError, StoreUnavailableError
from adaptflow.manifests import CompactionManifest, ShardManifest
from adaptflow.store import storage

log = logging.getLogger(__name__)

VALUE_COLUMNS = ("embedding", "pixels")  # the one value column a shard holds


def value_array(matrix: np.ndarray, dtype: str) -> pa.Array:
    """(N, dim) values as a shard's value column: floats as a fixed-size list (vectors to any Parquet
    reader), uint8 as fixed-size binary, one value per image: Parquet keeps a level for every element of
    a list and stores uint8 as INT32, so 1,797 cached 64 px images read in 1.45 s as a list, 0.06 s as
    binary (and 16 MB on disk against 12)."""
    m = np.ascontiguousarray(matrix.astype(dtype, copy=False))
    if m.dtype == np.uint8:
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(m.shape[1]), len(m), [None, pa.py_buffer(m)])
    return pa.FixedSizeListArray.from_arrays(pa.array(m.ravel()), m.shape[1])


def value_dim(kind: pa.DataType) -> int:
    return kind.byte_width if pa.types.is_fixed_size_binary(kind) else kind.list_size


def value_matrix(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N, dim) numpy array of a value column in either layout; read-only where it shares Arrow's memory."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    dim = value_dim(values.type)
    if pa.types.is_fixed_size_binary(values.type):
        flat = np.frombuffer(values.buffers()[1], np.uint8)[values.offset * dim : (values.offset + len(values)) * dim]
        return flat.reshape(len(values), dim)
    return values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), dim)


def _current_layout(table: pa.Table) -> pa.Table:
    """`table` with uint8 values as fixed-size binary (how an older store's pixel lists are merged)."""
    column = value_column(table)
    kind = table[column].type
    if pa.types.is_fixed_size_list(kind) and kind.value_type == pa.uint8():
        i = table.column_names.index(column)
        table = table.set_column(i, column, value_array(value_matrix(table[column]), "uint8"))
    return table


def value_column(table: pa.Table | pa.Schema) -> str:
    names = table.column_names if isinstance(table, pa.Table) else table.names
    found = [c for c in VALUE_COLUMNS if c in names]
    if len(found) != 1:
        raise StoreError(f"a shard holds exactly one of {', '.join(VALUE_COLUMNS)}; found {found}")
    return found[0]


def commit_shard(
    folder: str,
    key: str,
    table: pa.Table,
    fingerprint: str,
    dtype: str,
    start: float,
    bytes_read: int,
    replaces: list[str] | None = None,
) -> ShardManifest:
    """Data under a fresh name first, the manifest naming it last. Float embeddings are stored with
    byte-stream-split (about 9% smaller); dictionaries only for the few-valued columns (dictionary-encoded
    embeddings read ~3x slower)."""
    column = value_column(table)
    data_uri = storage.join(folder, "shards", f"{key}-{uuid.uuid4().hex[:12]}.parquet")
    kind = table[column].type
    floats = pa.types.is_fixed_size_list(kind) and pa.types.is_floating(kind.value_type)
    split = [f"{column}.list.element"] if floats else False
    nbytes = storage.write_table(
        data_uri, table, use_dictionary=["label", "domain", "split"], use_byte_stream_split=split
    )
    manifest = ShardManifest(
        shard_key=key,
        data_uri=data_uri,
        fingerprint=fingerprint,
        n_rows=table.num_rows,
        dim=value_dim(kind),
        dtype=dtype,
        seconds=time.perf_counter() - start,
        bytes_read=bytes_read,
        bytes_written=nbytes,
        replaces=replaces or [],
    )
    manifest.commit(manifest_uri(folder, key))
    return manifest


def manifest_uri(folder: str, key: str) -> str:
    return storage.join(folder, "shards", f"{key}.json")


def compact_shards(folder: str, target_rows: int, min_shards: int, orphan_age_s: float = 3600.0) -> CompactionManifest:
    """Merge committed shards under `target_rows // 2` rows into shards of up to `target_rows`, once there
    are at least `min_shards` of them, and delete data files no manifest names that are older than
    `orphan_age_s` (left by killed attempts; younger ones may belong to a run still writing).

    Crash-safe at every step: the merged shard is committed before its parts are deleted, and while both
    exist the merged manifest's `replaces` hides the parts from readers."""
    start = time.perf_counter()
    shards = committed_shards(folder)
    small = sorted((s for s in shards if s.n_rows < target_rows // 2), key=lambda s: s.shard_key)
    bytes_read = bytes_written = 0
    merged = 0
    if min_shards and len(small) >= min_shards:
        for group in _groups(small, target_rows):
            parts = [_current_layout(read_shard(s)) for s in group]
            table = first_per_image(pa.concat_tables(parts)).sort_by("image_id")
            key = hash_ids(table["image_id"].to_pylist())  # the parts' Parquet metadata carries over
            manifest = commit_shard(
                folder,
                key,
                table,
                group[0].fingerprint,
                group[0].dtype,
                time.perf_counter(),
                0,
                replaces=[s.shard_key for s in group],
            )
            bytes_read += sum(s.bytes_written for s in group)
            bytes_written += manifest.bytes_written
            merged += len(group) - 1
            for s in group:
                storage.remove(manifest_uri(folder, s.shard_key))
                storage.remove(s.data_uri)
    orphans = _remove_orphans(folder, orphan_age_s)
    return CompactionManifest(
        features_uri=folder,
        shards_before=len(shards),
        shards_after=len(shards) - merged,
        rows=sum(s.n_rows for s in shards),
        bytes_read=bytes_read,
        bytes_written=bytes_written,
        orphans_removed=orphans,
        seconds=time.perf_counter() - start,
    )


def _groups(shards: list[ShardManifest], target_rows: int) -> list[list[ShardManifest]]:
    groups, current, rows = [], [], 0
    for s in shards:
        if current and rows + s.n_rows > target_rows:
            groups.append(current)
            current, rows = [], 0
        current.append(s)
        rows += s.n_rows
    groups.append(current)
    return [g for g in groups if len(g) > 1]


def _remove_orphans(folder: str, older_than_s: float) -> int:
    named = {posixpath.basename(s.data_uri) for s in committed_shards(folder, include_replaced=True)}
    shards = storage.join(folder, "shards")
    removed = 0
    now = time.time()
    for info in storage.ls(shards):
        name = posixpath.basename(info["name"].rstrip("/"))
        if name.endswith(".parquet") and name not in named and now - _mtime(info, now) > older_than_s:
            storage.remove(storage.join(shards, name))
            removed += 1
    return removed


def _mtime(info: dict, default: float) -> float:
    """Modification time in epoch seconds from an fsspec `ls` entry (local, S3 and memory differ)."""
    for key in ("mtime", "LastModified", "created"):
        value = info.get(key)
        if value is not None:
            return value.timestamp() if hasattr(value, "timestamp") else float(value)
    return default


def committed_shards(folder: str, include_replaced: bool = False) -> list[ShardManifest]:
    """Manifests of every committed shard; data files no manifest names are invisible, and so are shards
    a committed compaction replaced (until it deletes them). A manifest that cannot be read is quarantined
    and its images count as missing."""
    shards = []
    for uri in storage.list_uris(storage.join(folder, "shards"), ".json"):
        try:
            shards.append(load_shard_manifest(uri))
        except (StoreUnavailableError, IncompatibleStoreError):
            raise
        except (StoreError, ValueError) as e:  # ValueError: pydantic's, for a manifest missing fields
            quarantine(folder, posixpath.basename(uri)[: -len(".json")], f"unreadable shard manifest: {_first_line(e)}")
    if include_replaced:
        return shards
    replaced = {key for s in shards for key in s.replaces}
    return [s for s in shards if s.shard_key not in replaced]


def load_shard_manifest(uri: str) -> ShardManifest:
    """A shard's manifest, its data file found beside it: the URI it recorded may be from where the store
    was written (another folder, another machine, a relative path from another working directory)."""
    shard = ShardManifest.load(uri)
    here = storage.join(posixpath.dirname(uri), posixpath.basename(shard.data_uri))
    return shard if here == shard.data_uri else shard.model_copy(update={"data_uri": here})


def committed_files(folder: str) -> list[str]:
    """The committed Parquet files: hand them to DuckDB, Polars or pyarrow as one dataset."""
    return [s.data_uri for s in committed_shards(folder)]


def committed_image_ids(folder: str) -> set[str]:
    """The images the store holds, as extraction plans them: a damaged shard is quarantined on the way
    (`read_shard`) and its images count as missing, so this run extracts them again."""
    ids: set[str] = set()
    for shard in committed_shards(folder):
        try:
            ids.update(read_shard(shard, ["image_id"])["image_id"].to_pylist())
        except (StoreUnavailableError, IncompatibleStoreError):
            raise
        except StoreError as e:  # damaged, and quarantined by read_shard: its images are extracted again
            log.warning("%s", e)
    return ids


def read_shard(shard: ShardManifest, columns: list[str] | None = None) -> pa.Table:
    """A committed shard's rows, refusing a file written by an incompatible adaptflow. A damaged file (it
    cannot be read, its rows or width are not what its manifest says) is quarantined (`quarantine`), and
    the StoreError names it: a rerun extracts its images again."""
    with _damage_named(shard):
        table = storage.read_table(shard.data_uri, columns=columns)
    _check(shard, table.schema, table.num_rows)
    return table


def stream_shard(shard: ShardManifest, column: str, batch_rows: int) -> Iterator[pa.Array]:
    """A committed shard's `column` in file order, `batch_rows` values at a time, checked as `read_shard`
    checks it: memory for a batch and a page (`storage.PAGE_BUFFER`), where reading the column whole holds
    all of it (4,096 cached 224 px images: 616 MB of pixels)."""
    with _damage_named(shard):
        found = storage.parquet_file(shard.data_uri)
    _check(shard, found.schema_arrow, found.metadata.num_rows)
    batches = found.iter_batches(batch_rows, columns=[column])
    while True:
        with _damage_named(shard):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch.column(0)


@contextmanager
def _damage_named(shard: ShardManifest) -> Iterator[None]:
    """A shard file that cannot be read is quarantined, and the StoreError names it."""
    try:
        yield
    except (StoreUnavailableError, IncompatibleStoreError):
        raise
    except (StoreError, OSError, pa.ArrowException) as e:
        raise _damaged(shard, f"its data file cannot be read ({_first_line(e)})") from None


def _check(shard: ShardManifest, schema: pa.Schema, num_rows: int) -> None:
    """Refuse a file of an incompatible adaptflow; quarantine one whose rows or width are not its manifest's."""
    from adaptflow.manifests import SCHEMA_VERSION

    version = (schema.metadata or {}).get(b"adaptflow.schema_version", b"?").decode()
    if version != str(SCHEMA_VERSION):
        raise IncompatibleStoreError(
            f"{shard.data_uri} has schema version {version}, this adaptflow reads version "
            f"{SCHEMA_VERSION}; use a new store or the adaptflow release that wrote it"
        )
    if num_rows != shard.n_rows:
        raise _damaged(shard, f"its data file holds {num_rows} rows, its manifest says {shard.n_rows}")
    values = [c for c in VALUE_COLUMNS if c in schema.names]
    if values and value_dim(schema.field(values[0]).type) != shard.dim:
        width = value_dim(schema.field(values[0]).type)
        raise _damaged(shard, f"its values are {width} wide, its manifest says {shard.dim}")


def quarantine(folder: str, key: str, why: str) -> None:
    """Move shard `key`'s manifest and data file from `shards/` to `quarantine/`, the reason beside them.
    Safe to repeat and to race: what is already gone is skipped."""
    shards, aside = storage.join(folder, "shards"), storage.join(folder, "quarantine")
    manifest = storage.join(shards, f"{key}.json")
    names = [f"{key}.json"]
    try:
        data = json.loads(storage.read_bytes(manifest)).get("data_uri")
        if isinstance(data, str):
            names.append(posixpath.basename(data))
    except (OSError, StoreError, ValueError, AttributeError):
        pass  # a manifest that cannot be read names no data file: orphan removal takes it later
    for name in names:
        src = storage.join(shards, name)
        try:
            storage.write_bytes(storage.join(aside, name), storage.read_bytes(src))
        except (FileNotFoundError, StoreError):
            continue
        storage.remove(src)
    storage.write_bytes(storage.join(aside, f"{key}.why.txt"), (why + "\n").encode())
    log.warning("quarantined shard %s of %s: %s; its images are extracted again by the next run", key, folder, why)


def _damaged(shard: ShardManifest, why: str) -> StoreError:
    folder = posixpath.dirname(posixpath.dirname(shard.data_uri))
    quarantine(folder, shard.shard_key, why)
    return StoreError(
        f"damaged shard {shard.data_uri}: {why}; it was moved to {storage.join(folder, 'quarantine')} and its "
        "images are extracted again when the run is repeated"
    )


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_rows(folder: str, image_ids: list[str], column: str, what: str = "features") -> np.ndarray:
    """(len(image_ids), dim) values of `column` in the order of `image_ids`, from committed shards. Holds
    every row asked for: for a bounded working set, read through `adaptflow.store.rows.ShardedRows`."""
    shards = committed_shards(folder)
    if not shards:
        raise StoreError(f"no committed {what} shards under {folder}")
    wanted = pa.array(sorted(set(image_ids)), pa.string())
    by_column = storage.is_local(storage.filesystem(folder)[0])
    parts = []
    for shard in shards:
        if by_column:  # a local file: the ids first, the values only of a shard holding some of the rows
            # (500 rows of a 100,000-image store lie in a few shards: the rest's embeddings are never read)
            ids = read_shard(shard, ["image_id"])["image_id"]
            held = pc.is_in(ids, value_set=wanted)
            if not pc.any(held).as_py():
                continue
            t = read_shard(shard, [column]).append_column("image_id", ids)
        else:  # a remote file is one GET whatever its columns: ids and values at once
            t = read_shard(shard, ["image_id", column])
            held = pc.is_in(t["image_id"], value_set=wanted)
        parts.append(_current_layout(t.filter(held)))
    table = first_per_image(pa.concat_tables(parts)) if parts else None
    position = {} if table is None else {image_id: i for i, image_id in enumerate(table["image_id"].to_pylist())}
    missing = [i for i in image_ids if i not in position]
    if missing:
        raise StoreError(
            f"{len(missing)} images have no committed {what} under {folder} (first: {missing[0]}); run extraction first"
        )
    return value_matrix(table[column])[[position[i] for i in image_ids]]


def first_per_image(table: pa.Table) -> pa.Table:
    """Drop repeated image_ids (the same bytes in two datasets, or two runs committing one image)."""
    ids = table["image_id"].to_pylist()
    seen: set[str] = set()
    keep = [not (i in seen or seen.add(i)) for i in ids]
    return table.filter(pa.array(keep))


def hash_ids(ids: list[str]) -> str:
    return hashlib.sha256(json.dumps(sorted(ids)).encode()).hexdigest()[:16]
