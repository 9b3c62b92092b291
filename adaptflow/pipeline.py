"""The source-only head of every run, and small helpers of the stages past extraction (run ids, indexes).
Prediction and evaluation at scale live in `adaptflow.prediction`."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime

import pandas as pd

from adaptflow import storage
from adaptflow.config import Config
from adaptflow.errors import DatasetError
from adaptflow.features import ExtractionPlan, load_features
from adaptflow.heads import train_head
from adaptflow.manifests import IngestManifest, Manifest
from adaptflow.models import ModelCard, save_model


class ModelManifest(Manifest):
    model_uri: str
    classes: list[str]
    fingerprint: str
    val_accuracy: float
    epochs: int
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
    head, curve = train_head(
        x_train,
        train.label.map(code).to_numpy(),
        x_val,
        val.label.map(code).to_numpy(),
        len(classes),
        cfg.head,
        cfg.seed,
    )
    val_acc = max(c["val_acc"] for c in curve)
    card = ModelCard(
        classes=classes,
        config=cfg,
        fingerprint=features.fingerprint,
        dim=features.dim,
        config_hash=cfg.fingerprint(),
        dataset_fingerprint=source.fingerprint,
        metrics={"source_val_accuracy": val_acc},
    )
    save_model(model_uri, head, card)
    storage.write_json(storage.join(model_uri, "curve.json"), curve)
    return ModelManifest(
        model_uri=model_uri,
        classes=classes,
        fingerprint=features.fingerprint,
        val_accuracy=val_acc,
        epochs=len(curve),
        seconds=time.perf_counter() - start,
    )
