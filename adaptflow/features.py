"""The feature store: backbone embeddings as Parquet shards, keyed by (image_id, extractor fingerprint).

Layout under `{store}/features/{backbone}-{fingerprint}/`:
    extractor.json          what the fingerprint stands for (backbone, weights hash, preprocessing, layer)
    plans/{plan}.parquet    rows a planning step found missing, read by the shard tasks
    shards/{key}.parquet    image_id, label, domain, split, embedding (fixed-size list, float16/32)
    shards/{key}.json       the shard's manifest, written last: a shard without one does not exist

A re-run plans only the images that no committed shard holds, so only new images cost extraction
time. Shard keys hash the image ids they hold, so a retried task rewrites the same shard.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from adaptflow import storage
from adaptflow.config import BackboneConfig, ExtractConfig
from adaptflow.errors import StoreError
from adaptflow.manifests import Manifest

_PLAN_COLUMNS = ["image_id", "uri", "label", "domain", "split"]
# One shard at a time per process owns the device: two shards sharing 2 CPU cores (or one GPU) run
# slower together than in turn, and their DataLoader workers would oversubscribe the cores.
_DEVICE_LOCK = threading.Lock()


class ShardPlan(Manifest):
    """One extraction task's work: rows [offset, offset+length) of the plan file."""

    features_uri: str
    plan_uri: str
    offset: int
    length: int
    shard_key: str


class ExtractionPlan(Manifest):
    features_uri: str
    fingerprint: str
    dim: int
    n_requested: int  # distinct images asked for
    n_cached: int  # of those, already committed for this extractor
    shards: list[ShardPlan]
    seconds: float


class ShardManifest(Manifest):
    shard_key: str
    data_uri: str
    fingerprint: str
    n_rows: int
    dim: int
    dtype: str
    seconds: float
    bytes_written: int


def features_uri_for(store_uri: str, backbone: str, fingerprint: str) -> str:
    return storage.join(store_uri, "features", f"{backbone}-{fingerprint}")


def plan_extraction(
    index_uris: list[str], store_uri: str, backbone: BackboneConfig, shard_size: int
) -> ExtractionPlan:
    """Find which indexed images lack committed features for this extractor, and cut them into shards."""
    from adaptflow.backbones import build_extractor

    start = time.perf_counter()
    extractor = build_extractor(backbone)
    features_uri = features_uri_for(store_uri, backbone.name, extractor.fingerprint)
    _describe_extractor(features_uri, backbone, extractor)

    rows = pa.concat_tables([storage.read_table(u, columns=_PLAN_COLUMNS) for u in index_uris])
    rows = _first_per_image(rows)
    cached = committed_image_ids(features_uri)
    todo = rows.filter(pc.invert(pc.is_in(rows["image_id"], value_set=pa.array(sorted(cached), pa.string()))))
    todo = todo.sort_by("image_id")

    shards = []
    if todo.num_rows:
        ids = todo["image_id"].to_pylist()
        plan_uri = storage.join(features_uri, "plans", f"{_hash(ids)}.parquet")
        storage.write_table(plan_uri, todo)
        for offset in range(0, len(ids), shard_size):
            chunk = ids[offset : offset + shard_size]
            shards.append(ShardPlan(features_uri=features_uri, plan_uri=plan_uri, offset=offset,
                                    length=len(chunk), shard_key=_hash(chunk)))
    return ExtractionPlan(features_uri=features_uri, fingerprint=extractor.fingerprint, dim=extractor.dim,
                          n_requested=rows.num_rows, n_cached=rows.num_rows - todo.num_rows, shards=shards,
                          seconds=time.perf_counter() - start)


def extract_shard(plan: ShardPlan, backbone: BackboneConfig, extract: ExtractConfig) -> ShardManifest:
    """Embed one shard's images and commit it. Safe to retry: the same plan writes the same keys."""
    with _DEVICE_LOCK:
        return _extract_shard(plan, backbone, extract)


