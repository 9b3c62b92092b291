"""Prediction at any size: one task per shard of the images, each part committed by its manifest, the
parts merged into one Parquet file. A killed run resumes: committed parts are not predicted again.

    {out}.parts/{key}.parquet   one shard's predictions
    {out}.parts/{key}.json      its manifest, written last
    {out}                       uri, image_id, prediction, confidence: one row per image, in index order

A part's key hashes the model and the images it holds, so a rerun with the same model and images finds
its parts, and any other model or image set makes new ones. Every part reads its rows in bounded memory
(`models.card.model_rows`): features from the feature store, pixels from the training-image cache.
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
from adaptflow.models.card import infer, load_model, predictions_table, unknown_below
from adaptflow.store import storage

log = logging.getLogger(__name__)

PREDICTIONS_SCHEMA = pa.schema(
    [("uri", pa.string()), ("image_id", pa.string()), ("prediction", pa.string()), ("confidence", pa.float32())]
)


def plan_prediction(
    model_uri: str, images: IngestManifest, out_uri: str, shard_size: int, split: str | None = None
) -> PredictionPlan:
    """Cut the images of `images` (only `split`'s, if given) into shards of `shard_size` for `model_uri`."""
    index = _rows(images.index_uri, split)
    model = _model_key(model_uri)
    parts_uri = f"{out_uri}.parts"
    shards = []
    for start in range(0, len(index), shard_size):
        ids = index.image_id.iloc[start : start + shard_size].tolist()
        key = hashlib.sha256(json.dumps([model, ids]).encode()).hexdigest()[:16]
        shards.append(
            PredictShard(
                model_uri=model_uri,
                model_key=model,
                index_uri=images.index_uri,
                rows=[start, start + len(ids)],
                split=split,
                parts_uri=parts_uri,
                key=key,
                domain=images.domain,
            )
        )
    return PredictionPlan(out_uri=out_uri, parts_uri=parts_uri, shards=shards, n_images=len(index))


def predict_shard(shard: PredictShard, features: ExtractionPlan | None, device: str = "cpu") -> PredictionPart:
    """Predict one shard's images and commit the part; a part already committed is returned as it is."""
    manifest = storage.join(shard.parts_uri, f"{shard.key}.json")
    if storage.exists(manifest):
        return PredictionPart.load(manifest).model_copy(update={"reused": True})
    start = time.perf_counter()
    model, card = _load(shard.model_uri, shard.model_key)
    rows = _rows(shard.index_uri, shard.split).iloc[shard.rows[0] : shard.rows[1]]
    logits, _ = infer(model, card, rows, features, device)
    part_uri = storage.join(shard.parts_uri, f"{shard.key}.parquet")
    storage.write_table(part_uri, predictions_table(rows, logits, card.classes, unknown_below=unknown_below(card)))
    part = PredictionPart(key=shard.key, part_uri=part_uri, n_rows=len(rows), seconds=time.perf_counter() - start)
    part.commit(manifest)
    return part


def merge_predictions(plan: PredictionPlan, parts: list[PredictionPart]) -> PredictionManifest:
    """Stream the parts, in plan order, into one Parquet file at `plan.out_uri`, then delete them."""
    start = time.perf_counter()
    by_key = {p.key: p for p in parts}
    ordered = [by_key[s.key] for s in plan.shards]
    fs, path = storage.filesystem(plan.out_uri)
    with fs.open(path, "wb") as f, pq.ParquetWriter(f, PREDICTIONS_SCHEMA, compression="zstd") as writer:
        for part in ordered:
            writer.write_table(storage.read_table(part.part_uri).cast(PREDICTIONS_SCHEMA))
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
    return PredictionManifest(
        predictions_uri=plan.out_uri,
        n_predictions=sum(p.n_rows for p in ordered),
        seconds=time.perf_counter() - start + sum(p.seconds for p in ordered),
        parts=len(ordered),
    )


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
