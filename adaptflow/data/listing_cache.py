"""What the last ingest of a dataset found in each of its files, kept in the store, so that the next ingest
opens only the files that are new or changed: a nightly retraining on a dataset that grew a little reads
the new images, not the whole dataset again.

{cache}/listing-{nonce}.parquet          one row per file checked: uri, size, signature, the check's verdict
                                         (image_id, reason or null, width, height, format) and read_at
{cache}/listing.json                     the commit (`IngestListing`), written last: names the listing file
{cache}/parts/part-{nonce}-{n}.parquet   verdicts flushed while an ingest checks (every PART_ROWS files, or
                                         PART_EVERY_S seconds), so a killed ingest resumes; removed at the commit

A file is known by what its filesystem lists, never by its bytes: the same URI, size and signature (S3's
ETag, a local file's mtime) is the same file, and its verdict is reused without opening it; a filesystem
that reports no signature gets every file read. Only verdicts on a file's bytes are kept (an image, or why
its bytes are refused): a file that could not be read at all (missing, unreachable) is tried again next
time. A verdict older than `full_check_days` is made again, changed file or not (a file rewritten with its
size and mtime kept, as `cp -p` or `rsync -a` can, is caught then); `rehash` makes every one again.
"""

from __future__ import annotations

import logging
import posixpath
import threading
import time
import uuid
from datetime import datetime
from typing import NamedTuple

import pyarrow as pa

from adaptflow.config import IngestConfig
from adaptflow.errors import StoreError, StoreUnavailableError
from adaptflow.manifests import IngestListing
from adaptflow.store import storage

log = logging.getLogger(__name__)

PART_ROWS = 1000  # verdicts per part file while checking,
PART_EVERY_S = 30.0  # or fewer when this long has passed since the last part: what a kill may lose
# What a listing says of a file's version, best first: S3's ETag, a local file's mtime, and memory://'s
# creation time (a write there makes a new file). The key is part of the signature.
_SIGNATURE_KEYS = ("ETag", "mtime", "LastModified", "created")

LISTING_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("size", pa.int64()),
        ("signature", pa.string()),  # e.g. 'ETag="9b2c…"' or "mtime=1796609923.94"
        ("image_id", pa.string()),  # null for an empty file
        ("reason", pa.string()),  # null for a valid image
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("read_at", pa.float64()),  # epoch seconds: when the file was last read
    ]
)


class Stat(NamedTuple):
    """What a listing says of a file: its size, and a signature that changes when its bytes do."""

    size: int
    signature: str  # "" when the filesystem reports none: such a file is always read


def stat_of(detail: dict) -> Stat:
    """The Stat of one fsspec listing entry (`ls`/`find` with detail=True, or `info`)."""
    size = int(detail.get("size") or 0)
    for key in _SIGNATURE_KEYS:
        value = detail.get(key)
        if value is not None:
            return Stat(size, f"{key}={value.timestamp() if isinstance(value, datetime) else value}")
    return Stat(size, "")


def stat(uri: str) -> Stat | None:
    """The Stat of one file, asked of its filesystem (a manifest's rows are not listed); None when there is
    none to be had: the file is then read, and reading it says what is wrong."""
    try:
        return stat_of(storage.info(uri))
    except (StoreError, OSError):
        return None


