"""Prediction at any size (`adaptflow.evaluate.predict`) with an end-to-end model: shards follow the
training-image cache, so each cache shard is read once per prediction, a batch at a time, and the
predictions still come back one per image, in index order, as predicting the images in that order gives."""

import numpy as np
import pytest
from synthetic import save_untrained_images_model

from adaptflow.adapt.inference import infer, load_model
from adaptflow.data.ingest import ingest
from adaptflow.evaluate import predict
from adaptflow.extract import features
from adaptflow.extract.image_cache import image_cache
from adaptflow.models.card import predictions_table
from adaptflow.store import rows, shards, storage

SIZE = 32  # the model's input size, the cache's
CACHE_SHARD = 16  # images per cache shard


@pytest.fixture
def cached(demo_data, fast_config, memory_uri):
    """The demo target ingested, decoded into the training-image cache in shards of CACHE_SHARD, and an
    untrained end-to-end DANN of that size saved beside it (predictions do not depend on training)."""
    cfg = fast_config
    index = ingest(demo_data.target_uri, "target", f"{memory_uri}/ingest", cfg.ingest)
    cache = image_cache(memory_uri, cfg.backbone, SIZE)
    plan = features.plan_extraction(
        [index.index_uri], memory_uri, cfg.backbone, CACHE_SHARD, cache=cache, features=False
    )
    for shard in plan.shards:
        features.extract_shard(shard, cfg.backbone, cfg.extract)
    return index, plan, save_untrained_images_model(f"{memory_uri}/model", cfg, [str(d) for d in range(10)], SIZE)


@pytest.fixture
def reads(monkeypatch):
    """What prediction reads of the cache from here on: {shard key: rows of each streamed batch}, and the
    columns read from whole shards."""
    streamed, whole = {}, []
    stream, read = rows.stream_shard, rows.read_shard

    def watched(shard, column, batch_rows):
        for values in stream(shard, column, batch_rows):
            streamed.setdefault(shard.shard_key, []).append(len(values))
            yield values

    monkeypatch.setattr(rows, "stream_shard", watched)
    monkeypatch.setattr(rows, "read_shard", lambda s, columns=None: whole.append(columns) or read(s, columns))
    return streamed, whole


def _predict(model_uri, index, plan, out_uri, shard_size, split=None):
    to_do = predict.plan_prediction(model_uri, index, plan, out_uri, shard_size, split)
    return to_do, predict.merge_predictions(to_do, [predict.predict_shard(s, plan) for s in to_do.shards])


def _in_index_order(model_uri, index, plan, split=None):
    """The predictions of the images of `index` (`split`'s), predicted together in index order."""
    images = storage.read_table(index.index_uri).to_pandas()
    images = images if split is None else images[images.split == split].reset_index(drop=True)
    model, card = load_model(model_uri)
    return predictions_table(images, infer(model, card, images, plan)[0], card.classes).to_pandas()


def test_each_cache_shard_is_read_once_and_a_batch_at_a_time(cached, reads, memory_uri):
    """Shards cut in index order each took a slice of nearly every cache shard and read those shards whole:
    the cache was read about once per prediction shard, and each read held a whole shard. Cut in the
    cache's order, prediction shards of up to 40 images hold whole cache shards of 16 (two or three), stream
    them, and every cache shard is read once; the predictions are those of predicting in index order."""
    index, plan, model_uri = cached
    streamed, whole = reads
    to_do, done = _predict(model_uri, index, plan, f"{memory_uri}/preds.parquet", 40)

    cache_shards = shards.committed_shards(plan.cache.uri)
    assert len(cache_shards) == -(-index.n_images // CACHE_SHARD) > 3
    assert sorted(streamed) == sorted(s.shard_key for s in cache_shards)  # each one streamed, and once:
    assert all(sum(n) == s.n_rows for s in cache_shards for n in [streamed[s.shard_key]])
    assert whole == [["image_id"]] * len(cache_shards)  # where each image lies; pixels never read whole
    sizes = [s.rows[1] - s.rows[0] for s in to_do.shards]
    assert sum(sizes) == index.n_images and max(sizes) <= 40 and len(sizes) < len(cache_shards)

    got = storage.read_table(done.predictions_uri).to_pandas()
    expected = _in_index_order(model_uri, index, plan)
    assert done.n_predictions == len(got) == index.n_images
    assert got.uri.tolist() == expected.uri.tolist() and got.image_id.tolist() == expected.image_id.tolist()
    assert got.prediction.tolist() == expected.prediction.tolist()
    np.testing.assert_allclose(got.confidence, expected.confidence, rtol=1e-4)
    assert not storage.exists(to_do.order_uri) and not storage.find(to_do.parts_uri)  # parts and order gone


def test_a_rerun_keeps_the_committed_parts_and_merges_in_index_order(cached, monkeypatch, memory_uri):
    """A run killed after two parts resumes from them; the merge, a few positions at a time from parts
    read a few rows at a time, writes one row per image of the split, in index order."""
    index, plan, model_uri = cached
    monkeypatch.setattr(predict, "MERGE_ROWS", 7)
    monkeypatch.setattr(predict, "PART_BATCH_ROWS", 5)
    out = f"{memory_uri}/test.parquet"
    first = predict.plan_prediction(model_uri, index, plan, out, 24, "test")
    for shard in first.shards[:2]:
        predict.predict_shard(shard, plan)

    to_do, done = _predict(model_uri, index, plan, out, 24, "test")
    assert to_do == first  # the same plan: the same parts
    got = storage.read_table(done.predictions_uri).to_pandas()
    expected = _in_index_order(model_uri, index, plan, "test")
    assert 0 < len(got) < index.n_images and got.image_id.tolist() == expected.image_id.tolist()
    assert got.prediction.tolist() == expected.prediction.tolist()