def _extract_shard(plan: ShardPlan, backbone: BackboneConfig, extract: ExtractConfig) -> ShardManifest:
    import torch

    from adaptflow.backbones import build_extractor
    from adaptflow.preprocess import make_loader

    start = time.perf_counter()
    rows = storage.read_table(plan.plan_uri).slice(plan.offset, plan.length)
    extractor = build_extractor(backbone)
    device = resolve_device(extract.device)
    module = extractor.module.to(device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        module = module.to(memory_format=torch.channels_last)

    loader = make_loader(rows["uri"].to_pylist(), extractor.data_config, extract.batch_size,
                         extract.num_workers, device)
    out = np.empty((rows.num_rows, extractor.dim), dtype=np.float32)  # (N, D)
    with torch.inference_mode():
        for x, idx in loader:
            x = x.to(device, non_blocking=True)
            if on_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
                emb = module(x)
            out[idx.numpy()] = emb.float().cpu().numpy()

    table = rows.drop_columns(["uri"]).append_column("embedding", _embedding_array(out, extract.dtype))
    table = table.replace_schema_metadata(_parquet_metadata(extractor.fingerprint, backbone))
    data_uri = storage.join(plan.features_uri, "shards", f"{plan.shard_key}.parquet")
    nbytes = storage.write_table(data_uri, table, use_dictionary=["label", "domain", "split"],
                                 use_byte_stream_split=["embedding.list.element"])
    manifest = ShardManifest(shard_key=plan.shard_key, data_uri=data_uri, fingerprint=extractor.fingerprint,
                             n_rows=table.num_rows, dim=extractor.dim, dtype=extract.dtype,
                             seconds=time.perf_counter() - start, bytes_written=nbytes)
    manifest.commit(storage.join(plan.features_uri, "shards", f"{plan.shard_key}.json"))
    return manifest


def committed_shards(features_uri: str) -> list[ShardManifest]:
    """Manifests of every committed shard; uncommitted Parquet files are invisible."""
    return [ShardManifest.load(u) for u in storage.list_uris(storage.join(features_uri, "shards"), ".json")]


def committed_image_ids(features_uri: str) -> set[str]:
    ids: set[str] = set()
    for shard in committed_shards(features_uri):
        ids.update(storage.read_table(shard.data_uri, columns=["image_id"])["image_id"].to_pylist())
    return ids


def load_features(features_uri: str, image_ids: list[str]) -> np.ndarray:
    """Embeddings (len(image_ids), D) float32, in the order of `image_ids`, from committed shards."""
    shards = committed_shards(features_uri)
    if not shards:
        raise StoreError(f"no committed feature shards under {features_uri}")
    wanted = pa.array(sorted(set(image_ids)), pa.string())
    parts = []
    for shard in shards:
        t = storage.read_table(shard.data_uri, columns=["image_id", "embedding"])
        parts.append(t.filter(pc.is_in(t["image_id"], value_set=wanted)))
    table = _first_per_image(pa.concat_tables(parts))
    position = {image_id: i for i, image_id in enumerate(table["image_id"].to_pylist())}
    missing = [i for i in image_ids if i not in position]
    if missing:
        raise StoreError(f"{len(missing)} images have no committed features under {features_uri} "
                         f"(first: {missing[0]}); run extraction first")
    emb = table["embedding"].combine_chunks()
    dim = emb.type.list_size
    matrix = emb.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    return matrix[[position[i] for i in image_ids]].astype(np.float32)


def resolve_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise StoreError("extract.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def _embedding_array(matrix: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    values = pa.array(matrix.astype(dtype, copy=False).ravel())
    return pa.FixedSizeListArray.from_arrays(values, matrix.shape[1])


def _parquet_metadata(fingerprint: str, backbone: BackboneConfig) -> dict[bytes, bytes]:
    from adaptflow.manifests import SCHEMA_VERSION

    return {b"adaptflow.schema_version": str(SCHEMA_VERSION).encode(),
            b"adaptflow.fingerprint": fingerprint.encode(),
            b"adaptflow.backbone": backbone.model_dump_json().encode()}


def _describe_extractor(features_uri: str, backbone: BackboneConfig, extractor) -> None:
    uri = storage.join(features_uri, "extractor.json")
    if not storage.exists(uri):
        storage.write_json(uri, {"fingerprint": extractor.fingerprint, "backbone": backbone.model_dump(),
                                 "weights_sha256": extractor.weights_sha256, "dim": extractor.dim,
                                 "data_config": extractor.data_config})


def _first_per_image(table: pa.Table) -> pa.Table:
    """Drop repeated image_ids (the same bytes in two datasets, or two runs committing one image)."""
    ids = table["image_id"].to_pylist()
    seen: set[str] = set()
    keep = [not (i in seen or seen.add(i)) for i in ids]
    return table.filter(pa.array(keep))


def _hash(ids: list[str]) -> str:
    return hashlib.sha256(json.dumps(sorted(ids)).encode()).hexdigest()[:16]
