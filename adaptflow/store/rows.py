"""Random access to the rows of a sharded store (`adaptflow.store.shards`) for a list of images, in bounded
memory: training and inference read features or cached pixels through `ShardedRows`, never a whole
split at once.

Rows live in shards. `ShardedRows` keeps the wanted rows of at most `max_shards` shards in memory (least
recently used out first, the next one read ahead on a background thread), unless all wanted rows fit in
`resident_bytes` and the caller will draw every one of them (`draws`), when it reads them once and keeps
them: a training segment that draws fewer rows than there are streams, and reads only the shards it
touches. `epoch_order` shuffles shard by shard (shards in a random order, rows shuffled within each), so
consecutive batches touch one or two shards; a step's batch is a pure function of (seed, step), so
training resumed from a checkpoint draws what an uninterrupted run would have drawn. One pass over every
row (inference, `batches`) streams each shard's file once instead, a batch at a time.
"""

from __future__ import annotations

import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from adaptflow import state
from adaptflow.errors import StoreError
from adaptflow.manifests import ShardManifest
from adaptflow.store.shards import committed_shards, read_shard, stream_shard, value_matrix

RESIDENT_BYTES = 512 << 20  # wanted rows up to this size are read once and kept
MAX_SHARDS = 3  # shards held at once otherwise: the one in use, the last one, the next one read ahead


def locations(shards: list[ShardManifest]) -> pd.DataFrame:
    """(shard, row) of every image in the committed `shards` (their positions in that list), indexed by
    image_id (the first shard that has an image wins), read once per process while the list stays the same
    (kept in `state.LOCATIONS`)."""
    key = tuple(s.data_uri for s in shards)
    if (kept := state.LOCATIONS.get(key)) is not None:
        return kept
    parts = [
        pd.DataFrame({"image_id": ids, "shard": k, "row": np.arange(len(ids))})
        for k, shard in enumerate(shards)
        for ids in [read_shard(shard, ["image_id"])["image_id"].to_pylist()]
    ]
    found = pd.concat(parts) if parts else pd.DataFrame({"image_id": [], "shard": [], "row": []})
    found = found.drop_duplicates("image_id").set_index("image_id")
    # Looked up as Python objects: pandas 3's default string index made `isin` a Python loop, 1.5 s for
    # 2,000 of 100,000 ids (0.03 s as objects), paid by every sample and candidate a run reads
    found.index = found.index.astype(object)
    state.LOCATIONS.put(key, found)
    return found


