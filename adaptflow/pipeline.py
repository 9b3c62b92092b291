"""The stages past extraction, as plain functions over URIs: fit a head, evaluate, predict, summarise.

Each takes manifests and URIs, reads what it needs from the store, writes its outputs and returns a
small manifest. Prefect tasks in `tasks/` are thin wrappers around these.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime

import pandas as pd

from adaptflow import storage
from adaptflow.config import Config
from adaptflow.errors import DatasetError
from adaptflow.evaluate import classification_metrics
from adaptflow.features import ExtractionPlan, load_features
from adaptflow.heads import train_head
from adaptflow.manifests import IngestManifest, Manifest
from adaptflow.models import ModelCard, infer, load_model, predictions_table, save_model


class ModelManifest(Manifest):
    model_uri: str
    classes: list[str]
    fingerprint: str
    val_accuracy: float
    epochs: int
    seconds: float


class PredictionManifest(Manifest):
    predictions_uri: str
    n_predictions: int
    seconds: float


class EvaluationManifest(Manifest):
    metrics_uri: str
    source_test: dict  # accuracy, macro_f1, n
    target: dict | None  # same, when target labels were given
    seconds: float


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def read_index(manifest: IngestManifest) -> pd.DataFrame:
    return storage.read_table(manifest.index_uri).to_pandas()


def fit_head(source: IngestManifest, features: ExtractionPlan, cfg: Config, model_uri: str) -> ModelManifest:
    """Train the head on source train features, early-stopped on source val; save it to `model_uri`."""
    start = time.perf_counter()
    index = read_index(source)
    classes = source.classes
    if len(classes) < 2:
        raise DatasetError(f"the source dataset {source.dataset_uri} needs at least 2 classes, found {classes}")
    train, val = index[index.split == "train"], index[index.split == "val"]
    if val.empty:  # tiny datasets: stop early on the training rows rather than not at all
        val = train
    code = {c: i for i, c in enumerate(classes)}
    x_train = load_features(features.features_uri, train.image_id.tolist())
    x_val = load_features(features.features_uri, val.image_id.tolist())
    head, curve = train_head(x_train, train.label.map(code).to_numpy(), x_val, val.label.map(code).to_numpy(),
                             len(classes), cfg.head, cfg.seed)
    val_acc = max(c["val_acc"] for c in curve)
    card = ModelCard(classes=classes, config=cfg, fingerprint=features.fingerprint, dim=features.dim, config_hash=cfg.fingerprint(), dataset_fingerprint=source.fingerprint,
                     metrics={"source_val_accuracy": val_acc})
    save_model(model_uri, head, card)
    storage.write_json(storage.join(model_uri, "curve.json"), curve)
    return ModelManifest(model_uri=model_uri, classes=classes, fingerprint=features.fingerprint,
                         val_accuracy=val_acc, epochs=len(curve), seconds=time.perf_counter() - start)


def predict(model_uri: str, images: IngestManifest, features: ExtractionPlan | None, out_uri: str) -> PredictionManifest:
    """One row per valid image: uri, image_id, prediction (class name), confidence."""
    start = time.perf_counter()
    model, card = load_model(model_uri)
    index = read_index(images)
    logits, _ = infer(model, card, index, features)
    table = predictions_table(index, logits, card.classes)
    storage.write_table(out_uri, table)
    return PredictionManifest(predictions_uri=out_uri, n_predictions=table.num_rows,
                              seconds=time.perf_counter() - start)


def evaluate(model_uri: str, source: IngestManifest, predictions: PredictionManifest,
             target_labels: IngestManifest | None, features: ExtractionPlan | None,
             metrics_uri: str) -> EvaluationManifest:
    """Score the source test split, and the target predictions against labels given for scoring only."""
    start = time.perf_counter()
    model, card = load_model(model_uri)
    code = {c: i for i, c in enumerate(card.classes)}
    test = read_index(source).query("split == 'test'")
    logits, _ = infer(model, card, test, features)
    metrics = {"source_test": classification_metrics(test.label.map(code).to_numpy(), logits.argmax(1).numpy(),
                                                     card.classes)}
    if target_labels is not None:
        metrics["target"] = score_predictions(predictions.predictions_uri, target_labels, card.classes)
    storage.write_json(metrics_uri, metrics)
    return EvaluationManifest(metrics_uri=metrics_uri, source_test=_headline(metrics["source_test"]),
                              target=_headline(metrics["target"]) if "target" in metrics else None,
                              seconds=time.perf_counter() - start)


def score_predictions(predictions_uri: str, labels: IngestManifest, classes: list[str]) -> dict:
    """Join predictions to labels by content hash, so labels may name the images however they like."""
    code = {c: i for i, c in enumerate(classes)}
    pred = storage.read_table(predictions_uri, columns=["image_id", "prediction"]).to_pandas()
    truth = read_index(labels)[["image_id", "label"]].drop_duplicates("image_id")
    joined = pred.merge(truth, on="image_id")
    known = joined[joined.label.isin(code)]
    metrics = classification_metrics(known.label.map(code).to_numpy(), known.prediction.map(code).to_numpy(), classes)
    metrics["unlabeled_predictions"] = int(len(pred) - len(joined))
    metrics["labels_outside_source_classes"] = int(len(joined) - len(known))
    return metrics


def _headline(m: dict) -> dict:
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "n": m["n"]}
