"""The feature store: backbone embeddings as Parquet shards keyed by (image_id, extractor fingerprint),
and the extraction that fills it (and, in the same pass, the training-image cache).

Layout under `{store}/features/{backbone}-{fingerprint}/`:
    extractor.json          what the fingerprint stands for (backbone, weights hash, preprocessing, layer)
    plans/{plan}.parquet    rows a planning step found missing, read by the shard tasks
    shards/                 as in `adaptflow.store.shards`: image_id, label, domain, split, embedding

A re-run plans only the images that no committed shard holds, so only new images cost extraction
time. Each shard task decodes its images once and writes what the plan asks of them: embeddings,
cached training images (`adaptflow.extract.image_cache`), or both.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from adaptflow import progress, state
from adaptflow.config import BackboneConfig, ExtractConfig
from adaptflow.errors import AdaptflowError, DatasetError
from adaptflow.extract import coverage
from adaptflow.extract.devices import resolve_device
from adaptflow.manifests import Coverage, ExtractionPlan, ImageCache, ShardPlan, ShardResult
from adaptflow.store import accounting, layout, storage
from adaptflow.store.shards import (
    commit_shard,
    committed_image_ids,
    first_per_image,
    hash_ids,
    load_rows,
    load_shard_manifest,
    manifest_uri,
    value_array,
)

_PLAN_COLUMNS = ["image_id", "uri", "label", "domain", "split"]


def plan_extraction(
    index_uris: list[str],
    store_uri: str,
    backbone: BackboneConfig,
    shard_size: int,
    cache: ImageCache | None = None,
    features: bool = True,
    index_keys: list[str] | None = None,
) -> ExtractionPlan:
    """Find which indexed images lack committed features for this extractor (if `features`) or pixels in
    `cache` (if given), and cut them into shards; an image missing both is decoded once for both. The
    extractor is known by its recipe: built (its weights read) only when the store has no record of it.
    With `index_keys` (what identifies each index's images: `extract.coverage`), datasets the store is on
    record as holding whole are planned from a listing, their ids unread."""
    from adaptflow.extract.recipes import recipe

    start = time.perf_counter()
    extractor = recipe(backbone, store_uri)
    features_uri = layout.features_uri_for(store_uri, backbone.name, extractor.fingerprint)
    _describe_extractor(features_uri, backbone, extractor)
    folders = [*([features_uri] if features else []), *([cache.uri] if cache else [])]
    key = coverage.coverage_key(folders, index_keys) if index_keys else None
    n = coverage.held(store_uri, key, folders) if key else None
    if n is not None:
        return ExtractionPlan(
            features_uri=features_uri,
            fingerprint=extractor.fingerprint,
            dim=extractor.dim,
            weights_sha256=extractor.weights_sha256,
            n_requested=n,
            n_cached=n,
            shards=[],
            seconds=time.perf_counter() - start,
            cache=cache,
            n_cached_pixels=n if cache else 0,
            coverage=Coverage(key=key, folders=folders),
        )

    tables = [storage.read_table(u, columns=_PLAN_COLUMNS) for u in index_uris]
    index = pa.array([i for i, t in enumerate(tables) for _ in range(t.num_rows)], pa.int32())
    rows = first_per_image(pa.concat_tables(tables).append_column("_index", index))
    need_f = _missing(rows, features_uri) if features else pa.array([False] * rows.num_rows)
    need_p = _missing(rows, cache.uri) if cache else pa.array([False] * rows.num_rows)
    # Shards are cut per (features, pixels) group and per index, each sorted by image_id: two runs that
    # share a source but not a target plan the source's shards alike, so running at once they commit one
    # shard key (one row per image) rather than two shards holding the same source images.
    groups = [(f, p, i) for f, p in [(True, True), (True, False), (False, True)] for i in range(len(tables))]
    parts = [
        rows.filter(pc.and_(pc.and_(pc.equal(need_f, f), pc.equal(need_p, p)), pc.equal(rows["_index"], i)))
        .sort_by("image_id")
        .drop_columns(["_index"])
        for f, p, i in groups
    ]
    todo = pa.concat_tables(parts)

    shards = []
    if todo.num_rows:
        ids = todo["image_id"].to_pylist()
        counts = "-".join(str(len(p)) for p in parts)  # how the ids split into parts: part of the plan
        plan_uri = storage.join(features_uri, "plans", f"{hash_ids([*ids, counts])}.parquet")
        storage.write_table(plan_uri, todo)
        offset = 0
        for (f, p, _), part in zip(groups, parts, strict=True):
            for start_row in range(0, part.num_rows, shard_size):
                chunk = ids[offset + start_row : offset + min(start_row + shard_size, part.num_rows)]
                shards.append(
                    ShardPlan(
                        features_uri=features_uri,
                        plan_uri=plan_uri,
                        offset=offset + start_row,
                        length=len(chunk),
                        shard_key=hash_ids(chunk),
                        features=f,
                        cache=cache if p else None,
                    )
                )
            offset += part.num_rows
    n_f = int(pc.sum(need_f).as_py() or 0)
    n_p = int(pc.sum(need_p).as_py() or 0)
    if key and not shards:
        coverage.keep(store_uri, key, folders, rows.num_rows)
    return ExtractionPlan(
        features_uri=features_uri,
        fingerprint=extractor.fingerprint,
        dim=extractor.dim,
        weights_sha256=extractor.weights_sha256,
        n_requested=rows.num_rows,
        n_cached=rows.num_rows - n_f,
        shards=shards,
        seconds=time.perf_counter() - start,
        cache=cache,
        n_cached_pixels=rows.num_rows - n_p if cache else 0,
        coverage=Coverage(key=key, folders=folders) if key else None,
    )


def record_coverage(plan: ExtractionPlan, store_uri: str) -> None:
    """Once every shard of `plan` is committed (and compacted): the store holds its datasets whole, on
    record for the runs after (`extract.coverage`). A plan made without index keys records nothing."""
    if plan.coverage is not None:
        coverage.keep(store_uri, plan.coverage.key, plan.coverage.folders, plan.n_requested)


def _missing(rows: pa.Table, folder: str) -> pa.Array:
    """For each row, whether no committed shard under `folder` holds its image."""
    have = pa.array(sorted(committed_image_ids(folder)), pa.string())
    return pc.invert(pc.is_in(rows["image_id"], value_set=have))


def extract_shard(plan: ShardPlan, backbone: BackboneConfig, extract: ExtractConfig) -> ShardResult:
    """Embed and/or cache one shard's images and commit each output. Safe to retry: outputs already
    committed are kept as they are, and an attempt that died before a commit left nothing a reader sees."""
    start = time.perf_counter()
    folders = {
        "embedding": plan.features_uri if plan.features else None,
        "pixels": plan.cache.uri if plan.cache else None,
    }
    done = {
        c: load_shard_manifest(manifest_uri(f, plan.shard_key))
        for c, f in folders.items()
        if f and storage.exists(manifest_uri(f, plan.shard_key))
    }
    todo = [c for c, f in folders.items() if f and c not in done]
    bytes_read = bytes_written = 0
    if todo:
        # The device runs one shard at a time (`state.SHARD_DEVICE` says why); writing a finished shard to
        # the store happens outside the lock, so with two shard tasks in flight one uploads while the next
        # computes.
        with state.SHARD_DEVICE:
            tables, bytes_read, fingerprint = _embed_shard(plan, backbone, extract, todo)
        for column, table in tables.items():
            committed = manifest_uri(folders[column], plan.shard_key)
            if storage.exists(committed):  # a concurrent run committed this shard while this one computed
                done[column] = load_shard_manifest(committed)
                continue
            fp = fingerprint if column == "embedding" else plan.cache.fingerprint
            dtype = extract.dtype if column == "embedding" else "uint8"
            done[column] = commit_shard(folders[column], plan.shard_key, table, fp, dtype, start, bytes_read)
            bytes_written += done[column].bytes_written
    return ShardResult(
        shard_key=plan.shard_key,
        n_rows=plan.length,
        outputs=[done[c] for c in folders if c in done],
        seconds=time.perf_counter() - start,
        bytes_read=bytes_read,
        bytes_written=bytes_written,
    )


def _embed_shard(
    plan: ShardPlan, backbone: BackboneConfig, extract: ExtractConfig, outputs: list[str]
) -> tuple[dict[str, pa.Table], int, str]:
    """The shard's rows with their `outputs` ("embedding", "pixels"), each image read and decoded once;
    the encoded bytes read; the extractor fingerprint."""
    import torch

    from adaptflow.data.preprocess import Both, build_transform, decode_on_device, geometric_transform, make_loader
    from adaptflow.extract.backbones import build_extractor

    rows = storage.read_table(plan.plan_uri).slice(plan.offset, plan.length)
    extractor = build_extractor(backbone)
    if "embedding" in outputs and not plan.features_uri.rstrip("/").endswith(f"-{extractor.fingerprint}"):
        raise AdaptflowError(
            f"backbone {backbone.name!r} builds features {extractor.fingerprint}, not those planned "
            f"({plan.features_uri}): its weights or libraries changed during the run; run again"
        )
    device = resolve_device(extract.device)
    embed, cache = "embedding" in outputs, "pixels" in outputs
    module = _prepare(extractor.module, device, extract.compile) if embed else None
    on_cuda = device.type == "cuda"
    transforms = ([build_transform(extractor.data_config)] if embed else []) + (
        [geometric_transform(plan.cache.geometry)] if cache else []
    )
    on_device = extract.decode_on == "device" and embed  # decoding on the device pays off for the model
    loader_transform = None if on_device else (transforms[0] if len(transforms) == 1 else Both(*transforms))
    loader = make_loader(
        rows["uri"].to_pylist(), loader_transform, batch_size_for(extract, device), extract.num_workers, device
    )
    emb = np.empty((rows.num_rows, extractor.dim), dtype=np.float32) if embed else None  # (N, D)
    s = plan.cache.size if cache else 0
    pixels = np.empty((rows.num_rows, 3 * s * s), dtype=np.uint8) if cache else None  # (N, 3*S*S)
    bytes_read = 0
    with torch.inference_mode(), _changed_since_ingest():
        for x, idx, nbytes in loader:
            batches = (
                decode_on_device(x, transforms, device) if on_device else (list(x) if len(transforms) > 1 else [x])
            )
            i = idx.numpy()
            if embed:
                xb = batches[0].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
                    emb[i] = module(xb).float().cpu().numpy()
            if cache:
                pixels[i] = batches[-1].to("cpu", torch.uint8).reshape(len(i), -1).numpy()
            bytes_read += int(nbytes.sum())
            progress.advance(len(idx), "images")
    if extract.num_workers:  # read in worker processes, out of sight of this thread's meters
        accounting.count(read=bytes_read)

    base = rows.drop_columns(["uri"])
    tables = {}
    if embed:
        tables["embedding"] = base.append_column("embedding", value_array(emb, extract.dtype)).replace_schema_metadata(
            _parquet_metadata(extractor.fingerprint, backbone)
        )
    if cache:
        tables["pixels"] = base.append_column("pixels", value_array(pixels, "uint8")).replace_schema_metadata(
            _parquet_metadata(plan.cache.fingerprint, backbone)
        )
    return tables, bytes_read, extractor.fingerprint


@contextmanager
def _changed_since_ingest():
    """An image ingest validated that is gone or unreadable now: one line that names it and the fix, not a
    DataLoader worker's traceback."""
    try:
        yield
    except DatasetError as e:
        lines = str(e).strip().splitlines()
        prefix = f"{DatasetError.__module__}.{DatasetError.__qualname__}: "
        what = next((line[len(prefix) :] for line in reversed(lines) if line.startswith(prefix)), lines[0])
        raise DatasetError(
            f"{what}; it was valid when ingest indexed it and has been deleted or changed since: run again, and "
            "ingest indexes the dataset as it is now"
        ) from None


def load_features(features_uri: str, image_ids: list[str]) -> np.ndarray:
    """Embeddings (len(image_ids), D) float32, in the order of `image_ids`, from committed shards."""
    return load_rows(features_uri, image_ids, "embedding").astype(np.float32)


def batch_size_for(extract: ExtractConfig, device) -> int:
    """The configured batch size, else one that suits the device: large batches keep a GPU busy, while on
    a CPU EfficientNet-Lite0 at 224 px ran 77 images/s at batch 8 and 48 at batch 64 (2 threads)."""
    if extract.batch_size is not None:
        return extract.batch_size
    return 256 if device.type == "cuda" else 8


def _prepare(module, device, compile: bool):
    """Channels-last on every device: on 2 CPU threads it doubled EfficientNet-Lite0's forward speed
    (116 vs 48 images/s at batch 4), and it is what CUDA's convolutions want."""
    import torch

    module = module.to(device).to(memory_format=torch.channels_last)
    if compile and device.type == "cuda":
        module = torch.compile(module)
    return module


def _parquet_metadata(fingerprint: str, backbone: BackboneConfig) -> dict[bytes, bytes]:
    from adaptflow.manifests import SCHEMA_VERSION

    return {
        b"adaptflow.schema_version": str(SCHEMA_VERSION).encode(),
        b"adaptflow.fingerprint": fingerprint.encode(),
        b"adaptflow.backbone": backbone.model_dump_json().encode(),
    }


def _describe_extractor(features_uri: str, backbone: BackboneConfig, extractor) -> None:
    uri = storage.join(features_uri, "extractor.json")
    if not storage.exists(uri):
        storage.write_json(
            uri,
            {
                "fingerprint": extractor.fingerprint,
                "backbone": backbone.model_dump(),
                "weights_sha256": extractor.weights_sha256,
                "dim": extractor.dim,
                "data_config": extractor.data_config,
            },
        )
