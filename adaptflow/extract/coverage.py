"""What the store already holds for a run's datasets, remembered, so that a night whose datasets did not
change plans its extraction from a listing rather than by reading every image id again.

A coverage record says: every image of these indexes had committed features in these shards (and pixels
in these cache shards) when it was written. Its key hashes the feature folder, the cache folder, and
what identifies each index's images (an ingest fingerprint: the sorted image ids, labels and splits; or
the URI of an index no run rewrites, such as a champion's reference). It is kept at

    {store}/features/covered/{key}.json     {"n_images": N, "shards": {folder: [shard keys]}}

and trusted only while every shard it names is still committed (a listing of each folder's manifests,
no manifest read): a shard compacted away, quarantined or deleted makes the record stale, and planning
reads the ids as before, then records again. A record missing or unreadable is the same: nothing here
is needed.
"""

from __future__ import annotations

import hashlib
import json
import posixpath

from adaptflow.errors import StoreError, StoreUnavailableError
from adaptflow.store import storage


def coverage_key(folders: list[str], index_keys: list[str]) -> str:
    """The record's key for these store folders (features and/or cache) and these datasets' images."""
    return hashlib.sha256(json.dumps([sorted(folders), sorted(set(index_keys))]).encode()).hexdigest()[:16]


def held(store_uri: str, key: str, folders: list[str]) -> int | None:
    """How many distinct images the record under `key` covers, if it holds for `folders` now; else None."""
    try:
        record = storage.read_json(_uri(store_uri, key))
    except StoreUnavailableError:
        raise
    except StoreError:
        return None
    try:
        named, n = record["shards"], int(record["n_images"])  # the key hashes the folders: named has them
        if all(set(named[f]) <= set(_committed_keys(f)) for f in folders):
            return n
    except (KeyError, TypeError, ValueError):
        pass
    return None


def keep(store_uri: str, key: str, folders: list[str], n_images: int) -> None:
    """Record that the shards committed now in `folders` hold every image of the key's datasets."""
    record = {"n_images": n_images, "shards": {f: _committed_keys(f) for f in folders}}
    storage.write_json(_uri(store_uri, key), record)


def _committed_keys(folder: str) -> list[str]:
    """The shard keys whose manifests are in `folder` (a listing: replaced shards still listed count)."""
    return [posixpath.basename(u)[: -len(".json")] for u in storage.list_uris(storage.join(folder, "shards"), ".json")]


def _uri(store_uri: str, key: str) -> str:
    return storage.join(store_uri, "features", "covered", f"{key}.json")