def locate(folder: str, shards: list[ShardManifest], image_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(shard, row) of each of `image_ids` in the committed `shards` of `folder` (positions in that list,
    rows in its file), as two (N,) arrays; a StoreError names an image no shard holds."""
    found = locations(shards)
    missing = [image_ids[i] for i in np.flatnonzero(~pd.Index(image_ids, dtype=object).isin(found.index))]
    if missing:
        raise StoreError(f"{len(missing)} images are not in {folder} (first: {missing[0]}); run extraction first")
    located = found.loc[image_ids]
    return located["shard"].to_numpy(), located["row"].to_numpy()


class ShardedRows:
    """Rows of `column` for `image_ids` (in that order) from the committed shards under `folder`, as
    tensors of `shape` per row (e.g. (3, S, S) uint8 pixels, (D,) features). `draws`: at most how many
    rows the caller will read (None: unknown, maybe all)."""

    # Nine parameters: which rows (folder, image_ids, column, shape), then how to read them, each with a
    # default: the memory bounds (resident_bytes, max_shards), pinning, shards already listed, draws.
    def __init__(
        self,
        folder: str,
        image_ids: list[str],
        column: str,
        shape: tuple[int, ...],
        resident_bytes: int = RESIDENT_BYTES,
        max_shards: int = MAX_SHARDS,
        pin: bool = False,
        shards: list[ShardManifest] | None = None,
        draws: int | None = None,
    ):
        self.column, self.shape, self.pin = column, tuple(shape), pin
        self.n = len(image_ids)
        self._shards = committed_shards(folder) if shards is None else shards  # a caller that listed them
        self.shard_of, self.row_of = locate(folder, self._shards, image_ids)  # (N,) shard index, (N,) row in its file
        self._members = {s: np.flatnonzero(self.shard_of == s) for s in np.unique(self.shard_of)}
        self._blocks: OrderedDict[int, torch.Tensor] = OrderedDict()  # shard -> its wanted rows, in _members order
        self._pending: dict[int, Future] = {}
        self._max_shards = max(2, max_shards)
        self._lock = threading.Lock()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="adaptflow-rows")
        self._resident: torch.Tensor | None = None
        self.peak_rows = 0  # the most rows held in memory at once: the bound tests check
        itemsize = np.dtype(self._shards[0].dtype).itemsize if self._shards else 4
        everything = draws is None or draws >= self.n
        if self.n and everything and self.n * int(np.prod(self.shape)) * itemsize <= resident_bytes:
            self._resident = self.gather(np.arange(self.n))
            self._blocks.clear()
            self.peak_rows = self.n

    def __len__(self) -> int:
        return self.n

    @property
    def resident_bytes(self) -> int:
        """Bytes of the rows held whole in memory (0: streamed shard by shard)."""
        return 0 if self._resident is None else self._resident.nbytes

    def gather(self, index: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(len(index), *shape): the rows at `index` (positions in `image_ids`)."""
        index = np.asarray(index, dtype=np.int64)
        if self._resident is not None:
            return self._resident[torch.from_numpy(index)]
        out = None
        for s in dict.fromkeys(self.shard_of[index].tolist()):  # shards in order of first use
            block = self._block(s)
            at = np.flatnonzero(self.shard_of[index] == s)
            local = np.searchsorted(self._members[s], index[at])  # positions within the block
            rows = block[torch.from_numpy(local)]
            if out is None:
                out = torch.empty((len(index), *rows.shape[1:]), dtype=rows.dtype)
            out[torch.from_numpy(at)] = rows
        if out is None:
            return torch.empty((0, *self.shape))
        return out.pin_memory() if self.pin else out

    def prefetch(self, index: np.ndarray) -> None:
        """Start reading the shards `index` needs, on the background thread."""
        if self._resident is None:
            for s in dict.fromkeys(self.shard_of[np.asarray(index, dtype=np.int64)].tolist()):
                with self._lock:
                    if s not in self._blocks and s not in self._pending:
                        self._pending[s] = self._reader.submit(self._read, s)

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """A permutation of range(N) for `epoch`: shards in a seeded random order, rows shuffled within."""
        rng = np.random.default_rng([zlib.crc32(b"adaptflow-rows"), seed, epoch])
        shards = list(self._members)
        return (
            np.concatenate([rng.permutation(self._members[s]) for s in rng.permutation(shards)])
            if shards
            else np.empty(0, np.int64)
        )

    def batches(self, size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Every row once, as (index, rows) of `size` rows (the last fewer), for one pass (inference): from
        memory if held whole, else shard by shard, each shard's file read once in file order a batch at a
        time (`shards.stream_shard`), so a pass holds a batch, never a shard."""
        if self._resident is not None:
            for i in range(0, self.n, size):
                yield np.arange(i, min(i + size, self.n)), self._resident[i : i + size]
            return
        pieces = (piece for s in self._members for piece in self._stream(s, size))
        for index, values in _rebatched(pieces, size):
            rows = torch.from_numpy(values).view(len(index), *self.shape)
            yield index, rows.pin_memory() if self.pin else rows

    def _stream(self, s: int, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(index, values) of the wanted rows of shard `s`, in file order, read `size` file rows at a time."""
        members = self._members[s][np.argsort(self.row_of[self._members[s]], kind="stable")]
        rows = self.row_of[members]  # ascending
        start = 0
        for values in stream_shard(self._shards[s], self.column, size):
            lo, hi = np.searchsorted(rows, [start, start + len(values)])
            if hi > lo:
                yield members[lo:hi], value_matrix(values.take(pa.array(rows[lo:hi] - start)))
            start += len(values)

    def _block(self, s: int) -> torch.Tensor:
        with self._lock:
            if s in self._blocks:
                self._blocks.move_to_end(s)
                return self._blocks[s]
            pending = self._pending.pop(s, None)
        block = pending.result() if pending is not None else self._read(s)
        with self._lock:
            self._blocks[s] = block
            while len(self._blocks) > self._max_shards:
                self._blocks.popitem(last=False)
            self.peak_rows = max(self.peak_rows, sum(len(b) for b in self._blocks.values()))
        return block

    def _read(self, s: int) -> torch.Tensor:
        """The wanted rows of shard `s`, in `_members[s]` order, as a (k, *shape) tensor."""
        table = read_shard(self._shards[s], [self.column])
        values = table[self.column].combine_chunks().take(pa.array(self.row_of[self._members[s]]))
        flat = value_matrix(values)
        return torch.from_numpy(np.array(flat, copy=not flat.flags.writeable)).view(len(values), *self.shape)

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)
        self._blocks.clear()


def _rebatched(pieces: Iterator[tuple[np.ndarray, np.ndarray]], size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(index, values) pieces of any length, regrouped into batches of `size` rows (the last fewer)."""
    index, values, held = [], [], 0
    for i, v in pieces:
        index.append(i)
        values.append(v)
        held += len(i)
        while held >= size:
            i_all, v_all = np.concatenate(index), np.concatenate(values)
            yield i_all[:size], v_all[:size]
            index, values, held = [i_all[size:]], [v_all[size:]], held - size
    if held:
        yield np.concatenate(index), np.concatenate(values)