class ListingCache:
    """The verdicts of a dataset's earlier ingests in folder `uri` (`layout.ingest_cache_uri`), made with
    `settings`, and this ingest's. Look each listed file up (`reuse`) before reading it, `record` what
    reading found, and `commit` once the ingest's own manifest is committed: the new listing holds the
    files this ingest checked, so a deleted file leaves it. Safe to call from the checking threads."""

    def __init__(self, uri: str, settings: dict, cfg: IngestConfig):
        self.uri = uri
        self._settings = settings
        self._max_age_s = None if cfg.full_check_days is None else cfg.full_check_days * 86400
        self._lock = threading.Lock()
        self._nonce = uuid.uuid4().hex[:8]
        self._checked: dict[str, dict] = {}  # this ingest's verdicts by uri, reused or new: the next listing
        self._pending: list[dict] = []  # recorded since the last part
        self._flushed_at = time.monotonic()
        self._parts = storage.list_uris(storage.join(uri, "parts"), ".parquet")  # removed at the commit
        self._previous = self._committed_listing()
        # the verdicts still worth reusing, by uri: none at all with `rehash`
        self._known = {} if cfg.rehash else self._newest(self._read(self._previous, *self._parts))

    def reuse(self, uri: str, stat: Stat) -> dict | None:
        """The verdict an earlier ingest made on `uri`, if the file is listed as it was then and the verdict
        is recent enough (`full_check_days`); None when the file must be read."""
        row = self._known.get(uri)
        if row is None or not stat.signature or Stat(row["size"], row["signature"]) != stat:
            return None
        if self._max_age_s is not None and time.time() - row["read_at"] > self._max_age_s:
            return None
        with self._lock:
            self._checked[uri] = row
        return row

    def record(self, uri: str, stat: Stat, verdict: dict) -> None:
        """Remember what reading `uri`, listed as `stat`, found (image_id, reason, width, height, format);
        every PART_ROWS verdicts, or PART_EVERY_S seconds, are written as a part a later attempt reuses."""
        row = {"uri": uri, "size": stat.size, "signature": stat.signature, **verdict, "read_at": time.time()}
        with self._lock:
            self._checked[uri] = row
            self._pending.append(row)
            if len(self._pending) < PART_ROWS and time.monotonic() - self._flushed_at < PART_EVERY_S:
                return
            rows, self._pending, self._flushed_at = self._pending, [], time.monotonic()
            part = storage.join(self.uri, "parts", f"part-{self._nonce}-{len(self._parts):05d}.parquet")
            self._parts.append(part)
        storage.write_table(part, pa.Table.from_pylist(rows, schema=LISTING_SCHEMA))  # outside the lock

    def commit(self) -> None:
        """Write this ingest's verdicts as the dataset's listing and commit it, then remove the parts and the
        listing it replaces. Call it after the ingest's manifest: the listing is what a finished ingest saw."""
        rows = sorted(self._checked.values(), key=lambda r: r["uri"])
        listing_uri = storage.join(self.uri, f"listing-{self._nonce}.parquet")
        storage.write_table(listing_uri, pa.Table.from_pylist(rows, schema=LISTING_SCHEMA))
        IngestListing(settings=self._settings, listing_uri=listing_uri, n_files=len(rows)).commit(self._marker)
        for uri in [*self._parts, *([self._previous] if self._previous else [])]:
            storage.remove(uri)

    @property
    def _marker(self) -> str:
        return storage.join(self.uri, "listing.json")

    def _committed_listing(self) -> str | None:
        """The listing file the commit names, where the cache is now (a store may have moved); None when
        none is committed, or one for other settings, or a commit this adaptflow cannot read."""
        if not storage.exists(self._marker):
            return None
        try:
            listing = IngestListing.load(self._marker)
        except StoreUnavailableError:
            raise
        except (StoreError, ValueError) as e:  # an incompatible or damaged commit: start afresh
            log.warning("ignoring the listing cache %s (%s): every file is read again", self._marker, e)
            return None
        if listing.settings != self._settings:
            return None
        return storage.join(self.uri, posixpath.basename(listing.listing_uri))

    @staticmethod
    def _read(*uris: str | None) -> list[dict]:
        """The rows of listings or parts; none, with a warning, from one that cannot be read: its files are
        read again."""
        rows = []
        for uri in filter(None, uris):
            try:
                rows += storage.read_table(uri, columns=LISTING_SCHEMA.names).to_pylist()
            except StoreUnavailableError:
                raise
            except (StoreError, pa.ArrowException) as e:
                log.warning("ignoring %s (%s): its files are read again", uri, e)
        return rows

    @staticmethod
    def _newest(rows: list[dict]) -> dict[str, dict]:
        """Each file's most recent verdict, by uri (a part may follow the listing, or a listing its parts)."""
        newest: dict[str, dict] = {}
        for row in rows:
            if row["uri"] not in newest or row["read_at"] > newest[row["uri"]]["read_at"]:
                newest[row["uri"]] = row
        return newest
