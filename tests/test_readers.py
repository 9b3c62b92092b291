"""The feature store is plain Parquet: DuckDB and Polars read its committed files as the README shows, and
find the same rows and embeddings adaptflow does."""

import duckdb
import numpy as np
import polars as pl
import pytest

from adaptflow.data.ingest import ingest
from adaptflow.extract import features
from adaptflow.store import shards, storage


@pytest.fixture(scope="module")
def store(demo_data, fast_config, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("readers"))
    manifests = [
        ingest(uri, domain, f"{root}/ingest/{domain}", fast_config.ingest)
        for domain, uri in (("source", demo_data.source_uri), ("target", demo_data.target_uri))
    ]
    plan = features.plan_extraction([m.index_uri for m in manifests], root, fast_config.backbone, 128)
    for shard in plan.shards:
        features.extract_shard(shard, fast_config.backbone, fast_config.extract)
    return plan, manifests


def test_duckdb_and_polars_read_the_committed_shards(store):
    plan, manifests = store
    files = shards.committed_files(plan.features_uri)
    assert len(files) == len(plan.shards) > 1

    # the README's two one-liners
    by_duckdb = dict(duckdb.sql(f"select split, count(*) from read_parquet({files}) group by split").fetchall())
    by_polars = dict(pl.scan_parquet(files).group_by("split").len().collect().iter_rows())
    assert by_duckdb == by_polars
    assert set(by_polars) == {"train", "val", "test"}
    per_domain = dict(pl.scan_parquet(files).group_by("domain").len().collect().iter_rows())
    assert per_domain == {m.domain: m.n_images for m in manifests}

    # the embeddings: a fixed-size float16 array per image, equal to what adaptflow loads
    frame = pl.read_parquet(files).sort("image_id")
    assert frame.schema["embedding"] == pl.Array(pl.Float16, plan.dim)
    ids = frame["image_id"].head(20).to_list()
    np.testing.assert_array_equal(
        frame["embedding"].head(20).to_numpy().astype(np.float32), features.load_features(plan.features_uri, ids)
    )
    index = storage.read_table(manifests[0].index_uri).to_pandas()
    joined = pl.from_pandas(index[["image_id", "label"]]).join(frame, on="image_id")
    assert joined.height == manifests[0].n_images and joined["label"].null_count() == 0


def test_rows_are_read_only_from_the_shards_that_hold_them(store, monkeypatch):
    """On a local store only a holding shard's values are read: the monitor's 500 new images sit in a
    night's new shards, not among the embeddings of the whole store."""
    plan, _ = store
    committed = shards.committed_shards(plan.features_uri)
    assert len(committed) >= 2
    first = shards.read_shard(committed[0], ["image_id"])["image_id"].to_pylist()[:3]
    reads = []
    read = shards.read_shard
    monkeypatch.setattr(
        shards, "read_shard", lambda s, columns=None: reads.append((s.shard_key, columns)) or read(s, columns)
    )
    rows = shards.load_rows(plan.features_uri, first[::-1], "embedding")
    assert [k for k, c in reads if c == ["embedding"]] == [committed[0].shard_key]
    assert len(reads) == len(committed) + 1  # every shard's ids, one shard's values
    whole = read(committed[0], ["image_id", "embedding"]).to_pandas().set_index("image_id").embedding
    assert np.array_equal(rows, np.stack([whole[i] for i in first[::-1]]))
