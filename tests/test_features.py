import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from adaptflow import features, storage
from adaptflow.errors import StoreError
from adaptflow.ingest import ingest


@pytest.fixture
def indexed(demo_data, fast_config, memory_uri):
    """The demo source and target ingested into a fresh memory store."""
    src = ingest(demo_data.source_uri, "source", f"{memory_uri}/ingest/source", fast_config.ingest)
    tgt = ingest(demo_data.target_uri, "target", f"{memory_uri}/ingest/target", fast_config.ingest)
    return memory_uri, [src, tgt]


def _extract_all(store, manifests, cfg):
    plan = features.plan_extraction([m.index_uri for m in manifests], store, cfg.backbone, cfg.extract.shard_size)
    return plan, [features.extract_shard(s, cfg.backbone, cfg.extract) for s in plan.shards]


def test_extraction_commits_shards_and_only_new_images_cost_time(indexed, fast_config):
    store, manifests = indexed
    n = sum(m.n_images for m in manifests)
    plan, shards = _extract_all(store, manifests, fast_config)
    assert (plan.n_requested, plan.n_cached) == (n, 0)
    assert len(shards) == -(-n // fast_config.extract.shard_size) and sum(s.n_rows for s in shards) == n
    assert plan.features_uri.endswith(f"features/efficientnet_lite0-{plan.fingerprint}")

    again, _ = _extract_all(store, manifests, fast_config)
    assert (again.n_cached, again.shards) == (n, [])

    ids = storage.read_table(manifests[0].index_uri)["image_id"].to_pylist()
    emb = features.load_features(plan.features_uri, ids[::-1])
    assert emb.shape == (len(ids), plan.dim) and emb.dtype == np.float32 and np.isfinite(emb).all()
    assert np.array_equal(emb[::-1], features.load_features(plan.features_uri, ids))


def test_shards_are_plain_parquet_with_fingerprint_metadata(indexed, fast_config, tmp_path):
    store, manifests = indexed
    plan, shards = _extract_all(store, manifests[:1], fast_config)
    local = tmp_path / "shard.parquet"
    local.write_bytes(storage.read_bytes(shards[0].data_uri))
    f = pq.ParquetFile(local)
    meta = f.schema_arrow.metadata
    assert meta[b"adaptflow.fingerprint"].decode() == plan.fingerprint
    assert meta[b"adaptflow.schema_version"] == b"1"
    assert str(f.schema_arrow.field("embedding").type) == f"fixed_size_list<element: halffloat>[{plan.dim}]"
    emb_col = f.metadata.row_group(0).column(f.schema_arrow.names.index("embedding") + 0)
    assert not emb_col.has_dictionary_page
    assert f.schema_arrow.names == ["image_id", "label", "domain", "split", "embedding"]
    n = duckdb.execute(f"select count(distinct image_id) from read_parquet('{local}')").fetchall()[0][0]
    assert n == shards[0].n_rows


def test_uncommitted_shards_are_invisible(indexed, fast_config):
    store, manifests = indexed
    plan, shards = _extract_all(store, manifests[:1], fast_config)
    storage.filesystem(plan.features_uri)[0].rm(storage.filesystem(
        storage.join(plan.features_uri, "shards", f"{shards[0].shard_key}.json"))[1])
    replan = features.plan_extraction([manifests[0].index_uri], store, fast_config.backbone, 10_000)
    assert replan.n_cached == manifests[0].n_images - shards[0].n_rows
    with pytest.raises(StoreError, match="have no committed features"):
        ids = storage.read_table(manifests[0].index_uri)["image_id"].to_pylist()
        features.load_features(plan.features_uri, ids)


def test_a_different_image_size_is_a_different_extractor(indexed, fast_config):
    store, manifests = indexed
    plan, _ = _extract_all(store, manifests[:1], fast_config)
    other = fast_config.model_copy(update={"backbone": fast_config.backbone.model_copy(update={"image_size": 48})})
    replan = features.plan_extraction([manifests[0].index_uri], store, other.backbone, 64)
    assert replan.fingerprint != plan.fingerprint and replan.n_cached == 0
