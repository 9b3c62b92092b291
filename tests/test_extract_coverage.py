"""Datasets the store is on record as holding whole are planned from a listing: a quiet night reads no image
id. The record is trusted only while every shard it names is still committed."""

import pytest

from adaptflow.data.ingest import ingest
from adaptflow.extract import coverage, features
from adaptflow.store import storage


@pytest.fixture
def embedded(demo_data, fast_config, memory_uri):
    """A store holding the demo source's features, recorded as a run records them once its shards commit."""
    src = ingest(demo_data.source_uri, "source", f"{memory_uri}/ingest/source", fast_config.ingest)
    keys = [src.fingerprint]
    plan = features.plan_extraction([src.index_uri], memory_uri, fast_config.backbone, 64, index_keys=keys)
    assert plan.shards and plan.coverage is not None
    for shard in plan.shards:
        features.extract_shard(shard, fast_config.backbone, fast_config.extract)
    features.record_coverage(plan, memory_uri)
    return src, plan, keys


@pytest.fixture
def reads(monkeypatch):
    """Every table read from here on."""
    seen = []
    read = storage.read_table
    monkeypatch.setattr(storage, "read_table", lambda uri, *a, **k: seen.append(uri) or read(uri, *a, **k))
    return seen


def test_datasets_on_record_are_planned_without_reading_an_id(embedded, fast_config, memory_uri, reads):
    src, plan, keys = embedded
    again = features.plan_extraction([src.index_uri], memory_uri, fast_config.backbone, 64, index_keys=keys)
    assert reads == []
    assert (again.features_uri, again.n_requested, again.n_cached, again.shards) == (
        plan.features_uri,
        src.n_images,
        src.n_images,
        [],
    )
    # without keys, or with another dataset's, the plan reads the ids and finds the same
    for other in (None, [*keys, "another-dataset"]):
        read = features.plan_extraction([src.index_uri], memory_uri, fast_config.backbone, 64, index_keys=other)
        assert read.shards == [] and read.n_cached == src.n_images
    assert src.index_uri in reads


def test_a_shard_gone_makes_the_record_stale_and_its_images_are_planned_again(embedded, fast_config, memory_uri, reads):
    src, plan, keys = embedded
    gone = storage.list_uris(storage.join(plan.features_uri, "shards"), ".json")[0]
    storage.remove(gone)
    again = features.plan_extraction([src.index_uri], memory_uri, fast_config.backbone, 64, index_keys=keys)
    assert src.index_uri in reads  # the ids were read: the record no longer holds
    assert again.shards and again.n_cached < src.n_images


def test_a_damaged_record_is_read_past(embedded, fast_config, memory_uri, reads):
    src, plan, keys = embedded
    storage.write_bytes(storage.join(memory_uri, "features", "covered", f"{plan.coverage.key}.json"), b"{")
    assert coverage.held(memory_uri, plan.coverage.key, plan.coverage.folders) is None
    again = features.plan_extraction([src.index_uri], memory_uri, fast_config.backbone, 64, index_keys=keys)
    assert src.index_uri in reads and again.shards == [] and again.n_cached == src.n_images
    # a plan that found nothing to do records it: the next plan lists
    reads.clear()
    features.plan_extraction([src.index_uri], memory_uri, fast_config.backbone, 64, index_keys=keys)
    assert reads == []
