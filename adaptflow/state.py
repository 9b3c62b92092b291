"""What one process keeps between calls: its caches and locks, made here, each with its scope, its bound and
the rule that makes an entry stale in its docstring. Nothing here survives the process or is shared with
another one (a Dask worker, a DataLoader worker): each starts empty.

- `SAMPLES`: the validation samples every candidate of a run is scored on (`adapt.samples.sample_rows`).
- `LOCATIONS`: where each image's row is in a list of committed shards (`store.rows.locations`).
- `SHARD_DEVICE`: one shard of extraction or prediction at a time (`extract.features`, `evaluate.predict`).
- `CANDIDATE_DEVICES`: one end-to-end candidate per GPU at a time (`adapt.candidates`).

One cache lives with its owner instead: the IWA validator fits a density ratio and keeps it, as skada's
scorers own their fitted estimators (`adapt.validators.ImportanceWeightedAccuracy`, an `LRUCache` of its own).

Left where they are, on purpose:
- `functools` caches of pure functions, whose arguments are the whole key, a content hash or a file's
  (size, mtime) among them, so an entry cannot go stale: `evaluate.predict._load` (a model by its content
  hash), `extract.weights.file_sha256`, `extract.backbones._build_extractor` (with `_build_lock`, so threads
  asking for one backbone share one build), `serve.pyfunc.pyfunc_class`, `models.registry.code_version`,
  `adapt.train._per_thread_counts`.
- Locks that guard one module's own resource: `adaptflow.seeding` (torch's global generator), `store.storage`
  (creating a folder). `store.accounting`'s thread-local is the meters each thread counts into, no cache.

Standard library only: every stage imports this module, and it imports none of them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

V = TypeVar("V")


class LRUCache(Generic[V]):
    """A thread-safe map that forgets its least recently used entries past its bound: more than
    `max_items` entries, or a total `size(value)` over `max_size` (checked when an entry is put, the
    newest entry going last). An entry may carry a `version`, what it was read from: `get` returns it for
    that version alone, and `put` replaces an entry of another version, so a stale copy is never kept
    beside its replacement. Values are never None (`get`'s answer for a miss)."""

    def __init__(
        self,
        max_items: int | None = None,
        max_size: int | None = None,
        size: Callable[[V], int] | None = None,
    ) -> None:
        if (max_size is None) != (size is None):
            raise ValueError("max_size and size go together")
        self.max_items, self.max_size, self.size = max_items, max_size, size
        self._entries: OrderedDict[Hashable, tuple[Hashable, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, version: Hashable = None) -> V | None:
        """The value kept for `key` at `version` (now the most recently used), or None."""
        with self._lock:
            found = self._entries.get(key)
            if found is None or found[0] != version:
                return None
            self._entries.move_to_end(key)
            return found[1]

    def put(self, key: Hashable, value: V, version: Hashable = None) -> None:
        """Keep `value` for `key` at `version`, in place of any other version of it, and forget the least
        recently used entries past the bound."""
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = (version, value)
            while self._entries and self._over():
                self._entries.popitem(last=False)

    def _over(self) -> bool:
        if self.max_items is not None and len(self._entries) > self.max_items:
            return True
        return self.size is not None and sum(self.size(v) for _, v in self._entries.values()) > self.max_size

    def values(self) -> list[V]:
        """The values kept, least recently used first."""
        with self._lock:
            return [v for _, v in self._entries.values()]

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class DeviceLocks:
    """One lock per device name ("cuda:0", "cuda:1"), made on first use."""

    def __init__(self) -> None:
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def lock(self, device: Any) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(str(device), threading.Lock())


SAMPLES: LRUCache[Any] = LRUCache(max_size=1 << 30, size=lambda rows: rows.resident_bytes)
"""Per process: the rows of the fixed validation samples (`adapt.samples.sample_rows`, `ShardedRows` read into
memory), by (folder, column, shape, image ids), versioned by the data URIs of the folder's committed shards.
Every candidate of a run is scored on the same samples, and a sample of a large dataset touches every shard:
read per candidate, each one's scoring would read the whole target again. Bound: 1 GiB of resident rows
(`max_size`, also the largest sample kept: a larger one is streamed and not kept). Stale when the folder's
committed shards change (a new extraction, a compaction): the sample is read again and replaces its old copy;
a shard file is never rewritten under its name (`store.shards.commit_shard` puts a uuid in it)."""

LOCATIONS: LRUCache[Any] = LRUCache(max_items=2)
"""Per process: (shard, row) of every image in a list of committed shards (`store.rows.locations`), by the
shards' data URIs. Every `ShardedRows` of a run (each candidate's splits, each segment of successive halving,
each prediction) looks its images up here; reading the image_id column of every shard each time read every
shard file whole (one GET per file from an object store), so the bytes a run read grew with the store.
Bound: the 2 lists used last. Never stale: a new extraction or a compaction commits other files, so the key
changes, and a shard file is never rewritten under its name."""

SHARD_DEVICE = threading.Lock()
"""Per process: one shard of extraction or prediction at a time owns the device (`extract.features`,
`evaluate.predict`). Two shards sharing 2 CPU cores (or one GPU) run slower together than in turn, their
DataLoader workers would oversubscribe the cores, and each holds its batches and activations: two at once,
twice the memory. Writing a finished shard to the store happens outside it."""

CANDIDATE_DEVICES = DeviceLocks()
"""Per process and GPU: one end-to-end (images-mode) candidate trains on a GPU at a time; two at once on one
only slow each other. Candidates on other workers (Dask) still run at the same time; a CPU takes no lock
(`adapt.candidates.CPU_THREADS` says why)."""
