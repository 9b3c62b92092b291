from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from adaptflow.data.ingest import ingest
from adaptflow.errors import StoreError
from adaptflow.extract import features
from adaptflow.store import shards, storage


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
    plan, done = _extract_all(store, manifests, fast_config)
    assert (plan.n_requested, plan.n_cached) == (n, 0)
    per_index = sum(-(-m.n_images // fast_config.extract.shard_size) for m in manifests)  # shards cut per index
    assert len(done) == per_index and sum(s.n_rows for s in done) == n
    assert plan.features_uri.endswith(f"features/efficientnet_lite0-{plan.fingerprint}")

    again, _ = _extract_all(store, manifests, fast_config)
    assert (again.n_cached, again.shards) == (n, [])

    ids = storage.read_table(manifests[0].index_uri)["image_id"].to_pylist()
    emb = features.load_features(plan.features_uri, ids[::-1])
    assert emb.shape == (len(ids), plan.dim) and emb.dtype == np.float32 and np.isfinite(emb).all()
    assert np.array_equal(emb[::-1], features.load_features(plan.features_uri, ids))


def test_shards_are_plain_parquet_with_fingerprint_metadata(indexed, fast_config, tmp_path):
    store, manifests = indexed
    plan, done = _extract_all(store, manifests[:1], fast_config)
    local = tmp_path / "shard.parquet"
    local.write_bytes(storage.read_bytes(done[0].outputs[0].data_uri))
    f = pq.ParquetFile(local)
    meta = f.schema_arrow.metadata
    assert meta[b"adaptflow.fingerprint"].decode() == plan.fingerprint
    assert meta[b"adaptflow.schema_version"] == b"1"
    assert str(f.schema_arrow.field("embedding").type) == f"fixed_size_list<element: halffloat>[{plan.dim}]"
    emb_col = f.metadata.row_group(0).column(f.schema_arrow.names.index("embedding") + 0)
    assert not emb_col.has_dictionary_page
    assert f.schema_arrow.names == ["image_id", "label", "domain", "split", "embedding"]
    n = duckdb.execute(f"select count(distinct image_id) from read_parquet('{local}')").fetchall()[0][0]
    assert n == done[0].n_rows


def test_uncommitted_shards_are_invisible(indexed, fast_config):
    store, manifests = indexed
    plan, done = _extract_all(store, manifests[:1], fast_config)
    storage.filesystem(plan.features_uri)[0].rm(
        storage.filesystem(storage.join(plan.features_uri, "shards", f"{done[0].shard_key}.json"))[1]
    )
    replan = features.plan_extraction([manifests[0].index_uri], store, fast_config.backbone, 10_000)
    assert replan.n_cached == manifests[0].n_images - done[0].n_rows
    with pytest.raises(StoreError, match="have no committed features"):
        ids = storage.read_table(manifests[0].index_uri)["image_id"].to_pylist()
        features.load_features(plan.features_uri, ids)


def test_a_different_image_size_is_a_different_extractor(indexed, fast_config):
    store, manifests = indexed
    plan, _ = _extract_all(store, manifests[:1], fast_config)
    other = fast_config.model_copy(update={"backbone": fast_config.backbone.model_copy(update={"image_size": 48})})
    replan = features.plan_extraction([manifests[0].index_uri], store, other.backbone, 64)
    assert replan.fingerprint != plan.fingerprint and replan.n_cached == 0


def _small_shards(indexed, cfg, shard_size):
    store, manifests = indexed
    plan = features.plan_extraction([manifests[0].index_uri], store, cfg.backbone, shard_size)
    return plan, [features.extract_shard(s, cfg.backbone, cfg.extract) for s in plan.shards]


@pytest.fixture
def store_reads(indexed, fast_config, monkeypatch):
    """The demo source in shards of 16 rows, its image ids, and the columns of each shard read through
    `adaptflow.store.rows` from here on (the process's sample and location caches emptied before and after)."""
    from adaptflow import state
    from adaptflow.store import rows as rows_module

    store, manifests = indexed
    plan, _ = _small_shards(indexed, fast_config, 16)
    ids = storage.read_table(manifests[0].index_uri)["image_id"].to_pylist()
    state.SAMPLES.clear()
    state.LOCATIONS.clear()
    reads = []
    read_shard = rows_module.read_shard
    monkeypatch.setattr(
        rows_module, "read_shard", lambda s, columns=None: reads.append(columns) or read_shard(s, columns)
    )
    yield plan, ids, reads
    state.SAMPLES.clear()
    state.LOCATIONS.clear()


def test_compaction_merges_small_shards_without_changing_a_row(indexed, fast_config):
    store, manifests = indexed
    plan, done = _small_shards(indexed, fast_config, 16)
    ids = storage.read_table(manifests[0].index_uri)["image_id"].to_pylist()
    before = features.load_features(plan.features_uri, ids)

    result = shards.compact_shards(plan.features_uri, target_rows=64, min_shards=4)
    after = shards.committed_shards(plan.features_uri)
    assert result.shards_before == len(done) > result.shards_after == len(after) == -(-len(ids) // 64)
    assert sum(s.n_rows for s in after) == len(ids) and all(s.replaces for s in after)
    assert np.array_equal(before, features.load_features(plan.features_uri, ids))
    # the parts are gone: only the merged files remain, so a plain glob over shards/ is the dataset too
    fs, path = storage.filesystem(storage.join(plan.features_uri, "shards"))
    on_disk = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
    assert len(on_disk) == len(after)
    # fewer than min_shards small shards: nothing to do
    assert shards.compact_shards(plan.features_uri, 64, min_shards=4).shards_after == len(after)


def test_a_validation_sample_is_read_once_per_process_until_its_shards_change(store_reads, monkeypatch):
    """Every candidate of a run is scored on the same samples, and a sample of a large target lies in every
    shard: `sample_rows` reads it once, again only when the committed shards change; the least recently
    used samples go past the cache's bound, and a larger sample is streamed and not kept."""
    from adaptflow import state
    from adaptflow.adapt import samples

    plan, ids, reads = store_reads
    expected = features.load_features(plan.features_uri, ids)

    def sample(at):
        return samples.sample_rows(plan.features_uri, [ids[i] for i in at], "embedding", (plan.dim,))

    first = sample(range(0, 40, 2))
    n = len(reads)
    assert n > 1 and sample(range(0, 40, 2)) is first and len(reads) == n  # a second candidate reads nothing
    assert np.array_equal(first.gather(np.arange(20)).numpy(), expected[0:40:2])

    shards.compact_shards(plan.features_uri, target_rows=64, min_shards=4)  # other shards are committed
    merged = sample(range(0, 40, 2))
    assert merged is not first and len(reads) > n
    assert state.SAMPLES.values() == [merged]  # the stale copy is not kept beside it
    assert np.array_equal(merged.gather(np.arange(20)).numpy(), expected[0:40:2])

    monkeypatch.setattr(state.SAMPLES, "max_size", int(1.5 * merged.resident_bytes))
    other = sample(range(1, 40, 2))
    assert state.SAMPLES.values() == [other]  # the older sample made room
    monkeypatch.setattr(state.SAMPLES, "max_size", 1)
    streamed = sample(range(40))
    assert streamed.resident_bytes == 0 and state.SAMPLES.values() == [other]
    assert np.array_equal(streamed.gather(np.arange(40)).numpy(), expected[:40])


def test_a_training_segment_that_draws_fewer_rows_than_there_are_reads_only_the_shards_it_touches(store_reads):
    """Rows that fit in RESIDENT_BYTES are read whole, once, only if the caller draws them all: a training
    segment of 2 steps of 8 rows over a split of many shards reads the one or two shards of its batches,
    not every shard, and draws the same rows either way."""
    from adaptflow.store.rows import ShardedRows

    plan, ids, reads = store_reads
    values = lambda: sum(c == ["embedding"] for c in reads)  # noqa: E731  (not the image_id lookups)

    whole = ShardedRows(plan.features_uri, ids, "embedding", (plan.dim,))
    n_shards = values()
    assert whole.resident_bytes and n_shards == len(set(whole.shard_of)) > 3
    reads.clear()
    segment = ShardedRows(plan.features_uri, ids, "embedding", (plan.dim,), draws=2 * 8)
    batches = segment.epoch_order(seed=0, epoch=0)[:16]
    assert segment.resident_bytes == 0 and values() == 0
    assert torch.equal(segment.gather(batches[:8]), whole.gather(batches[:8]))
    assert torch.equal(segment.gather(batches[8:]), whole.gather(batches[8:]))
    assert values() <= 2 < n_shards
    assert ShardedRows(plan.features_uri, ids, "embedding", (plan.dim,), draws=len(ids)).resident_bytes


def test_one_pass_streams_each_shard_once_a_batch_at_a_time(store_reads, monkeypatch):
    """Inference reads its rows in one pass (`ShardedRows.batches`): each shard's file streamed once, in
    batches of the inference batch's size, never its values whole; batches are full across shard ends and
    hold the rows `gather` gives, whatever the order of the images asked for."""
    from adaptflow.store import rows as rows_module
    from adaptflow.store.rows import ShardedRows

    plan, ids, reads = store_reads
    streamed = []
    stream = rows_module.stream_shard
    monkeypatch.setattr(
        rows_module, "stream_shard", lambda s, column, n: streamed.append((s.shard_key, n)) or stream(s, column, n)
    )
    wanted = ids[::-1][: len(ids) - 5]  # not in the shards' order, and not all of every shard
    one_pass = ShardedRows(plan.features_uri, wanted, "embedding", (plan.dim,), resident_bytes=0)
    expected = features.load_features(plan.features_uri, wanted)
    reads.clear()

    seen = np.zeros(len(wanted), dtype=int)
    batches = list(one_pass.batches(12))
    for index, x in batches:
        seen[index] += 1
        assert np.array_equal(x.numpy(), expected[index])
    assert (seen == 1).all() and [len(i) for i, _ in batches][:-1] == [12] * (len(batches) - 1)
    keys = [key for key, _ in streamed]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == len(set(one_pass.shard_of)) > 3
    assert {n for _, n in streamed} == {12} and reads == []


def test_where_each_image_lies_is_read_once_per_process_until_the_shards_change(store_reads):
    """Every ShardedRows of a run looks its images up in the same committed shards: the image_id column of
    each shard (on an object store, each shard file whole) is read for the first, not again for the next,
    and read again once compaction commits other shards, with the same rows found."""
    from adaptflow.store.rows import ShardedRows

    plan, ids, reads = store_reads
    expected = features.load_features(plan.features_uri, ids)
    lookups = lambda: sum(c == ["image_id"] for c in reads)  # noqa: E731

    def rows(at):
        return ShardedRows(plan.features_uri, [ids[i] for i in at], "embedding", (plan.dim,), resident_bytes=0)

    first = rows(range(0, 40))
    n = lookups()
    assert n == len(shards.committed_shards(plan.features_uri)) > 3
    second = rows(range(20, 60))  # another candidate, other images of the same store: no lookup read
    assert lookups() == n
    assert np.array_equal(second.gather(np.arange(40)).numpy(), expected[20:60])
    assert np.array_equal(first.gather(np.arange(40)).numpy(), expected[:40])

    shards.compact_shards(plan.features_uri, target_rows=64, min_shards=4)
    merged = rows(range(0, 40))
    assert lookups() == n + len(shards.committed_shards(plan.features_uri))
    assert np.array_equal(merged.gather(np.arange(40)).numpy(), expected[:40])
    with pytest.raises(StoreError, match="1 images are not in"):
        ShardedRows(plan.features_uri, [ids[0], "no-such-image"], "embedding", (plan.dim,))


def test_committed_files_read_as_one_dataset_by_pyarrow_and_duckdb(indexed, fast_config, tmp_path):
    import pyarrow.dataset as ds

    store, manifests = indexed
    plan, done = _small_shards(indexed, fast_config, 40)
    local = []
    for i, uri in enumerate(shards.committed_files(plan.features_uri)):
        local.append(str(tmp_path / f"part-{i}.parquet"))
        (tmp_path / f"part-{i}.parquet").write_bytes(storage.read_bytes(uri))
    table = ds.dataset(local, format="parquet").to_table(columns=["image_id", "split"])
    assert table.num_rows == manifests[0].n_images == len(set(table["image_id"].to_pylist()))
    rows = duckdb.execute(
        f"select split, count(*) from read_parquet({local!r}) group by split order by split"
    ).fetchall()
    assert sum(n for _, n in rows) == manifests[0].n_images and {s for s, _ in rows} <= {"train", "val", "test"}


def test_a_retried_shard_is_not_extracted_twice_and_a_dead_attempt_leaves_only_an_orphan(indexed, fast_config):
    store, manifests = indexed
    plan, done = _small_shards(indexed, fast_config, 64)
    again = features.extract_shard(plan.shards[0], fast_config.backbone, fast_config.extract)
    assert again.outputs == done[0].outputs and again.bytes_read == 0  # committed already: no second data file
    # an attempt killed after writing its data but before its manifest
    orphan = storage.join(plan.features_uri, "shards", f"{done[0].shard_key}-deadbeef.parquet")
    storage.write_bytes(orphan, storage.read_bytes(done[0].outputs[0].data_uri))
    assert orphan not in shards.committed_files(plan.features_uri)
    assert shards.compact_shards(plan.features_uri, 64, min_shards=0).orphans_removed == 0  # too young
    assert shards.compact_shards(plan.features_uri, 64, min_shards=0, orphan_age_s=-1).orphans_removed == 1
    assert not storage.exists(orphan) and storage.exists(done[0].outputs[0].data_uri)


def test_decoding_on_the_device_matches_decoding_in_workers(indexed, fast_config):
    store, manifests = indexed
    ids = storage.read_table(manifests[1].index_uri)["image_id"].to_pylist()
    plan, _ = _extract_all(store, manifests[1:], fast_config)
    on_device = fast_config.model_copy(
        update={
            "extract": fast_config.extract.model_copy(update={"decode_on": "device"}),
            "backbone": fast_config.backbone.model_copy(update={"layer": None}),
        }
    )
    other_store = store + "-device"
    plan2, done = _extract_all(other_store, manifests[1:], on_device)
    assert sum(s.bytes_read for s in done) > 0
    a = features.load_features(plan.features_uri, ids)
    b = features.load_features(plan2.features_uri, ids)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99


def test_a_store_written_by_an_incompatible_version_is_refused_with_a_clear_message(indexed, fast_config):
    store, manifests = indexed
    plan, done = _small_shards(indexed, fast_config, 10_000)
    table = storage.read_table(done[0].outputs[0].data_uri)
    old = table.replace_schema_metadata({**table.schema.metadata, b"adaptflow.schema_version": b"0"})
    storage.write_table(done[0].outputs[0].data_uri, old)
    with pytest.raises(StoreError, match=r"has schema version 0, this adaptflow reads version 1"):
        features.plan_extraction([manifests[0].index_uri], store, fast_config.backbone, 64)
    manifest_uri = storage.join(plan.features_uri, "shards", f"{done[0].shard_key}.json")
    storage.write_json(manifest_uri, {**storage.read_json(manifest_uri), "schema_version": 2})
    with pytest.raises(StoreError, match=r"schema version 2, this adaptflow reads version 1"):
        shards.committed_shards(plan.features_uri)


def _race(plans, cfg) -> list[str]:
    """Run each extraction plan on a thread of its own, every attempt past the "already committed?" check
    before another commits; the image ids of every committed row."""
    from concurrent.futures import ThreadPoolExecutor

    raw = cfg.extract

    def extract(plan):
        for s in plan.shards:
            tables, nbytes, fingerprint = features._embed_shard(s, cfg.backbone, raw, ["embedding"])
            shards.commit_shard(s.features_uri, s.shard_key, tables["embedding"], fingerprint, raw.dtype, 0.0, nbytes)

    with ThreadPoolExecutor(len(plans)) as pool:
        list(pool.map(extract, plans))
    return [
        i
        for f in shards.committed_files(plans[0].features_uri)
        for i in storage.read_table(f, columns=["image_id"])["image_id"].to_pylist()
    ]


def test_two_runs_extracting_the_same_images_at_once_leave_one_row_per_image(indexed, fast_config):
    store, manifests = indexed
    plans = [features.plan_extraction([manifests[0].index_uri], store, fast_config.backbone, 32) for _ in range(2)]
    # both runs planned before either committed: the same shards, extracted twice, side by side
    assert [s.shard_key for s in plans[0].shards] == [s.shard_key for s in plans[1].shards]
    ids = _race(plans, fast_config)
    assert len(ids) == len(set(ids)) == manifests[0].n_images
    assert all(storage.exists(f) for f in shards.committed_files(plans[0].features_uri))


def test_three_runs_with_different_targets_at_once_leave_one_row_per_image(
    demo_data, fast_config, memory_uri, tmp_path
):
    source = ingest(demo_data.source_uri, "source", f"{memory_uri}/ingest/source", fast_config.ingest)
    files = sorted(str(p) for p in Path(demo_data.target_uri).iterdir())
    targets = []
    for k in range(3):  # three nights' targets: a third of the demo target each
        folder = tmp_path / f"night{k}"
        for uri in files[k::3]:
            storage.write_bytes(str(folder / uri.rsplit("/", 1)[-1]), storage.read_bytes(uri))
        targets.append(ingest(str(folder), "target", f"{memory_uri}/ingest/night{k}", fast_config.ingest))
    # every run planned before any committed, the source first in two and last in one
    orders = [[source, targets[0]], [source, targets[1]], [targets[2], source]]
    plans = [features.plan_extraction([m.index_uri for m in o], memory_uri, fast_config.backbone, 32) for o in orders]
    ids = _race(plans, fast_config)
    assert len(ids) == len(set(ids)) == source.n_images + sum(t.n_images for t in targets)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_deleted_after_ingest_is_one_line_naming_it(demo_data, fast_config, memory_uri, tmp_path, workers):
    from adaptflow.errors import DatasetError

    folder = tmp_path / "target"
    for uri in sorted(Path(demo_data.target_uri).iterdir())[:20]:
        storage.write_bytes(str(folder / uri.name), uri.read_bytes())
    target = ingest(str(folder), "target", f"{memory_uri}/ingest/target", fast_config.ingest)
    gone = sorted(folder.iterdir())[7]
    gone.unlink()
    plan = features.plan_extraction([target.index_uri], memory_uri, fast_config.backbone, 32)
    extract = fast_config.extract.model_copy(update={"num_workers": workers})
    with pytest.raises(DatasetError) as e:
        features.extract_shard(plan.shards[0], fast_config.backbone, extract)
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message and "DataLoader" not in message
    assert gone.name in message and "deleted or changed since" in message and "run again" in message


def test_the_training_image_cache_is_filled_in_the_same_pass_and_only_where_missing(indexed, fast_config):
    """Images missing both features and pixels are read and decoded once for both; a store that has
    features but no cache (written before the cache existed) gets the pixels alone, no forward pass."""
    from adaptflow.adapt.images import image_featurizer, load_images
    from adaptflow.extract.image_cache import image_cache, load_pixels

    store, manifests = indexed
    cfg = fast_config
    first = features.plan_extraction([manifests[0].index_uri], store, cfg.backbone, cfg.extract.shard_size)
    for shard in first.shards:  # features only, as before the cache existed
        features.extract_shard(shard, cfg.backbone, cfg.extract)
    cache = image_cache(store, cfg.backbone, 32)
    plan = features.plan_extraction(
        [m.index_uri for m in manifests], store, cfg.backbone, cfg.extract.shard_size, cache=cache
    )
    kinds: dict[tuple[bool, bool], int] = {}
    for s in plan.shards:
        kinds[s.features, s.cache is not None] = kinds.get((s.features, s.cache is not None), 0) + s.length
    assert kinds == {(True, True): manifests[1].n_images, (False, True): manifests[0].n_images}
    results = [features.extract_shard(s, cfg.backbone, cfg.extract) for s in plan.shards]
    target_bytes = sum(storage.info(u)["size"] for u in storage.read_table(manifests[1].index_uri)["uri"].to_pylist())
    both = [r for r, s in zip(results, plan.shards, strict=True) if s.features]
    assert sum(r.bytes_read for r in both) == target_bytes  # each file read once for both outputs
    assert all(len(r.outputs) == 2 for r in both)
    index = storage.read_table(manifests[1].index_uri).to_pandas()
    pixels = load_pixels(cache, index.image_id.tolist())
    _, _, data_config = image_featurizer(cfg.backbone.model_copy(update={"image_size": 32}))
    assert torch.equal(pixels, load_images(index.uri.tolist(), data_config, 0))  # what decoding gives, bit for bit
    replan = features.plan_extraction([m.index_uri for m in manifests], store, cfg.backbone, 64, cache=cache)
    assert replan.shards == [] and replan.n_cached_pixels == replan.n_requested


def test_pixels_are_one_binary_value_per_image_and_an_older_stores_lists_still_read_and_merge(indexed, fast_config):
    """The cache stores each image's pixels as one fixed-size binary value (a list of uint8 reads ~25x
    slower). A store written before keeps list-layout shards: they read the same, and compaction merges
    them with new ones into the binary layout."""
    import pyarrow as pa

    from adaptflow.extract.image_cache import image_cache, load_pixels
    from adaptflow.store.rows import ShardedRows

    store, manifests = indexed
    cfg = fast_config
    cache = image_cache(store, cfg.backbone, 32)
    plan = features.plan_extraction([m.index_uri for m in manifests], store, cfg.backbone, 64, cache=cache)
    for s in plan.shards:
        features.extract_shard(s, cfg.backbone, cfg.extract)
    committed = shards.committed_shards(cache.uri)
    assert all(pa.types.is_fixed_size_binary(shards.read_shard(s)["pixels"].type) for s in committed)
    ids = storage.read_table(manifests[1].index_uri)["image_id"].to_pylist()
    expected = load_pixels(cache, ids)
    assert expected.shape == (len(ids), 3, 32, 32) and expected.float().std() > 0

    old = committed[0]  # rewritten as an older adaptflow wrote it: a fixed-size list of uint8
    table = shards.read_shard(old)
    matrix = shards.value_matrix(table["pixels"])
    as_list = pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])
    storage.write_table(old.data_uri, table.set_column(table.column_names.index("pixels"), "pixels", as_list))
    assert pa.types.is_fixed_size_list(shards.read_shard(old)["pixels"].type)
    assert torch.equal(load_pixels(cache, ids), expected)
    rows = ShardedRows(cache.uri, ids, "pixels", (3, 32, 32), resident_bytes=0, max_shards=2)
    assert torch.equal(rows.gather(np.arange(len(ids))), expected)

    assert shards.compact_shards(cache.uri, 10_000, min_shards=2).shards_after == 1
    (merged,) = shards.committed_shards(cache.uri)
    assert pa.types.is_fixed_size_binary(shards.read_shard(merged)["pixels"].type)
    assert torch.equal(load_pixels(cache, ids), expected)


@pytest.mark.parametrize("damage", ["truncated", "other width", "manifest missing fields"])
def test_a_damaged_shard_is_quarantined_named_and_extracted_again(indexed, fast_config, damage):
    """A committed shard cut short, overwritten with other data, or with a manifest that lost fields used to
    fail every rerun after three retries (issue 23). A reader names the file and moves it aside; the next
    extraction embeds its images again."""
    store, manifests = indexed
    plan, done = _extract_all(store, manifests[:1], fast_config)
    shard = done[0].outputs[0]
    folder, ids = plan.features_uri, storage.read_table(manifests[0].index_uri)["image_id"].to_pylist()
    manifest = storage.join(folder, "shards", f"{shard.shard_key}.json")
    if damage == "truncated":
        data = storage.read_bytes(shard.data_uri)
        storage.write_bytes(shard.data_uri, data[: len(data) // 2])
    elif damage == "other width":
        table = storage.read_table(shard.data_uri)
        wide = np.zeros((table.num_rows, plan.dim + 3), np.float16)
        storage.write_table(shard.data_uri, table.set_column(4, "embedding", shards.value_array(wide, "float16")))
    else:
        storage.write_json(manifest, {k: v for k, v in storage.read_json(manifest).items() if k != "n_rows"})
    if damage != "manifest missing fields":  # a reader meets it: one line naming the file
        with pytest.raises(StoreError, match=rf"damaged shard {shard.data_uri}: .*moved to .*quarantine"):
            features.load_features(folder, ids)
        assert not storage.exists(manifest)
    again, redone = _extract_all(store, manifests[:1], fast_config)  # the rerun heals the store
    assert storage.exists(storage.join(folder, "quarantine", f"{shard.shard_key}.why.txt"))
    assert again.n_cached == manifests[0].n_images - shard.n_rows and sum(s.n_rows for s in redone) == shard.n_rows
    emb = features.load_features(folder, ids)
    assert emb.shape == (len(ids), plan.dim) and np.isfinite(emb).all()
