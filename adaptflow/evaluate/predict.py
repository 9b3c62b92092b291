"""Prediction at any size: one task per shard of the images, each part committed by its manifest, the
parts merged into one Parquet file. A killed run resumes: committed parts are not predicted again.

    {out}.parts/order-{hash}.parquet  the images in the order they are predicted (`plan_prediction`)
    {out}.parts/{key}.parquet         one shard's predictions, with each row's position in the index
    {out}.parts/{key}.json            its manifest, written last
    {out}                             uri, image_id, prediction, confidence: one row per image, in index order

A part's key hashes the model and the images it holds, so a rerun with the same model and images finds
its parts, and any other model or image set makes new ones. Shards follow the store the model reads
(features from the feature store, pixels from the training-image cache), each part streaming its rows from
one or a few store shards (`adapt.inference.model_rows`): memory for a batch, whatever the number of images.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from adaptflow import state
from adaptflow.adapt.inference import infer, load_model, rows_folder
from adaptflow.evaluate.metrics import classification_metrics
from adaptflow.manifests import (
    EvaluationManifest,
    ExtractionPlan,
    IngestManifest,
    PredictionManifest,
    PredictionPart,
    PredictionPlan,
    PredictShard,
)
from adaptflow.models.card import ModelCard, load_card, predictions_table, unknown_below
from adaptflow.store import storage
from adaptflow.store.rows import locate
from adaptflow.store.shards import committed_shards

log = logging.getLogger(__name__)

PREDICTIONS_SCHEMA = pa.schema(
    [("uri", pa.string()), ("image_id", pa.string()), ("prediction", pa.string()), ("confidence", pa.float32())]
)
PART_LAYOUT = 2  # in a part's key: a part holds each row's position in the index (layout 1 was index order)
MERGE_ROWS = 65_536  # positions the merge writes at a time
PART_BATCH_ROWS = 1024  # rows of a part the merge holds at a time


def plan_prediction(
    model_uri: str,
    images: IngestManifest,
    features: ExtractionPlan | None,
    out_uri: str,
    shard_size: int,
    split: str | None = None,
) -> PredictionPlan:
    """Cut the images of `images` (only `split`'s, if given) into shards of up to `shard_size` for `model_uri`,
    in the order the store it reads (`features`: where extraction put its rows) holds them: a shard reads one
    or a few store shards, and each store shard is read by one prediction shard. (Cut in index order, every
    prediction shard took a slice of nearly every store shard: the store was read once per prediction shard.)
    The order goes beside the parts, for the shards to read their images from."""
    index = _rows(images.index_uri, split)
    model = _model_key(model_uri)
    parts_uri = f"{out_uri}.parts"
    order, cuts = _store_order(index, load_card(model_uri), features, shard_size)
    ids = index.image_id.to_numpy()[order].tolist()
    keys = [_part_key(model, ids[a:b]) for a, b in cuts]
    order_uri = storage.join(parts_uri, f"order-{_part_key(model, keys)}.parquet") if cuts else None
    if order_uri is not None:
        table = pa.table({"position": order, "uri": index.uri.to_numpy()[order], "image_id": ids})
        storage.write_table(order_uri, table, row_group_size=shard_size)  # a shard reads one or two groups
    shards = [
        PredictShard(
            model_uri=model_uri,
            model_key=model,
            order_uri=order_uri,
            rows=[a, b],
            split=split,
            parts_uri=parts_uri,
            key=key,
            domain=images.domain,
        )
        for (a, b), key in zip(cuts, keys, strict=True)
    ]
    return PredictionPlan(out_uri=out_uri, parts_uri=parts_uri, shards=shards, n_images=len(index), order_uri=order_uri)


def _store_order(
    index: pd.DataFrame, card: ModelCard, features: ExtractionPlan | None, shard_size: int
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The positions of `index` in the order the model's store holds their rows (by store shard, then row;
    images decoded on the spot keep the index's order), and each prediction shard's [start, stop) of it."""
    folder = rows_folder(card, features)
    if folder is None or index.empty:
        return np.arange(len(index)), _cuts(np.zeros(len(index), np.int64), shard_size)
    shard, row = locate(folder, committed_shards(folder), index.image_id.tolist())
    order = np.lexsort((np.arange(len(index)), row, shard))
    return order, _cuts(shard[order], shard_size)


def _cuts(store_shard: np.ndarray, size: int) -> list[tuple[int, int]]:
    """[start, stop) of each prediction shard over rows sorted by `store_shard`: whole store shards packed
    up to `size` rows, one of more than `size` wanted rows split into shards of its own."""
    bounds = [int(b) for b in np.flatnonzero(np.diff(store_shard)) + 1] + [len(store_shard)]
    cuts, start, group = [], 0, 0
    for stop in bounds:
        if stop - start > size and group > start:  # this store shard overflows the open one: close it
            cuts.append((start, group))
            start = group
        while stop - start > size:
            cuts.append((start, start + size))
            start += size
        group = stop
    if len(store_shard) > start:
        cuts.append((start, len(store_shard)))
    return cuts


def _part_key(model: str, ids: list[str]) -> str:
    return hashlib.sha256(json.dumps([model, PART_LAYOUT, ids]).encode()).hexdigest()[:16]


def predict_shard(shard: PredictShard, features: ExtractionPlan | None, device: str = "cpu") -> PredictionPart:
    """Predict one shard's images and commit the part; a part already committed is returned as it is."""
    manifest = storage.join(shard.parts_uri, f"{shard.key}.json")
    if storage.exists(manifest):
        return PredictionPart.load(manifest).model_copy(update={"reused": True})
    start = time.perf_counter()
    rows = _read_rows(shard.order_uri, *shard.rows).to_pandas()
    with state.SHARD_DEVICE:
        model, card = _load(shard.model_uri, shard.model_key)
        logits, _ = infer(model, card, rows, features, device)
    table = predictions_table(rows, logits, card.classes, unknown_below=unknown_below(card))
    table = table.append_column("position", pa.array(rows.position.to_numpy())).sort_by("position")
    part_uri = storage.join(shard.parts_uri, f"{shard.key}.parquet")
    storage.write_table(part_uri, table)
    part = PredictionPart(key=shard.key, part_uri=part_uri, n_rows=len(rows), seconds=time.perf_counter() - start)
    part.commit(manifest)
    return part


def _read_rows(uri: str, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a Parquet file, reading only the row groups that hold them."""
    found = storage.parquet_file(uri)
    groups, offset, skip = [], 0, 0
    for g in range(found.metadata.num_row_groups):
        n = found.metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
            skip = skip if groups else start - offset
            groups.append(g)
        offset += n
    return found.read_row_groups(groups).slice(skip, stop - start)


def merge_predictions(plan: PredictionPlan, parts: list[PredictionPart]) -> PredictionManifest:
    """Merge the parts into one Parquet file at `plan.out_uri`, in index order, then delete them and the
    plan's order. Every part is sorted by position: the merge takes the next MERGE_ROWS positions from all
    of them at once, holding a batch of each part rather than the predictions."""
    start = time.perf_counter()
    by_key = {p.key: p for p in parts}
    ordered = [by_key[s.key] for s in plan.shards]
    cursors = [_Cursor(p.part_uri) for p in ordered]
    fs, path = storage.filesystem(plan.out_uri)
    with fs.open(path, "wb") as f, pq.ParquetWriter(f, PREDICTIONS_SCHEMA, compression="zstd") as writer:
        for stop in range(MERGE_ROWS, plan.n_images + MERGE_ROWS, MERGE_ROWS):
            window = pa.concat_tables([c.below(stop) for c in cursors]).sort_by("position")
            writer.write_table(window.drop_columns(["position"]).cast(PREDICTIONS_SCHEMA))
    reused = sum(p.reused for p in ordered)
    if reused:
        log.warning(
            "%s: %d of %d parts were committed by an earlier attempt and not predicted again",
            plan.out_uri,
            reused,
            len(ordered),
        )
    for part in ordered:
        storage.remove(part.part_uri)
        storage.remove(storage.join(plan.parts_uri, f"{part.key}.json"))
    if plan.order_uri is not None:
        storage.remove(plan.order_uri)
    return PredictionManifest(
        predictions_uri=plan.out_uri,
        n_predictions=sum(p.n_rows for p in ordered),
        seconds=time.perf_counter() - start + sum(p.seconds for p in ordered),
        parts=len(ordered),
    )


class _Cursor:
    """A part's rows in position order, read PART_BATCH_ROWS at a time."""

    def __init__(self, uri: str):
        found = storage.parquet_file(uri)
        self._batches = found.iter_batches(PART_BATCH_ROWS)
        self._held: pa.RecordBatch | None = next(self._batches, None)
        self._schema = found.schema_arrow

    def below(self, stop: int) -> pa.Table:
        """The rows before position `stop` not taken yet."""
        taken = []
        while self._held is not None:
            n = int(np.searchsorted(self._held.column("position").to_numpy(), stop))
            taken.append(self._held.slice(0, n))
            if n < self._held.num_rows:
                self._held = self._held.slice(n)
                break
            self._held = next(self._batches, None)
        return pa.Table.from_batches(taken, schema=self._schema)


def evaluate(
    source: IngestManifest,
    test: PredictionManifest,
    target: PredictionManifest,
    target_labels: IngestManifest | None,
    classes: list[str],
    metrics_uri: str,
) -> EvaluationManifest:
    """Metrics of a model's predictions on the source test split and, with labels given for scoring only,
    on the target; written to `metrics_uri`."""
    start = time.perf_counter()
    metrics = {"source_test": metrics_of(test.predictions_uri, source, classes)}
    if target_labels is not None:
        metrics["target"] = metrics_of(target.predictions_uri, target_labels, classes)
    storage.write_json(metrics_uri, metrics)
    return EvaluationManifest(
        metrics_uri=metrics_uri,
        source_test=_headline(metrics["source_test"]),
        target=_headline(metrics["target"]) if "target" in metrics else None,
        seconds=time.perf_counter() - start,
    )


def _headline(m: dict) -> dict:
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "n": m["n"]}


def metrics_of(predictions_uri: str, labeled: IngestManifest | pd.DataFrame, classes: list[str]) -> dict:
    """Accuracy, macro-F1, per-class metrics and the confusion matrix of a predictions file against labels
    matched by content hash (`labeled`: an ingest manifest or a frame with image_id and label), so labels
    may name the images however they like."""
    code = {c: i for i, c in enumerate(classes)}
    pred = storage.read_table(predictions_uri, columns=["image_id", "prediction"]).to_pandas()
    truth = _rows(labeled.index_uri, None) if isinstance(labeled, IngestManifest) else labeled
    truth = truth[["image_id", "label"]].drop_duplicates("image_id")
    joined = pred.merge(truth, on="image_id")
    known = joined[joined.label.isin(code)]
    predicted = known.prediction.map(code).fillna(-1).to_numpy(dtype=np.int64)  # -1: "unknown" (open set), wrong
    metrics = classification_metrics(known.label.map(code).to_numpy(), predicted, classes)
    metrics["unlabeled_predictions"] = int(len(pred) - len(joined))
    metrics["labels_outside_source_classes"] = int(len(joined) - len(known))
    return metrics


def _rows(index_uri: str, split: str | None) -> pd.DataFrame:
    index = storage.read_table(index_uri).to_pandas()
    return index if split is None else index[index.split == split].reset_index(drop=True)


def _model_key(model_uri: str) -> str:
    """A short hash of the model's weights and card: parts of another model never pass for this one's."""
    h = hashlib.sha256()
    for name in ("model.json", "weights.safetensors"):
        h.update(storage.read_bytes(storage.join(model_uri, name)))
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=2)
def _load(model_uri: str, model_key: str):
    """A model is built once per worker process for all the shards it predicts (eval mode, read-only);
    keyed by its content too, so a model rewritten at the same URI is loaded afresh."""
    return load_model(model_uri)
